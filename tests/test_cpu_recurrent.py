"""Parity of the Numba tier's recurrent ops (minilm/cpu/rnn.py, lstm.py, gru.py) with the reference.

Every kernel must equal the reference function of the same name, forward (output, every cache
field, final states) and backward (with and without final-state gradients), where the error of
an array is ``relative_error = max|actual - expected| / max|expected|`` (in float32 the
denominator is at least 1, see ``FLOAT32_TOL``). Then: gradient checks of the Numba pair itself,
a sequence cut in two chunks, the caches of the two tiers interchanging, strided inputs, deep
saturation, the exp/σ/tanh the kernels compute, dtypes, purity, bad input, the BLAS thread limit
around the ops, and the backend switch routing ``minilm.ops`` to these functions.
"""

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minilm
from minilm import ops
from minilm.cpu import _math as cpu_math, gru as cpu_gru, lstm as cpu_lstm, rnn as cpu_rnn
from minilm.cpu._jit import jit
from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.testing import ARGUMENTS, STATES, assert_backward_is_pure, relative_error, with_final_states
from minilm.testing import final_state_grads as final_state_kwargs
from minilm.testing import recurrent_args as make_args
from minilm.reference import gru as ref_gru, lstm as ref_lstm, rnn as ref_rnn

# float64: the kernels add and multiply in the reference's order and differ from it only in exp,
# σ and tanh, by an ulp or two, and in the rounding their fused multiply-adds save; through up to
# 7 steps of gates that stays below ~1e-13 relative.
EXACT_TOL = 1e-12
# float32: both tiers compute in float32 (ulp 1.2e-7), the same few-ulp differences, so the
# arrays agree to ~1e-6 of the O(1) gates and states they are computed from.
FLOAT32_TOL = 1e-5
TOL = {np.float64: EXACT_TOL, np.float32: FLOAT32_TOL}
# In either dtype an array that cancels down below that O(1) scale keeps its terms' absolute
# round-off (a gradient summed from terms of both signs, 1 - h^2 of a saturated unit, a GRU's
# h = (1 - z) n + z h0 of -0.0958 + 0.0958), so its error is taken relative to
# max(max|expected|, 1), the scale of those terms.
SCALE_FLOOR = 1.0
# exp_nonpositive: Cody-Waite reduction and a Taylor polynomial accurate to ~0.1 ulp, plus the
# rounding of the handful of operations after it.
EXP_ULPS = 2
# σ and tanh from that exp: a few roundings of values of order 1, so a few ulps of 1, absolute.
ACTIVATION_ULPS = 4

OPS = ("rnn", "lstm", "gru")
REFERENCE = {"rnn": ref_rnn, "lstm": ref_lstm, "gru": ref_gru}
NUMBA = {"rnn": cpu_rnn, "lstm": cpu_lstm, "gru": cpu_gru}
SOME = settings(max_examples=40, deadline=None)
FEW = settings(max_examples=12, deadline=None)
# H up to 20: the kernels' loops run 8 (float32) or 4 (float64) units at a time plus a remainder,
# so both parts are exercised.
dims = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 20))  # B, T, D, H
small_dims = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 9))
seeds = st.integers(0, 2**32 - 1)
# Weight scale, as in test_recurrent.py: from nearly linear gates to partly saturated ones. (Much
# larger gains make the tanh RNN chaotic: any rounding difference then grows step by step, in
# each tier alike. Deep saturation has its own test below.)
gains = st.floats(0.5, 1.5)
dtypes = st.sampled_from([np.float64, np.float32])


# --- helpers ----------------------------------------------------------------------------------

def forward(tier, op):
    return getattr(tier[op], f"{op}_forward")


def backward(tier, op):
    return getattr(tier[op], f"{op}_backward")


