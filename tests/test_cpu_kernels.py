"""Parity of the Numba tier's layernorm, GELU, cross-entropy, embedding and optimizer kernels with the reference.

Every kernel must equal the reference function of the same name, forward and backward, on shapes
and values drawn by hypothesis (values from a numpy Generator seeded by a drawn integer, inputs
sometimes non-contiguous), to ``F64_TOL`` in float64 and ``F32_TOL`` in float32 in
``relative_error``. Caches are interchangeable between the tiers. Each Numba backward also passes
``minilm.gradcheck``; the optimizer kernels equal the reference updates bit for bit; and whole
models train to the same losses on the ``numba`` and ``numpy`` backends.
"""
import re
from types import SimpleNamespace

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilm
from minilm import backend, ops, optim
from minilm.cpu import activations as cpu_activations
from minilm.cpu import embedding as cpu_embedding
from minilm.cpu import layernorm as cpu_layernorm
from minilm.cpu import losses as cpu_losses
from minilm.cpu import optim as cpu_optim
from minilm.cpu import _parallel
from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.models.gpt import GPT, GPTConfig
from minilm.models.rnnlm import RNNLM, RNNConfig
from minilm.opcases import CASES
from minilm.params import Params
from minilm.reference import activations as ref_activations
from minilm.reference import embedding as ref_embedding
from minilm.reference import layernorm as ref_layernorm
from minilm.reference import losses as ref_losses
from minilm.testing import relative_error

# The error of an array: relative_error(a, b) = max|a - b| / max|b|, the largest difference
# measured against the reference's scale (one number per array, so an entry that happens to be
# near zero is not judged against itself).
# float64: the kernels sum in other orders than NumPy (sequentially, or in whatever order the
# compiler vectorises a sum in, instead of pairwise; layernorm's dgamma by blocks of rows) and
# compute exp and tanh their own way: a few ulps, ~1e-15.
F64_TOL = 1e-12
# float32: DESIGN's bound. The kernels accumulate in float64 where NumPy sums in float32, and the
# GELU's gradient avoids the reference's cancellation in 1 - tanh²: what remains is mostly the
# reference's own float32 rounding, ~1e-6 at worst in the GELU's gradient.
F32_TOL = 1e-5
TOL = {np.float64: F64_TOL, np.float32: F32_TOL}
DTYPES = [np.float64, np.float32]
# whole models: the same losses after several steps of training; each step's differences are the
# per-op ones above (~1e-15), and a few steps of AdamW amplify them little
MODEL_TOL = 1e-10

SETTINGS = settings(max_examples=25, deadline=None)

pytestmark = pytest.mark.usefixtures("kernel_twins")     # every test on both twins (tests/conftest.py)


# --- helpers ----------------------------------------------------------------------------------

def assert_close(actual, expected, tol, what, floor=0.0):
    if expected is None:
        assert actual is None, what
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {actual.shape} {actual.dtype} != {expected.shape} {expected.dtype}"
    rel = relative_error(actual, expected, floor)
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"


def strided(a):
    """A non-contiguous view with a's values (every other element of a twice-as-wide last axis)."""
    if a.ndim == 0:
        return a
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


def check_parity(ref_forward, ref_backward, cpu_forward, cpu_backward, args, kwargs, dout, tol, floors=(0.0, 0.0)):
    """Forward outputs, backward gradients and the caches of both tiers agree to ``tol``, relative to
    their largest value or to ``floors`` (forward, backward) when that is larger (``relative_error``)."""
    floor_out, floor_grad = floors
    out_ref, cache_ref = ref_forward(*args, **kwargs)
    out_cpu, cache_cpu = cpu_forward(*args, **kwargs)
    assert cache_cpu._fields[:len(cache_ref._fields)] == cache_ref._fields    # the reference's fields, maybe more
    assert_close(out_cpu, out_ref, tol, "forward", floor_out)
    grads_ref = ref_backward(dout, cache_ref)
    grads_cpu = cpu_backward(dout, cache_cpu)
    assert len(grads_cpu) == len(grads_ref)
    for i, (g_cpu, g_ref) in enumerate(zip(grads_cpu, grads_ref)):
        assert_close(g_cpu, g_ref, tol, f"gradient {i}", floor_grad)
    # the caches are interchangeable: each tier's backward accepts the other's cache
    for i, g in enumerate(cpu_backward(dout, cache_ref)):
        assert_close(g, grads_ref[i], tol, f"numba backward of the reference cache, gradient {i}", floor_grad)
    for i, g in enumerate(ref_backward(dout, cache_cpu)):
        assert_close(g, grads_ref[i], tol, f"reference backward of the numba cache, gradient {i}", floor_grad)


