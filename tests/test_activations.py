"""Tests of reference/activations.py: relu, tanh, sigmoid, gelu (tanh and exact), softmax."""
import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.activations import (gelu_backward, gelu_forward, relu_backward, relu_forward, sigmoid_backward,
                                          sigmoid_forward, softmax_backward, softmax_forward, tanh_backward,
                                          tanh_forward)

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=25, deadline=None)
# the same formula evaluated two ways (numpy vs the math module, another order of products):
# a few roundings apart, each at most one ulp = 2.2e-16 relative
ULP_RTOL = 8 * np.finfo(np.float64).eps
# a row of N <= 64 probabilities sums to 1 up to N roundings of at most 1.1e-16 each
ROW_SUM_TOL = 1e-14
# x + c rounds by up to ulp(|x + c|) ~ 1.1e-14 for |x + c| <= 60, which moves every exponent and so
# every probability by that much, relatively
SHIFT_RTOL = 1e-12
# PyTorch's float64 kernels: the same formulas, a few roundings (and its own erf) apart
TORCH_TOL = 1e-12

UNARY = {   # name -> (forward, backward, keyword options)
    "relu": (relu_forward, relu_backward, {}),
    "tanh": (tanh_forward, tanh_backward, {}),
    "sigmoid": (sigmoid_forward, sigmoid_backward, {}),
    "gelu_tanh": (gelu_forward, gelu_backward, {"approximate": "tanh"}),
    "gelu_exact": (gelu_forward, gelu_backward, {"approximate": "none"}),
    "softmax": (softmax_forward, softmax_backward, {}),
}


def floats(lo=-3.0, hi=3.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def arrays(elements=None):
    shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
    return hnp.arrays(np.float64, shapes, elements=floats() if elements is None else elements)


def example(dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3, 5)).astype(dtype)


def assert_gradcheck(forward, backward, x, kwargs=None):
    report = gradcheck(forward, backward, (x,), kwargs, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x"]
    assert report.passed, str(report)


# --- gradients --------------------------------------------------------------------------------

# relu: |x| >= 0.1, so the finite differences (steps of 2e-5) never straddle the kink at 0
@SETTINGS
@given(arrays(floats(0.1, 3.0) | floats(-3.0, -0.1)))
def test_gradcheck_relu(x):
    assert_gradcheck(relu_forward, relu_backward, x)


@SETTINGS
@given(arrays())
def test_gradcheck_tanh(x):
    assert_gradcheck(tanh_forward, tanh_backward, x)


@SETTINGS
@given(arrays())
def test_gradcheck_sigmoid(x):
    assert_gradcheck(sigmoid_forward, sigmoid_backward, x)


@SETTINGS
@given(arrays(), st.sampled_from(["tanh", "none"]))
def test_gradcheck_gelu(x, approximate):
    assert_gradcheck(gelu_forward, gelu_backward, x, {"approximate": approximate})


@SETTINGS
@given(arrays())
def test_gradcheck_softmax(x):
    assert_gradcheck(softmax_forward, softmax_backward, x)


# --- elementwise definitions ------------------------------------------------------------------

@SETTINGS
@given(arrays(floats(-6.0, 6.0)))
def test_relu_tanh_sigmoid_by_their_definitions(x):
    for value, y in zip(x.ravel(), relu_forward(x)[0].ravel()):
        assert y == max(value, 0.0)
    for value, y in zip(x.ravel(), tanh_forward(x)[0].ravel()):
        assert y == pytest.approx(math.tanh(value), rel=ULP_RTOL, abs=ULP_RTOL)
    for value, y in zip(x.ravel(), sigmoid_forward(x)[0].ravel()):
        assert y == pytest.approx(1 / (1 + math.exp(-value)), rel=ULP_RTOL, abs=ULP_RTOL)


def test_relu_gradient_is_zero_at_the_kink_and_below():
    x = np.array([-1.0, 0.0, 2.0])
    (dx,) = relu_backward(np.ones(3), relu_forward(x)[1])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 1.0])       # 0 at x = 0, as PyTorch


