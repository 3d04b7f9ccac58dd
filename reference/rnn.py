r"""The tanh recurrent network (Elman RNN) over a whole sequence.

Forward
-------
The input is a batch of sequences :math:`x_1, \dots, x_T` and an initial state :math:`h_0`. The
equations count steps from 1 and the arrays from 0: :math:`x_t` is the (B, D) slice ``x[:, t-1]``
of x (B, T, D) and :math:`h_t` is ``h[:, t-1]``. The code's loops and comments use the array index
instead: there step ``t`` computes ``h[:, t]`` from ``x[:, t]`` and ``h_prev`` (``h0`` at t = 0).
Each step mixes the new input with the previous state,

.. math::
    a_t = x_t W_x + h_{t-1} W_h + b, \qquad h_t = \tanh(a_t), \qquad t = 1, \dots, T,

with :math:`W_x \in \mathbb{R}^{D \times H}`, :math:`W_h \in \mathbb{R}^{H \times H}`,
:math:`b \in \mathbb{R}^{H}`. The output is the whole hidden sequence :math:`h_1 \dots h_T`
(B, T, H). Its last row, the final state :math:`h_T` (``cache.h_T``), starts the next chunk of a
long sequence (truncated backpropagation through time).

The input part :math:`x_t W_x + b` does not depend on the recurrence, so it is computed for every
t at once, one (B·T, D) @ (D, H) product before the loop; the loop itself only does
:math:`h_{t-1} W_h` and the tanh.

Backward through time
---------------------
A bar marks a gradient of the loss, :math:`\bar h_t = \partial L / \partial h_t`.
The loss reaches :math:`h_t` along two paths: through the output directly
(:math:`\bar h_t^{\,\text{out}}`, ``dh[:, t-1]``), and through :math:`h_{t+1}`, which is computed from
:math:`h_t`. So walk backwards in time carrying :math:`\bar h_t^{\,\text{next}}`, the gradient that
step t+1 sends back to :math:`h_t`, its previous state (``dh_next`` in code). At the end of the
sequence it is the gradient ``dh_T`` arriving from the next chunk, or 0. For :math:`t = T, \dots, 1`:

.. math::
    \bar h_t &= \bar h_t^{\,\text{out}} + \bar h_t^{\,\text{next}}
        && h_t \text{ feeds the output and step } t+1 \\
    \bar a_t &= (1 - h_t^2) \odot \bar h_t
        && \text{undoes } h_t = \tanh a_t,\; \tanh' = 1 - \tanh^2 \\
    \bar h_{t-1}^{\,\text{next}} &= \bar a_t W_h^\top
        && \text{undoes the } h_{t-1} W_h \text{ term of } a_t

and after the loop :math:`\bar h_0 = \bar h_0^{\,\text{next}}`. Only that one (B, H) @ (H, H)
product is sequential. :math:`W_x, W_h, b` are shared by every step, so their gradients sum over
all t (and the batch), exactly as a linear layer's sum over positions; once every
:math:`\bar a_t` is known they are big products after the loop:

.. math::
    \bar x_t = \bar a_t W_x^\top, \qquad
    \bar W_x = \sum_t x_t^\top \bar a_t, \qquad
    \bar W_h = \sum_t h_{t-1}^\top \bar a_t, \qquad
    \bar b = \sum_{t} \sum_{\text{batch}} \bar a_t .

Cutting a sequence in two chunks changes nothing but rounding (a chunk's products have fewer
rows, and its weight gradients are the sum of the two chunks' shares): the second chunk starts from
the first's :math:`h_T`, and its :math:`\bar h_0` is exactly the :math:`\bar h_T^{\,\text{next}}`
the first chunk's backward needs, passed as ``dh_T``.

Shapes
------
=====  ==========  ==============
name   forward     backward
=====  ==========  ==============
x      (B, T, D)   dx (B, T, D)
h0     (B, H)      dh0 (B, H)
W_x    (D, H)      dW_x (D, H)
W_h    (H, H)      dW_h (H, H)
b      (H,)        db (H,)
h      (B, T, H)   dh (B, T, H)
h_T    (B, H)      dh_T (B, H)
=====  ==========  ==============

This file also holds the argument checks that ``lstm`` and ``gru`` share.
"""
from typing import NamedTuple

