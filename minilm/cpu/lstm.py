r"""Numba kernels for the LSTM's gate arithmetic, forward and back through time.

Each public function here equals the function of the same name in ``minilm.reference.lstm``,
whose module docstring states the math and derives the backward; ``tests/test_cpu_recurrent.py``
holds them to it. The split between BLAS products and per-step kernels, and the exp-based σ and
tanh the kernels use, are described in ``minilm.cpu.rnn``.

Per step t, forward: numpy makes :math:`h_{t-1} W_h` (B, 4H); one kernel pass over the (B, H)
units adds :math:`x_t W_x + b`, applies the gates, and writes i, f, g, o, :math:`c_t`,
:math:`\tanh c_t`, :math:`h_t` into the cache. Backward: one kernel pass turns
:math:`\bar h_t^{\,\text{out}}`, the carried :math:`\bar h_t^{\,\text{next}}, \bar c_t^{\,\text{next}}`
and the cached gates into :math:`\bar a_t` (B, 4H) and :math:`\bar c_{t-1}^{\,\text{next}}`; numpy
makes :math:`\bar h_{t-1}^{\,\text{next}} = \bar a_t W_h^\top`.
"""
import numpy as np

from minilm.cpu.rnn import (KERNEL_DTYPES, add, add3, copy, input_and_weight_gradients,
                            input_products, kernel_dtype, sigmoid_into, state_buffer, step_kernel, tanh, tanh_into)
from minilm.reference import lstm as reference
from minilm.reference.lstm import check_lstm_args
from minilm.reference.lstm import LSTMCache
from minilm.reference.rnn import check_backward_args
from minilm.validate import require_cache

__all__ = ["lstm_forward", "lstm_backward"]


@step_kernel
def _lstm_step_forward(xW_x, b, a_h, t, c0, h_state, gates, c, tanh_c, h):
    """Step t of ``reference.lstm_forward``'s loop, after its product a_h = h_{t-1} W_h (B, 4H).

    xW_x (B, T, 4H) holds every x_t W_x; writes gates[:, t], c[:, t], tanh_c[:, t], h[:, t], and h_t
    into the state buffer h_state (B, H); c_{t-1} is c[:, t-1], or c0 at t = 0.
    """
    H = h_state.shape[1]
    for k in range(h_state.shape[0]):
        a = gates[k, t]                                                        # (4H,) a_t, then the gates in place
        c_prev, c_t, tanh_c_t, h_t = c[k, t - 1] if t > 0 else c0[k], c[k, t], tanh_c[k, t], h[k, t]   # (H,) each
        add3(xW_x[k, t], b, a_h[k], a)                                         # a = x_t W_x + b + h_{t-1} W_h
        sigmoid_into(a[:2 * H])                                                # i = σ(a_i), f = σ(a_f)
        tanh_into(a[2 * H:3 * H])                                              # g = tanh(a_g)
        sigmoid_into(a[3 * H:])                                                # o = σ(a_o)
        i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
        for j in range(H):
            c_t[j] = f[j] * c_prev[j] + i[j] * g[j]                            # c_t = f * c_prev + i * g
        for j in range(H):
            tanh_c_t[j] = tanh(c_t[j])
        for j in range(H):
            h_t[j] = o[j] * tanh_c_t[j]                                        # h_t = o * tanh(c_t)
        copy(h_t, h_state[k])


@step_kernel
def _lstm_step_backward(dh, dh_next, dc_next, gates, c, c0, tanh_c, t, da):
    """Step t of ``reference.lstm_backward``'s loop, before its product da_t W_h^T.

    dh_next (B, H) is what step t+1 sends back to h_t (overwritten with dh_t); dc_next (B, H)
    holds what it sends to c_t and is overwritten with what step t sends to c_{t-1}; writes
    da_t (B, 4H) into da[:, t].
    """
    one = gates.dtype.type(1)
    H = dh_next.shape[1]
    for k in range(dh_next.shape[0]):
        dh_t, dc_t, tanh_c_t = dh_next[k], dc_next[k], tanh_c[k, t]           # (H,) each
        c_prev = c[k, t - 1] if t > 0 else c0[k]                               # (H,)
        i, f, g, o = gates[k, t, :H], gates[k, t, H:2 * H], gates[k, t, 2 * H:3 * H], gates[k, t, 3 * H:]
        da_i, da_f, da_g, da_o = da[k, t, :H], da[k, t, H:2 * H], da[k, t, 2 * H:3 * H], da[k, t, 3 * H:]
        add(dh[k, t], dh_t, dh_t)                                              # h_t feeds the output and step t+1
        for j in range(H):                                                     # h_t = o * tanh(c_t); o = σ(a_o)
            da_o[j] = dh_t[j] * tanh_c_t[j] * o[j] * (one - o[j])
        for j in range(H):                                                     # same line; c_t also feeds step t+1
            dc_t[j] = dc_t[j] + dh_t[j] * o[j] * (one - tanh_c_t[j] * tanh_c_t[j])
        for j in range(H):                                                     # c_t = f * c_prev + i * g; i = σ(a_i)
            da_i[j] = dc_t[j] * g[j] * i[j] * (one - i[j])
        for j in range(H):                                                     # same line; g = tanh(a_g)
            da_g[j] = dc_t[j] * i[j] * (one - g[j] * g[j])
        for j in range(H):                                                     # same line; f = σ(a_f)
            da_f[j] = dc_t[j] * c_prev[j] * f[j] * (one - f[j])
        for j in range(H):                                                     # same line, the c_prev term
            dc_t[j] = dc_t[j] * f[j]


