"""Optimizers, clipping, schedules and early stopping: hand computations, torch.optim, bad input."""
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm.optim import (
    OPTIMIZERS, SCHEDULES, SGD, Adam, AdamW, Constant, EarlyStopping, RMSprop, Step, WarmupCosine,
    clip_grad_norm,
)
from minilm import backend
from minilm.params import Params


@pytest.fixture(autouse=True, params=["numpy", "numba"])
def tier(request, restore_backend):
    """Every test on both CPU tiers: the readable updates a student reads (minilm/optim.py, numpy)
    and the kernels (minilm/cpu/optim.py, numba). On numba alone, a wrong bias correction or
    Nesterov step in the readable code had passed this file."""
    backend.use(request.param)
    return request.param

# float64 updates computed in a different but mathematically equal order (textbook Adam vs
# torch's √v/√(1-β2^t) + ε) agree to a few ulps per step; 1e-12 leaves room for 5 steps.
RTOL_F64 = 1e-12
ATOL_F64 = 1e-14    # for entries that pass through zero
N_STEPS = 5


def make_params(dtype=np.float64, seed=0):
    """A 2-D weight and a 1-D bias, random values."""
    params = Params([("W", (4, 3)), ("b", (3,))], dtype=dtype)
    params.data[...] = np.random.default_rng(seed).standard_normal(params.size)
    return params


def gradients(size, n=N_STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size) for _ in range(n)]


def run(opt, params, grads, lrs=None):
    for k, g in enumerate(grads):
        params.grad[...] = g
        opt.step(None if lrs is None else lrs[k])
    return params.data.copy()


# ---------------------------------------------------------------------------------------------
# hand computations: textbook formulas, one step at a time


def test_sgd_momentum_matches_hand_computation():
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size)
    got = run(SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01), params, grads)
    b = np.zeros_like(p)
    for g in grads:
        d = g + 0.01 * p
        b = 0.9 * b + d
        p = p - 0.1 * b
    np.testing.assert_allclose(got, p, rtol=RTOL_F64, atol=ATOL_F64)


def test_sgd_nesterov_matches_hand_computation():
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size)
    got = run(SGD(params, lr=0.05, momentum=0.8, nesterov=True), params, grads)
    b = np.zeros_like(p)
    for g in grads:
        b = 0.8 * b + g
        p = p - 0.05 * (g + 0.8 * b)
    np.testing.assert_allclose(got, p, rtol=RTOL_F64, atol=ATOL_F64)


def test_plain_sgd_is_p_minus_lr_g():
    params = make_params()
    p, (g,) = params.data.copy(), gradients(params.size, n=1)
    got = run(SGD(params, lr=0.3), params, [g])
    np.testing.assert_allclose(got, p - 0.3 * g, rtol=RTOL_F64, atol=ATOL_F64)


def hand_adamw(p, grads, lr, b1, b2, eps, wd, mask):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * mask * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adam_matches_hand_computation():
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size)
    got = run(Adam(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6), params, grads)
    want = hand_adamw(p, grads, 0.01, 0.8, 0.95, 1e-6, 0.0, np.zeros_like(p))
    np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=ATOL_F64)


def test_adamw_decays_only_2d_tensors():
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size)
    mask = np.r_[np.ones(12), np.zeros(3)]                  # W (4, 3) decays, b (3,) does not
    got = run(AdamW(params, lr=0.01, weight_decay=0.5), params, grads)
    want = hand_adamw(p, grads, 0.01, 0.9, 0.999, 1e-8, 0.5, mask)
    np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=ATOL_F64)


def test_adamw_with_zero_gradient_only_decays():
    params = make_params()
    p = params.data.copy()
    got = run(AdamW(params, lr=0.1, weight_decay=0.2), params, [np.zeros(params.size)])
    np.testing.assert_array_equal(got[:12], p[:12] * (1 - 0.1 * 0.2))
    np.testing.assert_array_equal(got[12:], p[12:])


