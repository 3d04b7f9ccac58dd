r"""Check a backward against numerical gradients of its forward.

``gradcheck`` works on any pair that follows minilm's op contract,

    out, cache = forward(*args, **kwargs)
    grads = backward(dout, cache)          # one entry per argument, None for integer ones

including a layer of your own. It contracts the output with a fixed random array
:math:`R`, so the scalar being differentiated is

.. math::  L(\text{args}) = \sum_i \text{out}_i \, R_i , \qquad \text{dout} = R,

and compares the analytic gradient :math:`a = \partial L / \partial \text{arg}` from
``backward(R, cache)`` with the numerical one from the centred five-point stencil

.. math::  n = \frac{8\,[L(x + h d) - L(x - h d)] - [L(x + 2h d) - L(x - 2h d)]}{12 h},

whose truncation error is :math:`O(h^4)`, so that with :math:`h = 10^{-5}` in float64 what
remains is round-off, far below the 1e-7 tolerance.

Small arguments (at most ``max_elements`` entries) are checked element by element
(:math:`d` runs over the unit vectors) and their relative error is taken in the max norm,

.. math::  \text{rel} = \frac{\lVert a - n\rVert_\infty}{\max(10^{-8},\ \lVert a\rVert_\infty + \lVert n\rVert_\infty,\ \delta / \text{tol})} ;

large ones along random unit directions plus the direction of the analytic gradient itself,
with :math:`\text{rel} = |a\cdot d - n| / \max(10^{-8}, |a\cdot d| + |n|, \delta / \text{tol})`, the
worst direction kept. Everything runs in float64: float arguments are converted before the check.

:math:`\delta` is the round-off of the stencil itself. Each loss it evaluates is a sum of the
terms :math:`\text{out}_i R_i`, rounded to about :math:`u \sum_i |\text{out}_i R_i|`
(:math:`u = 2^{-53}`; the forward's last roundings and the contraction's), and the stencil
combines :math:`(8 + 8 + 1 + 1) / 12 = 1.5` of them per :math:`h`, so
:math:`\delta = 4 \cdot 1.5\, u \sum_i |\text{out}_i R_i| / h` (``ROUNDOFF_UNITS``). A difference
below it says nothing about the backward: it is what a gradient that is tiny next to the loss
(a saturated GELU's output feeding a weight, say) shows even when it is exact. Any difference
larger than it is still judged relative to the gradient's size. A gradient whose whole size is
below that floor passes with the note "unresolved": it was not really checked.

Each row's note says what a student needs to act on: the worst element of a failing argument
(its index, the backward's value and the numerical one), a forward that returns float32 for
float64 inputs (its round-off, not the backward, then dominates), NaN or inf in an input or a
gradient, a gradient of the wrong type or shape, or a Python float argument (not checked; an
array is). The forward is run twice on the same inputs first: finite differences of a forward
that draws unseeded random numbers mean nothing, so it is refused.
"""
import inspect
from dataclasses import dataclass, field

import numpy as np

from minilm.backend import get_array_module

DEFAULT_TOL = 1e-7   # DESIGN's bound for float64; the stencil's own error is ~1e-10 or less
DEFAULT_EPS = 1e-5   # step h: O(h^4) truncation ~1e-20, round-off ~1e-16 |L| / h ~ 1e-11 |L|
ROUNDOFF_UNITS = 4 * 1.5   # the stencil's round-off, in units of u sum|out_i R_i| / h (module docstring)


class GradcheckError(AssertionError):
    """A backward disagrees with the numerical gradient of its forward."""


@dataclass(frozen=True)
class ArgumentCheck:
    """The check of one argument's gradient."""
    index: int
    name: str
    mode: str                 # "elements", "directions", or "error"
    checked: int              # how many elements or directions were compared
    max_rel_error: float
    tol: float
    note: str = ""

    @property
    def passed(self):
        return self.mode != "error" and self.max_rel_error <= self.tol


@dataclass
class GradcheckReport:
    """Per-argument results; ``passed`` is True when every argument passed."""
    op: str
    arguments: list = field(default_factory=list)

    @property
    def passed(self):
        return all(a.passed for a in self.arguments)

    @property
    def failures(self):
        return [a for a in self.arguments if not a.passed]

    def rows(self):
        """(op, argument, mode, max relative error, 'pass'/'FAIL') for each argument."""
        return [(self.op, a.name, a.mode if not a.note else f"{a.mode}: {a.note}",
                 a.max_rel_error, "pass" if a.passed else "FAIL") for a in self.arguments]

    def __str__(self):
        tols = sorted({a.tol for a in self.arguments})
        lines = [f"{'op':<16} {'argument':<10} {'max rel error':>13}  result  how "
                 f"(tolerance {', '.join(f'{t:.0e}' for t in tols)})"]
        for op, name, how, err, result in self.rows():
            lines.append(f"{op:<16} {name:<10} {err:>13.3e}  {result:<6}  {how}")
        return "\n".join(lines)

    def raise_if_failed(self):
        if not self.passed:
            names = ", ".join(f"'{a.name}' (rel error {a.max_rel_error:.3e}{'; ' + a.note if a.note else ''})"
                              for a in self.failures)
            raise GradcheckError(f"{self.op}: gradient check failed for argument {names}\n{self}")
        return self


