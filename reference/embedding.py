r"""The embedding: a lookup of one row of a table per token id.

Forward
-------
With a table :math:`E \in \mathbb{R}^{V \times C}` and integer ids :math:`t_n \in [0, V)` at every
position n (any leading shape),

.. math::  y_n = E_{t_n} \qquad (y_{nc} = E_{t_n c}).

This equals a linear layer applied to one-hot rows, :math:`y_n = \mathrm{onehot}(t_n)\, E`,
without ever building them.

Backward
--------
Write :math:`\bar y = \partial L / \partial y` (``dout`` in code). Since
:math:`\partial y_{nc} / \partial E_{vc'} = [t_n = v]\,[c = c']`,

.. math::  \bar E_v = \sum_{n \,:\, t_n = v} \bar y_n ,

that is :math:`\bar E = \mathrm{onehot}(t)^\top \bar y`: each position sends its gradient row to
the row of E it read, and an id that occurs at several positions receives the **sum** of their
gradients; rows never read get zero. In code this is a scatter-add, ``xp.add.at(dE, t, dout)``.
The plain ``dE[t] += dout`` would be wrong: with a repeated id, each assignment overwrites the
previous one and only one of the gradients survives. The ids are integers, so they get no
gradient (``None``).

Shapes
------
=====  ==========  =============
name   forward     backward
=====  ==========  =============
ids    (...)       None
E      (V, C)      dE (V, C)
y      (..., C)    dout (..., C)
=====  ==========  =============
"""
from typing import NamedTuple

from minilm.backend import accumulation_dtype, get_array_module
from minilm.validate import require_cache, require_float, require_gradient, require_ids, require_ndim, require_nonempty


class EmbeddingCache(NamedTuple):
    ids: object     # (...) the token ids t
    V: int          # rows of the table
    C: int          # columns of the table


def embedding_forward(ids, E):
    """y = E[ids]: row ``ids[n]`` of the table at every position n.

    Parameters
    ----------
    ids : (...) integer array of token ids, each in [0, V).
    E : (V, C) float array, the table.

    Returns
    -------
    y : (..., C) array, and the cache for ``embedding_backward``.
    """
    require_float("embedding", "E", E)
    require_ndim("embedding", "E", E, 2, "(V, C)")
    require_nonempty("embedding", "E", E, 1, "C", "(V, C)")
    V, C = E.shape
    require_ids("embedding", "ids", ids, V)
    y = E[ids]                                                 # (..., C)
    return y, EmbeddingCache(ids, V, C)


def embedding_backward(dout, cache):
    """dE[v] = sum of dout over the positions whose id is v.

    Returns
    -------
    (None, dE): no gradient for the integer ids; dE has the shape (V, C) of E.
    """
    require_cache("embedding_backward", cache, "EmbeddingCache")
    ids, V, C = cache
    require_gradient("embedding_backward", "dout", dout, ids.shape + (C,), "(..., C)")
    xp = get_array_module(dout)
    # a 16-bit dout accumulates in float32, rounded once at the end, as the GPU kernel does: thousands
    # of positions share an id in a character model, and a float16 running sum would lose most of them
    acc = accumulation_dtype(dout.dtype)
    dE = xp.zeros((V, C), dtype=acc)                           # (V, C)
    # from y = E[ids]: scatter every row of dout back to its id; repeated ids accumulate
    xp.add.at(dE, ids.reshape(-1), dout.reshape(-1, C).astype(acc, copy=False))   # (N,) ids, (N, C) rows
    return None, dE.astype(dout.dtype, copy=False)              # (V, C) in dout's dtype