def lstm_forward(x, h0, c0, W_x, W_h, b):
    """Equals ``minilm.reference.lstm.lstm_forward``: the LSTM over the whole sequence, gates [i | f | g | o].

    Parameters, returns and errors are the reference's; any strides are accepted.
    """
    B, T, D, H = check_lstm_args(x, h0, c0, W_x, W_h, b)
    if x.dtype not in KERNEL_DTYPES:
        return reference.lstm_forward(x, h0, c0, W_x, W_h, b)

    xW_x = input_products(x, W_x)                              # (B, T, 4H) x_t W_x, all t at once
    # (H, 4H), (4H,) read by every step, in x's dtype: the same, checked, but perhaps in the other byte order
    W_h_c, b_c = np.ascontiguousarray(W_h, dtype=x.dtype), np.ascontiguousarray(b, dtype=x.dtype)
    gates = np.empty((B, T, 4 * H), dtype=x.dtype)             # (B, T, 4H)
    c = np.empty((B, T, H), dtype=x.dtype)                     # (B, T, H)
    tanh_c = np.empty_like(c)                                  # (B, T, H)
    h = np.empty_like(c)                                       # (B, T, H)
    h_state = state_buffer(h0, B, H, x.dtype)                  # (B, H) h_{t-1}, then h_t
    c0_c = np.ascontiguousarray(c0, dtype=x.dtype)             # (B, H)
    a_h = np.empty((B, 4 * H), dtype=x.dtype)                  # (B, 4H) h_{t-1} W_h
    for t in range(T):
        np.matmul(h_state, W_h_c, out=a_h)
        _lstm_step_forward(xW_x, b_c, a_h, t, c0_c, h_state, gates, c, tanh_c, h)
    return h, LSTMCache(x, h0, c0, W_x, W_h, gates, c, tanh_c, h)


def lstm_backward(dh, cache, *, dh_T=None, dc_T=None):
    """Equals ``minilm.reference.lstm.lstm_backward``. Returns (dx, dh0, dc0, dW_x, dW_h, db)."""
    require_cache("lstm_backward", cache, "LSTMCache")
    x, h0, c0, W_x, W_h, gates, c, tanh_c, h = cache
    B, T, H = check_backward_args("lstm_backward", dh, h, dh_T=dh_T, dc_T=dc_T)
    dtype = kernel_dtype(dh, dh_T, dc_T, h)
    if dtype is None:
        return reference.lstm_backward(dh, cache, dh_T=dh_T, dc_T=dc_T)

    dh, gates, c, c0_c, tanh_c = (np.ascontiguousarray(a, dtype=dtype) for a in (dh, gates, c, c0, tanh_c))
    W_h_T = np.ascontiguousarray(W_h).T                        # (4H, H)
    da = np.empty((B, T, 4 * H), dtype=dtype)                  # (B, T, 4H) gradient of every a_t
    dh_next = state_buffer(dh_T, B, H, dtype)                  # (B, H) what step t+1 sends to h_t
    dc_next = state_buffer(dc_T, B, H, dtype)                  # (B, H) what step t+1 sends to c_t
    for t in reversed(range(T)):
        _lstm_step_backward(dh, dh_next, dc_next, gates, c, c0_c, tanh_c, t, da)
        np.matmul(da[:, t], W_h_T, out=dh_next)                # a_t = ... + h_{t-1} W_h
    dh0, dc0 = dh_next, dc_next

    dx, dW_x, dW_h = input_and_weight_gradients(x, h0, h, W_x, da, da)
    db = np.sum(da.reshape(B * T, 4 * H), axis=0)              # (4H,)
    return dx, dh0, dc0, dW_x, dW_h, db
