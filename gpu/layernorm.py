r"""Layer normalisation over the last axis, as CuPy row kernels.

The math, its derivation and the shapes are those of ``minilm.reference.layernorm``, and the
cache is the reference's ``LayernormCache``; ``tests/test_gpu.py`` holds each function to the
reference. The positions (every leading axis) are flattened to N rows of C channels, one warp
per row.

Forward: each lane adds up its share of the row, the warp adds the lanes' sums (mean, then the
variance of the centred row), and the lanes write ``x_hat`` and ``y``. ``rstd`` is kept in the
compute type (float32 for 16-bit data), since it scales every gradient of the row.

Backward: ``dx`` is row-local and comes from the row kernel. ``dgamma`` and ``dbeta`` are sums
over the rows: a second kernel cuts the rows into ``CHUNKS`` chunks, one thread per (chunk,
channel) adds up its chunk's ``dy x_hat`` and ``dy`` -- neighbouring threads read neighbouring
channels, so the reads coalesce -- and the (CHUNKS, C) partial sums are added up by CuPy.
"""
import math

import cupy

from minilm.gpu._core import acc_dtype, contiguous, launch_rows, row_module, scalar, supported
from minilm.reference import layernorm as reference
from minilm.reference.layernorm import LayernormCache, check_layernorm_args
from minilm.validate import require_gradient

__all__ = ["layernorm_forward", "layernorm_backward"]

_SOURCE = r"""
template <typename T>
__global__ void layernorm_forward_rows(const T* x, const T* gamma, const T* beta, T* y, T* x_hat,
                                       typename acc_t<T>::type* rstd, int N, int C,
                                       typename acc_t<T>::type eps) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* xr = x + (long long)row * C;
    A s = 0;
    for (int i = lane; i < C; i += 32) s += load(xr[i]);
    A mu = warp_sum(s) / C;
    A ss = 0;
    for (int i = lane; i < C; i += 32) { A d = load(xr[i]) - mu; ss += d * d; }
    A r = rsqrt_acc(warp_sum(ss) / C + eps);              // 1 / sqrt(var + eps), biased variance
    if (lane == 0) rstd[row] = r;
    T* yr = y + (long long)row * C;
    T* hr = x_hat + (long long)row * C;
    for (int i = lane; i < C; i += 32) {
        A h = (load(xr[i]) - mu) * r;                       // x_hat = (x - mu) * rstd
        hr[i] = store<T>(h);
        yr[i] = store<T>(load(gamma[i]) * h + load(beta[i]));   // y = gamma x_hat + beta
    }
}

template <typename T>
__global__ void layernorm_backward_rows(const T* dy, const T* x_hat, const typename acc_t<T>::type* rstd,
                                        const T* gamma, T* dx, int N, int C) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* dyr = dy + (long long)row * C;
    const T* hr = x_hat + (long long)row * C;
    A s1 = 0, s2 = 0;
    for (int i = lane; i < C; i += 32) {
        A dh = load(dyr[i]) * load(gamma[i]);               // dx_hat = dy * gamma
        s1 += dh;
        s2 += dh * load(hr[i]);
    }
    A mean_dh = warp_sum(s1) / C;
    A mean_dh_h = warp_sum(s2) / C;
    A r = rstd[row];
    T* dxr = dx + (long long)row * C;
    for (int i = lane; i < C; i += 32) {                    // remove the mean and the projection on x_hat
        A dh = load(dyr[i]) * load(gamma[i]);
        dxr[i] = store<T>(r * (dh - mean_dh - load(hr[i]) * mean_dh_h));
    }
}

// partial sums over a chunk of rows: dgamma_parts[chunk, c] = sum dy x_hat, dbeta_parts[chunk, c] = sum dy
template <typename T>
__global__ void layernorm_param_grads(const T* dy, const T* x_hat, typename acc_t<T>::type* dgamma_parts,
                                      typename acc_t<T>::type* dbeta_parts, int N, int C, int rows_per_chunk) {
    typedef typename acc_t<T>::type A;
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (c >= C) return;
    int end = min(N, (chunk + 1) * rows_per_chunk);
    A dg = 0, db = 0;
    for (int n = chunk * rows_per_chunk; n < end; n++) {
        A d = load(dy[(long long)n * C + c]);
        dg += d * load(x_hat[(long long)n * C + c]);
        db += d;
    }
    dgamma_parts[(long long)chunk * C + c] = dg;
    dbeta_parts[(long long)chunk * C + c] = db;
}
"""

CHUNKS = 128        # row chunks of the dgamma/dbeta sums: 128 x C threads keep the GPU busy

_kernel = row_module(_SOURCE, ["layernorm_forward_rows", "layernorm_backward_rows", "layernorm_param_grads"])


def layernorm_forward(x, gamma, beta, *, eps=1e-5):
    """CuPy ``minilm.reference.layernorm.layernorm_forward``: same arguments, checks, outputs and cache.

    ``rstd`` in the cache has the compute dtype (float32 for 16-bit x).
    """
    check_layernorm_args(x, gamma, beta, eps)
    if not supported(x, gamma, beta):
        return reference.layernorm_forward(x, gamma, beta, eps=eps)
    lead, C = x.shape[:-1], x.shape[-1]
    N = math.prod(lead)
    x2 = contiguous(x)
    y = cupy.empty(x.shape, dtype=x.dtype)
    x_hat = cupy.empty(x.shape, dtype=x.dtype)
    rstd = cupy.empty(lead + (1,), dtype=acc_dtype(x.dtype))
    launch_rows(_kernel("layernorm_forward_rows", x.dtype), N,
                (x2, contiguous(gamma), contiguous(beta), y, x_hat, rstd, cupy.int32(N), cupy.int32(C),
                 scalar(float(eps), x.dtype)))
    return y, LayernormCache(x_hat, rstd, gamma)


def layernorm_backward(dy, cache):
    """CuPy ``minilm.reference.layernorm.layernorm_backward``: returns (dx, dgamma, dbeta)."""
    x_hat, rstd, gamma = cache
    require_gradient("layernorm_backward", "dy", dy, x_hat.shape, "(..., C)")
    if not supported(dy, x_hat, gamma) or dy.dtype != x_hat.dtype or rstd.dtype != acc_dtype(dy.dtype) \
            or dy.size == 0:
        return reference.layernorm_backward(dy, cache)
    C = x_hat.shape[-1]
    N = math.prod(x_hat.shape[:-1])
    dy = contiguous(dy)
    dx = cupy.empty(dy.shape, dtype=dy.dtype)
    launch_rows(_kernel("layernorm_backward_rows", dy.dtype), N,
                (dy, contiguous(x_hat), contiguous(rstd), contiguous(gamma), dx, cupy.int32(N), cupy.int32(C)))
    acc = acc_dtype(dy.dtype)
    chunks = max(1, min(CHUNKS, N))
    rows_per_chunk = -(-N // chunks)
    dgamma_parts = cupy.empty((chunks, C), dtype=acc)
    dbeta_parts = cupy.empty((chunks, C), dtype=acc)
    threads = 128
    _kernel("layernorm_param_grads", dy.dtype)(((C + threads - 1) // threads, chunks), (threads,),
                                               (dy, contiguous(x_hat), dgamma_parts, dbeta_parts, cupy.int32(N),
                                                cupy.int32(C), cupy.int32(rows_per_chunk)))
    dgamma = dgamma_parts.sum(axis=0).astype(dy.dtype, copy=False)            # from y = gamma x_hat + beta
    dbeta = dbeta_parts.sum(axis=0).astype(dy.dtype, copy=False)
    return dx, dgamma, dbeta