@SETTINGS
@given(arrays(floats(-6.0, 6.0)))
def test_gelu_exact_is_x_times_Phi(x):
    y, _ = gelu_forward(x, approximate="none")
    for value, got in zip(x.ravel(), y.ravel()):
        Phi = 0.5 * (1 + math.erf(value / math.sqrt(2)))
        assert got == pytest.approx(value * Phi, rel=ULP_RTOL, abs=ULP_RTOL)


@SETTINGS
@given(arrays(floats(-6.0, 6.0)))
def test_gelu_tanh_formula(x):
    y, _ = gelu_forward(x, approximate="tanh")
    for value, got in zip(x.ravel(), y.ravel()):
        u = math.sqrt(2 / math.pi) * (value + 0.044715 * value ** 3)
        assert got == pytest.approx(0.5 * value * (1 + math.tanh(u)), rel=ULP_RTOL, abs=ULP_RTOL)


def test_gelu_is_the_default_tanh_form():
    x = example()
    np.testing.assert_array_equal(gelu_forward(x)[0], gelu_forward(x, approximate="tanh")[0])


def test_sigmoid_and_tanh_do_not_overflow():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise"):          # any overflow would raise here
        s, s_cache = sigmoid_forward(x)
        t, t_cache = tanh_forward(x)
        (ds,) = sigmoid_backward(np.ones_like(x), s_cache)
        (dt,) = tanh_backward(np.ones_like(x), t_cache)
    assert s[0] == 0.0 and s[2] == 0.5 and s[-1] == 1.0
    assert t[0] == -1.0 and t[-1] == 1.0
    assert np.all(np.isfinite(ds)) and np.all(np.isfinite(dt))


# relative, against σ computed in Python floats: a few ulps of each dtype (float32's ulp 1.2e-7,
# float64's 2.2e-16), for the exp, the division and the product of the a < 0 form
SIGMOID_RTOL = {np.float32: 6e-7, np.float64: 1e-15}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_keeps_its_relative_accuracy_where_it_is_tiny(dtype):
    """½(1 + tanh(x/2)), an equal formula, cancels for x << 0: in float32 it was 2× off at x = -18, 13× at
    -19.9 and 0 from -20 on. The two-branch form is within a few ulps down to σ ~ 1e-35, as PyTorch is."""
    x = np.linspace(-80, 30, 2201).astype(dtype)
    expected = np.array([1 / (1 + math.exp(-float(v))) for v in x])
    y, _ = sigmoid_forward(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected, rtol=SIGMOID_RTOL[dtype], atol=0)


# --- softmax invariants -----------------------------------------------------------------------

@SETTINGS
@given(arrays(floats(-30.0, 30.0)))
def test_softmax_rows_sum_to_one(x):
    y, _ = softmax_forward(x)
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=0, atol=ROW_SUM_TOL)


@SETTINGS
@given(arrays(floats(-10.0, 10.0)), st.data())
def test_softmax_is_unchanged_by_a_shift_per_row(x, data):
    c = data.draw(hnp.arrays(np.float64, x.shape[:-1] + (1,), elements=floats(-50.0, 50.0)))
    np.testing.assert_allclose(softmax_forward(x + c)[0], softmax_forward(x)[0], rtol=SHIFT_RTOL, atol=0)


def test_softmax_does_not_overflow_for_large_logits():
    x = np.array([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 999.0]])
    with np.errstate(over="raise", invalid="raise"):          # exp(1000) would overflow; exp(-2000) may underflow
        y, cache = softmax_forward(x)
        (dx,) = softmax_backward(np.ones_like(x), cache)
    np.testing.assert_allclose(y[0], [1.0, 0.0, 0.0], rtol=0, atol=ROW_SUM_TOL)
    e = math.exp(-1.0)
    np.testing.assert_allclose(y[1], [1 / (2 + e), 1 / (2 + e), e / (2 + e)], rtol=ULP_RTOL)
    assert np.all(np.isfinite(dx))