def assert_same(actual, expected, tol, what="", floor=None):
    """Same shape and dtype, finite, and within ``tol`` in ``relative_error`` (floor: the dtype's)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert np.all(np.isfinite(actual)), what
    rel = relative_error(actual, expected, SCALE_FLOOR if floor is None else floor)
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"


def assert_same_all(actual, expected, tol, names, floor=None):
    assert len(actual) == len(expected) == len(names)
    for a, e, name in zip(actual, expected, names):
        assert_same(a, e, tol, name, floor)


# --- parity with the reference ------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@SOME
@given(shape=dims, seed=seeds, gain=gains, dtype=dtypes, finals=st.booleans())
@example(shape=(1, 1, 1, 1), seed=1, gain=1.033203125, dtype=np.float64, finals=False)   # h cancels to 4e-5
def test_equals_reference(op, shape, seed, gain, dtype, finals):
    B, T, D, H = shape
    args = make_args(op, B, T, D, H, seed, gain, dtype)
    tol = TOL[dtype]
    h, cache = forward(NUMBA, op)(*args)
    h_ref, cache_ref = forward(REFERENCE, op)(*args)

    assert type(cache) is type(cache_ref)
    assert_same(h, h_ref, tol, "h")
    assert_same_all(cache, cache_ref, tol, cache._fields)
    for s in STATES[op]:
        assert_same(getattr(cache, f"{s}_T"), getattr(cache_ref, f"{s}_T"), tol, f"{s}_T")

    dh = np.random.default_rng(seed).standard_normal(h.shape).astype(dtype)
    kwargs = final_state_kwargs(op, B, H, seed, dtype) if finals else {}
    grads = backward(NUMBA, op)(dh, cache, **kwargs)
    grads_ref = backward(REFERENCE, op)(dh, cache_ref, **kwargs)
    assert_same_all(grads, grads_ref, tol, ARGUMENTS[op])


@pytest.mark.parametrize("op", OPS)
@FEW
@given(shape=dims, seed=seeds, gain=gains, dtype=dtypes)
def test_caches_interchange(op, shape, seed, gain, dtype):
    """Each tier's backward accepts the other's cache (the same NamedTuple) and gives its gradients."""
    B, T, D, H = shape
    args = make_args(op, B, T, D, H, seed, gain, dtype)
    _, cache = forward(NUMBA, op)(*args)
    _, cache_ref = forward(REFERENCE, op)(*args)
    dh = np.random.default_rng(seed).standard_normal((B, T, H)).astype(dtype)
    kwargs = final_state_kwargs(op, B, H, seed, dtype)
    expected = backward(REFERENCE, op)(dh, cache_ref, **kwargs)
    assert_same_all(backward(NUMBA, op)(dh, cache_ref, **kwargs), expected, TOL[dtype], ARGUMENTS[op])
    assert_same_all(backward(REFERENCE, op)(dh, cache, **kwargs), expected, TOL[dtype], ARGUMENTS[op])


@pytest.mark.parametrize("op", OPS)
def test_strided_inputs(op):
    """Views with any strides (every other time step, transposed weights, a batch slice of the
    state, a reversed bias) give the results of their contiguous copies."""
    B, T, D, H = 3, 5, 4, 10
    args = make_args(op, B, 2 * T, D, H, seed=4)
    named = dict(zip(ARGUMENTS[op], args))
    views = {"x": named["x"][:, ::2]}                           # (B, T, D), time stride 2
    for name in ARGUMENTS[op][1:]:
        a = named[name]
        if a.ndim == 2:
            views[name] = np.asfortranarray(a) if name.startswith("W") else np.concatenate([a, a])[::2]
        else:
            views[name] = np.ascontiguousarray(a[::-1])[::-1]   # negative stride
    strided = tuple(views[name] for name in ARGUMENTS[op])
    contiguous = tuple(np.ascontiguousarray(a) for a in strided)
    assert not all(a.flags.c_contiguous for a in strided)

    h, cache = forward(NUMBA, op)(*strided)
    h_ref, cache_ref = forward(REFERENCE, op)(*contiguous)
    assert_same(h, h_ref, EXACT_TOL, "h")
    dh = np.random.default_rng(5).standard_normal((B, 2 * T, H))[:, ::2]
    kwargs = {k: np.asfortranarray(v) for k, v in final_state_kwargs(op, B, H, seed=5).items()}
    assert_same_all(backward(NUMBA, op)(dh, cache, **kwargs),
                    backward(REFERENCE, op)(np.ascontiguousarray(dh), cache_ref, **kwargs), EXACT_TOL, ARGUMENTS[op])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_saturated_gates(op, dtype):
    """Biases of ±(15..60) put every gate in deep saturation (σ and tanh at 0 or ±1 to within
    e^-15, e^-|a| often below the smallest normal number); the results still equal the
    reference's, with no NaN.

    The gradients all pass through σ'(a) ~ e^-15 or 1 - tanh²(a), so they are tiny (1e-7), and
    1 - h² of an h within an ulp of ±1 cancels to 0 or a few ulps, differently in each tier. So
    every array is compared on the scale of the O(1) gates and states: floor 1. In float64 that
    still resolves the tiny gradients (TOL 1e-12 against values of 1e-7); in float32 (TOL 1e-5)
    it checks only that they are tiny and finite, as float32 cannot tell them apart.
    """
    B, T, D, H = 2, 4, 3, 9
    args = dict(zip(ARGUMENTS[op], make_args(op, B, T, D, H, seed=6, dtype=dtype)))
    for name in ("b", "b_x", "b_h"):
        if name in args:
            args[name] = args[name] * dtype(50)
    h, cache = forward(NUMBA, op)(*args.values())
    h_ref, cache_ref = forward(REFERENCE, op)(*args.values())
    assert_same_all(cache, cache_ref, TOL[dtype], cache._fields, floor=1.0)
    dh = np.random.default_rng(6).standard_normal(h.shape).astype(dtype)
    assert_same_all(backward(NUMBA, op)(dh, cache), backward(REFERENCE, op)(dh, cache_ref), TOL[dtype],
                    ARGUMENTS[op], floor=1.0)


# --- gradients of the Numba pair ----------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@FEW
@given(shape=small_dims, seed=seeds, gain=gains)
def test_gradcheck(op, shape, seed, gain):
    """The Numba backward equals the numerical gradient of the Numba forward, final-state
    gradients included (the output carries h_T, c_T, so the contraction reaches dh_T, dc_T)."""
    fwd, bwd = with_final_states(op, forward(NUMBA, op), backward(NUMBA, op))
    report = gradcheck(fwd, bwd, make_args(op, *shape, seed, gain), seed=seed % 1000, name=f"numba {op}+states")
    assert [a.name for a in report.arguments] == list(ARGUMENTS[op])
    assert report.passed, str(report)
    assert max(a.max_rel_error for a in report.arguments) <= DEFAULT_TOL


@pytest.mark.parametrize("op", OPS)
@FEW
@given(shape=dims, seed=seeds, gain=gains, cut=st.floats(0.0, 1.0))
def test_two_chunks_equal_the_whole_sequence(op, shape, seed, gain, cut):
    """On the Numba tier, a sequence cut in two chunks (the second starting from the first's final
    states, the first's backward given the second's dh0, dc0) gives the whole sequence's results."""
    B, T, D, H = shape
    T += 1                                                      # room for a cut
    k = 1 + min(int(cut * (T - 1)), T - 2)                      # 1 <= k < T
    args = make_args(op, B, T, D, H, seed, gain)
    names = ARGUMENTS[op]
    fwd, bwd = forward(NUMBA, op), backward(NUMBA, op)
    dh = np.random.default_rng(seed).standard_normal((B, T, H))
    finals = final_state_kwargs(op, B, H, seed)

    h, cache = fwd(*args)
    grads = dict(zip(names, bwd(dh, cache, **finals)))
    first = dict(zip(names, args), x=args[0][:, :k])
    h1, cache1 = fwd(*first.values())
    second = dict(first, x=args[0][:, k:], **{f"{s}0": getattr(cache1, f"{s}_T") for s in STATES[op]})
    h2, cache2 = fwd(*second.values())
    grads2 = dict(zip(names, bwd(dh[:, k:], cache2, **finals)))
    carried = {f"d{s}_T": grads2[f"{s}0"] for s in STATES[op]}
    grads1 = dict(zip(names, bwd(dh[:, :k], cache1, **carried)))

    assert_same(np.concatenate([h1, h2], axis=1), h, EXACT_TOL, "h")
    for s in STATES[op]:
        assert_same(getattr(cache2, f"{s}_T"), getattr(cache, f"{s}_T"), EXACT_TOL, f"{s}_T")
        assert_same(grads1[f"{s}0"], grads[f"{s}0"], EXACT_TOL, f"d{s}0")
    assert_same(np.concatenate([grads1["x"], grads2["x"]], axis=1), grads["x"], EXACT_TOL, "dx")
    for name in names[1 + len(STATES[op]):]:                    # weights and biases: the chunks' sum
        assert_same(grads1[name] + grads2[name], grads[name], EXACT_TOL, f"d{name}")


