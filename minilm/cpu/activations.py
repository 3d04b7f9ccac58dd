r"""Numba kernels for the activations family (``minilm.reference.activations``).

Each function here equals the function of the same name in ``minilm.reference.activations``,
whose module docstring states the math; ``tests/test_cpu_attention.py`` holds the softmax to it.
Numba has no float16 arithmetic, so dtypes other than float32 and float64 run the reference.
"""
import math

import numpy as np
from numba import njit, prange

from minilm.reference import activations as reference
from minilm.reference.activations import SoftmaxCache
from minilm.validate import require_float, require_min_ndim, require_shape

__all__ = []

KERNEL_DTYPES = (np.float32, np.float64)     # the kernels' dtypes; others run the reference


# --- softmax ----------------------------------------------------------------------------------
# One row of the last axis per prange iteration; the row sums are accumulated in float64.

__all__ += ["softmax_forward", "softmax_backward"]


@njit(parallel=True, cache=True, error_model="numpy")
def _softmax_forward_kernel(x):
    """y of ``reference.softmax_forward`` for contiguous rows x (R, N)."""
    R, N = x.shape
    y = np.empty_like(x)                                        # (R, N)
    if N == 0:
        return y
    for r in prange(R):
        m = x[r, 0]                                             # the row's max, in x's dtype
        for n in range(1, N):
            if x[r, n] > m:
                m = x[r, n]
        Z = 0.0
        for n in range(N):
            y[r, n] = np.exp(x[r, n] - m)                       # every exponent <= 0
            Z += y[r, n]
        for n in range(N):
            y[r, n] = y[r, n] / Z
    return y


@njit(parallel=True, cache=True, error_model="numpy")
def _softmax_backward_kernel(dy, y):
    """dx of ``reference.softmax_backward`` for contiguous rows dy, y (R, N)."""
    R, N = y.shape
    dx = np.empty_like(y)                                       # (R, N)
    N4 = N - N % 4
    for r in prange(R):
        # s = sum_j dy_j y_j, in four interleaved partial sums so that the additions need not wait on each other
        s0 = s1 = s2 = s3 = 0.0
        for n in range(0, N4, 4):
            s0 += dy[r, n] * y[r, n]
            s1 += dy[r, n + 1] * y[r, n + 1]
            s2 += dy[r, n + 2] * y[r, n + 2]
            s3 += dy[r, n + 3] * y[r, n + 3]
        for n in range(N4, N):
            s0 += dy[r, n] * y[r, n]
        s = (s0 + s1) + (s2 + s3)
        for n in range(N):
            dx[r, n] = y[r, n] * (dy[r, n] - s)                 # dx_i = y_i (dy_i - sum_j dy_j y_j)
    return dx


def _rows(a, dtype):
    """``a`` as contiguous rows (R, N) of its last axis, in ``dtype``."""
    return np.ascontiguousarray(a, dtype=dtype).reshape(math.prod(a.shape[:-1]), a.shape[-1])


def softmax_forward(x):
    """Equals ``minilm.reference.activations.softmax_forward``: softmax over the last axis."""
    require_float("softmax", "x", x)
    require_min_ndim("softmax", "x", x, 1, "(..., N)")
    if x.dtype not in KERNEL_DTYPES:
        return reference.softmax_forward(x)
    y = _softmax_forward_kernel(_rows(x, x.dtype)).reshape(x.shape)
    return y, SoftmaxCache(y)


def softmax_backward(dy, cache):
    """Equals ``minilm.reference.activations.softmax_backward``. Returns (dx,)."""
    y = cache.y
    require_shape("softmax_backward", "dy", dy, y.shape, "(same as x)")
    dtype = np.result_type(dy.dtype, y.dtype)                  # as the reference's products promote
    if dtype not in KERNEL_DTYPES:
        return reference.softmax_backward(dy, cache)
    return (_softmax_backward_kernel(_rows(dy, dtype), _rows(y, dtype)).reshape(y.shape),)


# --- GELU -------------------------------------------------------------------------------------
# One element per prange iteration over the flattened array; both forms in one kernel, and
# ``tests/test_cpu_kernels.py`` holds both to the reference. The exact form is the reference's
# formula with ``math.erf``. The tanh form uses, with e = exp(-2|u|) (never above 1, so nothing
# overflows), the identities
#
#     ½(1 + tanh u) = (1 if u >= 0 else e) / (1 + e),        1 - tanh² u = 4e / (1 + e)²,
#
# so y = x ½(1 + tanh u) and φ'(x) = ½(1 + tanh u) + ½ x (1 - tanh² u) du/dx are the reference's
# expressions without its cancellations near |tanh u| = 1. The exponential is np.exp (libm) for float64;
# for float32 it is ``_expf``, plain arithmetic that the compiler vectorises, where a call to libm's
# expf would cost several times as much.

__all__ += ["gelu_forward", "gelu_backward"]

from llvmlite import ir  # noqa: E402  (this section's own imports)
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from minilm.cpu._parallel import pick, rows_kernel

