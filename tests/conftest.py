"""Fixtures shared by the tests, and hypothesis's settings for CI."""
import os

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


@pytest.fixture(autouse=True)
def restore_backend():
    """Every test leaves the backend as it found it, whatever it switched to."""
    before = backend.current()
    yield
    backend.use(before)


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