def test_rmsprop_matches_hand_computation():
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size)
    got = run(RMSprop(params, lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5), params, grads)
    s, b = np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        s = 0.9 * s + 0.1 * g ** 2
        b = 0.5 * b + g / (np.sqrt(s) + 1e-6)
        p = p - 0.01 * b
    np.testing.assert_allclose(got, p, rtol=RTOL_F64, atol=ATOL_F64)


def test_step_uses_the_given_learning_rate():
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size, n=3)
    got = run(SGD(params, lr=1.0), params, grads, lrs=[0.1, 0.2, 0.0])
    want = p - 0.1 * grads[0] - 0.2 * grads[1]
    np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=ATOL_F64)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float32_params_keep_float32_buffers(name):
    params = make_params(np.float32)
    opt = OPTIMIZERS[name](params, lr=0.01)
    run(opt, params, [g.astype(np.float32) for g in gradients(params.size, n=2)])
    assert params.data.dtype == np.float32
    arrays = [v for v in opt.state_dict().values() if isinstance(v, np.ndarray)]
    assert all(a.dtype == np.float32 for a in arrays)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_optimizer_built_before_params_to_is_refused_until_it_moves_too(name):
    """``Params.to`` replaces the arrays: the optimizer's float32 moments would update float64
    weights (numpy and numba rounding them differently), so its step refuses, naming the fix,
    and ``load_state_dict(state_dict())`` moves the moments (and AdamW's decay mask) over."""
    moved, straight = make_params(np.float32), make_params(np.float32)
    opt = OPTIMIZERS[name](moved, lr=0.01, **({"momentum": 0.9} if name in ("sgd", "rmsprop") else {}))
    moved.to(dtype=np.float64)
    moved.grad[...] = 1.0
    with pytest.raises(RuntimeError, match=r"params.to\) after this optimizer was built.*load_state_dict"):
        opt.step()
    assert moved.data.tolist() == make_params(np.float32).data.astype(np.float64).tolist()   # nothing stepped
    opt.load_state_dict(opt.state_dict())
    grads = gradients(moved.size, n=3)
    run(opt, moved, grads)
    straight.to(dtype=np.float64)
    expected = run(OPTIMIZERS[name](straight, lr=0.01, **({"momentum": 0.9} if name in ("sgd", "rmsprop") else {})),
                   straight, grads)
    assert np.array_equal(moved.data, expected)
    assert all(a.dtype == np.float64 for a in opt._arrays().values())


# ---------------------------------------------------------------------------------------------
# torch.optim as the oracle


def torch_run(torch_opt_factory, params, grads):
    """Run a torch optimizer on tensors W, b holding the same values; return the flat result."""
    torch = pytest.importorskip("torch")
    W = torch.tensor(params["W"].copy(), requires_grad=True)
    b = torch.tensor(params["b"].copy(), requires_grad=True)
    opt = torch_opt_factory(torch, W, b)
    for g in grads:
        W.grad = torch.tensor(g[:12].reshape(4, 3))
        b.grad = torch.tensor(g[12:])
        opt.step()
    return np.r_[W.detach().numpy().ravel(), b.detach().numpy()]


