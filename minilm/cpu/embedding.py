r"""The embedding's backward, a scatter-add, as a Numba kernel.

The math, its derivation and the shapes are those of ``minilm.reference.embedding``; the kernel
below names the reference function it must equal, and ``tests/test_cpu_kernels.py`` holds it to
that. The forward stays the reference's: ``E[ids]`` is one NumPy gather, which a kernel does not
beat, and its cache is what ``embedding_backward`` here takes.

Backward: :math:`\bar E_v = \sum_{n : t_n = v} \bar y_n` over the N positions (every leading axis
flattened). Several positions may carry the same id, so a loop over positions split among
threads could have two threads add into the same row of :math:`\bar E` at once. Instead the
threads split the C channels into blocks of ``CHANNELS_PER_BLOCK`` (``prange`` over the blocks);
each walks every position in order and adds only its own columns, so no element of :math:`\bar E`
is ever written by two threads. Within a column the additions happen in the order of the
positions, as in the reference's ``xp.add.at``, so the result is the reference's bit for bit,
for any number of threads.
"""
import math

import numpy as np
from numba import prange

from minilm.cpu._parallel import pick, rows_kernel
from minilm.reference import embedding as reference
from minilm.validate import require_cache, require_gradient

__all__ = ["embedding_backward"]

KERNEL_DTYPES = (np.float32, np.float64)   # what the kernel compiles for; other dtypes (float16) run the reference
CHANNELS_PER_BLOCK = 16     # columns of dE per parallel block: 64 bytes of float32, one cache line


@rows_kernel
def _scatter_add_rows(ids, dout, dE):
    """Equals ``minilm.reference.embedding.embedding_backward``: dE[ids[n]] += dout[n], dE zeroed by the caller."""
    N, C = dout.shape
    n_blocks = -(-C // CHANNELS_PER_BLOCK)
    for blk in prange(n_blocks):                               # each thread owns whole columns of dE
        c0, c1 = blk * CHANNELS_PER_BLOCK, min(C, (blk + 1) * CHANNELS_PER_BLOCK)
        for n in range(N):                                     # positions in order, as xp.add.at
            v = ids[n]
            for c in range(c0, c1):
                dE[v, c] += dout[n, c]


def embedding_backward(dout, cache):
    """Numba ``minilm.reference.embedding.embedding_backward``: returns (None, dE)."""
    require_cache("embedding_backward", cache, "EmbeddingCache")
    ids, V, C = cache
    require_gradient("embedding_backward", "dout", dout, ids.shape + (C,), "(..., C)")
    if dout.dtype not in KERNEL_DTYPES:
        return reference.embedding_backward(dout, cache)
    N = math.prod(ids.shape)
    dE = np.zeros((V, C), dtype=dout.dtype)                    # (V, C)
    ids = np.ascontiguousarray(ids, dtype=ids.dtype.newbyteorder("="))   # Numba takes native byte order only
    pick(_scatter_add_rows, N * C)(ids.reshape(N), np.ascontiguousarray(dout).reshape(N, C), dE)
    return None, dE
