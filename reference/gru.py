r"""The gated recurrent unit (GRU) over a whole sequence, with PyTorch's equations.

Forward
-------
The input is a batch of sequences :math:`x_1, \dots, x_T` and an initial state :math:`h_0`. The
equations count steps from 1 and the arrays from 0: :math:`x_t` is the (B, D) slice ``x[:, t-1]``
of x (B, T, D) and :math:`h_t` is ``h[:, t-1]``. The code's loops and comments use the array index
instead: there step ``t`` computes ``h[:, t]`` from ``x[:, t]`` and ``h_prev`` (``h0`` at t = 0).
The gates are blocked in PyTorch's order :math:`[r \mid z \mid n]`, with separate input and hidden
parts,

.. math::
    a^x_t = x_t W_x + b_x = [\,a^x_r \mid a^x_z \mid a^x_n\,], \qquad
    a^h_t = h_{t-1} W_h + b_h = [\,a^h_r \mid a^h_z \mid a^h_n\,],

with :math:`W_x \in \mathbb{R}^{D \times 3H}`, :math:`W_h \in \mathbb{R}^{H \times 3H}`,
:math:`b_x, b_h \in \mathbb{R}^{3H}`, and then

.. math::
    r = \sigma(a^x_r + a^h_r), \qquad z = \sigma(a^x_z + a^h_z), \qquad
    n = \tanh(a^x_n + r \odot a^h_n), \qquad h_t = (1 - z) \odot n + z \odot h_{t-1}.

The reset gate r decides how much of the old state enters the candidate n; the update gate z
blends the candidate with the old state. Because r multiplies :math:`a^h_n` *including* its bias
:math:`b_{hn}`, the two biases of the n block do not merge into one (those of r and z could),
which is why a GRU keeps both. The output is the whole sequence :math:`h_1 \dots h_T`
(B, T, H); the final state :math:`h_T` (``cache.h_T``) starts the next chunk of a long sequence.

:math:`a^x_t` does not depend on the recurrence, so it is one (B·T, D) @ (D, 3H) product for
every t before the loop; the loop does :math:`a^h_t` and the gate arithmetic.

Backward through time
---------------------
A bar marks a gradient of the loss, :math:`\bar h_t = \partial L / \partial h_t`.
The loss reaches :math:`h_t` through the output (:math:`\bar h_t^{\,\text{out}}`, ``dh[:, t-1]``) and
through step t+1, which uses it twice: in :math:`a^h_{t+1}` and directly in :math:`z \odot h_t`.
Walk backwards carrying :math:`\bar h_t^{\,\text{next}}` (``dh_next``), what step t+1 sends back to
:math:`h_t`, its previous state; at the end of the sequence it is the gradient ``dh_T`` arriving
from the next chunk, or 0. For :math:`t = T, \dots, 1`, each line undoing the forward line named
on the right:

.. math::
    \bar h_t &= \bar h_t^{\,\text{out}} + \bar h_t^{\,\text{next}}
        && h_t \text{ feeds the output and step } t+1 \\
    \bar n = \bar h_t \odot (1 - z), \quad
        \bar z &= \bar h_t \odot (h_{t-1} - n)
        && h_t = (1 - z) \odot n + z \odot h_{t-1} \\
    \bar a^x_n &= \bar n \odot (1 - n^2)
        && n = \tanh(a^x_n + r \odot a^h_n) \\
    \bar r = \bar a^x_n \odot a^h_n, \quad
        \bar a^h_n &= \bar a^x_n \odot r
        && \text{same line, the product } r \odot a^h_n \\
    \bar a_r = \bar r \odot r(1 - r), \quad
        \bar a_z &= \bar z \odot z(1 - z)
        && r = \sigma(a^x_r + a^h_r),\; z = \sigma(a^x_z + a^h_z) \\
    \bar h_{t-1}^{\,\text{next}} &= \bar h_t \odot z + \bar a^h_t W_h^\top
        && h_t = \dots + z \odot h_{t-1}, \text{ and } a^h_t = h_{t-1} W_h + b_h

where a sum passes its gradient unchanged to each term: :math:`\bar a^x_n` above is the gradient
of the whole argument :math:`a^x_n + r \odot a^h_n`, and :math:`\bar a_r, \bar a_z` those of the sums
:math:`a_r = a^x_r + a^h_r`, :math:`a_z = a^x_z + a^h_z`, so

.. math::
    \bar a^x_t = [\,\bar a_r \mid \bar a_z \mid \bar a^x_n\,], \qquad
    \bar a^h_t = [\,\bar a_r \mid \bar a_z \mid \bar a^h_n\,].

After the loop :math:`\bar h_0 = \bar h_0^{\,\text{next}}`, and the weights, shared by every step,
get their gradients summed over all t as big products,

.. math::
    \bar x_t = \bar a^x_t W_x^\top, \quad
    \bar W_x = \sum_t x_t^\top \bar a^x_t, \quad
    \bar b_x = \sum_t \sum_{\text{batch}} \bar a^x_t, \quad
    \bar W_h = \sum_t h_{t-1}^\top \bar a^h_t, \quad
    \bar b_h = \sum_t \sum_{\text{batch}} \bar a^h_t .

A sequence cut in two chunks gives the states and gradients of the whole, up to rounding: the
second chunk starts from the first's :math:`h_T`, and its :math:`\bar h_0` is what the first chunk's
backward takes as ``dh_T``. A chunk's input products have fewer rows, which BLAS may round
differently, and its weight gradients are the sum of the two chunks' shares; so the results agree
to a few ulps, not bit for bit.

Shapes
------
=====  ==========  ===============
name   forward     backward
=====  ==========  ===============
x      (B, T, D)   dx (B, T, D)
h0     (B, H)      dh0 (B, H)
W_x    (D, 3H)     dW_x (D, 3H)
W_h    (H, 3H)     dW_h (H, 3H)
b_x    (3H,)       db_x (3H,)
b_h    (3H,)       db_h (3H,)
a^x_t  (B, 3H)     da^x_t (B, 3H)
a^h_t  (B, 3H)     da^h_t (B, 3H)
h      (B, T, H)   dh (B, T, H)
h_T    (B, H)      dh_T (B, H)
=====  ==========  ===============
"""
from typing import NamedTuple

