"""Every op of the active backend under one name: ``ops.layernorm_forward(...)``.

Models call ops through this module, so switching backends with ``minilm.use`` changes
what runs without touching model code. The functions themselves live in
``minilm.reference`` (NumPy/CuPy), ``minilm.cpu`` (Numba) and ``minilm.gpu`` (CuPy kernels).
"""
from minilm import backend


def __getattr__(name):
    return backend.op(name)
