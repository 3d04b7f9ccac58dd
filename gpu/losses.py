r"""The fused cross-entropy as CuPy row kernels.

The math is ``minilm.reference.losses``' (log-softmax, the target's negative log-probability,
PyTorch's label smoothing, ``ignore_index``), but no (..., V) array of probabilities is kept: the
forward's row kernel writes each row's log-sum-exp ``lse`` and loss term, and the backward's row
kernel recomputes ``p_j = exp(z_j - lse)`` from the logits as it writes the gradient. One warp
per row.

For 16-bit logits both kernels compute in float32 and the loss is returned as a float32 0-d
array (a bfloat16 loss would carry under three significant digits); for float32 and float64 it
has the logits' dtype, as in the reference.
"""
from typing import NamedTuple

import cupy

from minilm.gpu._core import acc_dtype, contiguous, launch_rows, row_module, scalar, supported
from minilm.reference import losses as reference
from minilm.reference.losses import check_cross_entropy_args
from minilm.validate import as_scalar_gradient

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]


class FusedCrossEntropyCache(NamedTuple):
    logits: object           # (N, V) the logits, rows flattened
    lse: object              # (N,) log sum_j exp(z_j), in the compute dtype
    targets: object          # (N,) int64 targets (ignore_index kept)
    shape: tuple             # logits' shape
    M: object                # () int64 on the device: the number of counted positions
    ignore_index: int
    label_smoothing: float   # epsilon


_SOURCE = r"""
template <typename T>
__global__ void cross_entropy_forward_rows(const T* logits, const long long* targets,
                                           typename acc_t<T>::type* lse, typename acc_t<T>::type* ell,
                                           int N, int V, long long ignore_index, typename acc_t<T>::type eps) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* z = logits + (long long)row * V;
    A m = neg_inf<A>(), sz = 0;
    for (int j = lane; j < V; j += 32) { A zj = load(z[j]); m = max(m, zj); sz += zj; }
    m = warp_max(m);
    sz = warp_sum(sz);
    A Z = 0;
    for (int j = lane; j < V; j += 32) Z += exp_acc(load(z[j]) - m);       // every exponent <= 0
    Z = warp_sum(Z);
    if (lane == 0) {
        A l = m + log_acc(Z);                                               // log sum_j e^{z_j}
        lse[row] = l;
        long long t = targets[row];
        // -log p_t = lse - z_t; the mean over j of -log p_j = lse - mean(z). Without smoothing
        // the loss is -log p_t alone: eps * (lse - mean(z)) would be 0 * inf = NaN where a logit is -inf
        if (t == ignore_index) ell[row] = 0;
        else if (eps == (A)0) ell[row] = l - load(z[t]);
        else ell[row] = ((A)1 - eps) * (l - load(z[t])) + eps * (l - sz / V);
    }
}

template <typename T>
__global__ void cross_entropy_backward_rows(const T* logits, const long long* targets,
                                            const typename acc_t<T>::type* lse, const typename acc_t<T>::type* w,
                                            T* dlogits, int N, int V, long long ignore_index,
                                            typename acc_t<T>::type eps) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* z = logits + (long long)row * V;
    T* dz = dlogits + (long long)row * V;
    long long t = targets[row];
    A wr = (t == ignore_index) ? (A)0 : w[0];                               // dloss / M, 0 if ignored
    A l = lse[row];
    for (int j = lane; j < V; j += 32) {
        A q = (j == t ? (A)1 - eps : (A)0) + eps / V;                       // smoothed one-hot
        dz[j] = store<T>((exp_acc(load(z[j]) - l) - q) * wr);              // (p_j - q_j) dloss / M
    }
}
"""

_kernel = row_module(_SOURCE, ["cross_entropy_forward_rows", "cross_entropy_backward_rows"])


def cross_entropy_forward(logits, targets, *, ignore_index=-100, label_smoothing=0.0):
    """CuPy ``minilm.reference.losses.cross_entropy_forward`` (fused; see the module docstring)."""
    counted = check_cross_entropy_args(logits, targets, ignore_index, label_smoothing)
    if not supported(logits):                              # (V = 0 was refused by the check above)
        return reference.cross_entropy_forward(logits, targets, ignore_index=ignore_index,
                                               label_smoothing=label_smoothing)
    V = logits.shape[-1]
    N = logits.size // V
    acc = acc_dtype(logits.dtype)
    z = contiguous(logits).reshape(N, V)
    t = cupy.ascontiguousarray(cupy.asarray(targets).reshape(N), dtype=cupy.int64)
    M = cupy.count_nonzero(counted)                                    # () on the device: no wait for it
    lse = cupy.empty(N, dtype=acc)
    ell = cupy.empty(N, dtype=acc)
    launch_rows(_kernel("cross_entropy_forward_rows", logits.dtype), N,
                (z, t, lse, ell, cupy.int32(N), cupy.int32(V), cupy.int64(ignore_index),
                 scalar(float(label_smoothing), logits.dtype)))
    loss = cupy.sum(ell) / cupy.maximum(M, 1)                         # () mean over counted positions
    loss = loss.astype(acc if logits.dtype.itemsize == 2 else logits.dtype)
    return loss, FusedCrossEntropyCache(z, lse, t, logits.shape, M, int(ignore_index), float(label_smoothing))


def cross_entropy_backward(dloss, cache):
    """CuPy ``minilm.reference.losses.cross_entropy_backward``. Returns (dlogits, None)."""
    if not isinstance(cache, FusedCrossEntropyCache):
        return reference.cross_entropy_backward(dloss, cache)
    z, lse, t, shape, M, ignore_index, eps = cache
    acc = lse.dtype
    dloss = as_scalar_gradient("cross_entropy_backward", "dloss", dloss, cupy, acc)   # ()
    N, V = z.shape
    w = (dloss / cupy.maximum(M, 1)).astype(acc).reshape(1)           # each counted position's share
    dlogits = cupy.empty((N, V), dtype=z.dtype)
    launch_rows(_kernel("cross_entropy_backward_rows", z.dtype), N,
                (z, t, lse, w, dlogits, cupy.int32(N), cupy.int32(V), cupy.int64(ignore_index),
                 scalar(eps, z.dtype)))
    return dlogits.reshape(shape), None
