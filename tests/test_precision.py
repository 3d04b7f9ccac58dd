"""Mixed precision's bookkeeping, on the CPU: master weights, the compute copy, loss scaling.

The GPU runs float16 and bfloat16 (``tests/test_gpu.py``); the bookkeeping around them is the same
code on NumPy, so it is checked here with float16 NumPy arrays, where CI can run it.
"""
import sys

import numpy as np
import pytest

from minilm import optim
from minilm.models.gpt import GPT, GPTConfig
from minilm.models.rnnlm import RNNConfig, RNNLM
from minilm.params import Params, precision_of
from minilm.precision import LossScaler
from minilm.testing import relative_error
from minilm.train import apply_gradients
from minilm.validate import as_numpy_dtype


pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py


# float16's unit roundoff is u = 2^-11 ~ 4.9e-4, and a backward through one block chains a few such
# roundings into each gradient: measured 0.8e-3 .. 2.0e-3 (about 4 u) per parameter; the bound is 16 u
F16_GRAD_TOL = 16 * 2.0 ** -11


def gpt(dtype):
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), dtype=dtype, seed=3)


def test_sixteen_bit_models_keep_float32_master_weights_and_a_rounded_copy():
    assert precision_of("float16") == {"dtype": np.float32, "compute_dtype": np.float16}
    assert precision_of("float64") == {"dtype": np.float64}
    model, reference = gpt(np.float16), gpt(np.float32)
    P = model.params
    assert P.mixed and P.data.dtype == np.float32 and P.compute.dtype == np.float16
    assert np.array_equal(P.data, reference.params.data)             # the same initialisation, unrounded
    assert np.array_equal(P.compute, P.data.astype(np.float16))
    assert P["wte"].dtype == np.float16 and P.values["wte"].dtype == np.float32
    assert np.shares_memory(P["wte"], P.compute) and np.shares_memory(P.grads["wte"], P.compute_grad)
    P["wte"] = 1 / 3                                        # sets the master weights, then their float16 copy
    assert np.all(P.values["wte"] == np.float32(1 / 3)) and np.all(P["wte"] == np.float16(1 / 3))


def test_full_precision_params_have_one_pair_of_buffers():
    P = Params([("W", (2, 3))], dtype=np.float32)
    assert not P.mixed and P.compute is P.data and P.compute_grad is P.grad
    P.grad[...] = 2.0
    assert P.unscale_grads(0.5) and np.all(P.grad == 1.0)


@pytest.mark.filterwarnings("error")       # an overflow in a cast or a product is a failure here
@pytest.mark.parametrize("scale", [1024.0, LossScaler(enabled=True).scale])
def test_the_scaled_float16_backward_unscales_to_the_float32_gradient(scale):
    """At the LossScaler's first scale too, 2^16, which float16 cannot hold (its largest value is
    65504): the cross-entropy's backward once cast that upstream gradient to float16, so every
    float16 run on a CPU backend skipped its first step as an overflow."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    model, reference = gpt(np.float16), gpt(np.float32)
    model.forward(x, y)
    model.backward(loss_scale=scale)
    assert model.params.unscale_grads(1 / scale)
    reference.forward(x, y)
    reference.backward()
    assert model.params.grad.dtype == np.float32
    for name in reference.params:                   # each on its own scale: a layernorm's gradient is ~1/200
        part = reference.params.slice(name)         # of the largest, which one bound over all would not see
        assert relative_error(model.params.grad[part], reference.params.grad[part]) <= F16_GRAD_TOL, name


def test_an_update_before_the_gradient_is_unscaled_is_refused():
    """A 16-bit model's backward leaves its gradient in compute_grad: a step then would read a
    stale params.grad and silently change nothing, so it is refused until unscale_grads."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, (2, 8))
    model = gpt(np.float16)
    opt = optim.SGD(model.params, 0.1)
    model.forward(x, x)
    returned = model.backward()
    assert returned is model.params.compute_grad and returned.dtype == np.float16   # where it landed
    with pytest.raises(RuntimeError, match=r"SGD.step: with mixed precision \(float16\) the backward's gradient "
                                           r"is in params.compute_grad; call params.unscale_grads"):
        opt.step()
    assert opt.steps == 0
    before = model.params.data.copy()
    assert model.params.unscale_grads(1.0)
    opt.step()
    assert opt.steps == 1 and not np.array_equal(model.params.data, before)
    full = gpt(np.float32)                                 # without mixed precision nothing is asked
    full.forward(x, x)
    assert full.backward() is full.params.grad
    optim.SGD(full.params, 0.1).step()
    rnn = RNNLM(RNNConfig(vocab_size=11, cell="gru", n_layer=1, hidden_size=8, n_embd=8), dtype=np.float16, seed=3)
    rnn.forward(x, x)
    assert rnn.backward() is rnn.params.compute_grad                   # the recurrent model's alike


