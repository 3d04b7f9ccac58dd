"""Training configuration: one frozen dataclass, named presets, and the command-line options.

Every field of ``TrainConfig`` is an option of ``minilm train`` (``n_layer`` -> ``--n-layer``);
a preset fills in the fields, and options given on the command line override it.
"""
import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from minilm import optim

MODELS = ("gpt", "rnn", "lstm", "gru")
OPTIMIZER_NAMES = ("adamw", "adam", "sgd", "rmsprop")
SCHEDULE_NAMES = ("cosine", "constant", "step")
BATCHING = ("random", "contiguous")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = "gpt"               # gpt | rnn | lstm | gru
    n_layer: int = 4
    n_head: int = 4                  # gpt only
    n_embd: int = 128                # model width (gpt) / embedding size (recurrent)
    hidden_size: int = 256           # recurrent only
    block_size: int = 64             # context length T
    dropout: float = 0.0
    bias: bool = True                # gpt: biases in linear layers and layernorms
    # optimiser and schedule
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4             # floor of the cosine schedule
    schedule: str = "cosine"         # cosine (with linear warm-up) | constant | step
    warmup_iters: int = 100
    lr_decay_iters: int = 0          # length of the schedule; 0 = max_iters (a resumed run: its first run's)
    lr_step_size: int = 1000         # step schedule: multiply lr by lr_gamma every this many iterations
    lr_gamma: float = 0.5
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1        # adamw: 2-D weights only
    momentum: float = 0.0            # sgd, rmsprop
    nesterov: bool = False           # sgd
    rmsprop_alpha: float = 0.99
    grad_clip: float = 1.0           # clip the global gradient norm to this; 0 = off
    # the run
    batch_size: int = 12
    batching: str = "random"         # random windows | contiguous streams carrying state (recurrent)
    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 100            # batches per loss estimate
    patience: int = 0                # early stopping: evaluations without improvement; 0 = off
    seed: int = 1337
    dtype: str = "float32"

    def schedule_length(self):
        return self.lr_decay_iters or self.max_iters


PRESETS = {
    # nanoGPT's CPU run of config/train_shakespeare_char.py (nanoGPT's train.py defaults to bias=False)
    "shakespeare-char-cpu": dict(model="gpt", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                                 dropout=0.0, bias=False, lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                                 weight_decay=0.1, grad_clip=1.0, max_iters=2000, lr_decay_iters=2000,
                                 eval_interval=250, eval_iters=100),
    # nanoGPT's "baby GPT" for a GPU
    "shakespeare-char": dict(model="gpt", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                             dropout=0.2, bias=False, lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                             weight_decay=0.1, grad_clip=1.0, max_iters=5000, lr_decay_iters=5000,
                             eval_interval=250, eval_iters=200),
    "shakespeare-lstm": dict(model="lstm", n_layer=2, hidden_size=256, n_embd=128, block_size=64, batch_size=32,
                             dropout=0.0, lr=2e-3, min_lr=2e-4, warmup_iters=100, beta2=0.99,
                             weight_decay=0.1, grad_clip=1.0, max_iters=2000, lr_decay_iters=2000,
                             eval_interval=250, eval_iters=100),
    "shakespeare-gru": dict(model="gru", n_layer=2, hidden_size=256, n_embd=128, block_size=64, batch_size=32,
                            dropout=0.0, lr=2e-3, min_lr=2e-4, warmup_iters=100, beta2=0.99,
                            weight_decay=0.1, grad_clip=1.0, max_iters=2000, lr_decay_iters=2000,
                            eval_interval=250, eval_iters=100),
}
DEFAULT_PRESET = "shakespeare-char-cpu"

_CHOICES = {"model": MODELS, "optimizer": OPTIMIZER_NAMES, "schedule": SCHEDULE_NAMES,
            "batching": BATCHING, "dtype": DTYPES}
_NON_NEGATIVE = {"dropout", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "momentum",
                 "grad_clip", "patience", "seed", "beta1", "beta2", "rmsprop_alpha"}


