r"""Scaled dot-product attention, and the multi-head self- and cross-attention built on it.

Forward: attention
------------------
Take one batch element and one head (every (b, h) pair is independent, so the indices are
dropped). Queries :math:`q \in \mathbb{R}^{T_q \times hs}`, keys and values
:math:`k, v \in \mathbb{R}^{T_k \times hs}`. The scores (llm.c's ``preatt``) are

.. math::  S_{ij} = \frac{1}{\sqrt{hs}} \sum_d q_{id}\, k_{jd}
           \qquad\text{i.e.}\qquad S = \frac{q k^\top}{\sqrt{hs}} .

Query i may attend key j when :math:`\text{allowed}_{ij}` holds:

.. math::  \text{allowed}_{ij} = \text{mask}_{ij} \;\wedge\; \big(\text{not causal} \;\vee\; j \le i + T_k - T_q\big).

The causal rule aligns the queries with the *end* of the keys. With :math:`T_q = T_k` it is
the usual lower triangle :math:`j \le i`; with one query over :math:`T_k = t` keys (a decode
step with a key/value cache) that query sees every key, exactly as the last row of the full
:math:`t \times t` attention does. A masked score is replaced by :math:`-\infty`, and the
attention weights are a softmax over each row:

.. math::  A_{ij} = \frac{e^{S_{ij} - m_i}}{Z_i}, \qquad
           Z_i = \sum_{l} e^{S_{il} - m_i}, \qquad m_i = \max_{l \text{ allowed}} S_{il},

so a masked key gets :math:`e^{-\infty} = 0`. Subtracting :math:`m_i` changes nothing
mathematically (it cancels between numerator and :math:`Z_i`) and keeps every exponent
:math:`\le 0`, so nothing overflows and :math:`Z_i \ge 1`. The output mixes the values:

.. math::  y_{id} = \sum_j A_{ij}\, v_{jd} \qquad\text{i.e.}\qquad y = A v .

**A row with no allowed key** (a query whose mask row is all False, or, with :math:`T_q > T_k`,
a causal query that comes before every key) would be :math:`0/0`. We define it instead as
:math:`A_{i\cdot} = 0`, hence :math:`y_{i\cdot} = 0`: in code :math:`m_i` is set to 0 (so every
:math:`e^{S_{il} - m_i} = e^{-\infty} = 0`) and :math:`Z_i` to 1. That row is then a constant,
so it passes zero gradient to q, k and v, and nothing is ever NaN.

Backward: attention
-------------------
Write :math:`\bar y = \partial L / \partial y` (``dy`` in code), and likewise
:math:`\bar A, \bar S, \bar q, \bar k, \bar v`. Undo the forward one line at a time.

1. :math:`y = A v`, i.e. :math:`y_{id} = \sum_j A_{ij} v_{jd}`. Then
   :math:`\partial y_{id}/\partial A_{ij} = v_{jd}` and :math:`\partial y_{id}/\partial v_{jd} = A_{ij}`:

   .. math::  \bar A_{ij} = \sum_d \bar y_{id}\, v_{jd} \;\Rightarrow\; \bar A = \bar y\, v^\top ,
              \qquad
              \bar v_{jd} = \sum_i A_{ij}\, \bar y_{id} \;\Rightarrow\; \bar v = A^\top \bar y .

   With dropout on the weights (nanoGPT's ``attn_dropout``) the forward multiplies
   :math:`\tilde A = m \odot A / (1 - p)` (``att_d``) by v instead, with m dropout's 0/1 mask
   (``drop.mask`` in the cache; not the attention ``mask``): this step then gives
   :math:`\bar{\tilde A} = \bar y v^\top` (``datt_d``) and :math:`\bar v = \tilde A^\top \bar y`, and
   dropout's own backward :math:`\bar A = m \odot \bar{\tilde A} / (1 - p)` (``datt``).

2. :math:`A = \operatorname{softmax}(S)` row by row. Within row i (over the allowed keys),
   :math:`A_{ij} = e^{S_{ij}} / Z` with :math:`Z = \sum_{j'} e^{S_{ij'}}` (the shift :math:`m_i`
   cancels, so it is left out here) and :math:`\partial Z / \partial S_{il} = e^{S_{il}}`, so by
   the quotient rule the Jacobian is

   .. math::  \frac{\partial A_{ij}}{\partial S_{il}}
              = \frac{\delta_{jl}\, e^{S_{ij}}}{Z} - \frac{e^{S_{ij}}\, e^{S_{il}}}{Z^2}
              = A_{ij}\,(\delta_{jl} - A_{il}),

   and the chain rule sums over j:

   .. math::  \bar S_{il} = \sum_j \bar A_{ij}\, A_{ij}(\delta_{jl} - A_{il})
              = A_{il}\Big(\bar A_{il} - \sum_j \bar A_{ij} A_{ij}\Big).

   *Masking needs nothing extra.* A masked score was replaced by the constant :math:`-\infty`,
   so its true gradient is 0; and the formula gives 0 there by itself, because its factor
   :math:`A_{il}` is 0. A row with no allowed key has :math:`A_{i\cdot} = 0`, so
   :math:`\bar S_{i\cdot} = 0` as well. This is why the cache keeps the probabilities
   :math:`A` (``att``, as llm.c does) and not the attention mask.

3. :math:`S = q k^\top / \sqrt{hs}`, i.e. :math:`S_{ij} = \sum_d q_{id} k_{jd} / \sqrt{hs}`:

   .. math::  \bar q_{id} = \frac{1}{\sqrt{hs}} \sum_j \bar S_{ij}\, k_{jd}
              \;\Rightarrow\; \bar q = \frac{\bar S\, k}{\sqrt{hs}} ,
              \qquad
              \bar k_{jd} = \frac{1}{\sqrt{hs}} \sum_i \bar S_{ij}\, q_{id}
              \;\Rightarrow\; \bar k = \frac{\bar S^\top q}{\sqrt{hs}} .

Multi-head self-attention
-------------------------
For x of shape (B, T, C) and NH heads of size hs = C / NH:

.. math::  [\,Q \mid K \mid V\,] = x W_{qkv} + b_{qkv}, \qquad
           y^{(h)} = \operatorname{attention}\big(Q^{(h)}, K^{(h)}, V^{(h)}\big), \qquad
           y = [\,y^{(0)} \mid \dots \mid y^{(NH-1)}\,]\, W_o + b_o ,

where :math:`Q, K, V` are the three column blocks of width C and, for :math:`h = 0 \dots NH-1`,
:math:`Q^{(h)}` holds columns :math:`h \cdot hs \dots (h+1) \cdot hs - 1` of Q (and likewise
:math:`K^{(h)}, V^{(h)}`; nanoGPT's layout, transposed to ``x @ W``).
In code the split into heads is a reshape (B, T, C) -> (B, T, NH, hs) and a transpose to
(B, NH, T, hs); joining them again is the inverse transpose and reshape. The joined heads
:math:`[\,y^{(0)} \mid \dots \mid y^{(NH-1)}\,]` are ``atty`` in code (llm.c's name).

Its backward is the forward read in reverse: the linear layer's backward (see ``linear.py``)
gives the gradient of the joined heads; splitting that gradient into heads undoes the join
(a reshape and a transpose only move numbers, so their backward moves them back); the
attention backward above gives :math:`\bar Q^{(h)}, \bar K^{(h)}, \bar V^{(h)}`; joining the
heads and concatenating the three blocks undoes the split of the qkv projection; and the
linear backward of that projection gives :math:`\bar x, \bar W_{qkv}, \bar b_{qkv}`.

Cross-attention
---------------
The queries come from x (B, Tq, C) and the keys and values from ``memory`` (B, Tk, C), e.g. the
output of an encoder:

.. math::  Q = x W_q + b_q, \qquad [\,K \mid V\,] = \text{memory}\; W_{kv} + b_{kv},

then heads, attention (never causal; an optional mask of shape (B, Tq, Tk), shared by the
heads) and the output projection exactly as above. In the backward :math:`\bar x` comes only
through Q, and :math:`\overline{\text{memory}}` only through K and V.

Shapes
------
==============  ===============  ======================
name            forward          backward
==============  ===============  ======================
q               (B, NH, Tq, hs)  dq (B, NH, Tq, hs)
k, v            (B, NH, Tk, hs)  dk, dv (B, NH, Tk, hs)
mask            broadcasts to    (no gradient)
                (B, NH, Tq, Tk)
S, att          (B, NH, Tq, Tk)  dS, datt
y (attention)   (B, NH, Tq, hs)  dy
x               (B, Tq, C)       dx
W_qkv, b_qkv    (C, 3C), (3C,)   dW_qkv, db_qkv
W_q, b_q        (C, C), (C,)     dW_q, db_q
memory          (B, Tk, C)       dmemory
W_kv, b_kv      (C, 2C), (2C,)   dW_kv, db_kv
W_o, b_o        (C, C), (C,)     dW_o, db_o
y (multi-head)  (B, Tq, C)       dy
==============  ===============  ======================

In self-attention the queries, keys and values come from the same sequence: T = Tq = Tk.
"""
import math
from typing import NamedTuple