lead_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=2).map(tuple)   # up to 81 rows
seeds = st.integers(0, 2 ** 32 - 1)


# --- layernorm --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(lead=lead_shapes, C=st.integers(3, 40), eps=st.sampled_from([1e-5, 1e-3, 0.5]), seed=seeds,
       non_contiguous=st.booleans())
def test_layernorm_equals_reference(dtype, lead, C, eps, seed, non_contiguous):
    # A row's dx is what remains of gamma * dy once its mean and its projection on x_hat are removed.
    # With few channels that remainder can be a small difference of O(1) terms, which any float32
    # evaluation, the reference's included, gets right only to ~1e-7 of the terms (and C = 2 leaves
    # dx ~ eps / var in any dtype). So C >= 3, and C >= 8 in float32, where it is not small.
    C = max(C, 8) if dtype == np.float32 else C
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(lead + (C,)) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(dtype)
    gamma, beta = (1 + 0.5 * rng.standard_normal(C)).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if non_contiguous:
        x, gamma, dy = strided(x), strided(gamma), strided(dy)
    check_parity(ref_layernorm.layernorm_forward, ref_layernorm.layernorm_backward,
                 cpu_layernorm.layernorm_forward, cpu_layernorm.layernorm_backward,
                 (x, gamma, beta), {"eps": eps}, dy, TOL[dtype])


def test_layernorm_backward_of_a_float32_dy_on_a_float64_forward_promotes_as_the_reference():
    rng = np.random.default_rng(0)
    x, gamma, beta = rng.standard_normal((4, 6)), 1 + rng.standard_normal(6), rng.standard_normal(6)
    dy = rng.standard_normal((4, 6)).astype(np.float32)
    _, cache = ref_layernorm.layernorm_forward(x, gamma, beta)
    expected = ref_layernorm.layernorm_backward(dy, cache)
    got = cpu_layernorm.layernorm_backward(dy, cpu_layernorm.layernorm_forward(x, gamma, beta)[1])
    assert [g.dtype for g in got] == [e.dtype for e in expected]      # dx, dgamma float64; dbeta float32
    for g, e in zip(got, expected):
        assert relative_error(g, e) <= TOL[np.float64]


# --- GELU -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
       approximate=st.sampled_from(["tanh", "none"]), scale=st.floats(0.5, 4.0), seed=seeds,
       non_contiguous=st.booleans())
def test_gelu_equals_reference(dtype, shape, approximate, scale, seed, non_contiguous):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    # one typical element sets the array's scale: where GELU's slope is near zero (x < -3, or
    # x ~ -0.75) dx is tiny, and any float32 evaluation of it, the reference's too, is mostly rounding
    x.flat[0], dy.flat[0] = 1.5, 1.0
    if non_contiguous:
        x, dy = strided(x), strided(dy)
    check_parity(ref_activations.gelu_forward, ref_activations.gelu_backward,
                 cpu_activations.gelu_forward, cpu_activations.gelu_backward,
                 (x,), {"approximate": approximate}, dy, TOL[dtype])


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtypes", [(np.float64, np.float32), (np.float32, np.float64)])
def test_gelu_backward_of_another_dtype_promotes_as_the_reference(dtypes, approximate):
    """A gradient dy of another dtype than the forward's x: dx has the reference's promoted dtype
    (float64 either way) and its values, to float32's tolerance (one operand is float32)."""
    x_dtype, dy_dtype = dtypes
    rng = np.random.default_rng(4)
    x = (2 * rng.standard_normal((3, 5))).astype(x_dtype)
    dy = rng.standard_normal((3, 5)).astype(dy_dtype)
    (dx_ref,) = ref_activations.gelu_backward(dy, ref_activations.gelu_forward(x, approximate=approximate)[1])
    (dx,) = cpu_activations.gelu_backward(dy, cpu_activations.gelu_forward(x, approximate=approximate)[1])
    assert dx.dtype == dx_ref.dtype == np.float64
    assert relative_error(dx, dx_ref) <= F32_TOL


