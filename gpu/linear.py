"""The linear layer's products through ``minilm.gpu._blas.matmul``: cuBLAS called directly.

The math is ``minilm.reference.linear``'s, line for line: ``y = x W + b``; ``dx = dy W^T``,
``dW = x^T dy``, ``db = sum_n dy``. The products are the same cuBLAS products CuPy's ``@`` makes,
with the transposed operands (``W^T``, ``x^T``, and the tied head's ``wte^T``) read in place; they
go through this tier's own cuBLAS handle because CuPy's refuses to run inside a CUDA graph capture
(``minilm.gpu.graph``). The cache is the reference's ``LinearCache``; a dtype the products are not
checked for runs the reference.
"""
import math

import cupy

from minilm.gpu import _blas
from minilm.gpu._core import supported
from minilm.reference import linear as reference
from minilm.reference.linear import LinearCache, check_linear_args
from minilm.validate import require_gradient

__all__ = ["linear_forward", "linear_backward"]


def _ready(*arrays):
    return supported(*arrays) and _blas.available(arrays[0].dtype)


def linear_forward(x, W, b):
    """CuPy ``minilm.reference.linear.linear_forward``: same arguments, checks, output and cache."""
    check_linear_args(x, W, b)
    if not _ready(x, W):
        return reference.linear_forward(x, W, b)
    y = _blas.matmul(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), W)   # (N, C), N = all leading positions
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (W.shape[1],)), LinearCache(x, W, b is not None)


def linear_backward(dy, cache):
    """CuPy ``minilm.reference.linear.linear_backward``. Returns (dx, dW, db)."""
    x, W, has_bias = cache
    require_gradient("linear_backward", "dy", dy, x.shape[:-1] + (W.shape[1],), "(..., C)")
    if not _ready(dy, x, W) or dy.dtype != x.dtype:
        return reference.linear_backward(dy, cache)
    N = math.prod(x.shape[:-1])
    x2 = x.reshape(N, x.shape[-1])                             # (N, D)
    dy2 = dy.reshape(N, dy.shape[-1])                          # (N, C)
    dx = _blas.matmul(dy2, W.T).reshape(x.shape)               # (..., D)  from y = x W
    dW = _blas.matmul(x2.T, dy2)                               # (D, C)    W is shared by every n
    db = cupy.sum(dy2, axis=0) if has_bias else None           # (C,)
    return dx, dW, db
