"""The backend switch."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest

import minilm
from minilm import backend, cli, ops


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


def test_an_op_found_on_one_backend_is_not_kept_after_switching():
    # backend.op remembers what it found, per backend: switching must forget it
    from minilm.cpu import layernorm_forward as numba_layernorm
    from minilm.reference import layernorm_forward as reference_layernorm
    minilm.use("numba")
    assert ops.layernorm_forward is numba_layernorm
    minilm.use("numpy")
    assert ops.layernorm_forward is reference_layernorm
    minilm.use("numba")
    assert ops.layernorm_forward is numba_layernorm


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="minilm.use: argument 'name' must be one of numpy, numba, cupy, got 'torch'"):
        minilm.use("torch")
    with pytest.raises(TypeError, match="argument 'name' must be a string"):
        minilm.use(3)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cupy_without_cupy_is_a_clear_error_not_a_fallback(capsys):
    with pytest.raises(RuntimeError, match="backend 'cupy' needs the cupy package"):
        minilm.use("cupy")
    assert cli.main(["gradcheck", "--backend", "cupy"]) == 2
    err = capsys.readouterr().err                # one line: a fact about the machine, not the options' usage
    assert err.startswith("minilm gradcheck: error: backend 'cupy' needs the cupy package") and err.count("\n") == 1
    assert "`pip install -e '.[gpu]'` in minilm's checkout" in err and "minilm[gpu]" not in err   # not on PyPI


def _fake_cupy(get_device_count):
    """A stand-in for an installed CuPy whose CUDA runtime answers ``get_device_count()``."""
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


def _no_driver():
    raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")


@pytest.mark.parametrize("count, message", [
    (lambda: 0, r"backend 'cupy' needs an NVIDIA GPU, but none was found"),
    (_no_driver, r"backend 'cupy' needs an NVIDIA GPU, but CUDA reported: cudaErrorInsufficientDriver"),
])
def test_cupy_without_a_gpu_is_a_clear_error_not_a_fallback(monkeypatch, count, message):
    minilm.use("numpy")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count))
    with pytest.raises(RuntimeError, match=message):
        minilm.use("cupy")
    assert minilm.current() == "numpy"                       # the backend in use is kept


def test_without_numba_the_default_is_numpy_and_asking_for_numba_is_a_clear_error(monkeypatch):
    minilm.use("numpy")
    monkeypatch.delenv("MINILM_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)          # `import numba` raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # absent, as the user chose: not a word
        assert backend.default_backend() == "numpy"
    with pytest.raises(RuntimeError, match=r"backend 'numba' needs the numba package, which did not import .*"
                                           r"install it with `pip install numba`, or choose --backend numpy"):
        minilm.use("numba")
    assert minilm.current() == "numpy"


# Numba's own words at its import where it refuses the NumPy installed (numba/__init__.py), and
# llvmlite's where its library does not load; each with the command that repairs it.
BROKEN_NUMBAS = [(ImportError("Numba needs NumPy 2.3 or less. Got NumPy 2.4."), "`pip install 'numpy<2.4'`"),
                 (ImportError("Numba needs NumPy 2.5 or less. Got NumPy 2.10."), "`pip install 'numpy<2.6'`"),
                 (ImportError("Numba needs NumPy 1.22 or greater. Got NumPy 1.21."), "`pip install -U numpy`"),
                 (OSError("Could not find/load shared object file: libllvmlite.so"),
                  "`pip install --force-reinstall numba llvmlite`")]


@pytest.mark.parametrize("error, repair", BROKEN_NUMBAS)
def test_a_numba_that_is_installed_but_does_not_import_is_named_when_numpy_is_chosen(monkeypatch, broken_numba,
                                                                                      error, repair):
    """The default falls back to numpy without a word only where numba is absent; a broken one
    had left every command on the slower tier, its one trace the word "numpy" in the first line
    (or, for llvmlite's OSError, ended every command in an error naming neither). The way out is
    the one for its error: `pip install -U numba` had been the advice for every one, and does
    nothing where the newest numba does not take the NumPy installed."""
    monkeypatch.delenv("MINILM_BACKEND", raising=False)
    broken_numba(error)
    with pytest.warns(RuntimeWarning, match=rf"numba is installed but does not import \({re.escape(str(error))}\); "
                                            rf"running the numpy backend, .*{re.escape(repair)}.*--backend numpy"):
        assert backend.default_backend() == "numpy"
    with pytest.raises(RuntimeError, match=r"backend 'numba' needs the numba package, which did not import .*"
                                           rf"{re.escape(repair)}.*, or choose --backend numpy"):
        minilm.use("numba")


def test_the_command_line_says_its_numba_does_not_import(tmp_path):
    """One line in the command's own voice (pytest would catch the warning in process)."""
    code = ("import builtins, sys\n"
            "real_import = builtins.__import__\n"
            "def broken(name, *args, **kwargs):\n"
            "    if name == 'numba':\n"
            "        raise ImportError('Numba needs NumPy 2.3 or less. Got NumPy 2.4.')\n"
            "    return real_import(name, *args, **kwargs)\n"
            "builtins.__import__ = broken\n"
            "from minilm.cli import main\n"
            "sys.exit(main(['gradcheck', '--op', 'relu']))\n")
    env = {k: v for k, v in os.environ.items() if k != "MINILM_BACKEND"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("minilm gradcheck: warning: numba is installed but does not import (Numba needs NumPy")
    assert run.stderr.count("\n") == 1 and "backend numpy" in run.stdout


def test_environment_variable_picks_the_default(monkeypatch):
    monkeypatch.setenv("MINILM_BACKEND", "numpy")
    assert backend.default_backend() == "numpy"
    monkeypatch.delenv("MINILM_BACKEND")
    assert backend.default_backend() == "numba"     # numba is a required dependency


def test_unknown_op_is_an_error():
    with pytest.raises(AttributeError, match="no op called 'conv_forward'; the ops are linear_forward/_backward, "):
        ops.conv_forward


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_ops_holds_the_op_functions_only(backend_name):
    """A tier's family module (``layernorm``, once imported) or helper is not an op: ``ops.layernorm(x, ...)``
    had failed with "'module' object is not callable"."""
    minilm.use(backend_name)                        # the autouse fixture restores the backend
    ops.layernorm_forward(np.ones((1, 2)), np.ones(2), np.zeros(2))
    for name in ("layernorm", "attention", "sys", "split_heads"):
        with pytest.raises(AttributeError, match=f"no op called '{name}'"):
            getattr(ops, name)
    with pytest.raises(AttributeError, match="an op is a pair of functions: layernorm_forward and layernorm_backward"):
        ops.layernorm
    assert "gru_backward" in dir(ops) and "layernorm" not in dir(ops)


def test_array_module():
    assert backend.get_array_module(np.ones(2), None) is np


def test_a_slow_first_numba_call_says_it_is_compiling(capsys):
    import io
    import time
    minilm.use("numba")
    said = threading.Event()
    lines = []
    with backend.compile_notice(seconds=0.05, write=lambda line: (lines.append(line), said.set())):
        said.wait(timeout=30)                           # stands in for a cold-cache compile, however slow the timer
    assert lines and "compiling kernels on first use" in lines[0]
    stream = io.StringIO()                              # the same line, printed to a stream
    with backend.compile_notice(seconds=0.05, stream=stream):
        deadline = time.monotonic() + 30
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert stream.getvalue() == lines[0] + "\n"
    quiet = io.StringIO()
    with backend.compile_notice(seconds=5, stream=quiet):
        pass                                            # a warm cache: nothing to say
    minilm.use("numpy")
    with backend.compile_notice(seconds=0.0, stream=quiet):
        time.sleep(0.05)                                # numpy never compiles
    assert quiet.getvalue() == ""


def _blas_threads():
    from threadpoolctl import threadpool_info
    return {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}


def test_threadpoolctl_sees_numpys_openblas():
    """The numba backend shares the cores through threadpoolctl. threadpoolctl before 3.5 does not
    know NumPy 2's OpenBLAS (scipy-openblas): it then finds no BLAS, and training ran at half speed
    without a word. pyproject asks for 3.5; this holds the installed pair to it."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except TypeError:                                   # NumPy before 1.26: one attribute per library found
        blas = " ".join(name for name in dir(np.__config__) if "blas" in name)
    if "openblas" not in blas.lower():
        pytest.skip(f"NumPy's BLAS is {blas!r}, not OpenBLAS")
    assert _blas_threads(), "threadpoolctl finds no BLAS library in this process: pip install -U threadpoolctl"


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_numba_backend_gives_the_cores_to_blas_and_runs_its_kernels_serially():
    """One pool computes at a time: BLAS gets Numba's thread count (never more than it started
    with) and the kernels take their serial twins; switching away gives BLAS its count back."""
    import numba
    from minilm.cpu import _parallel
    before = backend.current()
    try:
        backend.use("numpy")
        started = _blas_threads()
        if not started:
            pytest.skip("threadpoolctl finds no BLAS library")
        backend.use("numba")
        expected = min(numba.get_num_threads(), max(started))
        assert _blas_threads() == {expected}
        assert _parallel.pool_in_use() == (expected == 1 and numba.get_num_threads() > 1)
        assert _parallel.pool_in_use(beside_blas=False) == (numba.get_num_threads() > 1)
        backend.use("numpy")
        assert _blas_threads() == started
    finally:
        backend.use(before)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_numba_kernels_use_the_pool_when_blas_has_one_thread():
    """With BLAS held to one thread (as OPENBLAS_NUM_THREADS=1 does) the numba backend keeps it
    there and lets the kernels use Numba's pool instead."""
    import numba
    from threadpoolctl import threadpool_limits
    from minilm.cpu import _parallel
    before = backend.current()
    try:
        backend.use("numpy")
        if not _blas_threads():
            pytest.skip("threadpoolctl finds no BLAS library")
        with threadpool_limits(limits=1, user_api="blas"):
            backend.use("numba")
            assert _blas_threads() == {1}
            assert _parallel.pool_in_use() == (numba.get_num_threads() > 1)
            assert _parallel.pool_in_use(beside_blas=False) == (numba.get_num_threads() > 1)
            backend.use("numpy")
    finally:
        backend.use(before)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_pick_gives_the_pool_to_large_kernels_only_where_the_rule_allows():
    """Between BLAS's products only with ``beside_blas``; after them (the optimizer) whenever the
    pool is in use; never below MIN_PARALLEL_WORK elements."""
    from minilm.cpu import _parallel
    kernel = _parallel.rows_kernel(lambda a: None)
    big, small = _parallel.MIN_PARALLEL_WORK, _parallel.MIN_PARALLEL_WORK - 1
    before = (_parallel.pool_in_use(beside_blas=False), _parallel.pool_in_use())
    try:
        _parallel.use_pool(True, beside_blas=False)
        assert _parallel.pick(kernel, big) is kernel.serial
        assert _parallel.pick(kernel, big, beside_blas=False) is kernel
        assert _parallel.pick(kernel, small, beside_blas=False) is kernel.serial
        _parallel.use_pool(True, beside_blas=True)
        assert _parallel.pick(kernel, big) is kernel
        _parallel.use_pool(False, beside_blas=True)                # no pool: nothing uses it
        assert _parallel.pick(kernel, big) is kernel.serial
        assert _parallel.pick(kernel, big, beside_blas=False) is kernel.serial
    finally:
        _parallel.use_pool(before[0], beside_blas=before[1])


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_in_calling_thread_gives_serial_twins_and_restores_the_rule_after_an_error():
    """Inside, the kernels between the products get their serial twins and the optimizer keeps the
    pool; on leaving, even by an exception (a failing slice of ``minilm.parallel``), the rule is back."""
    from minilm.cpu import _parallel
    kernel = _parallel.rows_kernel(lambda a: None)
    big = _parallel.MIN_PARALLEL_WORK
    before = (_parallel.pool_in_use(beside_blas=False), _parallel.pool_in_use())
    try:
        _parallel.use_pool(True, beside_blas=True)
        with pytest.raises(RuntimeError, match="a failing slice"):
            with _parallel.in_calling_thread():
                assert _parallel.pick(kernel, big) is kernel.serial
                assert _parallel.pick(kernel, big, beside_blas=False) is kernel
                raise RuntimeError("a failing slice")
        assert _parallel.pick(kernel, big) is kernel
    finally:
        _parallel.use_pool(before[0], beside_blas=before[1])


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_rows_kernel_takes_only_the_sums_and_fma_flags():
    from minilm.cpu import _parallel
    expected = "must be False, SUMS_IN_ANY_ORDER, FUSED_MULTIPLY_ADD or both together"
    for flags in ({"fast"}, {"contract", "nnan"}, frozenset({"nnan"})):
        with pytest.raises(ValueError, match=rf"rows_kernel: argument 'fastmath' {expected}, got {re.escape(repr(flags))}"):
            _parallel.rows_kernel(fastmath=flags)(lambda a: None)
    both = _parallel.rows_kernel(fastmath=_parallel.SUMS_IN_ANY_ORDER | _parallel.FUSED_MULTIPLY_ADD)(lambda a: a)
    assert both.targetoptions["fastmath"] == {"reassoc", "contract"}


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_every_kernel_lets_go_of_the_lock_under_a_name_tagged_with_its_options_and_the_source():
    """Numba's disk cache keys a kernel by its name and its own file only, so minilm.cpu._jit
    appends a digest of the options and of the kernels' source files to the name: a change to a
    decorator's options or to another file the kernel is built from must not load the old code."""
    import pkgutil
    from numba.core.registry import CPUDispatcher
    import minilm.cpu as cpu
    from minilm.cpu import _jit

    kernels = {}
    for info in pkgutil.iter_modules(cpu.__path__):
        module = importlib.import_module(f"minilm.cpu.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.py_func.__module__ == module.__name__:
                kernels[f"{info.name}.{name}"] = value
                if hasattr(value, "serial"):
                    kernels[f"{info.name}.{name}.serial"] = value.serial
    assert len(kernels) > 30                                    # every family file's kernels were found
    for where, kernel in kernels.items():
        assert kernel.targetoptions.get("nogil") and kernel.jit_options["cache"], where
        assert kernel.py_func.__qualname__.endswith("__" + _jit.cache_tag(kernel.jit_options)), where


def test_the_cache_tag_changes_with_the_options_and_with_the_source(tmp_path):
    pytest.importorskip("numba")
    from minilm.cpu import _jit
    base = {"cache": True, "nogil": True, "fastmath": {"contract"}}
    assert _jit.cache_tag(base) == _jit.cache_tag(dict(reversed(list(base.items()))))   # order does not matter
    assert _jit.cache_tag(base) != _jit.cache_tag({**base, "nogil": False})
    assert _jit.cache_tag(base) != _jit.cache_tag({**base, "fastmath": {"contract", "reassoc"}})
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not source\n")
    before = _jit.source_digest([tmp_path])
    (tmp_path / "notes.txt").write_text("changed\n")
    assert _jit.source_digest([tmp_path]) == before             # only .py files count
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _jit.source_digest([tmp_path]) != before
    # the tag's digest covers the kernels' folder and the reference tier, whose constants (the
    # GELU's) and functions the kernels read: a change to either must compile them afresh
    import minilm.reference
    assert _jit.SOURCE_DIGEST == _jit.source_digest([os.path.dirname(_jit.__file__), *minilm.reference.__path__])


def test_python_started_in_the_checkout_finds_the_mapped_packages():
    """In a checkout, ``python`` imports its minilm/ folder ahead of an installed copy (after a plain
    ``pip install .``), without the packaging's mapping of reference/, gpu/ and bench/ into it: the
    package finds them itself. The editable install's finder is taken away to show that."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in getattr(f, '__name__', type(f).__name__).lower()]; "
            "import minilm.reference, minilm.bench; import minilm; minilm.use('numpy'); "
            "from minilm.models import GPT; print(minilm.reference.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pathlib.Path(done.stdout.strip()) == root / "reference" / "__init__.py"


def test_an_installed_copy_caches_its_kernels_outside_its_package(monkeypatch, tmp_path):
    """Kernels cached beside an installed copy's sources are files pip does not know: a later
    `pip install -e .` left site-packages/minilm behind, which then hid the editable install. An
    installed copy caches in Numba's user-wide folder, and never beside its sources, even where
    that folder cannot be written; a checkout, and other code, as before."""
    from numba.core import caching
    from minilm.cpu import _jit, activations
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # Numba's user-wide folder, here
    locator = _jit.INSTALLED_COPY_LOCATOR
    assert locator is not None                                  # this Numba has the hook
    in_tree = next(c for c in caching.CacheImpl._locator_classes if c.__name__ == "InTreeUnlessInstalled")
    kernel = activations._softmax_forward_kernel.py_func
    path = kernel.__code__.co_filename
    monkeypatch.setattr(_jit, "_INSTALLED", False)              # a checkout: Numba's next locator, in the tree
    assert locator.from_function(kernel, path) is None and in_tree.from_function(kernel, path) is not None
    monkeypatch.setattr(_jit, "_INSTALLED", True)
    where = os.path.abspath(locator.from_function(kernel, path).get_cache_path())
    assert where.startswith(str(tmp_path / "cache" / "numba")) and not where.startswith(_jit._PACKAGE + os.sep)
    assert in_tree.from_function(kernel, path) is None          # never beside an installed copy's sources
    assert locator.from_function(np.sum, np.__file__) is None    # not minilm's: not ours to place


def test_the_installed_copys_cache_hook_finds_numba_0_59_to_0_61s_names(monkeypatch):
    """Numba before 0.62 names its cache locators with a leading underscore (_InTreeCacheLocator,
    _UserWideCacheLocator; 0.59.1 as here), and pyproject allows numba>=0.59: the hook is found there
    too, not silently left out (an installed copy then cached beside its sources again)."""
    import types
    import numba.core
    from minilm.cpu import _jit

    class _InTreeCacheLocator:
        @classmethod
        def from_function(cls, py_func, py_file):
            return cls

    class _UserWideCacheLocator(_InTreeCacheLocator):
        pass

    classes = [object, _InTreeCacheLocator, _UserWideCacheLocator]     # NUMBA_CACHE_DIR's first, as Numba has it
    old_numba = types.SimpleNamespace(CacheImpl=types.SimpleNamespace(_locator_classes=classes),
                                      _InTreeCacheLocator=_InTreeCacheLocator,
                                      _UserWideCacheLocator=_UserWideCacheLocator)
    monkeypatch.setattr(numba.core, "caching", old_numba)
    locator = _jit._installed_copy_locator()
    assert locator is not None and classes[1] is locator        # after NUMBA_CACHE_DIR's, before the in-tree one
    assert _InTreeCacheLocator not in classes                   # replaced by the one that skips an installed copy

def test_no_writable_cache_folder_for_numba_says_what_to_set(tmp_path):
    """A read-only install and a read-only home (a container run as another user): Numba refuses
    every cached kernel; the backend says how to give it a folder. (Numba's own message names
    neither NUMBA_CACHE_DIR nor --backend numpy.)"""
    import subprocess
    import sys
    code = ("import numba.core.caching as caching\n"
            "(getattr(caching, 'CacheImpl', None) or caching._CacheImpl)._locator_classes = []\n"
            "import minilm\n"
            "try:\n    minilm.use('numba')\nexcept RuntimeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "NUMBA_CACHE_DIR": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("backend 'numba' cannot cache its compiled kernels") and \
        "set NUMBA_CACHE_DIR to a writable folder, or choose --backend numpy" in done.stdout
    if sys.platform.startswith("linux"):                    # the folder Numba tried, which follows XDG_CACHE_HOME
        assert f"Numba's user cache folder ({tmp_path / 'xdg' / 'numba'}) is not writable" in done.stdout



@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="with CuPy the script runs the GPU suite")
@pytest.mark.skipif(os.name == "nt" or shutil.which("bash") is None, reason="gpu/run.sh is a bash script")
def test_the_gpu_script_stops_where_there_is_no_gpu(tmp_path):
    """Every GPU test skips without CuPy and a GPU: gpu/run.sh had said 'GPU tests: exit code 0'
    there, having checked nothing."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["bash", os.path.join(root, "gpu", "run.sh"), str(tmp_path / "out"), "tests"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "gpu/run.sh: CuPy with a GPU is needed" in done.stderr
    assert not (tmp_path / "out" / "gpu-tests.log").exists()


def test_numba_backend_passes_on_an_import_error_that_is_not_about_its_cache(monkeypatch):
    real = backend.importlib.import_module

    def import_module(name, *args):
        if name == "minilm.cpu":
            raise RuntimeError("numba: some other failure")
        return real(name, *args)

    monkeypatch.setattr(backend.importlib, "import_module", import_module)
    with pytest.raises(RuntimeError, match=r"^numba: some other failure$"):
        backend.use("numba")


# --- each was a surviving mutant of minilm/backend.py --------------------------------------------

@pytest.mark.parametrize("name", ["numpy", "numba", "cupy"])
def test_environment_variable_names_the_default_whichever_backend_it_names(monkeypatch, name):
    """default_backend only reads the name (use() then says what is missing): MINILM_BACKEND=cupy
    on a GPU machine must not fall back to a CPU backend, nor be refused as unknown."""
    monkeypatch.setenv("MINILM_BACKEND", name)
    assert backend.default_backend() == name
    monkeypatch.setenv("MINILM_BACKEND", "")                # set but empty (`export MINILM_BACKEND=`): as unset
    assert backend.default_backend() == "numba"
    monkeypatch.setenv("MINILM_BACKEND", "Numba")
    with pytest.raises(ValueError, match=r"^environment variable MINILM_BACKEND must be one of numpy, numba, cupy, "
                                         r"got 'Numba'$"):
        backend.default_backend()


def test_kernel_is_the_tiers_own_function_on_its_backend_and_the_reference_elsewhere():
    """The optimizers ask ``backend.kernel`` for their update: the numba backend runs minilm.cpu's,
    the numpy backend the reference passed in."""
    from minilm import cpu, optim
    minilm.use("numba")
    assert backend.kernel("adamw_update", optim.adamw_update) is cpu.adamw_update
    assert backend.kernel("no_such_kernel", optim.adamw_update) is optim.adamw_update
    minilm.use("numpy")
    assert backend.kernel("adamw_update", optim.adamw_update) is optim.adamw_update


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_one_core_per_thread_gives_blas_its_threads_back():
    """Inside, BLAS has one thread; after, the count the numba backend gave it. (The backend is
    switched away and back first: a count left at 1 by an earlier call is not taken as the start.)"""
    backend.use("numpy")
    backend.use("numba")
    given = _blas_threads()
    if not given:
        pytest.skip("threadpoolctl finds no BLAS library")
    with backend.one_core_per_thread():
        assert _blas_threads() == {1}
    assert _blas_threads() == given
    with pytest.raises(RuntimeError, match="a failing slice"):
        with backend.one_core_per_thread():
            raise RuntimeError("a failing slice")
    assert _blas_threads() == given


def _two_numba_and_blas_threads():
    """Numba's thread count, and BLAS's counts on the numpy backend; skips where either is below 2."""
    import numba
    threads = numba.get_num_threads()
    backend.use("numpy")
    started = _blas_threads()
    if threads < 2 or not started or max(started) < 2:
        pytest.skip("needs 2 Numba threads and a BLAS library with 2")
    return threads, started


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_choosing_numba_from_another_thread_keeps_the_share_made_for_this_threads_count():
    """Numba's thread count is per thread: another thread reads the default, which is no reason to
    share the cores out again (and OpenBLAS ignores a count set from that thread, so BLAS had
    stayed at one thread for the rest of the process)."""
    import numba
    from minilm.cpu import _parallel
    threads, started = _two_numba_and_blas_threads()
    try:
        numba.set_num_threads(1)
        backend.use("numba")
        worker = threading.Thread(target=backend.use, args=("numba",))
        worker.start()
        worker.join()
        assert _blas_threads() == {1} and not _parallel.pool_in_use(beside_blas=False)
    finally:
        numba.set_num_threads(threads)
        backend.use("numpy")
    assert _blas_threads() == started


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_choosing_numba_again_after_its_thread_count_changed_shares_the_cores_out_again(monkeypatch):
    """A share made for one Numba thread (BLAS held to 1, no pool) is not kept once Numba has its
    threads back: a test that faked a count of 1 had left the tests after it on one BLAS thread."""
    import numba
    from minilm.cpu import _parallel
    threads, started = _two_numba_and_blas_threads()
    with monkeypatch.context() as m:
        m.setattr(numba, "get_num_threads", lambda: 1)
        backend.use("numba")
        assert _blas_threads() == {1} and not _parallel.pool_in_use(beside_blas=False)
    backend.use("numba")                                # the count is back: shared out for it
    assert _blas_threads() == {min(threads, max(started))} and _parallel.pool_in_use(beside_blas=False)
    backend.use("numpy")
    assert _blas_threads() == started


def test_the_compile_notice_is_called_off_when_the_call_ends(monkeypatch):
    """A warm cache: the notice's timer is cancelled when the first call ends, normally or by an
    error, so it never speaks later in the middle of what follows (a stand-in timer: nothing waits,
    so a slow machine cannot make it speak)."""
    import io
    timers = []

    class Timer:
        def __init__(self, seconds, say):
            self.seconds, self.started, self.cancelled = seconds, False, False
            timers.append(self)

        def start(self):
            self.started = True

        def cancel(self):
            self.cancelled = True
    monkeypatch.setattr(backend.threading, "Timer", Timer)
    minilm.use("numba")
    with backend.compile_notice(seconds=2.0, stream=io.StringIO()):
        assert timers[0].started and not timers[0].cancelled
    assert timers[0].cancelled
    with pytest.raises(RuntimeError, match="a failing first call"):
        with backend.compile_notice(seconds=2.0, stream=io.StringIO()):
            raise RuntimeError("a failing first call")
    assert len(timers) == 2 and timers[1].cancelled


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_numba_backend_with_one_numba_thread_keeps_blas_to_one_and_gives_its_count_back():
    """NUMBA_NUM_THREADS=1 (here numba.set_num_threads(1)): BLAS gets one thread, the kernels no pool;
    choosing numba twice and then numpy gives BLAS the count it had before, not the 1 it was held to."""
    import numba
    from minilm.cpu import _parallel
    numba_threads = numba.get_num_threads()
    try:
        backend.use("numpy")
        started = _blas_threads()
        if not started or max(started) < 2:
            pytest.skip("needs a BLAS library with 2 threads or more")
        numba.set_num_threads(1)
        backend.use("numba")
        assert _blas_threads() == {1}
        assert not _parallel.pool_in_use() and not _parallel.pool_in_use(beside_blas=False)
        backend.use("numba")                            # chosen again: the limit is not taken twice
        backend.use("numpy")
        assert _blas_threads() == started
    finally:
        numba.set_num_threads(numba_threads)
        backend.use("numpy")
