r"""Numba kernels for the activations family (``minilm.reference.activations``).

Each function here equals the function of the same name in ``minilm.reference.activations``,
whose module docstring states the math; ``tests/test_cpu_attention.py`` holds the softmax to it.
Numba has no float16 arithmetic, so dtypes other than float32 and float64 run the reference.
"""
import math
from typing import NamedTuple

import numpy as np
from numba import prange

from minilm.cpu._math import exp_nonpositive
from minilm.cpu._parallel import FUSED_MULTIPLY_ADD, pick, rows_kernel
from minilm.reference import activations as reference
from minilm.reference.activations import SoftmaxCache, check_softmax_args
from minilm.validate import require_cache, require_gradient

__all__ = []

KERNEL_DTYPES = (np.float32, np.float64)     # the kernels' dtypes; others run the reference


# --- softmax ----------------------------------------------------------------------------------
# One row of the last axis per prange iteration; the row sums are accumulated in float64.

__all__ += ["softmax_forward", "softmax_backward"]


@rows_kernel
def _softmax_forward_kernel(x):
    """y of ``reference.softmax_forward`` for contiguous rows x (R, N)."""
    R, N = x.shape
    y = np.empty_like(x)                                        # (R, N), N >= 1 (softmax_forward checks it)
    for r in prange(R):
        m = x[r, 0]                                             # the row's max, in x's dtype
        for n in range(1, N):
            if x[r, n] > m:
                m = x[r, n]
        Z = np.float64(0.0)
        for n in range(N):
            y[r, n] = np.exp(x[r, n] - m)                       # every exponent <= 0
            Z += y[r, n]
        for n in range(N):
            y[r, n] = y[r, n] / Z
    return y


@rows_kernel
def _softmax_backward_kernel(dy, y):
    """dx of ``reference.softmax_backward`` for contiguous rows dy, y (R, N)."""
    R, N = y.shape
    dx = np.empty_like(y)                                       # (R, N)
    N4 = N - N % 4
    for r in prange(R):
        # s = sum_j dy_j y_j, in four interleaved partial sums so that the additions need not wait on each other
        s0 = s1 = s2 = s3 = np.float64(0.0)
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
    check_softmax_args(x)
    if x.dtype not in KERNEL_DTYPES:
        return reference.softmax_forward(x)
    y = pick(_softmax_forward_kernel, x.size)(_rows(x, x.dtype)).reshape(x.shape)
    return y, SoftmaxCache(y)


def softmax_backward(dy, cache):
    """Equals ``minilm.reference.activations.softmax_backward``. Returns (dx,)."""
    require_cache("softmax_backward", cache, "SoftmaxCache")
    y = cache.y
    require_gradient("softmax_backward", "dy", dy, y.shape, "(same as x)")
    dtype = np.result_type(dy.dtype, y.dtype)                  # as the reference's products promote
    if dtype not in KERNEL_DTYPES:
        return reference.softmax_backward(dy, cache)
    return (pick(_softmax_backward_kernel, y.size)(_rows(dy, dtype), _rows(y, dtype)).reshape(y.shape),)


# --- GELU -------------------------------------------------------------------------------------
# One element per prange iteration over the flattened array; one loop per form, and
# ``tests/test_cpu_kernels.py`` holds both to the reference. The exact form is the reference's
# formula with ``math.erf``. The tanh form uses, with e = exp(-2|u|) (never above 1, so nothing
# overflows), the identities
#
#     ½(1 + tanh u) = (1 if u >= 0 else e) / (1 + e),        1 - tanh² u = 4e / (1 + e)²,
#
# so y = x ½(1 + tanh u) and φ'(x) = ½(1 + tanh u) + ½ x (1 - tanh² u) du/dx are the reference's
# expressions without its cancellations near |tanh u| = 1. (u has the sign of x, since
# u = k x (1 + c x²), so the kernels test x >= 0 for u >= 0; at u = 0 both sides give ½.) The
# exponential is ``exp_nonpositive`` (``minilm.cpu._math``), plain arithmetic that the compiler
# vectorises, where a call to libm's exp would cost several times as much. The forward keeps e in
# its cache (one more array of x's size), so the backward computes no exponential (at a GPT
# preset's slice, 60 µs instead of 230 µs); given the reference's cache, which has no e, it
# computes e again.

__all__ += ["gelu_forward", "gelu_backward"]


class GeluCache(NamedTuple):
    """The reference's ``GeluCache`` (x, approximate), and for the tanh form e = e^{-2|u|} (None for the erf form)."""
    x: object
    approximate: str
    e: object


