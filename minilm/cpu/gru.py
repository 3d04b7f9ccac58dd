r"""Numba kernels for the GRU's gate arithmetic, forward and back through time.

Each public function here equals the function of the same name in ``minilm.reference.gru``,
whose module docstring states the math (PyTorch's equations) and derives the backward;
``tests/test_cpu_recurrent.py`` holds them to it. The split between BLAS products and per-step
kernels, and the exp-based σ and tanh the kernels use, are described in ``minilm.cpu.rnn``.

Per step t, forward: numpy makes :math:`h_{t-1} W_h` (B, 3H); one kernel pass over the (B, H)
units adds :math:`b_h` and :math:`x_t W_x + b_x`, applies the gates, and writes r, z, n,
:math:`a^h_n` and :math:`h_t` into the cache. Backward: the gradient sent back to
:math:`h_{t-1}` has two parts, :math:`\bar h_t \odot z` and :math:`\bar a^h_t W_h^\top`; one kernel
pass adds the two parts left by step t+1 into :math:`\bar h_t`, writes :math:`\bar a^x_t`,
:math:`\bar a^h_t` and this step's first part, and numpy makes the second.
"""
import numpy as np

from minilm.cpu.rnn import (KERNEL_DTYPES, add, add3, copy, input_and_weight_gradients,
                            input_products, kernel_dtype, sigmoid_into, state_buffer, step_kernel, tanh_into)
from minilm.reference import gru as reference
from minilm.reference.gru import check_gru_args
from minilm.reference.gru import GRUCache
from minilm.reference.rnn import check_backward_args
from minilm.validate import require_cache

__all__ = ["gru_forward", "gru_backward"]


@step_kernel
def _gru_step_forward(xW_x, b_x, hW_h, b_h, t, h0, h_state, gates, a_hn, h):
    """Step t of ``reference.gru_forward``'s loop, after its product hW_h = h_{t-1} W_h (B, 3H).

    xW_x (B, T, 3H) holds every x_t W_x; hW_h is overwritten with a_h = h_{t-1} W_h + b_h; writes
    gates[:, t], a_hn[:, t], h[:, t], and h_t into the state buffer h_state (B, H); h_{t-1} is
    h[:, t-1], or h0 at t = 0.
    """
    one = h_state.dtype.type(1)
    H = h_state.shape[1]
    for k in range(h_state.shape[0]):
        a_h, xW_xt = hW_h[k], xW_x[k, t]                                       # (3H,) each
        rz, r, z, n = gates[k, t, :2 * H], gates[k, t, :H], gates[k, t, H:2 * H], gates[k, t, 2 * H:]
        h_prev, h_t = h[k, t - 1] if t > 0 else h0[k], h[k, t]                 # (H,) each
        add(a_h, b_h, a_h)                                                     # a_h = h_prev W_h + b_h
        add3(xW_xt[:2 * H], b_x[:2 * H], a_h[:2 * H], rz)                      # [a_xr + a_hr | a_xz + a_hz]
        sigmoid_into(rz)                                                       # r = σ(...), z = σ(...)
        copy(a_h[2 * H:], a_hn[k, t])                                          # a_hn, kept for the backward
        for j in range(H):
            n[j] = (xW_xt[2 * H + j] + b_x[2 * H + j]) + r[j] * a_h[2 * H + j]  # n = tanh(a_xn + r * a_hn)
        tanh_into(n)
        for j in range(H):
            h_t[j] = (one - z[j]) * n[j] + z[j] * h_prev[j]                    # h_t = (1 - z) * n + z * h_prev
        copy(h_t, h_state[k])


@step_kernel
def _gru_step_backward(dh, dh_next_z, dh_next_W, gates, a_hn, h, h0, t, da_x, da_h):
    """Step t of ``reference.gru_backward``'s loop, before its product da_h_t W_h^T.

    What step t+1 sends back to h_t is dh_next_z + dh_next_W (B, H) (its dh_{t+1} z and its
    product); dh_next_z is overwritten with this step's dh_t z. Writes da_x[:, t] and da_h[:, t]
    (B, T, 3H).
    """
    one = gates.dtype.type(1)
    H = dh_next_z.shape[1]
    for k in range(dh_next_z.shape[0]):
        dh_t, dh_W, dh_out, a_hn_t = dh_next_z[k], dh_next_W[k], dh[k, t], a_hn[k, t]   # (H,) each
        h_prev = h[k, t - 1] if t > 0 else h0[k]                               # (H,)
        r, z, n = gates[k, t, :H], gates[k, t, H:2 * H], gates[k, t, 2 * H:]
        da_xr, da_xz, da_xn = da_x[k, t, :H], da_x[k, t, H:2 * H], da_x[k, t, 2 * H:]
        da_hn = da_h[k, t, 2 * H:]
        for j in range(H):                                                     # h_t feeds the output and step t+1
            dh_t[j] = dh_out[j] + (dh_t[j] + dh_W[j])
        for j in range(H):                                                     # h_t = (1 - z) * n + z * h_prev;
            da_xn[j] = dh_t[j] * (one - z[j]) * (one - n[j] * n[j])            # n = tanh(a_xn + r * a_hn)
        for j in range(H):                                                     # same line, the product r * a_hn
            da_hn[j] = da_xn[j] * r[j]
        for j in range(H):                                                     # same line; r = σ(a_xr + a_hr)
            da_xr[j] = da_xn[j] * a_hn_t[j] * r[j] * (one - r[j])
        for j in range(H):                                                     # h_t = (1 - z) n + z h_prev; z = σ(...)
            da_xz[j] = dh_t[j] * (h_prev[j] - n[j]) * z[j] * (one - z[j])
        for j in range(H):                                                     # same line: what h_prev gets
            dh_t[j] = dh_t[j] * z[j]
        copy(da_x[k, t, :2 * H], da_h[k, t, :2 * H])                           # a sum passes its gradient to both terms


