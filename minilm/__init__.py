"""minilm: small language models with every layer's forward and backward written by hand.

    import minilm
    minilm.use("numpy")                      # or "numba", "cupy"
    from minilm.reference import layernorm_forward, layernorm_backward
    report = minilm.gradcheck(layernorm_forward, layernorm_backward, (x, gamma, beta))
"""
import os as _os

# The packaging maps the checkout's top-level reference/, gpu/ and bench/ into this package
# (pyproject.toml). Python started in a checkout imports this folder itself, ahead of any
# installed copy, and without the mapping: then the three are found where they lie.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "reference")) and _os.path.isfile(
        _os.path.join(_checkout, "reference", "__init__.py")) and _os.path.isfile(
        _os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)

from minilm.backend import current, get_array_module, use  # noqa: E402
from minilm.gradcheck import GradcheckError, gradcheck  # noqa: E402

__version__ = "0.1.0"
__all__ = ["use", "current", "get_array_module", "gradcheck", "GradcheckError", "__version__"]
