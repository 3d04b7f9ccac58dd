"""Parity of the Numba tier's attention and softmax (minilm/cpu) with the reference.

Every kernel must equal the reference function of the same name, forward and backward, to
``EXACT_TOL`` in float64 and ``FLOAT32_TOL`` in float32, where the error of an array is

    relative_error(actual, expected) = max|actual - expected| / max(1, max|expected|),

the measure of ``assert_close`` in ``test_attention.py``. The floor of 1, the size of the inputs
here, is needed: through a peaked softmax a gradient is the difference of nearly equal O(1) terms
(dS = A (dA - sum(dA A)) with A close to 1), so it is tiny and both tiers' round-off in it is
relative to the terms, not to the result. Without the floor, float64 draws differ by ~1e-11 and
float32 draws by 1e-4 or more; with it, by ~1e-14 and ~4e-6 at worst.

Values come from a numpy Generator seeded by a hypothesis-drawn integer, as in ``test_attention.py``.
"""
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import minilm
from minilm import cpu, ops
from minilm.cpu import activations as cpu_activations, attention as cpu_attention
from minilm.cpu._parallel import MIN_PARALLEL_WORK
from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference import activations as ref_activations, attention as ref_attention
from minilm.opcases import CASES
from minilm.testing import relative_error

CASES_ATTENTION = CASES["attention"]

EXACT_TOL = 1e-12       # float64: the same math summed in another order differs by ~1e-15 relative
FLOAT32_TOL = 1e-5      # float32: both tiers round at ~6e-8 per operation; the differences stay below ~4e-6
GRAD_TOL = DEFAULT_TOL  # DESIGN's bound on analytic vs numerical gradients in float64
TOL = {np.float64: EXACT_TOL, np.float32: FLOAT32_TOL}

SOME = settings(max_examples=60, deadline=None)
FEW = settings(max_examples=20, deadline=None)

pytestmark = pytest.mark.usefixtures("kernel_twins")     # every test on both twins (tests/conftest.py)


@pytest.fixture(scope="module", autouse=True, params=["blas", "fused"])
def attention_path(request):
    """Every test runs on both paths of the attention, whatever the input's size: BLAS products
    around the softmax kernels (training shapes) and the fused kernels (short prompts, tiny batches)."""
    saved = cpu_attention.FUSED_MAX_WORK
    cpu_attention.FUSED_MAX_WORK = -1 if request.param == "blas" else 2 ** 62
    yield request.param
    cpu_attention.FUSED_MAX_WORK = saved


# --- helpers ----------------------------------------------------------------------------------