# --- exp, σ and tanh of the kernels -------------------------------------------------------------

@jit                       # minilm's jit: cached under a name that changes with minilm/cpu/_math.py
def _apply(fn_id, a):
    out = np.empty_like(a)
    for j in range(a.shape[0]):
        if fn_id == 0:
            out[j] = cpu_math.exp_nonpositive(a[j])
        elif fn_id == 1:
            out[j] = cpu_math.sigmoid(a[j])
        else:
            out[j] = cpu_math.tanh(a[j])
    return out


def _exact(fn_id, a):
    """exp / σ / tanh in extended precision (np.longdouble, 64-bit mantissa on x86)."""
    a = a.astype(np.longdouble)
    return (np.exp(a), 1 / (1 + np.exp(-a)), np.tanh(a))[fn_id]


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="the kernels' own exp runs only compiled; as Python it is "
                                                      "NumPy's, whose float32 exp is not within EXP_ULPS")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_sigmoid_tanh_are_accurate(dtype):
    """exp_nonpositive within EXP_ULPS where e^x is a normal number and within the smallest normal
    number below that (0 allowed); σ and tanh within ACTIVATION_ULPS of 1, exact at ±inf."""
    eps, tiny = float(np.finfo(dtype).eps), np.finfo(dtype).tiny
    x = np.concatenate([np.linspace(1.05 * np.log(tiny), 0, 200001), -np.logspace(-30, 4, 2001), [-np.inf]])
    x = x.astype(dtype)
    exp, exact = _apply(0, x), _exact(0, x)
    normal = exact >= tiny
    ulps = np.abs(exp[normal] - exact[normal]) / np.spacing(exact[normal].astype(dtype)).astype(np.longdouble)
    assert exp.dtype == dtype and float(np.max(ulps)) <= EXP_ULPS
    assert np.all(np.abs(exp[~normal] - exact[~normal]) <= tiny) and exp[-1] == 0

    a = np.concatenate([np.linspace(-60, 60, 100001), np.logspace(-30, 1, 1001), -np.logspace(-30, 1, 1001),
                        [0.0, 1e4, -1e4, np.inf, -np.inf]]).astype(dtype)
    for fn_id in (1, 2):
        y = _apply(fn_id, a)
        assert y.dtype == dtype
        assert float(np.max(np.abs(y - _exact(fn_id, a)))) <= ACTIVATION_ULPS * eps
    assert _apply(1, a)[-2:].tolist() == [1.0, 0.0] and _apply(2, a)[-2:].tolist() == [1.0, -1.0]
    assert np.all(_apply(2, -a) == -_apply(2, a))                # tanh is exactly odd
    zeros = np.array([0.0, -0.0], dtype=dtype)
    assert np.signbit(_apply(2, zeros)).tolist() == [False, True]   # ±0 keeps its sign, as np.tanh (+0 gave -0)


