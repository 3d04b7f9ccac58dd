r"""The attention core as CuPy: products in cuBLAS; softmax and dropout of the weights as row kernels.

Forward, for every (batch, head) at once: ``S = q k^T`` (one batched product, in the compute type:
float32 for float32 and 16-bit q, k), then one row kernel that scales each row by 1/sqrt(hs),
applies the causal mask (query i sees keys j <= i + Tk - Tq, as ``minilm.reference.attention``),
turns the row into the probabilities ``att`` in place and, with dropout, draws each weight's mask
and writes the dropped weights ``att_d = mask att / (1 - p)`` in q's dtype -- the reference's
``where``, ``max``, ``exp``, ``sum``, division and dropout in one pass over the scores; then
``y = att_d v``.

Backward: ``g = dy v^T`` (the gradient wrt ``att_d``), then one row kernel that undoes the dropout
and the softmax in place, ``dS = att (mask g / (1 - p) - sum_j att_j mask_j g_j / (1 - p)) / sqrt(hs)``,
and writes ``att_d`` again for the next product; then ``dv = att_d^T dy``, ``dq = dS k`` and
``dk = dS^T q``. Every product goes through ``minilm.gpu._blas.bmm``: a transposed operand is read
in place, not copied, and 16-bit operands multiply on the tensor cores with float32 sums. For
causal self-attention of a long enough sequence each product is two calls that leave out the
masked quarter of the scores (``CAUSAL_SPLIT_MIN_T``).

The dropout mask of weight i is ``minilm.gpu._core``'s hash of (seed, i), the one
``minilm.gpu.dropout`` draws, so the weights equal that tier's softmax followed by its dropout.
The cache is the reference's ``AttentionCache``, with the mask in its ``DropoutCache``: the
reference backward runs on it too. 16-bit data keeps ``att`` in float32 (as PyTorch's autocast
keeps its softmax) and rounds to 16 bits only the operands of the products. A boolean ``mask``
(cross-attention over padded memory) runs the reference, as does a dtype the kernels are not
compiled for. Self-attention splits q, k and v into heads with one copy and gathers their
gradients with one; cross-attention is the reference's composition with this attention.
"""
import math

import cupy

from minilm.gpu import _blas
from minilm.gpu._core import acc_dtype, contiguous, launch_rows, row_module, scalar, supported
from minilm.gpu.dropout import dropout_seed, no_seed
from minilm.reference import attention as reference
from minilm.reference.attention import (AttentionCache, SelfAttentionCache, check_attention_args,
                                        check_self_attention_args, merge_heads, split_heads)
from minilm.reference.dropout import DropoutCache
from minilm.gpu.linear import linear_backward, linear_forward
from minilm.validate import require_gradient

__all__ = ["attention_forward", "attention_backward",
           "self_attention_forward", "self_attention_backward",
           "cross_attention_forward", "cross_attention_backward"]

