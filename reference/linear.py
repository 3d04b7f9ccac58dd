r"""The linear (fully connected) layer.

Forward
-------
For inputs :math:`x` with any leading dimensions and a last axis of size D,

.. math::  y = x W + b, \qquad W \in \mathbb{R}^{D \times C},\; b \in \mathbb{R}^{C}.

Backward
--------
Write :math:`\bar y = \partial L / \partial y` (``dy`` in code). Element by element,
:math:`y_{nc} = \sum_d x_{nd} W_{dc} + b_c`, where n runs over every leading position. So

.. math::
    \frac{\partial L}{\partial x_{nd}} = \sum_c \bar y_{nc} W_{dc}
        \;\Rightarrow\; \bar x = \bar y W^\top ,\qquad
    \frac{\partial L}{\partial W_{dc}} = \sum_n x_{nd} \bar y_{nc}
        \;\Rightarrow\; \bar W = x^\top \bar y ,\qquad
    \bar b_c = \sum_n \bar y_{nc}.

:math:`W` and :math:`b` are shared by every position n, so their gradients sum over all of them.

Shapes
------
=====  =========  ===========
name   forward    backward
=====  =========  ===========
x      (..., D)   dx (..., D)
W      (D, C)     dW (D, C)
b      (C,)       db (C,)
y      (..., C)   dy (..., C)
=====  =========  ===========
"""
import math
from typing import NamedTuple

from minilm.backend import sum_rows
from minilm.validate import (require_cache, require_float, require_gradient, require_min_ndim, require_ndim,
                             require_same_dtype, require_shape)


class LinearCache(NamedTuple):
    x: object       # (..., D) the input
    W: object       # (D, C)
    has_bias: bool


def check_linear_args(x, W, b):
    """The argument checks of ``linear_forward``, shared with the kernels of the other tiers."""
    require_float("linear", "x", x)
    require_min_ndim("linear", "x", x, 1, "(..., D)")
    require_float("linear", "W", W)
    require_ndim("linear", "W", W, 2, "(D, C)")
    require_shape("linear", "W", W, (x.shape[-1], W.shape[1]), "(D, C)")
    if b is not None:
        require_float("linear", "b", b)
        require_shape("linear", "b", b, (W.shape[1],), "(C,)")
    require_same_dtype("linear", x=x, W=W, b=b)


def linear_forward(x, W, b):
    """y = x @ W + b.

    Parameters
    ----------
    x : (..., D) float array.
    W : (D, C) float array.
    b : (C,) float array, or None for no bias.

    Returns
    -------
    y : (..., C) array, and the cache for ``linear_backward``.
    """
    check_linear_args(x, W, b)
    N, D = math.prod(x.shape[:-1]), x.shape[-1]                # N = all leading positions
    # NumPy multiplies a 2-D (N, D) matrix in one BLAS call, a (..., T, D) stack in many
    y = (x.reshape(N, D) @ W).reshape(x.shape[:-1] + (W.shape[1],))   # (..., C)
    if b is not None:
        y = y + b
    return y, LinearCache(x, W, b is not None)


def linear_backward(dy, cache):
    """Gradients of y = x @ W + b.

    Returns
    -------
    (dx, dW, db): shapes of x, W, b; db is None when the forward had no bias.
    """
    require_cache("linear_backward", cache, "LinearCache")
    x, W, has_bias = cache
    require_gradient("linear_backward", "dy", dy, x.shape[:-1] + (W.shape[1],), "(..., C)")
    N = math.prod(x.shape[:-1])                                # all leading positions
    x2 = x.reshape(N, x.shape[-1])                             # (N, D)
    dy2 = dy.reshape(N, dy.shape[-1])                          # (N, C)
    dx = (dy2 @ W.T).reshape(x.shape)                          # (..., D)  from y = x W
    dW = x2.T @ dy2                                            # (D, C)    W is shared by every n
    db = sum_rows(dy2) if has_bias else None                   # (C,)
    return dx, dW, db
