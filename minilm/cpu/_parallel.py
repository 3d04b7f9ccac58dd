r"""Kernels with a serial and a parallel twin, and the rule that picks one.

``rows_kernel`` compiles a kernel twice, with and without ``parallel=True`` (``prange`` runs as
``range`` in the second). ``pick(kernel, work)`` returns the parallel twin only when Numba's
pool has the cores to itself and the work is large enough to share out:

* the numba backend gives the cores to BLAS (``minilm.backend._share_cores``), whose threads spin
  for a while after each matrix product; a parallel loop started beside them loses its cores to
  them, so while BLAS has more than one thread a kernel that runs between the products (every
  layer's) runs in the calling thread;
* the optimizer update (``pick(..., beside_blas=False)``) comes after the step's last product,
  the gradient clipping and the embedding's scatter-add, when BLAS's threads have gone back to
  sleep: it uses the pool whenever the pool has more than one thread. (On the GPT CPU preset,
  two cores: AdamW over 0.8M parameters takes 1.0-1.3 ms on the pool, 2.5-2.8 ms alone, while a
  layernorm or GELU on the pool right after a product runs 1.5 times slower than alone);
* waking the pool costs tens of microseconds, more than a one-row layernorm or a one-query
  attention step takes, so below ``MIN_PARALLEL_WORK`` elements the serial twin runs anyway.

Every kernel is compiled by ``minilm.cpu._jit.jit``, with ``nogil=True``: it lets go of Python's
lock while it runs, so that the threads of ``minilm.parallel``, each running a slice of the
batch on its own core, run their kernels at the same time. Inside those threads ``pick`` gives
the serial twins (``in_calling_thread``), and BLAS has one thread
(``minilm.backend.one_core_per_thread``).

``rows_kernel(fastmath=SUMS_IN_ANY_ORDER)`` lets the compiler add up a sum in any order. A
floating-point sum is otherwise a chain of additions, each waiting for the one before, that no
compiler may vectorise; with the additions reordered it runs eight lanes at a time. The result
changes by rounding only (no other fast-math assumption is made: infinities and NaNs keep
their meaning), and within a twin it is the same for any number of threads, since each row is
summed by one thread. The two twins are compiled apart, and the compiler may vectorise the same
sum in each its own way, so they agree to rounding, not always to the bit (Numba 0.59 on an
AVX-512 machine sums the float64 layernorm backward's rows differently in the two).
Only kernels whose every floating-point expression may be regrouped take it: not those that
call ``exp_nonpositive``, whose argument reduction relies on the order of its subtractions.

``rows_kernel(fastmath=FUSED_MULTIPLY_ADD)`` (LLVM's ``contract`` flag) lets the compiler compute
a product and the sum it feeds, ``a * b + c``, as one fused multiply-add, rounded once instead of
twice: half the instructions in a polynomial such as the exponential's, and a result that differs
by rounding only, with no regrouping of sums. The exponentials take it (the GELU, the attention
softmax and the recurrent kernels): the argument reduction :math:`x - n \ln 2` stays exact, since
:math:`n \ln 2_{hi}` is exact whether or not it is rounded on its own. On the GPT preset's
shapes it makes the GELU kernels 1.2-1.4 times faster. The recurrent kernels, which have no
parallel twin, take the same flag through ``minilm.cpu.rnn.step_kernel``.
"""
import contextlib

from minilm.cpu._jit import jit, renamed

SUMS_IN_ANY_ORDER = frozenset({"reassoc"})    # a kernel's sums may be added up in any order (see above)
FUSED_MULTIPLY_ADD = frozenset({"contract"})  # a product and the sum it feeds may be one instruction (see above)
MIN_PARALLEL_WORK = 16384     # elements; below this the pool's wake-up costs more than it saves

_pool = False                 # has Numba's pool more than one thread? Set by the numba backend.
_beside_blas = False          # may kernels between BLAS's products use it too (BLAS has one thread)?
_forced = None                # "serial" or "parallel": every pick, whatever the work (tests)


def use_pool(enabled, *, beside_blas):
    """Let ``pick`` return parallel twins (``enabled``), for the kernels between BLAS's products
    too when ``beside_blas``; or (not ``enabled``) only serial ones."""
    global _pool, _beside_blas
    _pool, _beside_blas = bool(enabled), bool(enabled and beside_blas)


def pool_in_use(beside_blas=True):
    """Would ``pick(..., beside_blas=beside_blas)`` give a large kernel the pool?"""
    return _beside_blas if beside_blas else _pool


@contextlib.contextmanager
def in_calling_thread():
    """Within: ``pick`` gives the kernels between the products their serial twins, as it does
    while BLAS has the cores (for ``minilm.backend.one_core_per_thread``)."""
    global _beside_blas
    saved, _beside_blas = _beside_blas, False
    try:
        yield
    finally:
        _beside_blas = saved


def force(twin):
    """Make every ``pick`` return the ``"serial"`` or the ``"parallel"`` twin, or (None) follow the
    rule again. For the tests, which hold both twins to the reference on the same inputs."""
    global _forced
    if twin not in (None, "serial", "parallel"):
        raise ValueError(f"force: argument 'twin' must be None, 'serial' or 'parallel', got {twin!r}")
    _forced = twin


def rows_kernel(fn=None, *, fastmath=False):
    """The parallel twin of kernel ``fn``, with the serial twin as its ``.serial``. Used as
    ``@rows_kernel``, or ``@rows_kernel(fastmath=...)`` with ``SUMS_IN_ANY_ORDER``,
    ``FUSED_MULTIPLY_ADD`` or their union (see the module docstring)."""
    if fn is None:
        return lambda f: rows_kernel(f, fastmath=fastmath)
    if fastmath not in (False, SUMS_IN_ANY_ORDER, FUSED_MULTIPLY_ADD, SUMS_IN_ANY_ORDER | FUSED_MULTIPLY_ADD):
        raise ValueError("rows_kernel: argument 'fastmath' must be False, SUMS_IN_ANY_ORDER, FUSED_MULTIPLY_ADD "
                         f"or both together, got {fastmath!r}")
    options = dict(error_model="numpy", fastmath=set(fastmath) if fastmath else False)
    parallel = jit(fn, parallel=True, **options)
    parallel.serial = jit(renamed(fn, "_serial"), **options)     # a name of its own in the cache
    return parallel


def pick(kernel, work, *, beside_blas=True):
    """The twin of ``kernel`` to run on ``work`` elements; ``beside_blas=False`` for a kernel that
    runs after the step's matrix products rather than between them (the optimizer update)."""
    if _forced is not None:
        return kernel if _forced == "parallel" else kernel.serial
    return kernel if pool_in_use(beside_blas) and work >= MIN_PARALLEL_WORK else kernel.serial