TORCH_CASES = {
    "sgd-momentum": (lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                     lambda torch, W, b: torch.optim.SGD([W, b], lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                     lambda torch, W, b: torch.optim.SGD([W, b], lr=0.1, momentum=0.9, nesterov=True)),
    "adam": (lambda p: Adam(p, lr=0.01, betas=(0.85, 0.99), eps=1e-7),
             lambda torch, W, b: torch.optim.Adam([W, b], lr=0.01, betas=(0.85, 0.99), eps=1e-7)),
    "adamw": (lambda p: AdamW(p, lr=0.01, weight_decay=0.1),
              lambda torch, W, b: torch.optim.AdamW([{"params": [W], "weight_decay": 0.1},
                                                     {"params": [b], "weight_decay": 0.0}], lr=0.01)),
    "rmsprop": (lambda p: RMSprop(p, lr=0.01, alpha=0.95),
                lambda torch, W, b: torch.optim.RMSprop([W, b], lr=0.01, alpha=0.95, eps=1e-8)),
    "rmsprop-momentum": (lambda p: RMSprop(p, lr=0.01, momentum=0.9),
                         lambda torch, W, b: torch.optim.RMSprop([W, b], lr=0.01, momentum=0.9, eps=1e-8)),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_optim(case):
    ours, theirs = TORCH_CASES[case]
    params = make_params()
    grads = gradients(params.size)
    want = torch_run(theirs, params, grads)
    got = run(ours(params), params, grads)
    np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=ATOL_F64)


@pytest.mark.parametrize("scale", [0.01, 10.0])     # below and above max_norm
def test_clip_grad_norm_matches_torch(scale):
    torch = pytest.importorskip("torch")
    params = make_params()
    g = scale * gradients(params.size, n=1)[0]
    params.grad[...] = g
    W, b = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    W.grad, b.grad = torch.tensor(g[:12].reshape(4, 3)), torch.tensor(g[12:])
    want_norm = torch.nn.utils.clip_grad_norm_([W, b], max_norm=1.0)
    got_norm = clip_grad_norm(params, 1.0)
    assert got_norm == pytest.approx(float(want_norm), rel=RTOL_F64)
    np.testing.assert_allclose(params.grad, np.r_[W.grad.numpy().ravel(), b.grad.numpy()], rtol=RTOL_F64)


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-3, 1e3), st.floats(1e-2, 10.0), st.integers(0, 2**32 - 1))
def test_clip_grad_norm_bounds_the_norm_and_keeps_the_direction(scale, max_norm, seed):
    params = make_params()
    g = scale * np.random.default_rng(seed).standard_normal(params.size)
    params.grad[...] = g
    norm = clip_grad_norm(params, max_norm)
    assert norm == pytest.approx(np.linalg.norm(g), rel=RTOL_F64)
    assert np.linalg.norm(params.grad) <= max_norm * (1 + RTOL_F64)
    np.testing.assert_allclose(params.grad * np.linalg.norm(g), g * np.linalg.norm(params.grad), rtol=RTOL_F64)


def test_clip_grad_norm_divides_by_the_norm_plus_torchs_epsilon():
    # torch's factor max_norm / (norm + 1e-6), without torch: a norm of 2 clipped to 1 scales by
    # 1 / (2 + 1e-6), which differs from 1 / 2 by 5e-7 relative, far above RTOL_F64
    params = make_params()
    params.grad[...] = 0.0
    params.grad[0], params.grad[13] = 1.2, -1.6                 # norm 2 (1.44 + 2.56 = 4)
    assert clip_grad_norm(params, 1.0) == pytest.approx(2.0, rel=RTOL_F64)
    assert params.grad[0] == pytest.approx(1.2 / (2.0 + 1e-6), rel=RTOL_F64)
    assert params.grad[13] == pytest.approx(-1.6 / (2.0 + 1e-6), rel=RTOL_F64)


# ---------------------------------------------------------------------------------------------
# state_dict: a resumed optimizer takes exactly the steps of an uninterrupted one


@pytest.mark.parametrize("name,kwargs", [("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {"weight_decay": 0.1}),
                                         ("rmsprop", {"momentum": 0.5})])
def test_state_dict_round_trip_gives_identical_steps(name, kwargs):
    grads = gradients(15, n=6)
    params_a = make_params(np.float32)
    opt_a = OPTIMIZERS[name](params_a, lr=0.01, **kwargs)
    run(opt_a, params_a, grads[:3])
    state = opt_a.state_dict()
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    assert json.loads(json.dumps(scalars)) == scalars            # the scalars are JSON-able

    params_b = make_params(np.float32, seed=99)
    params_b.data[...] = params_a.data
    opt_b = OPTIMIZERS[name](params_b, lr=0.01, **kwargs)
    opt_b.load_state_dict(state)
    assert opt_b.steps == 3
    np.testing.assert_array_equal(run(opt_b, params_b, grads[3:]), run(opt_a, params_a, grads[3:]))


def test_state_dict_arrays_are_copies():
    params = make_params()
    opt = Adam(params, lr=0.1)
    run(opt, params, gradients(params.size, n=1))
    state = opt.state_dict()
    before = state["m"].copy()
    run(opt, params, gradients(params.size, n=1, seed=5))
    np.testing.assert_array_equal(state["m"], before)


def test_load_state_dict_rejects_another_optimizer():
    params = make_params()
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: argument 'state' must be the state of a 'adam' "
                                         r"optimizer, got 'sgd'"):
        Adam(params, lr=0.1).load_state_dict(SGD(params, lr=0.1).state_dict())


