"""Tests of reference/embedding.py: gradients, repeated ids accumulate, dtypes, bad input, PyTorch."""
import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.reference.embedding import embedding_backward, embedding_forward

# small inputs, so each example is a few ms; no deadline, the first call imports and warms caches
SETTINGS = settings(max_examples=30, deadline=None)
# dE sums the same rows as a Python loop, perhaps in another order: a few roundings apart
SUM_RTOL = 1e-13
# PyTorch's float64 embedding backward sums the same rows, perhaps in another order
TORCH_TOL = 1e-12


def floats(lo=-2.0, hi=2.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def embedding_args(draw):
    V, C = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5))
    ids = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, V - 1)))   # small V: repeats are common
    E = draw(hnp.arrays(np.float64, (V, C), elements=floats()))
    return ids, E


def example(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([[3, 3, 0, 7, 3], [9, 0, 1, 1, 10]])      # (B, T) = (2, 5) with repeated ids
    return ids, rng.standard_normal((11, 4)).astype(dtype)    # E (V, C) = (11, 4)


def loop_dE(ids, dout, V):
    """The gradient by its definition: dE[v] = sum of dout[n] over the positions n with ids[n] = v."""
    C = dout.shape[-1]
    dE = np.zeros((V, C))
    for n, v in enumerate(ids.reshape(-1)):
        dE[v] += dout.reshape(-1, C)[n]
    return dE


# --- gradients --------------------------------------------------------------------------------

@SETTINGS
@given(embedding_args())
def test_gradcheck(args):
    report = gradcheck(embedding_forward, embedding_backward, args, tol=DEFAULT_TOL)
    assert [a.name for a in report.arguments] == ["E"]           # the integer ids are not checked
    assert report.passed, str(report)


@SETTINGS
@given(embedding_args(), st.data())
def test_repeated_ids_accumulate(args, data):
    ids, E = args
    dout = data.draw(hnp.arrays(np.float64, ids.shape + (E.shape[1],), elements=floats()))
    d_ids, dE = embedding_backward(dout, embedding_forward(ids, E)[1])
    assert d_ids is None
    np.testing.assert_allclose(dE, loop_dE(ids, dout, E.shape[0]), rtol=SUM_RTOL, atol=SUM_RTOL)


def test_one_id_everywhere_receives_the_sum_of_all_rows():
    ids, E = np.full((2, 5), 4), example()[1]
    dout = np.random.default_rng(1).standard_normal((2, 5, 4))
    _, dE = embedding_backward(dout, embedding_forward(ids, E)[1])
    np.testing.assert_allclose(dE[4], dout.sum(axis=(0, 1)), rtol=SUM_RTOL)
    assert np.all(np.delete(dE, 4, axis=0) == 0)              # rows never read get nothing


# --- the forward ------------------------------------------------------------------------------

@SETTINGS
@given(embedding_args())
def test_forward_reads_one_row_per_id(args):
    ids, E = args
    y, _ = embedding_forward(ids, E)
    assert y.shape == ids.shape + (E.shape[1],)
    for n in np.ndindex(ids.shape):
        np.testing.assert_array_equal(y[n], E[ids[n]])


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_any_integer_dtype_of_ids(dtype):
    ids, E = example()
    np.testing.assert_array_equal(embedding_forward(ids.astype(dtype), E)[0], E[ids])


# --- dtypes and purity ------------------------------------------------------------------------

def test_float32_in_float32_out():
    y, cache = embedding_forward(*example(np.float32))
    assert y.dtype == np.float32
    assert embedding_backward(np.ones_like(y), cache)[1].dtype == np.float32


def test_backward_does_not_mutate_its_inputs_or_the_cache():
    y, cache = embedding_forward(*example())
    dout = np.ones_like(y)
    before = copy.deepcopy((dout, cache))
    embedding_backward(dout, cache)
    np.testing.assert_equal((dout, cache), before)


# --- bad input --------------------------------------------------------------------------------

BAD_INPUTS = [
    ("ids float", lambda ids, E: (ids.astype(np.float64), E), TypeError,
     r"embedding: argument 'ids' must be an integer array"),
    ("ids bool", lambda ids, E: (ids > 3, E), TypeError, r"embedding: argument 'ids' must be an integer array"),
    ("ids not an array", lambda ids, E: (ids.tolist(), E), TypeError, r"embedding: argument 'ids' must be an array"),
    ("ids too large", lambda ids, E: (ids + 1, E), ValueError,
     r"embedding: argument 'ids' must hold ids in \[0, 11\) \(V = 11\), got 11"),
    ("ids negative", lambda ids, E: (ids - 1, E), ValueError, r"embedding: argument 'ids' must hold ids in .*, got -1"),
    ("E not float", lambda ids, E: (ids, E.astype(np.int64)), TypeError, r"embedding: argument 'E' must be a floating"),
    ("E 1-d", lambda ids, E: (ids, E[:, 0]), ValueError, r"embedding: argument 'E' must have 2 dimensions \(V, C\)"),
    ("E 3-d", lambda ids, E: (ids, E[None]), ValueError, r"embedding: argument 'E' must have 2 dimensions \(V, C\)"),
    ("E of width 0", lambda ids, E: (ids, E[:, :0]), ValueError,       # its backward had failed inside NumPy
     r"embedding: argument 'E' must have C >= 1 in \(V, C\), got shape \(11, 0\)"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        embedding_forward(*change(*example()))


def test_host_ids_are_checked_also_where_a_caller_checked_the_device_ids():
    """``device_ids_checked_by_caller`` (a captured GPU step) skips only the read-back of GPU arrays."""
    from minilm.validate import device_ids_checked_by_caller
    ids, E = example()
    with device_ids_checked_by_caller(), pytest.raises(ValueError, match=r"argument 'ids' must hold ids in .*, got 11"):
        embedding_forward(ids + 1, E)


def test_backward_rejects_dout_of_the_wrong_shape():
    y, cache = embedding_forward(*example())
    with pytest.raises(ValueError, match=r"embedding_backward: argument 'dout' must have shape \(\.\.\., C\)"):
        embedding_backward(y[..., :3], cache)


# --- PyTorch ----------------------------------------------------------------------------------

def test_matches_torch():
    torch = pytest.importorskip("torch")
    ids, E = example()
    dout = np.random.default_rng(1).standard_normal(ids.shape + (E.shape[1],))
    y, cache = embedding_forward(ids, E)
    _, dE = embedding_backward(dout, cache)
    Et = torch.tensor(E, requires_grad=True)
    yt = torch.nn.functional.embedding(torch.tensor(ids), Et)
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
    np.testing.assert_allclose(dE, Et.grad.numpy(), rtol=TORCH_TOL, atol=TORCH_TOL)
