r"""Cross-entropy fused with the log-softmax, as Numba kernels.

The math, its derivation and the shapes are those of ``minilm.reference.losses``; each kernel
below names the reference function it must equal, and ``tests/test_cpu_kernels.py`` holds it to
that. The positions (every leading axis) are flattened to N rows of V logits.

Forward: one row per iteration of ``prange(N)``. With :math:`m = \max_j z_j`,
:math:`e_j = e^{z_j - m}` and :math:`s = \sum_j e_j`, the row needs only

.. math::
    p_j = e_j / s, \qquad -\log p_t = \log s - (z_t - m), \qquad
    \frac1V \sum_j (-\log p_j) = \log s - \frac1V \sum_j (z_j - m),

so each exponential is taken once and no (N, V) array of log-probabilities is ever stored.
Each row's loss :math:`\ell_n` (0 where ignored) goes to an (N,) array, summed after the parallel
loop, so the result does not depend on the number of threads.

Backward: :math:`\bar z_{nj} = \bar L\,[t_n \ne \text{ignore}]/M\,(p_{nj} - q_{nj})`, one row per
iteration, without building the one-hot or the smoothed targets.
"""
import math

import numpy as np
from numba import prange

from minilm.cpu._parallel import pick, rows_kernel
from minilm.reference import losses as reference
from minilm.reference.losses import CrossEntropyCache, check_cross_entropy_args
from minilm.validate import as_scalar_gradient, require_cache

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]

KERNEL_DTYPES = (np.float32, np.float64)   # what the kernels compile for; other dtypes (float16) run the reference


@rows_kernel
def _forward_rows(logits, t, counted, eps, p, ell):
    """Equals ``minilm.reference.losses.cross_entropy_forward`` on (N, V) rows.

    Fills p (N, V), the softmax, and ell (N,), each row's smoothed loss (0 where not counted).
    """
    N, V = logits.shape
    for n in prange(N):
        m = logits[n, 0]
        for j in range(1, V):
            m = max(m, logits[n, j])                           # row maximum
        s = np.float64(0.0)
        sum_zc = np.float64(0.0)
        for j in range(V):
            zc = logits[n, j] - m                              # every entry <= 0
            e = np.exp(zc)
            p[n, j] = e
            s += e
            sum_zc += zc
        for j in range(V):
            p[n, j] = p[n, j] / s                              # p = exp(z - m) / sum exp(z - m)
        if counted[n]:
            log_s = np.log(s)
            nll = log_s - (logits[n, t[n]] - m)                # -log p_t
            smooth = log_s - sum_zc / V                        # mean over V of -log p_j
            ell[n] = (1.0 - eps) * nll + eps * smooth if eps else nll   # no 0 * inf for a -inf logit
        else:
            ell[n] = 0.0


@rows_kernel
def _backward_rows(p, t, w, eps, dlogits):
    """Equals ``minilm.reference.losses.cross_entropy_backward``: dlogits = (p - q) * w, row by row.

    w (N,) is each position's share dloss * [counted] / M; q = (1 - eps) onehot(t) + eps / V.
    """
    N, V = p.shape
    for n in prange(N):
        for j in range(V):
            q = (1.0 - eps) * (j == t[n]) + eps / V           # smoothed target distribution
            dlogits[n, j] = (p[n, j] - q) * w[n]


def cross_entropy_forward(logits, targets, *, ignore_index=-100, label_smoothing=0.0):
    """Numba ``minilm.reference.losses.cross_entropy_forward``: same arguments, checks, outputs and cache."""
    counted = check_cross_entropy_args(logits, targets, ignore_index, label_smoothing)   # (...)
    N, V = math.prod(logits.shape[:-1]), logits.shape[-1]
    if logits.dtype not in KERNEL_DTYPES:                      # (V = 0 was refused by the check above)
        return reference.cross_entropy_forward(logits, targets, ignore_index=ignore_index,
                                               label_smoothing=label_smoothing)
    eps = float(label_smoothing)
    M = int(np.count_nonzero(counted))
    t = np.where(counted, targets, 0)                          # (...) any valid class where ignored
    z = np.ascontiguousarray(logits).reshape(N, V)             # (N, V)
    p = np.empty_like(z)
    ell = np.empty(N)                                          # (N,) float64
    pick(_forward_rows, z.size)(z, t.reshape(N), counted.reshape(N), eps, p, ell)
    loss = np.asarray(ell.sum() / max(M, 1), dtype=logits.dtype)   # ()  0 when nothing is counted
    return loss, CrossEntropyCache(p.reshape(logits.shape), t, counted, M, eps)


def cross_entropy_backward(dloss, cache):
    """Numba ``minilm.reference.losses.cross_entropy_backward``: returns (dlogits, None)."""
    require_cache("cross_entropy_backward", cache, "CrossEntropyCache")
    p, t, counted, M, eps = cache
    if p.dtype not in KERNEL_DTYPES:
        return reference.cross_entropy_backward(dloss, cache)
    dloss = as_scalar_gradient("cross_entropy_backward", "dloss", dloss, np, p.dtype)     # ()
    N, V = math.prod(p.shape[:-1]), p.shape[-1]
    w = counted.reshape(N) * (dloss / max(M, 1))               # (N,) each counted position's share
    dlogits = np.empty((N, V), dtype=p.dtype)
    pick(_backward_rows, dlogits.size)(np.ascontiguousarray(p).reshape(N, V), np.ascontiguousarray(t).reshape(N), w, eps, dlogits)
    return dlogits.reshape(p.shape), None
