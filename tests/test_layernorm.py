"""Tests of reference/layernorm.py: gradients, normalised moments, dtypes, bad input, PyTorch."""
import copy

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.layernorm import layernorm_backward, layernorm_forward

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=30, deadline=None)
# mean(x_hat): the rounding of mu, ~ulp(max|x|) = 1.8e-15 for |x| <= 10, is multiplied by
# rstd <= 1/sqrt(eps) ~ 316, and C <= 16 terms add theirs
MEAN_ATOL = 1e-11
# var(x_hat) = var / (var + eps) <= 1, recomputed the same way: a few roundings apart
VAR_ATOL = 1e-12
# layernorm_backward against the explicit Jacobian: float64 sums of C <= 8 terms
JACOBIAN_TOL = 1e-12
# PyTorch's float64 kernel computes the same moments, possibly summed in another order
TORCH_TOL = 1e-12


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def layernorm_args(draw):
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    # C >= 3: C = 1 is trivial (x_hat = 0, y = beta), and with C = 2, x_hat = +-sqrt(var / (var + eps))
    # hardly depends on x, so dx is ~eps / var, too small for finite differences to resolve to 1e-7
    C = draw(st.integers(3, 6))
    x = draw(hnp.arrays(np.float64, lead + (C,), elements=floats(-3.0, 3.0)))
    # every row spread out: for a nearly constant row x_hat and so dgamma are tiny, and gradcheck's
    # relative error is then the stencil's round-off (~1e-11 |L|) over a gradient near its 1e-8 floor
    assume(np.all(np.ptp(x, axis=-1) >= 0.5))
    # |gamma| >= 0.1 for the same reason: a tiny gamma makes dx tiny
    gamma = draw(hnp.arrays(np.float64, (C,), elements=floats(0.1, 2.0) | floats(-2.0, -0.1)))
    beta = draw(hnp.arrays(np.float64, (C,), elements=floats(-1.0, 1.0)))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    return (x, gamma, beta), {"eps": eps}


def example(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 8)).astype(dtype)
    return x, (1 + 0.1 * rng.standard_normal(8)).astype(dtype), (0.1 * rng.standard_normal(8)).astype(dtype)


# --- gradients --------------------------------------------------------------------------------

@SETTINGS
@given(layernorm_args())
def test_gradcheck(case):
    args, kwargs = case
    report = gradcheck(layernorm_forward, layernorm_backward, args, kwargs, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x", "gamma", "beta"]
    assert report.passed, str(report)


def test_dx_equals_the_jacobian_contracted_with_dx_hat():
    # the docstring's d x_hat_i / d x_j = (r / C)(C delta_ij - 1 - x_hat_i x_hat_j), row by row
    x, gamma, beta = example()
    dy = np.random.default_rng(1).standard_normal(x.shape)
    y, cache = layernorm_forward(x, gamma, beta)
    dx, _, _ = layernorm_backward(dy, cache)
    C = x.shape[-1]
    for n in np.ndindex(x.shape[:-1]):
        x_hat, r = cache.x_hat[n], cache.rstd[n][0]
        J = r / C * (C * np.eye(C) - 1 - np.outer(x_hat, x_hat))    # J[i, j] = d x_hat_i / d x_j
        np.testing.assert_allclose(dx[n], J.T @ (gamma * dy[n]), rtol=JACOBIAN_TOL, atol=JACOBIAN_TOL)


# --- invariants -------------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_normalised_rows_have_zero_mean_and_unit_variance(data):
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4))
    C = data.draw(st.integers(2, 16))
    x = data.draw(hnp.arrays(np.float64, lead + (C,), elements=floats(-10.0, 10.0)))
    eps = data.draw(st.sampled_from([1e-5, 1e-2]))
    y, _ = layernorm_forward(x, np.ones(C), np.zeros(C), eps=eps)
    var_x = np.var(x, axis=-1)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, rtol=0, atol=MEAN_ATOL)
    # the variance is 1 up to eps: var(x_hat) = var / (var + eps)
    np.testing.assert_allclose(y.var(axis=-1), var_x / (var_x + eps), rtol=0, atol=VAR_ATOL)


def test_unit_variance_when_eps_is_negligible():
    x = 5 + 3 * example()[0]                                     # var ~ 9 >> eps
    y, _ = layernorm_forward(x, np.ones(8), np.zeros(8), eps=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=0, atol=VAR_ATOL)


def test_gamma_and_beta_scale_and_shift():
    x, gamma, beta = example()
    y, cache = layernorm_forward(x, gamma, beta)
    np.testing.assert_allclose(y, gamma * cache.x_hat + beta, rtol=0, atol=JACOBIAN_TOL)
    mu, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
    np.testing.assert_allclose(cache.x_hat, (x - mu) / np.sqrt(var + 1e-5), rtol=JACOBIAN_TOL, atol=JACOBIAN_TOL)


# --- dtypes and purity ------------------------------------------------------------------------