def test_load_state_dict_rejects_a_wrong_shape():
    state = Adam(make_params(), lr=0.1).state_dict()
    small = Params([("b", (3,))], dtype=np.float64)
    with pytest.raises(ValueError, match=r"buffer 'm' must have shape \(3,\).*got \(15,\)"):
        Adam(small, lr=0.1).load_state_dict(state)


def test_load_state_dict_rejects_a_buffer_that_is_not_an_array():
    params = make_params()
    state = {**Adam(params, lr=0.1).state_dict(), "m": [0.0] * params.size}     # an AttributeError before
    with pytest.raises(TypeError, match=r"Adam.load_state_dict: buffer 'm' must be an array, as state_dict\(\) "
                                        r"returns it, got list"):
        Adam(params, lr=0.1).load_state_dict(state)


@pytest.mark.parametrize("values", [[None], ["0.5"], [0.5 + 1j]], ids=["None", "text", "complex"])
def test_load_state_dict_rejects_a_buffer_that_is_not_of_real_numbers(values):
    """An array of None or of text became NaN or numbers by a silent cast; complex lost its imaginary
    part with only a warning."""
    params = make_params()
    state = {**Adam(params, lr=0.1).state_dict(), "v": np.array(values * params.size)}
    opt = Adam(params, lr=0.1)
    with pytest.raises(TypeError, match=r"Adam.load_state_dict: buffer 'v' must be an array of real numbers, "
                                        r"as state_dict\(\) returns it, got one of dtype (object|<U3|complex128)"):
        opt.load_state_dict(state)
    assert not opt.v.any()


def test_load_state_dict_rejects_a_missing_buffer():
    params = make_params()
    state = SGD(params, lr=0.1).state_dict()                    # no momentum: no buffer saved
    with pytest.raises(ValueError, match="no 'momentum_buffer' buffer"):
        SGD(params, lr=0.1, momentum=0.9).load_state_dict(state)


@pytest.mark.parametrize("edit", [{"steps": -1}, {"v": np.zeros(3)}])
def test_a_refused_state_leaves_the_optimizer_as_it_was(edit):
    """A state refused for its step count or for its second buffer had already replaced the first
    buffer: the optimizer went on with another run's m and its own v."""
    params = make_params()
    opt = Adam(params, lr=0.1)
    run(opt, params, gradients(params.size, n=2))
    before = {key: getattr(opt, key).copy() for key in ("m", "v")}
    other = Adam(make_params(seed=7), lr=0.1)
    run(other, other.params, gradients(params.size, n=3, seed=3))
    with pytest.raises(ValueError, match="'steps'" if "steps" in edit else "buffer 'v'"):
        opt.load_state_dict({**other.state_dict(), **edit})
    assert opt.steps == 2
    for key, value in before.items():
        np.testing.assert_array_equal(getattr(opt, key), value)


# ---------------------------------------------------------------------------------------------
# bad options


