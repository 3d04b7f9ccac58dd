"""``--threads`` for the benchmarks that run minilm in the ``minilm bench`` process itself (per-op
times, time to a loss): the worker processes get it through their environment (``run._env``), and
these get it here, so that minilm and the PyTorch peer compute with the same number of threads."""
import contextlib


@contextlib.contextmanager
def limited(threads):
    """Within: Numba's pool and BLAS use at most ``threads`` threads, and the numba backend shares
    them out as at start-up (``minilm.backend._share_cores``); afterwards, what was before."""
    import numba
    from threadpoolctl import threadpool_limits

    import minilm
    from minilm import backend
    before, active = numba.get_num_threads(), backend.current()
    minilm.use("numpy")                                 # lets the numba backend share the new count out
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            minilm.use(active)
            try:
                yield
            finally:
                minilm.use("numpy")
    finally:
        numba.set_num_threads(before)
        minilm.use(active)


@contextlib.contextmanager
def torch_limited(threads):
    """Within: PyTorch computes with ``threads`` threads; afterwards, with as many as before (its
    count is the process's: a peer run from Python left every later PyTorch call on its count)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
