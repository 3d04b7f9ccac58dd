"""Tests of reference/attention.py: attention, self_attention, cross_attention.

Values come from a numpy Generator seeded by a hypothesis-drawn integer rather than from
hypothesis's float strategies: those like to draw exactly repeated values (all keys equal),
where a gradient is 0 up to round-off and a relative gradient error means nothing.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import minilm.reference as reference
from minilm.gradcheck import DEFAULT_TOL, STREAM, gradcheck
from minilm.opcases import CASES
from minilm.reference.attention import (attention_backward, attention_forward, cross_attention_backward,
                                        cross_attention_forward, self_attention_backward, self_attention_forward)

GRAD_TOL = DEFAULT_TOL      # DESIGN's bound on analytic vs numerical gradients in float64
EXACT_TOL = 1e-12           # float64, same math summed in another order: differences are ~1e-15 relative
TORCH_TOL = 1e-12           # PyTorch in float64 computes the same sums, in its own order
ROUNDING_TOL = 1e-13        # float64, the same products and sums in another grouping (a scale by 1/0.7): a few ulps

FEW = settings(max_examples=15, deadline=None)      # each example runs many small forwards
SOME = settings(max_examples=40, deadline=None)

ATTENTION_OPS = ("attention", "self_attention", "cross_attention")


# --- helpers ----------------------------------------------------------------------------------

def assert_close(actual, expected, tol):
    """|actual - expected| <= tol * max(1, |expected|_max), elementwise."""
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def random_mask(rng, shape, Tq, Tk, causal):
    """A random boolean mask of ``shape`` where every query row keeps at least one key that the
    causal rule (j <= i + Tk - Tq, with Tk >= Tq) also allows: key j <= Tk - Tq is open to every query."""
    mask = rng.random(shape) < 0.5
    last_open = Tk - Tq if causal else Tk - 1
    j = rng.integers(0, last_open + 1, size=shape[:-1])
    np.put_along_axis(mask, j[..., None], True, axis=-1)
    return mask


def allowed_keys(Tq, Tk, causal, mask, shape):
    """The combined boolean (B, NH, Tq, Tk) of mask and causal rule, written out directly."""
    i, j = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
    causal_ok = (j <= i + Tk - Tq) if causal else np.ones((Tq, Tk), dtype=bool)
    return np.broadcast_to(causal_ok & (True if mask is None else mask), shape).copy()


def arrays_in(obj):
    """Every array inside a (nested) tuple such as a cache."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, tuple):
        for item in obj:
            yield from arrays_in(item)


@st.composite
def attention_inputs(draw, causal=None, masked=None):
    """((q, k, v), {"causal", "mask"}) with B <= 2, NH <= 3, T <= 5, hs <= 4."""
    B, NH, hs = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    causal = draw(st.booleans()) if causal is None else causal
    Tq = draw(st.integers(1, 5))
    Tk = draw(st.integers(Tq if causal else 1, 5))
    shapes = [(B, NH, Tq, Tk), (B, 1, Tq, Tk), (Tq, Tk), (1, NH, 1, Tk)]
    if masked is None:
        mask_shape = draw(st.sampled_from([None] + shapes))
    else:
        mask_shape = draw(st.sampled_from(shapes)) if masked else None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((B, NH, Tq, hs))
    k, v = rng.standard_normal((B, NH, Tk, hs)), rng.standard_normal((B, NH, Tk, hs))
    mask = None if mask_shape is None else random_mask(rng, mask_shape, Tq, Tk, causal)
    return (q, k, v), {"causal": causal, "mask": mask}


def _params(rng, C, widths, biases):
    """Weights (C, w) scaled by 1/sqrt(C), then biases (w,) or None, for each output width w."""
    Ws = [rng.standard_normal((C, w)) / math.sqrt(C) for w in widths]
    bs = [0.1 * rng.standard_normal(w) if biases else None for w in widths]
    return Ws, bs


@st.composite
def self_attention_inputs(draw, causal=None):
    """((x, W_qkv, b_qkv, W_o, b_o), {"n_head", "causal", "mask"}) with B <= 2, T <= 5, NH <= 3, hs <= 4."""
    B, T, NH, hs = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    causal = draw(st.booleans()) if causal is None else causal
    mask_shape = draw(st.sampled_from([None, (B, T, T), (1, T, T), (B, 1, T)]))
    biases = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = NH * hs
    (W_qkv, W_o), (b_qkv, b_o) = _params(rng, C, (3 * C, C), biases)
    mask = None if mask_shape is None else random_mask(rng, mask_shape, T, T, causal)
    return (rng.standard_normal((B, T, C)), W_qkv, b_qkv, W_o, b_o), {"n_head": NH, "causal": causal, "mask": mask}


@st.composite
def cross_attention_inputs(draw, masked=None):
    """((x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o), {"n_head", "mask"})."""
    B, NH, hs = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    Tq, Tk = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    shapes = [(B, Tq, Tk), (1, Tq, Tk), (B, 1, Tk)]
    if masked is None:
        mask_shape = draw(st.sampled_from([None] + shapes))
    else:
        mask_shape = draw(st.sampled_from(shapes)) if masked else None
    biases = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = NH * hs
    (W_q, W_kv, W_o), (b_q, b_kv, b_o) = _params(rng, C, (C, 2 * C, C), biases)
    mask = None if mask_shape is None else random_mask(rng, mask_shape, Tq, Tk, causal=False)
    args = (rng.standard_normal((B, Tq, C)), rng.standard_normal((B, Tk, C)), W_q, b_q, W_kv, b_kv, W_o, b_o)
    return args, {"n_head": NH, "mask": mask}


# --- gradient checks --------------------------------------------------------------------------