def test_an_overflowing_step_is_skipped_and_a_finite_one_updates_and_syncs():
    model = gpt(np.float16)
    opt = optim.AdamW(model.params, 1e-2)
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    before = model.params.data.copy()
    model.params.compute_grad[...] = 1.0
    model.params.compute_grad[5] = np.inf
    assert not apply_gradients(model, opt, 1e-2, grad_clip=1.0, scaler=scaler)
    assert np.array_equal(model.params.data, before) and scaler.scale == 4.0 and scaler.skipped == 1
    model.params.compute_grad[...] = 1.0
    assert apply_gradients(model, opt, 1e-2, grad_clip=1.0, scaler=scaler)
    assert not np.array_equal(model.params.data, before)
    assert np.array_equal(model.params.compute, model.params.data.astype(np.float16))   # synced
    assert scaler.good_steps == 1


def test_the_loss_scale_grows_after_a_run_of_good_steps_and_round_trips():
    scaler = LossScaler(enabled=True, init_scale=4.0, growth_interval=3)
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 8.0 and scaler.good_steps == 0
    scaler.update(True)
    again = LossScaler(enabled=True)
    again.load_state_dict(scaler.state_dict())
    assert again.scale == 8.0 and again.good_steps == 1
    off = LossScaler(enabled=False)
    off.update(False)
    assert off.scale == 1.0 and off.skipped == 0


def test_loading_weights_refreshes_the_compute_copy():
    model = gpt(np.float16)
    flat = np.linspace(-1, 1, model.params.size).astype(np.float32)
    model.params.load(flat)
    assert np.array_equal(model.params.data, flat)
    assert np.array_equal(model.params.compute, flat.astype(np.float16))


def test_an_overflow_restarts_the_run_of_good_steps():
    """The scale grows after ``growth_interval`` good steps *in a row*: an overflow in between
    starts the count again (GradScaler's rule)."""
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=3)
    scaler.update(True)
    scaler.update(True)
    scaler.update(False)                                   # halved, and the run of 2 is lost
    assert scaler.scale == 4.0 and scaler.good_steps == 0 and scaler.skipped == 1
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 4.0                             # only 2 good steps since the overflow
    scaler.update(True)
    assert scaler.scale == 8.0 and scaler.good_steps == 0


