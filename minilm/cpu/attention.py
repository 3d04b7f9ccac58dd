r"""Numba kernels for scaled dot-product attention, and the multi-head ops built on them.

Each function here equals the function of the same name in ``minilm.reference.attention``,
whose module docstring states the math and derives the backward; ``tests/test_cpu_attention.py``
holds them to it. There are two paths, chosen by the size of the work (``FUSED_MAX_WORK``):

* **Training shapes**: the products (q k^T and A v, and in the backward the four that give their
  gradients) are stacked matrix products that NumPy hands to BLAS, head by head, and one kernel
  does what lies between them, one (batch, head) block per ``prange`` iteration: in the forward
  the scaling, the causal rule, the mask and the stable softmax, in place on the product q k^T
  (which becomes S, then A), and in the backward
  :math:`\bar S_{ij} / \sqrt{hs} = A_{ij}(\bar A_{ij} - \sum_l \bar A_{il} A_{il}) / \sqrt{hs}`,
  in place on :math:`\bar A = \bar y v^T`, so that the products that follow are
  :math:`\bar q = (\bar S / \sqrt{hs})\, k` and :math:`\bar k = (\bar S / \sqrt{hs})^\top q`.
  (At the GPT preset's shapes this took 0.9-1.2 ms per forward where the fused kernel below,
  products included, took 1.4-2.5 ms, in a one-off measurement.)
* **Small work** (``q.size * Tk <= FUSED_MAX_WORK``: a prompt of a few tokens given to
  ``GPT.forward_step``, a tiny model's batch; a GPT's one-token decode step does not come here on
  this backend, ``minilm.cpu.gpt_decode`` runs it whole): one fused kernel per direction does all
  of it, since a handful of BLAS calls per head costs more in call overhead than the arithmetic:

  - forward, query row i: the scores :math:`S_{ij} = q_i \cdot k_j / \sqrt{hs}` of the keys
    that pass the causal rule, the mask, the stable softmax :math:`A_{ij}` and :math:`y_i = \sum_j A_{ij} v_j`;
  - backward, query row i: :math:`\bar A_{ij} = \bar y_i \cdot v_j`, :math:`\bar v_j \mathrel{+}= A_{ij} \bar y_i`,
    :math:`\bar S_{ij} = A_{ij}(\bar A_{ij} - \sum_l \bar A_{il} A_{il})`,
    :math:`\bar q_i = \sum_j \bar S_{ij} k_j / \sqrt{hs}`, :math:`\bar k_j \mathrel{+}= \bar S_{ij} q_i / \sqrt{hs}`.

The cache is the reference's ``AttentionCache`` (q, k, v, att, drop, causal), so the two tiers'
caches interchange. The backward needs no mask and no causal flag: a key a query may not attend
has :math:`A_{ij} = 0`, so it adds nothing to any gradient, and the fused backward's loop over
keys stops after the last key with :math:`A_{ij} \ne 0` in any of its four rows (for a causal
row i, key :math:`i + T_k - T_q` at most). (The one difference this makes: an inf or NaN in v at
a key that row i may not attend makes row i NaN in the reference and the BLAS path, as
:math:`0 \cdot \infty`, but in the fused kernels only when a row among the same four queries
attends that key or a later one.)

The arithmetic is done in the inputs' dtype (float32 or float64), except the two row sums
(:math:`Z_i` and :math:`\sum_l \bar A_{il} A_{il}`), which are accumulated in float64 (the fused
kernels also divide by :math:`Z_i` and form :math:`\bar S_{ij}` in float64, rounding once to the
dtype); the softmax kernels between the BLAS products add them up in any order, which lets them
vectorise. Numba has no float16 arithmetic, so other float dtypes run the reference functions.

The fused kernels, without ``fastmath`` (no reordered sums), take the queries four rows at a time, so
that each element of k and v loaded serves four rows and each short inner loop (over keys, or
over hs) is entered a quarter as often; the dot products over hs run along a transposed copy of
k (or v), so their inner loop runs over keys with no reduction and compiles to vector
instructions. Every sum still adds its terms in the order of the row-by-row loops.

Self- and cross-attention are the reference's composition (projections, heads, output
projection) with these kernels passed in as the attention of the heads.
"""
import math

