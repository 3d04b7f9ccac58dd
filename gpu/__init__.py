"""CuPy kernels, imported only when the ``cupy`` backend is chosen.

A name defined here replaces the reference function of the same name when the ``cupy``
backend is active; every other op runs the reference code with ``xp = cupy``. Each family file
(the reference tier's file names) lists what it replaces in its ``__all__``; this package
gathers those names from every file beside it. ``_core.py`` holds what the kernels share: the
dtypes, the one preamble of the elementwise kernels, and the row kernels' helpers. Kernels are
compiled on first use and cached on disk by CuPy (``CUPY_CACHE_DIR``).
"""
import sys

from minilm.backend import tier_functions

globals().update(tier_functions(sys.modules[__name__]))
