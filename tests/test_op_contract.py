"""The op contract's bad input that every op shares, on the numpy and numba tiers: the upstream
gradient a backward is given must be a float array (an int, bool or complex one had flowed through
NumPy's promotions into gradients of its dtype), its cache must be the one its forward returned,
the checks that composite ops make of their own options name the composite op, and every op takes
arguments in the other byte order."""
import re

import numpy as np
import pytest

import minilm
from minilm import ops
from minilm.opcases import CASES
from minilm.optim import AdamW
from minilm.params import Params
from minilm.testing import relative_error

BACKENDS = ["numpy", "numba"]
UPSTREAM = {op: "dh" if op in ("rnn", "lstm", "gru") else "dout" if op == "embedding" else "dy"
            for op in CASES if op != "cross_entropy"}      # cross_entropy's dloss: validate.as_scalar_gradient


@pytest.fixture(params=BACKENDS)
def tier(request):
    before = minilm.backend.current()
    minilm.use(request.param)
    yield request.param
    minilm.use(before)


@pytest.mark.parametrize("bad", [np.int64, np.bool_, np.complex128])
@pytest.mark.parametrize("op", list(UPSTREAM))
def test_a_backward_refuses_an_upstream_gradient_that_is_not_float(tier, op, bad):
    args, kwargs = CASES[op][0][1](np.random.default_rng(0), np.float64)
    out, cache = getattr(ops, f"{op}_forward")(*args, **kwargs)
    with pytest.raises(TypeError, match=rf"^{op}_backward: argument '{UPSTREAM[op]}' must be a floating-point "
                                        rf"array \(float16, float32 or float64; bfloat16 on the cupy backend\), "
                                        rf"got dtype {np.dtype(bad)}$"):
        getattr(ops, f"{op}_backward")(np.ones(out.shape, dtype=bad), cache)


@pytest.mark.parametrize("name", ["dh_T", "dc_T"])
def test_a_recurrent_backward_refuses_a_final_state_gradient_that_is_not_float(tier, name):
    args, kwargs = CASES["lstm"][0][1](np.random.default_rng(0), np.float64)
    out, cache = ops.lstm_forward(*args, **kwargs)
    B, H = out.shape[0], out.shape[2]
    with pytest.raises(TypeError, match=rf"^lstm_backward: argument '{name}' must be a floating-point array"):
        ops.lstm_backward(np.ones_like(out), cache, **{name: np.ones((B, H), dtype=np.complex128)})


@pytest.mark.parametrize("op", list(CASES))
def test_a_backward_refuses_a_cache_that_its_forward_did_not_return(tier, op):
    """A model's backward list written by hand can hand an op another op's cache: it is refused by
    name, rather than failing deep inside ("not enough values to unpack") or, for a cache of the
    same length, being computed with (relu_backward took a linear's cache)."""
    args, kwargs = CASES[op][0][1](np.random.default_rng(0), np.float64)
    out, cache = getattr(ops, f"{op}_forward")(*args, **kwargs)
    other = "layernorm" if op == "linear" else "linear"
    other_args, other_kwargs = CASES[other][0][1](np.random.default_rng(0), np.float64)
    _, other_cache = getattr(ops, f"{other}_forward")(*other_args, **other_kwargs)
    dout = np.ones((), dtype=out.dtype) if op == "cross_entropy" else np.ones_like(out)
    for wrong in (None, {"x": args[0]}, tuple(cache), other_cache):
        with pytest.raises(TypeError, match=rf"^{op}_backward: argument 'cache' must be the {type(cache).__name__} "
                                            rf"that {op}_forward returned, got {type(wrong).__name__}$"):
            getattr(ops, f"{op}_backward")(dout, wrong)
    getattr(ops, f"{op}_backward")(dout, cache)                 # the forward's own cache is taken


