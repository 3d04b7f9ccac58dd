r"""The attention core as CuPy: matrix products in cuBLAS, the softmax of the scores as a row kernel.

Forward, per (batch, head): ``S = q k^T`` (one batched product), then one row kernel that scales
each row by 1/sqrt(hs), applies the causal mask (query i sees keys j <= i + Tk - Tq, as
``minilm.reference.attention``), and turns the row into probabilities in place -- the
reference's ``where``, ``max``, ``exp``, ``sum`` and division, in one pass; then ``y = att v``.
Backward: ``datt = dy v^T`` and ``dv = att^T dy`` (products), one row kernel that turns ``datt``
into ``dS = att (datt - sum(datt att)) / sqrt(hs)`` in place, then ``dq = dS k`` and
``dk = dS^T q``. The cache is the reference's ``AttentionCache``.

float16 and bfloat16: CuPy 14's batched (4-D) products of 16-bit arrays are slow (float16) or
refused (bfloat16), so the products go through ``minilm.gpu._blas.bmm`` (cuBLAS, tensor cores,
float32 sums). The scores come out in float32, the softmax runs on them in float32 (as PyTorch's
autocast does), the weights ``att`` are cached in float32 and rounded to 16 bits only as an
operand of the next product. Where ``bmm`` is not available, q, k and v are converted to float32
and the float32 path runs. A boolean ``mask`` (cross-attention over padded memory) runs the reference, as does
a dtype the kernels are not compiled for. Self- and cross-attention are the reference's composition with
these functions passed in as the attention of the heads.
"""
import math

import cupy

from minilm.gpu import _blas
from minilm.gpu.dropout import dropout_backward, dropout_forward
from minilm.gpu._core import LOW_PRECISION, contiguous, launch_rows, row_module, scalar, supported
from minilm.reference import attention as reference
from minilm.reference.attention import AttentionCache, check_attention_args
from minilm.validate import require_shape

__all__ = ["attention_forward", "attention_backward",
           "self_attention_forward", "self_attention_backward",
           "cross_attention_forward", "cross_attention_backward"]

_SOURCE = r"""
// S (rows of Tk scores, row r = query r % Tq) -> att, in place
template <typename T>
__global__ void scores_to_weights_rows(T* S, int N, int Tq, int Tk, typename acc_t<T>::type scale, int causal) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    T* s = S + (long long)row * Tk;
    int last = causal ? (row % Tq) + Tk - Tq : Tk - 1;              // the last key this query may see
    if (last > Tk - 1) last = Tk - 1;
    A m = neg_inf<A>();
    for (int j = lane; j <= last; j += 32) m = max(m, load(s[j]) * scale);
    m = warp_max(m);
    A Z = 0;
    for (int j = lane; j <= last; j += 32) Z += exp_acc(load(s[j]) * scale - m);   // exponents <= 0
    Z = warp_sum(Z);
    if (last < 0) Z = 1;                                             // no key allowed: att = 0
    for (int j = lane; j < Tk; j += 32)
        s[j] = store<T>(j <= last ? exp_acc(load(s[j]) * scale - m) / Z : (A)0);
}

// datt -> dS = att (datt - sum(datt att)) * scale, in place
template <typename T>
__global__ void weights_backward_rows(T* datt, const T* att, int N, int Tk, typename acc_t<T>::type scale) {
    typedef typename acc_t<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    T* d = datt + (long long)row * Tk;
    const T* a = att + (long long)row * Tk;
    A s = 0;
    for (int j = lane; j < Tk; j += 32) s += load(d[j]) * load(a[j]);
    s = warp_sum(s);
    for (int j = lane; j < Tk; j += 32) d[j] = store<T>(load(a[j]) * (load(d[j]) - s) * scale);
}
"""

_kernel = row_module(_SOURCE, ["scores_to_weights_rows", "weights_backward_rows"])


def _t(a):
    """The last two axes swapped (a view)."""
    return cupy.swapaxes(a, -1, -2)