@pytest.mark.parametrize("make,message", [
    (lambda p: SGD(p, lr=0), r"SGD: option 'lr' must be a positive finite number, got 0"),
    (lambda p: SGD(p, lr=-1e-3), r"SGD: option 'lr' must be a positive finite number"),
    (lambda p: SGD(p, lr="0.1"), r"SGD: option 'lr' must be a positive finite number, got '0.1'"),
    (lambda p: SGD(p, lr=0.1, momentum=1.0), r"SGD: option 'momentum' must be a number in \[0, 1\)"),
    (lambda p: SGD(p, lr=0.1, nesterov=True), r"SGD: option 'nesterov' needs momentum > 0"),
    (lambda p: SGD(p, lr=0.1, weight_decay=-1), r"SGD: option 'weight_decay' must be a finite number >= 0"),
    (lambda p: Adam(p, lr=0.1, betas=(0.9,)), r"Adam: option 'betas' must be a pair"),
    (lambda p: Adam(p, lr=0.1, betas=(1.0, 0.999)), r"Adam: option 'betas\[0\]' must be a number in \[0, 1\)"),
    (lambda p: Adam(p, lr=0.1, betas=(0.9, -0.1)), r"Adam: option 'betas\[1\]' must be a number in \[0, 1\)"),
    (lambda p: Adam(p, lr=0.1, eps=-1e-8), r"Adam: option 'eps' must be a positive finite number, got -1e-08"),
    # eps = 0: a parameter whose gradient is exactly 0 (the embedding row of a token not in the batch) has
    # moments 0 and steps by 0 / 0 = nan at the first step, without a word on the numba backend
    (lambda p: Adam(p, lr=0.1, eps=0), r"Adam: option 'eps' must be a positive finite number, got 0"),
    (lambda p: AdamW(p, lr=0.1, eps=0.0), r"AdamW: option 'eps' must be a positive finite number, got 0.0"),
    (lambda p: RMSprop(p, lr=0.1, eps=0), r"RMSprop: option 'eps' must be a positive finite number, got 0"),
    (lambda p: AdamW(p, lr=0.1, weight_decay=float("nan")), r"AdamW: option 'weight_decay' must be a finite"),
    (lambda p: RMSprop(p, lr=0.1, alpha=1.5), r"RMSprop: option 'alpha' must be a number in \[0, 1\)"),
    (lambda p: RMSprop(p, lr=0.1, momentum=-0.5), r"RMSprop: option 'momentum' must be a number in \[0, 1\)"),
    (lambda p: clip_grad_norm(p, 0.0), r"clip_grad_norm: option 'max_norm' must be a positive number"),
    (lambda p: SGD(p, lr=float("inf")), r"SGD: option 'lr' must be a positive finite number, got inf"),
    (lambda p: AdamW(p, lr=float("nan")), r"AdamW: option 'lr' must be a positive finite number, got nan"),
    (lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov="no"), r"SGD: option 'nesterov' must be True or False, got 'no'"),
])
def test_bad_options_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make(make_params())


@pytest.mark.parametrize("steps", [-1, -5, 2.7, "3", True])
def test_load_state_dict_refuses_a_step_count_that_is_not_a_count(steps):
    """A step count of -1 gave a ZeroDivisionError at the next step (`minilm train --resume` of an
    edited checkpoint said only "float division by zero"), and 2.7 was cut to 2."""
    opt = Adam(make_params(), lr=0.1)
    state = {**opt.state_dict(), "steps": steps}
    with pytest.raises(ValueError, match=rf"^Adam.load_state_dict: argument 'state' entry 'steps' must be an integer "
                                         rf">= 0, got {re.escape(repr(steps))}$"):
        opt.load_state_dict(state)


def test_params_must_be_params():
    with pytest.raises(TypeError, match="Adam: argument 'params' must be a minilm Params, got ndarray"):
        Adam(np.zeros(3), lr=0.1)


def test_step_rejects_a_negative_learning_rate():
    opt = SGD(make_params(), lr=0.1)
    with pytest.raises(ValueError, match=r"SGD.step: option 'lr' must be a finite number >= 0, got -0.1"):
        opt.step(-0.1)
    assert opt.steps == 0


# ---------------------------------------------------------------------------------------------
# schedules