def assert_same(actual, expected, tol, what=""):
    """Same shape and dtype, and values within ``tol`` in ``relative_error``."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert np.all(np.isfinite(actual)), what
    rel = relative_error(actual, expected, floor=1.0)
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"


def assert_same_grads(actual, expected, tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None
        else:
            assert_same(a, e, tol, f"gradient {i}")


def random_mask(rng, shape):
    """A random boolean mask of ``shape``; rows with no allowed key happen, and are meant to."""
    return rng.random(shape) < rng.uniform(0.3, 0.9)


def allowed_count(q, k, causal, mask):
    """How many keys each query may attend, (B, NH, Tq)."""
    B, NH, Tq, _ = q.shape
    Tk = k.shape[2]
    i, j = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
    causal_ok = (j <= i + Tk - Tq) if causal else np.ones((Tq, Tk), dtype=bool)
    return np.sum(np.broadcast_to(causal_ok & (True if mask is None else mask), (B, NH, Tq, Tk)), axis=-1)


@st.composite
def attention_inputs(draw, dtype=None, scales=(1.0, 3.0), small=False):
    """((q, k, v), {"causal", "mask"}) with B, NH <= 3, Tq, Tk <= 9, hs <= 8, in float32 or float64
    (``small``: B, NH <= 2, Tq, Tk <= 5, hs <= 4, for the element-by-element gradient check).

    Tq and Tk are drawn apart: Tq < Tk is a decode step over a key/value cache, Tq > Tk makes
    causal queries that come before every key. q and k are scaled by one of ``scales``: 3 gives
    scores up to ~30, so peaked weights."""
    n, T, hs = (2, 5, 4) if small else (3, 9, 8)
    B, NH, hs = draw(st.integers(1, n)), draw(st.integers(1, n)), draw(st.integers(1, hs))
    Tq, Tk = draw(st.integers(1, T)), draw(st.integers(1, T))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float64, np.float32])) if dtype is None else dtype
    mask_shape = draw(st.sampled_from([None, (B, NH, Tq, Tk), (B, 1, Tq, Tk), (Tq, Tk), (1, NH, 1, Tk), (Tk,)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(scales))
    q = (scale * rng.standard_normal((B, NH, Tq, hs))).astype(dtype)
    k = (scale * rng.standard_normal((B, NH, Tk, hs))).astype(dtype)
    v = rng.standard_normal((B, NH, Tk, hs)).astype(dtype)
    mask = None if mask_shape is None else random_mask(rng, mask_shape)
    return (q, k, v), {"causal": causal, "mask": mask}


def _params(rng, C, widths, biases, dtype):
    Ws = [(rng.standard_normal((C, w)) / np.sqrt(C)).astype(dtype) for w in widths]
    bs = [(0.1 * rng.standard_normal(w)).astype(dtype) if biases else None for w in widths]
    return Ws, bs


@st.composite
def self_attention_inputs(draw):
    """((x, W_qkv, b_qkv, W_o, b_o), {"n_head", "causal", "mask"}) with B, NH <= 3, T <= 9, hs <= 8."""
    B, T, NH, hs = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    biases, causal = draw(st.booleans()), draw(st.booleans())
    mask_shape = draw(st.sampled_from([None, (B, T, T), (1, T, T), (B, 1, T)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = NH * hs
    (W_qkv, W_o), (b_qkv, b_o) = _params(rng, C, (3 * C, C), biases, dtype)
    x = rng.standard_normal((B, T, C)).astype(dtype)
    mask = None if mask_shape is None else random_mask(rng, mask_shape)
    return (x, W_qkv, b_qkv, W_o, b_o), {"n_head": NH, "causal": causal, "mask": mask}


@st.composite
def cross_attention_inputs(draw):
    """((x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o), {"n_head", "mask"})."""
    B, NH, hs = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    Tq, Tk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    mask_shape = draw(st.sampled_from([None, (B, Tq, Tk), (1, Tq, Tk), (B, 1, Tk)]))
    biases = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = NH * hs
    (W_q, W_kv, W_o), (b_q, b_kv, b_o) = _params(rng, C, (C, 2 * C, C), biases, dtype)
    x, memory = rng.standard_normal((B, Tq, C)).astype(dtype), rng.standard_normal((B, Tk, C)).astype(dtype)
    mask = None if mask_shape is None else random_mask(rng, mask_shape)
    return (x, memory, W_q, b_q, W_kv, b_kv, W_o, b_o), {"n_head": NH, "mask": mask}


def check_parity(name, reference, kernels, args, kwargs, dtype):
    """``name`` forward and backward from ``kernels`` equal those from ``reference``."""
    y_ref, cache_ref = getattr(reference, f"{name}_forward")(*args, **kwargs)
    y, cache = getattr(kernels, f"{name}_forward")(*args, **kwargs)
    assert_same(y, y_ref, TOL[dtype], f"{name} forward")
    dy = np.random.default_rng(0).standard_normal(y_ref.shape).astype(dtype)
    grads_ref = getattr(reference, f"{name}_backward")(dy, cache_ref)
    grads = getattr(kernels, f"{name}_backward")(dy, cache)
    assert_same_grads(grads, grads_ref, TOL[dtype])
    return cache, cache_ref


# --- attention --------------------------------------------------------------------------------

@SOME
@given(attention_inputs())
def test_attention_equals_reference(inputs):
    args, kwargs = inputs
    dtype = args[0].dtype.type
    cache, cache_ref = check_parity("attention", ref_attention, cpu_attention, args, kwargs, dtype)
    assert type(cache) is type(cache_ref)                  # the caches interchange
    assert_same(cache.att, cache_ref.att, TOL[dtype], "att")


@FEW
@given(attention_inputs(dtype=np.float64, scales=(1.0,), small=True))
def test_attention_gradcheck(inputs):
    args, kwargs = inputs
    # where every query sees at most one key, dq = dk = 0 exactly, which a relative error cannot
    # check (see test_attention.py); test_single_key_gives_exactly_zero_dq_and_dk covers that
    assume(int(np.max(allowed_count(*args[:2], kwargs["causal"], kwargs["mask"]), initial=0)) >= 2)
    report = gradcheck(cpu_attention.attention_forward, cpu_attention.attention_backward, args, kwargs,
                       tol=GRAD_TOL, raise_on_fail=True)
    assert report.passed and len(report.arguments) == 3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_parallel_forward_kernel_equals_reference(dtype):
    """Inputs larger than the draws above: Tq < Tk, rows not a multiple of the fused kernels'
    four-row blocks, and at least MIN_PARALLEL_WORK elements of work."""
    rng = np.random.default_rng(7)
    B, NH, Tq, Tk, hs = 2, 3, 21, 24, 16            # Tq < Tk, and not a multiple of the 4-row blocks
    q = rng.standard_normal((B, NH, Tq, hs)).astype(dtype)
    k, v = (rng.standard_normal((B, NH, Tk, hs)).astype(dtype) for _ in range(2))
    assert q.size * Tk >= MIN_PARALLEL_WORK
    for kwargs in ({"causal": True}, {"mask": random_mask(rng, (B, 1, Tq, Tk))},
                   {"causal": True, "mask": random_mask(rng, (Tq, Tk))}):
        check_parity("attention", ref_attention, cpu_attention, (q, k, v), kwargs, dtype)


def test_attention_float32_weights_are_normalised_in_float64():
    """Both paths add up a float32 row's Z = sum_j e^{S_ij - m_i} in float64; the reference sums
    in float32, pairwise. A float32 Z would give all of a row's weights one common relative
    error, which shows in sum_j (att_ij - truth_ij) / sum_j truth_ij, truth from the same inputs
    in float64. On rows of 16384 keys the kernels' must be no larger than the reference's
    (measured: BLAS path 4.4e-8, fused 1.1e-9, reference 8.4e-8; a float32 Z gives 1.4e-7 and
    4.7e-6). The draws above have at most 9 keys, where a float32 sum is exact enough to agree."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 16384, 8)).astype(np.float32) for _ in range(2))
    _, truth = ref_attention.attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))

    def common_error(att):
        return float(np.max(np.abs(np.sum(att - truth.att, axis=-1) / np.sum(truth.att, axis=-1))))

    _, cache = cpu_attention.attention_forward(q, k, v)             # the path and twin the fixtures force
    _, cache_ref = ref_attention.attention_forward(q, k, v)
    assert common_error(cache.att) <= common_error(cache_ref.att)