def attention_forward(q, k, v, *, causal=False, mask=None, dropout=0.0, rng=None):
    """CuPy ``minilm.reference.attention.attention_forward``: same arguments, checks, output and cache.

    Dropout of the weights uses this tier's dropout kernel (its own random stream).
    """
    B, NH, Tq, Tk, hs = check_attention_args(q, k, v, causal, mask, dropout)
    if mask is not None or not supported(q, k, v) or Tq == 0:
        return reference.attention_forward(q, k, v, causal=causal, mask=mask, dropout=dropout, rng=rng)
    dtype = q.dtype
    tensor_cores = dtype in LOW_PRECISION and _blas.available(dtype)
    if dtype in LOW_PRECISION and not tensor_cores:                  # products in float32 (module docstring)
        q, k, v = (a.astype(cupy.float32) for a in (q, k, v))
    if tensor_cores:
        att = _blas.bmm(q, k, trans_b=True, out_dtype=cupy.float32)  # (B, NH, Tq, Tk) S = q k^T in float32
    else:
        att = cupy.matmul(q, _t(k))                                  # (B, NH, Tq, Tk) S = q k^T, fresh
    N = B * NH * Tq
    launch_rows(_kernel("scores_to_weights_rows", att.dtype), N,
                (att, cupy.int32(N), cupy.int32(Tq), cupy.int32(Tk), scalar(1.0 / math.sqrt(hs), att.dtype),
                 cupy.int32(bool(causal))))
    att_d, drop = dropout_forward(att, p=dropout, rng=rng) if dropout else (att, None)   # weights dropped
    if tensor_cores:
        y = _blas.bmm(att_d.astype(dtype), v)                        # (B, NH, Tq, hs)
    else:
        y = cupy.matmul(att_d, v).astype(dtype, copy=False)          # (B, NH, Tq, hs)
    return y, AttentionCache(q, k, v, att, drop)


def attention_backward(dy, cache):
    """CuPy ``minilm.reference.attention.attention_backward``. Returns (dq, dk, dv)."""
    q, k, v, att, _ = cache
    require_shape("attention_backward", "dy", dy, q.shape, "(B, NH, Tq, hs)")
    tensor_cores = q.dtype in LOW_PRECISION and att.dtype == cupy.float32 and dy.dtype == q.dtype
    if not supported(dy, q, k, v, att) or (att.dtype != q.dtype and not tensor_cores) or att.size == 0:
        return reference.attention_backward(dy, cache)
    if tensor_cores:
        return _backward_16bit(dy, q, k, v, att, cache.drop)
    dtype = dy.dtype                                                 # 16-bit dy, float32 q, k, v, att: converted
    dy = dy.astype(q.dtype, copy=False)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    att = contiguous(att)
    att_d = att if cache.drop is None else dropout_backward(att, cache.drop)[0]   # the forward's dropped weights
    datt = cupy.matmul(dy, _t(v))                                    # (B, NH, Tq, Tk) from y = att_d v
    dv = cupy.matmul(_t(att_d), dy)                                  # (B, NH, Tk, hs)
    if cache.drop is not None:
        datt, = dropout_backward(datt, cache.drop)                   # gradient wrt att
    N = B * NH * Tq
    launch_rows(_kernel("weights_backward_rows", q.dtype), N,
                (datt, att, cupy.int32(N), cupy.int32(Tk), scalar(1.0 / math.sqrt(hs), q.dtype)))
    dq = cupy.matmul(datt, k)                                        # from S = q k^T / sqrt(hs)
    dk = cupy.matmul(_t(datt), q)
    return tuple(g.astype(dtype, copy=False) for g in (dq, dk, dv))


def _backward_16bit(dy, q, k, v, att, drop):
    """attention_backward for 16-bit q, k, v, dy and float32 att, the products on the tensor cores."""
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    att_d = att if drop is None else dropout_backward(att, drop)[0]  # the forward's dropped weights
    datt = _blas.bmm(dy, v, trans_b=True, out_dtype=cupy.float32)    # (B, NH, Tq, Tk) from y = att_d v
    dv = _blas.bmm(att_d.astype(q.dtype), dy, trans_a=True)         # (B, NH, Tk, hs)
    if drop is not None:
        datt, = dropout_backward(datt, drop)                         # gradient wrt att
    N = B * NH * Tq
    launch_rows(_kernel("weights_backward_rows", cupy.float32), N,
                (datt, contiguous(att), cupy.int32(N), cupy.int32(Tk), scalar(1.0 / math.sqrt(hs), cupy.float32)))
    dS = datt.astype(q.dtype)                                        # dS / sqrt(hs), an operand
    dq = _blas.bmm(dS, k)                                            # from S = q k^T / sqrt(hs)
    dk = _blas.bmm(dS, q, trans_a=True)
    return dq, dk, dv


def self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, *, n_head, causal=True, dropout=0.0, rng=None):
    """``minilm.reference.attention.self_attention_forward`` with this file's attention of the heads."""
    return reference.self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_head=n_head, causal=causal,
                                            dropout=dropout, rng=rng, attention_forward=attention_forward)


def self_attention_backward(dy, cache):
    """``minilm.reference.attention.self_attention_backward`` with this file's attention backward."""
    return reference.self_attention_backward(dy, cache, attention_backward=attention_backward)


def cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, *, n_head, mask=None):
    """``minilm.reference.attention.cross_attention_forward`` with this file's attention of the heads."""
    return reference.cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, n_head=n_head, mask=mask,
                                             attention_forward=attention_forward)


def cross_attention_backward(dy, cache):
    """``minilm.reference.attention.cross_attention_backward`` with this file's attention backward."""
    return reference.cross_attention_backward(dy, cache, attention_backward=attention_backward)