def test_gelu_saturates_and_propagates_inf_and_nan_like_the_reference():
    x = np.array([-1e4, -30.0, -9.0, -0.75, 0.0, 9.0, 30.0, 1e4, np.inf, -np.inf, np.nan], dtype=np.float32)
    finite = np.isfinite(x)
    for approximate in ("tanh", "none"):
        with np.errstate(invalid="ignore", over="ignore"):
            y_ref, c_ref = ref_activations.gelu_forward(x, approximate=approximate)
            (dx_ref,) = ref_activations.gelu_backward(np.ones_like(x), c_ref)
        y, c = cpu_activations.gelu_forward(x, approximate=approximate)
        (dx,) = cpu_activations.gelu_backward(np.ones_like(x), c)
        # element by element, each on its own scale (one error ratio over the whole array would let
        # the ±1e4 entries hide an error of 0.1 in the saturated ±9, ±30)
        for got, want in ((y, y_ref), (dx, dx_ref)):
            scale = np.maximum(np.abs(want[finite]), 1)
            assert np.all(np.abs(got[finite] - want[finite]) <= F32_TOL * scale)
        saturated = finite & (np.abs(x) >= 9)
        np.testing.assert_array_equal(y[saturated & (x > 0)], x[saturated & (x > 0)])    # gelu(x) = x
        assert np.all(np.abs(y[saturated & (x < 0)]) <= 1e-25)        # 0, or a subnormal-sized remainder
        np.testing.assert_array_equal(y[~finite], y_ref[~finite])      # inf, nan (gelu(-inf) = -inf * 0)
        assert np.isnan(dx[-1]) and np.isnan(dx_ref[-1])


# --- cross-entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(lead=lead_shapes, V=st.integers(1, 70), label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
       ignore_index=st.sampled_from([-100, 0]), ignored=st.floats(0.0, 1.0), seed=seeds,
       non_contiguous=st.booleans())
def test_cross_entropy_equals_reference(dtype, lead, V, label_smoothing, ignore_index, ignored, seed,
                                        non_contiguous):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(lead + (V,)) * rng.uniform(0.1, 10)).astype(dtype)
    targets = rng.integers(0, V, lead)
    targets[rng.random(lead) < ignored] = ignore_index       # from none to all ignored
    if non_contiguous:
        logits = strided(logits)
    kwargs = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
    dloss = dtype(rng.uniform(0.5, 2.0))
    # A confident, right prediction makes the loss log(sum_j e^{z_j - max}) - (z_t - max) tiny, a
    # difference of terms of size ~1, and its gradient dloss/M (p - q) tiny beside p_t and q_t = 1:
    # float32 resolves both only to its rounding on those scales (and the reference's
    # log(1 + tiny) is the less accurate of the two tiers there), so they set the floors.
    M = max(1, int(np.sum(targets != ignore_index)))
    check_parity(ref_losses.cross_entropy_forward, ref_losses.cross_entropy_backward,
                 cpu_losses.cross_entropy_forward, cpu_losses.cross_entropy_backward,
                 (logits, targets), kwargs, dloss, TOL[dtype], floors=(1.0, float(dloss) / M))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_of_logits_far_apart_does_not_overflow(dtype, label_smoothing):
    """Each row's maximum logit, wherever it sits (first, middle, last entry), is subtracted before
    the exponentials: logits 1e3 apart, whose e^z overflows in either dtype, give the reference's
    finite loss and gradient (the draws above, at most ~40 apart, never reach the overflow)."""
    logits = np.array([[1000.0, 0.0, -1000.0, 10.0],       # the maximum first,
                       [0.0, 1000.0, -1000.0, 10.0],       # in the middle,
                       [-1000.0, 0.0, 10.0, 1000.0],       # last,
                       [999.0, 1000.0, 998.0, 1000.0]], dtype=dtype)   # and twice
    targets = np.array([0, 3, 2, 1])                       # right and wrong predictions: losses 0 to ~2000
    check_parity(ref_losses.cross_entropy_forward, ref_losses.cross_entropy_backward,
                 cpu_losses.cross_entropy_forward, cpu_losses.cross_entropy_backward,
                 (logits, targets), {"label_smoothing": label_smoothing}, dtype(1.0), TOL[dtype])