import numpy as np
from numba import prange

from minilm.cpu._jit import jit
from minilm.cpu._math import exp_nonpositive, sum_in_any_order
from minilm.cpu._parallel import FUSED_MULTIPLY_ADD, SUMS_IN_ANY_ORDER, pick, rows_kernel

from minilm.reference import attention as reference
from minilm.reference.attention import AttentionCache, check_attention_args
from minilm.reference.dropout import dropout_backward, dropout_forward
from minilm.validate import require_cache, require_gradient

__all__ = ["attention_forward", "attention_backward",
           "self_attention_forward", "self_attention_backward",
           "cross_attention_forward", "cross_attention_backward"]

KERNEL_DTYPES = (np.float32, np.float64)     # the kernels' dtypes; others run the reference
FUSED_MAX_WORK = 8192     # q.size * Tk up to which one fused kernel beats BLAS products (short prompts, tiny batches)


# --- kernels ----------------------------------------------------------------------------------
# (Explicit loops rather than slice assignments inside prange: those compile as nested parallel
# loops, which doubles the compile time.)

@jit
def _load_rows(dst, src, i0, rows):
    """dst[r] = src[i0 + r] for r < rows, and 0 for the rows of dst past them."""
    for r in range(dst.shape[0]):
        for c in range(dst.shape[1]):
            dst[r, c] = src[i0 + r, c] if r < rows else 0


@jit
def _store_rows(dst, src, i0, rows, n):
    """dst[i0 + r, :n] = src[r, :n] for r < rows."""
    for r in range(rows):
        for c in range(n):
            dst[i0 + r, c] = src[r, c]


@jit
def _zero(a, n):
    """a[:, :n] = 0."""
    for r in range(a.shape[0]):
        for c in range(n):
            a[r, c] = 0


@jit(error_model="numpy")
def _attention_forward_kernel(q, k, v, mask, masked, causal, scale):
    """y, att of ``reference.attention_forward`` for contiguous q (B, NH, Tq, hs), k, v (B, NH, Tk, hs)
    and, when ``masked``, a contiguous boolean mask (B, NH, Tq, Tk); ``scale`` = 1/sqrt(hs) in q's dtype."""
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    y = np.empty_like(q)                                        # (B, NH, Tq, hs)
    att = np.zeros((B, NH, Tq, Tk), dtype=q.dtype)              # (B, NH, Tq, Tk) 0 where a key is not allowed
    for bh in range(B * NH):
        b, h = bh // NH, bh % NH
        kT = np.ascontiguousarray(k[b, h].T)                    # (hs, Tk)
        q4 = np.empty((4, hs), dtype=q.dtype)                   # four query rows, zeros past the last
        S4 = np.empty((4, Tk), dtype=q.dtype)                   # their scores S, then their weights A
        y4 = np.empty((4, hs), dtype=q.dtype)                   # their outputs
        for i0 in range(0, Tq, 4):
            rows = min(4, Tq - i0)
            _load_rows(q4, q[b, h], i0, rows)
            n4 = max(0, min(Tk, i0 + rows + Tk - Tq)) if causal else Tk    # keys any of the rows may attend
            # S_ij = (sum_d q_id k_jd) / sqrt(hs)
            _zero(S4, n4)
            for d in range(hs):
                q0, q1, q2, q3 = q4[0, d], q4[1, d], q4[2, d], q4[3, d]
                for j in range(n4):
                    k_jd = kT[d, j]
                    S4[0, j] += q0 * k_jd
                    S4[1, j] += q1 * k_jd
                    S4[2, j] += q2 * k_jd
                    S4[3, j] += q3 * k_jd
            for r in range(rows):
                i = i0 + r
                n = max(0, min(Tk, i + Tk - Tq + 1)) if causal else Tk     # keys j < n pass the causal rule
                A = S4[r]                                       # (Tk,)
                for j in range(n, n4):
                    A[j] = 0
                if n == 0:                                      # no key passes the causal rule: att = 0 and y = 0
                    continue
                for j in range(n):
                    A[j] *= scale
                if masked:                                      # a masked score becomes -inf: e^{-inf - m_i} = 0
                    for j in range(n):
                        if not mask[b, h, i, j]:
                            A[j] = -np.inf
                # m_i = max_j S_ij over the allowed keys
                m = A[0]
                for j in range(1, n):
                    if A[j] > m:
                        m = A[j]
                if m == -np.inf:                                # every key masked: att = 0 and y = 0
                    for j in range(n):
                        A[j] = 0
                    continue
                # A_ij = e^{S_ij - m_i} / Z_i
                Z = np.float64(0.0)
                for j in range(n):
                    A[j] = np.exp(A[j] - m)
                    Z += A[j]
                for j in range(n):
                    A[j] = A[j] / Z
            # y_i = sum_j A_ij v_j (the rows past the last have A = S = 0)
            _zero(y4, hs)
            for j in range(n4):
                a0, a1, a2, a3 = S4[0, j], S4[1, j], S4[2, j], S4[3, j]
                for d in range(hs):
                    v_jd = v[b, h, j, d]
                    y4[0, d] += a0 * v_jd
                    y4[1, d] += a1 * v_jd
                    y4[2, d] += a2 * v_jd
                    y4[3, d] += a3 * v_jd
            _store_rows(att[b, h], S4, i0, rows, n4)
            _store_rows(y[b, h], y4, i0, rows, hs)
    return y, att


