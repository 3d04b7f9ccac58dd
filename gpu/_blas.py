"""Batched matrix products of 16-bit arrays through cuBLAS, with float32 accumulation.

CuPy 14 multiplies 2-D float16 and bfloat16 matrices on the tensor cores, but its batched (3-D
and 4-D) products of them are slow (float16, converted to float32 first) or refused (bfloat16).
``bmm`` calls ``cublasGemmStridedBatchedEx`` directly for those: every product of the batch in one
call, 16-bit inputs, float32 accumulation, and the output in 16 bits or in float32.

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

_CUDA_TYPE = {np.dtype(np.float16): runtime.CUDA_R_16F, np.dtype(np.float32): runtime.CUDA_R_32F}
if BFLOAT16 is not None:
    _CUDA_TYPE[BFLOAT16] = runtime.CUDA_R_16BF
_COMPUTE_32F = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)
_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1


def bmm(a, b, *, trans_a=False, trans_b=False, out_dtype=None):
    """op(a) @ op(b) over the leading (batch) axes; op transposes the last two axes when asked.

    a : (..., m, k), or (..., k, m) with ``trans_a``; b : (..., k, n), or (..., n, k) with
    ``trans_b``; both 16-bit, of one dtype, with the same leading axes. Returns (..., m, n) in
    ``out_dtype`` (default: the inputs' dtype).
    """
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    lead = a.shape[:-2]
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    n = b.shape[-2] if trans_b else b.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    out = cupy.empty(lead + (m, n), dtype=out_dtype or a.dtype)
    if out.size == 0:
        return out
    if k == 0:
        out[...] = 0
        return out
    one, zero = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    lda = m if trans_a else k                 # row length of a's memory
    ldb = k if trans_b else n                 # row length of b's memory
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.gemmStridedBatchedEx(
        handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
        one.ctypes.data, b.data.ptr, _CUDA_TYPE[b.dtype], ldb, k * n,
        a.data.ptr, _CUDA_TYPE[a.dtype], lda, m * k,
        zero.ctypes.data, out.data.ptr, _CUDA_TYPE[out.dtype], n, m * n,
        batch, _COMPUTE_32F, _GEMM_DEFAULT)
    return out


@functools.cache
def available(dtype):
    """True when ``bmm`` runs and agrees with a float32 product for inputs of ``dtype`` (checked once)."""
    try:
        rng = np.random.default_rng(0)
        a = cupy.asarray(rng.standard_normal((3, 5, 7)).astype(dtype))
        b = cupy.asarray(rng.standard_normal((3, 7, 4)).astype(dtype))
        a32, b32 = a.astype(cupy.float32), b.astype(cupy.float32)
        checks = [(bmm(a, b, out_dtype=cupy.float32), a32 @ b32),
                  (bmm(cupy.swapaxes(a, 1, 2).copy(), b, trans_a=True, out_dtype=cupy.float32), a32 @ b32),
                  (bmm(a, cupy.swapaxes(b, 1, 2).copy(), trans_b=True, out_dtype=cupy.float32), a32 @ b32)]
        # 16-bit inputs, float32 products and sums: only the summation order differs
        return all(float(cupy.max(cupy.abs(c - r))) <= 1e-4 * max(1.0, float(cupy.max(cupy.abs(r)))) for c, r in checks)
    except Exception:
        return False
