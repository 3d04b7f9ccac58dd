"""The backend switch: which tier runs the ops, and on which arrays.

| name    | arrays | what runs                                                        |
| ------- | ------ | ---------------------------------------------------------------- |
| numpy   | numpy  | the reference tier, as written                                   |
| numba   | numpy  | Numba kernels from ``minilm.cpu`` where one exists, else reference |
| cupy    | cupy   | CuPy kernels from ``minilm.gpu`` where one exists, else reference  |

Choose with ``minilm.use(name)``, the environment variable ``MINILM_BACKEND``, or
``--backend`` on every command. The default is ``numba`` when Numba imports, else ``numpy``.
Asking for a backend that cannot run here is an error naming what is missing.
"""
import contextlib
import importlib
import os
import re
import sys
import threading

import numpy as np

BACKENDS = ("numpy", "numba", "cupy")

# Numba's OpenMP threads spin after each parallel loop and would fight the BLAS threads that run
# the matrix products in between; its "workqueue" layer sleeps instead. Set before Numba is
# imported; a user's own setting wins. (See ``_share_cores`` for how the cores are shared.)
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_current = None     # the chosen backend's name
_tiers = ()         # modules searched in order for an op, most specialised first
_ops_found = {}     # op name -> the function ``op`` found for it on the active backend


def _load(name, instead="choose --backend numpy"):
    """Import what backend ``name`` needs and return its tiers, or raise naming what is missing and,
    for numba, the way round it: ``instead`` (the command line's option by default)."""
    reference = importlib.import_module("minilm.reference")
    if name == "numpy":
        return (reference,)
    if name == "numba":
        e = numba_import_error()
        if e is not None:
            raise RuntimeError(f"backend 'numba' needs the numba package, which did not import ({e}); "
                               f"{numba_repair(e)}, or {instead}")
        try:
            return (importlib.import_module("minilm.cpu"), reference)
        except RuntimeError as e:               # Numba's, when no folder it may cache in is writable
            if "cannot cache function" not in str(e):
                raise
            raise RuntimeError(f"backend 'numba' cannot cache its compiled kernels: Numba's user cache folder "
                               f"({_numba_user_cache()}) is not writable, nor, for a checkout, the checkout ({e}); "
                               f"set NUMBA_CACHE_DIR to a writable folder, or {instead}") from None
    if name == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError(f"backend 'cupy' needs the cupy package, which did not import ({e}); "
                               "install it with `pip install -e '.[gpu]'` in minilm's checkout, on a machine with an "
                               "NVIDIA GPU") from None
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # the CUDA driver is missing or broken
            raise RuntimeError(f"backend 'cupy' needs an NVIDIA GPU, but CUDA reported: {e}") from None
        if n == 0:
            raise RuntimeError("backend 'cupy' needs an NVIDIA GPU, but none was found")
        return (importlib.import_module("minilm.gpu"), reference)
    raise ValueError(f"minilm.use: argument 'name' must be one of {', '.join(BACKENDS)}, got {name!r}")


_blas_limit = None  # while the numba backend is active: the BLAS thread limit it set
_blas_libs = ()     # ... and threadpoolctl's controllers of the BLAS libraries loaded
_shared_for = None  # ... and the Numba thread count it shared the cores out for, as read in
_shared_in = None   # ... this thread (Numba's count is per thread; another thread reads the default)