@jit(error_model="numpy")
def _attention_backward_kernel(dy, q, k, v, att, scale):
    """dq, dk, dv of ``reference.attention_backward``, every array contiguous; ``scale`` = 1/sqrt(hs)."""
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    dq = np.empty_like(q)                                       # (B, NH, Tq, hs)
    dk = np.zeros_like(k)                                       # (B, NH, Tk, hs)
    dv = np.zeros_like(v)                                       # (B, NH, Tk, hs)
    for bh in range(B * NH):
        b, h = bh // NH, bh % NH
        vT = np.ascontiguousarray(v[b, h].T)                    # (hs, Tk)
        q4 = np.empty((4, hs), dtype=q.dtype)                   # four query rows, zeros past the last
        dy4 = np.empty((4, hs), dtype=q.dtype)                  # their dy
        A4 = np.empty((4, Tk), dtype=q.dtype)                   # their weights A
        dA4 = np.empty((4, Tk), dtype=q.dtype)                  # their datt, then dS
        dq4 = np.empty((4, hs), dtype=q.dtype)                  # their dq
        for i0 in range(0, Tq, 4):
            rows = min(4, Tq - i0)
            _load_rows(q4, q[b, h], i0, rows)
            _load_rows(dy4, dy[b, h], i0, rows)
            _load_rows(A4, att[b, h], i0, rows)
            n4 = 0                                              # keys after the last one attended add nothing
            for r in range(rows):
                n = Tk
                while n > n4 and A4[r, n - 1] == 0:
                    n -= 1
                n4 = max(n4, n)
            # forward: y_i = sum_j A_ij v_j, so datt_ij = dy_i . v_j ...
            _zero(dA4, n4)
            for d in range(hs):
                dy0, dy1, dy2, dy3 = dy4[0, d], dy4[1, d], dy4[2, d], dy4[3, d]
                for j in range(n4):
                    v_jd = vT[d, j]
                    dA4[0, j] += dy0 * v_jd
                    dA4[1, j] += dy1 * v_jd
                    dA4[2, j] += dy2 * v_jd
                    dA4[3, j] += dy3 * v_jd
            # ... and dv_j += A_ij dy_i, row after row
            for j in range(n4):
                a0, a1, a2, a3 = A4[0, j], A4[1, j], A4[2, j], A4[3, j]
                for d in range(hs):
                    dv[b, h, j, d] += a0 * dy4[0, d]
                    dv[b, h, j, d] += a1 * dy4[1, d]
                    dv[b, h, j, d] += a2 * dy4[2, d]
                    dv[b, h, j, d] += a3 * dy4[3, d]
            # forward: A_i = softmax(S_i), so dS_ij = A_ij (datt_ij - sum_l datt_il A_il)
            for r in range(4):
                s = np.float64(0.0)
                for j in range(n4):
                    s += dA4[r, j] * A4[r, j]
                for j in range(n4):
                    dA4[r, j] = A4[r, j] * (dA4[r, j] - s)
            # forward: S_ij = q_i . k_j / sqrt(hs), so dq_i = sum_j dS_ij k_j / sqrt(hs) and dk_j += dS_ij q_i / sqrt(hs)
            _zero(dq4, hs)
            for j in range(n4):
                dS0, dS1, dS2, dS3 = dA4[0, j], dA4[1, j], dA4[2, j], dA4[3, j]
                for d in range(hs):
                    k_jd = k[b, h, j, d]
                    dq4[0, d] += dS0 * k_jd
                    dq4[1, d] += dS1 * k_jd
                    dq4[2, d] += dS2 * k_jd
                    dq4[3, d] += dS3 * k_jd
                for d in range(hs):
                    dk[b, h, j, d] += dS0 * q4[0, d]
                    dk[b, h, j, d] += dS1 * q4[1, d]
                    dk[b, h, j, d] += dS2 * q4[2, d]
                    dk[b, h, j, d] += dS3 * q4[3, d]
            for r in range(rows):
                for d in range(hs):
                    dq[b, h, i0 + r, d] = dq4[r, d] * scale
        for j in range(Tk):
            for d in range(hs):
                dk[b, h, j, d] *= scale
    return dq, dk, dv