from minilm.backend import get_array_module, sum_rows
from minilm.validate import (require_cache, require_float, require_gradient, require_ndim, require_same_dtype,
                             require_shape)


# --- shared by rnn, lstm and gru --------------------------------------------------------------

def check_sequence(op, x, h0, W_h=None, n_gates=1):
    """x is a float (B, T, D) with T >= 1 and h0 a float (B, H) of the same B; returns (B, T, D, H).
    H is read from W_h (H, n_gates·H) when its two dimensions agree, so a wrong h0 is the one named."""
    require_float(op, "x", x)
    require_ndim(op, "x", x, 3, "(B, T, D)")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: argument 'x' must have at least one time step (T >= 1 in (B, T, D)), "
                         f"got shape {tuple(x.shape)}")
    B, T, D = x.shape
    require_float(op, "h0", h0)
    require_ndim(op, "h0", h0, 2, "(B, H)")
    H = h0.shape[1]
    if getattr(W_h, "ndim", 0) == 2 and W_h.shape[1] == n_gates * W_h.shape[0]:
        H = W_h.shape[0]                     # W_h is self-consistent: trust its H over h0's
    require_shape(op, "h0", h0, (B, H), "(B, H)")
    return B, T, D, H


def check_state(op, name, s, B, H):
    """A float state such as c0, of shape (B, H)."""
    require_float(op, name, s)
    require_shape(op, name, s, (B, H), "(B, H)")


def check_weights(op, W_x, W_h, D, H, n_gates):
    """W_x is (D, n_gates·H) and W_h is (H, n_gates·H), both float."""
    k = "" if n_gates == 1 else str(n_gates)
    require_float(op, "W_x", W_x)
    require_shape(op, "W_x", W_x, (D, n_gates * H), f"(D, {k}H)")
    require_float(op, "W_h", W_h)
    require_shape(op, "W_h", W_h, (H, n_gates * H), f"(H, {k}H)")


def check_vector(op, name, v, n_gates, H):
    """A bias (or any per-unit vector) of shape (n_gates·H,)."""
    k = "" if n_gates == 1 else str(n_gates)
    require_float(op, name, v)
    require_shape(op, name, v, (n_gates * H,), f"({k}H,)")


def check_backward_args(op, dh, h, **state_gradients):
    """The arguments every tier's recurrent backward checks: ``dh`` shaped like the output ``h``
    (B, T, H), and each gradient for a final state (``dh_T=...``, ``dc_T=...``) None or (B, H).
    Returns (B, T, H)."""
    B, T, H = h.shape
    require_gradient(op, "dh", dh, (B, T, H), "(B, T, H)")
    for name, d in state_gradients.items():
        if d is not None:
            require_gradient(op, name, d, (B, H), "(B, H)")
    return B, T, H


def shifted_states(h0, h):
    """The states each step started from, h_0 … h_{T-1}: (B, T, H)."""
    xp = get_array_module(h0, h)
    return xp.concatenate([h0[:, None], h[:, :-1]], axis=1)       # (B, T, H)


def input_and_weight_gradients(x, h0, h, W_x, da_x, da_h):
    """dx, dW_x, dW_h from the pre-activation gradients: the products after the loop of every
    recurrent backward (the kernel tiers call this; the reference's backwards write them inline).

    da_x (B, T, G·H), G the number of gate blocks (1 rnn, 4 lstm, 3 gru), is the gradient of
    x_t W_x + b, da_h that of h_{t-1} W_h (the same array for rnn and lstm). Returns dx (B, T, D), dW_x (D, G·H), dW_h (H, G·H).
    """
    B, T, D = x.shape
    H, GH = h.shape[2], da_x.shape[2]
    da_x2 = da_x.reshape(B * T, GH)                                # (B·T, G·H)
    da_h2 = da_h.reshape(B * T, GH)                                # (B·T, G·H)
    dx = (da_x2 @ W_x.T).reshape(B, T, D)                          # (B, T, D)  a_x = x_t W_x + ...
    dW_x = x.reshape(B * T, D).T @ da_x2                           # (D, G·H)   shared by every t
    dW_h = shifted_states(h0, h).reshape(B * T, H).T @ da_h2       # (H, G·H)   shared by every t
    return dx, dW_x, dW_h