import numpy as np

from minilm.backend import get_array_module
from minilm.reference.dropout import _require_rng, dropout_backward, dropout_forward
from minilm.reference.linear import linear_backward, linear_forward
from minilm.validate import (require_array, require_bool, require_cache, require_divisible, require_float,
                             require_gradient, require_ndim, require_nonempty, require_positive, require_probability,
                             require_same_dtype, require_shape)


# --- argument checks --------------------------------------------------------------------------

def _require_mask(op, mask, shape, dims, *, keys=None, queries="Tq"):
    """A boolean array that broadcasts to ``shape`` (numpy's rules: align on the right, 1 stretches).

    With ``keys`` (the keys' letter) it must also have every dimension of ``shape``: a padding mask
    (B, Tk) would otherwise be read as (Tq, Tk) whenever B == Tq, each batch row's padding applied to
    one query of every batch row."""
    require_array(op, "mask", mask)
    if str(mask.dtype) != "bool":
        raise TypeError(f"{op}: argument 'mask' must be a boolean array (True = may attend), got dtype {mask.dtype}")
    if keys is not None and mask.ndim != len(shape):
        raise ValueError(f"{op}: argument 'mask' must have the {len(shape)} dimensions of {dims} (1 where shared), "
                         f"got shape {tuple(mask.shape)}; a padding mask over the keys is mask[:, None, :], shape "
                         f"(B, 1, {keys}), and one for every batch row mask[None], shape (1, {queries}, {keys})")
    fits = mask.ndim <= len(shape) and all(m in (1, s) for m, s in zip(mask.shape[::-1], shape[::-1]))
    if not fits:
        raise ValueError(f"{op}: argument 'mask' must broadcast to {dims} = {tuple(shape)}, got {tuple(mask.shape)}")