def test_float32_in_float32_out():
    x, gamma, beta = example(np.float32)
    y, cache = layernorm_forward(x, gamma, beta, eps=np.float64(1e-5))   # a numpy eps does not promote
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layernorm_backward(np.ones_like(y), cache))


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_constant_row_normalises_to_zero_however_large_its_value(backend_name, dtype):
    """x - mean is 0 on a constant row: the float32 mean of 384 copies of 10000.1 summed in float32
    came out an ulp off, and x_hat = ±ulp / sqrt(eps) was 0.3 (PyTorch and the kernels: 0). Summed
    in float64 it is exact for float32 rows; a float64 row's own mean may still be an ulp off
    (1.8e-12 at 1e4), which gamma / sqrt(eps) makes ~1e-9: hence 1e-8 there."""
    import minilm
    from minilm import ops
    minilm.use(backend_name)                                   # the autouse fixture restores the backend
    x = np.full((3, 384), 10000.1, dtype=dtype)
    x[1] = -3e4
    beta = np.linspace(-1, 1, 384).astype(dtype)
    y, _ = ops.layernorm_forward(x, np.full(384, 2.0, dtype=dtype), beta)
    np.testing.assert_allclose(y, np.broadcast_to(beta, x.shape), rtol=0, atol=0 if dtype == np.float32 else 1e-8)


def test_backward_does_not_mutate_its_inputs_or_the_cache():
    y, cache = layernorm_forward(*example())
    dy = np.ones_like(y)
    before = copy.deepcopy((dy, cache))
    layernorm_backward(dy, cache)
    np.testing.assert_equal((dy, cache), before)


# --- bad input --------------------------------------------------------------------------------

BAD_INPUTS = [
    ("x not float", lambda x, g, b: ((x.astype(np.int64), g, b), {}), TypeError,
     r"layernorm: argument 'x' must be a floating"),
    ("x 0-d", lambda x, g, b: ((x[0, 0, 0], g, b), {}), ValueError, r"layernorm: argument 'x' must have at least 1"),
    ("x no features", lambda x, g, b: ((x[..., :0], g[:0], b[:0]), {}), ValueError,
     r"layernorm: argument 'x' must have C >= 1 in \(\.\.\., C\), got shape \(2, 3, 0\)"),
    ("gamma not float", lambda x, g, b: ((x, g.astype(np.int64), b), {}), TypeError,
     r"layernorm: argument 'gamma' must be a floating"),
    ("gamma wrong shape", lambda x, g, b: ((x, g[:4], b), {}), ValueError,
     r"layernorm: argument 'gamma' must have shape \(C,\) = \(8,\), got \(4,\)"),
    ("gamma wrong rank", lambda x, g, b: ((x, g[None], b), {}), ValueError,
     r"layernorm: argument 'gamma' must have shape \(C,\)"),
    ("beta not float", lambda x, g, b: ((x, g, b.astype(np.int64)), {}), TypeError,
     r"layernorm: argument 'beta' must be a floating"),
    ("beta wrong shape", lambda x, g, b: ((x, g, b[:7]), {}), ValueError,
     r"layernorm: argument 'beta' must have shape \(C,\)"),
    ("mixed dtypes", lambda x, g, b: ((x, g.astype(np.float32), b), {}), TypeError,
     r"layernorm: argument 'gamma' must have the same dtype as 'x'"),
    ("eps zero", lambda x, g, b: ((x, g, b), {"eps": 0.0}), ValueError,
     r"layernorm: option 'eps' must be a positive finite number"),
    ("eps negative", lambda x, g, b: ((x, g, b), {"eps": -1e-5}), ValueError,
     r"layernorm: option 'eps' must be a positive finite number"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(change, error, match):
    args, kwargs = change(*example())
    with pytest.raises(error, match=match):
        layernorm_forward(*args, **kwargs)


def test_eps_is_keyword_only():
    with pytest.raises(TypeError):
        layernorm_forward(*example(), 1e-5)


def test_backward_rejects_dy_of_the_wrong_shape():
    y, cache = layernorm_forward(*example())
    with pytest.raises(ValueError, match=r"layernorm_backward: argument 'dy' must have shape"):
        layernorm_backward(y[:1], cache)


# --- PyTorch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_matches_torch(eps):
    torch = pytest.importorskip("torch")
    x, gamma, beta = example()
    dy = np.random.default_rng(1).standard_normal(x.shape)
    y, cache = layernorm_forward(x, gamma, beta, eps=eps)
    grads = layernorm_backward(dy, cache)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    yt = torch.nn.functional.layer_norm(xt, (x.shape[-1],), gt, bt, eps=eps)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
    for ours, theirs in zip(grads, (xt, gt, bt)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)


# float16 rounds x, gamma, beta, x_hat and y, 2^-11 relative each, on values up to |y| ~ 2.6 here:
# a few such roundings of y's size
F16_LAYERNORM_TOL = 4e-3


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_a_float16_row_spread_over_hundreds_is_normalised(backend_name):
    """In float16 (a mixed-precision model on a CPU backend runs the reference), (x - mu)^2 overflows
    from |x - mu| = 256 on: the variance became inf, rstd 0, and y = beta, every gradient through the
    layer 0. The variance is taken in float64, as the kernels take it; y then equals the float32
    result to float16's rounding (F16_LAYERNORM_TOL)."""
    import minilm
    from minilm import ops
    minilm.use(backend_name)                                   # the autouse fixture restores the backend
    x = np.linspace(-300, 300, 16)[None, :]
    gamma, beta = np.full(16, 1.5), np.linspace(-1, 1, 16)
    y32, _ = ops.layernorm_forward(*(a.astype(np.float32) for a in (x, gamma, beta)))
    y16, cache = ops.layernorm_forward(*(a.astype(np.float16) for a in (x, gamma, beta)))
    assert y16.dtype == np.float16 and cache.rstd.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=0, atol=F16_LAYERNORM_TOL)
    dx, _, _ = ops.layernorm_backward(np.ones_like(y16) * np.linspace(-1, 1, 16).astype(np.float16), cache)
    assert np.isfinite(dx).all() and np.abs(dx).max() > 0
