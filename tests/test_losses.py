"""Tests of reference/losses.py: cross-entropy's gradients, definition, ignore_index, label smoothing."""
import copy
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.losses import cross_entropy_backward, cross_entropy_forward

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=30, deadline=None)
# the loss recomputed with the math module, in another order: a few roundings of values <= ~10
DIRECT_TOL = 1e-12
# PyTorch's float64 kernel: the same log-softmax, summed in another order
TORCH_TOL = 1e-12


def floats(lo=-3.0, hi=3.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def cross_entropy_args(draw, max_smoothing=1.0):
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4))
    V = draw(st.integers(1, 6))
    ignore_index = draw(st.sampled_from([-100, 0, V]))      # the default, one inside [0, V), one above
    logits = draw(hnp.arrays(np.float64, lead + (V,), elements=floats()))
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, V - 1) | st.just(ignore_index)))
    label_smoothing = draw(st.floats(0.0, max_smoothing))
    return (logits, targets), {"ignore_index": ignore_index, "label_smoothing": label_smoothing}


def example(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.standard_normal((2, 5, 7))).astype(dtype)   # (B, T, V)
    targets = rng.integers(0, 7, (2, 5))                          # (B, T)
    targets[0, 1] = targets[1, 4] = -100                          # two ignored positions
    return logits, targets


def direct_loss(logits, targets, ignore_index=-100, label_smoothing=0.0):
    """PyTorch's definition, one position at a time with the math module."""
    V = logits.shape[-1]
    total, M = 0.0, 0
    for z, t in zip(logits.reshape(-1, V), targets.reshape(-1)):
        if t == ignore_index:
            continue
        log_p = [v - math.log(math.fsum(math.exp(w) for w in z)) for v in z]
        total += (1 - label_smoothing) * -log_p[t] + label_smoothing * -math.fsum(log_p) / V
        M += 1
    return total / M


# --- gradients --------------------------------------------------------------------------------

# label_smoothing <= 0.95: at 1, a row of equal logits is the minimum of its loss, its gradient is 0
# up to round-off (~1e-16), and gradcheck's relative error is then the stencil's round-off
# (~1e-11 |L|) over its 1e-8 floor
@SETTINGS
@given(cross_entropy_args(max_smoothing=0.95))
def test_gradcheck(case):
    args, kwargs = case
    report = gradcheck(cross_entropy_forward, cross_entropy_backward, args, kwargs, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["logits"]      # the integer targets are not checked
    assert report.passed, str(report)


def test_gradcheck_full_smoothing():
    # example()'s logits are spread out, far from the minimum of the fully smoothed loss
    report = gradcheck(cross_entropy_forward, cross_entropy_backward, example(), {"label_smoothing": 1.0},
                       tol=DEFAULT_TOL)
    assert report.passed, str(report)


@SETTINGS
@given(cross_entropy_args())
def test_gradient_is_p_minus_q_over_M_and_rows_sum_to_zero(case):
    (logits, targets), kwargs = case
    eps, V = kwargs["label_smoothing"], logits.shape[-1]
    loss, cache = cross_entropy_forward(logits, targets, **kwargs)
    dlogits, d_targets = cross_entropy_backward(1.0, cache)
    assert d_targets is None
    counted = targets != kwargs["ignore_index"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = (1 - eps) * (np.arange(V) == targets[..., None]) + eps / V
    expected = np.where(counted[..., None], p - q, 0.0) / max(counted.sum(), 1)
    np.testing.assert_allclose(dlogits, expected, rtol=0, atol=DIRECT_TOL)
    np.testing.assert_allclose(dlogits.sum(-1), 0.0, rtol=0, atol=DIRECT_TOL)   # p and q both sum to 1


# --- the definition ---------------------------------------------------------------------------

@SETTINGS
@given(cross_entropy_args(max_smoothing=0.0))
def test_equals_minus_log_softmax_of_the_target(case):
    (logits, targets), kwargs = case
    assume(np.any(targets != kwargs["ignore_index"]))           # all ignored: tested below
    loss, _ = cross_entropy_forward(logits, targets, **kwargs)
    assert float(loss) == pytest.approx(direct_loss(logits, targets, kwargs["ignore_index"]),
                                        rel=DIRECT_TOL, abs=DIRECT_TOL)


@SETTINGS
@given(cross_entropy_args())
def test_label_smoothing_formula(case):
    (logits, targets), kwargs = case
    assume(np.any(targets != kwargs["ignore_index"]))           # all ignored: tested below
    loss, _ = cross_entropy_forward(logits, targets, **kwargs)
    assert float(loss) == pytest.approx(direct_loss(logits, targets, **kwargs), rel=DIRECT_TOL, abs=DIRECT_TOL)


def test_loss_is_a_0d_array_of_the_logits_dtype():
    for dtype in (np.float32, np.float64):
        loss, _ = cross_entropy_forward(*example(dtype))
        assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == dtype


@pytest.mark.parametrize("shape", [(4,), (1,), (2, 4)])
def test_the_gradient_has_the_logits_dtype_for_every_shape(shape):
    """Unbatched logits make every factor 0-d, where NumPy 1's value-based promotion turned a
    float32 dloss / M into float64 (and float64 dlogits); the share is cast to the logits' dtype.
    This guards the declared floor, numpy>=1.24: under NumPy 2 (NEP 50) the old code passed too."""
    logits = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    targets = np.zeros(shape[:-1], dtype=np.int64)
    _, cache = cross_entropy_forward(logits, targets)
    for dloss in (1.0, np.float32(1.0), np.array(1.0)):
        dlogits, _ = cross_entropy_backward(dloss, cache)
        assert dlogits.dtype == np.float32 and dlogits.shape == shape


def test_no_overflow_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [1000.0, 0.0, -1000.0]])
    with np.errstate(over="raise", invalid="raise"):              # exp(1000) would overflow
        loss, cache = cross_entropy_forward(logits, np.array([0, 1]))
        dlogits, _ = cross_entropy_backward(1.0, cache)
    assert float(loss) == pytest.approx(500.0, rel=DIRECT_TOL)    # (0 + 1000) / 2
    assert np.all(np.isfinite(dlogits))


