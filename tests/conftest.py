"""Fixtures shared by the tests."""
import pytest

from minilm import backend


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
