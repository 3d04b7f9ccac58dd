"""Tests of reference/dropout.py: gradients, p = 0, the mask's statistics, seeds, bad input."""
import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.dropout import dropout_backward, dropout_forward

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=30, deadline=None)
# the statistical tests draw N elements; a binomial fraction has standard deviation
# sqrt(q (1 - q) / N), and 6 of those are exceeded with probability ~2e-9, whatever the seed
N_DRAWS = 1_000_000
N_SIGMAS = 6


def floats(lo=-2.0, hi=2.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def example(dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3, 8)).astype(dtype)


# --- gradients --------------------------------------------------------------------------------

@SETTINGS
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), elements=floats()),
       st.floats(0.0, 0.9), st.integers(0, 2 ** 32))
def test_gradcheck(x, p, seed):
    # an integer seed draws the same mask at every call, so the forward is a function of x alone
    report = gradcheck(dropout_forward, dropout_backward, (x,), {"p": p, "rng": seed}, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["x"]
    assert report.passed, str(report)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_backward_passes_gradient_only_through_kept_elements(p):
    x = example()
    dy = np.random.default_rng(1).standard_normal(x.shape)
    y, cache = dropout_forward(x, p=p, rng=3)
    (dx,) = dropout_backward(dy, cache)
    kept = y != 0
    np.testing.assert_array_equal(dx[~kept], 0.0)
    # dy * mask / (1 - p) against dy / (1 - p): the quotient rounded once or twice, a few ulps apart
    np.testing.assert_allclose(dx[kept], dy[kept] / (1 - p), rtol=4 * np.finfo(float).eps)


# --- p = 0 ------------------------------------------------------------------------------------

def test_p_zero_is_the_identity_without_a_mask():
    x = example()
    y, cache = dropout_forward(x, p=0.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y, x)
    assert cache.mask is None
    assert not np.shares_memory(y, x)                         # a fresh array, as every op returns
    dy = np.ones_like(y)
    (dx,) = dropout_backward(dy, cache)
    np.testing.assert_array_equal(dx, dy)
    assert not np.shares_memory(dx, dy)


def test_p_zero_does_not_advance_the_generator():
    rng = np.random.default_rng(5)
    dropout_forward(example(), p=0, rng=rng)
    assert rng.random() == np.random.default_rng(5).random()


# --- statistics of the mask -------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    y, cache = dropout_forward(np.ones(N_DRAWS), p=p, rng=12345)
    q = 1 - p
    sigma = math.sqrt(q * (1 - q) / N_DRAWS)
    assert abs(cache.mask.mean() - q) < N_SIGMAS * sigma
    assert np.array_equal(y != 0, cache.mask)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_expectation_is_preserved(p):
    # each element is 1/(1-p) with probability 1-p, else 0: mean 1, variance p/(1-p)
    y, _ = dropout_forward(np.ones(N_DRAWS), p=p, rng=54321)
    sigma = math.sqrt(p / (1 - p) / N_DRAWS)
    assert abs(y.mean() - 1.0) < N_SIGMAS * sigma
    assert set(np.unique(y)) <= {0.0, 1 / (1 - p)}


# --- seeds and generators ---------------------------------------------------------------------

def test_same_seed_same_mask_other_seed_other_mask():
    x = example()
    y1, c1 = dropout_forward(x, p=0.5, rng=7)
    y2, c2 = dropout_forward(x, p=0.5, rng=7)
    _, c3 = dropout_forward(x, p=0.5, rng=8)
    np.testing.assert_array_equal(c1.mask, c2.mask)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(c1.mask, c3.mask)               # 48 coin flips agree with probability 2^-48


def test_a_generator_advances_and_matches_its_seed():
    x = example()
    rng = np.random.default_rng(7)
    _, first = dropout_forward(x, p=0.5, rng=rng)
    _, second = dropout_forward(x, p=0.5, rng=rng)
    assert not np.array_equal(first.mask, second.mask)        # a fresh mask at every call
    np.testing.assert_array_equal(first.mask, dropout_forward(x, p=0.5, rng=7)[1].mask)


# --- dtypes and purity ------------------------------------------------------------------------

def test_float32_in_float32_out():
    y, cache = dropout_forward(example(np.float32), p=np.float64(0.3), rng=0)   # a numpy p does not promote
    assert y.dtype == np.float32
    assert dropout_backward(np.ones_like(y), cache)[0].dtype == np.float32


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_does_not_mutate_its_inputs_or_the_cache(p):
    y, cache = dropout_forward(example(), p=p, rng=0)
    dy = np.ones_like(y)
    before = copy.deepcopy((dy, cache))
    dropout_backward(dy, cache)
    np.testing.assert_equal((dy, cache), before)


# --- bad input --------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("x not float", {"x": np.arange(6)}, TypeError, r"dropout: argument 'x' must be a floating"),
    ("p one", {"p": 1.0}, ValueError, r"dropout: option 'p' must be a number in \[0, 1\), got 1.0"),
    ("p negative", {"p": -0.1}, ValueError, r"dropout: option 'p' must be a number in \[0, 1\), got -0.1"),
    ("p a string", {"p": "0.5"}, ValueError, r"dropout: option 'p' must be a number"),
    ("rng a string", {"rng": "seed"}, TypeError, r"dropout: option 'rng' must be a numpy.random.Generator"),
    ("rng negative", {"rng": -1}, ValueError, r"dropout: option 'rng' must be .* non-negative integer seed"),
    ("rng legacy", {"rng": np.random.RandomState(0)}, TypeError, r"dropout: option 'rng' must be"),
    ("rng bool", {"rng": True}, TypeError, r"dropout: option 'rng' must be"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_input(change, error, match):
    kwargs = {"x": example(), "p": 0.5, "rng": 0, **change}
    x = kwargs.pop("x")
    with pytest.raises(error, match=match):
        dropout_forward(x, **kwargs)


def test_p_and_rng_are_keyword_only():
    with pytest.raises(TypeError):
        dropout_forward(example(), 0.5, 0)


def test_backward_rejects_dy_of_the_wrong_shape():
    y, cache = dropout_forward(example(), p=0.5, rng=0)
    with pytest.raises(ValueError, match=r"dropout_backward: argument 'dy' must have shape"):
        dropout_backward(y[0], cache)


def test_p_zero_is_the_identity_and_needs_no_rng():
    """As attention's dropout=0.0 needs none: a model built from the ops at p = 0 passes no generator.
    A value that is given is still checked."""
    x = np.arange(6.0).reshape(2, 3)
    y, cache = dropout_forward(x, p=0.0, rng=None)
    assert np.array_equal(y, x) and not np.shares_memory(y, x)
    (dx,) = dropout_backward(np.ones_like(x), cache)
    assert np.array_equal(dx, np.ones_like(x))
    with pytest.raises(TypeError, match=r"option 'rng' must be a numpy.random.Generator .* got 'seed'"):
        dropout_forward(x, p=0.0, rng="seed")
    with pytest.raises(TypeError, match=r"option 'rng' must be a numpy.random.Generator .* got None"):
        dropout_forward(x, p=0.5, rng=None)