@rows_kernel(fastmath=FUSED_MULTIPLY_ADD)
def _scores_to_weights_kernel(S, mask, masked, causal, scale):
    """In place, S (B, NH, Tq, Tk) from the products q k^T to the weights att of
    ``reference.attention_forward``: scale, causal rule, mask, stable softmax over each row.

    One (batch, head) block per iteration, in three passes over its rows, each step its own loop
    so that the compiler vectorises it:

    1. per row: scale, the row's max m_i over the allowed keys, then S_ij - m_i for an allowed
       key and -inf for the others (the causal rule and the mask);
    2. one loop over the whole block: e^{S_ij - m_i}, which is 0 at -inf. Row by row, a causal
       row (Tk/2 keys on average) left most of its exponentials to the vector loop's scalar
       remainder; over the block's Tq Tk entries they run eight lanes at a time;
    3. per row: Z_i summed in float64, in any order (``sum_in_any_order``), and the division.

    The indices come from two nested loops rather than one flat index split by division (three
    integer divisions per row). At a GPT CPU preset's slice (6 × 4 heads, T = 64, float32) the
    kernel takes 124 µs where the row-by-row one took 157 µs, with the same results bit for bit.
    """
    B, NH, Tq, Tk = S.shape
    ninf = S.dtype.type(-np.inf)
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        block = S[b, h]                                         # (Tq, Tk)
        for i in range(Tq):
            A = block[i]                                        # (Tk,) query i's row
            n = max(0, min(Tk, i + Tk - Tq + 1)) if causal else Tk  # keys j < n pass the causal rule
            for j in range(n):
                A[j] *= scale                                   # S_ij = q_i . k_j / sqrt(hs)
            if masked:                                          # a masked score becomes -inf
                for j in range(n):
                    if not mask[b, h, i, j]:
                        A[j] = ninf
            m = ninf                                            # m_i = max_j S_ij over the allowed keys
            if n > 0:
                m = A[0]
                for j in range(1, n):
                    m = max(m, A[j])
            if m == ninf:                                       # no key allowed: the row's weights are 0
                n = 0
            for j in range(n):
                A[j] -= m                                       # every exponent <= 0
            for j in range(n, Tk):
                A[j] = ninf
        flat = block.reshape(Tq * Tk)
        for t in range(Tq * Tk):
            flat[t] = exp_nonpositive(flat[t])                  # e^{S_ij - m_i}, and e^{-inf} = 0
        for i in range(Tq):
            A = block[i]
            n = max(0, min(Tk, i + Tk - Tq + 1)) if causal else Tk
            Z = A.dtype.type(sum_in_any_order(A, n))           # Z_i >= 1 (the max's term is 1), or 0 for no key
            if Z != 0:                                          # a NaN Z too: the row is NaN, as the reference's
                for j in range(n):
                    A[j] = A[j] / Z                             # A_ij = e^{S_ij - m_i} / Z_i


