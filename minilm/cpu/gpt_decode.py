r"""One GPT decode step in one Numba kernel: the logits of the next token from the key/value cache.

``GPT.forward_step`` with one new token per sequence is the inner loop of sampling. Written as
ops it is some forty op calls per token (a layernorm, a linear, the attention... per block),
and at these sizes each call's Python overhead (argument checks, dispatch, small arrays) costs
more than its arithmetic: the token's whole forward is ~0.8 M multiply-adds, a fraction of a
millisecond of work. This kernel runs the same forward for the new token, reading the
parameters from the flat buffer by their offsets and the keys and values from the cache:

.. math::

    x &= W_{te}[\text{tok}] + W_{pe}[t] \\
    q, k, v &= \operatorname{ln}_1(x)\, W_{qkv} + b_{qkv}
        \qquad k, v \text{ written into the cache at position } t \\
    y_h &= \textstyle\sum_{j \le t} \operatorname{softmax}_j(q_h \cdot K_{hj} / \sqrt{hs})\, V_{hj}
        \qquad\text{for each head } h \\
    x &= x + y W_o + b_o, \qquad x = x + \operatorname{gelu}(\operatorname{ln}_2(x) W_1 + b_1) W_2 + b_2 \\
    \text{logits} &= \operatorname{ln}_f(x)\, W_{te}^\top

(the middle three lines are one block, run for every block in turn; :math:`K_{hj}, V_{hj}` are
head h's cached key and value at position j, not the vocabulary size), which is
``GPT.forward_step`` for ``Tn = 1``; ``tests/test_cpu_decode.py`` holds the two to each other, and
the sampled tokens to the uncached path.
The layernorms and the GELU are the ops' own kernels (``minilm.cpu.layernorm``,
``minilm.cpu.activations``), called on one row. Matrix-vector products run as loops over the
weight's rows with the output in the inner loop, which the compiler vectorises; the softmax sums
are accumulated in float64, the products in the parameters' dtype, as BLAS does.
"""
import math
import weakref

import numpy as np

from minilm.cpu._jit import jit
from minilm.cpu._math import exp_nonpositive
from minilm.cpu.activations import _gelu_forward_kernel
from minilm.cpu.layernorm import _forward_rows

__all__ = ["gpt_decode_step"]

KERNEL_DTYPES = (np.float32, np.float64)
# per block, the parameters in this order (a missing bias or beta: offset -1, read as zeros)
BLOCK_PARAMS = ("ln_1.gamma", "ln_1.beta", "attn.W_qkv", "attn.b_qkv", "attn.W_o", "attn.b_o",
                "ln_2.gamma", "ln_2.beta", "mlp.W_1", "mlp.b_1", "mlp.W_2", "mlp.b_2")
LN_EPS = 1e-5       # the layernorm op's default, which the GPT uses
_layernorm_rows = _forward_rows.serial              # the ops' serial kernels, named so that the
_gelu_rows = _gelu_forward_kernel.serial            # kernels below can call them


@jit(error_model="numpy")
def _vec(data, offset, n, zeros):
    """The n values at ``offset`` in the flat buffer, or ``zeros[:n]`` for a missing parameter (-1)."""
    return zeros[:n] if offset < 0 else data[offset:offset + n]


@jit(error_model="numpy")
def _layernorm(x, gamma, beta, out, x_hat, rstd):
    """out = layernorm(x) for the one row x (C,): the layernorm op's own kernel on a (1, C) view."""
    _layernorm_rows(x.reshape(1, x.shape[0]), gamma, beta, LN_EPS, out.reshape(1, out.shape[0]), x_hat, rstd)


@jit(error_model="numpy")
def _matvec(x, W, b, out):
    """out = x W + b for x (D,), W (D, N) row-major, b (N,): rows of W scaled and added in turn."""
    N = out.shape[0]
    for n in range(N):
        out[n] = 0
    for d in range(x.shape[0]):
        xd = x[d]
        row = W[d]
        for n in range(N):
            out[n] += xd * row[n]
    for n in range(N):
        out[n] += b[n]


