r"""Inverted dropout as CuPy elementwise kernels, with a counter-based random mask.

``minilm.reference.dropout`` draws its uniforms from a generator seeded from ``rng``; on the GPU
that means building a cuRAND generator state per call. Here the uniform of element ``i`` is a
hash of (seed, i) instead (``dropout_keep`` in ``minilm.gpu._core``, SplitMix64's finaliser)
-- so one kernel draws the mask, applies it and scales, with no generator state at all. The seed
comes from ``rng`` exactly as in the reference (an int is used as it is; a numpy Generator gives
one draw), so runs are reproducible and resumable. The masks differ from the reference's (a
different generator); their law is the same, and the cache is the reference's ``DropoutCache``.
"""
import numbers

import cupy

from minilm.gpu._core import elementwise, supported
from minilm.reference import dropout as reference
from minilm.reference.dropout import DropoutCache, _require_rng
from minilm.validate import require_float, require_probability, require_shape

__all__ = ["dropout_forward", "dropout_backward"]

_forward = elementwise("T x, uint64 seed, float64 keep, float64 scale", "T y, bool mask", """
    mask = dropout_keep(seed, (unsigned long long)i, keep);        // kept with probability keep = 1 - p
    typedef acc_t<T>::type A;
    y = (T)(mask ? (A)x * (A)scale : (A)0);                          // y = mask x / (1 - p)
""", "minilm_dropout_forward")

_backward = elementwise("T dy, bool mask, float64 scale", "T dx", """
    typedef acc_t<T>::type A;
    dx = (T)(mask ? (A)dy * (A)scale : (A)0);                        // dx = mask dy / (1 - p)
""", "minilm_dropout_backward")


def dropout_seed(rng):
    """The seed of a mask, from ``rng`` as the reference takes it: an int itself, a Generator's next draw."""
    return rng if isinstance(rng, numbers.Integral) else int(rng.integers(2 ** 63))


def dropout_forward(x, *, p, rng):
    """CuPy ``minilm.reference.dropout.dropout_forward`` (its own random stream; see the module docstring)."""
    require_float("dropout", "x", x)
    require_probability("dropout", "p", p)
    _require_rng("dropout", rng)
    if p == 0 or not supported(x):
        return reference.dropout_forward(x, p=p, rng=rng)
    seed = dropout_seed(rng)
    scale = 1.0 / (1.0 - float(p))
    y, mask = _forward(x, cupy.uint64(seed), 1.0 - float(p), scale)
    return y, DropoutCache(mask, scale, x.shape)


def dropout_backward(dy, cache):
    """CuPy ``minilm.reference.dropout.dropout_backward``. Returns (dx,)."""
    mask, scale, shape = cache
    require_shape("dropout_backward", "dy", dy, shape, "(same as x)")
    if mask is None or not supported(dy):
        return reference.dropout_backward(dy, cache)
    return (_backward(dy, mask, float(scale)),)
