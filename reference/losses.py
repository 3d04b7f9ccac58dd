r"""Cross-entropy of logits against integer targets, fused with a stable log-softmax.

Forward
-------
At every position n (any leading axes) the logits :math:`z_n \in \mathbb{R}^V` give the
log-probabilities through a log-softmax, computed with the row maximum :math:`m_n` taken out so
that nothing overflows:

.. math::
    \log p_{nj} = z_{nj} - \operatorname{logsumexp}(z_n)
                = (z_{nj} - m_n) - \log \sum_k e^{z_{nk} - m_n}, \qquad m_n = \max_k z_{nk}.

A position is *counted* when its target :math:`t_n` is not ``ignore_index``; M is the number of
counted positions. With label smoothing :math:`\varepsilon \in [0, 1]`, exactly as PyTorch
defines it, each counted position's loss is

.. math::
    \ell_n = (1 - \varepsilon)\,(-\log p_{n t_n}) + \varepsilon\,\frac1V \sum_j (-\log p_{nj}),

and the loss is their mean, :math:`L = \frac1M \sum_{n \text{ counted}} \ell_n`. With no counted
position at all the loss is defined here as 0, with a zero gradient (PyTorch returns NaN, 0/0).

Backward
--------
1. Write the smoothed target distribution :math:`q_{nj} = (1 - \varepsilon)[j = t_n] + \varepsilon/V`.
   It sums to 1 over j, and :math:`\ell_n = -\sum_j q_{nj} \log p_{nj}`.

2. :math:`-\log p_{nj} = \operatorname{logsumexp}(z_n) - z_{nj}`, and
   :math:`\partial \operatorname{logsumexp}(z_n) / \partial z_{ni} = p_{ni}` (the softmax). So

   .. math::
       \ell_n = \operatorname{logsumexp}(z_n) \sum_j q_{nj} - \sum_j q_{nj} z_{nj}
              = \operatorname{logsumexp}(z_n) - \sum_j q_{nj} z_{nj},
       \qquad
       \frac{\partial \ell_n}{\partial z_{ni}} = p_{ni} - q_{ni}.

   (With :math:`\varepsilon = 0` this is the familiar "probabilities minus one-hot".)

3. The mean over the counted positions and the upstream scalar gradient :math:`\bar L`
   (``dloss`` in code) scale it; an ignored position gets nothing:

   .. math::  \bar z_{ni} = \bar L\, \frac{[t_n \ne \text{ignore\_index}]}{M}\, (p_{ni} - q_{ni}).

Fusing the softmax into the loss this way is both cheaper and more accurate than chaining the
softmax backward with the derivative of a log: no :math:`1/p` ever appears.

Shapes
------
=======  =========  ===============
name     forward    backward
=======  =========  ===============
logits   (..., V)   dlogits (..., V)
targets  (...)      None
p        (..., V)   (cache)
loss     ()         dloss ()
=======  =========  ===============
"""
import numbers
from typing import NamedTuple

from minilm.backend import accumulation_dtype, get_array_module
from minilm.validate import (as_scalar_gradient, require_cache, require_float, require_ids, require_min_ndim,
                             require_nonempty, require_probability, require_shape)


class CrossEntropyCache(NamedTuple):
    p: object                # (..., V) softmax probabilities
    t: object                # (...) targets, with ignored positions pointed at class 0
    counted: object          # (...) bool, True where the target is not ignore_index
    M: int                   # number of counted positions
    label_smoothing: float   # epsilon