from minilm.backend import get_array_module, sum_rows
from minilm.reference.activations import sigmoid
from minilm.reference.rnn import (check_backward_args, check_sequence, check_vector, check_weights,
                                  shifted_states)
from minilm.validate import require_cache, require_same_dtype


class GRUCache(NamedTuple):
    x: object       # (B, T, D) the input sequence
    h0: object      # (B, H) the initial state
    W_x: object     # (D, 3H)
    W_h: object     # (H, 3H)
    gates: object   # (B, T, 3H) [r | z | n] of every step, after their nonlinearities
    a_hn: object    # (B, T, H) a^h_n of every step, the n block of h_{t-1} W_h + b_h (r multiplies it)
    h: object       # (B, T, H) every hidden state h_1 … h_T (the output)

    @property
    def h_T(self):
        """(B, H) the final state, to start the next chunk from."""
        return self.h[:, -1]


def _split(gates, H):
    """The three (B, H) blocks [r | z | n] of a (B, 3H) array (views)."""
    return gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]


def check_gru_args(x, h0, W_x, W_h, b_x, b_h):
    """The argument checks of ``gru_forward``, shared with the kernels of the other tiers; returns (B, T, D, H)."""
    B, T, D, H = check_sequence("gru", x, h0, W_h, 3)
    check_weights("gru", W_x, W_h, D, H, 3)
    check_vector("gru", "b_x", b_x, 3, H)
    check_vector("gru", "b_h", b_h, 3, H)
    require_same_dtype("gru", x=x, h0=h0, W_x=W_x, W_h=W_h, b_x=b_x, b_h=b_h)
    return B, T, D, H


