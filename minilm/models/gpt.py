r"""GPT: nanoGPT's decoder-only transformer, with its backward written out by hand.

Forward (one call per line in ``GPT.forward``; ``GPT.backward`` is the same list reversed)
---------------------------------------------------------------------------------------------
.. math::

    x &= \operatorname{dropout}(W_{te}[\text{idx}] + W_{pe}[0 \ldots T-1]) \\
    x &= x + \operatorname{dropout}(\operatorname{attn}(\operatorname{ln}_1(x)))
        \qquad\text{for each of the } L \text{ blocks} \\
    x &= x + \operatorname{dropout}(\operatorname{mlp}(\operatorname{ln}_2(x))) \\
    \text{logits} &= \operatorname{ln}_f(x)\, W_{te}^\top ,\qquad
    \text{loss} = \operatorname{cross\_entropy}(\text{logits}, \text{targets})

attn is causal multi-head self-attention (``ops.self_attention``), mlp is
linear → GELU (GPT-2's tanh form) → linear (``ops.ffn``), every LayerNorm is pre-norm as in GPT-2.

Weight tying: the output head is the token embedding, so ``wte`` receives two gradients,
one from ``logits = x_f wte^T`` and one from the lookup ``wte[idx]``; the backward adds them
explicitly (the first and the last line that touch ``grads["wte"]``).

Differences from nanoGPT
------------------------
* Dropout sits where nanoGPT's does -- on the embeddings, on the attention probabilities
  (``attn_dropout``; the ``dropout`` option of ``ops.attention``) and on the output of each
  residual branch (``resid_dropout`` in the attention, ``dropout`` in the MLP) -- but its masks
  come from minilm's own random streams.
* The MLP's GELU is GPT-2's tanh approximation (``activation="gelu"``); nanoGPT's ``nn.GELU()``
  is the exact :math:`x\,\Phi(x)` (``"gelu_exact"``). They differ by at most about 5e-4.
* Targets equal to -100 (PyTorch's default ``ignore_index``) are not counted; nanoGPT uses -1.
* ``forward`` returns the logits of every position, also without targets.
* ``bias=False`` removes the biases of the linears and the LayerNorms' beta from the parameters;
  the linears then get no bias (None), the LayerNorms a zero beta whose gradient is dropped.

Generation with a key/value cache
---------------------------------
``forward_step(idx_new, kv_cache)`` runs only the new tokens: per block it computes their
q, k, v from ``ln_1`` (the same projection and head split as ``ops.self_attention``), writes
k and v into the cache, and attends from the new queries over every cached key with
``ops.attention(..., causal=True)``, whose causal mask aligns the queries to the end of the keys.
Its logits equal those of the last position of ``forward`` on the whole context, to rounding. On
the numba backend a step of one token per sequence (sampling's inner loop) runs as one fused
kernel instead of the op calls (``minilm/cpu/gpt_decode.py``), because at that size the calls'
overhead is most of the time; it computes the same forward.

When the context would grow past ``block_size``, nanoGPT crops it to the last ``block_size``
tokens. Every position then shifts, so every cached key and value changes (positions enter at
the bottom of the network); reusing them would give different logits. ``forward_step`` therefore
does exactly what the uncached path does: it keeps the cropped window ``(cached tokens +
idx_new)[-block_size:]``, empties the cache and recomputes it from that window. Past
``block_size`` every step thus costs one full forward of the window, as without the cache.
``minilm.sample.generate`` avoids that by shifting its context to the newest ``block_size // 2``
tokens when it is full (``context_shift``), so the cache is rebuilt, from those tokens only,
about once every ``block_size / 2`` tokens.

Parameters (names of the views in ``GPT.params``)
-------------------------------------------------
==========================  ================  ==========================================
name                        shape             init (nanoGPT)
==========================  ================  ==========================================
wte                         (V, C)            N(0, 0.02²); also the output head
wpe                         (block_size, C)   N(0, 0.02²)
h.{l}.ln_1.gamma / .beta    (C,) / (C,)       1 / 0
h.{l}.attn.W_qkv / .b_qkv   (C, 3C) / (3C,)   N(0, 0.02²) / 0
h.{l}.attn.W_o / .b_o       (C, C) / (C,)     N(0, (0.02/√(2L))²) / 0
h.{l}.ln_2.gamma / .beta    (C,) / (C,)       1 / 0
h.{l}.mlp.W_1 / .b_1        (C, 4C) / (4C,)   N(0, 0.02²) / 0
h.{l}.mlp.W_2 / .b_2        (4C, C) / (C,)    N(0, (0.02/√(2L))²) / 0
ln_f.gamma / .beta          (C,) / (C,)       1 / 0
==========================  ================  ==========================================
"""
import dataclasses
import math
from typing import NamedTuple