def _is_float(x):
    return hasattr(x, "dtype") and getattr(x.dtype, "kind", "") == "f"


def _kinds(args):
    """What ``args`` holds, for an error message: '(int64 array (3,), NoneType)'."""
    kinds = [f"{a.dtype} array {tuple(a.shape)}" if hasattr(a, "dtype") else type(a).__name__ for a in args]
    return f"({', '.join(kinds)})"


def _argument_names(forward, n):
    try:
        params = [p.name for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        params = []
    if params and inspect.signature(forward).parameters[params[-1]].kind == inspect.Parameter.VAR_POSITIONAL:
        params = params[:-1]
    return [params[i] if i < len(params) else f"arg{i}" for i in range(n)]


def gradcheck(forward, backward, args, kwargs=None, *, backward_kwargs=None, eps=DEFAULT_EPS,
              tol=DEFAULT_TOL, max_elements=512, n_directions=6, seed=0, name=None, raise_on_fail=False):
    """Compare ``backward`` with the numerical gradient of ``forward`` for every float argument.

    Parameters
    ----------
    forward, backward : callables following the op contract.
    args : tuple of the forward's positional arguments (arrays, or None).
    kwargs : dict of keyword options for the forward. The forward must be deterministic
        for these (give dropout an integer seed, not a Generator).
    backward_kwargs : dict of keyword arguments for the backward (e.g. ``dh_T`` of a recurrent op).
    eps : float, step of the finite differences.
    tol : float, largest relative error that passes.
    max_elements : int, arguments up to this size are checked element by element.
    n_directions : int, random directions for larger arguments.
    seed : int, seeds the contraction array and the directions.
    name : str, what the report calls the op (default: the forward's name less ``_forward``).
    raise_on_fail : bool, raise ``GradcheckError`` naming the failing arguments.

    Returns
    -------
    GradcheckReport with one ``ArgumentCheck`` per float argument.
    """
    if not callable(forward) or not callable(backward):
        raise TypeError("gradcheck: arguments 'forward' and 'backward' must be callables")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"gradcheck: argument 'args' must be a tuple of the forward's arguments, got {type(args).__name__}")
    if not any(_is_float(a) for a in args):             # a check of nothing would pass, and mean nothing
        raise ValueError("gradcheck: argument 'args' must hold at least one floating-point array to check "
                         f"(integer arrays, such as token ids, get no gradient), got {_kinds(args)}")
    kwargs = dict(kwargs or {})
    backward_kwargs = dict(backward_kwargs or {})
    op = name or getattr(forward, "__name__", "op").removesuffix("_forward")
    xp = get_array_module(*[a for a in args if hasattr(a, "dtype")])
    rng = np.random.default_rng(seed)

    args = [a.astype(xp.float64) if _is_float(a) else a for a in args]   # float64 copies
    originals = [a.copy() if hasattr(a, "copy") else a for a in args]
    names = _argument_names(forward, len(args))

    result = forward(*args, **kwargs)
    if not (isinstance(result, tuple) and len(result) == 2):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise TypeError(f"gradcheck: the forward must return (output, cache), as the op contract says; got {got}")
    out, cache = result
    again, _ = forward(*[a.copy() if hasattr(a, "copy") else a for a in originals], **kwargs)
    if not bool(xp.array_equal(out, again, equal_nan=True)):
        raise ValueError(f"gradcheck: {op}: the forward gave two different outputs for the same inputs (random "
                         f"numbers drawn without a fixed seed?); finite differences need a deterministic "
                         f"forward: give it a fixed seed, e.g. an int in kwargs, not a Generator or np.random")
    low_precision = _is_float(out) and out.dtype.itemsize < 8   # float64 in, float32 out: its round-off remains
    R = xp.asarray(rng.standard_normal(np.shape(out)))
    grads = backward(R, cache, **backward_kwargs)
    roundoff = ROUNDOFF_UNITS * np.finfo(np.float64).eps / 2 * float(xp.sum(xp.abs(out * R))) / eps
    floor = max(1e-8, roundoff / tol)                          # see the module docstring

    report = GradcheckReport(op)
    # An input the forward or backward changed in place is reported, and the finite differences
    # below start again from the inputs as given, each forward on copies of its own, so that one
    # changed input does not make the other arguments' rows wrong as well.
    mutated = [i for i, (before, after) in enumerate(zip(originals, args))
               if hasattr(before, "shape") and not bool(xp.array_equal(before, after, equal_nan=_is_float(before)))]
    args = [a.copy() if hasattr(a, "copy") else a for a in originals]

    def finish():
        for i in mutated:
            report.arguments.append(ArgumentCheck(i, names[i], "error", 0, float("inf"), tol,
                                                  "forward or backward modified this input in place"))
        return report.raise_if_failed() if raise_on_fail else report

    if not isinstance(grads, tuple) or len(grads) != len(args):
        got = (f"a {type(grads).__name__} of {len(grads)}" if isinstance(grads, (tuple, list))
               else type(grads).__name__)
        wanted = f"a tuple of {len(args)} gradient{'s' * (len(args) != 1)} (one per argument, None for integer ones)"
        for i, a in enumerate(args):
            if _is_float(a):
                report.arguments.append(ArgumentCheck(i, names[i], "error", 0, float("inf"), tol,
                                                      f"backward must return {wanted}, got {got}"))
        return finish()

    def loss(i, x):
        trial = [a.copy() if hasattr(a, "copy") else a for a in args]
        trial[i] = x
        out, _ = forward(*trial, **kwargs)
        return float(xp.sum(out * R))

    def numerical(i, d):
        x = args[i]
        # grouped as differences so that a loss that does not depend on x gives exactly 0
        near = loss(i, x + eps * d) - loss(i, x - eps * d)
        far = loss(i, x + 2 * eps * d) - loss(i, x - 2 * eps * d)
        return (8 * near - far) / (12 * eps)

    for i, (x, g) in enumerate(zip(args, grads)):
        if isinstance(x, float) and not hasattr(x, "shape"):      # a NumPy scalar has a shape and is checked
            report.arguments.append(ArgumentCheck(i, names[i], "skipped", 0, 0.0, tol,
                                                  f"a Python float is not checked; pass np.array({x!r}) to check it"))
            continue
        if not _is_float(x):
            continue
        if g is None or not hasattr(g, "shape") or tuple(g.shape) != tuple(x.shape):
            got = "None" if g is None else f"shape {tuple(g.shape)}" if hasattr(g, "shape") else type(g).__name__
            report.arguments.append(ArgumentCheck(i, names[i], "error", 0, float("inf"), tol,
                                                  f"gradient must be an array of shape {tuple(x.shape)}, got {got}"))
            continue
        if x.size == 0:
            report.arguments.append(ArgumentCheck(i, names[i], "skipped", 0, 0.0, tol, "it has no elements"))
            continue
        g = xp.asarray(g, dtype=xp.float64)
        notes = []
        if x.size <= max_elements:
            n = xp.zeros(x.shape, dtype=x.dtype)               # C-ordered, whatever x's strides
            for j in range(x.size):
                d = xp.zeros(x.shape, dtype=x.dtype)
                d.reshape(-1)[j] = 1.0
                n.reshape(-1)[j] = numerical(i, d)
            scale = float(xp.max(xp.abs(g)) + xp.max(xp.abs(n)))
            err = float(xp.max(xp.abs(g - n))) / max(floor, scale)
            mode, checked = "elements", int(x.size)
            if not err <= tol and bool(xp.all(xp.isfinite(g))) and bool(xp.all(xp.isfinite(n))):
                worst = np.unravel_index(int(xp.argmax(xp.abs(g - n))), x.shape)
                notes.append(f"worst at index {tuple(int(k) for k in worst)}: backward {float(g[worst]):.6g}, "
                             f"numerical {float(n[worst]):.6g}")
        else:
            directions = [xp.asarray(rng.standard_normal(x.shape)) for _ in range(n_directions)]
            gnorm = float(xp.linalg.norm(g))
            if 0 < gnorm < float("inf"):                # g's own direction, when it has one
                directions.append(g / gnorm)
            errors, scale = [], 0.0
            for d in directions:
                d = d / float(xp.linalg.norm(d))
                a, n = float(xp.sum(g * d)), numerical(i, d)
                errors.append(abs(a - n) / max(floor, abs(a) + abs(n)))
                scale = max(scale, abs(a) + abs(n))
            err = float(np.max(errors))             # NaN, from a NaN or inf in g or the loss, stays NaN: a failure
            mode, checked = "directions", len(directions)
        if not bool(xp.all(xp.isfinite(x))):
            notes.append("the input holds NaN or inf")
        elif not bool(xp.all(xp.isfinite(g))):
            notes.append("the backward's gradient holds NaN or inf")
        elif not err <= tol and low_precision:
            notes.append(f"the forward returns {out.dtype} for float64 inputs, so the differences carry its "
                         f"round-off; compute in the input's dtype (or try eps=1e-3, tol=1e-3)")
        elif err <= tol and floor > max(1e-8, scale):
            notes.append("unresolved: this gradient is below the round-off of the loss's differences; check it "
                         "with a forward of its own")
        report.arguments.append(ArgumentCheck(i, names[i], mode, checked, err, tol, "; ".join(notes)))

    return finish()
