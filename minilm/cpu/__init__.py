"""Numba-JIT CPU kernels, one file per layer family, each matching a function of the reference tier.

A name defined here replaces the function of the same name (a reference op, or an update of
``minilm.optim``) when the ``numba`` backend is active; every other op runs the reference code.
(``gpt_decode_step`` has no namesake: ``GPT.forward_step`` asks for it, and without it runs the
ops.) Each family file lists what it replaces in its ``__all__``; this package gathers those
names from every file beside it.
Kernels are compiled on first use and cached on disk (``NUMBA_CACHE_DIR`` chooses where), so
only the first run pays the compile time; ``_jit.py`` says how every kernel is compiled, and why
its cached name carries a digest of this package's and the reference tier's source.
"""
import sys

from minilm.backend import tier_functions

globals().update(tier_functions(sys.modules[__name__]))
