r"""Inverted dropout as CuPy kernels, with a counter-based random mask.

``minilm.reference.dropout`` draws its uniforms from a generator seeded from ``rng``; on the GPU
that means building a cuRAND generator state per call. Here the uniform of element ``i`` is a
hash of (seed, i) instead (``dropout_keep`` in ``minilm.gpu._core``, SplitMix64's finaliser)
-- so one kernel draws the mask, applies it and scales, with no generator state at all. The seed
comes from ``rng`` exactly as in the reference (an int is used as it is; a numpy Generator gives
one draw), so runs are reproducible and resumable. The masks differ from the reference's (a
different generator); their law is the same, and the cache is the reference's ``DropoutCache``.

Inside a CUDA graph capture (``minilm.gpu.graph``) a seed cannot be a number fixed into the
kernel's arguments: every replay needs fresh masks. There ``dropout_seed`` hands out a slot of a
seed table in device memory instead (``recording_seeds``), the kernels read their seed from it,
and before each replay the graph fills the table with the draws an uncaptured step would have made,
in the same order. So a replayed step draws the masks of the same step run op by op.
"""
import contextlib
import functools

import cupy
import numpy as np

from minilm.gpu._core import contiguous, launch_elems, row_module, supported
from minilm.reference import dropout as reference
from minilm.reference.dropout import DropoutCache, _require_rng, draw_seed
from minilm.validate import require_float, require_gradient, require_probability

__all__ = ["dropout_forward", "dropout_backward"]

# Element kernels (minilm.gpu._core.launch_elems), as the tanh GELU's.
_SOURCE = r"""
// y = mask x * scale, mask_i = dropout_keep(seed, i): kept with probability keep = 1 - p
template <typename T>
__global__ void dropout_forward_elems(const T* __restrict__ x, T* __restrict__ y, bool* __restrict__ mask,
                                      const unsigned long long* seeds, int slot, unsigned long long seed,
                                      double keep, double scale, long long n) {
    typedef typename acc_t<T>::type A;
    if (slot >= 0) seed = seeds[slot];                             // a captured graph's seed table
    FOR_THREAD_ELEMENTS(i, n) {
        bool kept = dropout_keep(seed, (unsigned long long)i, keep);
        mask[i] = kept;
        y[i] = store<T>(kept ? load(x[i]) * (A)scale : (A)0);        // y = mask x / (1 - p)
    }
}

template <typename T>
__global__ void dropout_backward_elems(const T* __restrict__ dy, const bool* __restrict__ mask, T* __restrict__ dx,
                                       double scale, long long n) {
    typedef typename acc_t<T>::type A;
    FOR_THREAD_ELEMENTS(i, n) dx[i] = store<T>(mask[i] ? load(dy[i]) * (A)scale : (A)0);   // dx = mask dy / (1 - p)
}
"""
_kernel = row_module(_SOURCE, ["dropout_forward_elems", "dropout_backward_elems"])


class SeedTable:
    """Seeds in device memory for a captured graph: slot k holds the k-th mask's seed of a step."""

    def __init__(self, capacity=1024):
        self.seeds = cupy.zeros(capacity, dtype=cupy.uint64)
        self.used = 0

    def slot(self):
        if self.used == len(self.seeds):
            raise RuntimeError(f"minilm.gpu.dropout: a captured step draws more than {len(self.seeds)} dropout masks")
        self.used += 1
        return self.used - 1

    def fill(self, rng):
        """Write the seeds of one step into the table: ``draw_seed(rng)`` once per slot, in slot order."""
        if self.used:
            draws = np.array([draw_seed(rng) for _ in range(self.used)], dtype=np.uint64)
            self.seeds[:self.used].set(draws)


_recording = None          # the SeedTable of the capture in progress, if any


@contextlib.contextmanager
def recording_seeds(table):
    """Within this block ``dropout_seed`` hands out slots of ``table`` instead of drawing from rng."""
    global _recording
    previous, _recording = _recording, table
    try:
        yield table
    finally:
        _recording = previous


def dropout_seed(rng):
    """A mask's seed as the kernels take it: (table, slot, seed). Outside a capture the seed is
    ``draw_seed(rng)`` and the slot -1; inside one, a slot of the capture's table (rng is not drawn)."""
    if _recording is not None:
        return _recording.seeds, cupy.int32(_recording.slot()), cupy.uint64(0)
    return _no_table(), cupy.int32(-1), cupy.uint64(draw_seed(rng) % 2 ** 64)   # an int seed may pass 2^64


def no_seed():
    """The (table, slot, seed) of a kernel that draws no mask: nothing is drawn, and it is never read."""
    return _no_table(), cupy.int32(-1), cupy.uint64(0)


@functools.cache
def _no_table():
    """The table argument of a kernel that takes its seed as a number (never read)."""
    return cupy.zeros(1, dtype=cupy.uint64)


def dropout_forward(x, *, p, rng):
    """CuPy ``minilm.reference.dropout.dropout_forward`` (its own random stream; see the module docstring)."""
    require_float("dropout", "x", x)
    require_probability("dropout", "p", p)
    if not (p == 0 and rng is None):                           # p = 0 is the identity: it needs no rng
        _require_rng("dropout", rng)
    if p == 0 or not supported(x):
        return reference.dropout_forward(x, p=p, rng=rng)
    scale = 1.0 / (1.0 - float(p))
    x = contiguous(x)
    y, mask = cupy.empty(x.shape, dtype=x.dtype), cupy.empty(x.shape, dtype=cupy.bool_)
    launch_elems(_kernel("dropout_forward_elems", x.dtype), x.size,
                 (x, y, mask, *dropout_seed(rng), 1.0 - float(p), scale))
    return y, DropoutCache(mask, scale, x.shape)


def dropout_backward(dy, cache):
    """CuPy ``minilm.reference.dropout.dropout_backward``. Returns (dx,)."""
    mask, scale, shape = cache
    require_gradient("dropout_backward", "dy", dy, shape, "(same as x)")
    if mask is None or not supported(dy):
        return reference.dropout_backward(dy, cache)
    dy = contiguous(dy)
    dx = cupy.empty(dy.shape, dtype=dy.dtype)
    launch_elems(_kernel("dropout_backward_elems", dy.dtype), dy.size, (dy, contiguous(mask), dx, float(scale)))
    return (dx,)
