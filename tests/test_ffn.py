"""Tests of reference/ffn.py: gradients for every activation, the composition, dtypes, bad input."""
import copy
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.ffn import ffn_backward, ffn_forward

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=30, deadline=None)
# float64 matrix products of a few dozen terms and one activation: a few roundings apart
COMPOSE_TOL = 1e-12
# PyTorch's float64 kernels: the same products and activations, perhaps summed in another order
TORCH_TOL = 1e-12


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def nonzero():
    """0.1 <= |v| <= 1.5: with a tiny W_2, say, dx is tiny while the output is not, and gradcheck's
    relative error is then the stencil's round-off (~1e-11 |L|) over a gradient near its 1e-8 floor."""
    return floats(0.1, 1.5) | floats(-1.5, -0.1)


def halves():
    """Nonzero multiples of 1/2 in [-1.5, 1.5]."""
    return st.sampled_from([-1.5, -1.0, -0.5, 0.5, 1.0, 1.5])


@st.composite
def ffn_args(draw, activation, bias=True):
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    C, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    if activation == "relu":
        # x and W_1 on the grid of halves and b_1 in 1/8 + Z/4: every pre-activation h is an odd
        # multiple of 1/8, so |h| >= 0.125 and the finite differences (steps of ~1e-5) never
        # straddle the kink at 0
        x = draw(hnp.arrays(np.float64, lead + (C,), elements=halves()))
        W_1 = draw(hnp.arrays(np.float64, (C, hidden), elements=halves()))
        b_1 = draw(hnp.arrays(np.float64, (hidden,), elements=st.integers(-4, 3).map(lambda k: 0.125 + k / 4)))
        assume(np.any(x @ W_1 + b_1 > 0))                     # some unit active, else every gradient is 0
    else:
        x = draw(hnp.arrays(np.float64, lead + (C,), elements=nonzero()))
        W_1 = draw(hnp.arrays(np.float64, (C, hidden), elements=nonzero()))
        b_1 = draw(hnp.arrays(np.float64, (hidden,), elements=floats(-0.5, 0.5)))
    W_2 = draw(hnp.arrays(np.float64, (hidden, C), elements=nonzero()))
    b_2 = draw(hnp.arrays(np.float64, (C,), elements=floats(-0.5, 0.5)))
    if not bias:
        b_1 = b_2 = None
    return x, W_1, b_1, W_2, b_2


def example(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    B, T, C = 2, 3, 4
    shapes = [(B, T, C), (C, 4 * C), (4 * C,), (4 * C, C), (C,)]
    return tuple((rng.standard_normal(s) / math.sqrt(s[0] if len(s) == 2 else 1)).astype(dtype) for s in shapes)


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu"])
@SETTINGS
@given(data=st.data())
def test_gradcheck(activation, data):
    args = data.draw(ffn_args(activation))
    report = gradcheck(ffn_forward, ffn_backward, args, {"activation": activation}, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x", "W_1", "b_1", "W_2", "b_2"]
    assert report.passed, str(report)


@SETTINGS
@given(ffn_args("gelu", bias=False))
def test_gradcheck_without_biases(args):
    report = gradcheck(ffn_forward, ffn_backward, args, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x", "W_1", "W_2"]
    assert report.passed, str(report)
    y, cache = ffn_forward(*args)
    grads = ffn_backward(np.ones_like(y), cache)
    assert grads[2] is None and grads[4] is None


# --- the composition --------------------------------------------------------------------------

def phi(h, activation):
    """The activations written out directly."""
    if activation == "relu":
        return np.maximum(h, 0)
    if activation == "gelu_exact":
        return h * np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))(h)
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))


@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu"])
def test_forward_is_linear_activation_linear(activation):
    x, W_1, b_1, W_2, b_2 = example()
    y, cache = ffn_forward(x, W_1, b_1, W_2, b_2, activation=activation)
    expected = phi(x @ W_1 + b_1, activation) @ W_2 + b_2
    np.testing.assert_allclose(y, expected, rtol=COMPOSE_TOL, atol=COMPOSE_TOL)
    assert cache.activation == activation