_SOURCE = r"""
// S (rows of Tk scores in the compute type A, row r = query r % Tq) -> att in place; with `drop`,
// the mask of each weight and att_d = mask att * dscale; att_d (in D) is written when `write_d`
template <typename D>
__global__ void softmax_dropout_rows(typename acc_t<D>::type* att, D* att_d, bool* mask, int N, int Tq, int Tk,
                                     typename acc_t<D>::type scale, int causal, int write_d, int drop,
                                     const unsigned long long* seeds, int slot, unsigned long long seed,
                                     double keep, typename acc_t<D>::type dscale) {
    typedef typename acc_t<D>::type A;
    if (slot >= 0) seed = seeds[slot];                              // a captured graph's seed table
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    A* s = att + (long long)row * Tk;
    int last = causal ? (row % Tq) + Tk - Tq : Tk - 1;              // the last key this query may see
    if (last > Tk - 1) last = Tk - 1;
    A m = neg_inf<A>();
    for (int j = lane; j <= last; j += 32) m = max(m, s[j] * scale);
    m = warp_max(m);
    if (m == neg_inf<A>()) m = 0;            // no key allowed, or every allowed score -inf: as the reference,
    A Z = 0;                                 // m = 0, Z = 0 -> 1 and att = 0 (exp(-inf - -inf) would be NaN)
    for (int j = lane; j <= last; j += 32) Z += exp_acc(s[j] * scale - m);   // exponents <= 0
    Z = warp_sum(Z);
    if (Z == 0) Z = 1;
    for (int j = lane; j < Tk; j += 32) {
        long long i = (long long)row * Tk + j;
        A a = j <= last ? exp_acc(s[j] * scale - m) / Z : (A)0;
        s[j] = a;
        if (drop) {
            bool kept = dropout_keep(seed, (unsigned long long)i, keep);
            mask[i] = kept;
            a = kept ? a * dscale : (A)0;
        }
        if (write_d) att_d[i] = store<D>(a);
    }
}

// g = dL/d(att_d) (rows of Tk, in A) -> dS = att (datt - sum(datt att)) * scale, datt = mask g * dscale
// (g itself without `drop`); dS goes in place into g, or into dS (in D) when `write_dS`; with
// `write_d`, att_d = mask att * dscale again (in D), the operand of dv = att_d^T dy
template <typename D>
__global__ void softmax_dropout_backward_rows(typename acc_t<D>::type* g, const typename acc_t<D>::type* att,
                                              const bool* mask, D* dS, D* att_d, int N, int Tq, int Tk, int causal,
                                              typename acc_t<D>::type scale, int write_dS, int write_d, int drop,
                                              typename acc_t<D>::type dscale) {
    typedef typename acc_t<D>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    long long base = (long long)row * Tk;
    int last = causal ? (row % Tq) + Tk - Tq : Tk - 1;              // keys past it have att = 0, and g
    if (last > Tk - 1) last = Tk - 1;                                // there may be unwritten (split products)
    A s = 0;
    for (int j = lane; j <= last; j += 32) {
        A d = g[base + j];
        if (drop) d = mask[base + j] ? d * dscale : (A)0;
        s += d * att[base + j];
    }
    s = warp_sum(s);
    for (int j = lane; j < Tk; j += 32) {
        long long i = base + j;
        bool kept = drop ? mask[i] : true;
        A a = att[i];
        A d = j <= last ? g[i] : (A)0;
        if (drop) d = kept ? d * dscale : (A)0;
        A r = a * (d - s) * scale;
        if (write_dS) dS[i] = store<D>(r); else g[i] = r;
        if (write_d) att_d[i] = store<D>(drop ? (kept ? a * dscale : (A)0) : a);
    }
}
"""

_kernel = row_module(_SOURCE, ["softmax_dropout_rows", "softmax_dropout_backward_rows"])


# Causal attention with Tq = Tk = T: the queries [0, h) see only the keys [0, h), h = T // 2, so
# each product is made as two calls that leave out the block (queries [0, h), keys [h, T)) -- a
# quarter of the (T, T) scores, all of it masked. The products never compute it and never read
# it, and the row kernels never read it either (they write att = 0 there). Below this T the
# second call costs more than the quarter saves.
CAUSAL_SPLIT_MIN_T = 128


def _causal_half(Tq, Tk, causal, dtype):
    """h = T // 2 when the products skip the masked block (see above), else 0."""
    return Tq // 2 if causal and Tq == Tk and Tq >= CAUSAL_SPLIT_MIN_T and _blas.available(dtype) else 0


def _mm(a, b, *, trans_a=False, trans_b=False, out_dtype=None, out=None):
    """``_blas.bmm``; where its cuBLAS call is unavailable for the dtype, CuPy's product in the compute type."""
    if _blas.available(a.dtype):
        return _blas.bmm(a, b, trans_a=trans_a, trans_b=trans_b, out_dtype=out_dtype, out=out)
    wide = acc_dtype(a.dtype)
    a = cupy.swapaxes(a, -1, -2) if trans_a else a
    b = cupy.swapaxes(b, -1, -2) if trans_b else b
    product = cupy.matmul(a.astype(wide, copy=False), b.astype(wide, copy=False))
    if out is None:
        return product.astype(out_dtype or a.dtype, copy=False)
    out[...] = product
    return out