@rows_kernel(fastmath=SUMS_IN_ANY_ORDER)
def _weights_backward_kernel(datt, att, scale):
    """In place, datt (B, NH, Tq, Tk) to dS / sqrt(hs): the softmax line of
    ``reference.attention_backward``, dS = att * (datt - sum(datt * att, axis=-1)), with the
    1/sqrt(hs) of its next two lines folded in; the sum in float64, its additions in any order.
    One (batch, head) block per iteration, its rows in a nested loop (32 µs where one flat index
    split by division took 46 µs at the GPT CPU preset's slice, the same results bit for bit)."""
    B, NH, Tq, Tk = att.shape
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        for i in range(Tq):
            g, A = datt[b, h, i], att[b, h, i]                  # (Tk,) each
            s = np.float64(0.0)                                 # accumulated in float64
            for j in range(Tk):
                s += g[j] * A[j]
            s = g.dtype.type(s)
            for j in range(Tk):
                g[j] = A[j] * (g[j] - s) * scale


# --- attention --------------------------------------------------------------------------------

def attention_forward(q, k, v, *, causal=False, mask=None, dropout=0.0, rng=None):
    """Equals ``minilm.reference.attention.attention_forward``: y = softmax(q k^T / sqrt(hs)) v.

    Parameters, returns, errors and cache are the reference's; any strides are accepted. Up to
    ``FUSED_MAX_WORK`` (a short prompt, a tiny batch) one fused kernel does everything; above it
    the two products run in BLAS around the fused softmax kernel. Dropout of the weights is the
    reference's ``dropout_forward`` (the same masks for the same rng) between the kernel and the
    second product; with dropout, small sizes take the BLAS path too.
    """
    B, NH, Tq, Tk, hs = check_attention_args(q, k, v, causal, mask, dropout, rng)
    if q.dtype not in KERNEL_DTYPES:
        return reference.attention_forward(q, k, v, causal=causal, mask=mask, dropout=dropout, rng=rng)
    masked = mask is not None
    mask = (np.ascontiguousarray(np.broadcast_to(mask, (B, NH, Tq, Tk))) if masked
            else np.empty((0, 0, 0, 0), dtype=np.bool_))        # never read
    scale = q.dtype.type(1.0 / math.sqrt(hs))                   # in q's dtype, as the reference's product
    if q.size * Tk <= FUSED_MAX_WORK and not dropout:
        q, k, v = (np.ascontiguousarray(a, dtype=q.dtype) for a in (q, k, v))    # k, v: perhaps the other byte order
        y, att = _attention_forward_kernel(q, k, v, mask, masked, causal, scale)
        return y, AttentionCache(q, k, v, att, None, bool(causal))
    att = np.empty((B, NH, Tq, Tk), dtype=q.dtype)              # C order whatever q's and k's (the kernel needs it)
    np.matmul(q, np.swapaxes(k, -1, -2), out=att)               # S before scaling
    pick(_scores_to_weights_kernel, att.size)(att, mask, masked, causal, scale)
    att_d, drop = dropout_forward(att, p=dropout, rng=rng) if dropout else (att, None)   # weights dropped
    y = _heads_of(np.empty((B, Tq, NH * hs), dtype=att_d.dtype), 1, NH)[0]   # (B, NH, Tq, hs)
    np.matmul(att_d, v, out=y)                                  # y = att_d v, written as the heads merged
    return y, AttentionCache(q, k, v, att, drop, bool(causal))


