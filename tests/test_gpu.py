"""The CuPy tier on a GPU: parity with the reference, gradients, mixed precision, moving checkpoints.

Skipped, with the reason, where CuPy or a GPU is missing (CI has neither); ``gpu/run.sh`` runs
these on a machine with a GPU. What is checked:

* every op of the ``cupy`` backend (CuPy kernels where ``minilm.gpu`` has one, the reference on
  CuPy arrays elsewhere) equals the reference on NumPy, forward and backward, to ``F64_TOL`` in
  float64 and ``F32_TOL`` in float32, and passes ``minilm.gradcheck`` in float64;
* in float16 and bfloat16 the kernels stay within ``LOW_TOL`` of the float64 reference;
* the optimizer kernels equal the reference updates; whole models train to the same losses on
  ``cupy`` and ``numpy``; mixed-precision training lowers the loss like float32 does;
* a checkpoint trained on the GPU evaluates and samples on the CPU, and back;
* a GPT's training step captured as a CUDA graph (``minilm.gpu.graph``) computes the step run op
  by op, checks its ids, and resumes exactly.
"""
import json

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="the cupy backend needs CuPy (pip install -e '.[gpu]' in minilm's checkout)")
try:
    _GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _GPUS = 0
if _GPUS == 0:
    pytest.skip("the cupy backend needs an NVIDIA GPU; none was found", allow_module_level=True)

import minilm  # noqa: E402
from minilm import backend, ops, optim  # noqa: E402
from minilm.gpu import _core  # noqa: E402
from minilm.gradcheck import DEFAULT_TOL, gradcheck  # noqa: E402
from minilm.models.gpt import GPT, GPTConfig  # noqa: E402
from minilm.models.rnnlm import RNNLM, RNNConfig  # noqa: E402
from minilm.opcases import CASES  # noqa: E402
from minilm.precision import LossScaler  # noqa: E402
from minilm.testing import relative_error  # noqa: E402
from minilm.train import apply_gradients  # noqa: E402

# float64: the kernels sum rows in other orders than NumPy (warp shuffles instead of pairwise
# sums) and cuBLAS splits its products differently: a few ulps of the largest term, ~1e-15;
# DESIGN's bound for the GPU is 1e-10.
F64_TOL = 1e-10
# float32: DESIGN's bound; the same reordering in float32 gives ~1e-6 at worst.
F32_TOL = 1e-5
# 16-bit data, computed in float32 inside the kernels but stored (and multiplied by cuBLAS) in
# 16 bits: each stored value is off by up to half a unit in the last place (2^-9 for bfloat16's
# 8 significant bits, 2^-12 for float16's 11), and a backward chains three or four such roundings
# (the input, the cached activations, the output). Eight units of roundoff bound that with room.
LOW_TOL = {"float16": 8 * 2.0 ** -11, "bfloat16": 8 * 2.0 ** -8}
# one float32 product or quotient against another grouping of it: an ulp or two (ulp 1.2e-7)
ONE_ROUNDING_F32 = 1e-6
TOL = {np.float64: F64_TOL, np.float32: F32_TOL}

# ops whose math has no randomness: compared with the reference value by value (this tier's
# dropout masks come from its own random stream; see test_attention_dropout_follows_its_mask)
PARITY_CASES = [(op, label, case) for op, cases in CASES.items() if op != "dropout"
                for label, case in cases if label != "dropout"]
GRAD_CASES = [(op, label, case) for op, cases in CASES.items() for label, case in cases]
IDS = [f"{op}-{label}" if label else op for op, label, _ in PARITY_CASES]


def to_gpu(a):
    return cupy.asarray(a) if isinstance(a, np.ndarray) else a


def run_op(name, op, args, kwargs, dout_seed=1):
    """Forward and backward of ``op`` on the backend ``name``; returns NumPy arrays."""
    minilm.use(name)
    move = to_gpu if name == "cupy" else (lambda a: a)
    out, cache = backend.op(f"{op}_forward")(*[move(a) for a in args],
                                             **{k: move(v) for k, v in kwargs.items()})
    dout = np.random.default_rng(dout_seed).standard_normal(np.shape(out)).astype(np.asarray(backend.to_numpy(out)).dtype)
    grads = backend.op(f"{op}_backward")(move(dout), cache)
    return backend.to_numpy(out), [None if g is None else backend.to_numpy(g) for g in grads]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("op, label, case", PARITY_CASES, ids=IDS)