def check_cross_entropy_args(logits, targets, ignore_index, label_smoothing):
    """The argument checks of ``cross_entropy_forward``, shared with the kernels of the other tiers.

    Returns ``counted``, (...) bool: True where the target is not ``ignore_index``.
    """
    require_float("cross_entropy", "logits", logits)
    require_min_ndim("cross_entropy", "logits", logits, 1, "(..., V)")
    require_nonempty("cross_entropy", "logits", logits, -1, "V", "(..., V)")
    require_shape("cross_entropy", "targets", targets, logits.shape[:-1], "(...) = logits' leading dims")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"cross_entropy: option 'ignore_index' must be an integer, got {ignore_index!r}")
    require_probability("cross_entropy", "label_smoothing", label_smoothing, upper_open=False)
    require_ids("cross_entropy", "targets", targets, logits.shape[-1], ignore_index=ignore_index)   # in [0, V)
    return targets != ignore_index                             # (...)


def cross_entropy_forward(logits, targets, *, ignore_index=-100, label_smoothing=0.0):
    """Mean cross-entropy over the counted targets, with PyTorch's label smoothing.

    Parameters
    ----------
    logits : (..., V) float array.
    targets : (...) integer array; each in [0, V) or equal to ``ignore_index``.
    ignore_index : int, targets equal to it are left out of the loss and the mean.
    label_smoothing : float in [0, 1].

    Returns
    -------
    loss : 0-d array of logits' dtype, and the cache for ``cross_entropy_backward``.
    """
    counted = check_cross_entropy_args(logits, targets, ignore_index, label_smoothing)   # (...)
    xp = get_array_module(logits)
    eps = float(label_smoothing)                               # a Python float keeps logits' dtype
    M = int(xp.sum(counted))

    m = xp.max(logits, axis=-1, keepdims=True)                 # (..., 1)
    zc = logits - m                                            # (..., V) every entry <= 0
    logp = zc - xp.log(xp.sum(xp.exp(zc), axis=-1, keepdims=True))   # (..., V)
    t = xp.where(counted, targets, 0)                          # (...) any valid class where ignored
    nll = -xp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]   # (...)  -log p_t
    smooth = -xp.mean(logp, axis=-1)                           # (...)  mean over V of -log p_j
    # without smoothing the loss is nll alone: eps * smooth would be 0 * inf = NaN where a logit is -inf
    ell = (1.0 - eps) * nll + eps * smooth if eps else nll     # (...)
    # summed in float32 for 16-bit logits, as the GPU kernel sums them: a float16 sum passes its
    # largest value, 65504, at 16k positions of loss ln 65 (one batch of the shakespeare-char preset)
    acc = accumulation_dtype(logits.dtype)
    loss = xp.sum(xp.where(counted, ell, 0.0), dtype=acc) / max(M, 1)   # ()  0 when nothing is counted
    loss = xp.asarray(loss, dtype=logits.dtype)                # () a 0-d array, not a scalar
    return loss, CrossEntropyCache(xp.exp(logp), t, counted, M, eps)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * [counted] / M * (p - q), q the smoothed one-hot of the targets.

    Parameters
    ----------
    dloss : the upstream gradient of the scalar loss, a 0-d array or a float.

    Returns
    -------
    (dlogits, None): dlogits has the shape of logits; the integer targets get no gradient.
    """
    require_cache("cross_entropy_backward", cache, "CrossEntropyCache")
    p, t, counted, M, eps = cache
    xp = get_array_module(p)
    # 16-bit logits take dloss and the shares in float32: a loss scale of 2^16 is inf in float16
    acc = accumulation_dtype(p.dtype)
    dloss = as_scalar_gradient("cross_entropy_backward", "dloss", dloss, xp, acc)         # ()
    V = p.shape[-1]
    onehot = (xp.arange(V) == t[..., None]).astype(p.dtype)   # (..., V)
    q = (1.0 - eps) * onehot + eps / V                         # (..., V) smoothed target distribution
    share = xp.asarray(dloss / max(M, 1), dtype=acc)           # () (NumPy 1 makes float32 / int float64)
    w = counted.astype(acc) * share                            # (...) each counted position's share
    dlogits = ((p - q) * w[..., None]).astype(p.dtype, copy=False)     # (..., V)
    return dlogits, None