def nanogpt_get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT's train.py get_lr, verbatim."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("it", [0, 1, 50, 99, 100, 101, 2550, 4999, 5000, 5001, 10**6])
def test_warmup_cosine_is_nanogpt_get_lr(it):
    schedule = WarmupCosine(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=5000)
    assert schedule(it) == nanogpt_get_lr(it, 1e-3, 1e-4, 100, 5000)


def test_warmup_cosine_landmarks():
    s = WarmupCosine(lr=1.0, min_lr=0.1, warmup_iters=9, decay_iters=109)
    assert s(0) == pytest.approx(0.1, rel=RTOL_F64)           # (0 + 1) / (9 + 1)
    assert s(9) == 1.0                                         # warm-up over: the peak
    assert s(59) == pytest.approx(0.55, rel=RTOL_F64)         # half way: the mean of lr and min_lr
    assert s(109) == pytest.approx(0.1, rel=RTOL_F64)
    assert s(110) == 0.1


def test_step_and_constant_schedules():
    assert [Step(lr=1.0, step_size=2, gamma=0.5)(it) for it in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert Constant(3e-4)(12345) == 3e-4
    assert set(SCHEDULES) == {"constant", "step", "cosine"}
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw", "rmsprop"}


def test_schedules_are_frozen():
    with pytest.raises(AttributeError):
        Constant(0.1).lr = 0.2


@pytest.mark.parametrize("make,message", [
    (lambda: Constant(0.0), r"Constant: option 'lr' must be a positive finite number"),
    (lambda: Constant(float("inf")), r"Constant: option 'lr' must be a positive finite number, got inf"),
    (lambda: Step(0.1, step_size=0, gamma=0.5), r"Step: option 'step_size' must be a positive integer"),
    (lambda: Step(0.1, step_size=1.5, gamma=0.5), r"Step: option 'step_size' must be a positive integer"),
    (lambda: Step(0.1, step_size=10, gamma=0), r"Step: option 'gamma' must be a positive finite number"),
    (lambda: WarmupCosine(0.1, min_lr=0.2, warmup_iters=1, decay_iters=9), r"'min_lr' must be at most lr"),
    (lambda: WarmupCosine(0.1, min_lr=-1, warmup_iters=1, decay_iters=9), r"'min_lr' must be a finite number >= 0"),
    (lambda: WarmupCosine(0.1, 0.01, warmup_iters=-1, decay_iters=9), r"'warmup_iters' must be an integer >= 0"),
    (lambda: WarmupCosine(0.1, 0.01, warmup_iters=True, decay_iters=9), r"'warmup_iters' must be an integer >= 0, "
                                                                        r"got True"),
    (lambda: WarmupCosine(0.1, 0.01, warmup_iters=9, decay_iters=9), r"'decay_iters' must be an integer > "
                                                                      r"warmup_iters = 9, got 9"),
    (lambda: Constant(0.1)(-1), r"Constant: argument 'it' must be an iteration number >= 0, got -1"),
])
def test_bad_schedules_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------------------------
# early stopping


def test_early_stopping_stops_after_patience_evaluations_without_improvement():
    stopper = EarlyStopping(patience=3)
    assert [stopper.update(v) for v in [3.0, 2.0, 2.5, 2.4, 2.0, 2.1]] == [False, False, False, False, True, True]
    assert stopper.best == 2.0


def test_early_stopping_counts_from_the_latest_improvement():
    # an improvement resets the count: two bad evaluations, a new best, then patience (3) bad ones
    stopper = EarlyStopping(patience=3)
    assert [stopper.update(v) for v in [3.0, 3.5, 3.6, 2.0, 2.1, 2.2, 2.3]] == [False] * 6 + [True]
    assert (stopper.best, stopper.bad_evals) == (2.0, 3)


def test_early_stopping_min_delta_and_nan():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert stopper.update(1.0) is False
    assert stopper.update(0.95) is False                       # better, but by less than min_delta
    assert stopper.update(float("nan")) is True                # a nan never improves
    assert stopper.best == 1.0


def test_early_stopping_state_round_trip():
    stopper = EarlyStopping(patience=3)
    assert stopper.state_dict() == {"best": None, "bad_evals": 0}
    for v in [2.0, 2.5]:
        stopper.update(v)
    state = json.loads(json.dumps(stopper.state_dict()))
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(state)
    assert (resumed.best, resumed.bad_evals) == (2.0, 1)
    assert [resumed.update(v) for v in [2.1, 2.2]] == [stopper.update(v) for v in [2.1, 2.2]] == [False, True]


@pytest.mark.parametrize("make,message", [
    (lambda: EarlyStopping(patience=0), r"EarlyStopping: option 'patience' must be a positive integer, got 0"),
    (lambda: EarlyStopping(patience=2, min_delta=-0.1), r"EarlyStopping: option 'min_delta' must be a finite"),
    (lambda: EarlyStopping(2).load_state_dict({}), r"EarlyStopping.load_state_dict: argument 'state' is not"),
    (lambda: EarlyStopping(2).load_state_dict({"best": 1.0, "bad_evals": -3}),     # had been taken
     r"EarlyStopping.load_state_dict: argument 'state' is not a state_dict of EarlyStopping \(ValueError: "
     r"'bad_evals' must be an integer >= 0, got -3\)"),
])
def test_bad_early_stopping_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()



def test_early_stopping_takes_a_number_or_a_0d_array():
    stopper = EarlyStopping(2)
    with pytest.raises(TypeError, match=r"^EarlyStopping.update: argument 'val_loss' must be a number, got str$"):
        stopper.update("1.5")                                      # had been NumPy's "could not convert"
    assert not stopper.update(np.array(1.5)) and stopper.best == 1.5

def test_params_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="Params: parameter name 'W' appears twice"):
        Params([("W", (2, 2)), ("W", (2,))])
    params = Params([("W", (2, 3)), ("b", (3,))])
    with pytest.raises(KeyError, match="no parameter called 'w'; parameters are: W, b"):
        params.values["w"]
    with pytest.raises(ValueError, match=r"Params.load: argument 'flat' must have shape \(9,\), got \(8,\)"):
        params.load(np.zeros(8))
    with pytest.raises(TypeError, match=r"Params.load: argument 'flat' must be an array, got list"):
        params.load([0.0] * 9)
    for dtype in (np.int64, np.bool_, np.complex64):                # `minilm eval` of such weights had printed a loss
        with pytest.raises(TypeError, match=rf"Params.load: argument 'flat' must hold floating-point numbers, "
                                            rf"got dtype {np.dtype(dtype)}"):
            params.load(np.zeros(9, dtype=dtype))
    with pytest.raises(ValueError, match=r"Params: parameter 'W' must have a shape of sizes >= 0, got \(-2, 3\)"):
        Params([("W", (-2, 3))])
    with pytest.raises(ValueError, match=r"Params: parameter 'W' must have a shape of integer sizes, got \(2.5, 3\)"):
        Params([("W", (2.5, 3))])                                   # had become (2, 3)
    with pytest.raises(KeyError, match="no parameter called 'w'; parameters are: W, b"):
        params.slice("w")
    params.values["b"] = [1.0, 2.0, 3.0]                           # a view: writes land in the flat buffer
    assert params.data[6:].tolist() == [1.0, 2.0, 3.0]
    params.grads["W"] = 0.0                                        # one number fills the view
    assert not params.grad[:6].any()
    params["b"] = np.array([4.0, 5.0, 6.0])                        # what the forward reads, and the master weights
    assert params.data[6:].tolist() == params["b"].tolist() == [4.0, 5.0, 6.0]