# Cephes' expf: exp(a) = 2^k exp(r), k = round(a / ln 2), r = a - k ln 2 with ln 2 split in two
# (C1 + C2) so that r is exact, and a degree-7 polynomial for exp(r) on |r| <= ln(2)/2.
_LOG2E = 1.44269504088896341
_LN2_C1, _LN2_C2 = 0.693359375, -2.12194440e-4
_EXPF_P = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)


@intrinsic
def _exp2_int32(typingctx, k):
    """2^k as a float32 for an int32 k in [-126, 127]: k + 127 written into the exponent bits."""
    if k != types.int32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", cache=True)
def _expf(a):
    """exp(a) for float32 a <= 88, within 1 ulp (measured on [-87, 88]); 0 below -87, where exp(a) < 2e-38."""
    f = np.float32
    a_in = min(max(a, f(-87.0)), f(88.0))                      # keeps 2^k a normal float32
    k = np.floor(a_in * f(_LOG2E) + f(0.5))
    r = a_in - k * f(_LN2_C1)
    r = r - k * f(_LN2_C2)
    p = f(_EXPF_P[5])
    for n in range(4, -1, -1):
        p = p * r + f(_EXPF_P[n])
    p = p * r * r + r + f(1.0)                                 # exp(r)
    return f(0.0) if a < f(-87.0) else p * _exp2_int32(np.int32(k))


@rows_kernel
def _gelu_forward_kernel(x, exact, fast_exp, y):
    """y of ``reference.gelu_forward`` for flat x (n,): the erf form when ``exact``, else the tanh form.

    ``fast_exp``: take exp from ``_expf`` (for float32 x) instead of NumPy's.
    """
    f = x.dtype.type
    half, one, two = f(0.5), f(1), f(2)
    k, c, inv_sqrt2 = f(reference._SQRT_2_OVER_PI), f(reference._GELU_CUBIC), f(1 / math.sqrt(2.0))
    for i in prange(x.shape[0]):
        xi = x[i]
        if exact:
            y[i] = half * xi * (one + math.erf(xi * inv_sqrt2))         # y = x Φ(x)
        else:
            u = k * (xi + c * xi * xi * xi)
            a = -two * abs(u)
            e = _expf(a) if fast_exp else np.exp(a)
            y[i] = xi * (one if u >= 0 else e) / (one + e)              # y = ½ x (1 + tanh u)


@njit(parallel=True, cache=True, error_model="numpy")
def _gelu_backward_kernel(x, dy, exact, fast_exp, dx):
    """dx of ``reference.gelu_backward`` for flat x, dy (n,): dx = φ'(x) dy."""
    f = x.dtype.type
    half, one, two, three = f(0.5), f(1), f(2), f(3)
    k, c, inv_sqrt2 = f(reference._SQRT_2_OVER_PI), f(reference._GELU_CUBIC), f(1 / math.sqrt(2.0))
    inv_sqrt_2pi = f(1 / math.sqrt(2.0 * math.pi))
    for i in prange(x.shape[0]):
        xi = x[i]
        if exact:
            Phi = half * (one + math.erf(xi * inv_sqrt2))
            pdf = np.exp(-half * xi * xi) * inv_sqrt_2pi
            dphi = Phi + xi * pdf                                       # Φ(x) + x φ(x)
        else:
            u = k * (xi + c * xi * xi * xi)
            a = -two * abs(u)
            e = _expf(a) if fast_exp else np.exp(a)
            one_plus_e = one + e
            du_dx = k * (one + three * c * xi * xi)
            # ½(1 + tanh u) + ½ x (1 - tanh² u) du/dx
            dphi = (one if u >= 0 else e) / one_plus_e + two * xi * e / (one_plus_e * one_plus_e) * du_dx
        dx[i] = dphi * dy[i]


def gelu_forward(x, *, approximate="tanh"):
    """Equals ``minilm.reference.activations.gelu_forward``: same arguments, checks, output and cache."""
    reference.check_gelu_args(x, approximate)
    if x.dtype not in KERNEL_DTYPES:
        return reference.gelu_forward(x, approximate=approximate)
    y = np.empty(x.shape, dtype=x.dtype)
    pick(_gelu_forward_kernel, x.size)(np.ascontiguousarray(x).reshape(-1), approximate == "none", x.dtype == np.float32,
                         y.reshape(-1))
    return y, reference.GeluCache(x, approximate)


def gelu_backward(dy, cache):
    """Equals ``minilm.reference.activations.gelu_backward``. Returns (dx,)."""
    x, approximate = cache
    require_shape("gelu_backward", "dy", dy, x.shape, "(same as x)")
    dtype = np.result_type(dy.dtype, x.dtype)                  # as the reference's products promote
    if dtype not in KERNEL_DTYPES:
        return reference.gelu_backward(dy, cache)
    dx = np.empty(x.shape, dtype=dtype)
    _gelu_backward_kernel(np.ascontiguousarray(x, dtype=dtype).reshape(-1),
                          np.ascontiguousarray(dy, dtype=dtype).reshape(-1), approximate == "none",
                          dtype == np.float32, dx.reshape(-1))
    return (dx,)