def test_every_op_equals_the_reference(op, label, case, dtype):
    args, kwargs = case(np.random.default_rng(0), dtype)
    out_ref, grads_ref = run_op("numpy", op, args, kwargs)
    out_gpu, grads_gpu = run_op("cupy", op, args, kwargs)
    tol = TOL[dtype]
    assert relative_error(out_gpu, out_ref, floor=1.0) <= tol
    for i, (g, r) in enumerate(zip(grads_gpu, grads_ref)):
        assert (g is None) == (r is None), f"gradient {i}"
        if r is not None:
            assert g.shape == r.shape and g.dtype == r.dtype, f"gradient {i}"
            assert relative_error(g, r, floor=1.0) <= tol, f"gradient {i}"


@pytest.mark.parametrize("op, label, case", GRAD_CASES, ids=[f"{op}-{label}" if label else op for op, label, _ in GRAD_CASES])
def test_every_backward_equals_the_numerical_gradient(op, label, case):
    minilm.use("cupy")
    args, kwargs = case(np.random.default_rng(0), np.float64)
    report = gradcheck(backend.op(f"{op}_forward"), backend.op(f"{op}_backward"),
                       [to_gpu(a) for a in args], {k: to_gpu(v) for k, v in kwargs.items()}, tol=DEFAULT_TOL)
    assert report.arguments and report.passed, str(report)


# Rows wider than a warp and not a multiple of 32, so that the lanes of the row kernels (one warp a
# row, striding by 32) take a second pass and some a third, as the presets' rows need (C = 128,
# V = 65); the op cases' rows are at most 16 wide.
def _wide_layernorm(rng, dtype):
    C = 67
    return (rng.standard_normal((3, 7, C)).astype(dtype), (1 + 0.1 * rng.standard_normal(C)).astype(dtype),
            (0.1 * rng.standard_normal(C)).astype(dtype)), {}


def _wide_softmax(rng, dtype):
    return ((3 * rng.standard_normal((5, 100))).astype(dtype),), {}


def _wide_cross_entropy(rng, dtype):
    logits = (2 * rng.standard_normal((4, 9, 65))).astype(dtype)
    targets = np.where(rng.random((4, 9)) < 0.2, -100, rng.integers(0, 65, (4, 9)))     # some ignored
    return (logits, targets), {"label_smoothing": 0.1}


WIDE = {"layernorm": _wide_layernorm, "softmax": _wide_softmax, "cross_entropy": _wide_cross_entropy}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("op", list(WIDE))
def test_row_kernels_equal_the_reference_on_rows_wider_than_a_warp(op, dtype):
    args, kwargs = WIDE[op](np.random.default_rng(0), dtype)
    out_ref, grads_ref = run_op("numpy", op, args, kwargs)
    out_gpu, grads_gpu = run_op("cupy", op, args, kwargs)
    assert relative_error(out_gpu, out_ref, floor=1.0) <= TOL[dtype]
    for i, (g, r) in enumerate(zip(grads_gpu, grads_ref)):
        assert (g is None) == (r is None), f"gradient {i}"
        if r is not None:
            assert g.shape == r.shape and g.dtype == r.dtype, f"gradient {i}"
            assert relative_error(g, r, floor=1.0) <= TOL[dtype], f"gradient {i}"


LOW_OPS = ["layernorm", "gelu", "softmax", "attention", "self_attention", "ffn", "linear", "cross_entropy", "lstm", "gru", "rnn"]


