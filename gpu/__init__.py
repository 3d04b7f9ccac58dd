"""CuPy kernels, imported only when the ``cupy`` backend is chosen.

A name defined here replaces the reference function of the same name when the ``cupy``
backend is active; every other op runs the reference code with ``xp = cupy``. Each family file
(the reference tier's file names) lists what it replaces in its ``__all__``; this package
gathers those names from every file beside it. ``_core.py`` holds what the kernels share: the
dtypes, the one preamble of the elementwise kernels, and the row kernels' helpers. Kernels are
compiled on first use and cached on disk by CuPy (``CUPY_CACHE_DIR``).
"""
import importlib
import pkgutil


def _gather():
    names = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "run":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            names[name] = getattr(module, name)
    return names


globals().update(_gather())
