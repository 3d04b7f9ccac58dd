"""Parity of the CuPy tier's recurrent ops (gpu/rnn.py, lstm.py, gru.py) with the reference.

Every GPU function must equal the reference function of the same name run by NumPy on the same
inputs: forward (output, every cache field, final states) and backward (with and without
final-state gradients), where the error of an array is ``relative_error`` = max|actual -
expected| / max(max|expected|, floor). Then: float16 and bfloat16 runs against the float64
reference, gradient checks of the GPU pair itself, caches interchanging with the reference run
on CuPy, strided inputs, purity, mixed dtypes, bad input, and the backend switch.

Skipped, with the reason, where CuPy or a GPU is missing (CI has neither).
"""
import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="the CuPy tier's tests need CuPy (pip install -e '.[gpu]' in minilm's checkout)")
try:
    _no_gpu = None if cupy.cuda.runtime.getDeviceCount() > 0 else "none was found"
except Exception as e:  # the CUDA driver or runtime is missing or broken
    _no_gpu = f"CUDA reported: {e}"
if _no_gpu is not None:
    pytest.skip(f"the CuPy tier's tests need an NVIDIA GPU ({_no_gpu})", allow_module_level=True)

import minilm  # noqa: E402
from minilm import ops  # noqa: E402
from minilm.gpu import gru as gpu_gru, lstm as gpu_lstm, rnn as gpu_rnn  # noqa: E402
from minilm.gpu._core import BFLOAT16  # noqa: E402
from minilm.gradcheck import DEFAULT_TOL, gradcheck  # noqa: E402
from minilm.reference import gru as ref_gru, lstm as ref_lstm, rnn as ref_rnn  # noqa: E402
from minilm.testing import (ARGUMENTS, STATES, final_state_grads, recurrent_args, relative_error,  # noqa: E402
                            with_final_states)

# float64: the kernels add and multiply in the reference's order; only the GPU's exp/tanh (an
# ulp or so from NumPy's), its fused multiply-adds and cuBLAS's order of summation differ. Through
# up to 7 steps of gates that stays below 1e-14 relative (9e-15 the worst seen on an H100); the
# DESIGN's bound for parity is 1e-12.
EXACT_TOL = 1e-12
# float32: both sides compute in float32 (ulp 1.2e-7) with the same few-ulp differences, so the
# arrays agree to ~1e-6 of the O(1) gates and states they come from. An array that cancels down
# below that scale (a gradient summed from terms of both signs) keeps their absolute round-off,
# so its error is taken relative to max(max|expected|, 1), the scale of those terms.
FLOAT32_TOL = 1e-5
TOL = {np.float64: EXACT_TOL, np.float32: FLOAT32_TOL}
SCALE_FLOOR = {np.float64: 0.0, np.float32: 1.0}
# 16-bit storage against the float64 reference on the same (rounded) inputs. The kernels and
# cuBLAS compute in float32, so the error is the rounding of every stored value to 16 bits, unit
# roundoff u = 2^-11 = 4.9e-4 (float16) or 2^-8 = 3.9e-3 (bfloat16). A step stores ~5 values per
# unit (x_t W_x + b, h_{t-1} W_h, the gates, c_t, h_t; backward the gate gradients and the
# carried dh, dc), each off by at most u of an O(1) value; independent roundings add up like a
# random walk over the T = 5 steps and the B·T terms of a weight gradient, so the arrays stay
# within a few u of the O(1) scale (floor 1). On an H100 the worst of 9 draws per op and dtype
# was 2.4 u (float16) and 2.3 u (bfloat16); the bound is 10 u.
LOW_PRECISION_ULPS = 10
LOW_PRECISION_TOL = {np.dtype(np.float16): LOW_PRECISION_ULPS * 2.0**-11}
if BFLOAT16 is not None:
    LOW_PRECISION_TOL[BFLOAT16] = LOW_PRECISION_ULPS * 2.0**-8

OPS = ("rnn", "lstm", "gru")
REFERENCE = {"rnn": ref_rnn, "lstm": ref_lstm, "gru": ref_gru}
GPU = {"rnn": gpu_rnn, "lstm": gpu_lstm, "gru": gpu_gru}
# (B, T, D, H): B = 1 and T = 1, H below, across and well off multiples of 32 (a warp)
SHAPES = [(1, 1, 3, 5), (2, 5, 4, 33), (3, 7, 6, 50), (1, 3, 2, 1), (8, 4, 16, 100)]