def _self_attention_args(dtype=np.float64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8)).astype(dtype)
    return (x, rng.standard_normal((8, 24)).astype(dtype), None, rng.standard_normal((8, 8)).astype(dtype), None)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dropout=1.0), ValueError, r"^self_attention: option 'dropout' must be"),
    (dict(dropout=0.1), TypeError, r"^self_attention: option 'rng' must be a numpy.random.Generator"),
    (dict(dropout=0.1, rng="seed"), TypeError, r"^self_attention: option 'rng' must be"),
    (dict(causal=np.array([True, False])), ValueError, r"^self_attention: option 'causal' must be True or False"),
    (dict(causal=1), ValueError, r"^self_attention: option 'causal' must be True or False, got 1"),
])
def test_self_attention_names_itself_for_its_own_options(tier, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.self_attention_forward(*_self_attention_args(), n_head=2, **kwargs)


def test_attention_names_itself_for_a_missing_rng(tier):
    q = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    with pytest.raises(TypeError, match=r"^attention: option 'rng' must be a numpy.random.Generator"):
        ops.attention_forward(q, q, q, dropout=0.5)
    with pytest.raises(ValueError, match=r"^attention: option 'causal' must be True or False"):
        ops.attention_forward(q, q, q, causal=np.array([True]))


def test_composite_ops_take_big_endian_arguments(tier):
    """Arrays of another byte order (np.load of a file written on a big-endian machine) are the
    same float64: the ops take them, and give what they give for native ones."""
    args = _self_attention_args()
    swapped = tuple(None if a is None else a.astype(a.dtype.newbyteorder()) for a in args)
    y, _ = ops.self_attention_forward(*args, n_head=2)
    y_swapped, _ = ops.self_attention_forward(*swapped, n_head=2)
    np.testing.assert_array_equal(y_swapped, y)
    rng = np.random.default_rng(1)
    x, W = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    y, _ = ops.linear_forward(x, W.astype(">f8"), None)
    np.testing.assert_array_equal(y, x @ W)



# A first argument in the other byte order runs the reference's code on the numba tier, where the
# native one runs the kernels: the two agree to the tiers' float64 parity bound (test_cpu_kernels.py)
SWAPPED_TOL = 1e-12


@pytest.mark.parametrize("op, label, case", [(op, label, case) for op, cases in CASES.items() for label, case in cases],
                         ids=[f"{op}-{label}" if label else op for op, cases in CASES.items() for label, _ in cases])
def test_every_op_takes_each_argument_in_the_other_byte_order(tier, op, label, case):
    """One float argument at a time, and the upstream gradient, in the other byte order (np.load of
    a file written on a big-endian machine): the same float64, so the same results. The numba tier
    had passed such an argument, other than the first, to a kernel that Numba does not compile
    for it (a TypingError)."""
    forward, backward = getattr(ops, f"{op}_forward"), getattr(ops, f"{op}_backward")

    def run(swap=None, swap_upstream=False):
        args, kwargs = case(np.random.default_rng(0), np.float64)      # afresh: a case's rng is drawn from
        args = [a.astype(a.dtype.newbyteorder()) if i == swap else a for i, a in enumerate(args)]
        out, cache = forward(*args, **kwargs)
        upstream = 1.0 if op == "cross_entropy" else np.random.default_rng(1).standard_normal(out.shape)
        if swap_upstream and op != "cross_entropy":
            upstream = upstream.astype(">f8")
        return out, backward(upstream, cache)

    out, grads = run()
    floats = [i for i, a in enumerate(case(np.random.default_rng(0), np.float64)[0])
              if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    for swap, swap_upstream in [(i, False) for i in floats] + [(None, True)]:
        out_swapped, grads_swapped = run(swap, swap_upstream)
        assert relative_error(out_swapped, out) <= SWAPPED_TOL, (swap, swap_upstream)
        for g_swapped, g in zip(grads_swapped, grads, strict=True):
            assert (g_swapped is None) == (g is None)
            assert g is None or relative_error(g_swapped, g) <= SWAPPED_TOL, (swap, swap_upstream)

@pytest.mark.parametrize("D, C", [(0, 5), (4, 0)])
def test_linear_with_an_empty_width(tier, D, C):
    """y = x W + b with no inputs (D = 0) is b; with no outputs (C = 0) it is empty, and so are
    the gradients of that width."""
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((2, 3, D)), rng.standard_normal((D, C)), rng.standard_normal(C)
    y, cache = ops.linear_forward(x, W, b)
    assert y.shape == (2, 3, C)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (2, 3, C)))
    dx, dW, db = ops.linear_backward(np.ones((2, 3, C)), cache)
    assert dx.shape == x.shape and dW.shape == (D, C) and db.shape == (C,)
    np.testing.assert_array_equal(db, np.full(C, 6.0))
    np.testing.assert_array_equal(dx, np.zeros_like(x) if C == 0 else np.ones((2, 3, 0)))


# float32 against float64 on the same inputs (rounded to float32 first): a few roundings of
# u = 6e-8 through at most a few dozen operations; every op on both tiers measures <= 7e-7. The
# floor of 1 keeps gradients that cancel (a peaked softmax's) at the absolute round-off of their
# O(1) terms. A float32 weight gradient rounded through float16 (2.5e-4) had passed every test.
F32_VS_F64_TOL = 1e-5


@pytest.mark.parametrize("op, label, case", [(op, label, case) for op, cases in CASES.items() for label, case in cases],
                         ids=[f"{op}-{label}" for op, cases in CASES.items() for label, _ in cases])