@pytest.mark.parametrize("low", list(LOW_TOL))
@pytest.mark.parametrize("op", LOW_OPS)
def test_low_precision_stays_near_float64(op, low):
    label, case = CASES[op][0]
    args, kwargs = case(np.random.default_rng(0), np.float64)
    out_ref, grads_ref = run_op("numpy", op, args, kwargs)
    dtype = _core.BFLOAT16 if low == "bfloat16" else np.dtype(np.float16)
    low_args = [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args]
    minilm.use("cupy")
    out, cache = backend.op(f"{op}_forward")(*[to_gpu(a) for a in low_args], **kwargs)
    dout = np.random.default_rng(1).standard_normal(np.shape(out_ref))
    grads = backend.op(f"{op}_backward")(cupy.asarray(dout.astype(dtype) if np.ndim(out_ref) else dout), cache)
    tol = LOW_TOL[low]
    assert relative_error(backend.to_numpy(out).astype(np.float64), out_ref, floor=1.0) <= tol
    for g, r in zip(grads, grads_ref):
        if r is not None:
            assert g.dtype == dtype
            assert relative_error(backend.to_numpy(g).astype(np.float64), r, floor=1.0) <= tol


@pytest.mark.parametrize("split", [False, True], ids=["one-product", "causal-split"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_attention_dropout_follows_its_mask(dtype, split, monkeypatch):
    """y = (mask A / (1 - p)) v with the cache's mask and weights; the mask is the one this tier's
    dropout draws for the same seed; the backward equals the reference's backward run on the same
    cache (in float64, from the cache's own values). ``causal-split``: every product as the two
    calls that leave out the masked block (at T = 9: the queries 0..3 against the keys 0..3)."""
    from minilm.gpu import attention as gpu_attention
    from minilm.reference import attention as ref_attention
    from minilm.reference.attention import AttentionCache
    from minilm.reference.dropout import DropoutCache
    minilm.use("cupy")
    monkeypatch.setattr(gpu_attention, "CAUSAL_SPLIT_MIN_T", 2 if split else 10 ** 9)
    dt = _core.BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    assert gpu_attention._causal_half(9, 9, True, dt) == (4 if split else 0)
    rng = np.random.default_rng(3)
    q, k, v = (cupy.asarray(rng.standard_normal((2, 3, 9, 8)).astype(dt)) for _ in range(3))
    y, cache = ops.attention_forward(q, k, v, causal=True, dropout=0.25, rng=11)
    mask, att = cache.drop.mask, cache.att
    assert 0.6 < float(mask[att > 0].mean()) < 0.9                     # about 3/4 of the weights kept
    assert bool(cupy.array_equal(mask, ops.dropout_forward(att, p=0.25, rng=11)[1].mask))
    expected = cupy.matmul(mask * att / 0.75, v.astype(att.dtype))
    tol = {"float64": F64_TOL, "float32": F32_TOL, "bfloat16": LOW_TOL["bfloat16"]}[dtype]
    assert relative_error(backend.to_numpy(y).astype(np.float64), backend.to_numpy(expected), floor=1.0) <= tol
    dy = cupy.asarray(rng.standard_normal(y.shape).astype(dt))
    grads = ops.attention_backward(dy, cache)
    wide = [a.astype(cupy.float64) for a in (dy, q, k, v, att)]
    ref = ref_attention.attention_backward(wide[0], AttentionCache(*wide[1:], DropoutCache(mask, 1 / 0.75, att.shape)))
    for g, r in zip(grads, ref):
        assert g.dtype == dt
        assert relative_error(backend.to_numpy(g).astype(np.float64), backend.to_numpy(r), floor=1.0) <= tol


def test_self_attention_with_dropout_matches_its_attention():
    """The cupy self-attention (heads split by one copy, gradients gathered by one) equals the
    reference composition run with this tier's attention, dropout included, forward and backward."""
    from minilm.gpu import attention as gpu_attention
    from minilm.reference import attention as ref_attention
    minilm.use("cupy")
    rng = np.random.default_rng(5)
    B, T, C, NH = 2, 7, 12, 3
    x = cupy.asarray(rng.standard_normal((B, T, C)))
    W_qkv, W_o = (cupy.asarray(0.3 * rng.standard_normal(s)) for s in ((C, 3 * C), (C, C)))
    b_qkv, b_o = (cupy.asarray(rng.standard_normal(s)) for s in ((3 * C,), (C,)))
    y, cache = gpu_attention.self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_head=NH, dropout=0.3, rng=4)
    y_ref, cache_ref = ref_attention.self_attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_head=NH, dropout=0.3, rng=4,
                                                            attention_forward=gpu_attention.attention_forward)
    assert relative_error(backend.to_numpy(y), backend.to_numpy(y_ref), floor=1.0) <= F64_TOL
    dy = cupy.asarray(rng.standard_normal(y.shape))
    grads = gpu_attention.self_attention_backward(dy, cache)
    grads_ref = ref_attention.self_attention_backward(dy, cache_ref, attention_backward=ref_attention.attention_backward)
    for g, r in zip(grads, grads_ref):
        assert relative_error(backend.to_numpy(g), backend.to_numpy(r), floor=1.0) <= F64_TOL