def assume_some_query_sees_two_keys(allowed):
    """Skip draws where every query sees at most one key. There the softmax is the constant 1 and
    the gradients of q and k (of x, W_q, b_q in cross-attention) are exactly 0, which a relative
    error cannot check: the stencil's round-off, ~1e-16 |L| / h ~ 1e-12, is far above gradcheck's
    1e-8 floor. ``test_a_single_key_gives_zero_dq_and_dk`` covers those cases exactly."""
    assume(int(np.max(np.sum(allowed, axis=-1), initial=0)) >= 2)


def assume_gradients_resolvable(forward, backward, args, kwargs, seed=0):
    """Skip draws where an argument's gradient, for the output weights R that ``gradcheck(seed=seed)``
    draws first, is below 1e-3 of the loss's scale S = sum |y R|. The stencil's round-off is ~1e-11 S
    (``minilm.gradcheck``), so below ~5e-5 S a relative error of 1e-7 measures round-off, not the
    backward: a short query, or keys whose values R barely tells apart, make dk that small."""
    y, cache = forward(*args, **kwargs)
    R = np.random.default_rng([STREAM, seed]).standard_normal(y.shape)      # gradcheck's own R
    scale = max(1.0, float(np.sum(np.abs(y * R))))
    for g in backward(R, cache):
        assume(g is None or float(np.max(np.abs(g), initial=0.0)) >= 1e-3 * scale)


@SOME
@given(attention_inputs())
def test_attention_gradcheck(inputs):
    args, kwargs = inputs
    B, NH, Tq, _ = args[0].shape
    Tk = args[1].shape[2]
    assume_some_query_sees_two_keys(allowed_keys(Tq, Tk, kwargs["causal"], kwargs["mask"], (B, NH, Tq, Tk)))
    assume_gradients_resolvable(attention_forward, attention_backward, args, kwargs, seed=0)
    report = gradcheck(attention_forward, attention_backward, args, kwargs, tol=GRAD_TOL, raise_on_fail=True,
                       seed=0)
    assert report.passed and len(report.arguments) == 3


@FEW
@given(self_attention_inputs())
def test_self_attention_gradcheck(inputs):
    args, kwargs = inputs
    (B, T, _) = args[0].shape
    assume_some_query_sees_two_keys(allowed_keys(T, T, kwargs["causal"], kwargs["mask"], (B, T, T)))
    report = gradcheck(self_attention_forward, self_attention_backward, args, kwargs, tol=GRAD_TOL,
                       raise_on_fail=True)
    assert report.passed and len(report.arguments) == sum(a is not None for a in args)


@FEW
@given(cross_attention_inputs())
def test_cross_attention_gradcheck(inputs):
    args, kwargs = inputs
    (B, Tq, _), Tk = args[0].shape, args[1].shape[1]
    assume_some_query_sees_two_keys(np.broadcast_to(True if kwargs["mask"] is None else kwargs["mask"], (B, Tq, Tk)))
    report = gradcheck(cross_attention_forward, cross_attention_backward, args, kwargs, tol=GRAD_TOL,
                       raise_on_fail=True)
    assert report.passed and len(report.arguments) == sum(a is not None for a in args)


@pytest.mark.parametrize("op,label,case", [(op, label, case) for op in ATTENTION_OPS for label, case in CASES[op]])
def test_opcases_gradcheck(op, label, case):
    """The example inputs of minilm.opcases fit the signatures, through the minilm.reference map."""
    args, kwargs = case(np.random.default_rng(0), np.float64)
    forward, backward = getattr(reference, f"{op}_forward"), getattr(reference, f"{op}_backward")
    assert gradcheck(forward, backward, args, kwargs, tol=GRAD_TOL, raise_on_fail=True).passed


# --- rows with no allowed key -----------------------------------------------------------------

def _no_nan_attention(q, k, v, **kwargs):
    """Forward and backward with 0/0 and x/0 turned into errors, and every result finite."""
    with np.errstate(divide="raise", invalid="raise"):
        y, cache = attention_forward(q, k, v, **kwargs)
        dq, dk, dv = attention_backward(np.ones_like(y), cache)
    for a in (y, cache.att, dq, dk, dv):
        assert np.all(np.isfinite(a))
    return y, cache, dq, dk, dv


def test_fully_masked_row_gives_zero_output_and_gradient():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 2, 4, 3)), rng.standard_normal((2, 2, 5, 3)), rng.standard_normal((2, 2, 5, 3))
    mask = rng.random((2, 2, 4, 5)) < 0.6
    mask[..., 0] = True
    mask[1, 0, 2, :] = False                    # query 2 of (b=1, h=0) may attend nothing
    y, cache, dq, dk, dv = _no_nan_attention(q, k, v, mask=mask)
    assert np.all(y[1, 0, 2] == 0) and np.all(cache.att[1, 0, 2] == 0) and np.all(dq[1, 0, 2] == 0)
    assert np.any(y[1, 0, 1] != 0)              # its neighbours are untouched
    assert gradcheck(attention_forward, attention_backward, (q, k, v), {"mask": mask}, tol=GRAD_TOL).passed


def test_all_masked_gives_zero_everywhere():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    y, _, dq, dk, dv = _no_nan_attention(q, k, v, mask=np.zeros((3, 3), dtype=bool))
    for a in (y, dq, dk, dv):
        assert np.all(a == 0)


def test_causal_queries_before_every_key_give_zero():
    """With Tq > Tk the first Tq - Tk queries come before the first key (queries end-aligned)."""
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((1, 1, 5, 2)), rng.standard_normal((1, 1, 2, 2)), rng.standard_normal((1, 1, 2, 2))
    y, _, dq, _, _ = _no_nan_attention(q, k, v, causal=True)
    assert np.all(y[..., :3, :] == 0) and np.all(dq[..., :3, :] == 0)
    assert np.all(y[..., 3:, :] != 0)