def _require_param(op, name, a, shape, dims, *, optional=False):
    """A float weight or bias of the given shape; ``None`` is accepted for an optional bias."""
    if a is None and optional:
        return
    require_float(op, name, a)
    require_shape(op, name, a, shape, dims)


def _require_heads(op, C, n_head):
    require_positive(op, "n_head", n_head, int)
    require_divisible(op, "C", C, "n_head", n_head)


def _heads_share(mask, x):
    """A (B | 1, Tq | 1, Tk) mask as the (B, 1, Tq, Tk) one that every head of x's batch shares."""
    xp = get_array_module(x)
    B, Tq = x.shape[:2]
    return xp.broadcast_to(xp.asarray(mask), (B, Tq, mask.shape[-1]))[:, None]


def check_attention_args(q, k, v, causal, mask, dropout=0.0, rng=None):
    """The argument checks of ``attention_forward`` (also run by the kernels that replace it).

    Returns the dimensions (B, NH, Tq, Tk, hs).
    """
    require_float("attention", "q", q)
    require_ndim("attention", "q", q, 4, "(B, NH, Tq, hs)")
    require_nonempty("attention", "q", q, 3, "hs", "(B, NH, Tq, hs)")     # the scores' scale is 1/sqrt(hs)
    B, NH, Tq, hs = q.shape
    require_float("attention", "k", k)
    require_ndim("attention", "k", k, 4, "(B, NH, Tk, hs)")
    require_nonempty("attention", "k", k, 2, "Tk", "(B, NH, Tk, hs)")     # a softmax over no keys is undefined
    Tk = k.shape[2]
    require_shape("attention", "k", k, (B, NH, Tk, hs), "(B, NH, Tk, hs)")
    require_float("attention", "v", v)
    require_shape("attention", "v", v, (B, NH, Tk, hs), "(B, NH, Tk, hs)")
    require_same_dtype("attention", q=q, k=k, v=v)
    require_bool("attention", "causal", causal)
    if mask is not None:
        _require_mask("attention", mask, (B, NH, Tq, Tk), "(B, NH, Tq, Tk)")
    require_probability("attention", "dropout", dropout)
    if dropout > 0:
        _require_rng("attention", rng)
    return B, NH, Tq, Tk, hs