def test_split_causal_attention_of_head_views_equals_the_reference():
    """At T = 130 the products are split (T >= CAUSAL_SPLIT_MIN_T); q, k, v are transposed views
    of (B, T, NH, hs) arrays, as heads split from a layer's output are: the products copy them and
    write C-ordered gradients, and everything equals the reference on NumPy."""
    from minilm.gpu import attention as gpu_attention
    from minilm.reference import attention as ref_attention
    minilm.use("cupy")
    rng = np.random.default_rng(0)
    q, k, v = (cupy.asarray(rng.standard_normal((2, 130, 3, 8))).transpose(0, 2, 1, 3) for _ in range(3))
    assert gpu_attention._causal_half(130, 130, True, q.dtype) == 65
    y, cache = gpu_attention.attention_forward(q, k, v, causal=True)
    dy = cupy.asarray(rng.standard_normal(y.shape))
    grads = gpu_attention.attention_backward(dy, cache)
    y_ref, cache_ref = ref_attention.attention_forward(*(a.get() for a in (q, k, v)), causal=True)
    for got, want in zip((y,) + tuple(grads), (y_ref,) + tuple(ref_attention.attention_backward(dy.get(), cache_ref))):
        assert relative_error(got.get(), want) <= F64_TOL


def test_cupy_backend_routes_to_the_kernels():
    minilm.use("cupy")
    for name in ("layernorm_forward", "gelu_backward", "softmax_forward", "attention_forward", "linear_forward",
                 "cross_entropy_backward", "dropout_forward", "embedding_backward", "lstm_forward", "gru_backward"):
        assert backend.op(name).__module__.startswith("minilm.gpu."), name
    assert backend.kernel("adamw_update", None).__module__ == "minilm.gpu.optim"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_kernel_takes_a_minus_inf_logit_without_smoothing(dtype):
    # as the reference and numba tiers (tests/test_losses.py): a class of logit -inf has probability
    # 0 and, without smoothing, enters no loss term; eps * mean(-log p) would be 0 * inf = NaN
    from minilm.gpu import losses
    from minilm.reference import losses as reference
    logits = np.array([[1.0, -np.inf, 0.5], [0.0, 2.0, -np.inf]], dtype=dtype)
    targets = np.array([0, 1])
    loss, cache = losses.cross_entropy_forward(cupy.asarray(logits), cupy.asarray(targets))
    assert isinstance(cache, losses.FusedCrossEntropyCache)                     # the kernel ran
    want, want_cache = reference.cross_entropy_forward(logits, targets)
    assert relative_error(float(loss), float(want)) <= TOL[dtype]
    dlogits, _ = losses.cross_entropy_backward(1.0, cache)
    want_dlogits, _ = reference.cross_entropy_backward(1.0, want_cache)
    assert relative_error(dlogits.get(), want_dlogits) <= TOL[dtype]
    smoothed, _ = losses.cross_entropy_forward(cupy.asarray(logits), cupy.asarray(targets), label_smoothing=0.1)
    assert float(smoothed) == np.inf                                             # as PyTorch


