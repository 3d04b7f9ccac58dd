r"""The long short-term memory (LSTM) layer over a whole sequence.

Forward
-------
The input is a batch of sequences :math:`x_1, \dots, x_T`, with an initial hidden state :math:`h_0`
and cell state :math:`c_0`. The equations count steps from 1 and the arrays from 0: :math:`x_t` is
the (B, D) slice ``x[:, t-1]`` of x (B, T, D), :math:`h_t` is ``h[:, t-1]`` and :math:`c_t` is
``c[:, t-1]``. The code's loops and comments use the array index instead: there step ``t`` computes
``c[:, t]`` and ``h[:, t]`` from ``x[:, t]``, ``h_prev`` and ``c_prev`` (``h0``, ``c0`` at t = 0).
One product makes the pre-activations of all four gates, blocked in PyTorch's order
:math:`[i \mid f \mid g \mid o]`,

.. math::
    a_t = x_t W_x + h_{t-1} W_h + b = [\,a_i \mid a_f \mid a_g \mid a_o\,],
    \qquad W_x \in \mathbb{R}^{D \times 4H},\; W_h \in \mathbb{R}^{H \times 4H},\; b \in \mathbb{R}^{4H},

and then

.. math::
    i = \sigma(a_i), \quad f = \sigma(a_f), \quad g = \tanh(a_g), \quad o = \sigma(a_o), \\
    c_t = f \odot c_{t-1} + i \odot g, \qquad h_t = o \odot \tanh(c_t).

The input gate i lets the candidate g into the cell, the forget gate f keeps part of the old
cell, the output gate o decides how much of the cell shows in :math:`h_t`. The output is the
whole sequence :math:`h_1 \dots h_T` (B, T, H); the final states :math:`h_T, c_T`
(``cache.h_T``, ``cache.c_T``) start the next chunk of a long sequence. PyTorch keeps two biases,
``bias_ih`` and ``bias_hh``; they only ever appear as their sum, which is b here.

The input part :math:`x_t W_x + b` does not depend on the recurrence, so it is one
(B·T, D) @ (D, 4H) product for every t before the loop; the loop does :math:`h_{t-1} W_h` and the
gate arithmetic.

Backward through time
---------------------
A bar marks a gradient of the loss, :math:`\bar h_t = \partial L / \partial h_t`.
The loss reaches :math:`h_t` through the output (:math:`\bar h_t^{\,\text{out}}`, ``dh[:, t-1]``) and
through step t+1; it reaches :math:`c_t` through :math:`h_t = o \odot \tanh c_t` (both of :math:`h_t`'s
paths) and through :math:`c_{t+1}` (the gates of step t+1 read :math:`h_t`, not :math:`c_t`). So walk
backwards carrying two gradients from step t+1 to step t, :math:`\bar h_t^{\,\text{next}}` and
:math:`\bar c_t^{\,\text{next}}` (``dh_next`` and ``dc_next``: what step t+1 sends back to :math:`h_t`
and :math:`c_t`, its previous states); at the end of the sequence they are the gradients ``dh_T``
and ``dc_T`` arriving from the next chunk, or 0. For :math:`t = T, \dots, 1`, each line undoing
the forward line named on the right:

.. math::
    \bar h_t &= \bar h_t^{\,\text{out}} + \bar h_t^{\,\text{next}}
        && h_t \text{ feeds the output and step } t+1 \\
    \bar o &= \bar h_t \odot \tanh c_t
        && h_t = o \odot \tanh c_t \\
    \bar c_t &= \bar c_t^{\,\text{next}} + \bar h_t \odot o \odot (1 - \tanh^2 c_t)
        && h_t = o \odot \tanh c_t, \text{ and } c_t \text{ feeds step } t+1 \\
    \bar i = \bar c_t \odot g, \quad \bar g &= \bar c_t \odot i, \quad
        \bar f = \bar c_t \odot c_{t-1}
        && c_t = f \odot c_{t-1} + i \odot g \\
    \bar c_{t-1}^{\,\text{next}} &= \bar c_t \odot f
        && c_t = f \odot c_{t-1} + \dots \\
    \bar a_i = \bar i \odot i(1-i), \quad \bar a_f &= \bar f \odot f(1-f), \quad
        \bar a_o = \bar o \odot o(1-o)
        && \text{the sigmoids}, \; \sigma' = \sigma(1-\sigma) \\
    \bar a_g &= \bar g \odot (1 - g^2)
        && g = \tanh a_g \\
    \bar h_{t-1}^{\,\text{next}} &= \bar a_t W_h^\top,
        \quad \bar a_t = [\,\bar a_i \mid \bar a_f \mid \bar a_g \mid \bar a_o\,]
        && a_t = \dots + h_{t-1} W_h

and after the loop :math:`\bar h_0 = \bar h_0^{\,\text{next}}`,
:math:`\bar c_0 = \bar c_0^{\,\text{next}}`. The line
:math:`\bar c_{t-1}^{\,\text{next}} = \bar c_t \odot f` is why an LSTM remembers: the cell's gradient
passes back through a product of forget gates, with no squashing derivative and no weight matrix
in the way. :math:`W_x, W_h, b` are shared by every step, so their gradients sum over all t; once
every :math:`\bar a_t` is known they are big products after the loop,

.. math::
    \bar x_t = \bar a_t W_x^\top, \qquad
    \bar W_x = \sum_t x_t^\top \bar a_t, \qquad
    \bar W_h = \sum_t h_{t-1}^\top \bar a_t, \qquad
    \bar b = \sum_{t} \sum_{\text{batch}} \bar a_t .

A sequence cut in two chunks gives the states and gradients of the whole, up to rounding: the
second chunk starts from the first's :math:`h_T, c_T`, and its :math:`\bar h_0, \bar c_0` are what
the first chunk's backward takes as ``dh_T, dc_T``. A chunk's input products have fewer rows, which
BLAS may round differently, and its weight gradients are the sum of the two chunks' shares; so the
results agree to a few ulps, not bit for bit.

Shapes
------
=======  ==========  ===============
name     forward     backward
=======  ==========  ===============
x        (B, T, D)   dx (B, T, D)
h0, c0   (B, H)      dh0, dc0 (B, H)
W_x      (D, 4H)     dW_x (D, 4H)
W_h      (H, 4H)     dW_h (H, 4H)
b        (4H,)       db (4H,)
a_t      (B, 4H)     da_t (B, 4H)
h        (B, T, H)   dh (B, T, H)
h_T      (B, H)      dh_T (B, H)
c_T      (B, H)      dc_T (B, H)
=======  ==========  ===============
"""
from typing import NamedTuple