def _share_cores(name):
    """On the numba backend, one pool of threads computes at a time.

    The cores go to BLAS, which runs the matrix products (most of a step), with as many threads
    as Numba's pool has (``NUMBA_NUM_THREADS``, default: every core), but never more than BLAS
    was started with (so ``OPENBLAS_NUM_THREADS=1`` still holds). Numba's kernels, which sit
    between the products, then run in the calling thread: OpenBLAS's workers spin for a while
    after each product, and a parallel Numba loop started beside them loses its cores to them
    (a GPT step on 2 cores took 93 ms with both pools at work, 55-60 ms this way on an idle
    machine; bench/RESULTS.md, "Against the targets of the Numba issue"). Only when BLAS
    has a single thread do those kernels use Numba's pool; the optimizer update, after the
    step's products, uses it whenever it has more than one thread (``minilm.cpu._parallel``).
    Other backends get the BLAS thread count back. (``minilm.parallel``, which training and
    evaluation use, shares the cores differently: a slice of the batch per core, see
    ``one_core_per_thread``.)
    """
    global _blas_limit, _blas_libs, _shared_for, _shared_in
    numba = sys.modules.get("numba") if name == "numba" else None
    recount = (numba is not None and threading.get_ident() == _shared_in
               and numba.get_num_threads() != _shared_for)     # the count changed where it was read
    if _blas_limit is not None and (numba is None or recount):
        _blas_limit.restore_original_limits()                  # another backend, or Numba's count changed
        _blas_limit, _blas_libs, _shared_for, _shared_in = None, (), None, None
    if name == "numba" and _blas_limit is None:
        import numba
        from threadpoolctl import ThreadpoolController
        from minilm.cpu import _parallel
        blas = ThreadpoolController().select(user_api="blas")
        started = max((lib.num_threads for lib in blas.lib_controllers), default=1)
        _shared_for, _shared_in = numba.get_num_threads(), threading.get_ident()
        threads = max(1, min(_shared_for, started))
        _blas_limit = blas.limit(limits=threads)
        _blas_libs = tuple(blas.lib_controllers)
        _parallel.use_pool(_shared_for > 1, beside_blas=threads == 1)


@contextlib.contextmanager
def one_core_per_thread():
    """Within: every BLAS product and every Numba kernel runs in the thread that calls it.

    For ``minilm.parallel``, which gives each core a slice of the batch in a thread of its own:
    BLAS's threads and Numba's pool would only compete with those threads for the cores. A
    numba-backend setting; elsewhere it changes nothing.
    """
    if current() != "numba":
        yield
        return
    from minilm.cpu import _parallel
    libs = [(lib, lib.num_threads) for lib in _blas_libs]
    for lib, _ in libs:
        lib.set_num_threads(1)
    try:
        with _parallel.in_calling_thread():
            yield
    finally:
        for lib, n in libs:
            lib.set_num_threads(n)



def _numba_user_cache():
    """The folder Numba caches in when nothing else is set (it follows XDG_CACHE_HOME, and macOS's and
    Windows' own places)."""
    try:
        from numba.misc.appdirs import AppDirs
        return AppDirs(appname="numba", appauthor=False).user_cache_dir
    except (ImportError, AttributeError):
        return "~/.cache/numba on Linux"

def use(name):
    """Select the backend ``name`` ('numpy', 'numba' or 'cupy') for every later op call."""
    global _current, _tiers
    if not isinstance(name, str):
        raise TypeError(f"minilm.use: argument 'name' must be a string, got {type(name).__name__}")
    _tiers = _load(name)
    _ops_found.clear()
    _share_cores(name)
    _current = name
    return name


def tier_functions(package):
    """name -> function for a kernel tier (``minilm.cpu``, ``minilm.gpu``): every name that a family
    file of the package (those not starting with ``_``) lists in its ``__all__``."""
    import pkgutil
    names = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            names[name] = getattr(module, name)
    return names


def numba_import_error():
    """None where numba imports, else the error it raised: ModuleNotFoundError naming numba where
    it is absent, another where it is installed but does not start (beside a NumPy newer than it
    supports; llvmlite's OSError where its library does not load)."""
    try:
        import numba  # noqa: F401
    except (ImportError, OSError) as e:
        return e
    return None


def numba_repair(e):
    """What a user runs where numba did not import with error ``e`` (from ``numba_import_error``):
    install it where it is absent; where it refuses the installed NumPy, a NumPy it takes."""
    if isinstance(e, ModuleNotFoundError) and e.name == "numba":
        return "install it with `pip install numba`"
    too_new = re.search(r"Numba needs NumPy (\d+)\.(\d+) or less", str(e))     # numba's own check, at its import
    if too_new:
        major, minor = too_new.groups()
        return f"install a NumPy it supports with `pip install 'numpy<{major}.{int(minor) + 1}'`"
    if re.search(r"Numba needs NumPy [\d.]+ or greater", str(e)):
        return "upgrade NumPy with `pip install -U numpy`"
    return "repair it with `pip install --force-reinstall numba llvmlite`"