@pytest.mark.parametrize("fn_id", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nan_stays_nan(fn_id, dtype):
    """A NaN (a diverged training run) is passed on, never turned into a number."""
    assert np.isnan(_apply(fn_id, np.array([np.nan], dtype=dtype))[0])


def test_python_versions_of_the_helpers():
    """Outside a kernel the helpers are NumPy's functions (what the overloads stand in for)."""
    a = np.linspace(-5, 5, 11)
    np.testing.assert_array_equal(cpu_math.exp_nonpositive(-np.abs(a)), np.exp(-np.abs(a)))
    np.testing.assert_allclose(cpu_math.sigmoid(a), 1 / (1 + np.exp(-a)), rtol=EXACT_TOL)   # the same two forms: an ulp or two
    np.testing.assert_array_equal(cpu_math.tanh(a), np.tanh(a))


# --- dtypes, purity, bad input ------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_float16_runs_the_reference(op):
    args = make_args(op, 2, 3, 4, 5, seed=7, dtype=np.float16)
    h, cache = forward(NUMBA, op)(*args)
    h_ref, cache_ref = forward(REFERENCE, op)(*args)
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h, h_ref)
    dh = np.ones_like(h)
    for g, g_ref in zip(backward(NUMBA, op)(dh, cache), backward(REFERENCE, op)(dh, cache_ref)):
        np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("op", OPS)
def test_gradient_of_another_dtype_runs_the_reference(op):
    """A float64 dh for a float32 cache gives exactly what the reference gives (its promotions)."""
    args = make_args(op, 2, 3, 4, 5, seed=8, dtype=np.float32)
    _, cache = forward(NUMBA, op)(*args)
    dh = np.random.default_rng(8).standard_normal((2, 3, 5))
    for g, g_ref in zip(backward(NUMBA, op)(dh, cache), backward(REFERENCE, op)(dh, cache)):
        assert g.dtype == g_ref.dtype
        np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("op", OPS)
def test_backward_leaves_its_inputs_and_the_cache_alone(op):
    assert_backward_is_pure(op, forward(NUMBA, op), backward(NUMBA, op), B=2, T=4, D=3, H=9)


BAD = [   # (op, argument, how it is spoiled)
    ("rnn", "x", lambda a: a.tolist()),
    ("lstm", "x", lambda a: a[:, :0]),
    ("gru", "h0", lambda a: a[:1]),
    ("lstm", "c0", lambda a: a.astype(np.float32)),
    ("rnn", "W_x", lambda a: a[:-1]),
    ("gru", "W_h", lambda a: a[:, :-1]),
    ("lstm", "b", lambda a: a[None]),
    ("gru", "b_h", lambda a: a.astype(np.int64)),
]


