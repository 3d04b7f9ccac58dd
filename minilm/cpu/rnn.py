r"""Numba kernels for the tanh RNN, and the pieces the LSTM and GRU kernels share.

Each public function here equals the function of the same name in ``minilm.reference.rnn``,
whose module docstring states the math and derives the backward through time;
``tests/test_cpu_recurrent.py`` holds them to it. ``lstm.py`` and ``gru.py`` beside this file do
the same for ``minilm.reference.lstm`` and ``minilm.reference.gru``.

How the work is split, in all three cells:

* the matrix products stay in BLAS (numpy's ``@``): :math:`x_t W_x` for every t in one (B·T, D)
  product before the loop, the per-step :math:`h_{t-1} W_h` (forward) and
  :math:`\bar a_t W_h^\top` (backward), and the big gradient products after the backward loop;
* one kernel per step (``_rnn_step_forward`` and ``_rnn_step_backward`` here, ``_lstm_step_*``
  and ``_gru_step_*`` beside it, all compiled by ``step_kernel``) does every elementwise line of
  that step: the forward kernel adds the bias and the two products (in the reference's order)
  and turns the sum into the gates, the new state(s) and the cache entries; the backward kernel
  turns dh, the gradients carried from step t+1 and the cached gates into every pre-activation
  gradient and the gradients carried to step t-1.

The forward's per-step product reads a small contiguous (B, H) buffer that the kernel fills (the
state). The backward's reads the step's gate gradients where the kernel wrote them, the slice
da[:, t] of the (B, T, G·H) array: BLAS takes its row stride as it is, as fast as a contiguous
copy at these shapes, so no copy is made.

A kernel walks the B rows and, within a row, runs one loop per line of the reference's step over
the H units (or G·H gate entries), each loop touching few arrays, so that the compiler turns
every loop into vector instructions (with more arrays it would have to prove that none overlap,
and gives up).

Threads: a kernel sits between two BLAS calls, 64 times per sequence of the presets, and does
~0.1 ms of work. Splitting its rows over Numba's pool would cost more than it saves: with the
"workqueue" threading layer that ``minilm.backend`` chooses, each parallel loop takes ~75 µs to
launch (a one-off measurement). So the kernels run in the calling thread, and the cores go to BLAS
for the products, which are most of the time (the numba backend's rule for every op,
``minilm.backend``).

The kernels add and multiply in the order the reference does, a product and the sum it feeds
possibly fused into one instruction (``FUSED_MULTIPLY_ADD`` in ``minilm.cpu._parallel``), so they
differ from it by rounding alone. So do σ and tanh, which come from ``minilm.cpu._math``, in plain
arithmetic that vectorises, where a call into libm would not. Numba has no float16 arithmetic,
so other float dtypes run the reference functions.
"""
import numpy as np
from minilm.cpu._jit import jit
from minilm.cpu._math import sigmoid, tanh
from minilm.cpu._parallel import FUSED_MULTIPLY_ADD
from minilm.reference import rnn as reference
from minilm.reference.rnn import RNNCache, check_backward_args, check_rnn_args, input_and_weight_gradients
from minilm.validate import require_cache

__all__ = ["rnn_forward", "rnn_backward"]

KERNEL_DTYPES = (np.float32, np.float64)     # the kernels' dtypes; others run the reference
# how every step kernel and helper below (and in lstm.py, gru.py) is compiled
step_kernel = jit(error_model="numpy", fastmath=set(FUSED_MULTIPLY_ADD))


# σ and tanh: ``minilm.cpu._math`` (imported above, and used by the kernels below).


# --- shared by rnn, lstm and gru --------------------------------------------------------------

@step_kernel
def sigmoid_into(a):
    """a = σ(a) in place, for a 1-D array."""
    for j in range(a.shape[0]):
        a[j] = sigmoid(a[j])


@step_kernel
def tanh_into(a):
    """a = tanh(a) in place, for a 1-D array."""
    for j in range(a.shape[0]):
        a[j] = tanh(a[j])


@step_kernel
def add(a, b, out):
    """out = a + b, for 1-D arrays; ``out`` may be ``a`` or ``b``."""
    for j in range(out.shape[0]):
        out[j] = a[j] + b[j]


@step_kernel
def add3(a, b, c, out):
    """out = (a + b) + c, for 1-D arrays: a_t = (x_t W_x + b) + h_{t-1} W_h in the reference's order."""
    for j in range(out.shape[0]):
        out[j] = (a[j] + b[j]) + c[j]


@step_kernel
def copy(src, dst):
    """dst = src, for 1-D arrays (a loop of vector moves, faster in a kernel than a slice assignment)."""
    for j in range(dst.shape[0]):
        dst[j] = src[j]