def test_params_refuse_a_gradient_that_numpy_would_turn_into_nan_or_broadcast():
    """``embedding_backward`` returns (None, dE): unpacked the wrong way round, None would be
    written as NaN; a bias's gradient written into a weight would broadcast. Both name the parameter."""
    params = Params([("W", (2, 3)), ("b", (3,))])
    before = params.grad.copy()
    with pytest.raises(TypeError, match=r"parameter 'W' takes an array of shape \(2, 3\), got None .*order"):
        params.grads["W"] = None
    with pytest.raises(ValueError, match=r"parameter 'W' has shape \(2, 3\), got an array of shape \(3,\)"):
        params.grads["W"] = np.ones(3)
    with pytest.raises(TypeError, match="parameter 'b' takes real numbers, got complex128"):
        params.grads["b"] = np.ones(3, dtype=complex)
    params.begin_grads()
    with pytest.raises(TypeError, match="parameter 'b' takes an array of shape"):
        params.add_grad("b", None)
    with pytest.raises(ValueError, match=r"parameter 'W' has shape \(2, 3\), got an array of shape \(\)"):
        params.add_grad("W", np.float64(1.0))                      # a whole gradient, not one number
    assert np.array_equal(params.grad, before)


def test_params_of_size_zero_take_no_room():
    """Sizes >= 0 are allowed: an empty tensor is a view of length 0 and shifts nothing."""
    params = Params([("W", (2, 3)), ("empty", (0, 3)), ("b", (3,))])
    assert params.size == 9 and params.values["empty"].shape == (0, 3)
    assert params.slice("b") == slice(6, 9)


