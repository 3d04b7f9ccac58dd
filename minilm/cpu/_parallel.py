"""Parallel kernels with a serial twin for inputs too small to share out.

Waking Numba's thread pool costs tens of microseconds, more than a one-row layernorm or a
one-query attention step (the key/value-cache decode step) takes. ``rows_kernel`` compiles a
kernel twice, with and without ``parallel=True`` (``prange`` runs as ``range`` in the second),
and ``pick(kernel, work)`` returns the serial one below ``MIN_PARALLEL_WORK`` elements.
"""
from numba import njit

MIN_PARALLEL_WORK = 16384     # elements; below this the pool's wake-up costs more than it saves


def rows_kernel(fn):
    parallel = njit(parallel=True, cache=True, error_model="numpy")(fn)
    parallel.serial = njit(cache=True, error_model="numpy")(fn)
    return parallel


def pick(kernel, work):
    return kernel if work >= MIN_PARALLEL_WORK else kernel.serial
