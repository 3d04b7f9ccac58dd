"""The recurrent ops rnn, lstm and gru: gradients (with and without final-state gradients), a
sequence cut in two chunks, the cell written out by hand, PyTorch, dtypes, purity, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.testing import ARGUMENTS, STATES, assert_backward_is_pure, with_final_states
from minilm.testing import final_state_grads as final_state_kwargs
from minilm.testing import recurrent_args as make_args
from minilm.reference.gru import gru_backward, gru_forward
from minilm.reference.lstm import lstm_backward, lstm_forward
from minilm.reference.rnn import rnn_backward, rnn_forward

# Whole sequence vs two chunks, and our cell vs the one written here: the same float64 arithmetic
# up to the order of a few sums (the weight gradients add the chunks' shares, the hand-written
# sigmoid is 1/(1 + e^-a) rather than ½(1 + tanh(a/2))), so only a few ulps of O(1) values differ.
EXACT_TOL = 1e-12
# PyTorch in float64 sums in its own order (fused gate matmuls, bias_hh added separately).
TORCH_TOL = 1e-12
# float32 against float64: a few float32 ulps (~6e-8) grown through T tanh/sigmoid steps.
FLOAT32_TOL = 1e-5

FORWARD = {"rnn": rnn_forward, "lstm": lstm_forward, "gru": gru_forward}
BACKWARD = {"rnn": rnn_backward, "lstm": lstm_backward, "gru": gru_backward}
OPS = tuple(FORWARD)

SETTINGS = settings(max_examples=20, deadline=None)   # 20 draws per property: the file runs in ~10 s
dims = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))  # B, T, D, H
seeds = st.integers(0, 2**32 - 1)
gains = st.floats(0.5, 1.5)       # weight scale: from nearly linear gates to partly saturated ones


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@SETTINGS
@given(shape=dims, seed=seeds, gain=gains)
def test_gradcheck_every_argument(op, shape, seed, gain):
    report = gradcheck(FORWARD[op], BACKWARD[op], make_args(op, *shape, seed, gain), seed=seed % 1000)
    assert [a.name for a in report.arguments] == list(ARGUMENTS[op])
    assert report.passed, str(report)
    assert max(a.max_rel_error for a in report.arguments) <= DEFAULT_TOL


@pytest.mark.parametrize("op", OPS)
@SETTINGS
@given(shape=dims, seed=seeds, gain=gains)
def test_gradcheck_with_final_state_gradients(op, shape, seed, gain):
    forward, backward = with_final_states(op, FORWARD[op], BACKWARD[op])
    report = gradcheck(forward, backward, make_args(op, *shape, seed, gain), seed=seed % 1000, name=f"{op}+states")
    assert [a.name for a in report.arguments] == list(ARGUMENTS[op])
    assert report.passed, str(report)


@pytest.mark.parametrize("op", OPS)
def test_final_state_gradients_matter(op):
    """dh_T (and dc_T) change every gradient, so the check above could not pass by ignoring them."""
    B, T, D, H = 2, 3, 3, 4
    h, cache = FORWARD[op](*make_args(op, B, T, D, H))
    dh = np.random.default_rng(5).standard_normal(h.shape)
    plain = BACKWARD[op](dh, cache)
    for name, d in final_state_kwargs(op, B, H, seed=5).items():
        given_state = BACKWARD[op](dh, cache, **{name: d})
        for g0, g1 in zip(plain, given_state):
            assert np.max(np.abs(g1 - g0)) > 1e-3, name


# --- a sequence cut in two chunks ---------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@SETTINGS
@given(shape=dims, seed=seeds, gain=gains, cut=st.floats(0.0, 1.0))
def test_two_chunks_equal_the_whole_sequence(op, shape, seed, gain, cut):
    B, T, D, H = shape
    T += 1                                                      # room for a cut
    k = 1 + min(int(cut * (T - 1)), T - 2)                      # 1 <= k < T
    args = make_args(op, B, T, D, H, seed, gain)
    names = ARGUMENTS[op]
    forward, backward = FORWARD[op], BACKWARD[op]
    rng = np.random.default_rng(seed)
    dh = rng.standard_normal((B, T, H))
    finals = final_state_kwargs(op, B, H, seed)                # gradients at the very end, too

    h, cache = forward(*args)
    grads = dict(zip(names, backward(dh, cache, **finals)))

    first = dict(zip(names, args), x=args[0][:, :k])
    h1, cache1 = forward(*first.values())
    second = dict(first, x=args[0][:, k:], h0=cache1.h_T)
    if op == "lstm":
        second["c0"] = cache1.c_T
    h2, cache2 = forward(*second.values())
    grads2 = dict(zip(names, backward(dh[:, k:], cache2, **finals)))
    carried = {f"d{s}_T": grads2[f"{s}0"] for s in STATES[op]}  # the second chunk's dh0 (and dc0)
    grads1 = dict(zip(names, backward(dh[:, :k], cache1, **carried)))

    assert_close(np.concatenate([h1, h2], axis=1), h, EXACT_TOL)
    for s in STATES[op]:
        assert_close(getattr(cache2, f"{s}_T"), getattr(cache, f"{s}_T"), EXACT_TOL)
        assert_close(grads1[f"{s}0"], grads[f"{s}0"], EXACT_TOL)
    assert_close(np.concatenate([grads1["x"], grads2["x"]], axis=1), grads["x"], EXACT_TOL)
    for name in names[1 + len(STATES[op]):]:                    # weights and biases: the chunks' sum
        assert_close(grads1[name] + grads2[name], grads[name], EXACT_TOL)


# --- the cell written out by hand ---------------------------------------------------------------

def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def rnn_cell(x_t, h, W_x, W_h, b):
    return np.tanh(x_t @ W_x + h @ W_h + b), None


def lstm_cell(x_t, h, c, W_x, W_h, b):
    H = h.shape[1]
    a = x_t @ W_x + h @ W_h + b
    i, f, g, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), sigmoid(a[:, 3 * H:])
    c = f * c + i * g
    return o * np.tanh(c), c


def gru_cell(x_t, h, W_x, W_h, b_x, b_h):
    H = h.shape[1]
    gx, gh = x_t @ W_x + b_x, h @ W_h + b_h
    r = sigmoid(gx[:, :H] + gh[:, :H])
    z = sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
    n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
    return (1 - z) * n + z * h, None


CELLS = {"rnn": rnn_cell, "lstm": lstm_cell, "gru": gru_cell}


@pytest.mark.parametrize("op", OPS)
@SETTINGS
@given(shape=dims, seed=seeds, gain=gains)
def test_one_step_is_the_cell_equation(op, shape, seed, gain):
    B, _, D, H = shape
    args = make_args(op, B, 1, D, H, seed, gain)
    x, h0, rest = args[0], args[1], args[2:]
    h, cache = FORWARD[op](*args)
    if op == "lstm":
        h1, c1 = lstm_cell(x[:, 0], h0, *rest)
        assert_close(cache.c_T, c1, EXACT_TOL)
    else:
        h1, _ = CELLS[op](x[:, 0], h0, *rest)
    assert h.shape == (B, 1, H)
    assert_close(h[:, 0], h1, EXACT_TOL)
    assert_close(cache.h_T, h1, EXACT_TOL)


@pytest.mark.parametrize("op", OPS)
def test_sequence_is_the_cell_repeated(op):
    B, T, D, H = 2, 6, 3, 5
    args = make_args(op, B, T, D, H, seed=7)
    x, state, rest = args[0], list(args[1:1 + len(STATES[op])]), args[1 + len(STATES[op]):]
    h, cache = FORWARD[op](*args)
    for t in range(T):
        new = CELLS[op](x[:, t], *state, *rest)
        state = [s for s in new if s is not None]
        assert_close(h[:, t], state[0], EXACT_TOL)
    assert_close(cache.h_T, state[0], EXACT_TOL)
    if op == "lstm":
        assert_close(cache.c_T, state[1], EXACT_TOL)


# --- PyTorch ------------------------------------------------------------------------------------

def torch_module(torch, op, args):
    """nn.RNN / nn.LSTM / nn.GRU holding our weights, converted by transposes alone."""
    named = dict(zip(ARGUMENTS[op], args))
    D, H = named["x"].shape[2], named["h0"].shape[1]
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[op]
    module = cls(D, H, batch_first=True).double()
    b_ih = named["b_x"] if op == "gru" else named["b"]
    b_hh = named["b_h"] if op == "gru" else np.zeros_like(named["b"])   # only the sum b enters rnn, lstm
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.from_numpy(named["W_x"].T.copy()))
        module.weight_hh_l0.copy_(torch.from_numpy(named["W_h"].T.copy()))
        module.bias_ih_l0.copy_(torch.from_numpy(b_ih))
        module.bias_hh_l0.copy_(torch.from_numpy(b_hh))
    return module


@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (3, 1, 2, 3), (1, 9, 5, 2)])
@pytest.mark.parametrize("op", OPS)
def test_equals_pytorch(op, shape):
    torch = pytest.importorskip("torch")
    B, T, D, H = shape
    args = make_args(op, B, T, D, H, seed=11)
    named = dict(zip(ARGUMENTS[op], args))
    rng = np.random.default_rng(12)
    dh = rng.standard_normal((B, T, H))
    finals = final_state_kwargs(op, B, H, seed=12)

    h, cache = FORWARD[op](*args)
    grads = dict(zip(ARGUMENTS[op], BACKWARD[op](dh, cache, **finals)))

    module = torch_module(torch, op, args)
    x = torch.from_numpy(named["x"]).requires_grad_()
    states = [torch.from_numpy(named[f"{s}0"][None]).requires_grad_() for s in STATES[op]]   # (1, B, H)
    out, final = module(x, tuple(states) if op == "lstm" else states[0])
    final = final if op == "lstm" else (final,)
    loss = (out * torch.from_numpy(dh)).sum()
    for s, f in zip(STATES[op], final):
        loss = loss + (f[0] * torch.from_numpy(finals[f"d{s}_T"])).sum()
    loss.backward()

    assert_close(h, out.detach().numpy(), TORCH_TOL)
    for s, f in zip(STATES[op], final):
        assert_close(getattr(cache, f"{s}_T"), f[0].detach().numpy(), TORCH_TOL)
        assert_close(grads[f"{s}0"], states[STATES[op].index(s)].grad[0].numpy(), TORCH_TOL)
    assert_close(grads["x"], x.grad.numpy(), TORCH_TOL)
    assert_close(grads["W_x"], module.weight_ih_l0.grad.numpy().T, TORCH_TOL)
    assert_close(grads["W_h"], module.weight_hh_l0.grad.numpy().T, TORCH_TOL)
    if op == "gru":
        assert_close(grads["b_x"], module.bias_ih_l0.grad.numpy(), TORCH_TOL)
        assert_close(grads["b_h"], module.bias_hh_l0.grad.numpy(), TORCH_TOL)
    else:
        assert_close(grads["b"], module.bias_ih_l0.grad.numpy(), TORCH_TOL)
        assert_close(grads["b"], module.bias_hh_l0.grad.numpy(), TORCH_TOL)


# --- dtypes and purity --------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_float32_in_float32_out(op):
    B, T, D, H = 2, 7, 3, 5
    args64 = make_args(op, B, T, D, H, seed=3)
    args32 = tuple(a.astype(np.float32) for a in args64)
    dh = np.random.default_rng(4).standard_normal((B, T, H))
    finals = final_state_kwargs(op, B, H, seed=4)

    h32, cache32 = FORWARD[op](*args32)
    grads32 = BACKWARD[op](dh.astype(np.float32), cache32, **{k: v.astype(np.float32) for k, v in finals.items()})
    h64, cache64 = FORWARD[op](*args64)
    grads64 = BACKWARD[op](dh, cache64, **finals)

    assert h32.dtype == np.float32
    assert all(getattr(cache32, f"{s}_T").dtype == np.float32 for s in STATES[op])
    assert all(a.dtype == np.float32 for a in cache32 if isinstance(a, np.ndarray))
    assert [g.dtype for g in grads32] == [np.float32] * len(args32)
    assert_close(h32, h64, FLOAT32_TOL)
    for g32, g64 in zip(grads32, grads64):
        assert_close(g32, g64, FLOAT32_TOL * max(1.0, np.max(np.abs(g64))))


@pytest.mark.parametrize("op", OPS)
def test_backward_leaves_its_inputs_and_the_cache_alone(op):
    assert_backward_is_pure(op, FORWARD[op], BACKWARD[op], B=2, T=4, D=3, H=3)


# --- bad input ----------------------------------------------------------------------------------

def _replace(op, name, value):
    """Valid arguments for ``op`` (B, T, D, H = 2, 3, 4, 5) with argument ``name`` replaced."""
    named = dict(zip(ARGUMENTS[op], make_args(op, 2, 3, 4, 5)))
    named[name] = value(named[name])
    return tuple(named.values())


def _bias_names(op):
    return ("b_x", "b_h") if op == "gru" else ("b",)


BAD_FORWARD = [   # (argument, how it is spoiled, error)
    ("x", lambda a: a.tolist(), TypeError),                          # not an array
    ("x", lambda a: a.astype(np.int64), TypeError),                  # not floating point
    ("x", lambda a: a[0], ValueError),                               # rank 2, not (B, T, D)
    ("x", lambda a: a[:, :0], ValueError),                           # T = 0
    ("h0", lambda a: a.astype(np.int32), TypeError),
    ("h0", lambda a: a[0], ValueError),                              # rank 1, not (B, H)
    ("h0", lambda a: a[:1], ValueError),                             # batch differs from x's
    ("h0", lambda a: a[:, :-1], ValueError),                         # H differs from W_h's: h0 is named
    ("W_x", lambda a: a.astype(np.int64), TypeError),
    ("W_x", lambda a: a[:-1], ValueError),                           # D differs from x's
    ("W_x", lambda a: a[:, :-1], ValueError),                        # not G·H columns
    ("W_x", lambda a: a[None], ValueError),                          # rank 3
    ("W_h", lambda a: a[:-1], ValueError),                           # H differs from h0's
    ("W_h", lambda a: a[:, :-1], ValueError),
    ("W_h", lambda a: a.astype(np.float32), TypeError),              # float32 among float64
]
BAD_LSTM = [
    ("c0", lambda a: a.astype(np.int64), TypeError),
    ("c0", lambda a: a[:, :-1], ValueError),                         # H differs from h0's
    ("c0", lambda a: a[:1], ValueError),                             # batch differs from x's
    ("c0", lambda a: a.astype(np.float32), TypeError),               # float32 among float64
]
BAD_BIAS = [
    (lambda a: a[:-1], ValueError),                                  # not G·H entries
    (lambda a: a[None], ValueError),                                 # rank 2
    (lambda a: a.astype(np.int64), TypeError),
    (lambda a: a.astype(np.float32), TypeError),                     # float32 among float64
]
BAD_CASES = ([(op, name, spoil, error) for op in OPS for name, spoil, error in BAD_FORWARD]
             + [("lstm", name, spoil, error) for name, spoil, error in BAD_LSTM]
             + [(op, name, spoil, error) for op in OPS for name in _bias_names(op) for spoil, error in BAD_BIAS])


@pytest.mark.parametrize("op, name, spoil, error", BAD_CASES,
                         ids=[f"{op}-{name}-{i}" for i, (op, name, _, _) in enumerate(BAD_CASES)])
def test_bad_forward_input_names_op_and_argument(op, name, spoil, error):
    with pytest.raises(error, match=rf"^{op}: argument '{name}'"):
        FORWARD[op](*_replace(op, name, spoil))


def test_dtype_mismatch_names_the_odd_argument():
    args = list(make_args("lstm", 2, 3, 4, 5))
    args[2] = args[2].astype(np.float32)
    with pytest.raises(TypeError, match=r"lstm: argument 'c0' must have the same dtype as 'x' \(float64\), got float32"):
        lstm_forward(*args)


def test_zero_time_steps_says_so():
    with pytest.raises(ValueError, match=r"rnn: argument 'x' must have at least one time step .* got shape \(2, 0, 4\)"):
        rnn_forward(*_replace("rnn", "x", lambda a: a[:, :0]))


BAD_BACKWARD = [   # (op, argument, a wrong shape made from B, T, H)
    *[(op, "dh", lambda B, T, H: np.zeros((B, T + 1, H))) for op in OPS],
    *[(op, "dh", lambda B, T, H: np.zeros((B, H))) for op in OPS],
    *[(op, "dh_T", lambda B, T, H: np.zeros((B, H + 1))) for op in OPS],
    *[(op, "dh_T", lambda B, T, H: np.zeros((B, 1, H))) for op in OPS],
    ("lstm", "dc_T", lambda B, T, H: np.zeros((B + 1, H))),
]


@pytest.mark.parametrize("op, name, bad", BAD_BACKWARD,
                         ids=[f"{op}-{name}-{i}" for i, (op, name, _) in enumerate(BAD_BACKWARD)])
def test_bad_backward_input_names_op_and_argument(op, name, bad):
    B, T, D, H = 2, 3, 4, 5
    h, cache = FORWARD[op](*make_args(op, B, T, D, H))
    if name == "dh":
        dh, kwargs = bad(B, T, H), {}
    else:
        dh, kwargs = np.zeros_like(h), {name: bad(B, T, H)}
    with pytest.raises(ValueError, match=rf"^{op}_backward: argument '{name}' must have shape"):
        BACKWARD[op](dh, cache, **kwargs)
