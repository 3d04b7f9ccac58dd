r"""The GRU's gate arithmetic as CuPy elementwise kernels, forward and back through time.

Each public function here equals the function of the same name in ``minilm.reference.gru``,
whose module docstring states the math (PyTorch's equations) and derives the backward, and
returns its ``GRUCache``; ``tests/test_gpu_recurrent.py`` holds them to it. The split between
cuBLAS products and one kernel per step is described in ``minilm.gpu.rnn``.

Per step t, forward: CuPy makes :math:`h_{t-1} W_h` (B, 3H); one kernel over the (B, H) units
adds :math:`b_h` and :math:`x_t W_x + b_x`, applies the gates, and writes r, z, n into
``gates[:, t]``, :math:`a^h_n` into ``a_hn[:, t]`` and :math:`h_t` into ``h[:, t]``.

Backward: the gradient sent back to :math:`h_{t-1}` has two parts, :math:`\bar h_t \odot z` and
:math:`\bar a^h_t W_h^\top`. One kernel adds the two parts left by step t+1 into
:math:`\bar h_t`, writes :math:`\bar a^x_t` and :math:`\bar a^h_t` into ``da_x[:, t]`` and
``da_h[:, t]`` (B × 3H), and overwrites the first part with this step's; CuPy makes the second.
After the loop :math:`\bar h_0` is the sum of the two.

The (B, 3H) arrays are ``raw`` arguments: the thread of unit j of row k reads and writes entry
``k·3H + g·H + j`` of block g = 0, 1, 2 (r, z, n), an index CuPy maps through the array's
strides.
"""
import cupy

from minilm.gpu._core import elementwise
from minilm.gpu.rnn import bias_gradient, input_and_weight_gradients, input_products, one_dtype, state_buffer
from minilm.reference import gru as reference
from minilm.reference.gru import check_gru_args
from minilm.reference.gru import GRUCache
from minilm.reference.rnn import check_backward_args

__all__ = ["gru_forward", "gru_backward"]


# ``i`` is CuPy's loop index over the (B, H) units; ``e`` is the entry of unit j of row k in
# block r of a (B, 3H) array, and j that of unit j in block r of the bias b_h (3H,).
_gru_step_forward = elementwise(
    "raw T a_x, raw T hW_h, raw T b_h, T h_prev, int32 H", "raw T gates, T a_hn, T h",
    r"""
    typedef acc_t<T>::type A;
    const ptrdiff_t k = i / H, j = i % H, e = k * 3 * H + j;
    A a_hr = (A)hW_h[e] + (A)b_h[j];                                  // a_h = h_{t-1} W_h + b_h
    A a_hz = (A)hW_h[e + H] + (A)b_h[j + H];
    A a_hn_t = (A)hW_h[e + 2 * H] + (A)b_h[j + 2 * H];
    A r_t = sigmoid_acc((A)a_x[e] + a_hr);                            // r = σ(a_xr + a_hr), a_x = x_t W_x + b_x
    A z_t = sigmoid_acc((A)a_x[e + H] + a_hz);                        // z = σ(a_xz + a_hz)
    A n_t = tanh_acc((A)a_x[e + 2 * H] + r_t * a_hn_t);               // n = tanh(a_xn + r * a_hn)
    gates[e] = (T)r_t;
    gates[e + H] = (T)z_t;
    gates[e + 2 * H] = (T)n_t;
    a_hn = (T)a_hn_t;                                                 // kept for the backward
    h = (T)((1 - z_t) * n_t + z_t * (A)h_prev);                       // h_t = (1 - z) * n + z * h_prev
    """,
    "minilm_gru_step_forward")

