r"""The embedding's backward on the GPU: a scatter-add, accumulated in the compute dtype.

``dE[v] = sum of dout over the positions whose id is v`` (``minilm.reference.embedding``). CuPy's
``add.at`` adds with atomic operations, so repeated ids are race-free; for 16-bit ``dout`` the
sums are kept in float32 and rounded once at the end (thousands of positions share one id in a
character model, and a 16-bit running sum would lose most of them).
"""
import cupy

from minilm.gpu._core import acc_dtype, supported
from minilm.reference import embedding as reference
from minilm.validate import require_gradient

__all__ = ["embedding_backward"]


def embedding_backward(dout, cache):
    """CuPy ``minilm.reference.embedding.embedding_backward``. Returns (None, dE)."""
    ids, V, C = cache
    require_gradient("embedding_backward", "dout", dout, ids.shape + (C,), "(..., C)")
    if not supported(dout):
        return reference.embedding_backward(dout, cache)
    acc = acc_dtype(dout.dtype)
    dE = cupy.zeros((V, C), dtype=acc)                                  # (V, C)
    cupy.add.at(dE, cupy.asarray(ids).reshape(-1), dout.reshape(-1, C).astype(acc, copy=False))
    return None, dE.astype(dout.dtype, copy=False)
