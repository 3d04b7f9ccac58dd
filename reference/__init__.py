"""The reference tier: every op's forward and backward, by hand, in NumPy.

Each op ``name`` is a pair of functions in the file of its family:

    out, cache = name_forward(x, W, ..., *, option=...)
    grads = name_backward(dout, cache)

The code is written against an array module ``xp`` taken from the inputs, so the same
functions run on CuPy arrays. Read the files in the order given in ``README.md`` beside
this file. Every op is importable from here: ``from minilm.reference import lstm_forward``.
"""
import importlib

# op -> the file (family) it lives in
FAMILY = {
    "linear": "linear",
    "embedding": "embedding",
    "relu": "activations",
    "tanh": "activations",
    "sigmoid": "activations",
    "gelu": "activations",
    "softmax": "activations",
    "dropout": "dropout",
    "layernorm": "layernorm",
    "attention": "attention",
    "self_attention": "attention",
    "cross_attention": "attention",
    "ffn": "ffn",
    "rnn": "rnn",
    "lstm": "lstm",
    "gru": "gru",
    "cross_entropy": "losses",
}
OPS = tuple(FAMILY)

__all__ = [f"{op}_{way}" for op in OPS for way in ("forward", "backward")]


def __getattr__(name):
    # minilm.reference.lstm_forward -> minilm.reference.lstm.lstm_forward, imported on first use
    op, _, way = name.rpartition("_")
    if op in FAMILY and way in ("forward", "backward"):
        module = importlib.import_module(f"{__name__}.{FAMILY[op]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