@pytest.mark.parametrize("tier", ["reference", "numba"])
def test_a_minus_inf_logit_without_smoothing_gives_a_finite_loss(tier):
    # A class with logit -inf has probability 0. Without smoothing it enters no loss term, so
    # the loss is finite, as PyTorch's; the smoothing term eps * mean(-log p) would be 0 * inf.
    from minilm.cpu import losses as cpu_losses
    forward, backward = ((cross_entropy_forward, cross_entropy_backward) if tier == "reference"
                         else (cpu_losses.cross_entropy_forward, cpu_losses.cross_entropy_backward))
    logits = np.array([[1.0, -np.inf, 0.5], [0.0, 2.0, -np.inf]])
    targets = np.array([0, 1])
    with np.errstate(invalid="raise"):
        loss, cache = forward(logits, targets)
        dlogits, _ = backward(1.0, cache)
    finite = np.array([[1.0, 0.5], [0.0, 2.0]])                   # the two classes that remain
    expected = np.mean([math.log(np.exp(finite[0]).sum()) - 1.0, math.log(np.exp(finite[1]).sum()) - 2.0])
    assert float(loss) == pytest.approx(expected, rel=DIRECT_TOL)
    assert np.all(np.isfinite(dlogits)) and dlogits[0, 1] == 0 and dlogits[1, 2] == 0
    smoothed, _ = forward(logits, targets, label_smoothing=0.1)
    assert float(smoothed) == np.inf                             # as PyTorch: eps * mean(-log p) = inf


# --- ignore_index -----------------------------------------------------------------------------

def test_ignored_positions_change_nothing_and_get_no_gradient():
    logits, targets = example()
    ignored = targets == -100
    loss, cache = cross_entropy_forward(logits, targets, label_smoothing=0.2)
    dlogits, _ = cross_entropy_backward(1.0, cache)
    np.testing.assert_array_equal(dlogits[ignored], 0.0)
    changed = logits.copy()
    changed[ignored] = 50 * np.random.default_rng(1).standard_normal((ignored.sum(), logits.shape[-1]))
    assert cross_entropy_forward(changed, targets, label_smoothing=0.2)[0] == loss
    # and the loss is the mean over the counted positions alone
    kept, _ = cross_entropy_forward(logits[~ignored], targets[~ignored], label_smoothing=0.2)
    assert float(kept) == pytest.approx(float(loss), rel=DIRECT_TOL)