# --- helpers ----------------------------------------------------------------------------------

def forward(tier, op):
    return getattr(tier[op], f"{op}_forward")


def backward(tier, op):
    return getattr(tier[op], f"{op}_backward")


def to_gpu(arrays):
    """A tuple of CuPy copies of NumPy arrays (a dict: the same keys)."""
    if isinstance(arrays, dict):
        return {k: cupy.asarray(v) for k, v in arrays.items()}
    return tuple(cupy.asarray(a) for a in arrays)


def assert_same(actual, expected, tol, what="", floor=None, dtype=None):
    """``actual`` (CuPy) has ``expected``'s shape and dtype (or ``dtype``), is finite, and is within
    ``tol`` of it in ``relative_error`` (floor: the dtype's)."""
    assert isinstance(actual, cupy.ndarray), f"{what}: {type(actual).__name__}, not a CuPy array"
    actual = cupy.asnumpy(actual)
    dtype = np.dtype(expected.dtype if dtype is None else dtype)
    assert actual.shape == expected.shape and actual.dtype == dtype, \
        f"{what}: {actual.shape} {actual.dtype}, expected {expected.shape} {dtype}"
    assert np.all(np.isfinite(actual.astype(np.float64))), what
    rel = relative_error(actual, expected, SCALE_FLOOR.get(dtype.type, 1.0) if floor is None else floor)
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"


def gradient_names(op):
    return [f"d{name}" for name in ARGUMENTS[op]]


def assert_same_all(actual, expected, tol, names, floor=None, dtype=None):
    assert len(actual) == len(expected) == len(names)
    for a, e, name in zip(actual, expected, names):
        assert_same(a, e, tol, name, floor, dtype)


# --- parity with the reference ------------------------------------------------------------------