def test_a_single_key_gives_zero_dq_and_dk():
    """With one allowed key per query the weights are the constant 1: y = v, and dq = dk = 0 exactly."""
    rng = np.random.default_rng(13)
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 1, 4)), rng.standard_normal((2, 2, 1, 4))
    y, cache, dq, dk, dv = _no_nan_attention(q, k, v)
    assert np.array_equal(y, np.broadcast_to(v, y.shape))
    assert np.all(dq == 0) and np.all(dk == 0) and np.array_equal(dv, np.ones((2, 2, 1, 4)) * 3)


def test_cross_attention_fully_masked_query_gets_only_the_bias():
    args, kwargs = CASES["cross_attention"][0][1](np.random.default_rng(4), np.float64)
    mask = kwargs["mask"].copy()
    mask[0, 1, :] = False
    with np.errstate(divide="raise", invalid="raise"):
        y, cache = cross_attention_forward(*args, n_head=kwargs["n_head"], mask=mask)
        grads = cross_attention_backward(np.ones_like(y), cache)
    b_o = args[-1]
    assert_close(y[0, 1], b_o, EXACT_TOL)
    assert np.all(grads[0][0, 1] == 0)          # dx of that query
    assert all(np.all(np.isfinite(g)) for g in grads)


# --- invariants -------------------------------------------------------------------------------

@SOME
@given(attention_inputs(causal=True, masked=False), st.data())
def test_causal_attention_ignores_the_future(inputs, data):
    (q, k, v), kwargs = inputs
    T = q.shape[2]
    k, v = k[..., :T, :], v[..., :T, :]             # Tq = Tk = T: position t is query t and key t
    t = data.draw(st.integers(0, T - 1))
    y, _ = attention_forward(q, k, v, causal=True)
    rng = np.random.default_rng(t)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[..., t + 1:, :] = 10 * rng.standard_normal(a[..., t + 1:, :].shape)
    y2, _ = attention_forward(q2, k2, v2, causal=True)
    assert_close(y2[..., :t + 1, :], y[..., :t + 1, :], EXACT_TOL)


@FEW
@given(self_attention_inputs(causal=True), st.data())
def test_causal_self_attention_ignores_the_future(inputs, data):
    (x, *params), kwargs = inputs
    T = x.shape[1]
    t = data.draw(st.integers(0, T - 1))
    y, _ = self_attention_forward(x, *params, **kwargs)
    x2 = x.copy()
    x2[:, t + 1:] = 10 * np.random.default_rng(t).standard_normal(x2[:, t + 1:].shape)
    y2, _ = self_attention_forward(x2, *params, **kwargs)
    assert_close(y2[:, :t + 1], y[:, :t + 1], EXACT_TOL)


@SOME
@given(attention_inputs(masked=True), st.data())
def test_masked_keys_do_not_affect_the_output(inputs, data):
    """Changing k and v at the keys a query may not attend leaves that query's output as it was."""
    (q, k, v), kwargs = inputs
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    i = data.draw(st.integers(0, Tq - 1))
    closed = ~allowed_keys(Tq, Tk, kwargs["causal"], kwargs["mask"], (B, NH, Tq, Tk))[:, :, i, :]   # (B, NH, Tk)
    y, _ = attention_forward(q, k, v, **kwargs)
    rng = np.random.default_rng(i)
    k2, v2 = k.copy(), v.copy()
    k2[closed] = 10 * rng.standard_normal((int(closed.sum()), hs))
    v2[closed] = 10 * rng.standard_normal((int(closed.sum()), hs))
    y2, _ = attention_forward(q, k2, v2, **kwargs)
    assert_close(y2[:, :, i], y[:, :, i], EXACT_TOL)


@FEW
@given(cross_attention_inputs(masked=False), st.data())
def test_cross_attention_ignores_masked_memory(inputs, data):
    """A memory position masked for every query (padding) has no effect on the output."""
    args, kwargs = inputs
    x, memory = args[:2]
    B, Tk = memory.shape[:2]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    padding = random_mask(rng, (B, 1, Tk), 1, Tk, causal=False)      # (B, 1, Tk), every row keeps a key
    y, _ = cross_attention_forward(*args, n_head=kwargs["n_head"], mask=padding)
    memory2 = memory.copy()
    closed = ~padding[:, 0, :]                                        # (B, Tk)
    memory2[closed] = 10 * rng.standard_normal((int(closed.sum()), memory.shape[2]))
    y2, _ = cross_attention_forward(x, memory2, *args[2:], n_head=kwargs["n_head"], mask=padding)
    assert_close(y2, y, EXACT_TOL)


def test_a_padding_mask_of_two_dimensions_is_refused_even_where_it_would_broadcast():
    """With B == Tq a (B, Tk) padding mask broadcasts to (B, Tq, Tk) as (Tq, Tk): batch row b's padding
    would close keys to query b of every row. Three dimensions are required, and the error says how."""
    args, kwargs = CASES["cross_attention"][0][1](np.random.default_rng(3), np.float64)
    x, memory = args[0][:, :2], args[1]                               # B = Tq = 2, Tk = 7
    padding = np.ones((2, 7), dtype=bool)
    padding[1, 4:] = False
    with pytest.raises(ValueError, match=r"cross_attention: argument 'mask' must have the 3 dimensions"):
        cross_attention_forward(x, memory, *args[2:], n_head=kwargs["n_head"], mask=padding)
    y, _ = cross_attention_forward(x, memory, *args[2:], n_head=kwargs["n_head"], mask=padding[:, None, :])
    row, _ = cross_attention_forward(x[1:], memory[1:, :4], *args[2:], n_head=kwargs["n_head"])
    assert_close(y[1:], row, EXACT_TOL)                               # the padding is as good as absent


