"""Matrix products through cuBLAS, called directly: one call for a whole batch, transposes as flags.

CuPy 14 multiplies 2-D float16 and bfloat16 matrices on the tensor cores, but its batched (3-D
and 4-D) products of them are slow (float16, converted to float32 first) or refused (bfloat16);
for every dtype its batched product of a transposed view first copies the view; and its cuBLAS
wrappers refuse to run while a stream is being captured into a CUDA graph (``minilm.gpu.graph``),
although cuBLAS itself records its kernels there. So this file calls libcublas -- the library
CuPy loaded -- through ``ctypes``, with a handle and a 32 MiB workspace of its own (a workspace
set by the caller is what lets cuBLAS run inside a capture without allocating).

``bmm`` is ``cublasGemmStridedBatchedEx``: every product of the batch in one call, a transposed
operand read in place, 16-bit inputs with float32 accumulation and the output in 16 bits or in
float32; float32 in plain float32 (no TF32), float64 in float64. ``matmul`` is the same call for
two 2-D matrices, each C- or Fortran-ordered (a transposed view is read in place): the linear
layers' products (``minilm.gpu.linear``).

Row-major C = op(A) op(B) is the column-major product C^T = op(B)^T op(A)^T, and a row-major
matrix's memory is its transpose in column-major order; so the call passes B before A, with the
transpose flags and leading dimensions worked out below. ``available()`` checks the whole path
once against CuPy's own product on random data and reports False (and neither function is used)
if the library cannot be loaded, a call fails, or it disagrees.
"""
import ctypes
import ctypes.util
import functools

import cupy
import numpy as np
from cupy_backends.cuda.api import runtime

from minilm.gpu._core import BFLOAT16

_CUDA_TYPE = {np.dtype(np.float16): runtime.CUDA_R_16F, np.dtype(np.float32): runtime.CUDA_R_32F,
              np.dtype(np.float64): runtime.CUDA_R_64F}
if BFLOAT16 is not None:
    _CUDA_TYPE[BFLOAT16] = runtime.CUDA_R_16BF
_COMPUTE_32F, _COMPUTE_64F = 68, 70          # cublasComputeType_t
_GEMM_DEFAULT = -1                           # cublasGemmAlgo_t
_OP_N, _OP_T = 0, 1                          # cublasOperation_t
_WORKSPACE_BYTES = 32 * 2 ** 20              # cuBLAS's recommendation for Hopper
# alpha = 1 and beta = 0 in the compute type, read by cuBLAS from host memory during the call
_ONE_ZERO = {wide: (np.ones(1, dtype=np.float64 if wide else np.float32), np.zeros(1, dtype=np.float64 if wide else np.float32))
             for wide in (False, True)}

_p, _i, _ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong


