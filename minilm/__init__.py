"""minilm: small language models with every layer's forward and backward written by hand.

    import minilm
    minilm.use("numpy")                      # or "numba", "cupy"
    from minilm.reference import layernorm_forward, layernorm_backward
    report = minilm.gradcheck(layernorm_forward, layernorm_backward, (x, gamma, beta))
"""
from minilm.backend import current, get_array_module, use
from minilm.gradcheck import GradcheckError, gradcheck

__version__ = "0.1.0"
__all__ = ["use", "current", "get_array_module", "gradcheck", "GradcheckError", "__version__"]