@FEW
@given(self_attention_inputs(), st.data())
def test_self_attention_ignores_padding_keys(inputs, data):
    """An encoder's padding: keys closed to every query by a (B, 1, T) mask leave the output of the
    queries that are not padding unchanged, whatever the padding positions hold."""
    args, kwargs = inputs
    x = args[0]
    B, T, C = x.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    lengths = rng.integers(1, T + 1, size=B)
    padding = (np.arange(T)[None, :] < lengths[:, None])[:, None, :]  # (B, 1, T)
    options = {**kwargs, "mask": padding, "causal": kwargs["causal"]}
    y, _ = self_attention_forward(*args, **options)
    x2 = x.copy()
    x2[~padding[:, 0, :]] = 10 * rng.standard_normal((int((~padding).sum()), C))
    y2, _ = self_attention_forward(x2, *args[1:], **options)
    for b in range(B):
        assert_close(y2[b, :lengths[b]], y[b, :lengths[b]], EXACT_TOL)
        alone, _ = self_attention_forward(x[b:b + 1, :lengths[b]], *args[1:], n_head=kwargs["n_head"],
                                          causal=kwargs["causal"])
        assert_close(y[b:b + 1, :lengths[b]], alone, EXACT_TOL)


def attention_by_loops(q, k, v, causal, mask):
    """Attention one (b, h, i) at a time, straight from the definition, in Python floats."""
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    mask = np.broadcast_to(True if mask is None else mask, (B, NH, Tq, Tk))
    y = np.zeros_like(q)
    for b in range(B):
        for h in range(NH):
            for i in range(Tq):
                keys = [j for j in range(Tk) if mask[b, h, i, j] and (not causal or j <= i + Tk - Tq)]
                if not keys:
                    continue
                scores = [sum(q[b, h, i, d] * k[b, h, j, d] for d in range(hs)) / math.sqrt(hs) for j in keys]
                weights = [math.exp(s - max(scores)) for s in scores]
                for d in range(hs):
                    y[b, h, i, d] = sum(w * v[b, h, j, d] for w, j in zip(weights, keys)) / sum(weights)
    return y


@SOME
@given(attention_inputs())
def test_attention_equals_the_loop(inputs):
    (q, k, v), kwargs = inputs
    y, _ = attention_forward(q, k, v, **kwargs)
    assert_close(y, attention_by_loops(q, k, v, kwargs["causal"], kwargs["mask"]), EXACT_TOL)


@SOME
@given(attention_inputs(causal=True, masked=False))
def test_decode_steps_equal_rows_of_full_causal_attention(inputs):
    (q, k, v), _ = inputs
    T = q.shape[2]
    k, v = k[..., :T, :], v[..., :T, :]
    y, _ = attention_forward(q, k, v, causal=True)
    for t in range(T):
        # a decode step: query t over the key/value cache of positions 0..t
        y_t, _ = attention_forward(q[..., t:t + 1, :], k[..., :t + 1, :], v[..., :t + 1, :], causal=True)
        assert_close(y_t[..., 0, :], y[..., t, :], EXACT_TOL)
        # the queries t.. over every key: the rows t.. of the full attention
        y_tail, _ = attention_forward(q[..., t:, :], k, v, causal=True)
        assert_close(y_tail, y[..., t:, :], EXACT_TOL)


def self_attention_directly(x, W_qkv, b_qkv, W_o, b_o, n_head, causal, mask=None):
    """Multi-head self-attention with one explicit loop over heads and column slices of W_qkv, the
    mask (broadcast to (B, T, T)) shared by every head."""
    B, T, C = x.shape
    hs = C // n_head
    qkv = x @ W_qkv + (0 if b_qkv is None else b_qkv)
    heads = []
    for h in range(n_head):
        cols = slice(h * hs, (h + 1) * hs)
        q, k, v = qkv[..., 0 * C:1 * C][..., cols], qkv[..., 1 * C:2 * C][..., cols], qkv[..., 2 * C:3 * C][..., cols]
        S = q @ k.transpose(0, 2, 1) / math.sqrt(hs)
        if causal:
            S = np.where(np.tril(np.ones((T, T), dtype=bool)), S, -np.inf)
        if mask is not None:
            S = np.where(mask, S, -np.inf)                          # every row keeps a key (random_mask)
        att = np.exp(S - S.max(axis=-1, keepdims=True))
        heads.append(att / att.sum(axis=-1, keepdims=True) @ v)
    return np.concatenate(heads, axis=-1) @ W_o + (0 if b_o is None else b_o)


@SOME
@given(self_attention_inputs())
def test_self_attention_equals_direct_computation(inputs):
    args, kwargs = inputs
    y, _ = self_attention_forward(*args, **kwargs)
    assert_close(y, self_attention_directly(*args, **kwargs), EXACT_TOL)


