"""A small example input for every op: what ``minilm gradcheck`` and the parity tests run.

``CASES[op](rng, dtype)`` returns ``(args, kwargs)`` for ``op_forward``. Shapes are small so
that every argument is checked element by element in a second or two; values keep clear of
the kinks of relu (|x| >= 0.1) so finite differences never straddle one.
"""
import numpy as np

# (B, T, C, NH, V, H, D): the dimension letters of DESIGN, kept small
B, T, C, NH, V, H, D = 2, 5, 8, 2, 11, 6, 4


def _normal(rng, dtype, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def _away_from_zero(rng, dtype, *shape):
    x = rng.uniform(0.1, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    return x.astype(dtype)


def _linear(rng, dtype):
    return (_normal(rng, dtype, B, T, D), _normal(rng, dtype, D, C, scale=0.5), _normal(rng, dtype, C)), {}


def _embedding(rng, dtype):
    ids = rng.integers(0, V, (B, T))
    ids[0, :2] = 3                      # a repeated id, so accumulation is exercised
    return (ids, _normal(rng, dtype, V, C)), {}


def _layernorm(rng, dtype):
    return (_normal(rng, dtype, B, T, C), 1 + _normal(rng, dtype, C, scale=0.1), _normal(rng, dtype, C, scale=0.1)), {}


def _unary(rng, dtype):
    return (_normal(rng, dtype, B, T, C),), {}


def _relu(rng, dtype):
    return (_away_from_zero(rng, dtype, B, T, C),), {}


def _gelu_exact(rng, dtype):
    return (_normal(rng, dtype, B, T, C),), {"approximate": "none"}


def _dropout(rng, dtype):
    return (_normal(rng, dtype, B, T, C),), {"p": 0.3, "rng": 1234}


def _attention(rng, dtype):
    hs = C // NH
    q, k, v = (_normal(rng, dtype, B, NH, T, hs) for _ in range(3))
    return (q, k, v), {"causal": True}


def _attention_dropout(rng, dtype):
    args, kwargs = _attention(rng, dtype)
    return args, {**kwargs, "dropout": 0.25, "rng": 5}     # an int seed: the same mask at every call


def _attention_masked(rng, dtype):
    hs = C // NH
    q, k, v = (_normal(rng, dtype, B, NH, T, hs) for _ in range(3))
    mask = rng.random((B, 1, T, T)) < 0.7
    mask[..., 0] = True                 # every query may attend somewhere
    return (q, k, v), {"mask": mask}


def _self_attention(rng, dtype):
    s = 1 / np.sqrt(C)
    return (_normal(rng, dtype, B, T, C), _normal(rng, dtype, C, 3 * C, scale=s), _normal(rng, dtype, 3 * C, scale=0.1),
            _normal(rng, dtype, C, C, scale=s), _normal(rng, dtype, C, scale=0.1)), {"n_head": NH, "causal": True}


def _self_attention_masked(rng, dtype):
    """Causal, with the last two positions of the second sequence padding: a (B, 1, T) mask."""
    args, kwargs = _self_attention(rng, dtype)
    mask = np.ones((B, 1, T), dtype=bool)
    mask[1, :, T - 2:] = False
    return args, {**kwargs, "mask": mask}


def _cross_attention(rng, dtype):
    s, Tk = 1 / np.sqrt(C), T + 2
    mask = rng.random((B, T, Tk)) < 0.7
    mask[..., 0] = True
    return (_normal(rng, dtype, B, T, C), _normal(rng, dtype, B, Tk, C),
            _normal(rng, dtype, C, C, scale=s), _normal(rng, dtype, C, scale=0.1),
            _normal(rng, dtype, C, 2 * C, scale=s), _normal(rng, dtype, 2 * C, scale=0.1),
            _normal(rng, dtype, C, C, scale=s), _normal(rng, dtype, C, scale=0.1)), {"n_head": NH, "mask": mask}


def _ffn(rng, dtype):
    s = 1 / np.sqrt(C)
    return (_normal(rng, dtype, B, T, C), _normal(rng, dtype, C, 4 * C, scale=s), _normal(rng, dtype, 4 * C, scale=0.1),
            _normal(rng, dtype, 4 * C, C, scale=s / 2), _normal(rng, dtype, C, scale=0.1)), {"activation": "gelu"}


def _rnn(rng, dtype):
    s = 1 / np.sqrt(H)
    return (_normal(rng, dtype, B, T, D), _normal(rng, dtype, B, H, scale=0.5), _normal(rng, dtype, D, H, scale=s),
            _normal(rng, dtype, H, H, scale=s), _normal(rng, dtype, H, scale=0.1)), {}


def _lstm(rng, dtype):
    s = 1 / np.sqrt(H)
    return (_normal(rng, dtype, B, T, D), _normal(rng, dtype, B, H, scale=0.5), _normal(rng, dtype, B, H, scale=0.5),
            _normal(rng, dtype, D, 4 * H, scale=s), _normal(rng, dtype, H, 4 * H, scale=s),
            _normal(rng, dtype, 4 * H, scale=0.1)), {}


def _gru(rng, dtype):
    s = 1 / np.sqrt(H)
    return (_normal(rng, dtype, B, T, D), _normal(rng, dtype, B, H, scale=0.5),
            _normal(rng, dtype, D, 3 * H, scale=s), _normal(rng, dtype, H, 3 * H, scale=s),
            _normal(rng, dtype, 3 * H, scale=0.1), _normal(rng, dtype, 3 * H, scale=0.1)), {}


def _cross_entropy(rng, dtype):
    targets = rng.integers(0, V, (B, T))
    targets[1, 3] = -100                # one ignored target
    return (_normal(rng, dtype, B, T, V), targets), {"label_smoothing": 0.1}


# op -> list of (label, case); the label says which variant a row of the report checks
CASES = {
    "linear": [("", _linear)],
    "embedding": [("", _embedding)],
    "relu": [("", _relu)],
    "tanh": [("", _unary)],
    "sigmoid": [("", _unary)],
    "gelu": [("tanh", _unary), ("exact", _gelu_exact)],
    "softmax": [("", _unary)],
    "dropout": [("", _dropout)],
    "layernorm": [("", _layernorm)],
    "attention": [("causal", _attention), ("mask", _attention_masked), ("dropout", _attention_dropout)],
    "self_attention": [("", _self_attention), ("mask", _self_attention_masked)],
    "cross_attention": [("", _cross_attention)],
    "ffn": [("", _ffn)],
    "rnn": [("", _rnn)],
    "lstm": [("", _lstm)],
    "gru": [("", _gru)],
    "cross_entropy": [("", _cross_entropy)],
}