CANCELLING_DQ_TOL = 1e-4   # dq below is a 1% residual of O(1) terms: float32 round-off x ~100, measured <= 1.4e-5


def test_fused_backward_sums_in_float64(attention_path):
    """The fused backward adds up sum_l dA_il A_il in float64. With v_j = 1 + 0.01 noise every
    dA_ij = dy_i . v_j is nearly one value, so dS_ij = A_ij (dA_ij - sum_l dA_il A_il) keeps 1% of
    it and the sum's error shows in dq a hundredfold (measured over seeds 0-5: 4.8e-6 to 1.4e-5,
    the reference 5.9e-6 to 6.2e-5; a float32 sum gives 8.0e-4). One query over 1024 keys, hs 8:
    the size of work the fused path serves."""
    if attention_path != "fused":
        pytest.skip("the BLAS path's sum is test_attention_float32_weights_are_normalised_in_float64's kernel")
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 1, 8)).astype(np.float32), rng.standard_normal((1, 1, 1024, 8)).astype(np.float32)
    v = (1 + 0.01 * rng.standard_normal((1, 1, 1024, 8))).astype(np.float32)
    dy = rng.standard_normal(q.shape).astype(np.float32)
    _, truth = ref_attention.attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    dq_truth = ref_attention.attention_backward(dy.astype(np.float64), truth)[0]
    dq = cpu_attention.attention_backward(dy, cpu_attention.attention_forward(q, k, v)[1])[0]
    assert relative_error(dq, dq_truth) <= CANCELLING_DQ_TOL


@pytest.mark.parametrize("dtypes", [(np.float64, np.float32), (np.float32, np.float64)])
def test_attention_backward_of_another_dtype_promotes_as_the_reference(dtypes):
    """A gradient dy of another dtype than the forward's q, k, v: dq, dk, dv have the reference's
    promoted dtype (float64 either way) and its values, to float32's tolerance (one operand is float32)."""
    qkv_dtype, dy_dtype = dtypes
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((2, 2, 5, 4)).astype(qkv_dtype) for _ in range(3))
    dy = rng.standard_normal(q.shape).astype(dy_dtype)
    grads_ref = ref_attention.attention_backward(dy, ref_attention.attention_forward(q, k, v, causal=True)[1])
    grads = cpu_attention.attention_backward(dy, cpu_attention.attention_forward(q, k, v, causal=True)[1])
    assert [g.dtype for g in grads] == [g.dtype for g in grads_ref] == [np.float64] * 3
    assert_same_grads(grads, grads_ref, FLOAT32_TOL)


