r"""Elementwise activations and the softmax.

Forward and backward
--------------------
An elementwise :math:`y = \phi(x)` has :math:`\bar x = \phi'(x)\,\bar y`, where
:math:`\bar y = \partial L / \partial y` (``dy`` in code). Each derivative is written in terms of
whatever the forward already computed (the GELU cache keeps only x, so its backward recomputes
:math:`\tanh u` or :math:`\Phi(x)`):

* ReLU: :math:`y = \max(0, x)`, :math:`\phi'(x) = [x > 0]` (0 at the kink, as PyTorch).
* tanh: :math:`y = \tanh x`, :math:`\phi'(x) = 1 - y^2`.
* sigmoid: :math:`y = \sigma(x) = 1/(1 + e^{-x})`, :math:`\phi'(x) = y(1 - y)`.
* GELU, exact: :math:`y = x\,\Phi(x)` with :math:`\Phi(x) = \tfrac12(1 + \operatorname{erf}(x/\sqrt2))`,
  so :math:`\phi'(x) = \Phi(x) + x\,\varphi(x)` with the normal density
  :math:`\varphi(x) = e^{-x^2/2}/\sqrt{2\pi}` (``pdf`` in code; not the activation :math:`\phi`).
* GELU, tanh approximation (GPT-2): :math:`y = \tfrac12 x (1 + \tanh u)` with
  :math:`u = \sqrt{2/\pi}\,(x + 0.044715\,x^3)`. By the product rule,

  .. math::  \phi'(x) = \tfrac12 (1 + \tanh u) + \tfrac12 x\,(1 - \tanh^2 u)\,
                       \sqrt{2/\pi}\,(1 + 3 \cdot 0.044715\,x^2).

Softmax over the last axis
--------------------------
:math:`y_j = e^{x_j - m} / \sum_k e^{x_k - m}` with :math:`m = \max_k x_k`; subtracting m changes
nothing mathematically and keeps every exponent :math:`\le 0`, so nothing overflows. Its Jacobian
is :math:`\partial y_j / \partial x_i = y_j(\delta_{ij} - y_i)`, hence

.. math::  \bar x_i = \sum_j \bar y_j\, y_j (\delta_{ij} - y_i) = y_i \Big(\bar y_i - \sum_j \bar y_j y_j\Big).

Shapes
------
Every function here keeps the shape: x, y, dx, dy all have the same shape (the softmax
normalises over the last axis, of any size ≥ 1).
"""
import math
from typing import NamedTuple

from minilm.backend import accumulation_dtype, get_array_module
from minilm.validate import (require_cache, require_choice, require_float, require_gradient, require_min_ndim,
                             require_nonempty)

GELU_APPROXIMATIONS = ("tanh", "none")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def _erf(xp, x):
    """erf for numpy (through math.erf, within an ulp) and cupy (cupyx.scipy.special)."""
    if xp.__name__ == "numpy":
        return xp.asarray(xp.frompyfunc(math.erf, 1, 1)(x), dtype=x.dtype)   # 0-d gives a float, not an array
    from cupyx.scipy.special import erf
    return erf(x)


class ActivationCache(NamedTuple):
    x: object       # the input
    y: object       # the output


# --- ReLU -------------------------------------------------------------------------------------

def relu_forward(x):
    """y = max(0, x), elementwise."""
    require_float("relu", "x", x)
    xp = get_array_module(x)
    y = xp.maximum(x, 0)
    return y, ActivationCache(x, y)


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0. Returns (dx,)."""
    require_cache("relu_backward", cache, "ActivationCache")
    require_gradient("relu_backward", "dy", dy, cache.x.shape, "(same as x)")
    return (dy * (cache.x > 0),)


# --- tanh -------------------------------------------------------------------------------------

def tanh_forward(x):
    """y = tanh(x), elementwise."""
    require_float("tanh", "x", x)
    xp = get_array_module(x)
    y = xp.tanh(x)
    return y, ActivationCache(x, y)


def tanh_backward(dy, cache):
    """dx = (1 - y²) dy. Returns (dx,)."""
    require_cache("tanh_backward", cache, "ActivationCache")
    require_gradient("tanh_backward", "dy", dy, cache.y.shape, "(same as x)")
    y = cache.y
    return ((1 - y * y) * dy,)


# --- sigmoid ----------------------------------------------------------------------------------

def sigmoid(xp, a, out=None):
    r"""σ(a) = 1/(1 + e^{-a}), into ``out`` when given, computed from e = e^{-|a|} <= 1, which never
    overflows: σ(a) = 1/(1 + e) for a >= 0 and, multiplying above and below by e^{a}, e/(1 + e) for
    a < 0. Both keep σ's relative accuracy where it is tiny (½(1 + tanh(a/2)), the same function,
    cancels there: in float32 it is 2× too large at a = -18, 13× at a = -19.9, and 0 from a = -20
    on)."""
    e = xp.exp(-xp.abs(a))                                     # e^{-|a|}, in (0, 1]
    s = 1 / (1 + e)                                            # σ(|a|)
    y = xp.where(a >= 0, s, e * s)
    if out is None:
        return y
    out[...] = y
    return out


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), elementwise, without overflow for large |x|."""
    require_float("sigmoid", "x", x)
    xp = get_array_module(x)
    y = sigmoid(xp, x)
    return y, ActivationCache(x, y)