@SOME
@given(self_attention_inputs())
def test_self_attention_with_one_head(inputs):
    (x, W_qkv, b_qkv, W_o, b_o), kwargs = inputs
    B, T, C = x.shape
    y, _ = self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_head=1, causal=kwargs["causal"])
    b_qkv = np.zeros(3 * C) if b_qkv is None else b_qkv
    b_o = np.zeros(C) if b_o is None else b_o
    q = x @ W_qkv[:, :C] + b_qkv[:C]
    k = x @ W_qkv[:, C:2 * C] + b_qkv[C:2 * C]
    v = x @ W_qkv[:, 2 * C:] + b_qkv[2 * C:]
    S = np.einsum("btc,bsc->bts", q, k) / math.sqrt(C)
    if kwargs["causal"]:
        S[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    att = np.exp(S - S.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    assert_close(y, np.einsum("bts,bsc->btc", att, v) @ W_o + b_o, EXACT_TOL)


def cross_attention_directly(x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o, n_head, mask):
    """Multi-head cross-attention with one explicit loop over heads: q from W_q, k from the first C
    columns of W_kv and v from the last C, head h on columns h*hs .. (h+1)*hs - 1 of each, the
    mask (broadcast to (B, Tq, Tk)) shared by every head."""
    B, Tq, C = x.shape
    Tk = memory.shape[1]
    hs = C // n_head
    q = x @ W_q + (0 if b_q is None else b_q)
    kv = memory @ W_kv + (0 if b_kv is None else b_kv)
    k, v = kv[..., :C], kv[..., C:]
    allowed = np.broadcast_to(True if mask is None else mask, (B, Tq, Tk))
    heads = []
    for h in range(n_head):
        cols = slice(h * hs, (h + 1) * hs)
        S = np.where(allowed, q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(hs), -np.inf)
        att = np.exp(S - S.max(axis=-1, keepdims=True))           # every row keeps a key (random_mask)
        heads.append(att / att.sum(axis=-1, keepdims=True) @ v[..., cols])
    return np.concatenate(heads, axis=-1) @ W_o + (0 if b_o is None else b_o)


@SOME
@given(cross_attention_inputs())
def test_cross_attention_equals_direct_computation(inputs):
    """The layout of W_kv ([k | v]) and of the heads, checked without PyTorch: a consistent swap
    of k and v in the forward and the backward passes every gradient check."""
    args, kwargs = inputs
    y, _ = cross_attention_forward(*args, **kwargs)
    assert_close(y, cross_attention_directly(*args, **kwargs), EXACT_TOL)


def test_self_attention_is_causal_by_default():
    args, kwargs = CASES["self_attention"][0][1](np.random.default_rng(8), np.float64)
    kwargs = {key: value for key, value in kwargs.items() if key != "causal"}
    y, _ = self_attention_forward(*args, **kwargs)
    assert_close(y, self_attention_directly(*args, n_head=kwargs["n_head"], causal=True), EXACT_TOL)
    assert not np.allclose(y, self_attention_directly(*args, n_head=kwargs["n_head"], causal=False))


OPS = {
    "attention": (attention_forward, attention_backward),
    "self_attention": (self_attention_forward, self_attention_backward),
    "cross_attention": (cross_attention_forward, cross_attention_backward),
}


@pytest.mark.parametrize("op,label,case", [(op, label, case) for op in ATTENTION_OPS for label, case in CASES[op]])
def test_backward_does_not_mutate_and_returns_fresh_arrays(op, label, case):
    forward, backward = OPS[op]
    args, kwargs = case(np.random.default_rng(5), np.float64)
    y, cache = forward(*args, **kwargs)
    dy = np.random.default_rng(6).standard_normal(y.shape)
    watched = [dy, *[a for a in args if isinstance(a, np.ndarray)], *arrays_in(cache)]
    before = [a.copy() for a in watched]
    grads = backward(dy, cache)
    for a, b in zip(watched, before):
        assert np.array_equal(a, b)
    for g in grads:
        assert not any(np.shares_memory(g, a) for a in watched)


# --- PyTorch as an oracle ---------------------------------------------------------------------

def _torch_grads(torch, out, dy, leaves):
    (out * torch.from_numpy(dy)).sum().backward()
    return [None if t is None else t.grad.numpy() for t in leaves]


def _leaves(torch, arrays):
    return [None if a is None else torch.tensor(a, requires_grad=True) for a in arrays]


@FEW
@given(attention_inputs())
def test_attention_matches_torch(inputs):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    (q, k, v), kwargs = inputs
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    y, cache = attention_forward(q, k, v, **kwargs)
    dy = np.random.default_rng(7).standard_normal(y.shape)
    grads = attention_backward(dy, cache)

    tq, tk, tv = _leaves(torch, (q, k, v))
    if kwargs["mask"] is None and (not kwargs["causal"] or Tq == Tk):
        ty = F.scaled_dot_product_attention(tq, tk, tv, is_causal=kwargs["causal"])   # torch's own causal flag
    else:   # torch aligns is_causal to the top-left when Tq != Tk, so give it our end-aligned rule as a mask
        allowed = allowed_keys(Tq, Tk, kwargs["causal"], kwargs["mask"], (B, NH, Tq, Tk))
        ty = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(allowed))
    assert_close(y, ty.detach().numpy(), TORCH_TOL)
    for g, tg in zip(grads, _torch_grads(torch, ty, dy, (tq, tk, tv))):
        assert_close(g, tg, TORCH_TOL)


def assert_same_as_torch(torch, y, grads, ty, dy, leaves):
    """y equals PyTorch's ty, and each gradient the one autograd gives its leaf (None where a bias is None)."""
    assert_close(y, ty.detach().numpy(), TORCH_TOL)
    for g, tg in zip(grads, _torch_grads(torch, ty, dy, leaves)):
        assert (g is None) == (tg is None)
        if g is not None:
            assert_close(g, tg, TORCH_TOL)


@FEW
@given(self_attention_inputs())
def test_self_attention_matches_torch(inputs):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    args, kwargs = inputs
    n_head, causal, mask = kwargs["n_head"], kwargs["causal"], kwargs["mask"]
    y, cache = self_attention_forward(*args, **kwargs)
    dy = np.random.default_rng(8).standard_normal(y.shape)
    grads = self_attention_backward(dy, cache)

    leaves = _leaves(torch, args)
    x, W_qkv, b_qkv, W_o, b_o = leaves
    B, T, C = x.shape
    qkv = x @ W_qkv + (0 if b_qkv is None else b_qkv)
    q, k, v = qkv.split(C, dim=2)
    q = q.view(B, T, n_head, C // n_head).transpose(1, 2)    # (B, NH, T, hs), as nanoGPT
    k = k.view(B, T, n_head, C // n_head).transpose(1, 2)    # (B, NH, T, hs)
    v = v.view(B, T, n_head, C // n_head).transpose(1, 2)    # (B, NH, T, hs)
    if mask is None:
        atty = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:                                                    # PyTorch takes the causal rule inside attn_mask then
        allowed = torch.from_numpy(allowed_keys(T, T, causal, mask, (B, T, T))[:, None])
        atty = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    atty = atty.transpose(1, 2).reshape(B, T, C)
    ty = atty @ W_o + (0 if b_o is None else b_o)
    assert_same_as_torch(torch, y, grads, ty, dy, leaves)


@FEW
@given(cross_attention_inputs())
def test_cross_attention_matches_torch(inputs):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    args, kwargs = inputs
    n_head, mask = kwargs["n_head"], kwargs["mask"]
    y, cache = cross_attention_forward(*args, **kwargs)
    dy = np.random.default_rng(9).standard_normal(y.shape)
    grads = cross_attention_backward(dy, cache)

    leaves = _leaves(torch, args)
    x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o = leaves
    (B, Tq, C), Tk = x.shape, memory.shape[1]
    hs = C // n_head
    q = (x @ W_q + (0 if b_q is None else b_q)).view(B, Tq, n_head, hs).transpose(1, 2)   # (B, NH, Tq, hs)
    k, v = (memory @ W_kv + (0 if b_kv is None else b_kv)).split(C, dim=2)
    k = k.view(B, Tk, n_head, hs).transpose(1, 2)                                          # (B, NH, Tk, hs)
    v = v.view(B, Tk, n_head, hs).transpose(1, 2)                                          # (B, NH, Tk, hs)
    attn_mask = None if mask is None else torch.from_numpy(np.broadcast_to(mask, (B, Tq, Tk))[:, None].copy())
    atty = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, Tq, C)
    ty = atty @ W_o + (0 if b_o is None else b_o)
    assert_same_as_torch(torch, y, grads, ty, dy, leaves)


# --- bad input --------------------------------------------------------------------------------

def _attention_args():
    rng = np.random.default_rng(10)
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 4))
    return {"q": q, "k": k, "v": v}, {}


def _self_attention_args():
    args, kwargs = CASES["self_attention"][0][1](np.random.default_rng(11), np.float64)   # C = 8, n_head = 2
    return dict(zip(("x", "W_qkv", "b_qkv", "W_o", "b_o"), args)), kwargs


def _cross_attention_args():
    args, kwargs = CASES["cross_attention"][0][1](np.random.default_rng(12), np.float64)  # C = 8, Tq = 5, Tk = 7
    return dict(zip(("x", "memory", "W_q", "b_q", "W_kv", "b_kv", "W_o", "b_o"), args)), kwargs


def _set(name, make):
    """A change to the valid arguments: argument or option ``name`` becomes ``make(old value)``."""
    def change(args, kwargs):
        if name in args:
            args[name] = make(args[name])
        else:
            kwargs[name] = make(kwargs.get(name))
    return change


def _grow(axis):
    """One more entry along ``axis``."""
    return lambda a: np.concatenate([a, np.take(a, [0], axis=axis)], axis=axis)


f32, i64 = (lambda a: a.astype(np.float32)), (lambda a: a.astype(np.int64))
SHAPE_4D, SHAPE_3D = r"must have shape \(B, NH, Tk, hs\)", r"must have shape \(B, Tk, C\)"
POSITIVE = "option 'n_head' must be a positive integer"
# op -> (id, change, error, what the message says after "op: ")
BAD = {
    "attention": [
        ("q-not-array", _set("q", lambda a: a.tolist()), TypeError, "argument 'q' must be an array"),
        ("q-int", _set("q", i64), TypeError, "argument 'q' must be a floating"),
        ("q-rank", _set("q", lambda a: a[0]), ValueError, r"argument 'q' must have 4 dim.*\(B, NH, Tq, hs\)"),
        ("q-no-head-size", _set("q", lambda a: a[..., :0]), ValueError,
         r"argument 'q' must have hs >= 1 in \(B, NH, Tq, hs\), got shape \(2, 2, 3, 0\)"),
        ("k-int", _set("k", i64), TypeError, "argument 'k' must be a floating"),
        ("k-no-keys", _set("k", lambda a: a[:, :, :0]), ValueError,
         r"argument 'k' must have Tk >= 1 in \(B, NH, Tk, hs\), got shape \(2, 2, 0, 4\)"),
        ("k-rank", _set("k", lambda a: a[0]), ValueError, r"argument 'k' must have 4 dim.*\(B, NH, Tk, hs\)"),
        ("k-batch", _set("k", lambda a: a[:1]), ValueError, "argument 'k' " + SHAPE_4D),
        ("k-heads", _set("k", _grow(1)), ValueError, "argument 'k' " + SHAPE_4D),
        ("k-head-size", _set("k", _grow(3)), ValueError, "argument 'k' " + SHAPE_4D),
        ("v-int", _set("v", i64), TypeError, "argument 'v' must be a floating"),
        ("v-length", _set("v", _grow(2)), ValueError, "argument 'v' " + SHAPE_4D),
        ("k-dtype-mix", _set("k", f32), TypeError, "argument 'k' must have the same dtype as 'q'"),
        ("causal-not-bool", _set("causal", lambda _: "yes"), ValueError, "option 'causal' must be True or False"),
        ("mask-not-array", _set("mask", lambda _: [[True]]), TypeError, "argument 'mask' must be an array"),
        ("mask-not-bool", _set("mask", lambda _: np.ones((3, 5))), TypeError, "argument 'mask' must be a boolean"),
        ("mask-shape", _set("mask", lambda _: np.ones((3, 4), dtype=bool)), ValueError,
         r"argument 'mask' must broadcast to \(B, NH, Tq, Tk\) = \(2, 2, 3, 5\), got \(3, 4\)"),
        ("mask-rank", _set("mask", lambda _: np.ones((1, 2, 2, 3, 5), dtype=bool)), ValueError,
         r"argument 'mask' must broadcast to \(B, NH, Tq, Tk\)"),
    ],
    "self_attention": [
        ("x-int", _set("x", i64), TypeError, "argument 'x' must be a floating"),
        ("x-rank", _set("x", lambda a: a[0]), ValueError, r"argument 'x' must have 3 dim.*\(B, T, C\)"),
        ("x-empty-sequence", _set("x", lambda a: a[:, :0]), ValueError, r"argument 'x' must have T >= 1 in \(B, T, C\)"),
        ("x-no-channels", _set("x", lambda a: a[..., :0]), ValueError, r"argument 'x' must have C >= 1 in \(B, T, C\)"),
        ("n_head-zero", _set("n_head", lambda _: 0), ValueError, POSITIVE),
        ("n_head-float", _set("n_head", lambda _: 2.0), ValueError, POSITIVE),
        ("n_head-bool", _set("n_head", lambda _: True), ValueError, POSITIVE),
        ("n_head-divides", _set("n_head", lambda _: 3), ValueError, "C = 8 must be divisible by n_head = 3"),
        ("W_qkv-shape", _set("W_qkv", lambda a: a[:, :16]), ValueError,
         r"argument 'W_qkv' must have shape \(C, 3C\) = \(8, 24\)"),
        ("W_qkv-int", _set("W_qkv", i64), TypeError, "argument 'W_qkv' must be a floating"),
        ("b_qkv-shape", _set("b_qkv", lambda a: a[:8]), ValueError, r"argument 'b_qkv' must have shape \(3C,\)"),
        ("W_o-shape", _set("W_o", lambda a: a[:4]), ValueError, r"argument 'W_o' must have shape \(C, C\)"),
        ("b_o-shape", _set("b_o", lambda a: a[:4]), ValueError, r"argument 'b_o' must have shape \(C,\)"),
        ("W_o-dtype-mix", _set("W_o", f32), TypeError, "argument 'W_o' must have the same dtype as 'x'"),
        ("causal-not-bool", _set("causal", lambda _: None), ValueError, "option 'causal' must be True or False"),
        ("mask-not-bool", _set("mask", lambda _: np.ones((2, 1, 5))), TypeError, "argument 'mask' must be a boolean"),
        ("mask-padding-2d", _set("mask", lambda _: np.ones((2, 5), dtype=bool)), ValueError,
         r"argument 'mask' must have the 3 dimensions of \(B, T, T\) \(1 where shared\), got shape \(2, 5\); "
         r"a padding mask over the keys is mask\[:, None, :\], shape \(B, 1, T\), and one for every batch row "
         r"mask\[None\], shape \(1, T, T\)$"),
        ("mask-shape", _set("mask", lambda _: np.ones((2, 1, 4), dtype=bool)), ValueError,
         r"argument 'mask' must broadcast to \(B, T, T\) = \(2, 5, 5\), got \(2, 1, 4\)"),
    ],
    "cross_attention": [
        ("x-int", _set("x", i64), TypeError, "argument 'x' must be a floating"),
        ("x-rank", _set("x", lambda a: a[0]), ValueError, r"argument 'x' must have 3 dim.*\(B, Tq, C\)"),
        ("x-no-channels", _set("x", lambda a: a[..., :0]), ValueError, r"argument 'x' must have C >= 1 in \(B, Tq, C\)"),
        ("memory-int", _set("memory", i64), TypeError, "argument 'memory' must be a floating"),
        ("memory-rank", _set("memory", lambda a: a[0]), ValueError, r"argument 'memory' must have 3 dim.*\(B, Tk, C\)"),
        ("memory-empty", _set("memory", lambda a: a[:, :0]), ValueError,
         r"argument 'memory' must have Tk >= 1 in \(B, Tk, C\), got shape \(2, 0, 8\)"),
        ("memory-batch", _set("memory", lambda a: a[:1]), ValueError, "argument 'memory' " + SHAPE_3D),
        ("memory-channels", _set("memory", _grow(2)), ValueError, "argument 'memory' " + SHAPE_3D),
        ("memory-dtype-mix", _set("memory", f32), TypeError, "argument 'memory' must have the same dtype as 'x'"),
        ("n_head-zero", _set("n_head", lambda _: 0), ValueError, POSITIVE),
        ("n_head-divides", _set("n_head", lambda _: 3), ValueError, "C = 8 must be divisible by n_head = 3"),
        ("W_q-shape", _set("W_q", lambda a: a[:, :4]), ValueError, r"argument 'W_q' must have shape \(C, C\)"),
        ("b_q-shape", _set("b_q", lambda a: a[:4]), ValueError, r"argument 'b_q' must have shape \(C,\)"),
        ("W_kv-shape", _set("W_kv", lambda a: a[:, :8]), ValueError,
         r"argument 'W_kv' must have shape \(C, 2C\) = \(8, 16\)"),
        ("W_kv-int", _set("W_kv", i64), TypeError, "argument 'W_kv' must be a floating"),
        ("b_kv-shape", _set("b_kv", lambda a: a[:8]), ValueError, r"argument 'b_kv' must have shape \(2C,\)"),
        ("W_o-shape", _set("W_o", lambda a: a[:4]), ValueError, r"argument 'W_o' must have shape \(C, C\)"),
        ("b_o-shape", _set("b_o", _grow(0)), ValueError, r"argument 'b_o' must have shape \(C,\)"),
        ("mask-not-bool", _set("mask", lambda m: m.astype(np.int8)), TypeError, "argument 'mask' must be a boolean"),
        ("mask-shape", _set("mask", lambda m: m[..., :6]), ValueError,
         r"argument 'mask' must broadcast to \(B, Tq, Tk\) = \(2, 5, 7\), got \(2, 5, 6\)"),
        ("mask-padding-2d", _set("mask", lambda m: m[:, 0, :]), ValueError,
         r"argument 'mask' must have the 3 dimensions of \(B, Tq, Tk\) \(1 where shared\), got shape \(2, 7\); "
         r"a padding mask over the keys is mask\[:, None, :\], shape \(B, 1, Tk\)"),
        ("mask-2d", _set("mask", lambda m: m[0]), ValueError,
         r"argument 'mask' must have the 3 dimensions of \(B, Tq, Tk\).*mask\[None\], shape \(1, Tq, Tk\)"),
    ],
}
VALID = {"attention": _attention_args, "self_attention": _self_attention_args, "cross_attention": _cross_attention_args}


@pytest.mark.parametrize("op,change,error,message", [(op, *case[1:]) for op in BAD for case in BAD[op]],
                         ids=[f"{op}-{case[0]}" for op in BAD for case in BAD[op]])
def test_bad_input(op, change, error, message):
    args, kwargs = VALID[op]()
    change(args, kwargs)
    with pytest.raises(error, match=rf"^{op}: {message}"):
        OPS[op][0](**args, **kwargs)


@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_valid_arguments_of_the_bad_input_table_pass(op):
    """The starting point of every bad-input case is itself valid, so each case tests one thing."""
    args, kwargs = VALID[op]()
    out, _ = OPS[op][0](**args, **kwargs)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_backward_checks_dy_shape(op):
    forward, backward = OPS[op]
    args, kwargs = VALID[op]()
    y, cache = forward(**args, **kwargs)
    with pytest.raises(ValueError, match=rf"^{op}_backward: argument 'dy' must have shape"):
        backward(np.zeros(y.shape[:-1] + (y.shape[-1] + 1,)), cache)


# --- dropout of the attention weights -----------------------------------------------------------

def test_attention_dropout_drops_weights_and_the_backward_follows_the_mask():
    rng = np.random.default_rng(21)
    q, k, v = (rng.standard_normal((2, 2, 5, 4)) for _ in range(3))
    _, plain = attention_forward(q, k, v, causal=True)
    y, cache = attention_forward(q, k, v, causal=True, dropout=0.3, rng=9)
    mask = cache.drop.mask
    assert mask.shape == plain.att.shape and not mask.all() and mask.any()
    assert np.array_equal(cache.att, plain.att)                                 # the cache keeps A, undropped
    assert np.allclose(y, (mask * plain.att / 0.7) @ v, rtol=ROUNDING_TOL, atol=ROUNDING_TOL)
    y0, cache0 = attention_forward(q, k, v, causal=True, dropout=0.0, rng=9)
    assert cache0.drop is None and np.array_equal(y0, plain.att @ v)
    dy = rng.standard_normal(y.shape)
    dq, dk, dv = attention_backward(dy, cache)
    assert np.allclose(dv, np.swapaxes(mask * plain.att / 0.7, -1, -2) @ dy, rtol=ROUNDING_TOL, atol=ROUNDING_TOL)
    # a dropout cache of p = 0 holds no mask (dropout_forward's own; the GPU tier hands such a cache
    # to this backward): it is the backward of no dropout
    from minilm.reference.dropout import dropout_forward
    no_mask = plain._replace(drop=dropout_forward(plain.att, p=0.0, rng=9)[1])
    assert no_mask.drop.mask is None
    for a, b in zip(attention_backward(dy, no_mask), attention_backward(dy, plain)):
        assert np.array_equal(a, b)


def test_attention_dropout_must_be_a_probability():
    q = np.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="attention: .*'dropout'"):
        attention_forward(q, q, q, dropout=1.0, rng=0)