# What step t+1 sends back to h_t is dh_z + dh_W: its dh_{t+1} * z and its product da_h W_h^T;
# dh_z is overwritten with this step's dh_t * z.
_gru_step_backward = elementwise(
    "T dh, T dh_W, raw T gates, T a_hn, T h_prev, int32 H", "raw T da_x, raw T da_h, T dh_z",
    r"""
    typedef acc_t<T>::type A;
    const ptrdiff_t k = i / H, j = i % H, e = k * 3 * H + j;
    A r_t = (A)gates[e], z_t = (A)gates[e + H], n_t = (A)gates[e + 2 * H];
    A dh_t = (A)dh + ((A)dh_z + (A)dh_W);                             // h_t feeds the output and step t+1
    A da_xn = dh_t * (1 - z_t) * (1 - n_t * n_t);                     // h_t = (1 - z) * n + z * h_prev; n = tanh(a_xn + r * a_hn)
    A da_r = da_xn * (A)a_hn * r_t * (1 - r_t);                       // same line, the product r * a_hn; r = σ(a_xr + a_hr)
    A da_z = dh_t * ((A)h_prev - n_t) * z_t * (1 - z_t);              // h_t = ... + z * h_prev; z = σ(a_xz + a_hz)
    da_x[e] = (T)da_r;                                                // a sum passes its gradient to both terms
    da_h[e] = (T)da_r;
    da_x[e + H] = (T)da_z;
    da_h[e + H] = (T)da_z;
    da_x[e + 2 * H] = (T)da_xn;
    da_h[e + 2 * H] = (T)(da_xn * r_t);                               // the product r * a_hn
    dh_z = (T)(dh_t * z_t);                                           // h_t = ... + z * h_prev: what h_prev gets directly
    """,
    "minilm_gru_step_backward")


def gru_forward(x, h0, W_x, W_h, b_x, b_h):
    """Equals ``minilm.reference.gru.gru_forward``: the GRU over the whole sequence, gates [r | z | n].

    Parameters, returns and errors are the reference's; any strides are accepted.
    """
    B, T, D, H = check_gru_args(x, h0, W_x, W_h, b_x, b_h)
    if one_dtype(x, h0, W_x, W_h, b_x, b_h) is None:
        return reference.gru_forward(x, h0, W_x, W_h, b_x, b_h)

    a_x = input_products(x, W_x, b_x)                          # (B, T, 3H) x_t W_x + b_x, all t at once
    gates = cupy.empty((B, T, 3 * H), dtype=x.dtype)           # (B, T, 3H)
    a_hn = cupy.empty((B, T, H), dtype=x.dtype)                # (B, T, H)
    h = cupy.empty_like(a_hn)                                  # (B, T, H)
    h_prev = h0
    for t in range(T):
        _gru_step_forward(a_x[:, t], h_prev @ W_h, b_h, h_prev, H,  # h_{t-1} W_h: (B, 3H)
                          gates[:, t], a_hn[:, t], h[:, t])
        h_prev = h[:, t]
    return h, GRUCache(x, h0, W_x, W_h, gates, a_hn, h)


def gru_backward(dh, cache, *, dh_T=None):
    """Equals ``minilm.reference.gru.gru_backward``. Returns (dx, dh0, dW_x, dW_h, db_x, db_h)."""
    x, h0, W_x, W_h, gates, a_hn, h = cache
    B, T, H = check_backward_args("gru_backward", dh, h, dh_T=dh_T)
    dtype = one_dtype(dh, dh_T, h, gates, a_hn, h0)
    if dtype is None:
        return reference.gru_backward(dh, cache, dh_T=dh_T)

    da_x = cupy.empty((B, T, 3 * H), dtype=dtype)              # (B, T, 3H) gradient of every a^x_t
    da_h = cupy.empty((B, T, 3 * H), dtype=dtype)              # (B, T, 3H) gradient of every a^h_t
    dh_z = state_buffer(dh_T, B, H, dtype)                     # (B, H) step t+1's dh * z (overwritten)
    dh_W = cupy.zeros((B, H), dtype=dtype)                     # (B, H) step t+1's da_h W_h^T
    for t in reversed(range(T)):
        h_prev = h[:, t - 1] if t > 0 else h0
        _gru_step_backward(dh[:, t], dh_W, gates[:, t], a_hn[:, t], h_prev, H, da_x[:, t], da_h[:, t], dh_z)
        dh_W = da_h[:, t] @ W_h.T                              # a_h = h_prev W_h + b_h
    dh0 = dh_z + dh_W                                          # h_t = ... + z * h_prev; a_h = h_prev W_h + ...

    dx, dW_x, dW_h = input_and_weight_gradients(x, h0, h, W_x, da_x, da_h)
    db_x = bias_gradient(da_x)                                 # (3H,)
    db_h = bias_gradient(da_h)                                 # (3H,)
    return dx, dh0, dW_x, dW_h, db_x, db_h
