r"""The LSTM's gate arithmetic as CuPy elementwise kernels, forward and back through time.

Each public function here equals the function of the same name in ``minilm.reference.lstm``,
whose module docstring states the math and derives the backward, and returns its ``LSTMCache``;
``tests/test_gpu_recurrent.py`` holds them to it. The split between cuBLAS products and one
kernel per step is described in ``minilm.gpu.rnn``.

Per step t, forward: CuPy makes :math:`h_{t-1} W_h` (B, 4H); one kernel over the (B, H) units
adds :math:`x_t W_x + b`, applies the gates, and writes i, f, g, o into ``gates[:, t]`` and
:math:`c_t`, :math:`\tanh c_t`, :math:`h_t` into ``c[:, t]``, ``tanh_c[:, t]``, ``h[:, t]``.
Backward: one kernel turns :math:`\bar h_t^{\,\text{out}}`, the carried
:math:`\bar h_t^{\,\text{next}}` and :math:`\bar c_t^{\,\text{next}}` and the cached gates into
:math:`\bar a_t` (written into ``da[:, t]``, B × 4H) and :math:`\bar c_{t-1}^{\,\text{next}}`
(overwriting the carried cell gradient); CuPy makes
:math:`\bar h_{t-1}^{\,\text{next}} = \bar a_t W_h^\top`.

The (B, 4H) arrays are ``raw`` arguments: the thread of unit j of row k reads and writes entry
``k·4H + g·H + j`` of block g = 0, 1, 2, 3 (i, f, g, o), an index CuPy maps through the
array's strides.
"""
import cupy

from minilm.gpu._core import elementwise
from minilm.gpu.rnn import bias_gradient, input_and_weight_gradients, input_products, one_dtype, state_buffer
from minilm.reference import lstm as reference
from minilm.reference.lstm import check_lstm_args
from minilm.reference.lstm import LSTMCache
from minilm.reference.rnn import check_backward_args

__all__ = ["lstm_forward", "lstm_backward"]


# ``i`` is CuPy's loop index over the (B, H) units, so the gates are i_t, f_t, g_t, o_t here;
# ``e`` is the entry of unit j of row k in block i of a (B, 4H) array.
_lstm_step_forward = elementwise(
    "raw T a_x, raw T a_h, T c_prev, int32 H", "raw T gates, T c, T tanh_c, T h",
    r"""
    typedef acc_t<T>::type A;
    const ptrdiff_t k = i / H, j = i % H, e = k * 4 * H + j;
    A i_t = sigmoid_acc((A)a_x[e] + (A)a_h[e]);                       // i = σ(a_i), a = (x_t W_x + b) + h_{t-1} W_h
    A f_t = sigmoid_acc((A)a_x[e + H] + (A)a_h[e + H]);               // f = σ(a_f)
    A g_t = tanh_acc((A)a_x[e + 2 * H] + (A)a_h[e + 2 * H]);          // g = tanh(a_g)
    A o_t = sigmoid_acc((A)a_x[e + 3 * H] + (A)a_h[e + 3 * H]);       // o = σ(a_o)
    A c_t = f_t * (A)c_prev + i_t * g_t;                              // c_t = f * c_prev + i * g
    A tanh_c_t = tanh_acc(c_t);
    gates[e] = (T)i_t;
    gates[e + H] = (T)f_t;
    gates[e + 2 * H] = (T)g_t;
    gates[e + 3 * H] = (T)o_t;
    c = (T)c_t;
    tanh_c = (T)tanh_c_t;
    h = (T)(o_t * tanh_c_t);                                          // h_t = o * tanh(c_t)
    """,
    "minilm_lstm_step_forward")