def test_the_loss_scale_state_round_trips_with_its_skipped_steps():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=5)
    for finite in (True, False, True, False, True):
        scaler.update(finite)
    state = scaler.state_dict()
    assert state == {"scale": 2.0, "good_steps": 1, "skipped": 2}
    again = LossScaler(enabled=True)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_the_default_loss_scale_rule_is_pytorchs_grad_scaler():
    """torch.amp.GradScaler's defaults: init_scale 2^16, growth_factor 2, backoff_factor 0.5,
    growth_interval 2000 (the bench's float16 peer runs with them)."""
    scaler = LossScaler(enabled=True)
    assert scaler.scale == 2.0 ** 16
    for _ in range(1999):
        scaler.update(True)
    assert scaler.scale == 2.0 ** 16
    scaler.update(True)                                    # the 2000th good step in a row
    assert scaler.scale == 2.0 ** 17
    scaler.update(False)
    assert scaler.scale == 2.0 ** 16


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("mixed", [True, False])
def test_unscaling_reports_any_non_finite_gradient(bad, mixed):
    """+inf, -inf and NaN anywhere in the gradient all mean an overflow: the step is skipped."""
    P = Params([("W", (2, 3)), ("b", (3,))], **precision_of(np.float16 if mixed else np.float32))
    P.compute_grad[...] = 2.0
    assert P.unscale_grads(0.5) and np.all(P.grad == 1.0)
    P.compute_grad[...] = 2.0
    P.compute_grad[4] = bad
    assert not P.unscale_grads(0.5)


def test_the_backward_writes_a_sixteen_bit_gradient_and_same_dtype_compute_is_not_mixed():
    """The low-precision gradient is what the GPU's backward produces; a compute dtype equal to
    the master dtype is no mixed precision at all (one pair of buffers)."""
    P = gpt(np.float16).params
    assert P.compute_grad.dtype == np.float16 and P.grad.dtype == np.float32
    same = Params([("W", (2, 3))], dtype=np.float32, compute_dtype=np.float32)
    assert not same.mixed and same.compute is same.data and same.compute_grad is same.grad


def test_a_bfloat16_compute_copy_takes_its_gradients():
    """ml_dtypes' bfloat16 is of dtype kind 'V', not 'f': the check of a gradient written into a
    view had refused it, so every bfloat16 backward failed at its first add_grad."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    P = Params([("W", (2, 3)), ("b", (3,))], dtype=np.float32, compute_dtype=ml_dtypes.bfloat16)
    P.begin_grads()
    P.add_grad("W", np.ones((2, 3), dtype=ml_dtypes.bfloat16))
    P.add_grad("b", np.full(3, 2.0, dtype=ml_dtypes.bfloat16))
    P.end_grads()
    assert P.unscale_grads(0.5) and P.grad.tolist() == [0.5] * 6 + [1.0] * 3
    P.grads["b"] = np.full(3, 4.0, dtype=ml_dtypes.bfloat16)          # a view written directly
    assert P.compute_grad[6:].astype(np.float32).tolist() == [4.0] * 3


def test_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)                 # `import ml_dtypes` raises ImportError
    with pytest.raises(ValueError, match=r"minilm train: option '--dtype' bfloat16 needs the ml_dtypes package, "
                                         r"which comes with CuPy \(pip install -e '.\[gpu\]' in a checkout\)"):
        as_numpy_dtype("minilm train", "--dtype", "bfloat16")
    assert as_numpy_dtype("minilm train", "--dtype", "float16") == np.float16


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_bfloat16_is_refused_on_the_cpu_backends_naming_the_argument(backend_name):
    """NumPy computes a bfloat16 product, or one with a Python float, in float32: a bfloat16 model
    on a CPU backend had failed at its first forward over an argument the user never passed (GPT),
    or quietly run in float32 (RNNLM). The models and the ops now refuse it by name."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import minilm
    from minilm import backend, ops
    before = backend.current()
    minilm.use(backend_name)
    try:
        with pytest.raises(ValueError, match=rf"GPT: argument 'dtype' bfloat16, which the numpy and numba backends "
                                             rf"do not run .* the backend is {backend_name}"):
            gpt("bfloat16")
        with pytest.raises(ValueError, match=r"RNNLM: argument 'dtype' bfloat16, which the numpy and numba"):
            RNNLM(RNNConfig(vocab_size=5, cell="lstm", n_layer=1, hidden_size=4, n_embd=4), dtype="bfloat16")
        bf = ml_dtypes.bfloat16
        with pytest.raises(TypeError, match=r"linear: argument 'x' has dtype bfloat16, which the numpy and numba "
                                            r"backends do not run .* expected float16, float32 or float64"):
            ops.linear_forward(np.ones((2, 3), bf), np.ones((3, 4), bf), np.zeros(4, bf))
        with pytest.raises(TypeError, match=r"layernorm: argument 'x' has dtype bfloat16"):
            ops.layernorm_forward(np.ones((2, 3), bf), np.ones(3, bf), np.zeros(3, bf))
    finally:
        minilm.use(before)


