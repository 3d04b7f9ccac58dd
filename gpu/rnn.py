r"""The tanh RNN's steps as CuPy elementwise kernels, forward and back through time.

Each public function here equals the function of the same name in ``minilm.reference.rnn``,
whose module docstring states the math and derives the backward, and returns its ``RNNCache``;
``tests/test_gpu_recurrent.py`` holds them to it. The same split serves ``minilm.gpu.lstm`` and
``minilm.gpu.gru``:

* the matrix products stay in CuPy (cuBLAS): :math:`x_t W_x + b` for every t at once before the
  loop, :math:`h_{t-1} W_h` (forward) and :math:`\bar a_t W_h^\top` (backward) once per step,
  and the weight gradients as big products after the loop, each written as the reference writes
  it;
* the elementwise arithmetic of one step, which the reference spreads over several array
  expressions, is one ``ElementwiseKernel`` launch over the (B, H) units. Its arguments are the
  (B, H) slices ``[:, t]`` of the (B, T, H) arrays, which CuPy indexes with their strides.

Per step t, forward: one kernel adds :math:`x_t W_x + b` and :math:`h_{t-1} W_h` and writes
:math:`h_t = \tanh a_t` into ``h[:, t]``. Backward: one kernel adds the output's
:math:`\bar h_t^{\,\text{out}}` and the carried :math:`\bar h_t^{\,\text{next}}` and writes
:math:`\bar a_t = (1 - h_t^2)\,\bar h_t` into ``da[:, t]``.

Every kernel computes in ``acc_t<T>::type`` (float64 for float64 data, float32 for float32,
float16 and bfloat16) and rounds once when it stores. Arrays that are not CuPy arrays of one of
those dtypes run the reference functions.
"""
import cupy

from minilm.gpu._core import acc_dtype, elementwise, supported
from minilm.reference import rnn as reference
from minilm.reference.rnn import RNNCache, check_backward_args, check_rnn_args, input_and_weight_gradients

__all__ = ["rnn_forward", "rnn_backward"]


_rnn_step_forward = elementwise(
    "T a_x, T a_h", "T h",
    r"""
    typedef acc_t<T>::type A;
    h = (T)tanh_acc((A)a_x + (A)a_h);                // h_t = tanh((x_t W_x + b) + h_{t-1} W_h)
    """,
    "minilm_rnn_step_forward")

_rnn_step_backward = elementwise(
    "T dh, T dh_next, T h", "T da",
    r"""
    typedef acc_t<T>::type A;
    A dh_t = (A)dh + (A)dh_next;                     // h_t feeds the output and step t+1
    A h_t = (A)h;
    da = (T)((1 - h_t * h_t) * dh_t);                // h_t = tanh(a_t)
    """,
    "minilm_rnn_step_backward")


# --- shared by rnn, lstm and gru --------------------------------------------------------------

def one_dtype(*arrays):
    """The one dtype of ``arrays`` (None entries skipped) if they are all CuPy arrays the kernels
    compile for, else None (then the caller runs the reference)."""
    arrays = [a for a in arrays if a is not None]
    if not supported(*arrays) or len({a.dtype for a in arrays}) != 1:
        return None
    return arrays[0].dtype


def input_products(x, W_x, b):
    """x_t W_x + b for every t at once, the reference's line before its loop: (B, T, G·H)."""
    B, T, D = x.shape
    return (x.reshape(B * T, D) @ W_x + b).reshape(B, T, W_x.shape[1])   # (B, T, G·H)


def state_buffer(s, B, H, dtype):
    """A fresh (B, H) copy of ``s``, or zeros when ``s`` is None: a carried gradient the kernels
    overwrite, so a caller's array is never written."""
    return cupy.zeros((B, H), dtype=dtype) if s is None else cupy.array(s, dtype=dtype, order="C")


def bias_gradient(da):
    """Σ over t and the batch of da (B, T, G·H): (G·H,), added up in the compute dtype."""
    acc = acc_dtype(da.dtype)
    return cupy.sum(da.reshape(-1, da.shape[2]), axis=0, dtype=acc).astype(da.dtype)


# --- the tanh RNN -----------------------------------------------------------------------------

def rnn_forward(x, h0, W_x, W_h, b):
    """Equals ``minilm.reference.rnn.rnn_forward``: h_t = tanh(x_t W_x + h_{t-1} W_h + b).

    Parameters, returns and errors are the reference's; any strides are accepted.
    """
    B, T, D, H = check_rnn_args(x, h0, W_x, W_h, b)
    if one_dtype(x, h0, W_x, W_h, b) is None:
        return reference.rnn_forward(x, h0, W_x, W_h, b)

    a_x = input_products(x, W_x, b)                            # (B, T, H) x_t W_x + b, all t at once
    h = cupy.empty((B, T, H), dtype=x.dtype)                   # (B, T, H)
    h_prev = h0
    for t in range(T):
        _rnn_step_forward(a_x[:, t], h_prev @ W_h, h[:, t])    # (B, H) h_t = tanh(a_t)
        h_prev = h[:, t]
    return h, RNNCache(x, h0, W_x, W_h, h)


def rnn_backward(dh, cache, *, dh_T=None):
    """Equals ``minilm.reference.rnn.rnn_backward``. Returns (dx, dh0, dW_x, dW_h, db)."""
    x, h0, W_x, W_h, h = cache
    B, T, H = check_backward_args("rnn_backward", dh, h, dh_T=dh_T)
    dtype = one_dtype(dh, dh_T, h)
    if dtype is None:
        return reference.rnn_backward(dh, cache, dh_T=dh_T)

    da = cupy.empty((B, T, H), dtype=dtype)                    # (B, T, H) gradient of every a_t
    dh_next = cupy.zeros((B, H), dtype=dtype) if dh_T is None else dh_T   # (B, H) step t+1's to h_t (read only)
    for t in reversed(range(T)):
        _rnn_step_backward(dh[:, t], dh_next, h[:, t], da[:, t])
        dh_next = da[:, t] @ W_h.T                             # a_t = ... + h_{t-1} W_h
    dh0 = dh_next

    dx, dW_x, dW_h = input_and_weight_gradients(x, h0, h, W_x, da, da)
    db = bias_gradient(da)                                     # (H,)
    return dx, dh0, dW_x, dW_h, db