def gru_forward(x, h0, W_x, W_h, b_x, b_h):
    r"""The GRU over the whole sequence, gates [r | z | n] and equations as PyTorch.

    Parameters
    ----------
    x : (B, T, D) float array, the input sequence, T >= 1.
    h0 : (B, H) float array, the initial state.
    W_x : (D, 3H) float array (PyTorch's ``weight_ih.T``).
    W_h : (H, 3H) float array (PyTorch's ``weight_hh.T``).
    b_x : (3H,) float array (PyTorch's ``bias_ih``).
    b_h : (3H,) float array (PyTorch's ``bias_hh``).

    Returns
    -------
    h : (B, T, H) array of every hidden state, and the cache for ``gru_backward``;
    ``cache.h_T`` is the final state (B, H).
    """
    B, T, D, H = check_gru_args(x, h0, W_x, W_h, b_x, b_h)
    xp = get_array_module(x, h0, W_x, W_h, b_x, b_h)

    a_x = (x.reshape(B * T, D) @ W_x + b_x).reshape(B, T, 3 * H)  # (B, T, 3H) x_t W_x + b_x, all t at once
    gates = xp.empty((B, T, 3 * H), dtype=x.dtype)                 # (B, T, 3H)
    a_hn = xp.empty((B, T, H), dtype=x.dtype)                      # (B, T, H)
    h = xp.empty_like(a_hn)                                        # (B, T, H)
    h_prev = h0
    for t in range(T):
        a_xr, a_xz, a_xn = _split(a_x[:, t], H)                    # each (B, H)
        a_h = h_prev @ W_h + b_h                                   # (B, 3H) [a_hr | a_hz | a_hn]
        a_hr, a_hz, a_hn_t = _split(a_h, H)                        # each (B, H)
        a_hn[:, t] = a_hn_t                                        # kept: the backward's dr = da_xn * a_hn
        r, z, n = _split(gates[:, t], H)                           # views to fill, each (B, H)
        sigmoid(xp, a_xr + a_hr, out=r)
        sigmoid(xp, a_xz + a_hz, out=z)
        xp.tanh(a_xn + r * a_hn_t, out=n)
        h[:, t] = (1 - z) * n + z * h_prev
        h_prev = h[:, t]
    return h, GRUCache(x, h0, W_x, W_h, gates, a_hn, h)


def gru_backward(dh, cache, *, dh_T=None):
    """Gradients of the GRU, back through time.

    Parameters
    ----------
    dh : (B, T, H) gradient of the loss with respect to the output h.
    cache : the ``GRUCache`` from ``gru_forward``.
    dh_T : (B, H) or None, an extra gradient arriving at the final state h_T (from the next
        chunk of a longer sequence); None means 0.

    Returns
    -------
    (dx, dh0, dW_x, dW_h, db_x, db_h), the shapes of x, h0, W_x, W_h, b_x, b_h.
    """
    require_cache("gru_backward", cache, "GRUCache")
    x, h0, W_x, W_h, gates, a_hn, h = cache
    B, T, H = check_backward_args("gru_backward", dh, h, dh_T=dh_T)
    D = x.shape[2]
    xp = get_array_module(dh, h)

    da_x = xp.empty((B, T, 3 * H), dtype=h.dtype)                  # (B, T, 3H) gradient of every a^x_t
    da_h = xp.empty((B, T, 3 * H), dtype=h.dtype)                  # (B, T, 3H) gradient of every a^h_t
    dh_next = xp.zeros_like(h0) if dh_T is None else dh_T          # (B, H) what step t+1 sends to h_t
    for t in reversed(range(T)):
        r, z, n = _split(gates[:, t], H)                           # each (B, H)
        h_prev = h[:, t - 1] if t > 0 else h0
        da_xr, da_xz, da_xn = _split(da_x[:, t], H)                # views to fill
        da_hr, da_hz, da_hn = _split(da_h[:, t], H)
        dh_t = dh[:, t] + dh_next                                  # h_t feeds the output and step t+1
        dn = dh_t * (1 - z)                                        # h_t = (1 - z) * n + z * h_prev
        dz = dh_t * (h_prev - n)                                   # same line
        da_xn[...] = dn * (1 - n * n)                              # n = tanh(a_xn + r * a_hn)
        dr = da_xn * a_hn[:, t]                                    # same line, the product r * a_hn
        da_hn[...] = da_xn * r                                     # same line, the product r * a_hn
        da_xr[...] = da_hr[...] = dr * r * (1 - r)                 # r = σ(a_xr + a_hr)
        da_xz[...] = da_hz[...] = dz * z * (1 - z)                 # z = σ(a_xz + a_hz)
        dh_next = dh_t * z + da_h[:, t] @ W_h.T                    # to step t-1: h_t = ... + z * h_prev;
                                                                   #   a_h = h_prev W_h + b_h
    dh0 = dh_next

    da_x2 = da_x.reshape(B * T, 3 * H)                             # (B·T, 3H)
    da_h2 = da_h.reshape(B * T, 3 * H)                             # (B·T, 3H)
    dx = (da_x2 @ W_x.T).reshape(B, T, D)                          # (B, T, D)  a_x = x_t W_x + b_x
    dW_x = x.reshape(B * T, D).T @ da_x2                           # (D, 3H)    shared by every t
    dW_h = shifted_states(h0, h).reshape(B * T, H).T @ da_h2       # (H, 3H)    shared by every t
    db_x = sum_rows(da_x2)                                         # (3H,)
    db_h = sum_rows(da_h2)                                         # (3H,)
    return dx, dh0, dW_x, dW_h, db_x, db_h