def gru_forward(x, h0, W_x, W_h, b_x, b_h):
    """Equals ``minilm.reference.gru.gru_forward``: the GRU over the whole sequence, gates [r | z | n].

    Parameters, returns and errors are the reference's; any strides are accepted.
    """
    B, T, D, H = check_gru_args(x, h0, W_x, W_h, b_x, b_h)
    if x.dtype not in KERNEL_DTYPES:
        return reference.gru_forward(x, h0, W_x, W_h, b_x, b_h)

    xW_x = input_products(x, W_x)                              # (B, T, 3H) x_t W_x, all t at once
    # (H, 3H), (B, H), (3H,) each, in x's dtype: the same, checked, but perhaps in the other byte order
    W_h_c, h0_c, b_x_c, b_h_c = (np.ascontiguousarray(a, dtype=x.dtype) for a in (W_h, h0, b_x, b_h))
    gates = np.empty((B, T, 3 * H), dtype=x.dtype)             # (B, T, 3H)
    a_hn = np.empty((B, T, H), dtype=x.dtype)                  # (B, T, H)
    h = np.empty_like(a_hn)                                    # (B, T, H)
    h_state = state_buffer(h0, B, H, x.dtype)                  # (B, H) h_{t-1}, then h_t
    hW_h = np.empty((B, 3 * H), dtype=x.dtype)                 # (B, 3H) h_{t-1} W_h
    for t in range(T):
        np.matmul(h_state, W_h_c, out=hW_h)
        _gru_step_forward(xW_x, b_x_c, hW_h, b_h_c, t, h0_c, h_state, gates, a_hn, h)
    return h, GRUCache(x, h0, W_x, W_h, gates, a_hn, h)


def gru_backward(dh, cache, *, dh_T=None):
    """Equals ``minilm.reference.gru.gru_backward``. Returns (dx, dh0, dW_x, dW_h, db_x, db_h)."""
    require_cache("gru_backward", cache, "GRUCache")
    x, h0, W_x, W_h, gates, a_hn, h = cache
    B, T, H = check_backward_args("gru_backward", dh, h, dh_T=dh_T)
    dtype = kernel_dtype(dh, dh_T, h)
    if dtype is None:
        return reference.gru_backward(dh, cache, dh_T=dh_T)

    dh, gates, a_hn, h_c, h0_c = (np.ascontiguousarray(a, dtype=dtype) for a in (dh, gates, a_hn, h, h0))
    W_h_T = np.ascontiguousarray(W_h).T                        # (3H, H)
    da_x = np.empty((B, T, 3 * H), dtype=dtype)                # (B, T, 3H) gradient of every a^x_t
    da_h = np.empty((B, T, 3 * H), dtype=dtype)                # (B, T, 3H) gradient of every a^h_t
    dh_next_z = state_buffer(dh_T, B, H, dtype)                # (B, H) step t+1's dh z part (dh_T at the end)
    dh_next_W = np.zeros((B, H), dtype=dtype)                  # (B, H) step t+1's da_h W_h^T part
    for t in reversed(range(T)):
        _gru_step_backward(dh, dh_next_z, dh_next_W, gates, a_hn, h_c, h0_c, t, da_x, da_h)
        np.matmul(da_h[:, t], W_h_T, out=dh_next_W)            # a_h = h_prev W_h + b_h
    dh0 = dh_next_z + dh_next_W                                # h_t = ... + z * h_prev; a_h = h_prev W_h + b_h

    dx, dW_x, dW_h = input_and_weight_gradients(x, h0, h, W_x, da_x, da_h)
    db_x = np.sum(da_x.reshape(B * T, 3 * H), axis=0)          # (3H,)
    db_h = np.sum(da_h.reshape(B * T, 3 * H), axis=0)          # (3H,)
    return dx, dh0, dW_x, dW_h, db_x, db_h