def default_backend():
    """$MINILM_BACKEND when set, else numba when it imports, else numpy (with a warning where numba
    is installed but does not import)."""
    env = os.environ.get("MINILM_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable MINILM_BACKEND must be one of {', '.join(BACKENDS)}, got {env!r}")
        return env
    e = numba_import_error()
    if e is None:
        return "numba"
    if not (isinstance(e, ModuleNotFoundError) and e.name == "numba"):       # installed, but broken
        import warnings
        warnings.warn(f"numba is installed but does not import ({e}); running the numpy backend, "
                      f"the slower reference tier: {numba_repair(e)}, or choose "
                      "the numpy backend (--backend numpy, MINILM_BACKEND=numpy) to say so",
                      RuntimeWarning, stacklevel=2)
    return "numpy"


def current():
    """The name of the active backend (choosing the default on first use)."""
    if _current is None:
        use(default_backend())
    return _current


def op(name):
    """The function called ``name`` (e.g. 'layernorm_forward') from the active backend's tiers.

    Found once per backend: a model asks for every op at every step, and the search through the
    tiers (and the reference's import on first use) cost about 1% of a GPT CPU preset's step.
    ``use`` forgets what was found."""
    fn = _ops_found.get(name)               # filled only once a backend is chosen
    if fn is not None:
        return fn
    from minilm import reference
    if name not in reference.__all__:       # a tier's module or helper is not an op
        family = f"{name}_forward" in reference.__all__
        raise AttributeError(f"minilm: no op called {name!r}" + (
            f"; an op is a pair of functions: {name}_forward and {name}_backward" if family else
            "; the ops are " + ", ".join(f"{op}_forward/_backward" for op in reference.OPS)))
    current()
    for tier in _tiers:
        fn = getattr(tier, name, None)
        if fn is not None:
            _ops_found[name] = fn
            return fn
    raise AttributeError(f"minilm: no op called {name!r}")


def kernel(name, reference):
    """A specialised tier's ``name`` (e.g. a Numba 'adamw_update') if the active backend has one, else ``reference``.

    For functions outside the op table, such as the optimizer updates in ``minilm.optim``.
    """
    current()
    for tier in _tiers[:-1]:
        fn = getattr(tier, name, None)
        if fn is not None:
            return fn
    return reference


def xp():
    """The array module of the active backend: numpy, or cupy."""
    if current() == "cupy":
        import cupy
        return cupy
    return np


def get_array_module(*arrays):
    """numpy or cupy, from the type of the arrays (as chainer's and cupy's helpers do)."""
    for a in arrays:
        if a is not None and type(a).__module__.startswith("cupy"):
            import cupy
            return cupy
    return np


def accumulation_dtype(dtype):
    """The dtype that data of ``dtype`` is summed or computed in: float32 for 16-bit data (float16,
    bfloat16), as the GPU kernels take it, since float16 overflows past 65504 and a 16-bit running
    sum drops what falls below its last bit; ``dtype`` itself otherwise, in native byte order."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype.newbyteorder("=")


def sum_rows(a):
    """The sum of ``a``'s rows (over axis 0), in ``a``'s dtype, summed in ``accumulation_dtype``: NumPy
    adds float16 along an outer axis one row at a time in float16, so the sum of a parameter's
    gradient over thousands of positions lost whatever fell below the running sum's last bit (a
    (4096, C) array of 0.01 summed to 32 instead of 41)."""
    xp = get_array_module(a)
    return xp.sum(a, axis=0, dtype=accumulation_dtype(a.dtype)).astype(a.dtype.type, copy=False)


def to_numpy(a):
    """A numpy copy (or view) of a numpy or cupy array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def to_backend(a):
    """``a`` as an array of the active backend."""
    return xp().asarray(a)


@contextlib.contextmanager
def compile_notice(seconds=2.0, stream=None, write=None):
    """Around a first call: if it takes longer than ``seconds`` on the numba backend, say it is compiling.

    Numba compiles each kernel on first use and caches it on disk, so a cold first run spends
    its first step compiling; this says so instead of looking hung. A warm cache prints nothing.
    The line goes to ``write`` (a progress bar's, so that it lands above the bar) or else ``stream``.
    """
    if current() != "numba":
        yield
        return
    stream = stream or sys.stderr
    write = write or (lambda line: print(line, file=stream, flush=True))
    timer = threading.Timer(seconds, lambda: write(
        "numba: compiling kernels on first use (cached on disk; later runs start at once)..."))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
