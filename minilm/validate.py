"""Argument checks shared by every public entry point.

Each check raises an error whose message names the op (or command), the argument,
what was expected and what was received, e.g.

    layernorm: argument 'gamma' must have shape (C,) = (16,), got (8,)

Shape errors are ``ValueError``; a wrong kind of object or dtype is ``TypeError``. An option of the
wrong kind (``p="0.5"``, ``n_head=2.0``, ``causal=None``) raises ``OptionTypeError``: a ``TypeError``
that is also the ``ValueError`` these checks raised for it before.
"""
import contextlib
import math
import numbers
import reprlib

import numpy as np

FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong kind: a TypeError, and (as minilm raised before) a ValueError."""


_abridged = reprlib.Repr()
_abridged.maxstring = _abridged.maxother = 60
_abridged.maxlist = _abridged.maxtuple = _abridged.maxset = _abridged.maxdict = 6


def shown(value):
    """``repr(value)``, abridged to about a line: a list of a million token ids passed as a count,
    or a whole text passed as a choice, is not printed whole into the message."""
    return _abridged.repr(value)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value):
    """math.isfinite for a real number, False for an integer past float's range (where math.isfinite
    raises OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def option_error(op, name, what, value, right_kind, role="option"):
    """The error for an option (or another ``role``: "argument") that is not ``what``: a ValueError
    where it is of the right kind but out of range, an OptionTypeError where it is of another kind."""
    error = ValueError if right_kind else OptionTypeError
    return error(f"{op}: {role} '{name}' must be {what}, got {shown(value)}")


def _is_array(x):
    # numpy.ndarray (asked first: the checks run on every op call), cupy.ndarray, or anything else
    # that quacks like an array
    return isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim"))


def require_array(op, name, x):
    if not _is_array(x):
        raise TypeError(f"{op}: argument '{name}' must be an array, got {type(x).__name__}")


def require_float(op, name, x):
    """x is an array of a floating dtype (float16/32/64, bfloat16)."""
    require_array(op, name, x)
    if x.dtype.kind != "f":                                       # dtype.kind is cheap; str(dtype) is not
        if x.dtype.name != "bfloat16":
            raise TypeError(
                f"{op}: argument '{name}' must be a floating-point array "
                f"(float16, float32 or float64; bfloat16 on the cupy backend), got dtype {x.dtype}"
            )
        if isinstance(x, np.ndarray):                            # NumPy, unlike CuPy, promotes it to float32
            raise TypeError(f"{op}: argument '{name}' has dtype bfloat16, which {_BFLOAT16_ON_CPU}")


_BFLOAT16_ON_CPU = ("the numpy and numba backends do not run (NumPy computes a bfloat16 product, or one "
                    "with a Python float, in float32); expected float16, float32 or float64 there, or the "
                    "cupy backend for bfloat16")


def require_backend_dtype(op, name, dtype, backend_name):
    """A model's ``dtype`` that ``backend_name`` runs: bfloat16 on the cupy backend only."""
    if dtype.name == "bfloat16" and backend_name != "cupy":
        raise ValueError(f"{op}: argument '{name}' bfloat16, which {_BFLOAT16_ON_CPU}; "
                         f"the backend is {backend_name}")


def require_ndim(op, name, x, ndim, dims):
    """x has exactly ``ndim`` dimensions, described by ``dims`` such as "(B, T, C)"."""
    require_array(op, name, x)
    if x.ndim != ndim:
        raise ValueError(
            f"{op}: argument '{name}' must have {ndim} dimension{'s' * (ndim != 1)} "
            f"{dims}, got shape {tuple(x.shape)}"
        )


def require_min_ndim(op, name, x, ndim, dims):
    require_array(op, name, x)
    if x.ndim < ndim:
        raise ValueError(
            f"{op}: argument '{name}' must have at least {ndim} dimension{'s' * (ndim != 1)} "
            f"{dims}, got shape {tuple(x.shape)}"
        )