import numpy as np

from minilm import backend, ops
from minilm.backend import get_array_module, sum_rows
from minilm.params import Params, precision_of
from minilm.reference.attention import merge_heads, split_heads
from minilm.validate import (as_float_dtype, require_backend_dtype, require_bool, require_divisible, require_ids,
                             require_ndim, require_positive, require_probability, require_seed)

IGNORE_INDEX = -100     # targets equal to this are not counted by the loss (cross_entropy's default)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT (nanoGPT's GPTConfig)."""
    vocab_size: int         # V
    block_size: int         # the longest context, T <= block_size
    n_layer: int            # L transformer blocks
    n_head: int             # NH
    n_embd: int             # C, divisible by n_head
    dropout: float = 0.0    # probability of dropping, while training
    bias: bool = True       # biases in the linears and LayerNorms

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            require_positive("GPTConfig", name, getattr(self, name), int)
            object.__setattr__(self, name, int(getattr(self, name)))     # a NumPy integer saves as JSON too
        require_divisible("GPTConfig", "n_embd", self.n_embd, "n_head", self.n_head)
        require_probability("GPTConfig", "dropout", self.dropout)
        object.__setattr__(self, "dropout", float(self.dropout))
        require_bool("GPTConfig", "bias", self.bias)


class BlockCache(NamedTuple):
    ln_1: object
    attn: object
    drop_attn: object
    ln_2: object
    mlp: object
    drop_mlp: object


class GPTCache(NamedTuple):
    wte: object
    wpe: object
    drop_emb: object
    blocks: list        # one BlockCache per layer
    ln_f: object
    lm_head: object
    loss: object        # None when forward had no targets


class KVCache:
    """Keys and values of every block for the tokens seen so far (see the module docstring).

    ``k``, ``v`` : (L, B, NH, block_size, hs), block l's in ``k[l]``, filled up to ``length``;
    ``tokens`` : (B, block_size), the ids they came from (needed to recompute after a crop).
    """

    def __init__(self, k, v, tokens):
        self.k, self.v, self.tokens = k, v, tokens
        self.length = 0

    @property
    def batch(self):
        return self.tokens.shape[0]


def as_ids(op, name, ids, xp=np):
    """``ids`` (an array, or nested lists of token ids) as an array of ``xp``; nested lists of unequal
    rows, which NumPy cannot make one array of, are refused by the op's and the argument's name."""
    try:
        return xp.asarray(ids)
    except (TypeError, ValueError) as e:
        if hasattr(ids, "shape"):       # one array already, of a module xp does not take (a cupy array into NumPy)
            raise TypeError(f"{op}: argument '{name}' must be a {xp.__name__} array of token ids on this backend, "
                            f"got a {type(ids).__module__}.{type(ids).__name__} ({e})") from None
        raise TypeError(f"{op}: argument '{name}' must be an array of token ids (nested lists: rows of one "
                        f"length), got a {type(ids).__name__} that is not one array") from None


def check_idx(op, name, idx, V, max_T=None):
    """idx as a (B, T) integer array with T >= 1 (and T <= max_T) and ids in [0, V)."""
    require_ndim(op, name, idx, 2, "(B, T)")
    require_ids(op, name, idx, V)
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"{op}: argument '{name}' must hold at least one sequence of at least one token, "
                         f"got shape {tuple(idx.shape)}")
    if max_T is not None and idx.shape[1] > max_T:
        raise ValueError(f"{op}: argument '{name}' has T = {idx.shape[1]} positions, more than "
                         f"block_size = {max_T}; crop it to the last {max_T} tokens")
    return idx


