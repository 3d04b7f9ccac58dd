"""Parallel kernels with a serial twin for inputs too small to share out.

Waking Numba's thread pool costs tens of microseconds, more than a one-row layernorm or a
one-query attention step (the key/value-cache decode step) takes. ``rows_kernel`` compiles a
kernel twice, with and without ``parallel=True`` (``prange`` runs as ``range`` in the second),
and ``pick(kernel, work)`` returns the serial one below ``MIN_PARALLEL_WORK`` elements.
"""
import types

from numba import njit

MIN_PARALLEL_WORK = 16384     # elements; below this the pool's wake-up costs more than it saves


def _renamed(fn, suffix):
    """The same code under another qualified name: Numba's disk cache files a kernel by that
    name, not by its parallel flag, so the twins must not share it."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return twin


def rows_kernel(fn):
    parallel = njit(parallel=True, cache=True, error_model="numpy")(fn)
    parallel.serial = njit(cache=True, error_model="numpy")(_renamed(fn, "_serial"))
    return parallel


def pick(kernel, work):
    return kernel if work >= MIN_PARALLEL_WORK else kernel.serial