@rows_kernel(fastmath=FUSED_MULTIPLY_ADD)
def _gelu_forward_kernel(x, exact, y, e_out):
    """y of ``reference.gelu_forward`` for flat x (n,): the erf form when ``exact``, else the tanh form,
    which also writes e = e^{-2|u|} into ``e_out`` when that has n entries (the backward's cache)."""
    f = x.dtype.type
    half, one, two = f(0.5), f(1), f(2)
    k, c, inv_sqrt2 = f(reference._SQRT_2_OVER_PI), f(reference._GELU_CUBIC), f(1 / math.sqrt(2.0))
    if exact:
        for i in prange(x.shape[0]):
            y[i] = half * x[i] * (one + math.erf(x[i] * inv_sqrt2))        # y = x Φ(x)
    else:
        keep_e = e_out.shape[0] == x.shape[0]
        for i in prange(x.shape[0]):
            xi = x[i]
            u = k * (xi + c * xi * xi * xi)
            e = exp_nonpositive(-two * abs(u))
            y[i] = xi * (one if xi >= 0 else e) / (one + e)                # y = ½ x (1 + tanh u)
            if keep_e:
                e_out[i] = e


@rows_kernel(fastmath=FUSED_MULTIPLY_ADD)
def _gelu_backward_kernel(x, dy, exact, e_in, dx):
    """dx of ``reference.gelu_backward`` for flat x, dy (n,): dx = φ'(x) dy; the tanh form reads e from
    ``e_in`` when that has n entries, else computes it."""
    f = x.dtype.type
    half, one, two, three = f(0.5), f(1), f(2), f(3)
    k, c, inv_sqrt2 = f(reference._SQRT_2_OVER_PI), f(reference._GELU_CUBIC), f(1 / math.sqrt(2.0))
    inv_sqrt_2pi = f(1 / math.sqrt(2.0 * math.pi))
    if exact:
        for i in prange(x.shape[0]):
            xi = x[i]
            Phi = half * (one + math.erf(xi * inv_sqrt2))
            pdf = np.exp(-half * xi * xi) * inv_sqrt_2pi
            dx[i] = (Phi + xi * pdf) * dy[i]                                # (Φ(x) + x φ(x)) dy
    else:
        saved = e_in.shape[0] == x.shape[0]
        for i in prange(x.shape[0]):
            xi = x[i]
            e = e_in[i] if saved else exp_nonpositive(-two * abs(k * (xi + c * xi * xi * xi)))
            one_plus_e = one + e
            du_dx = k * (one + three * c * xi * xi)
            # ½(1 + tanh u) + ½ x (1 - tanh² u) du/dx
            dphi = (one if xi >= 0 else e) / one_plus_e + two * xi * e / (one_plus_e * one_plus_e) * du_dx
            dx[i] = dphi * dy[i]


def gelu_forward(x, *, approximate="tanh"):
    """Equals ``minilm.reference.activations.gelu_forward``: same arguments, checks and output; the
    cache is the reference's and e (see the comment above)."""
    reference.check_gelu_args(x, approximate)
    if x.dtype not in KERNEL_DTYPES:
        return reference.gelu_forward(x, approximate=approximate)
    exact = approximate == "none"
    y = np.empty(x.shape, dtype=x.dtype)
    e = None if exact else np.empty(x.shape, dtype=x.dtype)
    pick(_gelu_forward_kernel, x.size)(np.ascontiguousarray(x).reshape(-1), exact, y.reshape(-1), _flat(e, x.dtype))
    return y, GeluCache(x, approximate, e)


def gelu_backward(dy, cache):
    """Equals ``minilm.reference.activations.gelu_backward``. Returns (dx,). Takes this tier's cache
    or the reference's."""
    require_cache("gelu_backward", cache, "GeluCache")
    x, approximate = cache.x, cache.approximate
    require_gradient("gelu_backward", "dy", dy, x.shape, "(same as x)")
    dtype = np.result_type(dy.dtype, x.dtype)                  # as the reference's products promote
    if dtype not in KERNEL_DTYPES:
        return reference.gelu_backward(dy, cache)
    dx = np.empty(x.shape, dtype=dtype)
    pick(_gelu_backward_kernel, x.size)(_flat(x, dtype), _flat(dy, dtype), approximate == "none",
                                        _flat(getattr(cache, "e", None), dtype), dx.reshape(-1))
    return (dx,)


def _flat(a, dtype):
    """``a`` as a contiguous flat array of ``dtype`` for a kernel; for None, an empty one, which
    tells the GELU kernels that there is no e."""
    return np.empty(0, dtype=dtype) if a is None else np.ascontiguousarray(a, dtype=dtype).reshape(-1)
