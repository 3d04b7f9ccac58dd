r"""Inverted dropout.

Forward
-------
Each element is kept with probability :math:`1 - p` and zeroed otherwise; the kept ones are
scaled by :math:`1/(1-p)` so that the expectation is unchanged:

.. math::
    m_i \sim \mathrm{Bernoulli}(1 - p), \qquad
    y_i = \frac{m_i\, x_i}{1 - p}, \qquad
    \mathbb{E}[y_i] = \frac{(1 - p)\, x_i}{1 - p} = x_i .

Scaling at training time ("inverted" dropout) is what lets evaluation use the layer as the
identity, which is what :math:`p = 0` gives: no mask is drawn and :math:`y = x`.

The mask comes from ``rng``: a ``numpy.random.Generator`` (which advances, so successive calls
draw fresh masks) or an integer seed (every call with that seed draws the same mask, so the
forward is a deterministic function of x, as a gradient check needs). On CuPy arrays the mask is
drawn on the GPU with ``cupy.random``, seeded by the integer, or by an integer drawn from the
Generator; the same seed gives a different mask on CPU and GPU.

Backward
--------
With the mask held fixed, :math:`y` is linear in :math:`x` with the diagonal Jacobian
:math:`\partial y_i / \partial x_i = m_i / (1 - p)`, so, writing
:math:`\bar y = \partial L / \partial y` (``dy`` in code),

.. math::  \bar x_i = \frac{m_i\, \bar y_i}{1 - p} .

A dropped element passes no gradient back; a kept one passes it back scaled, like its value.

Shapes
------
=====  ========  ==========
name   forward   backward
=====  ========  ==========
x      any       dx (same)
mask   same      (cache)
y      same      dy (same)
=====  ========  ==========
"""
import numbers
from typing import NamedTuple

import numpy as np

from minilm.backend import get_array_module
from minilm.validate import require_cache, require_float, require_gradient, require_probability, shown


class DropoutCache(NamedTuple):
    mask: object    # bool, shape of x: True where the element was kept; None when p = 0
    scale: float    # 1 / (1 - p)
    shape: tuple    # the shape of x


def _require_rng(op, rng):
    if isinstance(rng, np.random.Generator):
        return
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng >= 0:
            return
        raise ValueError(f"{op}: option 'rng' must be a numpy.random.Generator or a non-negative integer seed, "
                         f"got {shown(rng)}")
    raise TypeError(f"{op}: option 'rng' must be a numpy.random.Generator or a non-negative integer seed, "
                    f"got {shown(rng)}")


def draw_seed(rng):
    """The seed of a device's mask from ``rng``: an integer seed itself, a Generator's next draw."""
    return rng if isinstance(rng, numbers.Integral) else int(rng.integers(2 ** 63))


def _uniform(xp, rng, shape):
    """Uniform draws in [0, 1) of ``shape`` from ``rng`` (a Generator or an integer seed), on xp's device."""
    if xp is np:
        return np.random.default_rng(rng).random(shape)        # a Generator passes through unchanged
    return xp.random.default_rng(draw_seed(rng)).random(shape)


def dropout_forward(x, *, p, rng):
    """y = mask * x / (1 - p), with mask ~ Bernoulli(1 - p) elementwise; the identity when p = 0.

    Parameters
    ----------
    x : float array of any shape.
    p : float in [0, 1), the probability of dropping an element.
    rng : numpy.random.Generator, or a non-negative int seed (deterministic mask); None at p = 0,
        which draws nothing.

    Returns
    -------
    y : array of x's shape and dtype, and the cache for ``dropout_backward``.
    """
    require_float("dropout", "x", x)
    require_probability("dropout", "p", p)
    if not (p == 0 and rng is None):                           # p = 0 is the identity: it needs no rng
        _require_rng("dropout", rng)
    xp = get_array_module(x)
    if p == 0:
        return x.copy(), DropoutCache(None, 1.0, x.shape)
    scale = 1.0 / (1.0 - float(p))                             # a Python float keeps x's dtype
    mask = _uniform(xp, rng, x.shape) < 1.0 - float(p)         # (same as x) True = kept
    y = x * mask * scale                                       # (same as x)
    return y, DropoutCache(mask, scale, x.shape)


def dropout_backward(dy, cache):
    """dx = mask * dy / (1 - p). Returns (dx,)."""
    require_cache("dropout_backward", cache, "DropoutCache")
    mask, scale, shape = cache
    require_gradient("dropout_backward", "dy", dy, shape, "(same as x)")
    if mask is None:
        return (dy.copy(),)                                    # p = 0: y = x
    return (dy * mask * scale,)                                # from y = x * mask * scale
