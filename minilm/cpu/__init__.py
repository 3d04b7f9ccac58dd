"""Numba-JIT CPU kernels, one file per layer family, each matching a function of ``minilm.reference``.

A name defined here replaces the reference function of the same name when the ``numba``
backend is active; every other op runs the reference code.
"""