# --- attention --------------------------------------------------------------------------------

class AttentionCache(NamedTuple):
    q: object       # (B, NH, Tq, hs)
    k: object       # (B, NH, Tk, hs)
    v: object       # (B, NH, Tk, hs)
    att: object     # (B, NH, Tq, Tk) the probabilities A; 0 where a key is masked
    drop: object = None     # the DropoutCache of A's dropout, or None without dropout
    causal: bool = False    # the forward's causal option (att is 0 where j > i + Tk - Tq then; a
                            # faster tier's backward may skip that block, minilm.gpu.attention)


def attention_forward(q, k, v, *, causal=False, mask=None, dropout=0.0, rng=None):
    r"""y = dropout(softmax(q k^T / sqrt(hs))) v, over the allowed keys of each query.

    Parameters
    ----------
    q : (B, NH, Tq, hs) float array, the queries.
    k, v : (B, NH, Tk, hs) float arrays, the keys and values.
    causal : bool, query i may attend key j only when j <= i + Tk - Tq (queries aligned to the
        end of the keys; the lower triangle when Tq == Tk).
    mask : boolean array broadcastable to (B, NH, Tq, Tk), True = may attend, or None.
        Combined with ``causal`` by "and". A query with no allowed key gives output 0.
    dropout : float in [0, 1), the probability of dropping each attention weight while training
        (nanoGPT's ``attn_dropout``); 0 (the default) is no dropout.
    rng : the dropout's numpy Generator or int seed (as ``dropout_forward``); needed when dropout > 0.

    Returns
    -------
    y : (B, NH, Tq, hs) array, and the cache for ``attention_backward``.
    """
    B, NH, Tq, Tk, hs = check_attention_args(q, k, v, causal, mask, dropout, rng)
    xp = get_array_module(q, k, v)

    allowed = xp.asarray(mask) if mask is not None else None          # broadcasts to (B, NH, Tq, Tk)
    if causal:
        below = xp.tril(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq)      # (Tq, Tk) True where j <= i + Tk - Tq
        allowed = below if allowed is None else allowed & below

    S = (q @ xp.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hs))           # (B, NH, Tq, Tk)
    if allowed is not None:
        S = xp.where(allowed, S, -xp.inf)                              # a masked key: e^{-inf} = 0
    m = xp.max(S, axis=-1, keepdims=True)                              # (B, NH, Tq, 1)
    m[m == -xp.inf] = 0                                                # row with no allowed key: e^{-inf - 0} = 0
    e = xp.exp(S - m)                                                  # (B, NH, Tq, Tk) every exponent <= 0
    Z = xp.sum(e, axis=-1, keepdims=True)                              # (B, NH, Tq, 1) >= 1, or 0 for an empty row
    Z[Z == 0] = 1                                                      # empty row: att = 0 / 1 = 0, not 0 / 0
    att = e / Z                                                        # (B, NH, Tq, Tk)
    att_d, drop = dropout_forward(att, p=dropout, rng=rng) if dropout else (att, None)   # Ã = dropout(A)
    y = att_d @ v                                                      # (B, NH, Tq, hs)
    return y, AttentionCache(q, k, v, att, drop, bool(causal))


