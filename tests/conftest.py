"""Fixtures shared by the Numba tier's parity tests."""
import pytest


@pytest.fixture(scope="module", params=["serial", "parallel"])
def kernel_twins(request):
    """Run a module's tests once with every kernel's serial twin (what the numba backend runs while
    BLAS has the cores) and once with every parallel twin (what runs when BLAS has one thread),
    whatever the size of the input: both must equal the reference."""
    from minilm.cpu import _parallel
    _parallel.force(request.param)
    yield request.param
    _parallel.force(None)