# --- embedding --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(lead=lead_shapes, V=st.integers(1, 12), C=st.integers(1, 40), seed=seeds, non_contiguous=st.booleans(),
       ids_dtype=st.sampled_from([np.int64, np.uint8, np.dtype(">u2"), np.dtype(">i8")]))
def test_embedding_backward_equals_reference(dtype, lead, V, C, seed, non_contiguous, ids_dtype):
    # the forward is the reference's (a NumPy gather), so only the backward has a kernel; ids may
    # be of any integer dtype, big-endian too (read with np.frombuffer from a file written elsewhere)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, lead).astype(ids_dtype)           # small V: repeated ids are common
    _, cache = ref_embedding.embedding_forward(ids, rng.standard_normal((V, C)).astype(dtype))
    dout = rng.standard_normal(lead + (C,)).astype(dtype)
    if non_contiguous:
        dout = strided(dout)
    none, dE = cpu_embedding.embedding_backward(dout, cache)
    none_ref, dE_ref = ref_embedding.embedding_backward(dout, cache)
    assert none is None and none_ref is None and dE.dtype == dE_ref.dtype
    # each column is added in the order of the positions, as xp.add.at does: equal bit for bit
    np.testing.assert_array_equal(dE, dE_ref)


# --- gradients of the numba backwards -----------------------------------------------------------

def tier(forward, backward):
    """An object with the op's forward and backward under their names, as a module has them."""
    op = forward.__name__.removesuffix("_forward")
    return SimpleNamespace(**{f"{op}_forward": forward, f"{op}_backward": backward})


# what the numba backend runs for each op with a kernel (the embedding's forward is the reference's)
NUMBA = {"layernorm": tier(cpu_layernorm.layernorm_forward, cpu_layernorm.layernorm_backward),
         "gelu": tier(cpu_activations.gelu_forward, cpu_activations.gelu_backward),
         "cross_entropy": tier(cpu_losses.cross_entropy_forward, cpu_losses.cross_entropy_backward),
         "embedding": tier(ref_embedding.embedding_forward, cpu_embedding.embedding_backward)}
REFERENCE = {"layernorm": ref_layernorm, "gelu": ref_activations, "cross_entropy": ref_losses,
             "embedding": ref_embedding}
GRAD_CASES = [(op, label, case) for op in NUMBA for label, case in CASES[op]]


@pytest.mark.parametrize("op, label, case", GRAD_CASES, ids=[f"{op}-{label}" if label else op
                                                             for op, label, _ in GRAD_CASES])
def test_numba_backward_equals_numerical_gradient(op, label, case):
    module = NUMBA[op]
    args, kwargs = case(np.random.default_rng(0), np.float64)
    report = gradcheck(getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward"), args, kwargs,
                       tol=DEFAULT_TOL)
    assert report.arguments and report.passed, str(report)


# --- thread count, dtypes the kernels do not compile for, bad input ------------------------------

@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more Numba threads")
def test_reductions_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((12, 64, 48)), rng.standard_normal((12, 64, 48))
    ids = rng.integers(0, 5, (12, 64))
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            _, c_ln = cpu_layernorm.layernorm_forward(x, np.ones(48), np.zeros(48))
            _, c_emb = ref_embedding.embedding_forward(ids, np.zeros((5, 48)))
            results.append(cpu_layernorm.layernorm_backward(dy, c_ln) + cpu_embedding.embedding_backward(dy, c_emb)[1:])
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_forcing_a_twin_gives_that_twin(kernel_twins):
    """The kernel_twins fixture (tests/conftest.py) runs every parity test on each twin by forcing
    it; if forcing gave the serial twin both times, the parallel twins would go untested unseen."""
    kernel = cpu_layernorm._forward_rows
    expected = kernel if kernel_twins == "parallel" else kernel.serial
    assert _parallel.pick(kernel, 0) is expected and _parallel.pick(kernel, 10 ** 9) is expected
    assert kernel.jit_options["parallel"] is True and "parallel" not in kernel.serial.jit_options


