"""What every CuPy kernel of this tier shares: the dtypes, one preamble, and how kernels are built.

Two kinds of kernel live in ``minilm.gpu``:

* **elementwise** kernels (the exact GELU, the recurrent gates, the optimizer updates) are
  ``cupy.ElementwiseKernel`` objects built by ``elementwise``. CuPy writes the loop and the
  indexing; the body is one line of C per output, written with the functions of ``PREAMBLE``.
  CuPy calls the array's element type ``T`` (``float``, ``double``, its own ``float16`` or
  ``bfloat16``); the body computes in ``acc_t<T>::type`` -- ``double`` for double, ``float``
  for everything else -- and rounds once when it stores.
* **row** kernels (softmax, layernorm, the attention softmax, the fused cross-entropy) are
  templates in one CUDA source per family, compiled with ``cupy.RawModule`` for each dtype, when
  it is first used, by ``row_module``. One warp (32 threads) owns one row: it reads the row, adds
  up its sums with warp shuffles, and writes the row. ``ROW_PREAMBLE`` defines the 16-bit storage
  types for them (``half16``, ``bf16``) with conversions written as PTX instructions or bit
  operations, so the sources need no CUDA headers and compile for any GPU CuPy supports.
  **Element** kernels (the tanh GELU, dropout) are built the same way, but a thread takes four
  elements a grid apart instead of a warp taking a row (``FOR_THREAD_ELEMENTS``, ``launch_elems``).

Every kernel computes in float32 for float16 and bfloat16 data (and in float64 for float64):
the low precision is the storage format, not the arithmetic.
"""
import functools

import cupy
import numpy as np

try:                                   # CuPy takes bfloat16 from ml_dtypes (CuPy >= 14)
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:                    # pragma: no cover - ml_dtypes comes with recent CuPy
    BFLOAT16 = None

LOW_PRECISION = tuple(d for d in (np.dtype(np.float16), BFLOAT16) if d is not None)

# the C type of each dtype in the row kernels' templates
ROW_CTYPES = {np.dtype(np.float64): "double", np.dtype(np.float32): "float", np.dtype(np.float16): "half16"}
if BFLOAT16 is not None:
    ROW_CTYPES[BFLOAT16] = "bf16"

WARP = 32
WARPS_PER_BLOCK = 4                    # 128 threads a block, one row per warp


def acc_dtype(dtype):
    """The dtype a kernel computes in for data of ``dtype``: float64 for float64, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# Whether dropout keeps element i: SplitMix64's finaliser of (seed, i), whose 53 high bits give a
# double u in [0, 1), kept when u < keep = 1 - p. A hash of the index, not a generator's state, so
# any kernel can draw the mask of any element: the dropout kernels and the attention's softmax rows
# (minilm.gpu.attention) draw the same mask for the same seed and element.
DROPOUT_KEEP = r"""
__device__ inline bool dropout_keep(unsigned long long seed, unsigned long long i, double keep) {
    unsigned long long z = seed + i * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (double)(z >> 11) * (1.0 / 9007199254740992.0) < keep;
}
"""

# Shared by every elementwise kernel: the compute type, and the math the bodies are written with.
PREAMBLE = r"""
template <typename T> struct acc_t { typedef float type; };
template <> struct acc_t<double> { typedef double type; };

// the math functions in the compute type: CUDA's float (f-suffixed) or double versions
__device__ inline float tanh_acc(float x) { return tanhf(x); }
__device__ inline double tanh_acc(double x) { return tanh(x); }
__device__ inline float sigmoid_acc(float x) {
    return x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}
__device__ inline double sigmoid_acc(double x) {
    return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
}
__device__ inline float sqrt_acc(float x) { return sqrtf(x); }
__device__ inline double sqrt_acc(double x) { return sqrt(x); }
__device__ inline float erf_acc(float x) { return erff(x); }
__device__ inline double erf_acc(double x) { return erf(x); }
__device__ inline float exp_acc(float x) { return expf(x); }
__device__ inline double exp_acc(double x) { return exp(x); }
""" + DROPOUT_KEEP

# The row kernels' 16-bit storage types and the loads and stores that convert them.
ROW_PREAMBLE = r"""
struct half16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

template <typename T> struct acc_t { typedef float type; };
template <> struct acc_t<double> { typedef double type; };