# --- the tanh RNN -----------------------------------------------------------------------------

class RNNCache(NamedTuple):
    x: object       # (B, T, D) the input sequence
    h0: object      # (B, H) the initial state
    W_x: object     # (D, H)
    W_h: object     # (H, H)
    h: object       # (B, T, H) every hidden state h_1 … h_T (the output)

    @property
    def h_T(self):
        """(B, H) the final state, to start the next chunk from."""
        return self.h[:, -1]


def check_rnn_args(x, h0, W_x, W_h, b):
    """The argument checks of ``rnn_forward``, shared with the kernels of the other tiers; returns (B, T, D, H)."""
    B, T, D, H = check_sequence("rnn", x, h0, W_h, 1)
    check_weights("rnn", W_x, W_h, D, H, 1)
    check_vector("rnn", "b", b, 1, H)
    require_same_dtype("rnn", x=x, h0=h0, W_x=W_x, W_h=W_h, b=b)
    return B, T, D, H


def rnn_forward(x, h0, W_x, W_h, b):
    r"""h_t = tanh(x_t W_x + h_{t-1} W_h + b) for t = 1 … T.

    Parameters
    ----------
    x : (B, T, D) float array, the input sequence, T >= 1.
    h0 : (B, H) float array, the initial state.
    W_x : (D, H) float array.
    W_h : (H, H) float array.
    b : (H,) float array.

    Returns
    -------
    h : (B, T, H) array of every hidden state, and the cache for ``rnn_backward``;
    ``cache.h_T`` is the final state (B, H).
    """
    B, T, D, H = check_rnn_args(x, h0, W_x, W_h, b)
    xp = get_array_module(x, h0, W_x, W_h, b)

    a_x = (x.reshape(B * T, D) @ W_x + b).reshape(B, T, H)        # (B, T, H) x_t W_x + b, all t at once
    h = xp.empty((B, T, H), dtype=x.dtype)                         # (B, T, H)
    h_prev = h0
    for t in range(T):
        h[:, t] = xp.tanh(a_x[:, t] + h_prev @ W_h)                # (B, H)
        h_prev = h[:, t]
    return h, RNNCache(x, h0, W_x, W_h, h)


def rnn_backward(dh, cache, *, dh_T=None):
    """Gradients of the tanh RNN, back through time.

    Parameters
    ----------
    dh : (B, T, H) gradient of the loss with respect to the output h.
    cache : the ``RNNCache`` from ``rnn_forward``.
    dh_T : (B, H) or None, an extra gradient arriving at the final state h_T (from the next
        chunk of a longer sequence); None means 0.

    Returns
    -------
    (dx, dh0, dW_x, dW_h, db), the shapes of x, h0, W_x, W_h, b.
    """
    require_cache("rnn_backward", cache, "RNNCache")
    x, h0, W_x, W_h, h = cache
    B, T, H = check_backward_args("rnn_backward", dh, h, dh_T=dh_T)
    D = x.shape[2]
    xp = get_array_module(dh, h)

    da = xp.empty((B, T, H), dtype=h.dtype)                        # (B, T, H) gradient of every a_t
    dh_next = xp.zeros_like(h0) if dh_T is None else dh_T          # (B, H) what step t+1 sends to h_t
    for t in reversed(range(T)):
        dh_t = dh[:, t] + dh_next                                  # h_t feeds the output and step t+1
        da[:, t] = (1 - h[:, t] * h[:, t]) * dh_t                  # h_t = tanh(a_t)
        dh_next = da[:, t] @ W_h.T                                 # a_t = ... + h_{t-1} W_h; to step t-1
    dh0 = dh_next

    da2 = da.reshape(B * T, H)                                     # (B·T, H)
    dx = (da2 @ W_x.T).reshape(B, T, D)                            # (B, T, D)  a_t = x_t W_x + ...
    dW_x = x.reshape(B * T, D).T @ da2                             # (D, H)     shared by every t
    dW_h = shifted_states(h0, h).reshape(B * T, H).T @ da2         # (H, H)     shared by every t
    db = sum_rows(da2)                                             # (H,)
    return dx, dh0, dW_x, dW_h, db