RACE_ROWS, RACE_REPEATS = 65536, 10     # B·T of a small run, and tries: a race must overlap two threads


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more Numba threads")
def test_parallel_reductions_have_no_race_at_training_sizes(kernel_twins):
    """The parallel twins of the embedding's scatter-add and layernorm's gamma/beta sums give each
    thread rows or columns of its own. At the parity tests' sizes a thread's share takes
    microseconds, so two threads writing one row would seldom overlap; at 65536 rows a race loses
    a large part of the gradient (measured: 30-55%), while the kernels as written give the same
    bits every time. The rows repeat 3 ids, so nearly every position adds into a shared row.
    Layernorm's dx is row-local, out of a race's reach, and is not compared: the two twins are
    compiled apart and may sum a row in other orders (``minilm.cpu._parallel``)."""
    if kernel_twins != "parallel":
        pytest.skip("the serial twins run on one thread")
    rng = np.random.default_rng(0)
    C = 128
    ids, dout = rng.integers(0, 3, RACE_ROWS), rng.standard_normal((RACE_ROWS, C))
    _, c_emb = ref_embedding.embedding_forward(ids, np.zeros((3, C)))
    dE_ref = ref_embedding.embedding_backward(dout, c_emb)[1]
    _, c_ln = cpu_layernorm.layernorm_forward(rng.standard_normal((RACE_ROWS, C)), 1 + rng.standard_normal(C),
                                              np.zeros(C))
    try:
        _parallel.force("serial")
        serial = cpu_layernorm.layernorm_backward(dout, c_ln)[1:]            # dgamma, dbeta
    finally:
        _parallel.force("parallel")                        # the fixture's twin again
    for _ in range(RACE_REPEATS):
        np.testing.assert_array_equal(cpu_embedding.embedding_backward(dout, c_emb)[1], dE_ref)
        for a, b in zip(cpu_layernorm.layernorm_backward(dout, c_ln)[1:], serial):
            np.testing.assert_array_equal(a, b)            # the blocks' sums, in one order on either twin


def test_layernorm_float32_sums_in_float64():
    """The kernel adds up a float32 row's mean and variance in float64; the reference sums in
    float32. At C = 4096 with a mean far from 0 the kernel must be at least as close to the
    float64 result as the reference is (measured: 8.3e-6 against 1.5e-5; a float32 sum in the
    kernel gives 3.2e-5). The parity tests draw C <= 40, where both sums are exact enough to agree."""
    x = (100 + 0.1 * np.random.default_rng(0).standard_normal((64, 4096))).astype(np.float32)
    gamma, beta = np.ones(4096, np.float32), np.zeros(4096, np.float32)
    truth = ref_layernorm.layernorm_forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))[0]
    y = cpu_layernorm.layernorm_forward(x, gamma, beta)[0]            # the twin the module's fixture forces
    y_ref = ref_layernorm.layernorm_forward(x, gamma, beta)[0]
    assert relative_error(y, truth) <= relative_error(y_ref, truth)


@pytest.mark.parametrize("op", list(NUMBA))
def test_float16_runs_the_reference(op):
    args, kwargs = CASES[op][0][1](np.random.default_rng(0), np.float16)
    out, cache = getattr(NUMBA[op], f"{op}_forward")(*args, **kwargs)
    out_ref, cache_ref = getattr(REFERENCE[op], f"{op}_forward")(*args, **kwargs)
    np.testing.assert_array_equal(out, out_ref)
    assert out.dtype == np.float16
    grads = getattr(NUMBA[op], f"{op}_backward")(np.ones_like(out), cache)
    grads_ref = getattr(REFERENCE[op], f"{op}_backward")(np.ones_like(out), cache_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None and g_ref is None) or (g.dtype == np.float16 and np.array_equal(g, g_ref))


