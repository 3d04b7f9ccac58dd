r"""RNNLM: a character-level recurrent language model (tanh RNN, LSTM or GRU), backward by hand.

Forward (one call per line in ``RNNLM.forward``; ``RNNLM.backward`` is the same list reversed)
---------------------------------------------------------------------------------------------
.. math::

    x_0 &= W_{te}[\text{idx}] \\
    h_l &= \operatorname{cell}_l(x_l, \text{state}_l), \qquad
    x_{l+1} = \operatorname{dropout}(h_l) \qquad l = 0 \ldots L-1 \\
    \text{logits} &= x_L W_{head} + b_{head}, \qquad
    \text{loss} = \operatorname{cross\_entropy}(\text{logits}, \text{targets})

Here the subscript l counts layers, not time steps, from 0 as in ``rnn.{l}.*`` and ``state[l]``:
:math:`x_l` and :math:`h_l` are whole (B, T, ·) sequences, and :math:`\text{state}_l` is layer
l's initial state.

Dropout follows Karpathy's char-rnn: on the output of every recurrent layer, so between layers
(what PyTorch's ``nn.LSTM(dropout=p)`` does) and also on the last layer's output before the head;
none on the embeddings.

State and truncated backpropagation through time
------------------------------------------------
``forward`` starts from ``state`` (zeros when None) and returns the final state of every layer,
a tuple with one entry per layer: ``(h,)`` for "rnn" and "gru", ``(h, c)`` for "lstm", each (B, H).
Passing it to the next batch carries the hidden state across batches; it is detached: the backward
stops at the start of the batch (the gradient for the initial state is dropped).

Parameters (names of the views in ``RNNLM.params``) and their init, as PyTorch's
``nn.Embedding``, ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and ``nn.Linear`` (k = 1/√H)
---------------------------------------------------------------------------------------------
=======================  =================  ==================
name                     shape              init
=======================  =================  ==================
wte                      (V, n_embd)        N(0, 1)
rnn.{l}.W_x              (D, G·H)           U(-k, k)
rnn.{l}.W_h              (H, G·H)           U(-k, k)
rnn.{l}.b   (rnn, lstm)  (G·H,)             U(-k, k) + U(-k, k)
rnn.{l}.b_x, .b_h (gru)  (3H,)              U(-k, k)
lm_head.W                (H, V)             U(-k, k)
lm_head.b                (V,)               U(-k, k)
=======================  =================  ==================

G is the number of gates (1 rnn, 4 lstm [i|f|g|o], 3 gru [r|z|n]), D = n_embd for the first
layer and H after. PyTorch's RNN and LSTM keep two biases, b_ih and b_hh, each U(-k, k); their
sum is ``b``, so ``b`` starts as the sum of two such draws. (In training the two parametrizations
part: Adam moves each of PyTorch's two biases by a full step, so their sum moves twice as far as
``b`` does.)
"""
import dataclasses
import math
from typing import NamedTuple

import numpy as np

from minilm import backend, ops
from minilm.backend import get_array_module
from minilm.models.gpt import (IGNORE_INDEX, as_ids, check_idx, check_targets, dropout_backward, dropout_forward,
                               dropout_rng)
from minilm.params import Params, precision_of
from minilm.validate import (as_float_dtype, require_backend_dtype, require_bool, require_choice, require_positive,
                             require_probability, require_seed)

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """The shape of an RNNLM."""
    vocab_size: int         # V
    cell: str               # "rnn", "lstm" or "gru"
    n_layer: int            # L stacked recurrent layers
    hidden_size: int        # H
    n_embd: int             # width of the token embedding, the first layer's D
    dropout: float = 0.0    # probability of dropping, while training

    def __post_init__(self):
        require_choice("RNNConfig", "cell", self.cell, CELLS)
        for name in ("vocab_size", "n_layer", "hidden_size", "n_embd"):
            require_positive("RNNConfig", name, getattr(self, name), int)
            object.__setattr__(self, name, int(getattr(self, name)))     # a NumPy integer saves as JSON too
        require_probability("RNNConfig", "dropout", self.dropout)
        object.__setattr__(self, "dropout", float(self.dropout))


class LayerCache(NamedTuple):
    rec: object         # the recurrent op's cache
    drop: object        # the dropout's cache


class RNNLMCache(NamedTuple):
    wte: object
    layers: list        # one LayerCache per layer
    lm_head: object
    loss: object        # None when forward had no targets