def kernel_dtype(*arrays):
    """The one dtype of ``arrays`` (None entries skipped) if the kernels compile for it, else None."""
    dtypes = {a.dtype for a in arrays if a is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype in KERNEL_DTYPES else None


def input_products(x, W_x):
    """x_t W_x for every t at once, the product of the reference's line before its loop: (B, T, G·H).

    The kernels add the bias as that line does, (x_t W_x + b) + h_{t-1} W_h, in the same pass as
    the rest of the step (one pass fewer over this large array).
    """
    B, T, D = x.shape
    return (x.reshape(B * T, D) @ W_x).reshape(B, T, W_x.shape[1])  # (B, T, G·H)


def state_buffer(s, B, H, dtype):
    """A fresh contiguous (B, H) copy of ``s`` in ``dtype``, or zeros when ``s`` is None."""
    return np.zeros((B, H), dtype=dtype) if s is None else np.array(s, dtype=dtype, order="C")


# --- the tanh RNN -----------------------------------------------------------------------------

@step_kernel
def _rnn_step_forward(xW_x, b, a_h, t, h_state, h):
    """Step t of ``reference.rnn_forward``'s loop, after its product a_h = h_{t-1} W_h (B, H).

    xW_x (B, T, H) holds every x_t W_x; writes h_t into h[:, t] and into the state buffer h_state (B, H).
    """
    for k in range(h_state.shape[0]):
        h_t = h[k, t]                                              # (H,)
        add3(xW_x[k, t], b, a_h[k], h_t)                           # a_t = x_t W_x + b + h_{t-1} W_h
        tanh_into(h_t)                                             # h_t = tanh(a_t)
        copy(h_t, h_state[k])


@step_kernel
def _rnn_step_backward(dh, dh_next, h, t, da):
    """Step t of ``reference.rnn_backward``'s loop, before its product da_t W_h^T.

    dh_next (B, H) is what step t+1 sends back to h_t (overwritten with dh_t); writes da_t into
    da[:, t] (B, T, H).
    """
    one = h.dtype.type(1)
    for k in range(dh_next.shape[0]):
        dh_t, h_t, da_t_k = dh_next[k], h[k, t], da[k, t]          # (H,) each
        add(dh[k, t], dh_t, dh_t)                                  # h_t feeds the output and step t+1
        for j in range(h_t.shape[0]):
            da_t_k[j] = (one - h_t[j] * h_t[j]) * dh_t[j]          # h_t = tanh(a_t)


def rnn_forward(x, h0, W_x, W_h, b):
    """Equals ``minilm.reference.rnn.rnn_forward``: h_t = tanh(x_t W_x + h_{t-1} W_h + b).

    Parameters, returns and errors are the reference's; any strides are accepted.
    """
    B, T, D, H = check_rnn_args(x, h0, W_x, W_h, b)
    if x.dtype not in KERNEL_DTYPES:
        return reference.rnn_forward(x, h0, W_x, W_h, b)

    xW_x = input_products(x, W_x)                              # (B, T, H) x_t W_x, all t at once
    # (H, H), (H,) read by every step, in x's dtype: the same, checked, but perhaps in the other byte order
    W_h_c, b_c = np.ascontiguousarray(W_h, dtype=x.dtype), np.ascontiguousarray(b, dtype=x.dtype)
    h = np.empty((B, T, H), dtype=x.dtype)                     # (B, T, H)
    h_state = state_buffer(h0, B, H, x.dtype)                  # (B, H) h_{t-1}, then h_t
    a_h = np.empty((B, H), dtype=x.dtype)                      # (B, H) h_{t-1} W_h
    for t in range(T):
        np.matmul(h_state, W_h_c, out=a_h)
        _rnn_step_forward(xW_x, b_c, a_h, t, h_state, h)
    return h, RNNCache(x, h0, W_x, W_h, h)


def rnn_backward(dh, cache, *, dh_T=None):
    """Equals ``minilm.reference.rnn.rnn_backward``. Returns (dx, dh0, dW_x, dW_h, db)."""
    require_cache("rnn_backward", cache, "RNNCache")
    x, h0, W_x, W_h, h = cache
    B, T, H = check_backward_args("rnn_backward", dh, h, dh_T=dh_T)
    dtype = kernel_dtype(dh, dh_T, h)
    if dtype is None:
        return reference.rnn_backward(dh, cache, dh_T=dh_T)

    dh = np.ascontiguousarray(dh)                              # (B, T, H)
    h = np.ascontiguousarray(h)                                # (B, T, H)
    W_h_T = np.ascontiguousarray(W_h).T                        # (H, H)
    da = np.empty((B, T, H), dtype=dtype)                      # (B, T, H) gradient of every a_t
    dh_next = state_buffer(dh_T, B, H, dtype)                  # (B, H) what step t+1 sends to h_t
    for t in reversed(range(T)):
        _rnn_step_backward(dh, dh_next, h, t, da)
        np.matmul(da[:, t], W_h_T, out=dh_next)                # a_t = ... + h_{t-1} W_h
    dh0 = dh_next

    dx, dW_x, dW_h = input_and_weight_gradients(x, h0, h, W_x, da, da)
    db = np.sum(da.reshape(B * T, H), axis=0)                  # (H,)
    return dx, dh0, dW_x, dW_h, db