def _bad_calls():
    x, ids = np.ones((2, 4)), np.array([[0, 1], [2, 3]])
    return [
        ("layernorm", lambda m: m.layernorm_forward(x, np.ones(3), np.zeros(4))),
        ("layernorm", lambda m: m.layernorm_forward(x, np.ones(4, np.float32), np.zeros(4))),
        ("layernorm", lambda m: m.layernorm_forward(x, np.ones(4), np.zeros(4), eps=0)),
        ("layernorm", lambda m: m.layernorm_forward(x[:, :0], np.ones(0), np.zeros(0))),
        ("layernorm", lambda m: m.layernorm_backward(np.ones(3), m.layernorm_forward(x, np.ones(4), np.zeros(4))[1])),
        ("gelu", lambda m: m.gelu_forward(ids)),
        ("gelu", lambda m: m.gelu_forward(x, approximate="sigmoid")),
        ("gelu", lambda m: m.gelu_backward(np.ones(3), m.gelu_forward(x)[1])),
        ("cross_entropy", lambda m: m.cross_entropy_forward(x, np.array([0, 4]))),
        ("cross_entropy", lambda m: m.cross_entropy_forward(x[:, :0], np.array([0, 1]))),
        ("cross_entropy", lambda m: m.cross_entropy_forward(x, np.array([0.0, 1.0]))),
        ("cross_entropy", lambda m: m.cross_entropy_forward(x, np.array([0, 1, 2]))),
        ("cross_entropy", lambda m: m.cross_entropy_forward(x, np.array([0, 1]), label_smoothing=1.5)),
        ("cross_entropy", lambda m: m.cross_entropy_forward(x, np.array([0, 1]), ignore_index=None)),
        ("cross_entropy", lambda m: m.cross_entropy_backward(np.ones(2),
                                                             m.cross_entropy_forward(x, np.array([0, 1]))[1])),
        ("embedding", lambda m: m.embedding_backward(np.ones((2, 2, 3)), m.embedding_forward(ids, np.ones((4, 2)))[1])),
    ]


@pytest.mark.parametrize("k", range(len(_bad_calls())))
def test_bad_input_gives_the_reference_error(k):
    op, call = _bad_calls()[k]
    with pytest.raises((TypeError, ValueError)) as expected:
        call(REFERENCE[op])
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        call(NUMBA[op])


# --- routing ----------------------------------------------------------------------------------

def test_numba_backend_routes_to_the_kernels():
    minilm.use("numba")
    for op, module in NUMBA.items():
        for way in ("forward", "backward"):
            assert getattr(ops, f"{op}_{way}") is getattr(module, f"{op}_{way}")
    for name in ("sgd_update", "adamw_update", "rmsprop_update"):
        assert backend.kernel(name, getattr(optim, name)) is getattr(cpu_optim, name)
    minilm.use("numpy")
    assert ops.layernorm_forward is ref_layernorm.layernorm_forward
    assert backend.kernel("adamw_update", optim.adamw_update) is optim.adamw_update


# --- optimizers -------------------------------------------------------------------------------