def check_targets(op, targets, idx, V):
    """(B, T) integer targets in [0, V), or IGNORE_INDEX for a position that is not counted."""
    xp = get_array_module(idx)
    targets = as_ids(op, "targets", targets, xp)
    if tuple(targets.shape) != tuple(idx.shape):
        raise ValueError(f"{op}: argument 'targets' must have the shape of idx (B, T) = {tuple(idx.shape)}, "
                         f"got {tuple(targets.shape)}")
    require_ids(op, "targets", targets, V, ignore_index=IGNORE_INDEX)
    return targets


def dropout_rng(op, rng, fallback):
    """A numpy Generator for the dropout masks: ``rng`` itself, one seeded from an int, or ``fallback``."""
    if rng is None:
        return fallback
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:                                 # numpy's own error would name neither op nor argument
            raise ValueError(f"{op}: argument 'rng' must be a numpy Generator, an int seed >= 0 or None, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(f"{op}: argument 'rng' must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def dropout_forward(x, p, rng):
    """``ops.dropout_forward``, except that p = 0 (evaluation, or no dropout in the config) returns
    x itself and no cache instead of the op's copy of x: nothing in a model writes into x."""
    if p == 0:
        return x, None
    return ops.dropout_forward(x, p=p, rng=rng)


def dropout_backward(dy, cache):
    """``ops.dropout_backward``, or dy itself for a dropout that ``dropout_forward`` skipped."""
    if cache is None:
        return (dy,)
    return ops.dropout_backward(dy, cache)


def _is_bias(name):
    """The biases and LayerNorm betas: the parameters that ``bias=False`` removes."""
    return name.rsplit(".", 1)[-1] in ("beta", "b_qkv", "b_o", "b_1", "b_2")


class GPT:
    """nanoGPT's GPT: parameters in one ``Params`` plus explicit forward and backward call lists."""

    kind = "gpt"

    def __init__(self, config, *, dtype=np.float32, seed=0):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: argument 'config' must be a GPTConfig, got {type(config).__name__}")
        dtype = as_float_dtype("GPT", "dtype", dtype)
        require_backend_dtype("GPT", "dtype", dtype, backend.current())
        self.config = cfg = config
        self._bias_shapes = {name: shape for name, shape in self.param_specs(cfg, all_biases=True) if _is_bias(name)}
        self.params = Params(self.param_specs(cfg), **precision_of(dtype))      # 16-bit: float32 master weights

        require_seed("GPT", "seed", seed)
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)   # nanoGPT's scaled init of c_proj
        for name, view in self.params.values.items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                view[...] = 1
            elif _is_bias(name):
                view[...] = 0
            else:
                std = residual_std if leaf in ("W_o", "W_2") else 0.02
                view[...] = rng.normal(0.0, std, view.shape)
        self.rng = rng                  # dropout masks when forward gets no rng
        self.params.to(backend.xp())
        self._cache = None

    @staticmethod
    def param_specs(cfg, *, all_biases=False):
        """(name, shape) of each parameter of a GPT with config ``cfg``, in the flat buffer's order;
        the biases and betas only when ``cfg.bias`` (or ``all_biases``)."""
        V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embd
        specs = [("wte", (V, C)), ("wpe", (T, C))]
        for l in range(cfg.n_layer):
            h = f"h.{l}."
            specs += [(h + "ln_1.gamma", (C,)), (h + "ln_1.beta", (C,)),
                      (h + "attn.W_qkv", (C, 3 * C)), (h + "attn.b_qkv", (3 * C,)),
                      (h + "attn.W_o", (C, C)), (h + "attn.b_o", (C,)),
                      (h + "ln_2.gamma", (C,)), (h + "ln_2.beta", (C,)),
                      (h + "mlp.W_1", (C, 4 * C)), (h + "mlp.b_1", (4 * C,)),
                      (h + "mlp.W_2", (4 * C, C)), (h + "mlp.b_2", (C,))]
        specs += [("ln_f.gamma", (C,)), ("ln_f.beta", (C,))]
        return specs if cfg.bias or all_biases else [(name, shape) for name, shape in specs if not _is_bias(name)]

    # --- helpers ------------------------------------------------------------------------------

    def config_dict(self):
        return dataclasses.asdict(self.config)

    def __repr__(self):
        return f"{type(self).__name__}({self.config!r}, {self.params!r})"

    def n_params(self, non_embedding=False):
        """Number of parameters; ``non_embedding`` leaves out wpe as nanoGPT's count does (wte is the head)."""
        return self.params.size - (self.params["wpe"].size if non_embedding else 0)

    def _xp(self):
        return get_array_module(self.params.data)

    def _bias(self, name):
        """The bias or beta called ``name``. Without biases in the config: None for a linear's
        bias (the op then adds none and returns no gradient), zeros for a LayerNorm's beta."""
        if self.config.bias:
            return self.params[name]
        if not name.endswith(".beta"):
            return None
        return self._xp().zeros(self._bias_shapes[name], dtype=self.params.compute.dtype)

    def _accumulate(self, name, grad):
        """grads[name] += grad (``Params.add_grad``); a bias gradient is dropped when the config has no biases."""
        if self.config.bias or name not in self._bias_shapes:
            self.params.add_grad(name, grad)        # in place, into the flat params.grad

    def _ids(self, op, name, idx, max_T):
        return check_idx(op, name, as_ids(op, name, idx, self._xp()), self.config.vocab_size, max_T)

    # --- training: forward and backward -------------------------------------------------------

    def forward(self, idx, targets=None, *, train=False, rng=None):
        """Logits for every position, and the mean cross-entropy loss when ``targets`` are given.

        Parameters
        ----------
        idx : (B, T) integer array of token ids in [0, V), T <= block_size.
        targets : (B, T) integer array of the next ids (-100 = not counted), or None.
        train : bool, apply dropout with probability ``config.dropout``.
        rng : numpy Generator or int seed for the dropout masks; default the model's own ``rng``.

        Returns
        -------
        (logits (B, T, V), loss): loss is a 0-d array, or None without targets. The caches for
        ``backward`` are kept on the model (``backward`` differentiates the latest forward).
        """
        op = "GPT.forward"
        cfg, P, xp = self.config, self.params, self._xp()
        idx = self._ids(op, "idx", idx, cfg.block_size)
        if targets is not None:
            targets = check_targets(op, targets, idx, cfg.vocab_size)
        require_bool(op, "train", train)
        p = cfg.dropout if train else 0.0
        rng = dropout_rng(op, rng, self.rng)
        B, T = idx.shape
        pos = xp.arange(T)                                                             # (T,)

        tok_emb, c_wte = ops.embedding_forward(idx, P["wte"])                          # (B, T, C)
        pos_emb, c_wpe = ops.embedding_forward(pos, P["wpe"])                          # (T, C)
        x, c_drop_emb = dropout_forward(tok_emb + pos_emb, p, rng)                     # (B, T, C)
        blocks = []
        for l in range(cfg.n_layer):
            h = f"h.{l}."
            ln1, c_ln1 = ops.layernorm_forward(x, P[h + "ln_1.gamma"], self._bias(h + "ln_1.beta"))
            a, c_attn = ops.self_attention_forward(ln1, P[h + "attn.W_qkv"], self._bias(h + "attn.b_qkv"),
                                                   P[h + "attn.W_o"], self._bias(h + "attn.b_o"),
                                                   n_head=cfg.n_head, causal=True, dropout=p, rng=rng)
            a_drop, c_drop_attn = dropout_forward(a, p, rng)                           # resid_dropout
            x = x + a_drop
            ln2, c_ln2 = ops.layernorm_forward(x, P[h + "ln_2.gamma"], self._bias(h + "ln_2.beta"))
            m, c_mlp = ops.ffn_forward(ln2, P[h + "mlp.W_1"], self._bias(h + "mlp.b_1"),
                                       P[h + "mlp.W_2"], self._bias(h + "mlp.b_2"), activation="gelu")
            m_drop, c_drop_mlp = dropout_forward(m, p, rng)
            x = x + m_drop
            blocks.append(BlockCache(ln_1=c_ln1, attn=c_attn, drop_attn=c_drop_attn,
                                     ln_2=c_ln2, mlp=c_mlp, drop_mlp=c_drop_mlp))
        xf, c_ln_f = ops.layernorm_forward(x, P["ln_f.gamma"], self._bias("ln_f.beta"))  # (B, T, C)
        logits, c_lm_head = ops.linear_forward(xf, P["wte"].T, None)                   # (B, T, V) tied head
        loss, c_loss = None, None
        if targets is not None:
            loss, c_loss = ops.cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX)  # ()

        self._cache = GPTCache(wte=c_wte, wpe=c_wpe, drop_emb=c_drop_emb, blocks=blocks,
                               ln_f=c_ln_f, lm_head=c_lm_head, loss=c_loss)
        return logits, loss

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
            raise RuntimeError("GPT.backward: call forward(idx, targets) with targets first")
        require_positive("GPT.backward", "loss_scale", loss_scale)
        cfg, xp = self.config, self._xp()
        acc = self._accumulate
        self.params.begin_grads()

        dloss = xp.full((), loss_scale, dtype=self.params.data.dtype)    # dL/dL = 1 (times the scale), float32 if mixed
        dlogits, _ = ops.cross_entropy_backward(dloss, c.loss)                         # (B, T, V)
        dxf, dwte_T, _ = ops.linear_backward(dlogits, c.lm_head)                       # logits = xf @ wte.T
        acc("wte", dwte_T.T)                                                           # tied: the head's share
        dx, dgamma, dbeta = ops.layernorm_backward(dxf, c.ln_f)                        # xf = ln_f(x)
        acc("ln_f.gamma", dgamma)
        acc("ln_f.beta", dbeta)
        for l in reversed(range(cfg.n_layer)):
            h, bc = f"h.{l}.", c.blocks[l]
            # x = x + m_drop: dx flows on unchanged, and dm_drop = dx into the MLP branch
            dm, = dropout_backward(dx, bc.drop_mlp)                                    # m_drop = dropout(m)
            dln2, dW_1, db_1, dW_2, db_2 = ops.ffn_backward(dm, bc.mlp)                # m = mlp(ln2)
            acc(h + "mlp.W_1", dW_1)
            acc(h + "mlp.b_1", db_1)
            acc(h + "mlp.W_2", dW_2)
            acc(h + "mlp.b_2", db_2)
            dx_ln2, dgamma, dbeta = ops.layernorm_backward(dln2, bc.ln_2)              # ln2 = ln_2(x)
            acc(h + "ln_2.gamma", dgamma)
            acc(h + "ln_2.beta", dbeta)
            dx = dx + dx_ln2
            # x = x + a_drop: the same for the attention branch
            da, = dropout_backward(dx, bc.drop_attn)                                   # a_drop = dropout(a)
            dln1, dW_qkv, db_qkv, dW_o, db_o = ops.self_attention_backward(da, bc.attn)  # a = attn(ln1)
            acc(h + "attn.W_qkv", dW_qkv)
            acc(h + "attn.b_qkv", db_qkv)
            acc(h + "attn.W_o", dW_o)
            acc(h + "attn.b_o", db_o)
            dx_ln1, dgamma, dbeta = ops.layernorm_backward(dln1, bc.ln_1)              # ln1 = ln_1(x)
            acc(h + "ln_1.gamma", dgamma)
            acc(h + "ln_1.beta", dbeta)
            dx = dx + dx_ln1
        demb, = dropout_backward(dx, c.drop_emb)                                       # x = dropout(tok + pos)
        dpos_emb = sum_rows(demb)                     # (T, C) tok_emb + pos_emb broadcast pos_emb over B
        _, dwpe = ops.embedding_backward(dpos_emb, c.wpe)                              # pos_emb = wpe[pos]
        acc("wpe", dwpe)
        _, dwte = ops.embedding_backward(demb, c.wte)                                  # tok_emb = wte[idx]
        acc("wte", dwte)                                                               # tied: the lookup's share
        self.params.end_grads()
        return self.params.compute_grad

    # --- generation: the key/value cache ------------------------------------------------------

    def init_kv_cache(self, batch):
        """An empty ``KVCache`` for ``batch`` sequences."""
        require_positive("GPT.init_kv_cache", "batch", batch, int)
        cfg, xp, dtype = self.config, self._xp(), self.params.compute.dtype
        shape = (batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)     # (B, NH, block, hs)
        return KVCache(xp.zeros((cfg.n_layer,) + shape, dtype=dtype), xp.zeros((cfg.n_layer,) + shape, dtype=dtype),
                       xp.zeros((batch, cfg.block_size), dtype=np.int64))

    def forward_step(self, idx_new, kv_cache=None):
        """Logits of the last position after appending ``idx_new`` to the cached context.

        Parameters
        ----------
        idx_new : (B, Tn) integer array, the tokens that follow the cached ones (a prompt, or
            one sampled token per step).
        kv_cache : KVCache from ``init_kv_cache`` or an earlier call, or None for a new one. It is
            updated in place; past block_size it is recomputed from the cropped window.

        Returns
        -------
        (logits (B, V), kv_cache). Inference only: no dropout, nothing kept for backward.
        """
        op = "GPT.forward_step"
        cfg, P, xp = self.config, self.params, self._xp()
        idx_new = self._ids(op, "idx_new", idx_new, None)
        B, Tn = idx_new.shape
        if kv_cache is None:
            kv_cache = self.init_kv_cache(B)
        if not isinstance(kv_cache, KVCache) or len(kv_cache.k) != cfg.n_layer \
                or kv_cache.k[0].shape[1:] != (cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head):
            raise TypeError(f"{op}: argument 'kv_cache' must be a KVCache from this model's init_kv_cache, "
                            f"got {type(kv_cache).__name__}")
        if kv_cache.batch != B:
            raise ValueError(f"{op}: argument 'idx_new' has B = {B} sequences but 'kv_cache' holds {kv_cache.batch}")
        t0 = kv_cache.length
        if t0 + Tn > cfg.block_size:                       # crop as nanoGPT does, then recompute everything
            idx_new = xp.concatenate([kv_cache.tokens[:, :t0], idx_new], axis=1)[:, -cfg.block_size:]
            t0, Tn = 0, idx_new.shape[1]
        t1 = t0 + Tn
        C, NH = cfg.n_embd, cfg.n_head
        kv_cache.tokens[:, t0:t1] = idx_new
        if Tn == 1:                                        # one token per sequence: a fused kernel, if any
            decode = backend.kernel("gpt_decode_step", None)     # numba's; None on numpy and cupy
            # the kernel returns None for a dtype it has no code for: the op calls below run instead
            logits = None if decode is None else decode(self, idx_new[:, 0], kv_cache, t0)
            if logits is not None:
                kv_cache.length = t1
                return logits, kv_cache

        tok_emb, _ = ops.embedding_forward(idx_new, P["wte"])                          # (B, Tn, C)
        pos_emb, _ = ops.embedding_forward(xp.arange(t0, t1), P["wpe"])                # (Tn, C)
        x = tok_emb + pos_emb                                                          # (B, Tn, C)
        for l in range(cfg.n_layer):
            h, K, Vc = f"h.{l}.", kv_cache.k[l], kv_cache.v[l]
            ln1, _ = ops.layernorm_forward(x, P[h + "ln_1.gamma"], self._bias(h + "ln_1.beta"))
            qkv, _ = ops.linear_forward(ln1, P[h + "attn.W_qkv"], self._bias(h + "attn.b_qkv"))  # (B, Tn, 3C)
            q = split_heads(qkv[..., 0 * C:1 * C], NH)                                 # (B, NH, Tn, hs)
            k = split_heads(qkv[..., 1 * C:2 * C], NH)                                 # (B, NH, Tn, hs)
            v = split_heads(qkv[..., 2 * C:3 * C], NH)                                 # (B, NH, Tn, hs)
            K[:, :, t0:t1] = k
            Vc[:, :, t0:t1] = v
            y, _ = ops.attention_forward(q, K[:, :, :t1], Vc[:, :, :t1], causal=True)  # (B, NH, Tn, hs)
            y = merge_heads(y)                                                         # (B, Tn, C)
            a, _ = ops.linear_forward(y, P[h + "attn.W_o"], self._bias(h + "attn.b_o"))
            x = x + a
            ln2, _ = ops.layernorm_forward(x, P[h + "ln_2.gamma"], self._bias(h + "ln_2.beta"))
            m, _ = ops.ffn_forward(ln2, P[h + "mlp.W_1"], self._bias(h + "mlp.b_1"),
                                   P[h + "mlp.W_2"], self._bias(h + "mlp.b_2"), activation="gelu")
            x = x + m
        xf, _ = ops.layernorm_forward(x[:, -1], P["ln_f.gamma"], self._bias("ln_f.beta"))  # (B, C)
        logits, _ = ops.linear_forward(xf, P["wte"].T, None)                           # (B, V)
        kv_cache.length = t1
        return logits, kv_cache