def attention_backward(dy, cache):
    """Equals ``minilm.reference.attention.attention_backward``. Returns (dq, dk, dv)."""
    require_cache("attention_backward", cache, "AttentionCache")
    q, k, v, att, drop, _ = cache                              # causal: att is 0 where masked
    require_gradient("attention_backward", "dy", dy, q.shape, "(B, NH, Tq, hs)")
    dtype = np.result_type(dy.dtype, q.dtype)                  # as the reference's products promote
    if dtype not in KERNEL_DTYPES:
        return reference.attention_backward(dy, cache)
    scale = dtype.type(1.0 / math.sqrt(q.shape[-1]))
    if q.size * k.shape[2] <= FUSED_MAX_WORK and drop is None:
        contiguous = [np.ascontiguousarray(a, dtype=dtype) for a in (dy, q, k, v, att)]
        return _attention_backward_kernel(*contiguous, scale)
    dy, q, k, v, att = (a.astype(dtype, copy=False) for a in (dy, q, k, v, att))
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    if Tq == Tk:        # as self-attention's heads, side by side: (B, T, 3C), which its backward needs
        dq, dk, dv = _heads_of(np.empty((B, Tq, 3 * NH * hs), dtype=dtype), 3, NH)
    else:
        dq, = _heads_of(np.empty((B, Tq, NH * hs), dtype=dtype), 1, NH)
        dk, dv = _heads_of(np.empty((B, Tk, 2 * NH * hs), dtype=dtype), 2, NH)
    att_d = att if drop is None else dropout_backward(att, drop)[0]   # the forward's dropped weights
    np.matmul(np.swapaxes(att_d, -1, -2), dy, out=dv)           # (B, NH, Tk, hs) from y = att_d v
    dS = dy @ np.swapaxes(v, -1, -2)                            # (B, NH, Tq, Tk) datt, then dS / sqrt(hs)
    if drop is not None:
        dS, = dropout_backward(dS, drop)                        # the gradient wrt att
    pick(_weights_backward_kernel, dS.size)(dS, att, scale)
    np.matmul(dS, k, out=dq)                                    # (B, NH, Tq, hs) from S = q k^T / sqrt(hs)
    np.matmul(np.swapaxes(dS, -1, -2), q, out=dk)               # (B, NH, Tk, hs)
    return dq, dk, dv


def _heads_of(out, n, n_head):
    """The n blocks of ``out`` (B, T, n·C) as heads (B, NH, T, hs), ``split_heads`` of each block.

    The BLAS path writes its products into them (``np.matmul(..., out=)``, head by head, as
    without ``out``), so that ``merge_heads`` of y, and ``merge_heads_side_by_side`` of the
    backward's (dq, dk, dv), find the heads already merged and copy nothing: at the GPT CPU
    preset's slice, the backward's three products and the merge took 290 µs a layer instead of
    330 µs."""
    C = out.shape[-1] // n
    return [reference.split_heads(out[..., i * C:(i + 1) * C], n_head) for i in range(n)]


# --- multi-head self- and cross-attention: the reference's composition around the kernels -----

def self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, *, n_head, causal=True, mask=None, dropout=0.0, rng=None):
    """Equals ``minilm.reference.attention.self_attention_forward``, with the attention kernel above."""
    return reference.self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_head=n_head, causal=causal, mask=mask,
                                            dropout=dropout, rng=rng, attention_forward=attention_forward)


def self_attention_backward(dy, cache):
    """Equals ``minilm.reference.attention.self_attention_backward``, with the attention kernel above."""
    require_cache("self_attention_backward", cache, "SelfAttentionCache")
    return reference.self_attention_backward(dy, cache, attention_backward=attention_backward)


def cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, *, n_head, mask=None):
    """Equals ``minilm.reference.attention.cross_attention_forward``, with the attention kernel above."""
    return reference.cross_attention_forward(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, n_head=n_head, mask=mask,
                                             attention_forward=attention_forward)


def cross_attention_backward(dy, cache):
    """Equals ``minilm.reference.attention.cross_attention_backward``, with the attention kernel above."""
    require_cache("cross_attention_backward", cache, "CrossAttentionCache")
    return reference.cross_attention_backward(dy, cache, attention_backward=attention_backward)