def preset(name):
    """The TrainConfig of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"minilm train: option '--preset' must be one of {', '.join(PRESETS)}, got {name!r}")
    return TrainConfig(**PRESETS[name])


def _type_name(f):
    return f.type if isinstance(f.type, str) else f.type.__name__


def validate(cfg):
    """``cfg`` with its numbers as Python ints and floats; a ValueError naming the option for any value of
    the wrong type or out of range (a ``TrainConfig`` built in Python is checked as the command line's)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"minilm train: argument 'cfg' must be a TrainConfig, got {type(cfg).__name__}")
    plain = {}
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), _type_name(f)
        option = "--" + f.name.replace("_", "-")
        wanted = {"int": (numbers.Integral, "an integer"), "float": (numbers.Real, "a number"),
                  "bool": ((bool, np.bool_), "True or False"), "str": (str, "a string")}[kind]
        if not isinstance(value, wanted[0]) or (kind in ("int", "float") and isinstance(value, (bool, np.bool_))):
            raise ValueError(f"minilm train: option '{option}' must be {wanted[1]}, got {value!r}")
        if kind == "int" and value >= 2**63:           # sizes, counts and seeds become int64 (and floats)
            raise ValueError(f"minilm train: option '{option}' must be an integer below 2**63, got {value!r}")
        if kind != "str":                                   # numpy scalars save as JSON too
            plain[f.name] = {"int": int, "float": float, "bool": bool}[kind](value)
    cfg = dataclasses.replace(cfg, **plain)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        option = "--" + f.name.replace("_", "-")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise ValueError(f"minilm train: option '{option}' must be one of {', '.join(_CHOICES[f.name])}, got {value!r}")
        if f.type in (int, float, "int", "float"):
            low_ok = value >= 0 if f.name in _NON_NEGATIVE else value > 0
            if not (low_ok and math.isfinite(value)):       # nan fails the bound, inf would pass it
                bound = ">= 0" if f.name in _NON_NEGATIVE else "> 0"
                what = "an integer" if f.type in (int, "int") else "a finite number"
                raise ValueError(f"minilm train: option '{option}' must be {what} {bound}, got {value!r}")
    if not cfg.dropout < 1:
        raise ValueError(f"minilm train: option '--dropout' must be in [0, 1), got {cfg.dropout!r}")
    for name in ("beta1", "beta2", "rmsprop_alpha", "momentum"):
        if not getattr(cfg, name) < 1:
            raise ValueError(f"minilm train: option '--{name.replace('_', '-')}' must be in [0, 1), got {getattr(cfg, name)!r}")
    if cfg.model == "gpt" and cfg.n_embd % cfg.n_head:
        raise ValueError(f"minilm train: option '--n-embd' ({cfg.n_embd}) must be divisible by '--n-head' ({cfg.n_head})")
    if cfg.batching == "contiguous" and cfg.model == "gpt":
        raise ValueError("minilm train: option '--batching' contiguous is for the recurrent models, whose state "
                         "it carries from batch to batch; a GPT ('--model gpt') trains on random batches")
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ValueError(f"minilm train: option '--nesterov' needs '--momentum' > 0, got --momentum {cfg.momentum}")
    if cfg.schedule == "cosine" and cfg.min_lr > cfg.lr:          # the floor only the cosine decays to
        raise ValueError(f"minilm train: option '--min-lr' ({cfg.min_lr}) must not exceed '--lr' ({cfg.lr})")
    if cfg.schedule == "cosine" and cfg.schedule_length() <= cfg.warmup_iters:
        length = (f"'--lr-decay-iters' ({cfg.lr_decay_iters})" if cfg.lr_decay_iters else
                  f"'--max-iters' ({cfg.max_iters}), the schedule's length while '--lr-decay-iters' is 0,")
        raise ValueError(f"minilm train: option {length} must exceed '--warmup-iters' ({cfg.warmup_iters})")
    if cfg.schedule == "step":
        try:
            optim.Step(cfg.lr, cfg.lr_step_size, cfg.lr_gamma)(cfg.max_iters)   # its largest rate, for gamma > 1
        except ValueError:                                                        # past the largest float
            raise ValueError(f"minilm train: option '--lr-gamma' ({cfg.lr_gamma!r}) every '--lr-step-size' "
                             f"({cfg.lr_step_size}) iterations takes '--lr' ({cfg.lr!r}) past the largest float "
                             f"before '--max-iters' ({cfg.max_iters}); choose a smaller --lr-gamma or a larger "
                             f"--lr-step-size") from None
    return cfg


