"""The models: nanoGPT's GPT and a recurrent language model (RNN, LSTM, GRU).

Both expose ``.params`` (a flat ``Params``), ``.config`` (a frozen dataclass), ``.kind``
("gpt" or "rnn"), ``config_dict()`` and ``backward()``; ``forward`` and ``forward_step`` (for
generation) differ by the state a recurrent model carries:

    logits, loss = gpt.forward(idx, targets)
    logits, loss, state = rnn.forward(idx, targets, state=state)
    logits, kv_cache = gpt.forward_step(idx_new, kv_cache)        # logits (B, V) of the last position
    logits, state = rnn.forward_step(idx_new, state)

A checkpoint stores ``model_meta(model)`` beside the flat parameters, and ``model_from_meta``
rebuilds the same architecture from it:

    meta = model_meta(model)            # {"kind": "gpt", "config": {...}, "dtype": "float32"}
    model = model_from_meta(meta)       # fresh weights; load the saved ones with params.load
"""
import dataclasses
import math

import numpy as np

from minilm.models.gpt import GPT, GPTConfig, KVCache
from minilm.models.rnnlm import RNNLM, RNNConfig

# kind -> (config class, model class)
MODELS = {"gpt": (GPTConfig, GPT), "rnn": (RNNConfig, RNNLM)}

__all__ = ["GPT", "GPTConfig", "KVCache", "RNNLM", "RNNConfig", "MODELS", "build_model", "model_from_meta",
           "model_meta", "param_count"]


def _config(op, kind, config_dict):
    """The config of a model of ``kind`` from a dict of its fields, and the model's class."""
    if kind not in MODELS:
        raise ValueError(f"{op}: argument 'kind' must be one of {', '.join(map(repr, MODELS))}, got {kind!r}")
    config_cls, model_cls = MODELS[kind]
    if not isinstance(config_dict, dict):
        raise TypeError(f"{op}: argument 'config_dict' must be a dict, got {type(config_dict).__name__}")
    fields = config_cls.__dataclass_fields__
    unknown = sorted(set(config_dict) - set(fields))
    if unknown:
        raise ValueError(f"{op}: argument 'config_dict' has unknown field(s) {', '.join(unknown)} "
                         f"for {config_cls.__name__}; its fields are {', '.join(fields)}")
    missing = [f for f, spec in fields.items() if f not in config_dict and spec.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{op}: argument 'config_dict' lacks the field(s) {', '.join(missing)} "
                         f"of {config_cls.__name__}")
    return config_cls(**config_dict), model_cls


def param_count(kind, config_dict):
    """How many parameters ``build_model(kind, config_dict)`` would hold, without allocating them."""
    config, model_cls = _config("param_count", kind, config_dict)
    return sum(math.prod(shape) for _, shape in model_cls.param_specs(config))


def build_model(kind, config_dict, dtype=np.float32, seed=0):
    """A new model of ``kind`` ("gpt" or "rnn") from a dict of its config's fields."""
    config, model_cls = _config("build_model", kind, config_dict)
    return model_cls(config, dtype=dtype, seed=seed)


def model_meta(model):
    """What ``model_from_meta`` needs to rebuild ``model``: its kind, config and the dtype of its
    master weights (float32 for a float16 or bfloat16 model, which is therefore rebuilt in float32:
    a checkpoint trained on a GPU in 16 bits evaluates and samples on a CPU)."""
    return {"kind": model.kind, "config": model.config_dict(), "dtype": str(model.params.data.dtype)}


def model_from_meta(meta):
    """A model with the architecture described by ``meta`` (from ``model_meta``); weights are fresh."""
    if not isinstance(meta, dict):
        got = type(meta).__name__
    elif "kind" not in meta or "config" not in meta:
        got = sorted(meta)
    elif not isinstance(meta["config"], dict):
        got = f"a config of type {type(meta['config']).__name__}"
    else:
        return build_model(meta["kind"], dict(meta["config"]), meta.get("dtype", "float32"))
    raise ValueError(f"model_from_meta: argument 'meta' must be a dict with keys 'kind' and 'config' (a dict; "
                     f"and optionally 'dtype'), got {got}")
