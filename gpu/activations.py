r"""GELU and softmax as CuPy kernels.

GELU is elementwise: one kernel per form and direction, each the formula of
``minilm.reference.activations`` in one pass instead of the reference's chain of array expressions
(and their temporaries) -- element kernels of four elements a thread for the tanh form
(``minilm.gpu._core.launch_elems``), an ``ElementwiseKernel`` with the shared preamble for the
exact form. Softmax is a row
kernel: one warp per row finds the row's maximum, adds up the exponentials and writes the
probabilities; its backward removes the row's ``sum(dy * y)``. Caches are the reference's.
"""
import math

import cupy

from minilm.gpu._core import contiguous, elementwise, launch_elems, launch_rows, row_module, supported
from minilm.reference import activations as reference
from minilm.reference.activations import GeluCache, SoftmaxCache, check_gelu_args, check_softmax_args
from minilm.validate import require_gradient

__all__ = ["gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward"]

_K = repr(math.sqrt(2.0 / math.pi))     # sqrt(2 / pi), to 17 digits
_C = "0.044715"                         # GPT-2's cubic coefficient

# The tanh form, the one GPT trains with: element kernels (``minilm.gpu._core.launch_elems``).
_GELU_SOURCE = f"""
template <typename T>
__global__ void gelu_tanh_forward_elems(const T* __restrict__ x, T* __restrict__ y, long long n) {{
    typedef typename acc_t<T>::type A;
    FOR_THREAD_ELEMENTS(i, n) {{
        A v = load(x[i]);
        A u = (A){_K} * (v + (A){_C} * v * v * v);             // u = sqrt(2/pi) (x + 0.044715 x^3)
        y[i] = store<T>((A)0.5 * v * ((A)1 + tanh_acc(u)));      // y = x (1 + tanh u) / 2
    }}
}}

template <typename T>
__global__ void gelu_tanh_backward_elems(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                         long long n) {{
    typedef typename acc_t<T>::type A;
    FOR_THREAD_ELEMENTS(i, n) {{
        A v = load(x[i]);
        A t = tanh_acc((A){_K} * (v + (A){_C} * v * v * v));
        A du = (A){_K} * ((A)1 + (A)3 * (A){_C} * v * v);       // du/dx
        A dphi = (A)0.5 * ((A)1 + t) + (A)0.5 * v * ((A)1 - t * t) * du;
        dx[i] = store<T>(dphi * load(dy[i]));
    }}
}}
"""
_gelu_kernel = row_module(_GELU_SOURCE, ["gelu_tanh_forward_elems", "gelu_tanh_backward_elems"])


_gelu_exact_forward = elementwise("T x", "T y", f"""
    typedef acc_t<T>::type A;
    A v = (A)x;
    y = (T)((A)0.5 * v * ((A)1 + erf_acc(v * (A){repr(1 / math.sqrt(2.0))})));   // x Phi(x)
""", "minilm_gelu_exact_forward")

_gelu_exact_backward = elementwise("T x, T dy", "T dx", f"""
    typedef acc_t<T>::type A;
    A v = (A)x;
    A Phi = (A)0.5 * ((A)1 + erf_acc(v * (A){repr(1 / math.sqrt(2.0))}));
    A pdf = exp_acc((A)-0.5 * v * v) * (A){repr(1 / math.sqrt(2.0 * math.pi))};
    dx = (T)((Phi + v * pdf) * (A)dy);                         // (Phi + x phi) dy
""", "minilm_gelu_exact_backward")


def gelu_forward(x, *, approximate="tanh"):
    """CuPy ``minilm.reference.activations.gelu_forward``."""
    check_gelu_args(x, approximate)
    if not supported(x):
        return reference.gelu_forward(x, approximate=approximate)
    if approximate != "tanh":
        return _gelu_exact_forward(x), GeluCache(x, approximate)
    x = contiguous(x)
    y = cupy.empty(x.shape, dtype=x.dtype)
    launch_elems(_gelu_kernel("gelu_tanh_forward_elems", x.dtype), x.size, (x, y))
    return y, GeluCache(x, approximate)


def gelu_backward(dy, cache):
    """CuPy ``minilm.reference.activations.gelu_backward``. Returns (dx,)."""
    x, approximate = cache.x, cache.approximate
    require_gradient("gelu_backward", "dy", dy, x.shape, "(same as x)")
    if not supported(x, dy) or dy.dtype != x.dtype:
        return reference.gelu_backward(dy, cache)
    if approximate != "tanh":
        return (_gelu_exact_backward(x, dy),)
    x, dy = contiguous(x), contiguous(dy)
    dx = cupy.empty(x.shape, dtype=x.dtype)
    launch_elems(_gelu_kernel("gelu_tanh_backward_elems", x.dtype), x.size, (x, dy, dx))
    return (dx,)


_SOURCE = r"""
template <typename T>
__global__ void softmax_forward_rows(const T* x, T* y, int N, int V) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* xr = x + (long long)row * V;
    T* yr = y + (long long)row * V;
    A m = neg_inf<A>();
    for (int j = lane; j < V; j += 32) m = max(m, load(xr[j]));
    m = warp_max(m);
    A Z = 0;
    for (int j = lane; j < V; j += 32) Z += exp_acc(load(xr[j]) - m);     // every exponent <= 0
    Z = warp_sum(Z);
    for (int j = lane; j < V; j += 32) yr[j] = store<T>(exp_acc(load(xr[j]) - m) / Z);
}

template <typename T>
__global__ void softmax_backward_rows(const T* dy, const T* y, T* dx, int N, int V) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* dyr = dy + (long long)row * V;
    const T* yr = y + (long long)row * V;
    T* dxr = dx + (long long)row * V;
    A s = 0;
    for (int j = lane; j < V; j += 32) s += load(dyr[j]) * load(yr[j]);
    s = warp_sum(s);                                                         // sum_j dy_j y_j
    for (int j = lane; j < V; j += 32) dxr[j] = store<T>(load(yr[j]) * (load(dyr[j]) - s));
}
"""

_kernel = row_module(_SOURCE, ["softmax_forward_rows", "softmax_backward_rows"])


def softmax_forward(x):
    """CuPy ``minilm.reference.activations.softmax_forward``, over the last axis."""
    check_softmax_args(x)
    if not supported(x):
        return reference.softmax_forward(x)
    V = x.shape[-1]
    N = x.size // V
    y = cupy.empty(x.shape, dtype=x.dtype)
    launch_rows(_kernel("softmax_forward_rows", x.dtype), N, (contiguous(x), y, cupy.int32(N), cupy.int32(V)))
    return y, SoftmaxCache(y)


def softmax_backward(dy, cache):
    """CuPy ``minilm.reference.activations.softmax_backward``. Returns (dx,)."""
    y = cache.y
    require_gradient("softmax_backward", "dy", dy, y.shape, "(same as x)")
    if not supported(dy, y) or dy.dtype != y.dtype or y.shape[-1] == 0:
        return reference.softmax_backward(dy, cache)
    V = y.shape[-1]
    N = y.size // V
    dx = cupy.empty(y.shape, dtype=y.dtype)
    launch_rows(_kernel("softmax_backward_rows", y.dtype), N,
                (contiguous(dy), contiguous(y), dx, cupy.int32(N), cupy.int32(V)))
    return (dx,)