def test_cross_entropy_kernel_refuses_a_dloss_that_is_not_a_number():
    from minilm.gpu import losses
    _, cache = losses.cross_entropy_forward(cupy.ones((2, 3)), cupy.asarray([0, 1]))
    for bad in (None, "2", True):                          # would have become NaN, 2.0 or 1.0 silently
        with pytest.raises(TypeError, match=r"cross_entropy_backward: argument 'dloss' must be a real number"):
            losses.cross_entropy_backward(bad, cache)
    with pytest.raises(ValueError, match=r"cross_entropy_backward: argument 'dloss' must have shape \(\)"):
        losses.cross_entropy_backward(cupy.ones(2), cache)


def test_dropout_keeps_one_minus_p_scales_and_repeats():
    minilm.use("cupy")
    x = cupy.ones((256, 1024), dtype=cupy.float32)
    p = 0.2
    y, cache = ops.dropout_forward(x, p=p, rng=7)
    kept = float(cache.mask.mean())
    # 262,144 Bernoulli(0.8) draws: the standard deviation of the fraction is 0.0008; 6 of them
    assert abs(kept - (1 - p)) < 0.005
    assert bool(cupy.all((y == 0) | (cupy.abs(y - 1 / (1 - p)) < ONE_ROUNDING_F32)))
    y2, _ = ops.dropout_forward(x, p=p, rng=7)
    assert bool(cupy.array_equal(y, y2))                              # same seed, same mask
    y3, _ = ops.dropout_forward(x, p=p, rng=8)
    assert not bool(cupy.array_equal(y, y3))
    dy = cupy.asarray(np.random.default_rng(0).standard_normal(x.shape).astype(np.float32))
    dx, = ops.dropout_backward(dy, cache)
    assert bool(cupy.allclose(dx, dy * cache.mask / (1 - p), rtol=ONE_ROUNDING_F32, atol=0))
    # neighbouring elements are independent: the mask is not periodic or striped
    m = cache.mask.astype(cupy.float32)
    corr = float(cupy.mean((m[:, 1:] - 0.8) * (m[:, :-1] - 0.8))) / 0.16
    assert abs(corr) < 0.01


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_optimizer_kernels_equal_the_reference(name, dtype):
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal(50).astype(dtype), [rng.standard_normal(50).astype(dtype) for _ in range(4)]
    mask = (rng.random(50) < 0.5).astype(dtype)
    results = []
    for where in ("numpy", "cupy"):
        minilm.use(where)
        xp = backend.xp()
        p = xp.asarray(p0.copy())
        bufs = [xp.zeros_like(p), xp.zeros_like(p)]
        for step, g in enumerate(grads, start=1):
            g = xp.asarray(g)
            if name == "sgd":
                update = backend.kernel("sgd_update", optim.sgd_update)
                update(p, g, bufs[0], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
            elif name == "adamw":
                update = backend.kernel("adamw_update", optim.adamw_update)
                update(p, g, bufs[0], bufs[1], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                       decay_mask=xp.asarray(mask), step=step)
            else:
                update = backend.kernel("rmsprop_update", optim.rmsprop_update)
                update(p, g, bufs[0], bufs[1], lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.5)
        results.append(backend.to_numpy(p))
    # the same operations in the same order; the GPU's sqrt and division are correctly rounded too,
    # but its compiler may fuse a multiply and an add: a few ulps
    assert relative_error(results[1], results[0]) <= (1e-14 if dtype == np.float64 else 1e-6)


def tiny_gpt(dtype=np.float64, dropout=0.0):
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=dropout),
               dtype=dtype, seed=0)


def tiny_lstm(dtype=np.float64):
    return RNNLM(RNNConfig(vocab_size=13, cell="lstm", n_layer=2, hidden_size=12, n_embd=8), dtype=dtype, seed=0)


def train_losses(name, make, steps=6, dtype=np.float64, one_batch=False):
    """Losses of ``steps`` AdamW steps on fresh random batches, or on one batch (which it can learn)."""
    minilm.use(name)
    model = make(dtype)
    opt = optim.AdamW(model.params, 1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    scaler = LossScaler(enabled=np.dtype(dtype) == np.float16)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 13, (2, 3, 8))
    losses = []
    for _ in range(steps):
        if not one_batch:
            batch = rng.integers(0, 13, (2, 3, 8))
        x, y = backend.to_backend(batch[0]), backend.to_backend(batch[1])
        out = model.forward(x, y, train=True, rng=rng)
        losses.append(float(out[1]))
        model.backward(scaler.scale)
        apply_gradients(model, opt, 1e-2, grad_clip=1.0, scaler=scaler)
    return np.array(losses), backend.to_numpy(model.params.data)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_lstm], ids=["gpt", "lstm"])