from minilm.backend import get_array_module, sum_rows
from minilm.reference.activations import sigmoid
from minilm.reference.rnn import (check_sequence, check_backward_args, check_state, check_vector, check_weights,
                                  shifted_states)
from minilm.validate import require_cache, require_same_dtype


class LSTMCache(NamedTuple):
    x: object       # (B, T, D) the input sequence
    h0: object      # (B, H) the initial hidden state
    c0: object      # (B, H) the initial cell state
    W_x: object     # (D, 4H)
    W_h: object     # (H, 4H)
    gates: object   # (B, T, 4H) [i | f | g | o] of every step, after their nonlinearities
    c: object       # (B, T, H) every cell state c_1 … c_T
    tanh_c: object  # (B, T, H) tanh(c_t)
    h: object       # (B, T, H) every hidden state h_1 … h_T (the output)

    @property
    def h_T(self):
        """(B, H) the final hidden state, to start the next chunk from."""
        return self.h[:, -1]

    @property
    def c_T(self):
        """(B, H) the final cell state, to start the next chunk from."""
        return self.c[:, -1]


def _split(gates, H):
    """The four (B, H) blocks [i | f | g | o] of a (B, 4H) array (views)."""
    return gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]


def _activate(xp, a, H, out):
    """[i | f | g | o] = [σ(a_i) | σ(a_f) | tanh(a_g) | σ(a_o)], written into ``out`` (B, 4H)."""
    sigmoid(xp, a[:, :2 * H], out=out[:, :2 * H])                  # i, f
    xp.tanh(a[:, 2 * H:3 * H], out=out[:, 2 * H:3 * H])            # g
    sigmoid(xp, a[:, 3 * H:], out=out[:, 3 * H:])                  # o
    return _split(out, H)


def check_lstm_args(x, h0, c0, W_x, W_h, b):
    """The argument checks of ``lstm_forward``, shared with the kernels of the other tiers; returns (B, T, D, H)."""
    B, T, D, H = check_sequence("lstm", x, h0, W_h, 4)
    check_state("lstm", "c0", c0, B, H)
    check_weights("lstm", W_x, W_h, D, H, 4)
    check_vector("lstm", "b", b, 4, H)
    require_same_dtype("lstm", x=x, h0=h0, c0=c0, W_x=W_x, W_h=W_h, b=b)
    return B, T, D, H