def test_an_ignore_index_inside_the_vocabulary():
    logits, targets = example()
    targets[targets == -100] = 2
    loss, cache = cross_entropy_forward(logits, targets, ignore_index=2)
    dlogits, _ = cross_entropy_backward(1.0, cache)
    assert float(loss) == pytest.approx(direct_loss(logits, targets, ignore_index=2), rel=DIRECT_TOL)
    np.testing.assert_array_equal(dlogits[targets == 2], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_ignored_gives_zero_loss_and_zero_gradient(dtype):
    logits, targets = example(dtype)
    targets[:] = -100
    loss, cache = cross_entropy_forward(logits, targets, label_smoothing=0.1)
    dlogits, _ = cross_entropy_backward(np.array(1.0), cache)
    assert loss.shape == () and loss.dtype == dtype and float(loss) == 0.0   # PyTorch gives NaN here
    assert dlogits.dtype == dtype and np.all(dlogits == 0)


# --- dloss ------------------------------------------------------------------------------------

def test_dloss_scales_the_gradient_and_may_be_a_float_or_a_0d_array():
    _, cache = cross_entropy_forward(*example())
    unit, _ = cross_entropy_backward(1.0, cache)
    np.testing.assert_allclose(cross_entropy_backward(2.5, cache)[0], 2.5 * unit, rtol=DIRECT_TOL)
    np.testing.assert_array_equal(cross_entropy_backward(np.array(2.5), cache)[0],
                                  cross_entropy_backward(2.5, cache)[0])


# --- dtypes and purity ------------------------------------------------------------------------

def test_float32_in_float32_out():
    loss, cache = cross_entropy_forward(*example(np.float32), label_smoothing=np.float64(0.1))
    assert loss.dtype == np.float32
    for dloss in (1.0, np.array(1.0), np.array(1.0, dtype=np.float32)):
        assert cross_entropy_backward(dloss, cache)[0].dtype == np.float32


def test_backward_does_not_mutate_its_inputs_or_the_cache():
    loss, cache = cross_entropy_forward(*example(), label_smoothing=0.1)
    dloss = np.array(1.0)
    before = copy.deepcopy((dloss, cache))
    cross_entropy_backward(dloss, cache)
    np.testing.assert_equal((dloss, cache), before)


# --- bad input --------------------------------------------------------------------------------

def _set(t, value):
    t = t.copy()
    t[0, 0] = value
    return t


BAD_INPUTS = [
    ("logits not float", lambda z, t: ((z.astype(np.int64), t), {}), TypeError,
     r"cross_entropy: argument 'logits' must be a floating"),
    ("logits 0-d", lambda z, t: ((z[0, 0, 0], t), {}), ValueError,
     r"cross_entropy: argument 'logits' must have at least 1"),
    ("logits no classes", lambda z, t: ((z[..., :0], t), {}), ValueError,
     r"cross_entropy: argument 'logits' must have V >= 1 in \(\.\.\., V\), got shape \(2, 5, 0\)"),
    ("targets float", lambda z, t: ((z, t.astype(np.float64)), {}), TypeError,
     r"cross_entropy: argument 'targets' must be an integer array"),
    ("targets not an array", lambda z, t: ((z, t.tolist()), {}), TypeError,
     r"cross_entropy: argument 'targets' must be an array"),
    ("targets shape", lambda z, t: ((z, t[:, :4]), {}), ValueError,
     r"cross_entropy: argument 'targets' must have shape \(\.\.\.\) = logits' leading dims = \(2, 5\), got \(2, 4\)"),
    ("targets too large", lambda z, t: ((z, _set(t, 7)), {}), ValueError,
     r"cross_entropy: argument 'targets' must hold ids in \[0, 7\) \(V = 7\) or -100, got 7"),
    ("targets negative", lambda z, t: ((z, _set(t, -1)), {}), ValueError,
     r"cross_entropy: argument 'targets' must hold ids in \[0, 7\) \(V = 7\) or -100, got -1"),
    ("label_smoothing above 1", lambda z, t: ((z, t), {"label_smoothing": 1.5}), ValueError,
     r"cross_entropy: option 'label_smoothing' must be a number in \[0, 1\], got 1.5"),
    ("label_smoothing negative", lambda z, t: ((z, t), {"label_smoothing": -0.1}), ValueError,
     r"cross_entropy: option 'label_smoothing' must be a number in \[0, 1\], got -0.1"),
    ("label_smoothing a bool", lambda z, t: ((z, t), {"label_smoothing": True}), ValueError,   # not 1.0
     r"cross_entropy: option 'label_smoothing' must be a number in \[0, 1\], got True"),
    ("ignore_index not int", lambda z, t: ((z, t), {"ignore_index": -100.0}), TypeError,
     r"cross_entropy: option 'ignore_index' must be an integer, got -100.0"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(change, error, match):
    args, kwargs = change(*example())
    with pytest.raises(error, match=match):
        cross_entropy_forward(*args, **kwargs)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        cross_entropy_forward(*example(), -100)


def test_backward_rejects_a_dloss_that_is_not_a_scalar():
    _, cache = cross_entropy_forward(*example())
    with pytest.raises(ValueError, match=r"cross_entropy_backward: argument 'dloss' must have shape \(\)"):
        cross_entropy_backward(np.ones(2), cache)
    for bad in (None, "2", True):                          # would have become NaN, 2.0 or 1.0 silently
        with pytest.raises(TypeError, match=r"cross_entropy_backward: argument 'dloss' must be a real number "
                                            r"or a 0-d array, got"):
            cross_entropy_backward(bad, cache)
    assert cross_entropy_backward(np.float32(2.0), cache)[0].dtype == cache[0].dtype


# --- PyTorch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_index, label_smoothing", [(-100, 0.0), (-100, 0.1), (3, 0.25), (-100, 1.0)])
def test_matches_torch(ignore_index, label_smoothing):
    torch = pytest.importorskip("torch")
    logits, targets = example()
    targets[targets == -100] = ignore_index                       # torch rejects any other target outside [0, V)
    V = logits.shape[-1]
    loss, cache = cross_entropy_forward(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
    dlogits, _ = cross_entropy_backward(1.7, cache)
    zt = torch.tensor(logits, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt.reshape(-1, V), torch.tensor(targets).reshape(-1),
                                           ignore_index=ignore_index, label_smoothing=label_smoothing)
    (1.7 * lt).backward()
    np.testing.assert_allclose(loss, lt.item(), rtol=TORCH_TOL, atol=TORCH_TOL)
    np.testing.assert_allclose(dlogits, zt.grad.numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