def _loaded_path(prefix):
    """The file of the shared library ``prefix``* mapped into this process, or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(None, 5)[-1].strip()
                if path.rsplit("/", 1)[-1].startswith(prefix):
                    return path
    except OSError:
        pass
    return None


@functools.cache
def _library():
    """libcublas as CuPy loaded it (the same file, so the same version), with its signatures."""
    cupy.cuda.device.get_cublas_handle()             # makes CuPy load libcublas
    path = _loaded_path("libcublas.so") or ctypes.util.find_library("cublas")
    if path is None:
        raise OSError("libcublas was not found")
    lib = ctypes.CDLL(path)
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(_p)]
    lib.cublasSetStream_v2.argtypes = [_p, _p]
    lib.cublasSetWorkspace_v2.argtypes = [_p, _p, ctypes.c_size_t]
    lib.cublasGemmStridedBatchedEx.argtypes = [_p, _i, _i, _i, _i, _i, _p, _p, _i, _i, _ll, _p, _i, _i, _ll,
                                               _p, _p, _i, _i, _ll, _i, _i, _i]
    for fn in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmStridedBatchedEx):
        fn.restype = _i
    return lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"minilm.gpu._blas: {what} failed with cuBLAS status {status}")


@functools.cache
def _handle(device):
    """This file's cuBLAS handle on ``device``, and its workspace (kept alive with it)."""
    lib = _library()
    handle = _p()
    _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
    workspace = cupy.empty(_WORKSPACE_BYTES, dtype=cupy.uint8)
    _check(lib.cublasSetWorkspace_v2(handle, workspace.data.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
    return handle, workspace


def _gemm(trans_a, trans_b, m, n, k, a, lda, stride_a, b, ldb, stride_b, out, ldc, stride_c, batch):
    """out (batch, m, n) = op(a) op(b), row-major, through the column-major call described above."""
    lib = _library()
    handle, workspace = _handle(cupy.cuda.Device().id)
    _check(lib.cublasSetStream_v2(handle, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
    # cublasSetStream puts the handle back on cuBLAS's default workspace pool: give it ours again
    _check(lib.cublasSetWorkspace_v2(handle, workspace.data.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
    wide = a.dtype == np.float64
    one, zero = _ONE_ZERO[wide]
    _check(lib.cublasGemmStridedBatchedEx(
        handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
        one.ctypes.data, b.data.ptr, _CUDA_TYPE[b.dtype], ldb, stride_b,
        a.data.ptr, _CUDA_TYPE[a.dtype], lda, stride_a,
        zero.ctypes.data, out.data.ptr, _CUDA_TYPE[out.dtype], ldc, stride_c,
        batch, _COMPUTE_64F if wide else _COMPUTE_32F, _GEMM_DEFAULT), "cublasGemmStridedBatchedEx")


def _new_or_zero(out, shape, dtype, k):
    """``out``, or a new array of ``shape``; zeros when the products are empty sums (k = 0)."""
    if out is None:
        out = cupy.empty(shape, dtype=dtype)
    if k == 0 and out.size:
        out[...] = 0
    return out


def _layout(a):
    """(row stride, batch stride) in elements of a (..., rows, cols) array whose rows are contiguous
    and whose leading axes step through memory evenly (a block of a larger array, say), else None."""
    item = a.itemsize
    if a.ndim < 2 or any(st % item for st in a.strides) or (a.shape[-1] > 1 and a.strides[-1] != item):
        return None
    ld = a.strides[-2] // item if a.shape[-2] > 1 else a.shape[-1]
    if ld < a.shape[-1]:
        return None
    lead = [(n, st // item) for n, st in zip(a.shape[:-2], a.strides[:-2]) if n > 1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        if outer != n * inner:
            return None
    return ld, (lead[-1][1] if lead else 0)


def bmm(a, b, *, trans_a=False, trans_b=False, out_dtype=None, out=None):
    """op(a) @ op(b) over the leading (batch) axes; op transposes the last two axes when asked.

    a : (..., m, k), or (..., k, m) with ``trans_a``; b : (..., k, n), or (..., n, k) with
    ``trans_b``; both of one dtype, with the same leading axes. Returns (..., m, n) in
    ``out_dtype`` (default: the inputs' dtype; float32 or 16 bits for 16-bit inputs), written
    into ``out`` when given. Each operand, and ``out``, may be a block of a larger array (rows
    contiguous, the leading axes evenly spaced): it is read or written in place.
    """
    la, lb = _layout(a), _layout(b)
    if la is None:
        a = cupy.ascontiguousarray(a)
        la = _layout(a)
    if lb is None:
        b = cupy.ascontiguousarray(b)
        lb = _layout(b)
    lead = a.shape[:-2]
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    n = b.shape[-2] if trans_b else b.shape[-1]
    out = _new_or_zero(out, lead + (m, n), out_dtype or a.dtype, k)
    lc = _layout(out)
    if lc is None:
        raise ValueError(f"minilm.gpu._blas.bmm: argument 'out' must have contiguous rows and evenly spaced "
                         f"leading axes, got strides {out.strides}")
    if out.size == 0 or k == 0:
        return out
    batch = int(np.prod(lead, dtype=np.int64))
    _gemm(trans_a, trans_b, m, n, k, a, la[0], la[1], b, lb[0], lb[1], out, lc[0], lc[1], batch)
    return out


def _operand(a):
    """A 2-D matrix as cuBLAS reads it in place: (array, transposed, row length of its memory)."""
    if a.flags.c_contiguous:
        return a, False, a.shape[1]
    if a.flags.f_contiguous:                         # the transpose of a C-ordered matrix, e.g. W.T
        return a, True, a.shape[0]
    a = cupy.ascontiguousarray(a)
    return a, False, a.shape[1]


def matmul(a, b, *, out_dtype=None):
    """a @ b for 2-D a (m, k) and b (k, n) of one dtype, each C- or Fortran-ordered (read in place).

    Returns a new C-ordered (m, n) array in ``out_dtype`` (default: the inputs' dtype).
    """
    (m, k), n = a.shape, b.shape[1]
    out = _new_or_zero(None, (m, n), out_dtype or a.dtype, k)
    if out.size == 0 or k == 0:
        return out
    a, trans_a, lda = _operand(a)
    b, trans_b, ldb = _operand(b)
    _gemm(trans_a, trans_b, m, n, k, a, lda, 0, b, ldb, 0, out, n, 0, 1)
    return out


@functools.cache
def available(dtype):
    """True when ``bmm`` and ``matmul`` run and agree with CuPy's own product for ``dtype`` (checked once)."""
    try:
        dtype = np.dtype(dtype)
        wide = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
        rng = np.random.default_rng(0)
        a = cupy.asarray(rng.standard_normal((3, 5, 7)).astype(dtype))
        b = cupy.asarray(rng.standard_normal((3, 7, 4)).astype(dtype))
        aw, bw = a.astype(wide), b.astype(wide)
        checks = [(bmm(a, b, out_dtype=wide), aw @ bw),
                  (bmm(cupy.swapaxes(a, 1, 2).copy(), b, trans_a=True, out_dtype=wide), aw @ bw),
                  (bmm(a, cupy.swapaxes(b, 1, 2).copy(), trans_b=True, out_dtype=wide), aw @ bw),
                  (matmul(a[0], b[0], out_dtype=wide), aw[0] @ bw[0]),
                  (matmul(a[0].T.copy().T, b[1].T.copy().T, out_dtype=wide), aw[0] @ bw[1]),   # Fortran-ordered
                  (matmul(b[2].T, a[2].T, out_dtype=wide), bw[2].T @ aw[2].T),
                  (bmm(a[:, 1:4], b[:, :, 1:3], out_dtype=wide), aw[:, 1:4] @ bw[:, :, 1:3])]   # blocks
        # the same inputs and accumulation: only the summation order differs
        tol = 1e-12 if dtype == np.float64 else 1e-4
        return all(float(cupy.max(cupy.abs(c - r))) <= tol * max(1.0, float(cupy.max(cupy.abs(r)))) for c, r in checks)
    except Exception:
        return False