def lstm_forward(x, h0, c0, W_x, W_h, b):
    r"""The LSTM over the whole sequence, gates [i | f | g | o] as PyTorch.

    Parameters
    ----------
    x : (B, T, D) float array, the input sequence, T >= 1.
    h0 : (B, H) float array, the initial hidden state.
    c0 : (B, H) float array, the initial cell state.
    W_x : (D, 4H) float array (PyTorch's ``weight_ih.T``).
    W_h : (H, 4H) float array (PyTorch's ``weight_hh.T``).
    b : (4H,) float array (PyTorch's ``bias_ih + bias_hh``).

    Returns
    -------
    h : (B, T, H) array of every hidden state, and the cache for ``lstm_backward``;
    ``cache.h_T`` and ``cache.c_T`` are the final states (B, H).
    """
    B, T, D, H = check_lstm_args(x, h0, c0, W_x, W_h, b)
    xp = get_array_module(x, h0, c0, W_x, W_h, b)

    a_x = (x.reshape(B * T, D) @ W_x + b).reshape(B, T, 4 * H)    # (B, T, 4H) x_t W_x + b, all t at once
    gates = xp.empty((B, T, 4 * H), dtype=x.dtype)                 # (B, T, 4H)
    c = xp.empty((B, T, H), dtype=x.dtype)                         # (B, T, H)
    tanh_c = xp.empty_like(c)                                      # (B, T, H)
    h = xp.empty_like(c)                                           # (B, T, H)
    h_prev, c_prev = h0, c0
    for t in range(T):
        a = a_x[:, t] + h_prev @ W_h                               # (B, 4H) [a_i | a_f | a_g | a_o]
        i, f, g, o = _activate(xp, a, H, out=gates[:, t])          # each (B, H)
        c[:, t] = f * c_prev + i * g
        tanh_c[:, t] = xp.tanh(c[:, t])
        h[:, t] = o * tanh_c[:, t]
        h_prev, c_prev = h[:, t], c[:, t]
    return h, LSTMCache(x, h0, c0, W_x, W_h, gates, c, tanh_c, h)


def lstm_backward(dh, cache, *, dh_T=None, dc_T=None):
    """Gradients of the LSTM, back through time.

    Parameters
    ----------
    dh : (B, T, H) gradient of the loss with respect to the output h.
    cache : the ``LSTMCache`` from ``lstm_forward``.
    dh_T, dc_T : (B, H) or None, extra gradients arriving at the final states h_T and c_T (from
        the next chunk of a longer sequence); None means 0.

    Returns
    -------
    (dx, dh0, dc0, dW_x, dW_h, db), the shapes of x, h0, c0, W_x, W_h, b.
    """
    require_cache("lstm_backward", cache, "LSTMCache")
    x, h0, c0, W_x, W_h, gates, c, tanh_c, h = cache
    B, T, H = check_backward_args("lstm_backward", dh, h, dh_T=dh_T, dc_T=dc_T)
    D = x.shape[2]
    xp = get_array_module(dh, h)

    da = xp.empty((B, T, 4 * H), dtype=h.dtype)                    # (B, T, 4H) gradient of every a_t
    dh_next = xp.zeros_like(h0) if dh_T is None else dh_T          # (B, H) what step t+1 sends to h_t
    dc_next = xp.zeros_like(c0) if dc_T is None else dc_T          # (B, H) what step t+1 sends to c_t
    for t in reversed(range(T)):
        i, f, g, o = _split(gates[:, t], H)                        # each (B, H)
        c_prev = c[:, t - 1] if t > 0 else c0
        da_i, da_f, da_g, da_o = _split(da[:, t], H)               # views to fill
        dh_t = dh[:, t] + dh_next                                  # h_t feeds the output and step t+1
        do = dh_t * tanh_c[:, t]                                   # h_t = o * tanh(c_t)
        dc_t = dc_next + dh_t * o * (1 - tanh_c[:, t] ** 2)        # same line; c_t also feeds step t+1
        di, dg, df = dc_t * g, dc_t * i, dc_t * c_prev             # c_t = f * c_prev + i * g
        dc_next = dc_t * f                                         # same line, the c_prev term; to step t-1
        da_i[...] = di * i * (1 - i)                               # i = σ(a_i)
        da_f[...] = df * f * (1 - f)                               # f = σ(a_f)
        da_g[...] = dg * (1 - g * g)                               # g = tanh(a_g)
        da_o[...] = do * o * (1 - o)                               # o = σ(a_o)
        dh_next = da[:, t] @ W_h.T                                 # a_t = ... + h_{t-1} W_h; to step t-1
    dh0, dc0 = dh_next, dc_next

    da2 = da.reshape(B * T, 4 * H)                                 # (B·T, 4H)
    dx = (da2 @ W_x.T).reshape(B, T, D)                            # (B, T, D)  a_t = x_t W_x + ...
    dW_x = x.reshape(B * T, D).T @ da2                             # (D, 4H)    shared by every t
    dW_h = shifted_states(h0, h).reshape(B * T, H).T @ da2         # (H, 4H)    shared by every t
    db = sum_rows(da2)                                             # (4H,)
    return dx, dh0, dc0, dW_x, dW_h, db