def test_adamw_defaults_are_torchs():
    """AdamW(params, lr) decays the 2-D weights by torch.optim.AdamW's default, weight_decay=0.01,
    with its default betas and eps; every other test passes them explicitly."""
    params = make_params()
    p, grads = params.data.copy(), gradients(params.size)
    mask = np.r_[np.ones(12), np.zeros(3)]
    got = run(AdamW(params, lr=0.01), params, grads)
    want = hand_adamw(p, grads, 0.01, 0.9, 0.999, 1e-8, 0.01, mask)
    np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=ATOL_F64)


def test_a_step_schedule_whose_rate_overflows_says_so():
    """gamma > 1 raised to the iteration's power can pass the largest float: Python's OverflowError
    reached `minilm train` as 'error: (34, 'Numerical result out of range')', naming nothing."""
    schedule = Step(1e-3, step_size=1, gamma=1e300)
    assert schedule(1) == 1e-3 * 1e300
    with pytest.raises(ValueError, match=r"Step: the learning rate lr \* gamma \*\* \(it // step_size\) = "
                                         r"0.001 \* 1e\+300 \*\* 2 overflows at iteration 2; choose a smaller "
                                         r"'gamma'"):
        schedule(2)


def test_a_step_schedule_whose_product_with_lr_overflows_says_so():
    """gamma ** k can be finite while lr * gamma ** k is not: Python's float product gives inf
    without an OverflowError, and Step returned lr = inf instead of naming the overflow."""
    schedule = Step(10.0, step_size=1, gamma=1e308)
    assert schedule(0) == 10.0
    with pytest.raises(ValueError, match=r"Step: the learning rate .* overflows at iteration 1"):
        schedule(1)


def test_load_state_dict_takes_buffers_that_numpy_converts():
    """A buffer that NumPy converts (a PyTorch CPU tensor, as a state converted from PyTorch holds)
    is read by its NumPy dtype: torch.dtype has no .kind, and an AttributeError came instead."""
    torch = pytest.importorskip("torch")
    params = make_params()
    state = Adam(params, lr=0.1).state_dict()
    state["m"] = torch.from_numpy(np.full(params.size, 0.5))
    state["v"] = torch.from_numpy(np.full(params.size, 0.25, dtype=np.float32))
    opt = Adam(params, lr=0.1)
    opt.load_state_dict(state)
    assert isinstance(opt.m, np.ndarray) and opt.m.dtype == params.data.dtype
    assert (opt.m == 0.5).all() and (opt.v == 0.25).all()
    state["v"] = torch.zeros(params.size, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"buffer 'v' must be an array of real numbers, .* got one of dtype complex64"):
        Adam(params, lr=0.1).load_state_dict(state)