def attention_forward(q, k, v, *, causal=False, mask=None, dropout=0.0, rng=None):
    """CuPy ``minilm.reference.attention.attention_forward``: same arguments, checks, output and cache.

    Dropout of the weights draws this tier's masks (``minilm.gpu.dropout``'s random stream).
    """
    B, NH, Tq, Tk, hs = check_attention_args(q, k, v, causal, mask, dropout, rng)
    if mask is not None or not supported(q, k, v) or Tq == 0:
        return reference.attention_forward(q, k, v, causal=causal, mask=mask, dropout=dropout, rng=rng)
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    h = _causal_half(Tq, Tk, causal, dtype)
    if h:                                                            # (see CAUSAL_SPLIT_MIN_T)
        att = cupy.empty((B, NH, Tq, Tk), dtype=acc)                 # S = q k^T, att in place
        _blas.bmm(q[..., :h, :], k[..., :h, :], trans_b=True, out=att[..., :h, :h])
        _blas.bmm(q[..., h:, :], k, trans_b=True, out=att[..., h:, :])
    else:
        att = _mm(q, k, trans_b=True, out_dtype=acc)                 # (B, NH, Tq, Tk) S = q k^T, att in place
    write_d = bool(dropout) or dtype != acc                          # else att itself is the next operand
    att_d = cupy.empty(att.shape, dtype=dtype) if write_d else att
    keep_mask = cupy.empty(att.shape, dtype=cupy.bool_) if dropout else att   # att: a placeholder, never read
    seed = dropout_seed(rng) if dropout else no_seed()
    dscale = 1.0 / (1.0 - float(dropout))
    N = B * NH * Tq
    launch_rows(_kernel("softmax_dropout_rows", dtype), N,
                (att, att_d, keep_mask, cupy.int32(N), cupy.int32(Tq), cupy.int32(Tk),
                 scalar(1.0 / math.sqrt(hs), dtype), cupy.int32(bool(causal)), cupy.int32(write_d),
                 cupy.int32(bool(dropout)), *seed, 1.0 - float(dropout), scalar(dscale, dtype)))
    if h:
        y = cupy.empty((B, NH, Tq, hs), dtype=dtype)                 # y = att_d v
        _blas.bmm(att_d[..., :h, :h], v[..., :h, :], out=y[..., :h, :])
        _blas.bmm(att_d[..., h:, :], v, out=y[..., h:, :])
    else:
        y = _mm(att_d, v)                                            # (B, NH, Tq, hs)
    drop = DropoutCache(keep_mask, dscale, att.shape) if dropout else None
    return y, AttentionCache(q, k, v, att, drop, bool(causal))


def attention_backward(dy, cache):
    """CuPy ``minilm.reference.attention.attention_backward``. Returns (dq, dk, dv)."""
    return _backward(dy, cache)


def _backward(dy, cache, out=None):
    """attention_backward, writing (dq, dk, dv) into ``out`` (three arrays of q's shape) when given."""
    q, k, v, att, drop, causal = cache
    require_gradient("attention_backward", "dy", dy, q.shape, "(B, NH, Tq, hs)")
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    if (not supported(dy, q, k, v, att) or dy.dtype != dtype or att.dtype != acc or att.size == 0
            or (drop is not None and drop.mask is None)):
        grads = reference.attention_backward(dy, cache)              # e.g. a cache of 16-bit weights
        if out is None:
            return grads
        for o, g in zip(out, grads):
            o[...] = g
        return tuple(out)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    dy = contiguous(dy)                                              # one copy of the heads' view, not one per product
    h = _causal_half(Tq, Tk, causal, dtype)
    if h:                                                            # (see CAUSAL_SPLIT_MIN_T)
        g = cupy.empty((B, NH, Tq, Tk), dtype=acc)                   # g = dy v^T
        _blas.bmm(dy[..., :h, :], v[..., :h, :], trans_b=True, out=g[..., :h, :h])
        _blas.bmm(dy[..., h:, :], v, trans_b=True, out=g[..., h:, :])
    else:
        g = _mm(dy, v, trans_b=True, out_dtype=acc)                  # (B, NH, Tq, Tk) dL/d(att_d), y = att_d v
    write_dS = dtype != acc                                          # else dS in place of g
    dS = cupy.empty(g.shape, dtype=dtype) if write_dS else g
    write_d = drop is not None or dtype != acc                       # else att itself is the operand
    att_d = cupy.empty(att.shape, dtype=dtype) if write_d else att
    keep_mask = contiguous(drop.mask) if drop is not None else att  # att: a placeholder, never read
    N = B * NH * Tq
    launch_rows(_kernel("softmax_dropout_backward_rows", dtype), N,
                (g, contiguous(att), keep_mask, dS, att_d, cupy.int32(N), cupy.int32(Tq), cupy.int32(Tk),
                 cupy.int32(bool(causal)), scalar(1.0 / math.sqrt(hs), dtype), cupy.int32(write_dS), cupy.int32(write_d),
                 cupy.int32(drop is not None), scalar(drop.scale if drop is not None else 1.0, dtype)))
    dq, dk, dv = (None, None, None) if out is None else out
    if not h:
        dv = _mm(att_d, dy, trans_a=True, out=dv)                    # (B, NH, Tk, hs)
        dq = _mm(dS, k, out=dq)                                      # from S = q k^T / sqrt(hs)
        dk = _mm(dS, q, trans_a=True, out=dk)
        return dq, dk, dv
    if out is None:
        dq, dk, dv = (cupy.empty(a.shape, dtype=a.dtype) for a in (q, k, v))   # C-ordered, whatever q's layout
    _blas.bmm(att_d[..., :, :h], dy, trans_a=True, out=dv[..., :h, :])                 # dv = att_d^T dy
    _blas.bmm(att_d[..., h:, h:], dy[..., h:, :], trans_a=True, out=dv[..., h:, :])
    _blas.bmm(dS[..., :h, :h], k[..., :h, :], out=dq[..., :h, :])                      # dq = dS k
    _blas.bmm(dS[..., h:, :], k, out=dq[..., h:, :])
    _blas.bmm(dS[..., :, :h], q, trans_a=True, out=dk[..., :h, :])                     # dk = dS^T q
    _blas.bmm(dS[..., h:, h:], q[..., h:, :], trans_a=True, out=dk[..., h:, :])
    return dq, dk, dv