def test_training_gives_the_same_losses_on_cupy_and_numpy(make):
    losses_ref, params_ref = train_losses("numpy", make)
    losses_gpu, params_gpu = train_losses("cupy", make)
    assert relative_error(losses_gpu, losses_ref) <= F64_TOL
    assert relative_error(params_gpu, params_ref) <= F64_TOL


def graph_run(dtype, cuda_graph, steps=5):
    """``steps`` training steps of a GPT with dropout through ``minilm.train.TrainStep``."""
    from minilm.train import TrainStep
    minilm.use("cupy")
    model = tiny_gpt(dtype, dropout=0.2)
    # SGD, not Adam: Adam divides each step by the gradient's running size, which turns a rounding
    # difference of a near-zero gradient into a visible one; the optimizer is outside the graph anyway
    opt = optim.SGD(model.params, 0.1, momentum=0.9)
    step = TrainStep(model, model, opt, LossScaler(enabled=False), grad_clip=1.0, cuda_graph=cuda_graph)
    batches = np.random.default_rng(0).integers(0, 13, (steps, 2, 3, 8))
    rng = np.random.default_rng(1)
    losses = [float(step(x, y, 0.1, rng=rng)[0]) for x, y in batches]
    return np.array(losses), backend.to_numpy(model.params.data), rng.bit_generator.state, step


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_a_captured_step_computes_the_step_op_by_op(dtype):
    """The CUDA graph (captured at step 2, replayed at 3 to 5) gives the losses and weights of the
    step run op by op, dropout masks included, and draws the same seeds from the rng."""
    dt = _core.BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    losses_g, params_g, rng_g, step_g = graph_run(dt, True)
    losses_o, params_o, rng_o, step_o = graph_run(dt, False)
    assert step_o.captured is None and len(step_g.captured._captured) == 1
    assert step_g.captured.pool_bytes() > 0                            # the graph's memory, outside CuPy's pool
    assert step_g.captured._captured[((3, 8), "<i8", "<i8")].seeds.used == 1 + 3 * 2   # embedding, 3 a layer
    assert rng_g == rng_o
    # the same kernels on the same values; only the embedding backward's atomic adds may sum in
    # another order, a rounding of the dtype (and its 16-bit weights may then round the other way)
    tol = LOW_TOL["bfloat16"] if dtype == "bfloat16" else TOL[dt.type]
    assert relative_error(losses_g, losses_o) <= tol
    assert relative_error(params_g, params_o) <= tol
    assert len(set(losses_g.round(6))) == len(losses_g)              # fresh batches and masks each step


def test_a_captured_step_checks_its_ids_on_the_host():
    from minilm.train import TrainStep
    minilm.use("cupy")
    model = tiny_gpt(np.float32, dropout=0.2)
    step = TrainStep(model, model, optim.AdamW(model.params, 1e-2), LossScaler(enabled=False), grad_clip=1.0)
    x = np.random.default_rng(0).integers(0, 13, (3, 8))
    for _ in range(3):
        step(x, x, 1e-2, rng=np.random.default_rng(0))
    assert len(step.captured._captured) == 1                          # the ids below reach the graph's check
    bad = x.copy()
    bad[1, 2] = 13
    with pytest.raises(ValueError, match=r"GPT.forward: argument 'idx' must hold ids in \[0, 13\).*got 13"):
        step(bad, x, 1e-2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"argument 'targets' must hold ids in \[0, 13\).*got 13"):
        step(x, bad, 1e-2, rng=np.random.default_rng(0))