def test_apply_gradients_updates_with_the_unscaled_gradient():
    """The 16-bit gradient holds scale * g: SGD (which, unlike Adam, is not blind to a gradient's
    size) must step by lr * g, not lr * scale * g."""
    model = gpt(np.float16)
    opt = optim.SGD(model.params, 0.5)
    scaler = LossScaler(enabled=True, init_scale=1024.0)
    before = model.params.data.copy()
    model.params.compute_grad[...] = 1024.0 * 0.25                  # g = 0.25, scaled by 1024
    assert apply_gradients(model, opt, 0.5, grad_clip=0.0, scaler=scaler)
    # 1e-6: the float32 master weights round w - 0.125 by ~6e-8; a step left scaled is off by 64
    assert np.allclose(model.params.data, before - 0.5 * 0.25, rtol=0, atol=1e-6)


# float16 rounds each input and the one result: 2^-11 each, a few of them over a sum of positive terms
F16_SUM_TOL = 4 * 2.0 ** -11


def _sixteen_bit_sums(rng, N):
    """Each op whose parameter gradient sums over N positions, as (name, forward args, which grads to
    compare): a bias, LayerNorm's gamma and beta, an embedding row that most positions read."""
    C, H = 8, 4
    ids = np.where(rng.random(N) < 0.5, 0, rng.integers(0, 5, N))       # id 0 at about half the positions
    return [
        ("linear", (rng.standard_normal((N, C)), 0.3 * rng.standard_normal((C, C)), np.zeros(C)), (1, 2)),
        ("layernorm", (rng.standard_normal((N, C)), np.ones(C), np.zeros(C)), (1, 2)),
        ("embedding", (ids, rng.standard_normal((5, C))), (1,)),
        ("rnn", (rng.standard_normal((N // 16, 16, C)), np.zeros((N // 16, H)), 0.3 * rng.standard_normal((C, H)),
                 0.3 * rng.standard_normal((H, H)), np.zeros(H)), (4,)),
        ("lstm", (rng.standard_normal((N // 16, 16, C)), np.zeros((N // 16, H)), np.zeros((N // 16, H)),
                  0.3 * rng.standard_normal((C, 4 * H)), 0.3 * rng.standard_normal((H, 4 * H)), np.zeros(4 * H)), (5,)),
        ("gru", (rng.standard_normal((N // 16, 16, C)), np.zeros((N // 16, H)), 0.3 * rng.standard_normal((C, 3 * H)),
                 0.3 * rng.standard_normal((H, 3 * H)), np.zeros(3 * H), np.zeros(3 * H)), (4, 5)),
    ]


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_a_sixteen_bit_gradient_summed_over_positions_keeps_float16_rounding(backend_name):
    """A 16-bit model on a CPU backend runs the reference, whose parameter gradients sum over every
    position (B T of them: 4096 in a batch of 64 x 64). NumPy adds float16 along that axis one row at
    a time in float16, so terms below the running sum's last bit were lost: a bias gradient came out
    10% small, and a GPT's LayerNorm and bias gradients 10% off at that batch. They are summed in float32
    and rounded once, as the GPU kernels sum them."""
    import minilm
    from minilm import ops
    minilm.use(backend_name)                                   # the autouse fixture restores the backend
    rng = np.random.default_rng(0)
    for name, args, compared in _sixteen_bit_sums(rng, 4096):
        half = tuple(a.astype(np.float16) if a.dtype.kind == "f" else a for a in args)
        single = tuple(a.astype(np.float32) if a.dtype.kind == "f" else a for a in half)
        out, cache = getattr(ops, f"{name}_forward")(*half)
        dout = rng.uniform(0.0, 0.02, out.shape).astype(np.float16)    # one sign: the sums grow
        grads = getattr(ops, f"{name}_backward")(dout, cache)
        out32, cache32 = getattr(ops, f"{name}_forward")(*single)
        grads32 = getattr(ops, f"{name}_backward")(dout.astype(np.float32), cache32)
        for i in compared:
            assert grads[i].dtype == np.float16, (name, i)
            assert relative_error(grads[i], grads32[i]) <= F16_SUM_TOL, (name, i, relative_error(grads[i], grads32[i]))


def test_a_float16_gpt_on_a_large_batch_keeps_its_position_gradient():
    """A GPT's wpe gradient sums over the batch (tok_emb + pos_emb broadcasts pos_emb over B): in
    float16, a sum of 8192 rows was 2.0e-2 off the float32 model's (2.5 F16_GRAD_TOL); in float32
    and rounded once, 3.5e-3. (wte's scatter-add is checked op by op above: here the tied head's
    product, which NumPy already sums in float32, outweighs it.)"""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (8192, 2)), rng.integers(0, 11, (8192, 2))
    model, reference = gpt(np.float16), gpt(np.float32)
    model.forward(x, y)
    model.backward(loss_scale=1024.0)
    assert model.params.unscale_grads(1 / 1024.0)
    reference.forward(x, y)
    reference.backward()
    part = reference.params.slice("wpe")
    assert relative_error(model.params.grad[part], reference.params.grad[part]) <= F16_GRAD_TOL


@pytest.mark.filterwarnings("error")       # an overflow in the sum is a failure here
@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_float16_loss_over_a_large_batch_is_finite(backend_name, label_smoothing):
    """The cross-entropy's mean summed its (B, T) terms in float16, whose largest value is 65504:
    a batch of the shakespeare-char preset (64 x 256 positions, loss ln 65 = 4.17 at the start) gave
    loss inf. The terms are summed in float32, as the GPU kernel sums them."""
    import minilm
    from minilm import ops
    minilm.use(backend_name)                                   # the autouse fixture restores the backend
    rng = np.random.default_rng(0)
    logits = (0.1 * rng.standard_normal((64, 256, 65))).astype(np.float16)
    targets = rng.integers(0, 65, (64, 256))
    loss, _ = ops.cross_entropy_forward(logits, targets, label_smoothing=label_smoothing)
    loss32, _ = ops.cross_entropy_forward(logits.astype(np.float32), targets, label_smoothing=label_smoothing)
    assert loss.dtype == np.float16
    assert abs(float(loss) - float(loss32)) <= F16_SUM_TOL * float(loss32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_master_weights_are_refused_by_the_optimizers_and_clipping(dtype):
    """Params(..., dtype=np.float16) holds 16-bit master weights: AdamW's first step made them -inf
    and nan (eps = 1e-8 is 0 in float16, and v = (1 - beta2) g^2 underflows), and clip_grad_norm
    read a gradient of norm 395 as inf and zeroed it. Both are refused, naming the mixed-precision
    Params that a 16-bit model uses."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    P = Params([("W", (40, 40))], dtype=dtype)
    message = fr"holds {np.dtype(dtype)} master weights \(params.data\).*compute_dtype={np.dtype(dtype)}\)"
    for make in (lambda: optim.AdamW(P, 1e-3), lambda: optim.SGD(P, 0.1), lambda: optim.clip_grad_norm(P, 1.0)):
        with pytest.raises(TypeError, match=message):
            make()
    mixed = Params([("W", (40, 40))], **precision_of(np.float16))         # float32 master weights: updated
    mixed.grad[...] = 10.0
    assert optim.clip_grad_norm(mixed, 1.0) == pytest.approx(400.0)
    optim.AdamW(mixed, 1e-3).step()
    assert np.isfinite(mixed.data).all()