def _parse_bool(text):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# what each option does, for --help (the defaults are added to it)
MEANING = {
    "model": "the model: a GPT, or a language model of rnn, lstm or gru layers",
    "n_layer": "layers (GPT blocks, or stacked recurrent layers)",
    "n_head": "attention heads per block (gpt); must divide --n-embd",
    "n_embd": "the GPT's width C, or a recurrent model's embedding size",
    "hidden_size": "the hidden size H of each recurrent layer",
    "block_size": "characters per training sequence T (the GPT's context)",
    "dropout": "dropout probability while training (GPT: the embeddings, the attention weights, each residual "
               "branch; recurrent: each layer's output)",
    "bias": "gpt: biases in the linear layers and layernorms",
    "optimizer": "the optimizer",
    "lr": "the learning rate (the cosine schedule's peak)",
    "min_lr": "the cosine schedule's floor",
    "schedule": "the learning rate over the run: linear warm-up then cosine decay to --min-lr, constant, or "
                "multiplied by --lr-gamma every --lr-step-size iterations",
    "warmup_iters": "iterations of linear warm-up (cosine)",
    "lr_decay_iters": "the cosine schedule's length, after which it stays at --min-lr (0: --max-iters)",
    "lr_step_size": "the step schedule's interval",
    "lr_gamma": "the step schedule's factor",
    "beta1": "Adam's first-moment decay",
    "beta2": "Adam's second-moment decay",
    "weight_decay": "adamw's decoupled weight decay, on the 2-D weights only (nanoGPT's rule)",
    "momentum": "sgd's or rmsprop's momentum",
    "nesterov": "sgd: Nesterov momentum (needs --momentum)",
    "rmsprop_alpha": "rmsprop's decay of the squared gradients",
    "grad_clip": "clip the gradient's global norm to this: the gradient is scaled by clip / (norm + 1e-6) "
                 "when that is below 1, as by PyTorch's clip_grad_norm_ (0: no clipping)",
    "batch_size": "sequences per batch B",
    "batching": "random windows, or (recurrent) contiguous streams that carry the state from batch to batch, "
                "as char-rnn",
    "max_iters": "iterations to run (the run stops there; the schedule's length is --lr-decay-iters)",
    "eval_interval": "iterations between evaluations (and checkpoints)",
    "eval_iters": "batches per loss estimate at each evaluation",
    "patience": "early stopping: evaluations without a better validation loss (0: no early stopping)",
    "seed": "seeds the initial weights, the training and evaluation batches, and dropout",
    "dtype": "float32 to train; float64 for checks; float16 and bfloat16 on a GPU, with float32 master weights",
}


def add_options(parser):
    """One option per field, defaulting to None so that only what the user gave overrides the preset."""
    parsers = {"int": int, "float": float, "str": str, "bool": _parse_bool}
    base = preset(DEFAULT_PRESET)                   # a preset always applies: its values are the defaults
    for f in fields(TrainConfig):
        type_name = _type_name(f)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parsers[type_name], default=None,
                            choices=_CHOICES.get(f.name), metavar=None if f.name in _CHOICES else type_name.upper(),
                            help=f"{MEANING[f.name]}; default: the preset's ({DEFAULT_PRESET}'s: "
                                 f"{getattr(base, f.name)!r}); with --resume, the saved run's")


# option -> (who uses it, the settings that use it): an option given for a run that never reads it
# is said to be ignored, since it would otherwise change nothing silently
_USED_BY = {
    "n_head": ("--model gpt", lambda c: c.model == "gpt"),
    "bias": ("--model gpt", lambda c: c.model == "gpt"),
    "hidden_size": ("the recurrent models (--model rnn, lstm, gru)", lambda c: c.model != "gpt"),
    "min_lr": ("--schedule cosine", lambda c: c.schedule == "cosine"),
    "warmup_iters": ("--schedule cosine", lambda c: c.schedule == "cosine"),
    "lr_decay_iters": ("--schedule cosine", lambda c: c.schedule == "cosine"),
    "lr_step_size": ("--schedule step", lambda c: c.schedule == "step"),
    "lr_gamma": ("--schedule step", lambda c: c.schedule == "step"),
    "beta1": ("--optimizer adam or adamw", lambda c: c.optimizer in ("adam", "adamw")),
    "beta2": ("--optimizer adam or adamw", lambda c: c.optimizer in ("adam", "adamw")),
    "weight_decay": ("--optimizer adamw", lambda c: c.optimizer == "adamw"),
    "momentum": ("--optimizer sgd or rmsprop", lambda c: c.optimizer in ("sgd", "rmsprop")),
    "nesterov": ("--optimizer sgd", lambda c: c.optimizer == "sgd"),
    "rmsprop_alpha": ("--optimizer rmsprop", lambda c: c.optimizer == "rmsprop"),
}


def ignored_options(args, cfg):
    """A line for each option given on the command line that the run ``cfg`` does not use."""
    return [f"option '--{name.replace('_', '-')}' is ignored: it is used only by {user}"
            for name, (user, uses) in _USED_BY.items() if getattr(args, name, None) is not None and not uses(cfg)]


def from_args(args, base, *, check=True):
    """``base`` with every option the user gave on the command line replaced; checked by
    ``validate`` unless ``check`` is False (a resumed run, which ``train`` checks once it has
    its saved settings)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(base, **given)
    return validate(cfg) if check else cfg