def attention_backward(dy, cache):
    """Gradients of y = dropout(softmax(q k^T / sqrt(hs))) v (see the module docstring for the derivation).

    Returns
    -------
    (dq, dk, dv): shapes of q, k, v. A query with no allowed key receives 0.
    """
    require_cache("attention_backward", cache, "AttentionCache")
    q, k, v, att, drop, _ = cache                                      # causal: att is 0 where masked
    require_gradient("attention_backward", "dy", dy, q.shape, "(B, NH, Tq, hs)")
    xp = get_array_module(dy, q)
    hs = q.shape[-1]
    # forward: y = att_d @ v, att_d = dropout(att) (att itself without dropout)
    dropped = drop is not None and drop.mask is not None               # (a cache of dropout p = 0 has no mask)
    att_d = att * drop.mask * drop.scale if dropped else att           # Ã = m ⊙ A / (1 - p), the forward's mask
    datt_d = dy @ xp.swapaxes(v, -1, -2)                               # (B, NH, Tq, Tk)  y = Ã v
    dv = xp.swapaxes(att_d, -1, -2) @ dy                               # (B, NH, Tk, hs)  y = Ã v
    datt = dropout_backward(datt_d, drop)[0] if dropped else datt_d    # (B, NH, Tq, Tk)  Ã = dropout(A)
    # forward: att = softmax(S) over each row; att = 0 at masked keys, so dS = 0 there too
    dS = att * (datt - xp.sum(datt * att, axis=-1, keepdims=True))     # (B, NH, Tq, Tk)
    # forward: S = q @ k^T / sqrt(hs)
    dq = (dS @ k) * (1.0 / math.sqrt(hs))                              # (B, NH, Tq, hs)
    dk = (xp.swapaxes(dS, -1, -2) @ q) * (1.0 / math.sqrt(hs))         # (B, NH, Tk, hs)
    return dq, dk, dv


# --- heads ------------------------------------------------------------------------------------

def split_heads(a, n_head):
    """(B, T, C) -> (B, NH, T, hs): head h takes channels h*hs .. (h+1)*hs - 1."""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, NH, T, hs)


def merge_heads(a):
    """(B, NH, T, hs) -> (B, T, C), the heads side by side; the inverse of ``split_heads``."""
    B, NH, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)              # (B, T, C)


def merge_heads_side_by_side(parts):
    """``concatenate([merge_heads(p) for p in parts], axis=-1)``: (B, T, n·C) from n arrays
    (B, NH, T, hs). It turns the gradients of the heads q, k, v (n = 3) or k, v (n = 2) into the
    gradient of qkv or kv, undoing ``split_heads(qkv[..., i*C:(i+1)*C])``. Read it as that
    concatenation; the body only saves a copy: it writes the blocks in one pass, and parts that
    are already those heads of one NumPy array (the numba tier's attention backward writes them
    so on its BLAS path, above FUSED_MAX_WORK or with dropout) give that array itself."""
    B, NH, T, hs = parts[0].shape
    C = NH * hs
    xp = get_array_module(parts[0])
    base = getattr(parts[0], "base", None)
    if xp is np and isinstance(base, np.ndarray) and _are_heads_of(parts, base):
        return base                     # the parts were written as heads of one such array already
    out = xp.empty((B, T, len(parts) * C), dtype=xp.result_type(*parts))
    for i, part in enumerate(parts):
        split_heads(out[..., i * C:(i + 1) * C], NH)[...] = part        # block i is merge_heads(part)
    return out


