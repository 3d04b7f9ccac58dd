"""Fixtures shared by the tests, and hypothesis's settings for CI."""
import os
import sys

import pytest
from hypothesis import settings

# The tests choose their backends themselves: a shell's MINILM_BACKEND (cupy, on a machine without a
# GPU) had made every test fail, and numpy had changed what the numba tests test. Tests of the
# variable set it with monkeypatch.
os.environ.pop("MINILM_BACKEND", None)

from minilm import backend  # noqa: E402  (after the variable is gone)

# In CI (the environment variable CI set), hypothesis draws the same examples on every run, so that
# a submission lands or fails on its code alone; elsewhere it draws new ones each run, which is
# how it finds the rare inputs that the tests' comments describe.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


_blas, _modules_seen = (), -1       # threadpoolctl's BLAS controllers, found again after an import


def _thread_counts():
    """What a test could leave changed for the tests after it: each loaded BLAS library's thread
    count, Numba's, which kernels get Numba's pool, and PyTorch's (None where not yet imported)."""
    global _blas, _modules_seen
    if len(sys.modules) != _modules_seen:            # a module imported since: a library may have loaded
        from threadpoolctl import ThreadpoolController
        _blas, _modules_seen = ThreadpoolController().select(user_api="blas").lib_controllers, len(sys.modules)
    numba, torch = sys.modules.get("numba"), sys.modules.get("torch")
    pool = sys.modules.get("minilm.cpu._parallel")
    return {"BLAS": {lib.filepath: lib.get_num_threads() for lib in _blas},
            "Numba": numba.get_num_threads() if numba else None,
            "the kernels' pool": (pool.pool_in_use(), pool.pool_in_use(beside_blas=False)) if pool else None,
            "PyTorch": torch.get_num_threads() if torch else None}


@pytest.fixture(autouse=True)
def restore_backend():
    """Every test leaves the backend as it found it, whatever it switched to, and the cores shared
    out as before: a test that left BLAS at one thread (a share made for a faked Numba count of 1)
    had made a later test fail only in its company. A library first loaded during the test is not
    compared."""
    before = backend.current()
    counts = _thread_counts()
    yield
    backend.use(before)
    after = _thread_counts()
    after["BLAS"] = {path: n for path, n in after["BLAS"].items() if path in counts["BLAS"]}
    changed = [what for what, n in counts.items() if n is not None and after[what] != n]
    assert not changed, f"the test left the thread counts changed: {', '.join(changed)}"


@pytest.fixture
def broken_numba(monkeypatch):
    """``broken_numba(error)``: from then on in the test, ``import numba`` raises ``error``, as an
    installed Numba does beside a NumPy newer than it supports (ImportError) or where llvmlite's
    library does not load (OSError)."""
    import builtins
    real_import = builtins.__import__

    def break_it(error):
        def broken(name, *args, **kwargs):
            if name == "numba":
                raise error
            return real_import(name, *args, **kwargs)
        monkeypatch.delitem(sys.modules, "numba", raising=False)
        monkeypatch.setattr(builtins, "__import__", broken)
    return break_it


@pytest.fixture
def numpy_backend(restore_backend):
    """The test runs the reference ops: for the models, training and sampling, whose backend
    parity is tested op by op (and step by step in ``test_torch_parity.py``). Used through
    ``pytestmark = pytest.mark.usefixtures("numpy_backend")``."""
    backend.use("numpy")


@pytest.fixture(scope="module", params=["serial", "parallel"])
def kernel_twins(request):
    """Run a module's tests once with every kernel's serial twin (what the numba backend runs while
    BLAS has the cores) and once with every parallel twin (what runs when BLAS has one thread),
    whatever the size of the input: both must equal the reference."""
    from minilm.cpu import _parallel
    _parallel.force(request.param)
    yield request.param
    _parallel.force(None)
