"""Tests of reference/linear.py: gradients, the forward's definition, dtypes, bad input, PyTorch."""
import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.linear import linear_backward, linear_forward

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=25, deadline=None)
# float64 sums of at most a few dozen products: a handful of roundings apart
SUM_RTOL = 1e-12
# PyTorch computes the same float64 sums, possibly in another order
TORCH_TOL = 1e-12


def floats(lo=-2.0, hi=2.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def nonzero():
    """Values with 0.1 <= |v| <= 2. With a tiny W, say, dx = dy W^T is tiny while the contracted
    output L is not, and gradcheck's relative error is then the stencil's round-off (~1e-11 |L|)
    over a gradient near its 1e-8 floor: a false failure."""
    return floats(0.1, 2.0) | floats(-2.0, -0.1)


@st.composite
def linear_args(draw, bias=True):
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    D, C = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(hnp.arrays(np.float64, lead + (D,), elements=nonzero()))
    W = draw(hnp.arrays(np.float64, (D, C), elements=nonzero()))
    b = draw(hnp.arrays(np.float64, (C,), elements=floats())) if bias else None
    return x, W, b


def example(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 3, 4)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype),
            rng.standard_normal(5).astype(dtype))


# --- gradients --------------------------------------------------------------------------------

@SETTINGS
@given(linear_args())
def test_gradcheck(args):
    report = gradcheck(linear_forward, linear_backward, args, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x", "W", "b"]
    assert report.passed, str(report)


@SETTINGS
@given(linear_args(bias=False))
def test_gradcheck_without_bias(args):
    report = gradcheck(linear_forward, linear_backward, args, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x", "W"]
    assert report.passed, str(report)
    y, cache = linear_forward(*args)
    assert linear_backward(np.ones_like(y), cache)[2] is None


# --- the forward's definition -----------------------------------------------------------------

@SETTINGS
@given(linear_args())
def test_forward_is_the_sum_over_d(args):
    x, W, b = args
    y, _ = linear_forward(x, W, b)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, W.shape[1])
    for n in range(x2.shape[0]):
        for c in range(W.shape[1]):
            expected = sum(x2[n, d] * W[d, c] for d in range(W.shape[0])) + b[c]
            assert y2[n, c] == pytest.approx(expected, rel=SUM_RTOL, abs=SUM_RTOL)


def test_gradients_by_the_formulas():
    x, W, b = example()
    dy = np.random.default_rng(1).standard_normal((2, 3, 5))
    dx, dW, db = linear_backward(dy, linear_forward(x, W, b)[1])
    np.testing.assert_allclose(dx, np.einsum("btc,dc->btd", dy, W), rtol=SUM_RTOL)
    np.testing.assert_allclose(dW, np.einsum("btd,btc->dc", x, dy), rtol=SUM_RTOL)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 1)), rtol=SUM_RTOL)


# --- dtypes and purity ------------------------------------------------------------------------

def test_float32_in_float32_out():
    x, W, b = example(np.float32)
    y, cache = linear_forward(x, W, b)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in linear_backward(np.ones_like(y), cache))


def test_backward_does_not_mutate_its_inputs_or_the_cache():
    x, W, b = example()
    y, cache = linear_forward(x, W, b)
    dy = np.ones_like(y)
    before = copy.deepcopy((dy, cache))
    linear_backward(dy, cache)
    np.testing.assert_equal((dy, cache), before)


# --- bad input --------------------------------------------------------------------------------

BAD_INPUTS = [
    ("x not float", lambda x, W, b: (x.astype(np.int64), W, b), TypeError, r"linear: argument 'x' must be a floating"),
    ("x not an array", lambda x, W, b: (x.tolist(), W, b), TypeError, r"linear: argument 'x' must be an array"),
    ("x 0-d", lambda x, W, b: (x[0, 0, 0], W, b), ValueError, r"linear: argument 'x' must have at least 1"),
    ("W not float", lambda x, W, b: (x, W.astype(np.int32), b), TypeError, r"linear: argument 'W' must be a floating"),
    ("W wrong rank", lambda x, W, b: (x, W[0], b), ValueError, r"linear: argument 'W' must have 2 dimensions"),
    ("W wrong D", lambda x, W, b: (x, W[:3], b), ValueError, r"linear: argument 'W' must have shape \(D, C\)"),
    ("b not float", lambda x, W, b: (x, W, b.astype(np.int64)), TypeError, r"linear: argument 'b' must be a floating"),
    ("b wrong shape", lambda x, W, b: (x, W, b[:4]), ValueError, r"linear: argument 'b' must have shape \(C,\)"),
    ("mixed dtypes", lambda x, W, b: (x, W.astype(np.float32), b), TypeError,
     r"linear: argument 'W' must have the same dtype as 'x'"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        linear_forward(*change(*example()))


def test_backward_rejects_dy_of_the_wrong_shape():
    y, cache = linear_forward(*example())
    with pytest.raises(ValueError, match=r"linear_backward: argument 'dy' must have shape"):
        linear_backward(y[..., :4], cache)


# --- PyTorch ----------------------------------------------------------------------------------

def test_matches_torch():
    torch = pytest.importorskip("torch")
    x, W, b = example()
    dy = np.random.default_rng(1).standard_normal((2, 3, 5))
    y, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(dy, cache)
    xt, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
    yt = torch.nn.functional.linear(xt, Wt.T, bt)             # torch's weight is (C, D) = W.T
    yt.backward(torch.tensor(dy))
    for ours, theirs in [(y, yt), (dx, xt.grad), (dW, Wt.grad), (db, bt.grad)]:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