def self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, *, n_head, causal=True, mask=None, dropout=0.0, rng=None):
    """``minilm.reference.attention.self_attention_forward``: the same composition and cache, with the
    heads split by one copy and this file's attention (the reference's composition with a mask)."""
    C = check_self_attention_args(x, W_qkv, b_qkv, W_o, b_o, n_head, causal, dropout, rng, mask)
    if mask is not None or not supported(x):
        return reference.self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_head=n_head, causal=causal, mask=mask,
                                                dropout=dropout, rng=rng, attention_forward=attention_forward)
    B, T, _ = x.shape
    qkv, qkv_cache = linear_forward(x, W_qkv, b_qkv)                   # (B, T, 3C)
    heads = cupy.ascontiguousarray(qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4))  # (3, B, NH, T, hs)
    y_heads, att_cache = attention_forward(heads[0], heads[1], heads[2], causal=causal, dropout=dropout, rng=rng)
    y, o_cache = linear_forward(merge_heads(y_heads), W_o, b_o)        # (B, T, C)
    return y, SelfAttentionCache(qkv_cache, att_cache, o_cache)


def self_attention_backward(dy, cache):
    """``minilm.reference.attention.self_attention_backward``, with dq, dk and dv written side by side
    and gathered into dqkv by one copy."""
    qkv_cache, att_cache, o_cache = cache
    B, NH, T, hs = att_cache.q.shape
    require_gradient("self_attention_backward", "dy", dy, (B, T, NH * hs), "(B, T, C)")
    if not supported(dy):
        return reference.self_attention_backward(dy, cache, attention_backward=attention_backward)
    datty, dW_o, db_o = linear_backward(dy, o_cache)                   # y = atty @ W_o + b_o
    dheads = cupy.empty((3, B, NH, T, hs), dtype=att_cache.q.dtype)   # dq, dk, dv
    _backward(split_heads(datty, NH), att_cache, out=dheads)           # y_heads = attention(q, k, v)
    dqkv = dheads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * hs)  # (B, T, 3C)
    dx, dW_qkv, db_qkv = linear_backward(dqkv, qkv_cache)              # qkv = x @ W_qkv + b_qkv
    return dx, dW_qkv, db_qkv, dW_o, db_o


def cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, *, n_head, mask=None):
    """``minilm.reference.attention.cross_attention_forward`` with this file's attention of the heads."""
    return reference.cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, n_head=n_head, mask=mask,
                                             attention_forward=attention_forward)


def cross_attention_backward(dy, cache):
    """``minilm.reference.attention.cross_attention_backward`` with this file's attention backward."""
    return reference.cross_attention_backward(dy, cache, attention_backward=attention_backward)
