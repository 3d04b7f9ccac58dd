r"""Layer normalisation over the last axis, as Numba kernels.

The math, its derivation and the shapes are those of ``minilm.reference.layernorm``; each
kernel below names the reference function it must equal, and ``tests/test_cpu_kernels.py``
holds it to that. The positions (every leading axis) are flattened to N rows of C channels.

Forward: one row per iteration of ``prange(N)``; the row mean and variance are summed in
float64 whatever the dtype, and ``rstd`` computed from them in float64; then ``x_hat`` and ``y``
are computed in the input's dtype, and all three are stored in it. Every sum may be added up
in any order (``SUMS_IN_ANY_ORDER``), which the compiler needs to vectorise it.

Backward: ``dx`` is row-local, but ``dgamma`` and ``dbeta`` sum over every row. The rows are cut
into blocks of ``ROWS_PER_BLOCK``; ``prange`` runs over the blocks, each block adds its rows into
its own row of a (blocks, C) float64 array of partial sums, and the kernel adds the partials up,
block after block, after the parallel loop. No two threads ever write the same element, and
since the blocks do not depend on the number of threads, ``dgamma`` and ``dbeta`` are the same
for any thread count, on either twin.
"""
import math

import numpy as np
from numba import prange

from minilm.cpu._parallel import SUMS_IN_ANY_ORDER, pick, rows_kernel

from minilm.reference import layernorm as reference
from minilm.reference.layernorm import LayernormCache, check_layernorm_args
from minilm.validate import require_cache, require_gradient

__all__ = ["layernorm_forward", "layernorm_backward"]

KERNEL_DTYPES = (np.float32, np.float64)   # what the kernels compile for; other dtypes (float16) run the reference
ROWS_PER_BLOCK = 32     # rows per block of partial sums in the backward: enough blocks to share among threads


@rows_kernel(fastmath=SUMS_IN_ANY_ORDER)
def _forward_rows(x, gamma, beta, eps, y, x_hat, rstd):
    """Equals ``minilm.reference.layernorm.layernorm_forward`` on (N, C) rows; fills y, x_hat, rstd (N,)."""
    N, C = x.shape
    f = x.dtype.type
    for n in prange(N):
        row = x[n]
        s = np.float64(0.0)
        for i in range(C):
            s += row[i]
        mu = s / C                                             # mean
        s = np.float64(0.0)
        for i in range(C):
            d = row[i] - mu
            s += d * d
        r = 1.0 / np.sqrt(s / C + eps)                         # rstd, from the biased variance
        rstd[n] = r
        mu_f, r_f = f(mu), f(r)                                # the rest in x's dtype, as the reference
        for i in range(C):
            xh = (row[i] - mu_f) * r_f                         # x_hat = (x - mu) * rstd
            x_hat[n, i] = xh
            y[n, i] = gamma[i] * xh + beta[i]                  # y = gamma x_hat + beta


@rows_kernel(fastmath=SUMS_IN_ANY_ORDER)
def _backward_rows(dy, x_hat, rstd, gamma, dx, dgamma, dbeta):
    """Equals ``minilm.reference.layernorm.layernorm_backward`` on (N, C) rows; fills dx (N, C),
    dgamma and dbeta (C,). Each block of rows adds into its own row of float64 partial sums, which
    are added up, block after block, after the parallel loop."""
    N, C = dy.shape
    n_blocks = -(-N // ROWS_PER_BLOCK)
    dgamma_parts = np.zeros((n_blocks, C))                      # (blocks, C) float64 partial sums
    dbeta_parts = np.zeros((n_blocks, C))
    for blk in prange(n_blocks):
        for n in range(blk * ROWS_PER_BLOCK, min(N, (blk + 1) * ROWS_PER_BLOCK)):
            sum_dx_hat = np.float64(0.0)
            sum_dx_hat_x_hat = np.float64(0.0)
            for i in range(C):
                dbeta_parts[blk, i] += dy[n, i]                     # from y = gamma x_hat + beta
                dgamma_parts[blk, i] += dy[n, i] * x_hat[n, i]      # from y = gamma x_hat + beta
                dx_hat = dy[n, i] * gamma[i]
                sum_dx_hat += dx_hat
                sum_dx_hat_x_hat += dx_hat * x_hat[n, i]
            mean_dx_hat = sum_dx_hat / C
            mean_dx_hat_x_hat = sum_dx_hat_x_hat / C
            # from x_hat = (x - mu) * rstd: remove the row mean and the projection on x_hat, then scale
            for i in range(C):
                dx[n, i] = rstd[n] * (dy[n, i] * gamma[i] - mean_dx_hat - x_hat[n, i] * mean_dx_hat_x_hat)
    for i in range(C):
        sg = np.float64(0.0)
        sb = np.float64(0.0)
        for blk in range(n_blocks):
            sg += dgamma_parts[blk, i]
            sb += dbeta_parts[blk, i]
        dgamma[i] = sg
        dbeta[i] = sb


def layernorm_forward(x, gamma, beta, *, eps=1e-5):
    """Numba ``minilm.reference.layernorm.layernorm_forward``: same arguments, checks, outputs and cache."""
    check_layernorm_args(x, gamma, beta, eps)
    if x.dtype not in KERNEL_DTYPES:
        return reference.layernorm_forward(x, gamma, beta, eps=eps)
    lead, C = x.shape[:-1], x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(math.prod(lead), C)   # (N, C)
    y = np.empty_like(x2)
    x_hat = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)                # (N,)
    # gamma and beta in x's dtype: the same, checked, but perhaps in the other byte order, which Numba does not take
    gamma_c, beta_c = np.ascontiguousarray(gamma, dtype=x.dtype), np.ascontiguousarray(beta, dtype=x.dtype)
    pick(_forward_rows, x2.size)(x2, gamma_c, beta_c, float(eps), y, x_hat, rstd)
    return y.reshape(x.shape), LayernormCache(x_hat.reshape(x.shape), rstd.reshape(lead + (1,)), gamma)


def layernorm_backward(dy, cache):
    """Numba ``minilm.reference.layernorm.layernorm_backward``: returns (dx, dgamma, dbeta)."""
    require_cache("layernorm_backward", cache, "LayernormCache")
    x_hat, rstd, gamma = cache
    require_gradient("layernorm_backward", "dy", dy, x_hat.shape, "(..., C)")
    if dy.dtype not in KERNEL_DTYPES or x_hat.dtype not in KERNEL_DTYPES or dy.dtype != x_hat.dtype:
        return reference.layernorm_backward(dy, cache)       # mixed dtypes: the reference's promotions
    N, C = math.prod(x_hat.shape[:-1]), x_hat.shape[-1]
    dy2 = np.ascontiguousarray(dy).reshape(N, C)               # (N, C)
    dx = np.empty_like(dy2)
    dgamma = np.empty(C, dtype=dy.dtype)                       # (C,)
    dbeta = np.empty(C, dtype=dy.dtype)                        # (C,)
    pick(_backward_rows, dy2.size)(dy2, np.ascontiguousarray(x_hat).reshape(N, C), np.ascontiguousarray(rstd).reshape(N),
                   np.ascontiguousarray(gamma, dtype=dy.dtype), dx, dgamma, dbeta)
    return dx.reshape(x_hat.shape), dgamma, dbeta