# --- merging the heads ------------------------------------------------------------------------

def test_merge_heads_side_by_side_equals_concatenation_and_copies_nothing_for_heads_of_one_array():
    from minilm.reference.attention import merge_heads, merge_heads_side_by_side, split_heads
    rng = np.random.default_rng(7)
    B, NH, T, hs = 2, 3, 4, 5
    C = NH * hs
    parts = [rng.standard_normal((B, NH, T, hs)) for _ in range(3)]
    expected = np.concatenate([merge_heads(p) for p in parts], axis=-1)         # (B, T, 3C)
    merged = merge_heads_side_by_side(parts)
    assert np.array_equal(merged, expected) and not any(np.shares_memory(merged, p) for p in parts)

    # the heads of one (B, T, 3C) array, in block order (as the numba tier's attention backward
    # writes them): that array itself comes back
    base = expected.copy()
    heads = [split_heads(base[..., i * C:(i + 1) * C], NH) for i in range(3)]
    assert merge_heads_side_by_side(heads) is base

    # the same views out of order, or a part that is a copy, are merged by copying
    swapped = merge_heads_side_by_side([heads[1], heads[0], heads[2]])
    assert swapped is not base
    assert np.array_equal(swapped, np.concatenate([merge_heads(h) for h in (heads[1], heads[0], heads[2])], -1))
    copied = merge_heads_side_by_side([heads[0], heads[1].copy(), heads[2]])
    assert copied is not base and np.array_equal(copied, expected)
