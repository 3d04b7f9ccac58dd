"""Every op of the active backend under one name: ``ops.layernorm_forward(...)``.

Models call ops through this module, as ``ops.name_forward(...)``, so switching backends with
``minilm.use`` changes what runs without touching model code. (``from minilm.ops import
layernorm_forward`` binds the function of the backend active at that moment, and keeps it.)
The functions themselves live in ``minilm.reference`` (NumPy/CuPy), ``minilm.cpu`` (Numba)
and ``minilm.gpu`` (CuPy kernels).
"""
from minilm import backend


def __getattr__(name):
    return backend.op(name)


def __dir__():
    from minilm import reference
    return sorted(list(globals()) + reference.__all__)