def _are_heads_of(parts, base):
    """Is part i, for every i, ``split_heads`` of block i of ``base`` (B, T, n·C), the same memory
    read the same way? (The numba tier's attention backward writes its gradients so.)"""
    B, NH, T, hs = parts[0].shape
    C = NH * hs
    if base.shape != (B, T, len(parts) * C) or any(part.dtype != base.dtype for part in parts):
        return False
    for i, part in enumerate(parts):
        head = split_heads(base[..., i * C:(i + 1) * C], NH)
        if (part.shape, part.strides, part.ctypes.data) != (head.shape, head.strides, head.ctypes.data):
            return False
    return True


# --- multi-head self-attention ----------------------------------------------------------------

class SelfAttentionCache(NamedTuple):
    qkv_cache: object       # LinearCache of qkv = x @ W_qkv + b_qkv
    att_cache: object       # AttentionCache of the heads
    o_cache: object         # LinearCache of y = atty @ W_o + b_o


def check_self_attention_args(x, W_qkv, b_qkv, W_o, b_o, n_head, causal, dropout=0.0, rng=None, mask=None):
    """The argument checks of ``self_attention_forward``, shared with the other tiers. Returns C."""
    op = "self_attention"
    require_float(op, "x", x)
    require_ndim(op, "x", x, 3, "(B, T, C)")
    require_nonempty(op, "x", x, 1, "T", "(B, T, C)")
    require_nonempty(op, "x", x, 2, "C", "(B, T, C)")
    C = x.shape[-1]
    _require_heads(op, C, n_head)
    _require_param(op, "W_qkv", W_qkv, (C, 3 * C), "(C, 3C)")
    _require_param(op, "b_qkv", b_qkv, (3 * C,), "(3C,)", optional=True)
    _require_param(op, "W_o", W_o, (C, C), "(C, C)")
    _require_param(op, "b_o", b_o, (C,), "(C,)", optional=True)
    require_same_dtype(op, x=x, W_qkv=W_qkv, b_qkv=b_qkv, W_o=W_o, b_o=b_o)
    require_bool(op, "causal", causal)
    if mask is not None:
        _require_mask(op, mask, (x.shape[0], x.shape[1], x.shape[1]), "(B, T, T)", keys="T", queries="T")
    require_probability(op, "dropout", dropout)
    if dropout > 0:
        _require_rng(op, rng)
    return C


def self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, *, n_head, causal=True, mask=None, dropout=0.0, rng=None,
                           attention_forward=attention_forward):
    """Multi-head self-attention: qkv projection, attention per head, output projection.

    Parameters
    ----------
    x : (B, T, C) float array.
    W_qkv : (C, 3C) float array; columns [q | k | v], head h uses h*hs .. (h+1)*hs - 1 of each.
    b_qkv : (3C,) float array, or None.
    W_o : (C, C) float array.
    b_o : (C,) float array, or None.
    n_head : int, NH; C must be divisible by it.
    causal : bool, position t attends positions <= t.
    mask : boolean array of 3 dimensions broadcastable to (B, T, T), True = may attend, shared by
        every head (and with ``causal``, both must allow a key); or None. An encoder over padded
        sequences masks its padding keys with ``mask[:, None, :]`` of a (B, T) mask.
    dropout, rng : dropout of the attention weights while training (see ``attention_forward``).
    attention_forward : the attention of the heads; this file's by default. The numba tier
        passes its kernel here, so the composition is written once.

    Returns
    -------
    y : (B, T, C) array, and the cache for ``self_attention_backward``.
    """
    C = check_self_attention_args(x, W_qkv, b_qkv, W_o, b_o, n_head, causal, dropout, rng, mask)
    qkv, qkv_cache = linear_forward(x, W_qkv, b_qkv)                   # (B, T, 3C)
    q = split_heads(qkv[..., 0 * C:1 * C], n_head)                     # (B, NH, T, hs)
    k = split_heads(qkv[..., 1 * C:2 * C], n_head)                     # (B, NH, T, hs)
    v = split_heads(qkv[..., 2 * C:3 * C], n_head)                     # (B, NH, T, hs)
    if mask is not None:
        mask = _heads_share(mask, x)                                   # (B, 1, T, T)
    y_heads, att_cache = attention_forward(q, k, v, causal=causal, mask=mask, dropout=dropout,
                                           rng=rng)                    # (B, NH, T, hs)
    atty = merge_heads(y_heads)                                        # (B, T, C)
    y, o_cache = linear_forward(atty, W_o, b_o)                        # (B, T, C)
    return y, SelfAttentionCache(qkv_cache, att_cache, o_cache)