class RNNLM:
    """Embedding, L recurrent layers and a linear head, in one ``Params``."""

    kind = "rnn"

    def __init__(self, config, *, dtype=np.float32, seed=0):
        if not isinstance(config, RNNConfig):
            raise TypeError(f"RNNLM: argument 'config' must be an RNNConfig, got {type(config).__name__}")
        dtype = as_float_dtype("RNNLM", "dtype", dtype)
        require_backend_dtype("RNNLM", "dtype", dtype, backend.current())
        self.config = cfg = config
        self.params = Params(self.param_specs(cfg), **precision_of(dtype))      # 16-bit: float32 master weights

        require_seed("RNNLM", "seed", seed)
        rng = np.random.default_rng(seed)
        k = 1.0 / math.sqrt(cfg.hidden_size)
        for name, view in self.params.values.items():
            if name == "wte":
                view[...] = rng.standard_normal(view.shape)
            elif name.startswith("rnn.") and name.endswith(".b"):  # PyTorch's b_ih + b_hh
                view[...] = rng.uniform(-k, k, view.shape) + rng.uniform(-k, k, view.shape)
            else:
                view[...] = rng.uniform(-k, k, view.shape)
        self.rng = rng                  # dropout masks when forward gets no rng
        self.params.to(backend.xp())
        self._cache = None

    @staticmethod
    def param_specs(cfg):
        """(name, shape) of each parameter of an RNNLM with config ``cfg``, in the flat buffer's order."""
        V, H, G = cfg.vocab_size, cfg.hidden_size, GATES[cfg.cell]
        specs = [("wte", (V, cfg.n_embd))]
        for l in range(cfg.n_layer):
            n, D = f"rnn.{l}.", cfg.n_embd if l == 0 else H
            specs += [(n + "W_x", (D, G * H)), (n + "W_h", (H, G * H))]
            specs += [(n + "b_x", (G * H,)), (n + "b_h", (G * H,))] if cfg.cell == "gru" else [(n + "b", (G * H,))]
        specs += [("lm_head.W", (H, V)), ("lm_head.b", (V,))]
        return specs

    # --- helpers ------------------------------------------------------------------------------

    def config_dict(self):
        return dataclasses.asdict(self.config)

    def __repr__(self):
        return f"{type(self).__name__}({self.config!r}, {self.params!r})"

    def n_params(self):
        return self.params.size

    def _xp(self):
        return get_array_module(self.params.data)

    def _accumulate(self, name, grad):
        """grads[name] += grad, in place, into the flat params.grad (``Params.add_grad``)."""
        self.params.add_grad(name, grad)

    def init_state(self, batch):
        """Zero state for ``batch`` sequences: per layer ``(h,)``, or ``(h, c)`` for an LSTM, each (B, H)."""
        require_positive("RNNLM.init_state", "batch", batch, int)
        xp, dtype, H = self._xp(), self.params.compute.dtype, self.config.hidden_size
        n = 2 if self.config.cell == "lstm" else 1
        return tuple(tuple(xp.zeros((batch, H), dtype=dtype) for _ in range(n)) for _ in range(self.config.n_layer))

    def _check_state(self, op, state, B):
        if state is None:
            return self.init_state(B)
        cfg, n = self.config, 2 if self.config.cell == "lstm" else 1
        what = "(h, c)" if n == 2 else "(h,)"
        if not isinstance(state, (tuple, list)) or len(state) != cfg.n_layer \
                or any(not isinstance(s, (tuple, list)) or len(s) != n for s in state):
            if isinstance(state, (tuple, list)):            # what each layer's entry was
                layers = ", ".join(f"a {type(s).__name__} of {len(s)}" if isinstance(s, (tuple, list))
                                   else type(s).__name__ for s in state)
                got = f"a {type(state).__name__} of {len(state)} ({layers})"
            else:
                got = type(state).__name__
            raise ValueError(f"{op}: argument 'state' must be a tuple of {cfg.n_layer} per-layer tuples {what}, "
                             f"as returned by forward or init_state, got {got}")
        for l, s in enumerate(state):
            for a in s:
                if not hasattr(a, "shape") or tuple(a.shape) != (B, cfg.hidden_size) \
                        or a.dtype != self.params.compute.dtype:
                    got = f"shape {tuple(a.shape)} dtype {a.dtype}" if hasattr(a, "shape") else type(a).__name__
                    raise ValueError(f"{op}: argument 'state' of layer {l} must hold (B, H) = "
                                     f"({B}, {cfg.hidden_size}) arrays of dtype {self.params.compute.dtype}, got {got}")
        return state

    def _recurrent_forward(self, l, x, state_l):
        """h, cache, final state of layer l's cell over the sequence x."""
        P, n = self.params, f"rnn.{l}."
        if self.config.cell == "lstm":
            h0, c0 = state_l
            h, cache = ops.lstm_forward(x, h0, c0, P[n + "W_x"], P[n + "W_h"], P[n + "b"])          # (B, T, H)
            return h, cache, (cache.h_T, cache.c_T)
        if self.config.cell == "gru":
            h, cache = ops.gru_forward(x, state_l[0], P[n + "W_x"], P[n + "W_h"], P[n + "b_x"], P[n + "b_h"])
            return h, cache, (cache.h_T,)
        h, cache = ops.rnn_forward(x, state_l[0], P[n + "W_x"], P[n + "W_h"], P[n + "b"])
        return h, cache, (cache.h_T,)

    def _recurrent_backward(self, l, dh, cache):
        """dx of layer l's cell; its weight gradients go into params.grads. dh0 (dc0) are dropped:
        the initial state is detached."""
        acc, n = self._accumulate, f"rnn.{l}."
        if self.config.cell == "lstm":
            dx, _dh0, _dc0, dW_x, dW_h, db = ops.lstm_backward(dh, cache)
            acc(n + "b", db)
        elif self.config.cell == "gru":
            dx, _dh0, dW_x, dW_h, db_x, db_h = ops.gru_backward(dh, cache)
            acc(n + "b_x", db_x)
            acc(n + "b_h", db_h)
        else:
            dx, _dh0, dW_x, dW_h, db = ops.rnn_backward(dh, cache)
            acc(n + "b", db)
        acc(n + "W_x", dW_x)
        acc(n + "W_h", dW_h)
        return dx

    # --- training: forward and backward -------------------------------------------------------

    def forward(self, idx, targets=None, *, state=None, train=False, rng=None):
        """Logits for every position, the loss when ``targets`` are given, and the final state.

        Parameters
        ----------
        idx : (B, T) integer array of token ids in [0, V).
        targets : (B, T) integer array of the next ids (-100 = not counted), or None.
        state : the state to start from (see ``init_state``), or None for zeros.
        train : bool, apply dropout with probability ``config.dropout``.
        rng : numpy Generator or int seed for the dropout masks; default the model's own ``rng``.

        Returns
        -------
        (logits (B, T, V), loss (0-d array, or None), new_state). The caches for ``backward`` are
        kept on the model (``backward`` differentiates the latest forward).
        """
        op = "RNNLM.forward"
        cfg, P = self.config, self.params
        idx = check_idx(op, "idx", as_ids(op, "idx", idx, self._xp()), cfg.vocab_size)
        if targets is not None:
            targets = check_targets(op, targets, idx, cfg.vocab_size)
        state = self._check_state(op, state, idx.shape[0])
        require_bool(op, "train", train)
        p = cfg.dropout if train else 0.0
        rng = dropout_rng(op, rng, self.rng)

        x, c_wte = ops.embedding_forward(idx, P["wte"])                                # (B, T, n_embd)
        layers, new_state = [], []
        for l in range(cfg.n_layer):
            h, c_rec, final_l = self._recurrent_forward(l, x, state[l])               # (B, T, H)
            x, c_drop = dropout_forward(h, p, rng)                                     # (B, T, H)
            layers.append(LayerCache(rec=c_rec, drop=c_drop))
            new_state.append(final_l)
        logits, c_lm_head = ops.linear_forward(x, P["lm_head.W"], P["lm_head.b"])      # (B, T, V)
        loss, c_loss = None, None
        if targets is not None:
            loss, c_loss = ops.cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX)  # ()

        self._cache = RNNLMCache(wte=c_wte, layers=layers, lm_head=c_lm_head, loss=c_loss)
        return logits, loss, tuple(new_state)

    def backward(self, loss_scale=1.0):
        """Gradient of the latest forward's loss into ``params.grad`` (replacing what it held).

        ``loss_scale`` multiplies the loss before the backward (float16's loss scaling); the
        gradients then come out multiplied by it too. With mixed precision they land in
        ``params.compute_grad``; ``params.unscale_grads`` moves them to ``params.grad``.
        Returns the flat buffer they landed in: ``params.compute_grad``, which is ``params.grad``
        unless the precision is mixed.

        The forward's call list reversed, line by line; dY is the gradient of the loss wrt Y.
        """
        c = self._cache
        if c is None or c.loss is None:
            raise RuntimeError("RNNLM.backward: call forward(idx, targets) with targets first")
        require_positive("RNNLM.backward", "loss_scale", loss_scale)
        acc = self._accumulate
        self.params.begin_grads()

        dloss = self._xp().full((), loss_scale, dtype=self.params.data.dtype)   # dL/dL = 1 (times the scale), float32 if mixed
        dlogits, _ = ops.cross_entropy_backward(dloss, c.loss)                         # (B, T, V)
        dx, dW, db = ops.linear_backward(dlogits, c.lm_head)                           # logits = x @ W + b
        acc("lm_head.W", dW)
        acc("lm_head.b", db)
        for l in reversed(range(self.config.n_layer)):
            dh, = dropout_backward(dx, c.layers[l].drop)                               # x = dropout(h)
            dx = self._recurrent_backward(l, dh, c.layers[l].rec)                      # h = cell(x, state)
        _, dwte = ops.embedding_backward(dx, c.wte)                                    # x = wte[idx]
        acc("wte", dwte)
        self.params.end_grads()
        return self.params.compute_grad

    # --- generation ---------------------------------------------------------------------------

    def forward_step(self, idx_new, state=None):
        """Logits of the last position after feeding ``idx_new`` (B, Tn) from ``state``.

        Returns (logits (B, V), new_state). Inference only: no dropout. It runs ``forward``, so it
        replaces the caches kept for ``backward``.
        """
        op = "RNNLM.forward_step"
        idx_new = check_idx(op, "idx_new", as_ids(op, "idx_new", idx_new, self._xp()), self.config.vocab_size)
        state = self._check_state(op, state, idx_new.shape[0])
        logits, _, state = self.forward(idx_new, state=state)
        return logits[:, -1], state
