r"""The position-wise feed-forward block of a transformer: linear, activation, linear.

Forward
-------
At every position (any leading axes), with a hidden width of 4C in GPT-2 (any width works here),

.. math::
    h = x W_1 + b_1, \qquad a = \phi(h), \qquad y = a W_2 + b_2,

where :math:`\phi` is GELU with GPT-2's tanh approximation (``activation="gelu"``), the exact
GELU :math:`h\,\Phi(h)` (``"gelu_exact"``), or ReLU (``"relu"``). The forward is three calls to
the ops of ``linear.py`` and ``activations.py`` (looked up on the active backend, so a faster
tier's version of the same op may serve), and the cache is their three caches.

Backward
--------
The chain rule, the forward read from the bottom up; each step is the backward of one op
(derived in that op's file). Writing :math:`\bar y = \partial L / \partial y` (``dy`` in code),
with n running over every position:

.. math::
    \bar a = \bar y W_2^\top,\quad \bar W_2 = a^\top \bar y,\quad \bar b_2 = \textstyle\sum_n \bar y_n
        \qquad (y = a W_2 + b_2)

.. math::
    \bar h = \phi'(h) \odot \bar a
        \qquad (a = \phi(h))

.. math::
    \bar x = \bar h W_1^\top,\quad \bar W_1 = x^\top \bar h,\quad \bar b_1 = \textstyle\sum_n \bar h_n
        \qquad (h = x W_1 + b_1)

Shapes
------
=====  ===========  ============
name   forward      backward
=====  ===========  ============
x      (..., C)     dx (..., C)
W_1    (C, 4C)      dW_1 (C, 4C)
b_1    (4C,)        db_1 (4C,)
h, a   (..., 4C)    dh, da (..., 4C)
W_2    (4C, C)      dW_2 (4C, C)
b_2    (C,)         db_2 (C,)
y      (..., C)     dy (..., C)
=====  ===========  ============

4C stands for the hidden width, whatever it is. Either bias may be None (no bias); its gradient
is then None.
"""
from typing import NamedTuple

from minilm import backend
from minilm.validate import (require_cache, require_choice, require_float, require_gradient, require_min_ndim,
                             require_ndim, require_same_dtype, require_shape)

# activation option -> (op, its options). The ops -- the activation and the linears -- are looked
# up on the active backend when the block runs, so a faster tier's GELU (minilm.cpu, minilm.gpu)
# and products (minilm.gpu) serve this composition too.
ACTIVATIONS = {
    "gelu": ("gelu", {"approximate": "tanh"}),
    "gelu_exact": ("gelu", {"approximate": "none"}),
    "relu": ("relu", {}),
}


class FfnCache(NamedTuple):
    linear_1: object    # LinearCache of h = x W_1 + b_1
    act: object         # the activation's cache of a = phi(h)
    linear_2: object    # LinearCache of y = a W_2 + b_2
    activation: str     # which phi


def _validate(x, W_1, b_1, W_2, b_2, activation):
    require_float("ffn", "x", x)
    require_min_ndim("ffn", "x", x, 1, "(..., C)")
    C = x.shape[-1]
    require_float("ffn", "W_1", W_1)
    require_ndim("ffn", "W_1", W_1, 2, "(C, 4C)")
    hidden = W_1.shape[1]
    require_shape("ffn", "W_1", W_1, (C, hidden), "(C, 4C)")
    require_float("ffn", "W_2", W_2)
    require_shape("ffn", "W_2", W_2, (hidden, C), "(4C, C)")
    if b_1 is not None:
        require_float("ffn", "b_1", b_1)
        require_shape("ffn", "b_1", b_1, (hidden,), "(4C,)")
    if b_2 is not None:
        require_float("ffn", "b_2", b_2)
        require_shape("ffn", "b_2", b_2, (C,), "(C,)")
    require_same_dtype("ffn", x=x, W_1=W_1, b_1=b_1, W_2=W_2, b_2=b_2)
    require_choice("ffn", "activation", activation, tuple(ACTIVATIONS))


def ffn_forward(x, W_1, b_1, W_2, b_2, *, activation="gelu"):
    """y = phi(x @ W_1 + b_1) @ W_2 + b_2.

    Parameters
    ----------
    x : (..., C) float array.
    W_1 : (C, 4C) float array; b_1 : (4C,) float array or None.
    W_2 : (4C, C) float array; b_2 : (C,) float array or None.
    activation : "gelu" (tanh approximation, GPT-2's), "gelu_exact" or "relu".

    Returns
    -------
    y : (..., C) array, and the cache for ``ffn_backward``.
    """
    _validate(x, W_1, b_1, W_2, b_2, activation)
    phi, options = ACTIVATIONS[activation]
    h, linear_1 = backend.op("linear_forward")(x, W_1, b_1)    # (..., 4C)
    a, act = backend.op(f"{phi}_forward")(h, **options)        # (..., 4C)
    y, linear_2 = backend.op("linear_forward")(a, W_2, b_2)    # (..., C)
    return y, FfnCache(linear_1, act, linear_2, activation)


def ffn_backward(dy, cache):
    """Gradients of the feed-forward block: the forward's three ops, backward, in reverse.

    Returns
    -------
    (dx, dW_1, db_1, dW_2, db_2) with the shapes of the forward's arguments.
    """
    require_cache("ffn_backward", cache, "FfnCache")
    linear_1, act, linear_2, activation = cache
    C = linear_2.W.shape[1]
    require_gradient("ffn_backward", "dy", dy, linear_1.x.shape[:-1] + (C,), "(..., C)")
    phi, _ = ACTIVATIONS[activation]
    da, dW_2, db_2 = backend.op("linear_backward")(dy, linear_2)   # (..., 4C)  from y = a W_2 + b_2
    (dh,) = backend.op(f"{phi}_backward")(da, act)             # (..., 4C)  from a = phi(h)
    dx, dW_1, db_1 = backend.op("linear_backward")(dh, linear_1)   # (..., C)   from h = x W_1 + b_1
    return dx, dW_1, db_1, dW_2, db_2