@jit(error_model="numpy")
def _decode(data, block_offsets, top_offsets, tokens, t, K, V, n_head, block_size):
    """Logits (B, vocab) of the tokens (B,) at position t; the key and value caches K, V
    (L, B, NH, block_size, hs) get their keys and values."""
    L, B, NH, _, hs = K.shape
    C = NH * hs
    wte_at, wpe_at, lnf_g_at, lnf_b_at, vocab = top_offsets
    dtype = data.dtype
    zeros = np.zeros(4 * C, dtype=dtype)
    x = np.empty(C, dtype=dtype)
    ln = np.empty(C, dtype=dtype)
    x_hat = np.empty((1, C), dtype=dtype)                       # the layernorm kernel's other outputs
    rstd = np.empty(1, dtype=dtype)
    qkv = np.empty(3 * C, dtype=dtype)
    att_y = np.empty(C, dtype=dtype)
    proj = np.empty(C, dtype=dtype)
    hidden = np.empty(4 * C, dtype=dtype)
    no_e = np.empty(0, dtype=dtype)                             # the GELU kernel keeps no e here
    scores = np.empty(block_size, dtype=dtype)
    logits = np.empty((B, vocab), dtype=dtype)
    scale = dtype.type(1.0 / math.sqrt(hs))
    wte = data[wte_at:wte_at + vocab * C].reshape(vocab, C)
    for b in range(B):
        for i in range(C):                                      # x = wte[tok] + wpe[t]
            x[i] = wte[tokens[b], i] + data[wpe_at + t * C + i]
        for l in range(L):
            o = block_offsets[l]
            _layernorm(x, _vec(data, o[0], C, zeros), _vec(data, o[1], C, zeros), ln, x_hat, rstd)
            _matvec(ln, data[o[2]:o[2] + 3 * C * C].reshape(C, 3 * C), _vec(data, o[3], 3 * C, zeros), qkv)
            for h in range(NH):                                 # this token's key and value, head by head
                for d in range(hs):
                    K[l, b, h, t, d] = qkv[C + h * hs + d]
                    V[l, b, h, t, d] = qkv[2 * C + h * hs + d]
            for h in range(NH):                                 # attention over the keys 0..t
                m = -np.inf
                for j in range(t + 1):
                    s = dtype.type(0)
                    for d in range(hs):
                        s += qkv[h * hs + d] * K[l, b, h, j, d]
                    scores[j] = s * scale
                    m = max(m, scores[j])
                Z = np.float64(0.0)
                for j in range(t + 1):
                    scores[j] = exp_nonpositive(scores[j] - m)
                    Z += scores[j]
                Z_t = dtype.type(Z)
                for d in range(hs):
                    att_y[h * hs + d] = 0
                for j in range(t + 1):
                    a = scores[j] / Z_t                         # softmax weight of key j
                    for d in range(hs):
                        att_y[h * hs + d] += a * V[l, b, h, j, d]
            _matvec(att_y, data[o[4]:o[4] + C * C].reshape(C, C), _vec(data, o[5], C, zeros), proj)
            for i in range(C):
                x[i] += proj[i]                                 # x = x + attn
            _layernorm(x, _vec(data, o[6], C, zeros), _vec(data, o[7], C, zeros), ln, x_hat, rstd)
            _matvec(ln, data[o[8]:o[8] + 4 * C * C].reshape(C, 4 * C), _vec(data, o[9], 4 * C, zeros), hidden)
            _gelu_rows(hidden, False, hidden, no_e)        # the GELU op's kernel, tanh form, in place
            _matvec(hidden, data[o[10]:o[10] + 4 * C * C].reshape(4 * C, C), _vec(data, o[11], C, zeros), proj)
            for i in range(C):
                x[i] += proj[i]                                 # x = x + mlp
        _layernorm(x, _vec(data, lnf_g_at, C, zeros), _vec(data, lnf_b_at, C, zeros), ln, x_hat, rstd)
        for v in range(vocab):                                  # logits = ln_f(x) wte^T (the tied head)
            s = dtype.type(0)
            for i in range(C):
                s += ln[i] * wte[v, i]
            logits[b, v] = s
    return logits


_offsets_of = weakref.WeakKeyDictionary()     # Params -> its offsets (a Params' layout never changes)


def _offsets(params, n_layer):
    if params in _offsets_of:
        return _offsets_of[params]
    at = lambda name: params.layout[name][0] if name in params.layout else -1   # noqa: E731
    blocks = np.array([[at(f"h.{l}.{p}") for p in BLOCK_PARAMS] for l in range(n_layer)], dtype=np.int64)
    _offsets_of[params] = blocks, (at("wte"), at("wpe"), at("ln_f.gamma"), at("ln_f.beta"), params.shape("wte")[0])
    return _offsets_of[params]


def gpt_decode_step(model, tokens, kv_cache, t):
    """Logits (B, V) of ``tokens`` (B,) at position ``t`` of a GPT, writing their keys and values
    into ``kv_cache`` (whose first ``t`` positions hold the context); None when the parameters'
    dtype has no kernel. Called by ``GPT.forward_step``, which has checked every argument."""
    data = model.params.data
    if data.dtype not in KERNEL_DTYPES or kv_cache.k.dtype != data.dtype:
        return None
    blocks, top = _offsets(model.params, model.config.n_layer)
    return _decode(data, blocks, top, np.ascontiguousarray(tokens, dtype=np.int64), int(t),
                   kv_cache.k, kv_cache.v, model.config.n_head, model.config.block_size)