@pytest.mark.parametrize("finals", [False, True], ids=["no-final-grads", "final-grads"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{B}-T{T}-D{D}-H{H}" for B, T, D, H in SHAPES])
@pytest.mark.parametrize("op", OPS)
def test_equals_reference(op, shape, dtype, finals):
    B, T, D, H = shape
    seed = sum(shape)
    args = recurrent_args(op, B, T, D, H, seed, dtype=dtype)
    tol = TOL[dtype]
    h, cache = forward(GPU, op)(*to_gpu(args))
    h_ref, cache_ref = forward(REFERENCE, op)(*args)

    assert type(cache) is type(cache_ref)
    assert_same(h, h_ref, tol, "h")
    assert_same_all(cache, cache_ref, tol, cache._fields)
    for s in STATES[op]:
        assert_same(getattr(cache, f"{s}_T"), getattr(cache_ref, f"{s}_T"), tol, f"{s}_T")

    dh = np.random.default_rng(seed).standard_normal(h.shape).astype(dtype)
    kwargs = final_state_grads(op, B, H, seed, dtype) if finals else {}
    grads = backward(GPU, op)(cupy.asarray(dh), cache, **to_gpu(kwargs))
    grads_ref = backward(REFERENCE, op)(dh, cache_ref, **kwargs)
    assert_same_all(grads, grads_ref, tol, gradient_names(op))


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOL), ids=[d.name for d in LOW_PRECISION_TOL])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_is_near_the_float64_reference(op, dtype):
    """16-bit arrays in, 16-bit arrays out (computed in float32), within LOW_PRECISION_TOL of the
    float64 reference run on the same, already rounded, inputs."""
    tol = LOW_PRECISION_TOL[dtype]
    B, T, D, H = 4, 5, 6, 40
    low = tuple(a.astype(dtype) for a in recurrent_args(op, B, T, D, H, seed=11))
    exact = tuple(a.astype(np.float64) for a in low)            # the rounding of the inputs is not counted
    dh = np.random.default_rng(11).standard_normal((B, T, H)).astype(dtype)
    finals = {k: v.astype(dtype) for k, v in final_state_grads(op, B, H, seed=11).items()}

    h, cache = forward(GPU, op)(*to_gpu(low))
    h_ref, cache_ref = forward(REFERENCE, op)(*exact)
    assert_same(h, h_ref, tol, "h", floor=1.0, dtype=dtype)
    for s in STATES[op]:
        assert_same(getattr(cache, f"{s}_T"), getattr(cache_ref, f"{s}_T"), tol, f"{s}_T", floor=1.0, dtype=dtype)
    grads = backward(GPU, op)(cupy.asarray(dh), cache, **to_gpu(finals))
    grads_ref = backward(REFERENCE, op)(dh.astype(np.float64), cache_ref,
                                        **{k: v.astype(np.float64) for k, v in finals.items()})
    assert_same_all(grads, grads_ref, tol, gradient_names(op), floor=1.0, dtype=dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_caches_interchange(op, dtype):
    """The GPU backward accepts the cache of the reference run on CuPy (the same NamedTuple), and
    the reference backward the GPU's, with the same gradients."""
    B, T, D, H = 3, 4, 5, 37
    args = to_gpu(recurrent_args(op, B, T, D, H, seed=12, dtype=dtype))
    _, cache = forward(GPU, op)(*args)
    _, cache_ref = forward(REFERENCE, op)(*args)
    dh = cupy.asarray(np.random.default_rng(12).standard_normal((B, T, H)).astype(dtype))
    kwargs = to_gpu(final_state_grads(op, B, H, seed=12, dtype=dtype))
    expected = tuple(cupy.asnumpy(g) for g in backward(REFERENCE, op)(dh, cache_ref, **kwargs))
    assert_same_all(backward(GPU, op)(dh, cache_ref, **kwargs), expected, TOL[dtype], gradient_names(op))
    assert_same_all(backward(REFERENCE, op)(dh, cache, **kwargs), expected, TOL[dtype], gradient_names(op))


@pytest.mark.parametrize("op", OPS)
def test_strided_inputs(op):
    """Views with any strides (every other time step, Fortran-ordered weights, a batch slice of
    the state, a reversed bias) give the reference's results on their contiguous copies."""
    B, T, D, H = 3, 5, 4, 10
    named = dict(zip(ARGUMENTS[op], to_gpu(recurrent_args(op, B, 2 * T, D, H, seed=4))))
    views = {"x": named["x"][:, ::2]}                           # (B, T, D), time stride 2
    for name in ARGUMENTS[op][1:]:
        a = named[name]
        if a.ndim == 2:
            views[name] = cupy.asfortranarray(a) if name.startswith("W") else cupy.concatenate([a, a])[::2]
        else:
            views[name] = cupy.ascontiguousarray(a[::-1])[::-1]   # negative stride
    strided = tuple(views[name] for name in ARGUMENTS[op])
    contiguous = tuple(cupy.asnumpy(a) for a in strided)
    assert not all(a.flags.c_contiguous for a in strided)

    h, cache = forward(GPU, op)(*strided)
    h_ref, cache_ref = forward(REFERENCE, op)(*contiguous)
    assert_same(h, h_ref, EXACT_TOL, "h")
    dh = np.random.default_rng(5).standard_normal((B, 2 * T, H))
    finals = final_state_grads(op, B, H, seed=5)
    strided_finals = {k: cupy.asfortranarray(cupy.asarray(v)) for k, v in finals.items()}
    assert_same_all(backward(GPU, op)(cupy.asarray(dh)[:, ::2], cache, **strided_finals),
                    backward(REFERENCE, op)(np.ascontiguousarray(dh[:, ::2]), cache_ref, **finals),
                    EXACT_TOL, gradient_names(op))


# --- gradients of the GPU pair ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 3, 2, 4), (3, 4, 3, 33)], ids=["B1-T1", "B2-T3", "B3-T4-H33"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, shape):
    """The GPU backward equals the numerical gradient of the GPU forward in float64, final-state
    gradients included (the output carries h_T, c_T, so the contraction reaches dh_T, dc_T)."""
    fwd, bwd = with_final_states(op, forward(GPU, op), backward(GPU, op))
    args = to_gpu(recurrent_args(op, *shape, seed=sum(shape)))
    report = gradcheck(fwd, bwd, args, seed=sum(shape), name=f"cupy {op}+states")
    assert [a.name for a in report.arguments] == list(ARGUMENTS[op])
    assert report.passed, str(report)
    assert max(a.max_rel_error for a in report.arguments) <= DEFAULT_TOL


# --- purity, dtypes, bad input ------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_backward_leaves_its_inputs_and_the_cache_alone(op):
    """Backward twice on one forward's cache: no input, argument, output or cache entry changes,
    the gradients are the same both times, and none shares memory with an input."""
    B, T, D, H = 2, 4, 3, 9
    args = to_gpu(recurrent_args(op, B, T, D, H, seed=9))
    h, cache = forward(GPU, op)(*args)
    dh = cupy.asarray(np.random.default_rng(10).standard_normal((B, T, H)))
    finals = to_gpu(final_state_grads(op, B, H, seed=10))
    arrays = [*args, h, *cache, dh, *finals.values()]
    before = [a.copy() for a in arrays]

    grads = backward(GPU, op)(dh, cache, **finals)
    again = backward(GPU, op)(dh, cache, **finals)

    assert all(bool(cupy.array_equal(a, b)) for a, b in zip(arrays, before))
    assert all(bool(cupy.array_equal(g, g2)) for g, g2 in zip(grads, again))
    inputs = [dh, *finals.values(), *cache]
    assert not any(cupy.shares_memory(g, a) for g in grads for a in inputs), "a gradient aliases an input"


@pytest.mark.parametrize("op", OPS)
def test_gradient_of_another_dtype_runs_the_reference(op):
    """A float64 dh for a float32 cache gives exactly what the reference gives (its promotions)."""
    args = to_gpu(recurrent_args(op, 2, 3, 4, 5, seed=8, dtype=np.float32))
    _, cache = forward(GPU, op)(*args)
    dh = cupy.asarray(np.random.default_rng(8).standard_normal((2, 3, 5)))
    for g, g_ref in zip(backward(GPU, op)(dh, cache), backward(REFERENCE, op)(dh, cache)):
        assert g.dtype == g_ref.dtype
        assert bool(cupy.array_equal(g, g_ref))


@pytest.mark.parametrize("op", OPS)
def test_numpy_arrays_run_the_reference(op):
    args = recurrent_args(op, 2, 3, 4, 5, seed=7)
    h, cache = forward(GPU, op)(*args)
    h_ref, _ = forward(REFERENCE, op)(*args)
    assert isinstance(h, np.ndarray)
    np.testing.assert_array_equal(h, h_ref)


BAD = [   # (op, argument, how it is spoiled)
    ("rnn", "W_x", lambda a: a[:-1]),
    ("lstm", "c0", lambda a: a.astype(cupy.float32)),
    ("lstm", "x", lambda a: a[:, :0]),
    ("gru", "b_h", lambda a: a[None]),
]


@pytest.mark.parametrize("op, name, spoil", BAD, ids=[f"{op}-{name}" for op, name, _ in BAD])
def test_bad_forward_input_raises_the_reference_error(op, name, spoil):
    named = dict(zip(ARGUMENTS[op], to_gpu(recurrent_args(op, 2, 3, 4, 5))))
    named[name] = spoil(named[name])
    with pytest.raises((TypeError, ValueError)) as expected:
        forward(REFERENCE, op)(*named.values())
    with pytest.raises(expected.type, match=rf"^{op}: argument '{name}'") as got:
        forward(GPU, op)(*named.values())
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("op, name", [("rnn", "dh"), ("lstm", "dh_T"), ("lstm", "dc_T"), ("gru", "dh_T")])
def test_bad_backward_input_raises_the_reference_error(op, name):
    B, T, D, H = 2, 3, 4, 5
    h, cache = forward(GPU, op)(*to_gpu(recurrent_args(op, B, T, D, H)))
    dh, kwargs = ((cupy.zeros((B, T + 1, H)), {}) if name == "dh"
                  else (cupy.zeros_like(h), {name: cupy.zeros((B, H + 1))}))
    with pytest.raises(ValueError) as expected:
        backward(REFERENCE, op)(dh, cache, **kwargs)
    with pytest.raises(ValueError, match=rf"^{op}_backward: argument '{name}'") as got:
        backward(GPU, op)(dh, cache, **kwargs)
    assert str(got.value) == str(expected.value)


# --- the backend switch ---------------------------------------------------------------------------

def test_the_cupy_backend_uses_the_kernels():
    minilm.use("cupy")
    for op in OPS:
        for direction in ("forward", "backward"):
            name = f"{op}_{direction}"
            assert getattr(ops, name) is getattr(GPU[op], name)