# dc holds what step t+1 sends back to c_t, and is overwritten with what step t sends to c_{t-1}.
_lstm_step_backward = elementwise(
    "T dh, T dh_next, raw T gates, T c_prev, T tanh_c, int32 H", "raw T da, T dc",
    r"""
    typedef acc_t<T>::type A;
    const ptrdiff_t k = i / H, j = i % H, e = k * 4 * H + j;
    A i_t = (A)gates[e], f_t = (A)gates[e + H], g_t = (A)gates[e + 2 * H], o_t = (A)gates[e + 3 * H];
    A tanh_c_t = (A)tanh_c;
    A dh_t = (A)dh + (A)dh_next;                                      // h_t feeds the output and step t+1
    A dc_t = (A)dc + dh_t * o_t * (1 - tanh_c_t * tanh_c_t);          // h_t = o * tanh(c_t); c_t also feeds step t+1
    da[e] = (T)(dc_t * g_t * i_t * (1 - i_t));                        // c_t = f * c_prev + i * g; i = σ(a_i)
    da[e + H] = (T)(dc_t * (A)c_prev * f_t * (1 - f_t));              // same line; f = σ(a_f)
    da[e + 2 * H] = (T)(dc_t * i_t * (1 - g_t * g_t));                // same line; g = tanh(a_g)
    da[e + 3 * H] = (T)(dh_t * tanh_c_t * o_t * (1 - o_t));           // h_t = o * tanh(c_t); o = σ(a_o)
    dc = (T)(dc_t * f_t);                                             // c_t = f * c_prev + ..., the c_prev term
    """,
    "minilm_lstm_step_backward")


def lstm_forward(x, h0, c0, W_x, W_h, b):
    """Equals ``minilm.reference.lstm.lstm_forward``: the LSTM over the whole sequence, gates [i | f | g | o].

    Parameters, returns and errors are the reference's; any strides are accepted.
    """
    B, T, D, H = check_lstm_args(x, h0, c0, W_x, W_h, b)
    if one_dtype(x, h0, c0, W_x, W_h, b) is None:
        return reference.lstm_forward(x, h0, c0, W_x, W_h, b)

    a_x = input_products(x, W_x, b)                            # (B, T, 4H) x_t W_x + b, all t at once
    gates = cupy.empty((B, T, 4 * H), dtype=x.dtype)           # (B, T, 4H)
    c = cupy.empty((B, T, H), dtype=x.dtype)                   # (B, T, H)
    tanh_c = cupy.empty_like(c)                                # (B, T, H)
    h = cupy.empty_like(c)                                     # (B, T, H)
    h_prev, c_prev = h0, c0
    for t in range(T):
        _lstm_step_forward(a_x[:, t], h_prev @ W_h, c_prev, H,  # h_{t-1} W_h: (B, 4H)
                           gates[:, t], c[:, t], tanh_c[:, t], h[:, t])
        h_prev, c_prev = h[:, t], c[:, t]
    return h, LSTMCache(x, h0, c0, W_x, W_h, gates, c, tanh_c, h)


def lstm_backward(dh, cache, *, dh_T=None, dc_T=None):
    """Equals ``minilm.reference.lstm.lstm_backward``. Returns (dx, dh0, dc0, dW_x, dW_h, db)."""
    x, h0, c0, W_x, W_h, gates, c, tanh_c, h = cache
    B, T, H = check_backward_args("lstm_backward", dh, h, dh_T=dh_T, dc_T=dc_T)
    dtype = one_dtype(dh, dh_T, dc_T, h, gates, c, tanh_c, c0)
    if dtype is None:
        return reference.lstm_backward(dh, cache, dh_T=dh_T, dc_T=dc_T)

    da = cupy.empty((B, T, 4 * H), dtype=dtype)                # (B, T, 4H) gradient of every a_t
    dh_next = cupy.zeros((B, H), dtype=dtype) if dh_T is None else dh_T   # (B, H) step t+1's to h_t (read only)
    dc_next = state_buffer(dc_T, B, H, dtype)                  # (B, H) what step t+1 sends to c_t (overwritten)
    for t in reversed(range(T)):
        c_prev = c[:, t - 1] if t > 0 else c0
        _lstm_step_backward(dh[:, t], dh_next, gates[:, t], c_prev, tanh_c[:, t], H, da[:, t], dc_next)
        dh_next = da[:, t] @ W_h.T                             # a_t = ... + h_{t-1} W_h
    dh0, dc0 = dh_next, dc_next

    dx, dW_x, dW_h = input_and_weight_gradients(x, h0, h, W_x, da, da)
    db = bias_gradient(da)                                     # (4H,)
    return dx, dh0, dc0, dW_x, dW_h, db
