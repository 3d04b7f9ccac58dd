"""The backend switch."""
import importlib.util

import numpy as np
import pytest

import minilm
from minilm import backend, cli, ops


@pytest.fixture(autouse=True)
def restore_backend():
    before = backend.current()
    yield
    backend.use(before)


def test_use_and_current():
    assert minilm.use("numpy") == "numpy" and minilm.current() == "numpy"
    from minilm.reference import linear_forward
    assert ops.linear_forward is linear_forward


def test_numba_falls_back_to_reference_where_it_has_no_kernel():
    minilm.use("numba")
    from minilm import cpu
    from minilm.reference import linear_forward
    expected = getattr(cpu, "linear_forward", linear_forward)
    assert ops.linear_forward is expected


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="minilm.use: argument 'name' must be one of numpy, numba, cupy, got 'torch'"):
        minilm.use("torch")
    with pytest.raises(TypeError, match="argument 'name' must be a string"):
        minilm.use(3)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cupy_without_cupy_is_a_clear_error_not_a_fallback(capsys):
    with pytest.raises(RuntimeError, match="backend 'cupy' needs the cupy package"):
        minilm.use("cupy")
    with pytest.raises(SystemExit):
        cli.main(["gradcheck", "--backend", "cupy"])
    assert "backend 'cupy' needs the cupy package" in capsys.readouterr().err


def test_environment_variable_picks_the_default(monkeypatch):
    monkeypatch.setenv("MINILM_BACKEND", "numpy")
    assert backend.default_backend() == "numpy"
    monkeypatch.delenv("MINILM_BACKEND")
    assert backend.default_backend() == "numba"     # numba is a required dependency


def test_unknown_op_is_an_error():
    with pytest.raises(AttributeError, match="no op called 'conv_forward'"):
        ops.conv_forward


def test_array_module():
    assert backend.get_array_module(np.ones(2), None) is np


def test_a_slow_first_numba_call_says_it_is_compiling(capsys):
    import io
    import time
    minilm.use("numba")
    stream = io.StringIO()
    with backend.compile_notice(seconds=0.05, stream=stream):
        time.sleep(0.3)                                 # stands in for a cold-cache compile
    assert "compiling kernels on first use" in stream.getvalue()
    quiet = io.StringIO()
    with backend.compile_notice(seconds=5, stream=quiet):
        pass                                            # a warm cache: nothing to say
    minilm.use("numpy")
    with backend.compile_notice(seconds=0.0, stream=quiet):
        time.sleep(0.05)                                # numpy never compiles
    assert quiet.getvalue() == ""