def require_nonempty(op, name, x, axis, letter, dims):
    """x.shape[axis] >= 1, for an axis that the op reduces over (a max, mean or sum of no entries,
    where a softmax or a normalisation has nothing to work on); ``letter`` names it in ``dims``."""
    if x.shape[axis] == 0:
        raise ValueError(f"{op}: argument '{name}' must have {letter} >= 1 in {dims}, got shape {tuple(x.shape)}")


def require_shape(op, name, x, shape, dims):
    """x.shape equals ``shape``; ``dims`` names the letters, e.g. "(C,)"."""
    if isinstance(x, np.ndarray) and x.shape == tuple(shape):     # the common case, decided at once
        return
    require_array(op, name, x)
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape) != shape:
        raise ValueError(f"{op}: argument '{name}' must have shape {dims} = {shape}, got {tuple(x.shape)}")


def require_gradient(op, name, d, shape, dims):
    """An upstream gradient (a backward's dy, dout, dh, dh_T, ...): a float array of ``shape``.
    An int, bool or complex one would flow through NumPy's promotions into gradients of its own
    dtype. (A float of another width than the forward's is taken: the gradients follow NumPy's
    promotion, as the tiers' parity tests check.)"""
    if isinstance(d, np.ndarray) and d.dtype.kind == "f" and d.shape == tuple(shape):     # the common case
        return
    require_float(op, name, d)
    require_shape(op, name, d, shape, dims)


def require_cache(op, cache, name):
    """``cache`` is what the op's forward returned: a NamedTuple of class ``name`` (each tier may
    define its own class of that name). Another op's cache, None or a tuple of one's own would
    otherwise fail deep in the backward, or be computed with."""
    if type(cache).__name__ != name:
        forward = op.removesuffix("_backward") + "_forward"
        raise TypeError(f"{op}: argument 'cache' must be the {name} that {forward} returned, "
                        f"got {type(cache).__name__}")


def require_same_dtype(op, **arrays):
    """All the named float arrays share one dtype (a silent float32/float64 mix is an error)."""
    named = [(k, v) for k, v in arrays.items() if v is not None]
    first_name, first = named[0]
    for name, x in named[1:]:       # (the byte order may differ: '>f8' is float64 read from another machine's file)
        if x.dtype != first.dtype and x.dtype.newbyteorder("=") != first.dtype.newbyteorder("="):
            raise TypeError(
                f"{op}: argument '{name}' must have the same dtype as '{first_name}' "
                f"({first.dtype}), got {x.dtype}"
            )


_device_ids_checked = False      # True while a caller has checked every id on the host already


@contextlib.contextmanager
def device_ids_checked_by_caller():
    """Within this block ``require_ids`` does not read GPU arrays' ids back: the caller has checked
    them on the host before copying them to the device. For a CUDA graph capture
    (``minilm.gpu.graph``), during which the device cannot be read, and which checks each batch
    of ids on the host before it is copied into the graph's input."""
    global _device_ids_checked
    previous, _device_ids_checked = _device_ids_checked, True
    try:
        yield
    finally:
        _device_ids_checked = previous