@pytest.mark.parametrize("low", list(LOW_TOL))
@pytest.mark.parametrize("make", [tiny_gpt, tiny_lstm], ids=["gpt", "lstm"])
def test_mixed_precision_trains_like_float32(make, low):
    dtype = _core.BFLOAT16 if low == "bfloat16" else np.dtype(np.float16)
    losses32, _ = train_losses("cupy", make, steps=40, dtype=np.float32, one_batch=True)
    losses16, params16 = train_losses("cupy", make, steps=40, dtype=dtype, one_batch=True)
    assert params16.dtype == np.float32                               # the master weights
    assert losses16[-5:].mean() < 0.75 * losses16[:5].mean()         # it learns the batch (the LSTM slowest: ~0.6)
    # the same run to 16-bit rounding: the curves stay within a few percent of each other
    assert abs(losses16[-5:].mean() - losses32[-5:].mean()) <= 0.05 * losses32[-5:].mean() + 0.02


def test_float16_overflow_skips_the_step_and_lowers_the_scale():
    minilm.use("cupy")
    model = tiny_gpt(np.float16)
    opt = optim.AdamW(model.params, 1e-2)
    scaler = LossScaler(enabled=True, init_scale=2.0 ** 40)          # far too large: the gradients overflow
    before = model.params.data.copy()
    x = backend.to_backend(np.random.default_rng(0).integers(0, 13, (3, 8)))
    model.forward(x, x, train=True)
    model.backward(scaler.scale)
    assert not apply_gradients(model, opt, 1e-2, grad_clip=1.0, scaler=scaler)
    assert scaler.scale == 2.0 ** 39 and scaler.skipped == 1
    assert bool(cupy.array_equal(model.params.data, before))         # nothing was updated


def test_a_resumed_run_on_the_gpu_computes_the_same_losses(tmp_path):
    """minilm train on cupy (its steps replayed as a CUDA graph), stopped at 6 and resumed to 12,
    gives the losses of the run straight to 12: the graph draws dropout seeds as the ops do."""
    from minilm.config import TrainConfig
    from minilm.train import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    minilm.use("cupy")

    def run(out, max_iters, resume=False):
        cfg = TrainConfig(model="gpt", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, dropout=0.2,
                          max_iters=max_iters, lr_decay_iters=12, eval_interval=4, eval_iters=2, warmup_iters=2)
        train(cfg, data=str(corpus), out_dir=str(tmp_path / out), resume=resume, progress=False, log=lambda *a: None)
        return {r["iter"]: r["val_loss"] for r in map(json.loads, open(tmp_path / out / "metrics.jsonl"))}

    straight = run("straight", 12)
    run("split", 6)
    split = run("split", 12, resume=True)
    for it in (4, 8, 12):
        # the embedding backward's atomic adds may sum in another order: float32 rounding
        assert abs(split[it] - straight[it]) <= F32_TOL * straight[it], it


@pytest.mark.parametrize("trained_on, dtype", [("cupy", "bfloat16"), ("cupy", "float32"), ("numba", "float32")])
def test_a_checkpoint_moves_between_the_gpu_and_the_cpu(tmp_path, trained_on, dtype):
    from minilm.config import TrainConfig
    from minilm.data import split
    from minilm.evaluate import evaluate, load_model
    from minilm.sample import generate
    from minilm.train import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    cfg = TrainConfig(model="gpt", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=20,
                      eval_interval=10, eval_iters=2, warmup_iters=2, dtype=dtype)
    minilm.use(trained_on)
    train(cfg, data=str(corpus), out_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    path = str(tmp_path / "run" / "last.npz")
    results = {}
    for where in ("cupy", "numba"):
        minilm.use(where)
        model, tok, meta = load_model(path)
        assert model.params.data.dtype == np.float32                  # the float32 master weights were saved
        ids = tok.encode(corpus.read_text(encoding="utf-8"))
        results[where] = (evaluate(model, split(ids, 0.9)[1], block_size=16, batch_size=4)["loss"],
                          list(generate(model, tok.encode("to "), 12, temperature=0, seed=0)))
    # float32 on both sides: the losses agree to float32 rounding, and greedy decoding picks the same tokens
    assert abs(results["cupy"][0] - results["numba"][0]) <= F32_TOL * results["numba"][0]
    assert results["cupy"][1] == results["numba"][1]