@pytest.mark.parametrize("op, name, spoil", BAD, ids=[f"{op}-{name}" for op, name, _ in BAD])
def test_bad_forward_input_raises_the_reference_error(op, name, spoil):
    named = dict(zip(ARGUMENTS[op], make_args(op, 2, 3, 4, 5)))
    named[name] = spoil(named[name])
    with pytest.raises((TypeError, ValueError)) as expected:
        forward(REFERENCE, op)(*named.values())
    with pytest.raises(expected.type, match=rf"^{op}: argument '{name}'") as got:
        forward(NUMBA, op)(*named.values())
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("op, name", [("rnn", "dh"), ("lstm", "dh_T"), ("lstm", "dc_T"), ("gru", "dh_T")])
def test_bad_backward_input_raises_the_reference_error(op, name):
    B, T, D, H = 2, 3, 4, 5
    h, cache = forward(NUMBA, op)(*make_args(op, B, T, D, H))
    dh, kwargs = (np.zeros((B, T + 1, H)), {}) if name == "dh" else (np.zeros_like(h), {name: np.zeros((B, H + 1))})
    with pytest.raises(ValueError) as expected:
        backward(REFERENCE, op)(dh, cache, **kwargs)
    with pytest.raises(ValueError, match=rf"^{op}_backward: argument '{name}'") as got:
        backward(NUMBA, op)(dh, cache, **kwargs)
    assert str(got.value) == str(expected.value)


# --- the backend switch ---------------------------------------------------------------------------

def test_the_numba_backend_uses_the_kernels():
    minilm.use("numba")
    for op in OPS:
        for direction in ("forward", "backward"):
            name = f"{op}_{direction}"
            assert getattr(ops, name) is getattr(NUMBA[op], name)
    minilm.use("numpy")
    for op in OPS:
        assert getattr(ops, f"{op}_forward") is forward(REFERENCE, op)
        assert getattr(ops, f"{op}_backward") is backward(REFERENCE, op)


@pytest.mark.parametrize("op", OPS)
def test_float64_parity_holds_relative_at_small_activations(op):
    """DESIGN's float64 parity (1e-12 relative) holds for inputs whose pre-activations are small too:
    the kernels' tanh is accurate relative to its value, not only to 1, near 0 (1 - e^{-2|a|} cancelled
    to ~u / |a| relative, 5e-11 for these arrays)."""
    args = tuple(1e-6 * a for a in make_args(op, 2, 5, 4, 3, seed=1))
    h, cache = forward(NUMBA, op)(*args)
    h_ref, cache_ref = forward(REFERENCE, op)(*args)
    assert_same(h, h_ref, EXACT_TOL, "h", floor=0.0)
    dh = np.random.default_rng(2).standard_normal(h.shape)
    assert_same_all(backward(NUMBA, op)(dh, cache), backward(REFERENCE, op)(dh, cache_ref), EXACT_TOL,
                    ARGUMENTS[op], floor=0.0)


@jit
def _reduced(a):
    q, s = np.empty_like(a), np.empty_like(a)
    for j in range(a.shape[0]):
        q[j], s[j] = cpu_math._exp_reduced(a[j])
    return q, s


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_exp_reduction_splits_e_to_the_x_into_a_power_of_2_and_e_to_the_r(dtype):
    """(e^r - 1, 2^n) of the kernels' reduction, and of its NumPy twin: 2^n exact, |r| <= ln 2 / 2."""
    x = -np.concatenate([np.linspace(0, 80, 10001), np.logspace(-30, 1, 301)]).astype(dtype)
    for q, s in (_reduced(x), cpu_math._exp_reduced(x)):
        assert q.dtype == s.dtype == dtype
        n = np.log2(s)
        assert np.all(n == np.round(n)) and np.all(np.abs(np.log1p(q.astype(np.float64))) <= np.log(2) / 2 + 1e-6)
        np.testing.assert_allclose((q.astype(np.float64) + 1) * s, np.exp(x.astype(np.float64)),
                                   rtol=8 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tanh_is_accurate_relative_near_zero(dtype):
    """tanh within ACTIVATION_ULPS of its own size (not only of 1) for small |a|, as NumPy's."""
    a = np.concatenate([np.logspace(-30, 0, 2001), -np.logspace(-30, 0, 2001)]).astype(dtype)
    y, exact = _apply(2, a), _exact(2, a)
    ulps = np.abs(y - exact) / np.spacing(np.abs(exact).astype(dtype)).astype(np.longdouble)
    assert float(np.max(ulps)) <= ACTIVATION_ULPS