__device__ inline float load(float x) { return x; }
__device__ inline double load(double x) { return x; }
__device__ inline float load(half16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ inline float load(bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

template <typename T> __device__ inline T store(typename acc_t<T>::type v) { return (T)v; }
template <> __device__ inline half16 store<half16>(float v) {
    half16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
// bfloat16 is float32's high 16 bits. Rounded to nearest even on the bits, as cvt.rn.bf16.f32 rounds,
// which only sm_80 and later accept: add half of bfloat16's last place (0x7fff, and one more when
// the kept part is odd, so that a tie goes to even), then keep the high half; a NaN stays a quiet
// NaN (its exponent all ones and a mantissa bit set), never rounded into inf.
template <> __device__ inline bf16 store<bf16>(float v) {
    unsigned int u = __float_as_uint(v);
    bf16 h;
    h.bits = (unsigned short)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u
                                                              : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return h;
}

__device__ inline float exp_acc(float x) { return expf(x); }
__device__ inline double exp_acc(double x) { return exp(x); }
__device__ inline float tanh_acc(float x) { return tanhf(x); }
__device__ inline double tanh_acc(double x) { return tanh(x); }
template <typename A> __device__ inline A neg_inf();
template <> __device__ inline float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ inline double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }
__device__ inline float log_acc(float x) { return logf(x); }
__device__ inline double log_acc(double x) { return log(x); }
__device__ inline float rsqrt_acc(float x) { return 1.0f / sqrtf(x); }
__device__ inline double rsqrt_acc(double x) { return 1.0 / sqrt(x); }

// The loop of an element kernel (launch_elems): this thread's ELEMS_PER_THREAD elements i < n, a
// grid apart, so that a warp's loads stay coalesced and each thread has several in flight.
#define ELEMS_PER_THREAD 4
#define FOR_THREAD_ELEMENTS(i, n) \
    _Pragma("unroll") \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x, r_ = 0; r_ < ELEMS_PER_THREAD; \
         r_++, i += (long long)gridDim.x * blockDim.x) \
        if (i < (n))

// the sum / max of v over the 32 lanes of a warp, in every lane
template <typename A> __device__ inline A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename A> __device__ inline A warp_max(A v) {
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
""" + DROPOUT_KEEP


def elementwise(in_params, out_params, body, name):
    """A ``cupy.ElementwiseKernel`` whose body may use everything in ``PREAMBLE``."""
    return cupy.ElementwiseKernel(in_params, out_params, body, name, preamble=PREAMBLE)


def row_module(source, kernels):
    """The kernels ``kernels`` of ``source`` (templates over the data's C type) for each dtype.

    ``source`` may use ``ROW_PREAMBLE``. Returns a function ``get(kernel, dtype)`` that gives the
    kernel's instance for data of that dtype. Each dtype's instances are compiled into a
    ``RawModule`` of their own when that dtype is first asked for, so that float32 and float64 never
    wait for, or depend on, the 16-bit instances.
    """
    @functools.cache
    def _module(ctype):
        names = [f"{k}<{ctype}>" for k in kernels]
        return cupy.RawModule(code=ROW_PREAMBLE + source, options=("--std=c++14",), name_expressions=names)

    def get(kernel, dtype):
        ctype = ROW_CTYPES[np.dtype(dtype)]
        return _module(ctype).get_function(f"{kernel}<{ctype}>")
    return get


def launch_rows(fn, n_rows, args):
    """Run a row kernel with one warp per row over ``n_rows`` rows."""
    if n_rows == 0:
        return
    threads = WARP * WARPS_PER_BLOCK
    blocks = (n_rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    fn((blocks,), (threads,), args)


ELEMS_PER_THREAD, ELEMS_THREADS = 4, 256        # ELEMS_PER_THREAD as in ROW_PREAMBLE


def launch_elems(fn, n, args):
    """Run an element kernel (its loop ``FOR_THREAD_ELEMENTS``) over n elements; ``args`` end before n.

    A thread takes four elements, a quarter of the blocks of CuPy's one-element-per-thread loop,
    whose block scheduling set the time of the GELU: 0.12 ms for 25 M elements in float32 and in
    bfloat16 alike, with a cheaper tanh changing nothing, against 0.08 ms (forward) this way.
    """
    if n == 0:
        return
    per_block = ELEMS_THREADS * ELEMS_PER_THREAD
    fn(((n + per_block - 1) // per_block,), (ELEMS_THREADS,), (*args, cupy.int64(n)))


def scalar(value, dtype):
    """A kernel's scalar argument in the compute type of ``dtype`` (float64 or float32)."""
    return acc_dtype(dtype).type(value)


def contiguous(a):
    """``a`` itself when C-contiguous, else a C-contiguous copy (row kernels index flat rows)."""
    return a if a.flags.c_contiguous else cupy.ascontiguousarray(a)


def supported(*arrays):
    """True when every array is a CuPy array of a dtype the kernels compile for."""
    return all(isinstance(a, cupy.ndarray) and a.dtype in ROW_CTYPES for a in arrays)