def self_attention_backward(dy, cache, *, attention_backward=attention_backward):
    """Gradients of multi-head self-attention: the forward, line by line in reverse.

    ``attention_backward`` is the one matching the forward's ``attention_forward``.

    Returns
    -------
    (dx, dW_qkv, db_qkv, dW_o, db_o); a bias gradient is None when the forward had no bias.
    """
    require_cache("self_attention_backward", cache, "SelfAttentionCache")
    qkv_cache, att_cache, o_cache = cache
    B, NH, T, hs = att_cache.q.shape
    require_gradient("self_attention_backward", "dy", dy, (B, T, NH * hs), "(B, T, C)")
    datty, dW_o, db_o = linear_backward(dy, o_cache)                   # y = atty @ W_o + b_o
    dy_heads = split_heads(datty, NH)                                  # (B, NH, T, hs)  atty = merge_heads(y_heads)
    dq, dk, dv = attention_backward(dy_heads, att_cache)               # y_heads = attention(q, k, v)
    dqkv = merge_heads_side_by_side([dq, dk, dv])                      # (B, T, 3C)  q, k, v = split(qkv)
    dx, dW_qkv, db_qkv = linear_backward(dqkv, qkv_cache)              # qkv = x @ W_qkv + b_qkv
    return dx, dW_qkv, db_qkv, dW_o, db_o


# --- multi-head cross-attention ---------------------------------------------------------------

class CrossAttentionCache(NamedTuple):
    q_cache: object         # LinearCache of q = x @ W_q + b_q
    kv_cache: object        # LinearCache of kv = memory @ W_kv + b_kv
    att_cache: object       # AttentionCache of the heads
    o_cache: object         # LinearCache of y = atty @ W_o + b_o


def cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, *, n_head, mask=None,
                            attention_forward=attention_forward):
    """Multi-head cross-attention: queries from x, keys and values from memory.

    Parameters
    ----------
    x : (B, Tq, C) float array, e.g. the decoder stream.
    memory : (B, Tk, C) float array, e.g. the encoder output.
    W_q : (C, C) float array; b_q : (C,) float array or None.
    W_kv : (C, 2C) float array, columns [k | v]; b_kv : (2C,) float array or None.
    W_o : (C, C) float array; b_o : (C,) float array or None.
    n_head : int, NH; C must be divisible by it.
    mask : boolean array of 3 dimensions broadcastable to (B, Tq, Tk), True = may attend, shared by
        every head; or None. A padding mask over the memory's keys is ``mask[:, None, :]`` of a (B, Tk)
        one. A query with no allowed key gets attention output 0 (so y = b_o there, 0 without b_o).
    attention_forward : the attention of the heads; this file's by default (see ``self_attention_forward``).

    Returns
    -------
    y : (B, Tq, C) array, and the cache for ``cross_attention_backward``.
    """
    op = "cross_attention"
    require_float(op, "x", x)
    require_ndim(op, "x", x, 3, "(B, Tq, C)")
    require_nonempty(op, "x", x, 2, "C", "(B, Tq, C)")
    B, Tq, C = x.shape
    require_float(op, "memory", memory)
    require_ndim(op, "memory", memory, 3, "(B, Tk, C)")
    require_nonempty(op, "memory", memory, 1, "Tk", "(B, Tk, C)")
    Tk = memory.shape[1]
    require_shape(op, "memory", memory, (B, Tk, C), "(B, Tk, C)")
    _require_heads(op, C, n_head)
    _require_param(op, "W_q", W_q, (C, C), "(C, C)")
    _require_param(op, "b_q", b_q, (C,), "(C,)", optional=True)
    _require_param(op, "W_kv", W_kv, (C, 2 * C), "(C, 2C)")
    _require_param(op, "b_kv", b_kv, (2 * C,), "(2C,)", optional=True)
    _require_param(op, "W_o", W_o, (C, C), "(C, C)")
    _require_param(op, "b_o", b_o, (C,), "(C,)", optional=True)
    require_same_dtype(op, x=x, memory=memory, W_q=W_q, b_q=b_q, W_kv=W_kv, b_kv=b_kv, W_o=W_o, b_o=b_o)
    if mask is not None:
        _require_mask(op, mask, (B, Tq, Tk), "(B, Tq, Tk)", keys="Tk")

    q, q_cache = linear_forward(x, W_q, b_q)                           # (B, Tq, C)
    kv, kv_cache = linear_forward(memory, W_kv, b_kv)                  # (B, Tk, 2C)
    q = split_heads(q, n_head)                                         # (B, NH, Tq, hs)
    k = split_heads(kv[..., 0 * C:1 * C], n_head)                      # (B, NH, Tk, hs)
    v = split_heads(kv[..., 1 * C:2 * C], n_head)                      # (B, NH, Tk, hs)
    if mask is not None:
        mask = _heads_share(mask, x)                                   # (B, 1, Tq, Tk)
    y_heads, att_cache = attention_forward(q, k, v, mask=mask)         # (B, NH, Tq, hs)
    atty = merge_heads(y_heads)                                        # (B, Tq, C)
    y, o_cache = linear_forward(atty, W_o, b_o)                        # (B, Tq, C)
    return y, CrossAttentionCache(q_cache, kv_cache, att_cache, o_cache)


def cross_attention_backward(dy, cache, *, attention_backward=attention_backward):
    """Gradients of multi-head cross-attention: the forward, line by line in reverse.

    ``attention_backward`` is the one matching the forward's ``attention_forward``.

    Returns
    -------
    (dx, dmemory, dW_q, db_q, dW_kv, db_kv, dW_o, db_o); a bias gradient is None when the
    forward had no bias.
    """
    require_cache("cross_attention_backward", cache, "CrossAttentionCache")
    q_cache, kv_cache, att_cache, o_cache = cache
    B, NH, Tq, hs = att_cache.q.shape
    require_gradient("cross_attention_backward", "dy", dy, (B, Tq, NH * hs), "(B, Tq, C)")
    datty, dW_o, db_o = linear_backward(dy, o_cache)                   # y = atty @ W_o + b_o
    dy_heads = split_heads(datty, NH)                                  # (B, NH, Tq, hs)  atty = merge_heads(y_heads)
    dq, dk, dv = attention_backward(dy_heads, att_cache)               # y_heads = attention(q, k, v)
    dkv = merge_heads_side_by_side([dk, dv])                           # (B, Tk, 2C)  k, v = split(kv)
    dmemory, dW_kv, db_kv = linear_backward(dkv, kv_cache)             # kv = memory @ W_kv + b_kv
    dx, dW_q, db_q = linear_backward(merge_heads(dq), q_cache)         # (B, Tq, C)  q = x @ W_q + b_q
    return dx, dmemory, dW_q, db_q, dW_kv, db_kv, dW_o, db_o