def test_single_key_gives_exactly_zero_dq_and_dk():
    rng = np.random.default_rng(13)
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 1, 4)), rng.standard_normal((2, 2, 1, 4))
    y, cache = cpu_attention.attention_forward(q, k, v)
    dq, dk, dv = cpu_attention.attention_backward(np.ones_like(y), cache)
    assert np.array_equal(y, np.broadcast_to(v, y.shape))
    assert np.all(dq == 0) and np.all(dk == 0) and np.array_equal(dv, np.full((2, 2, 1, 4), 3.0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rows_with_no_allowed_key_give_zeros_without_nan(dtype):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 2, 6, 3)).astype(dtype) for _ in range(3))
    mask = rng.random((2, 2, 6, 6)) < 0.6
    mask[..., 0] = True
    mask[1, 0, 2, :] = False                            # query 2 of (b=1, h=0) may attend nothing
    mask[0, 1, :, :] = False                            # nor may any query of (b=0, h=1)
    with np.errstate(all="raise"):
        y, cache = cpu_attention.attention_forward(q, k, v, mask=mask)
        dq, dk, dv = cpu_attention.attention_backward(np.ones_like(y), cache)
    for a in (y, cache.att, dq, dk, dv):
        assert np.all(np.isfinite(a))
    for a in (y[1, 0, 2], cache.att[1, 0, 2], dq[1, 0, 2], y[0, 1], dq[0, 1], dk[0, 1], dv[0, 1]):
        assert np.all(a == 0)
    assert np.any(y[1, 0, 1] != 0)                      # its neighbours are untouched
    # causal queries before every key (Tq > Tk, queries aligned to the end of the keys)
    y, cache = cpu_attention.attention_forward(q, k[:, :, :2], v[:, :, :2], causal=True)
    dq, _, _ = cpu_attention.attention_backward(np.ones_like(y), cache)
    assert np.all(y[:, :, :4] == 0) and np.all(dq[:, :, :4] == 0) and np.all(y[:, :, 4:] != 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top", ["first", "middle", "last"])
def test_scores_far_apart_do_not_overflow(causal, top):
    """Scores 800 apart (e^800 overflows even float64) with the row's largest first, in the middle
    or last: only a softmax that subtracts each row's true maximum stays finite and equals the
    reference. Random draws stay far from overflow, so they cannot tell a max that misses a key.
    (At 2000 apart a missed maximum went unseen: e^2000 by exponent bits comes out as a huge
    finite number, which normalises to the same weights.)"""
    rng = np.random.default_rng(3)
    T, hs = 6, 4
    q = np.zeros((1, 2, T, hs))
    q[..., 0] = 1.0
    k, v, dy = (rng.standard_normal((1, 2, T, hs)) for _ in range(3))
    k[..., 0] = -800.0                                   # scores q.k / sqrt(hs) = -400 ...
    k[..., {"first": 0, "middle": T // 2, "last": T - 1}[top], 0] = 800.0      # ... and one of +400
    y, cache = cpu_attention.attention_forward(q, k, v, causal=causal)
    grads = cpu_attention.attention_backward(dy, cache)
    y_ref, cache_ref = ref_attention.attention_forward(q, k, v, causal=causal)
    assert_same(y, y_ref, EXACT_TOL, "y")
    assert_same_grads(grads, ref_attention.attention_backward(dy, cache_ref), EXACT_TOL)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_key_spreads_as_in_the_reference(bad):
    """A NaN or inf in one key makes its score non-finite: the reference's rows through it come out
    NaN, weights and gradients alike, and the kernels' must be NaN in the same places (a row whose
    sum Z is NaN had been left unnormalised, so dv lost most of its NaNs)."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 8, 4)) for _ in range(3))
    k[0, 1, 2, 0] = bad
    dy = rng.standard_normal((1, 2, 8, 4))
    with np.errstate(all="ignore"):
        y, cache = cpu_attention.attention_forward(q, k, v, causal=True)
        grads = cpu_attention.attention_backward(dy, cache)
        y_ref, cache_ref = ref_attention.attention_forward(q, k, v, causal=True)
        grads_ref = ref_attention.attention_backward(dy, cache_ref)
    allowed = np.tril(np.ones((8, 8), dtype=bool))     # the kernels leave the weights past the diagonal 0
    pairs = [("y", y, y_ref), ("att", cache.att[..., allowed], cache_ref.att[..., allowed]),
             *zip(("dq", "dk", "dv"), grads, grads_ref)]
    for name, a, e in pairs:
        assert np.array_equal(np.isnan(a), np.isnan(e)), name
        finite = np.isfinite(e)
        assert np.any(np.isnan(e)) and np.allclose(a[finite], e[finite], rtol=0, atol=EXACT_TOL), name


def test_non_contiguous_inputs():
    """Strided views, as the KV-cache path passes (K[:, :, :t]) and as split heads are."""
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((2, 7, 3 * 12)).astype(np.float32)         # (B, T, 3C), NH = 3, hs = 4
    q, k, v = (qkv[..., i * 12:(i + 1) * 12].reshape(2, 7, 3, 4).transpose(0, 2, 1, 3) for i in range(3))
    K = np.zeros((2, 3, 16, 4), np.float32)
    K[:, :, :7] = k
    mask = np.broadcast_to(rng.random((1, 1, 7, 7)) < 0.8, (2, 3, 7, 7))[..., ::-1]   # read-only, strided
    for args, kwargs in [((q, K[:, :, :7], v), {"causal": True}), ((q[:, :, 3:], k, v), {"causal": True}),
                         ((q, k, v), {"mask": mask}), ((q[:, :, ::2], k[:, ::-1], v[..., ::-1, :]), {}),
                         # Fortran order: q kᵀ of two of them came out in Fortran order, which the
                         # softmax kernel could not take
                         ((np.asfortranarray(q), np.asfortranarray(k), np.asfortranarray(v)), {"causal": True})]:
        assert not all(a.flags.c_contiguous for a in args)
        cache, cache_ref = check_parity("attention", ref_attention, cpu_attention, args, kwargs, np.float32)
        dy = rng.standard_normal(args[0].shape[:-1] + (8,)).astype(np.float32)[..., ::2]      # a strided dy
        assert_same_grads(cpu_attention.attention_backward(dy, cache), ref_attention.attention_backward(dy, cache_ref),
                          FLOAT32_TOL)


def test_caches_interchange():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    dy = rng.standard_normal(q.shape)
    _, cache = cpu_attention.attention_forward(q, k, v, causal=True)
    _, cache_ref = ref_attention.attention_forward(q, k, v, causal=True)
    assert_same_grads(cpu_attention.attention_backward(dy, cache_ref), ref_attention.attention_backward(dy, cache),
                      EXACT_TOL)


def test_bad_arguments_raise_the_reference_errors():
    q = np.zeros((1, 2, 3, 4))
    bad = [((q, q[:, :1], q), {}), ((q, q, q.astype(np.float32)), {}), ((q[0], q, q), {}),
           ((q, q, q), {"causal": "yes"}), ((q, q, q), {"mask": np.ones((3, 4), bool)}),
           ((q, q, q), {"mask": np.ones((3, 3))}), ((q.astype(int), q, q), {}),
           ((q, q[:, :, :0], q[:, :, :0]), {}), ((q[..., :0], q[..., :0], q[..., :0]), {})]
    for args, kwargs in bad:
        with pytest.raises((TypeError, ValueError)) as expected:
            ref_attention.attention_forward(*args, **kwargs)
        with pytest.raises(expected.type, match=f"^{re.escape(str(expected.value))}$"):
            cpu_attention.attention_forward(*args, **kwargs)
    _, cache = cpu_attention.attention_forward(q, q, q)
    with pytest.raises(ValueError, match=r"attention_backward: argument 'dy' must have shape \(B, NH, Tq, hs\)"):
        cpu_attention.attention_backward(q[:, :1], cache)


def test_float16_runs_the_reference():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)).astype(np.float16) for _ in range(3))
    y, cache = cpu_attention.attention_forward(q, k, v, causal=True)
    y_ref, cache_ref = ref_attention.attention_forward(q, k, v, causal=True)
    assert y.dtype == np.float16 and np.array_equal(y, y_ref)
    for g, g_ref in zip(cpu_attention.attention_backward(y, cache), ref_attention.attention_backward(y, cache_ref)):
        assert np.array_equal(g, g_ref)
    y, _ = cpu_activations.softmax_forward(q)
    assert y.dtype == np.float16 and np.array_equal(y, ref_activations.softmax_forward(q)[0])


# --- self- and cross-attention ----------------------------------------------------------------

@FEW
@given(self_attention_inputs())
def test_self_attention_equals_reference(inputs):
    args, kwargs = inputs
    check_parity("self_attention", ref_attention, cpu_attention, args, kwargs, args[0].dtype.type)


@FEW
@given(cross_attention_inputs())
def test_cross_attention_equals_reference(inputs):
    args, kwargs = inputs
    check_parity("cross_attention", ref_attention, cpu_attention, args, kwargs, args[0].dtype.type)


def test_self_attention_runs_the_attention_kernel(monkeypatch):
    """The numba tier's self- and cross-attention use the kernel, not the reference's attention."""
    called = []

    def spy(name):
        kernel = getattr(cpu_attention, name)

        def counted(*args, **kwargs):
            called.append(name)
            return kernel(*args, **kwargs)
        monkeypatch.setattr(cpu_attention, name, counted)

    spy("attention_forward")
    spy("attention_backward")
    rng = np.random.default_rng(5)
    x, W_qkv, W_o = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 12)), rng.standard_normal((4, 4))
    y, cache = cpu_attention.self_attention_forward(x, W_qkv, None, W_o, None, n_head=2)
    cpu_attention.self_attention_backward(y, cache)
    args = (x, x, W_o, None, rng.standard_normal((4, 8)), None, W_o, None)
    y, cache = cpu_attention.cross_attention_forward(*args, n_head=2)
    cpu_attention.cross_attention_backward(y, cache)
    assert called == ["attention_forward", "attention_backward"] * 2


def test_the_numba_backend_uses_the_kernels():
    minilm.use("numba")
    for name in ("attention", "self_attention", "cross_attention"):
        for way in ("forward", "backward"):
            assert getattr(ops, f"{name}_{way}") is getattr(cpu_attention, f"{name}_{way}")
            assert getattr(cpu, f"{name}_{way}") is getattr(cpu_attention, f"{name}_{way}")
    assert ops.softmax_forward is cpu_activations.softmax_forward
    assert ops.softmax_backward is cpu_activations.softmax_backward
    minilm.use("numpy")
    assert ops.attention_forward is ref_attention.attention_forward


# --- softmax ----------------------------------------------------------------------------------

@SOME
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.sampled_from([np.float64, np.float32]),
       st.sampled_from([1.0, 30.0]), st.integers(0, 2**32 - 1))
def test_softmax_equals_reference(shape, dtype, scale, seed):
    x = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
    check_parity("softmax", ref_activations, cpu_activations, (x,), {}, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_of_logits_far_apart_does_not_overflow(dtype):
    """Each row's maximum, wherever it sits (first, middle, last entry), is subtracted before the
    exponential: entries 1e3 apart, whose e^x overflows in either dtype, give the reference's finite
    weights (the draws above, at most ~30 apart, never reach the overflow)."""
    x = np.array([[1000.0, 0.0, -1000.0, 10.0, 5.0],          # the maximum first,
                  [0.0, 5.0, 1000.0, 10.0, -1000.0],          # in the middle,
                  [-1000.0, 0.0, 5.0, 10.0, 1000.0],          # last,
                  [998.0, 999.0, 1000.0, 997.0, 1000.0]], dtype=dtype)     # and twice
    check_parity("softmax", ref_activations, cpu_activations, (x,), {}, dtype)


def test_softmax_float32_sums_in_float64():
    """The kernels add up a float32 row's sums in float64 (the forward's Z = sum_j e^{x_j - m},
    the backward's s = sum_j dy_j y_j); the reference sums in float32, pairwise. On rows of 4096
    the kernels must be at least as close to the float64 result as the reference is (measured:
    forward 1.9e-8 against 5.7e-8; backward 4.2e-8 against 7.4e-8, with dy around 1 so that
    dy_i - s cancels and s's error shows; float32 sums in the kernels give 8.3e-7 and 9.2e-7).
    The draws above have at most 9 entries a row, where a float32 sum is exact enough to agree."""
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((16, 4096))).astype(np.float32)
    dy = (1 + rng.standard_normal(x.shape)).astype(np.float32)
    y64, cache64 = ref_activations.softmax_forward(x.astype(np.float64))
    (dx64,) = ref_activations.softmax_backward(dy.astype(np.float64), cache64)
    y, cache = cpu_activations.softmax_forward(x)                  # the twin the module's fixture forces
    y_ref, cache_ref = ref_activations.softmax_forward(x)
    assert relative_error(y, y64) <= relative_error(y_ref, y64)
    (dx,), (dx_ref,) = cpu_activations.softmax_backward(dy, cache), ref_activations.softmax_backward(dy, cache_ref)
    assert relative_error(dx, dx64) <= relative_error(dx_ref, dx64)


@pytest.mark.parametrize("dtypes", [(np.float64, np.float32), (np.float32, np.float64)])
def test_softmax_backward_of_another_dtype_promotes_as_the_reference(dtypes):
    """A gradient dy of another dtype than the forward's y: dx has the reference's promoted dtype
    (float64 either way) and its values."""
    x_dtype, dy_dtype = dtypes
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 7)).astype(x_dtype)
    dy = rng.standard_normal((3, 7)).astype(dy_dtype)
    (dx_ref,) = ref_activations.softmax_backward(dy, ref_activations.softmax_forward(x)[1])
    (dx,) = cpu_activations.softmax_backward(dy, cpu_activations.softmax_forward(x)[1])
    assert dx.dtype == dx_ref.dtype == np.float64
    # the float32 operand limits both tiers' agreement to float32's rounding
    assert_same(dx, dx_ref, FLOAT32_TOL)


def test_softmax_non_contiguous_gradcheck_and_checks():
    x = np.random.default_rng(6).standard_normal((4, 6, 5)).transpose(1, 2, 0)[:, ::2]     # (6, 3, 4) strided
    check_parity("softmax", ref_activations, cpu_activations, (x,), {}, np.float64)
    # gradcheck perturbs its arguments through reshape(-1), so it is given a contiguous copy
    report = gradcheck(cpu_activations.softmax_forward, cpu_activations.softmax_backward, (np.ascontiguousarray(x),),
                       tol=GRAD_TOL, raise_on_fail=True)
    assert report.passed
    with pytest.raises(TypeError, match="softmax: argument 'x' must be a floating-point array"):
        cpu_activations.softmax_forward(np.arange(3))
    with pytest.raises(ValueError, match=r"softmax: argument 'x' must have at least 1 dimension"):
        cpu_activations.softmax_forward(np.ones(()))
    with pytest.raises(ValueError, match=r"softmax: argument 'x' must have K >= 1 in \(\.\.\., K\), got shape \(3, 0\)"):
        cpu_activations.softmax_forward(np.ones((3, 0)))
    _, cache = cpu_activations.softmax_forward(x)
    with pytest.raises(ValueError, match=r"softmax_backward: argument 'dy' must have shape"):
        cpu_activations.softmax_backward(x[:1], cache)


# --- dropout of the attention weights -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_dropout_equals_the_reference(dtype):
    """The same rng gives the same masks (the reference's dropout draws them on both tiers), so the
    outputs and gradients agree as without dropout; the dropout takes the BLAS path at any size."""
    rng = np.random.default_rng(31)
    q, k, v = (rng.standard_normal((2, 3, 6, 4)).astype(dtype) for _ in range(3))
    dy = rng.standard_normal((2, 3, 6, 4)).astype(dtype)
    y, cache = cpu_attention.attention_forward(q, k, v, causal=True, dropout=0.3, rng=np.random.default_rng(5))
    y_ref, cache_ref = ref_attention.attention_forward(q, k, v, causal=True, dropout=0.3,
                                                       rng=np.random.default_rng(5))
    assert np.array_equal(cache.drop.mask, cache_ref.drop.mask)
    assert_same(y, y_ref, TOL[dtype], "y")
    assert_same_grads(cpu_attention.attention_backward(dy, cache), ref_attention.attention_backward(dy, cache_ref),
                      TOL[dtype])


def test_attention_dropout_backward_equals_the_numerical_gradient():
    args, kwargs = dict(CASES_ATTENTION)["dropout"](np.random.default_rng(0), np.float64)
    report = gradcheck(cpu_attention.attention_forward, cpu_attention.attention_backward, args, kwargs, tol=GRAD_TOL)
    assert report.arguments and report.passed, str(report)