def sigmoid_backward(dy, cache):
    """dx = y (1 - y) dy. Returns (dx,)."""
    require_cache("sigmoid_backward", cache, "ActivationCache")
    require_gradient("sigmoid_backward", "dy", dy, cache.y.shape, "(same as x)")
    y = cache.y
    return (y * (1 - y) * dy,)


# --- GELU -------------------------------------------------------------------------------------

class GeluCache(NamedTuple):
    x: object
    approximate: str


def check_gelu_args(x, approximate):
    """The argument checks of ``gelu_forward``, shared with the kernels of the other tiers."""
    require_float("gelu", "x", x)
    require_choice("gelu", "approximate", approximate, GELU_APPROXIMATIONS)


def _at_least_float32(x):
    """16-bit ``x`` as float32 (``accumulation_dtype``; others as they are); the result goes back to
    x's type with ``astype(x.dtype.type)``, in native byte order. In float16 the
    tanh form's x^3 overflows from |x| ~ 40 on and 3 c x^2 from |x| ~ 700 on, where the backward's
    0.5 x (1 - tanh^2 u) du/dx was 0 * inf = nan; the exact form's 1 + erf(x/√2) rounds to 0 from
    x ~ -3 on (y = 0 at x = -4, where it is -1.3e-4), and its x^2 overflows from |x| = 256 on."""
    return x.astype(accumulation_dtype(x.dtype), copy=False)


def gelu_forward(x, *, approximate="tanh"):
    """GELU, y = x Φ(x); ``approximate="tanh"`` is GPT-2's form, ``"none"`` the exact erf form."""
    check_gelu_args(x, approximate)
    xp = get_array_module(x)
    xa = _at_least_float32(x)
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (xa + _GELU_CUBIC * xa * xa * xa)
        y = 0.5 * xa * (1 + xp.tanh(u))
    else:
        y = 0.5 * xa * (1 + _erf(xp, xa / math.sqrt(2.0)))
    return y.astype(x.dtype.type, copy=False), GeluCache(x, approximate)      # y in x's type


def gelu_backward(dy, cache):
    """dx = φ'(x) dy with the derivative of the chosen form (see the module docstring). Returns (dx,)."""
    require_cache("gelu_backward", cache, "GeluCache")
    x, approximate = cache.x, cache.approximate                # any tier's cache (the numba tier's also keeps e)
    require_gradient("gelu_backward", "dy", dy, x.shape, "(same as x)")
    xp = get_array_module(x)
    xa = _at_least_float32(x)
    if approximate == "tanh":
        tanh_u = xp.tanh(_SQRT_2_OVER_PI * (xa + _GELU_CUBIC * xa * xa * xa))
        du_dx = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * xa * xa)
        dphi = 0.5 * (1 + tanh_u) + 0.5 * xa * (1 - tanh_u * tanh_u) * du_dx
    else:
        Phi = 0.5 * (1 + _erf(xp, xa / math.sqrt(2.0)))
        pdf = xp.exp(-0.5 * xa * xa) / math.sqrt(2.0 * math.pi)
        dphi = Phi + xa * pdf
    dx = dphi * dy                                             # rounded once to 16 bits, below
    return (dx.astype(xp.result_type(x.dtype, dy.dtype).type, copy=False),)


# --- softmax ----------------------------------------------------------------------------------

class SoftmaxCache(NamedTuple):
    y: object       # (..., K) the probabilities; K the last axis (V for logits, Tk for scores)


def check_softmax_args(x):
    """The argument checks of ``softmax_forward``, shared with the kernels of the other tiers."""
    require_float("softmax", "x", x)
    require_min_ndim("softmax", "x", x, 1, "(..., K)")
    require_nonempty("softmax", "x", x, -1, "K", "(..., K)")


def softmax_forward(x):
    """y = exp(x - max) / sum(exp(x - max)) over the last axis."""
    check_softmax_args(x)
    xp = get_array_module(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))         # (..., K) every exponent <= 0
    y = e / xp.sum(e, axis=-1, keepdims=True)                  # (..., K)
    return y, SoftmaxCache(y)


def softmax_backward(dy, cache):
    """dx_i = y_i (dy_i - sum_j dy_j y_j). Returns (dx,)."""
    require_cache("softmax_backward", cache, "SoftmaxCache")
    y = cache.y
    require_gradient("softmax_backward", "dy", dy, y.shape, "(same as x)")
    xp = get_array_module(y)
    return (y * (dy - xp.sum(dy * y, axis=-1, keepdims=True)),)