UPDATES = {
    "adamw": lambda m, p, g, b1, b2, mask, step: m.adamw_update(
        p, g, b1, b2, lr=1e-3 * step, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_mask=mask, step=step),
    "adamw-all": lambda m, p, g, b1, b2, mask, step: m.adamw_update(
        p, g, b1, b2, lr=1e-3, beta1=0.8, beta2=0.999, eps=1e-6, weight_decay=0.05, decay_mask=None, step=step),
    "adam": lambda m, p, g, b1, b2, mask, step: m.adamw_update(
        p, g, b1, b2, lr=2e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, decay_mask=mask, step=step),
    "sgd": lambda m, p, g, b1, b2, mask, step: m.sgd_update(
        p, g, None, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0),
    "sgd-decay": lambda m, p, g, b1, b2, mask, step: m.sgd_update(        # weight decay without momentum
        p, g, None, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.01),
    "sgd-momentum": lambda m, p, g, b1, b2, mask, step: m.sgd_update(
        p, g, b1, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.01),
    "sgd-nesterov": lambda m, p, g, b1, b2, mask, step: m.sgd_update(
        p, g, b1, lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.0),
    "sgd-nesterov-decay": lambda m, p, g, b1, b2, mask, step: m.sgd_update(
        p, g, b1, lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01),
    "rmsprop": lambda m, p, g, b1, b2, mask, step: m.rmsprop_update(
        p, g, b1, None, lr=0.01, alpha=0.99, eps=1e-8, momentum=0.0),
    "rmsprop-momentum": lambda m, p, g, b1, b2, mask, step: m.rmsprop_update(
        p, g, b1, b2, lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(UPDATES))
def test_optimizer_kernels_equal_the_reference_bit_for_bit(name, dtype):
    # the kernels perform the reference's operations in the same order and dtype, and every one of
    # them (*, /, +, -, sqrt) is correctly rounded: the results are identical, not merely close
    rng = np.random.default_rng(0)
    N = 1003
    p0 = rng.standard_normal(N).astype(dtype)
    mask = (rng.random(N) < 0.7).astype(dtype)
    grads = [rng.standard_normal(N).astype(dtype) for _ in range(5)]
    results = []
    for module in (optim, cpu_optim):
        p, b1, b2 = p0.copy(), np.zeros(N, dtype), np.zeros(N, dtype)
        for step, g in enumerate(grads, start=1):
            g_before = g.copy()
            UPDATES[name](module, p, g, b1, b2, mask, step)
            np.testing.assert_array_equal(g, g_before)           # the gradient is read, never written
        results.append((p, b1, b2))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# --- whole models -----------------------------------------------------------------------------

def train_losses(backend_name, make_model, n_steps=3):
    """Losses of ``n_steps`` AdamW steps with dropout and clipping, on ``backend_name``."""
    minilm.use(backend_name)
    model = make_model()
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    opt = optim.AdamW(model.params, lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(n_steps):
        idx, targets = rng.integers(0, V, (3, 7)), rng.integers(0, V, (3, 7))
        targets[0, 0] = -100                                       # one ignored target
        out = model.forward(idx, targets, train=True, rng=step)
        losses.append(float(out[1]))
        model.backward()
        optim.clip_grad_norm(model.params, 1.0)
        opt.step()
    return np.array(losses), model.params.data.copy()


MODELS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1),
                       dtype=np.float64, seed=0),
    "lstm": lambda: RNNLM(RNNConfig(vocab_size=13, cell="lstm", n_layer=2, hidden_size=12, n_embd=8, dropout=0.1),
                          dtype=np.float64, seed=0),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_training_gives_the_same_losses_on_numba_and_numpy(model):
    losses_ref, params_ref = train_losses("numpy", MODELS[model])
    losses_cpu, params_cpu = train_losses("numba", MODELS[model])
    assert relative_error(losses_cpu, losses_ref) <= MODEL_TOL, (losses_cpu, losses_ref)
    assert relative_error(params_cpu, params_ref) <= MODEL_TOL


def test_optimizer_classes_use_the_kernels_on_numba():
    results = []
    for name in ("numpy", "numba"):
        minilm.use(name)
        params = Params([("W", (4, 3)), ("b", (3,))], dtype=np.float32)
        params.data[...] = np.random.default_rng(0).standard_normal(params.size)
        opts = [optim.AdamW(params, lr=1e-2, weight_decay=0.1), optim.SGD(params, lr=0.1, momentum=0.9),
                optim.RMSprop(params, lr=1e-2, momentum=0.5)]
        for step in range(3):
            params.grad[...] = np.random.default_rng(step).standard_normal(params.size)
            opts[step].step()
        results.append(params.data.copy())
    np.testing.assert_array_equal(*results)


def test_force_takes_only_a_twin_or_none():
    with pytest.raises(ValueError, match=r"^force: argument 'twin' must be None, 'serial' or 'parallel', got 'both'$"):
        _parallel.force("both")