def require_ids(op, name, ids, V, *, ignore_index=None):
    """Integer token ids with 0 <= id < V; an id equal to ``ignore_index`` (where given) is allowed too.

    On a GPU the smallest and largest id come back to the host in one transfer (one wait for the
    device, not two), except within ``device_ids_checked_by_caller``.
    """
    require_array(op, name, ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: argument '{name}' must be an integer array of token ids, got dtype {ids.dtype}")
    if _device_ids_checked and not isinstance(ids, np.ndarray):
        return
    if ids.size:
        from minilm.backend import get_array_module
        xp = get_array_module(ids)
        if ignore_index is not None:
            ids = xp.where(ids == ignore_index, 0, ids)                # 0 is an id of every vocabulary
        if xp is np:
            lo, hi = int(ids.min()), int(ids.max())
        else:
            lo, hi = (int(v) for v in xp.stack([ids.min(), ids.max()]).tolist())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            also = "" if ignore_index is None else f" or {ignore_index}"
            raise ValueError(f"{op}: argument '{name}' must hold ids in [0, {V}) (V = {V}){also}, got {bad}")


def require_choice(op, name, value, choices):
    """value is one of the strings ``choices``: another string is a ValueError, another kind of
    object an OptionTypeError (an array is not compared element by element with the choices)."""
    if not (isinstance(value, str) and value in choices):
        raise option_error(op, name, f"one of {', '.join(map(repr, choices))}", value, isinstance(value, str))


def require_probability(op, name, p, *, upper_open=True):
    """0 <= p < 1 (or <= 1 when ``upper_open`` is False)."""
    if not (is_real(p) and 0.0 <= p and (p < 1.0 if upper_open else p <= 1.0)):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise option_error(op, name, f"a number in {interval}", p, is_real(p))


def require_positive(op, name, value, kind=float, *, finite=True):
    """value > 0, an integer where ``kind`` is int, and finite unless ``finite`` is False."""
    right_kind = is_integer(value) if kind is int else is_real(value)
    ok = right_kind and value > 0 and (kind is int or not finite or is_finite(value))
    if not ok:
        what = "a positive integer" if kind is int else "a positive finite number" if finite else "a positive number"
        raise option_error(op, name, what, value, right_kind)


def as_scalar_gradient(op, name, value, xp, dtype):
    """``value`` (a real number, or a 0-d numeric array) as a 0-d array of ``dtype``: the upstream
    gradient of a scalar loss. None or a string would become NaN or a number silently."""
    numeric = (isinstance(value, numbers.Real) and not isinstance(value, bool)) or \
        (hasattr(value, "dtype") and hasattr(value, "shape") and (value.dtype.kind in "fiu" or value.dtype.name == "bfloat16"))
    if not numeric:
        raise TypeError(f"{op}: argument '{name}' must be a real number or a 0-d array, got {type(value).__name__}")
    value = xp.asarray(value, dtype=dtype)
    require_shape(op, name, value, (), "() (a scalar)")
    return value


def is_count(value):
    """An integer >= 0 (a NumPy one too), and not a bool, which Python counts as an integer."""
    return is_integer(value) and value >= 0


def require_count(op, name, value):
    """value is an integer >= 0."""
    if not is_count(value):
        raise option_error(op, name, "an integer >= 0", value, is_integer(value))


def require_seed(op, name, seed, *, allow_none=False):
    """An integer seed >= 0 (numpy's generators take no negative seed), or None where ``allow_none``."""
    if seed is None and allow_none:
        return
    if not is_count(seed):
        what = "None or an integer >= 0" if allow_none else "an integer >= 0"
        raise option_error(op, name, what, seed, is_integer(seed))


def require_bool(op, name, value):
    """value is True or False (NumPy's bool too), not a truthy string or number."""
    if not isinstance(value, (bool, np.bool_)):
        raise option_error(op, name, "True or False", value, False)


def require_divisible(op, name, value, by_name, by):
    if value % by != 0:
        raise ValueError(f"{op}: {name} = {value} must be divisible by {by_name} = {by}")


def as_numpy_dtype(op, name, dtype):
    """Parse a dtype name given by a user ('float32', 'float64', ...; 'bfloat16' through ml_dtypes)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError(f"{op}: option '{name}' bfloat16 needs the ml_dtypes package, which comes with "
                             f"CuPy (pip install -e '.[gpu]' in a checkout)") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{op}: option '{name}' must be a dtype name such as 'float32', got {dtype!r}") from None


def as_float_dtype(op, name, dtype):
    """``as_numpy_dtype``, for a dtype that must be floating-point (float16/32/64 or bfloat16)."""
    dtype = as_numpy_dtype(op, name, dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise ValueError(f"{op}: option '{name}' must be a floating-point dtype such as float32, got {dtype}")
    return dtype
