r"""Layer normalisation over the last axis.

Forward
-------
Each row :math:`x \in \mathbb{R}^C` (one position n; every index into the leading axes is a
position) is normalised on its own, then scaled and shifted by parameters shared by every row:

.. math::
    \mu = \frac1C \sum_i x_i, \qquad
    \sigma^2 = \frac1C \sum_i (x_i - \mu)^2, \qquad
    r = \frac{1}{\sqrt{\sigma^2 + \epsilon}},

.. math::
    \hat x_i = (x_i - \mu)\, r, \qquad
    y_i = \gamma_i \hat x_i + \beta_i .

:math:`\sigma^2` is the biased (divide by C) variance, as in PyTorch. :math:`r` is ``rstd`` in code
(llm.c's name). The cache keeps :math:`\hat x`, :math:`r` and :math:`\gamma`, all the backward
needs (llm.c keeps :math:`\mu` and :math:`r` and recomputes :math:`\hat x`).

Backward
--------
Write :math:`\bar y = \partial L / \partial y` (``dy`` in code), and so on for every quantity.

1. The parameters. :math:`y_i = \gamma_i \hat x_i + \beta_i` at every position n, and the
   parameters are shared by all of them, so

   .. math::  \bar\beta_i = \sum_n \bar y_{ni}, \qquad \bar\gamma_i = \sum_n \bar y_{ni}\, \hat x_{ni}.

2. Through the scale: :math:`\bar{\hat x}_i = \gamma_i \bar y_i`.

3. Through the normalisation, one row at a time. :math:`\hat x_i` depends on every
   :math:`x_j` of its row, through :math:`x_i`, :math:`\mu` and :math:`r`:

   .. math::
       \frac{\partial \mu}{\partial x_j} = \frac1C, \qquad
       \frac{\partial \sigma^2}{\partial x_j} = \frac2C (x_j - \mu)
           \quad\text{(the term through } \mu \text{ vanishes, as } \textstyle\sum_i (x_i - \mu) = 0\text{)},

   .. math::
       \frac{\partial r}{\partial x_j} = -\tfrac12 (\sigma^2 + \epsilon)^{-3/2}\,\frac{\partial \sigma^2}{\partial x_j}
           = -\frac{r^3 (x_j - \mu)}{C} = -\frac{r^2 \hat x_j}{C} .

   So, by the product rule on :math:`\hat x_i = (x_i - \mu)\, r`,

   .. math::
       \frac{\partial \hat x_i}{\partial x_j}
           = r\Big(\delta_{ij} - \frac1C\Big) + (x_i - \mu)\frac{\partial r}{\partial x_j}
           = \frac{r}{C}\big(C\,\delta_{ij} - 1 - \hat x_i \hat x_j\big).

4. Contract with :math:`\bar{\hat x}`:

   .. math::
       \bar x_j = \sum_i \bar{\hat x}_i \frac{\partial \hat x_i}{\partial x_j}
           = r\Big(\bar{\hat x}_j - \frac1C \sum_i \bar{\hat x}_i
               - \hat x_j\,\frac1C \sum_i \bar{\hat x}_i \hat x_i\Big).

   The compact form: subtract from :math:`\bar{\hat x}` its row mean and its row-mean projection on
   :math:`\hat x`, then scale by :math:`r`. These are the two directions in which :math:`\hat x`
   cannot move (it always has zero mean and, up to :math:`\epsilon`, unit variance).

Shapes
------
=======  =========  ============
name     forward    backward
=======  =========  ============
x        (..., C)   dx (..., C)
gamma    (C,)       dgamma (C,)
beta     (C,)       dbeta (C,)
y        (..., C)   dy (..., C)
x_hat    (..., C)   (cache)
rstd     (..., 1)   (cache)
=======  =========  ============
"""
from typing import NamedTuple