def test_float32_is_float64_to_float32s_precision(tier, op, label, case):
    """The dtype tests check only that float32 stays float32; this checks its values, forward and
    backward, against the same op in float64."""
    from minilm.testing import relative_error

    def floats(args, dtype):
        return tuple(a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)
    args, kwargs = case(np.random.default_rng(0), np.float64)
    args32 = floats(args, np.float32)
    args64 = floats(args32, np.float64)                  # the same values: the float32 ones
    forward, backward = getattr(ops, f"{op}_forward"), getattr(ops, f"{op}_backward")
    (y32, cache32), (y64, cache64) = forward(*args32, **kwargs), forward(*args64, **kwargs)
    assert y32.dtype == np.float32
    if op == "cross_entropy":
        dy64 = np.float64(1.0)
    else:
        dy64 = np.random.default_rng(1).standard_normal(y64.shape).astype(np.float32).astype(np.float64)
    grads32, grads64 = backward(np.asarray(dy64, dtype=np.float32), cache32), backward(dy64, cache64)
    assert relative_error(y32, y64, floor=1.0) <= F32_VS_F64_TOL
    for i, (g32, g64) in enumerate(zip(grads32, grads64)):
        assert (g32 is None) == (g64 is None), i
        if g64 is not None:
            assert relative_error(g32, g64, floor=1.0) <= F32_VS_F64_TOL, f"gradient {i}"


# --- the kind of error: TypeError for an option of the wrong kind, ValueError for one out of range ----------

_X = np.ones((2, 3, 4))
WRONG_KIND = [      # (call, option): each value below is of the wrong kind for the option
    (lambda v: ops.dropout_forward(_X, p=v, rng=0), "p"),
    (lambda v: ops.layernorm_forward(_X, np.ones(4), np.zeros(4), eps=v), "eps"),
    (lambda v: ops.self_attention_forward(_X, np.ones((4, 12)), None, np.ones((4, 4)), None, n_head=v), "n_head"),
    (lambda v: ops.attention_forward(_X[None], _X[None], _X[None], causal=v), "causal"),
    (lambda v: ops.cross_entropy_forward(_X, np.zeros((2, 3), int), label_smoothing=v), "label_smoothing"),
]


@pytest.mark.parametrize("value", ["0.5", None, [1], 2.0 + 0j])
@pytest.mark.parametrize("call, option", WRONG_KIND, ids=[w[1] for w in WRONG_KIND])
def test_an_option_of_the_wrong_kind_is_a_type_error(call, option, value):
    """As the validators' docstring says, and as PyTorch and NumPy do; still a ValueError too, as before."""
    with pytest.raises(TypeError, match=rf"option '{option}' must be .*, got {re.escape(repr(value))}$"):
        call(value)
    with pytest.raises(ValueError):
        call(value)


@pytest.mark.parametrize("call, value", [
    (lambda v: ops.dropout_forward(_X, p=0.5, rng=v), -1),
    (lambda v: ops.dropout_forward(_X, p=v, rng=0), 1.5),
    (lambda v: ops.self_attention_forward(_X, np.ones((4, 12)), None, np.ones((4, 4)), None, n_head=v), 0),
], ids=["negative seed", "p past 1", "no heads"])
def test_an_option_out_of_range_is_a_value_error_only(call, value):
    with pytest.raises(ValueError) as info:
        call(value)
    assert not isinstance(info.value, TypeError)


def test_an_option_is_shown_abridged():
    """A million-character string given for a choice is not printed whole into the message."""
    with pytest.raises(ValueError) as info:
        ops.gelu_forward(_X, approximate="x" * 10**6)
    assert len(str(info.value)) < 200
    with pytest.raises(TypeError, match=r"^dropout: option 'rng' must be a numpy.random.Generator") as info:
        ops.dropout_forward(_X, p=0.5, rng="x" * 10**6)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("call", [
    lambda: ops.layernorm_forward(_X, np.ones(_X.shape[-1]), np.zeros(_X.shape[-1]), eps=10**400),
    lambda: AdamW(Params([("w", (2, 2))], dtype=np.float64), lr=10**400),
    lambda: AdamW(Params([("w", (2, 2))], dtype=np.float64), lr=0.1, weight_decay=10**400),
], ids=["layernorm eps", "AdamW lr", "AdamW weight_decay"])
def test_an_integer_past_floats_range_is_an_option_out_of_range(call):
    """An int too large for a float is a number that is not finite: math.isfinite raised a bare
    OverflowError ('int too large to convert to float') that named neither op nor option."""
    with pytest.raises(ValueError, match=r"option '(eps|lr|weight_decay)' must be a (positive )?finite number"):
        call()


@pytest.mark.parametrize("value", [None, 3, np.array(["tanh", "none"])], ids=["None", "int", "array"])
def test_a_choice_of_the_wrong_kind_is_a_type_error(value):
    """A choice option given another kind of object than a string is refused by name as one (an array
    of strings was compared element by element with the choices: NumPy's 'truth value ... ambiguous')."""
    with pytest.raises(TypeError, match=r"^gelu: option 'approximate' must be one of 'tanh', 'none', got ") as info:
        ops.gelu_forward(_X, approximate=value)
    assert isinstance(info.value, ValueError)                    # what it raised before, still caught as it was


def test_a_choice_of_the_right_kind_out_of_range_is_a_value_error_only():
    with pytest.raises(ValueError, match=r"^gelu: option 'approximate' must be one of 'tanh', 'none', got 'nope'$") as info:
        ops.gelu_forward(_X, approximate="nope")
    assert not isinstance(info.value, TypeError)
