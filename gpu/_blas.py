"""Batched matrix products through cuBLAS: one call for the whole batch, transposes as flags.

CuPy 14 multiplies 2-D float16 and bfloat16 matrices on the tensor cores, but its batched (3-D
and 4-D) products of them are slow (float16, converted to float32 first) or refused (bfloat16);
and for every dtype its batched product of a transposed view first copies the view. ``bmm``
calls ``cublasGemmStridedBatchedEx`` directly: every product of the batch in one call, a
transposed operand read in place, 16-bit inputs with float32 accumulation and the output in 16
bits or in float32; float32 in plain float32 (no TF32), float64 in float64.

Row-major C = op(A) op(B) is the column-major product C^T = op(B)^T op(A)^T, and a row-major
matrix's memory is its transpose in column-major order; so the call passes B before A, with the
transpose flags and leading dimensions worked out below. ``available()`` checks the whole path
once against a float32 product on random data and reports False (and ``bmm`` is not used) if the
cuBLAS call fails or disagrees.
"""
import functools

import cupy
import numpy as np
from cupy_backends.cuda.api import runtime
from cupy_backends.cuda.libs import cublas

from minilm.gpu._core import BFLOAT16

_CUDA_TYPE = {np.dtype(np.float16): runtime.CUDA_R_16F, np.dtype(np.float32): runtime.CUDA_R_32F,
              np.dtype(np.float64): runtime.CUDA_R_64F}
if BFLOAT16 is not None:
    _CUDA_TYPE[BFLOAT16] = runtime.CUDA_R_16BF
_COMPUTE_32F = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)
_COMPUTE_64F = getattr(cublas, "CUBLAS_COMPUTE_64F", 70)
_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1
# alpha = 1 and beta = 0 in the compute type, read by cuBLAS from host memory during the call
_ONE_ZERO = {wide: (np.ones(1, dtype=np.float64 if wide else np.float32), np.zeros(1, dtype=np.float64 if wide else np.float32))
             for wide in (False, True)}


def bmm(a, b, *, trans_a=False, trans_b=False, out_dtype=None, out=None):
    """op(a) @ op(b) over the leading (batch) axes; op transposes the last two axes when asked.

    a : (..., m, k), or (..., k, m) with ``trans_a``; b : (..., k, n), or (..., n, k) with
    ``trans_b``; both of one dtype, with the same leading axes. Returns (..., m, n) in
    ``out_dtype`` (default: the inputs' dtype; float32 or 16 bits for 16-bit inputs), written
    into ``out`` when given (C-contiguous, of that shape and dtype).
    """
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    lead = a.shape[:-2]
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    n = b.shape[-2] if trans_b else b.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    if out is None:
        out = cupy.empty(lead + (m, n), dtype=out_dtype or a.dtype)
    if out.size == 0:
        return out
    if k == 0:
        out[...] = 0
        return out
    wide = a.dtype == np.float64
    one, zero = _ONE_ZERO[wide]
    lda = m if trans_a else k                 # row length of a's memory
    ldb = k if trans_b else n                 # row length of b's memory
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.gemmStridedBatchedEx(
        handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
        one.ctypes.data, b.data.ptr, _CUDA_TYPE[b.dtype], ldb, k * n,
        a.data.ptr, _CUDA_TYPE[a.dtype], lda, m * k,
        zero.ctypes.data, out.data.ptr, _CUDA_TYPE[out.dtype], n, m * n,
        batch, _COMPUTE_64F if wide else _COMPUTE_32F, _GEMM_DEFAULT)
    return out


@functools.cache
def available(dtype):
    """True when ``bmm`` runs and agrees with CuPy's own product for inputs of ``dtype`` (checked once)."""
    try:
        dtype = np.dtype(dtype)
        wide = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
        rng = np.random.default_rng(0)
        a = cupy.asarray(rng.standard_normal((3, 5, 7)).astype(dtype))
        b = cupy.asarray(rng.standard_normal((3, 7, 4)).astype(dtype))
        aw, bw = a.astype(wide), b.astype(wide)
        checks = [(bmm(a, b, out_dtype=wide), aw @ bw),
                  (bmm(cupy.swapaxes(a, 1, 2).copy(), b, trans_a=True, out_dtype=wide), aw @ bw),
                  (bmm(a, cupy.swapaxes(b, 1, 2).copy(), trans_b=True, out_dtype=wide), aw @ bw)]
        # the same inputs and accumulation: only the summation order differs
        tol = 1e-12 if dtype == np.float64 else 1e-4
        return all(float(cupy.max(cupy.abs(c - r))) <= tol * max(1.0, float(cupy.max(cupy.abs(r)))) for c, r in checks)
    except Exception:
        return False