from minilm.backend import get_array_module, sum_rows
from minilm.validate import (require_cache, require_float, require_gradient, require_min_ndim, require_nonempty,
                             require_positive, require_same_dtype, require_shape)


class LayernormCache(NamedTuple):
    x_hat: object   # (..., C) the normalised input (x - mu) * rstd
    rstd: object    # (..., 1) r = 1 / sqrt(var + eps)
    gamma: object   # (C,)


def check_layernorm_args(x, gamma, beta, eps):
    """The argument checks of ``layernorm_forward``, shared with the kernels of the other tiers."""
    require_float("layernorm", "x", x)
    require_min_ndim("layernorm", "x", x, 1, "(..., C)")
    require_nonempty("layernorm", "x", x, -1, "C", "(..., C)")
    C = x.shape[-1]
    require_float("layernorm", "gamma", gamma)
    require_shape("layernorm", "gamma", gamma, (C,), "(C,)")
    require_float("layernorm", "beta", beta)
    require_shape("layernorm", "beta", beta, (C,), "(C,)")
    require_same_dtype("layernorm", x=x, gamma=gamma, beta=beta)
    require_positive("layernorm", "eps", eps)


def layernorm_forward(x, gamma, beta, *, eps=1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, over the last axis.

    Parameters
    ----------
    x : (..., C) float array.
    gamma : (C,) float array, the scale.
    beta : (C,) float array, the shift.
    eps : positive float added to the variance.

    Returns
    -------
    y : (..., C) array, and the cache for ``layernorm_backward``.
    """
    check_layernorm_args(x, gamma, beta, eps)
    xp = get_array_module(x)
    # the mean and the variance in float64, as the kernels take them: a float32 sum can leave the
    # mean of a constant row an ulp off, and x - mu = ±ulp divided by sqrt(eps) gives x_hat ~ 0.3
    # at x ~ 1e4 instead of 0; and (x - mu)^2 overflows in float16 from |x - mu| = 256 on (in
    # float32 from 1.8e19), where var = inf would give rstd = 0 and y = beta.
    mu = xp.mean(x, axis=-1, keepdims=True, dtype=xp.float64).astype(x.dtype)   # (..., 1)
    xc = x - mu                                                # (..., C) centred
    var = xp.mean(xp.square(xc, dtype=xp.float64), axis=-1, keepdims=True)      # (..., 1) biased variance
    rstd = (1.0 / xp.sqrt(var + eps)).astype(xc.dtype)         # (..., 1) in x's dtype (native byte order)
    x_hat = xc * rstd                                          # (..., C)
    y = gamma * x_hat + beta                                   # (..., C)
    return y, LayernormCache(x_hat, rstd, gamma)


def layernorm_backward(dy, cache):
    """Gradients of layernorm (see the module docstring for the derivation).

    Returns
    -------
    (dx, dgamma, dbeta) with the shapes of x, gamma, beta.
    """
    require_cache("layernorm_backward", cache, "LayernormCache")
    x_hat, rstd, gamma = cache
    require_gradient("layernorm_backward", "dy", dy, x_hat.shape, "(..., C)")
    xp = get_array_module(dy)
    C = x_hat.shape[-1]
    dy2 = dy.reshape(-1, C)                                    # (N, C), N = all leading positions
    dbeta = sum_rows(dy2)                                      # (C,)  from y = gamma x_hat + beta
    dgamma = sum_rows(dy2 * x_hat.reshape(-1, C))              # (C,)  from y = gamma x_hat + beta
    dx_hat = dy * gamma                                        # (..., C)
    # from x_hat = (x - mu) * rstd: remove the row mean and the projection on x_hat, then scale
    mean_dx_hat = xp.mean(dx_hat, axis=-1, keepdims=True)      # (..., 1)
    mean_dx_hat_x_hat = xp.mean(dx_hat * x_hat, axis=-1, keepdims=True)   # (..., 1)
    dx = rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)        # (..., C)
    return dx, dgamma, dbeta