def test_softmax_normalises_each_row_with_its_own_maximum():
    """Rows 2000 apart: each row is shifted by its own maximum, so neither overflows nor underflows
    to 0/0. A shift by the maximum of the whole array (one constant, mathematically as good) would
    make the low row exp(-2000) = 0 everywhere. The rows differ from the middle one by exact binary
    offsets, so after the shift all three compute the same numbers."""
    row = np.array([0.5, -1.25, 2.0, 0.0])
    x = np.stack([row + 1000.0, row, row - 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, _ = softmax_forward(x)
    expected = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    for n in range(3):
        np.testing.assert_allclose(y[n], expected, rtol=ULP_RTOL, atol=0)


def test_softmax_backward_by_the_jacobian():
    x = example()[0]                                          # (3, 5)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    y, cache = softmax_forward(x)
    (dx,) = softmax_backward(dy, cache)
    for n in range(x.shape[0]):
        J = np.diag(y[n]) - np.outer(y[n], y[n])              # dy_j / dx_i = y_j (delta_ij - y_i)
        np.testing.assert_allclose(dx[n], J @ dy[n], rtol=SHIFT_RTOL, atol=ROW_SUM_TOL)


# --- dtypes and purity ------------------------------------------------------------------------

@pytest.mark.parametrize("name", UNARY)
def test_float32_in_float32_out(name):
    forward, backward, kwargs = UNARY[name]
    y, cache = forward(example(np.float32), **kwargs)
    assert y.dtype == np.float32
    assert backward(np.ones_like(y), cache)[0].dtype == np.float32


@pytest.mark.parametrize("name", UNARY)
def test_backward_does_not_mutate_its_inputs_or_the_cache(name):
    forward, backward, kwargs = UNARY[name]
    y, cache = forward(example(), **kwargs)
    dy = np.ones_like(y)
    before = copy.deepcopy((dy, cache))
    backward(dy, cache)
    np.testing.assert_equal((dy, cache), before)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", UNARY)
def test_rejects_integer_x(name):
    forward, _, kwargs = UNARY[name]
    op = forward.__name__.removesuffix("_forward")
    with pytest.raises(TypeError, match=rf"{op}: argument 'x' must be a floating"):
        forward(np.arange(6), **kwargs)


@pytest.mark.parametrize("name", UNARY)
def test_rejects_a_list(name):
    forward, _, kwargs = UNARY[name]
    op = forward.__name__.removesuffix("_forward")
    with pytest.raises(TypeError, match=rf"{op}: argument 'x' must be an array"):
        forward([1.0, 2.0], **kwargs)


@pytest.mark.parametrize("name", UNARY)
def test_backward_rejects_dy_of_the_wrong_shape(name):
    forward, backward, kwargs = UNARY[name]
    op = forward.__name__.removesuffix("_forward")
    y, cache = forward(example(), **kwargs)
    with pytest.raises(ValueError, match=rf"{op}_backward: argument 'dy' must have shape"):
        backward(y[..., :2], cache)


def test_gelu_rejects_an_unknown_approximation():
    with pytest.raises(ValueError, match=r"gelu: option 'approximate' must be one of 'tanh', 'none', got 'fast'"):
        gelu_forward(example(), approximate="fast")


def test_softmax_rejects_a_0d_x():
    with pytest.raises(ValueError, match=r"softmax: argument 'x' must have at least 1 dimension"):
        softmax_forward(np.float64(1.0))


def test_softmax_rejects_an_empty_last_axis():
    """A softmax over no entries has no probabilities to give (a max and a sum of nothing)."""
    with pytest.raises(ValueError, match=r"softmax: argument 'x' must have K >= 1 in \(\.\.\., K\), got shape \(2, 3, 0\)"):
        softmax_forward(example()[..., :0])


# --- PyTorch ----------------------------------------------------------------------------------

def _torch_reference(torch, name, xt):
    F = torch.nn.functional
    return {
        "relu": lambda: torch.relu(xt),
        "tanh": lambda: torch.tanh(xt),
        "sigmoid": lambda: torch.sigmoid(xt),
        "gelu_tanh": lambda: F.gelu(xt, approximate="tanh"),
        "gelu_exact": lambda: F.gelu(xt, approximate="none"),
        "softmax": lambda: torch.softmax(xt, dim=-1),
    }[name]()


@pytest.mark.parametrize("name", UNARY)
def test_matches_torch(name):
    torch = pytest.importorskip("torch")
    forward, backward, kwargs = UNARY[name]
    x = 2 * example()
    dy = np.random.default_rng(1).standard_normal(x.shape)
    y, cache = forward(x, **kwargs)
    (dx,) = backward(dy, cache)
    xt = torch.tensor(x, requires_grad=True)
    yt = _torch_reference(torch, name, xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_float16_gelu_tanh_is_right_where_gelu_is_the_identity(backend_name):
    """A float16 GELU (a mixed-precision model on a CPU backend runs the reference) had dx = nan
    from |x| ~ 700 on: 3 c x^2 overflows float16 and meets 1 - tanh^2 u = 0; and its forward warned
    of an overflow from |x| ~ 40 on (x^3). Both compute in float32, as the GPU kernels do. There
    y = x for x > 0 and 0 for x < 0, and the derivative 1 and 0 (PyTorch's float16 GELU: the same)."""
    import warnings
    import minilm
    from minilm import ops
    minilm.use(backend_name)                                   # the autouse fixture restores the backend
    x = np.array([-1000.0, -700.0, -50.0, 50.0, 700.0, 1000.0, 6e4], dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # an overflow warning fails the test
        y, cache = ops.gelu_forward(x, approximate="tanh")
        (dx,) = ops.gelu_backward(np.ones_like(x), cache)
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_array_equal(y, [0, 0, 0, 50, 700, 1000, 6e4])
    np.testing.assert_array_equal(dx, [0, 0, 0, 1, 1, 1, 1])


# a float16 result computed in float32 and rounded once is within half an ulp, 2^-11 relative, of the
# true value (float32's own error, ~1e-7, is far below it): the bound is twice that, plus one of
# float16's smallest steps, 2^-24, for values near 0 (x is given in float16, so exactly)
F16_ROUNDING = 2 * 2.0 ** -11
F16_SMALLEST_STEP = 2.0 ** -24


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_float16_exact_gelu_keeps_its_negative_tail_and_does_not_warn(backend_name):
    """The exact (erf) GELU in float16 rounded 1 + erf(x/√2) to 0 from x ~ -3 on, so y was 0 where
    it is -1.3e-4 at x = -4 (PyTorch's float16 GELU: -1.265e-4), and its backward warned of an
    overflow from |x| = 256 on (x * x). It computes in float32, as the tanh form and the GPU kernels do."""
    import warnings
    import minilm
    from minilm import ops
    minilm.use(backend_name)                                   # the autouse fixture restores the backend
    x = np.array([-6e4, -300.0, -5.0, -4.0, -3.0, 0.5, 300.0, 6e4], dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # an overflow warning fails the test
        y, cache = ops.gelu_forward(x, approximate="none")
        (dx,) = ops.gelu_backward(np.ones_like(x), cache)
    assert y.dtype == dx.dtype == np.float16
    x64 = x.astype(np.float64)
    Phi = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x64]))
    pdf = np.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(y, x64 * Phi, rtol=F16_ROUNDING, atol=F16_SMALLEST_STEP)
    np.testing.assert_allclose(dx, Phi + x64 * pdf, rtol=F16_ROUNDING, atol=F16_SMALLEST_STEP)