def test_gelu_is_the_default_activation():
    args = example()
    np.testing.assert_array_equal(ffn_forward(*args)[0], ffn_forward(*args, activation="gelu")[0])


def test_any_hidden_width():
    x, W_1, b_1, W_2, b_2 = example()
    y, cache = ffn_forward(x, W_1[:, :5], b_1[:5], W_2[:5], b_2)
    assert y.shape == x.shape
    assert [g.shape for g in ffn_backward(np.ones_like(y), cache)] == [(2, 3, 4), (4, 5), (5,), (5, 4), (4,)]


# --- dtypes and purity ------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu"])
def test_float32_in_float32_out(activation):
    y, cache = ffn_forward(*example(np.float32), activation=activation)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in ffn_backward(np.ones_like(y), cache))


def test_backward_does_not_mutate_its_inputs_or_the_cache():
    y, cache = ffn_forward(*example())
    dy = np.ones_like(y)
    before = copy.deepcopy((dy, cache))
    ffn_backward(dy, cache)
    np.testing.assert_equal((dy, cache), before)


# --- bad input --------------------------------------------------------------------------------

def _replace(i, f):
    return lambda args: tuple(f(a) if j == i else a for j, a in enumerate(args))


BAD_INPUTS = [
    ("x not float", _replace(0, lambda x: x.astype(np.int64)), TypeError, r"ffn: argument 'x' must be a floating"),
    ("x 0-d", _replace(0, lambda x: x[0, 0, 0]), ValueError, r"ffn: argument 'x' must have at least 1"),
    ("x wrong C", _replace(0, lambda x: x[..., :3]), ValueError, r"ffn: argument 'W_1' must have shape \(C, 4C\)"),
    ("W_1 not float", _replace(1, lambda W: W.astype(np.int64)), TypeError, r"ffn: argument 'W_1' must be a floating"),
    ("W_1 wrong rank", _replace(1, lambda W: W[0]), ValueError, r"ffn: argument 'W_1' must have 2 dimensions"),
    ("b_1 wrong shape", _replace(2, lambda b: b[:4]), ValueError, r"ffn: argument 'b_1' must have shape \(4C,\)"),
    ("W_2 wrong shape", _replace(3, lambda W: W.T), ValueError, r"ffn: argument 'W_2' must have shape \(4C, C\)"),
    ("W_2 not float", _replace(3, lambda W: W.astype(np.int64)), TypeError, r"ffn: argument 'W_2' must be a floating"),
    ("b_2 wrong shape", _replace(4, lambda b: b[:2]), ValueError, r"ffn: argument 'b_2' must have shape \(C,\)"),
    ("mixed dtypes", _replace(3, lambda W: W.astype(np.float32)), TypeError,
     r"ffn: argument 'W_2' must have the same dtype as 'x'"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        ffn_forward(*change(example()))


def test_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match=r"ffn: option 'activation' must be one of 'gelu', 'gelu_exact', 'relu', "
                                         r"got 'swish'"):
        ffn_forward(*example(), activation="swish")


def test_backward_rejects_dy_of_the_wrong_shape():
    y, cache = ffn_forward(*example())
    with pytest.raises(ValueError, match=r"ffn_backward: argument 'dy' must have shape"):
        ffn_backward(y[..., :3], cache)


# --- PyTorch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu"])
def test_matches_torch(activation):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    args = example()
    dy = np.random.default_rng(1).standard_normal(args[0].shape)
    y, cache = ffn_forward(*args, activation=activation)
    grads = ffn_backward(dy, cache)
    xt, W_1t, b_1t, W_2t, b_2t = ts = [torch.tensor(a, requires_grad=True) for a in args]
    phi_t = {"gelu": lambda h: F.gelu(h, approximate="tanh"), "gelu_exact": F.gelu, "relu": F.relu}[activation]
    yt = phi_t(xt @ W_1t + b_1t) @ W_2t + b_2t
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
    for ours, theirs in zip(grads, ts):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
