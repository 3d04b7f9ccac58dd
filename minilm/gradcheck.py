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
remains is round-off, far below the 1e-7 tolerance. The points :math:`x + c h d` are rounded to
float64, by up to :math:`u |x|` an element, which next to h is not small when |x| is large (1e-8
of the step at |x| = 1e3); so the analytic side is taken along the direction the stencil really
took, :math:`D = [8 (p_1 - p_{-1}) - (p_2 - p_{-2})] / 12h` with :math:`p_c` the rounded points
(:math:`p_c - x` is exact), which is d up to those roundings: :math:`a \cdot D` against n.

Small arguments (at most ``max_elements`` entries) are checked element by element
(:math:`d` runs over the unit vectors), each element's relative error on its own, so that a wrong
small element does not hide under the argument's largest, and the worst is the argument's,

.. math::  \text{rel} = \max_j \frac{|a_j - n_j|}{\max(10^{-8},\ |a_j| + |n_j|,\ \delta / \text{tol})} ;

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
larger than it is still judged relative to the gradient's size. Where :math:`\delta / \text{tol}`
exceeds even the largest :math:`|a| + |n|`, the gradient is so checked to :math:`\delta` only, short
of the tolerance, and the row's note says "unresolved" and how closely.

That prediction takes the loss's round-off from the output's size, and it falls short where the
forward subtracts terms much larger than its output: a confident cross-entropy's loss,
:math:`\log \sum_j e^{x_j} - x_t \approx 10^{-4}`, comes from terms near 10, whose round-off is 10^5
times larger. So where an argument fails, the round-off is also measured: :math:`\sigma`, the error
of one loss, from the fourth differences of L at ``NOISE_POINTS`` exactly equally spaced points a
hundredth of h apart and h apart (and 100 h apart where neither showed any; Moré and Wild's
ECnoise), and the argument is judged again with :math:`\sigma` in place of
:math:`u \sum_i |\text{out}_i R_i|` where it is larger; the note says how much larger. The numerical
side does not depend on the backward, so no error of the backward's can widen the floor. But a
forward that rounds through float32 or float16 inside widens it as far as its own rounding, which
could hide any error. So one rule holds for :math:`\delta`, predicted or measured: a row passes only
where :math:`\delta` is at most ``RESOLUTION_LIMIT`` tolerances (1e-3) of the argument's largest
gradient (along random directions, its largest directional derivative; near a stationary point, the
loss's slope over the steps where that is larger), so that an error of 0.1% there is still caught;
otherwise a wrong backward would pass as well, and the row fails as not checkable at these inputs,
saying why (a row that fails anyway, by differences within ``ROUNDOFF_REACH`` times what is
resolved, says that its failure may be that round-off). That gradient is the numerical one, so that
no answer of the backward's moves the limit either. The round-off is measured too where the
numerical gradient is exactly 0 throughout, so that a backward of zeros does not pass a loss rounded
to a grid that the measurement's steps (up to 2300 h) cross. A loss that moved at none of them,
constant there or on a coarser grid still, cannot be told apart from a constant one: such a row
passes a backward below the resolution, and its note says that nothing was checked.

R and the random directions come from a stream of their own, seeded by ``(STREAM, seed)``, so
that R never equals an input drawn with ``np.random.default_rng(seed)``: for a scale-invariant
layer (RMSNorm without eps), whose :math:`J^\top x = 0`, R = x would hide every error in the
x-gradient. The backward gets a copy of R as ``dout``; one that writes into it fails the check
(its caller's array, which a residual's other branch also reads, would change).

Each row's note says what a student needs to act on: the worst element of a failing argument
checked element by element (its index, the backward's value and the numerical one, and their
difference), that an argument checked along random directions cannot point at an element, a
forward that returns float32 for float64 inputs (its round-off, not the backward, then
dominates), a backward that returns a narrower dtype than float64, NaN or inf in an input, the
output or a gradient, a gradient of the wrong type or shape, a forward that is not smooth at or
next to the inputs (its differences over h and 2h do not scale as a smooth function's: a kink, a
ReLU at 0 among them, a branch, a random draw, float32 inside the forward), inputs so large that
the forward's own round-off may pass the tolerance, an input changed in place (that argument's row
fails), a backward that changes the output its cache holds (a row "out" fails), or an argument
that is not checked (a Python float, which an array would be; a complex array). The forward is run twice on the same inputs first, and once more at the
end: finite differences of a forward that draws unseeded random numbers mean nothing, so it is
refused, as is one that changes its keyword arguments in place.
"""
import inspect
import numbers
from dataclasses import dataclass, field

import numpy as np

from minilm.backend import get_array_module
from minilm.validate import is_real, option_error, require_count, require_positive, require_seed

DEFAULT_TOL = 1e-7   # DESIGN's bound for float64; the stencil's own error is ~1e-10 or less
DEFAULT_EPS = 1e-5   # step h: O(h^4) truncation ~1e-20, round-off ~1e-16 |L| / h ~ 1e-11 |L|
ROUNDOFF_UNITS = 4 * 1.5   # the stencil's round-off, in units of u sum|out_i R_i| / h (module docstring)
# R and the directions come from a stream of their own, (STREAM, seed), so that they never equal an
# input a user drew with np.random.default_rng(seed): R = x would hide, for example, every error in
# the x-gradient of a scale-invariant layer (RMSNorm without eps), whose J^T x is 0.
STREAM = 0x67726164        # "grad"
# Where a failure may be the loss's round-off, larger than predicted, it is measured from this many
# losses at each of two spacings: NOISE_POINTS - 4 fourth differences, with which sigma comes out
# under half its value about once in 75 (Gaussian errors; uniform ones, once in 134), and the
# floor with it: a right backward may then fail (a false alarm), a wrong one never passes for it
NOISE_POINTS = 24
# A row passes only where finite differences resolve the argument's largest gradient (along random
# directions: its largest directional derivative) to this many tolerances (1e-3 at the default tol:
# an error of 0.1% in it is still caught): beyond, it fails as
# not checkable at these inputs, since a wrong backward would pass too (a forward rounding through
# float16 inside: any backward at all; through float32: errors of ~1%)
RESOLUTION_LIMIT = 1e4
# A measured round-off this many times the predicted one is named as the cause of a wide floor (a
# forward subtracting large terms, or rounding inside); one nearer the prediction is only a note
# where it changed a verdict: a factor of 1.2 says nothing about the forward (and blaming it for a
# wrong backward's failure would mislead)
NOTABLE_ROUNDOFF = 10
# A failing row's largest difference within this many resolutions may be the round-off itself (sigma
# reads low by half about once in 75: NOISE_POINTS); one beyond it is the backward's
ROUNDOFF_REACH = 10


class GradcheckError(AssertionError):
    """A backward disagrees with the numerical gradient of its forward."""


@dataclass(frozen=True)
class ArgumentCheck:
    """The check of one argument's gradient."""
    index: int
    name: str
    mode: str                 # "elements", "directions", "skipped" (not checked, and passes), or "error"
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

    def __repr__(self):
        """The table, as ``print`` gives it: a report left as a notebook cell's value shows it, not one
        long line of every argument's fields."""
        return str(self)

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
    backward_kwargs : dict of keyword arguments for the backward that are not gradients: the numerical
        side differentiates the output alone, so a recurrent op's ``dh_T`` given here fails every row.
        To check ``dh_T`` (and ``dc_T``), wrap the pair with ``minilm.testing.with_final_states``,
        which appends the final states to the output and hands their part of ``dout`` to the backward.
    eps : float > 0, step of the finite differences.
    tol : float in (0, 1), largest relative error that passes.
    max_elements : int >= 0, arguments up to this size are checked element by element.
    n_directions : int >= 1, random directions for larger arguments.
    seed : int >= 0, seeds the contraction array and the directions.
    name : str, what the report calls the op (default: the forward's name less ``_forward``).
    raise_on_fail : bool, raise ``GradcheckError`` naming the failing arguments.

    Returns
    -------
    GradcheckReport with one ``ArgumentCheck`` per float argument.
    """
    for which, fn in (("forward", forward), ("backward", backward)):
        if not callable(fn):
            raise TypeError(f"gradcheck: argument '{which}' must be a callable, got {type(fn).__name__}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"gradcheck: argument 'args' must be a tuple of the forward's arguments, got {type(args).__name__}")
    if not any(_is_float(a) for a in args):             # a check of nothing would pass, and mean nothing
        raise ValueError("gradcheck: argument 'args' must hold at least one floating-point array to check "
                         f"(integer arrays, such as token ids, get no gradient), got {_kinds(args)}")
    for option, value in (("kwargs", kwargs), ("backward_kwargs", backward_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"gradcheck: argument '{option}' must be a dict of keyword arguments (or None), "
                            f"got {type(value).__name__}")
    require_positive("gradcheck", "eps", eps)
    if not (is_real(tol) and 0 < tol < 1):
        # tol = 0 made every relative error 0 (the floor round-off / tol is infinite): a wrong backward passed;
        # and a relative error is at most 1, so a tol of 1 or more passes any backward too
        raise option_error("gradcheck", "tol", "a number in (0, 1)", tol, is_real(tol))
    require_count("gradcheck", "max_elements", max_elements)
    require_positive("gradcheck", "n_directions", n_directions, int)
    require_seed("gradcheck", "seed", seed)
    kwargs = dict(kwargs or {})
    backward_kwargs = dict(backward_kwargs or {})
    op = name or getattr(forward, "__name__", "op").removesuffix("_forward")
    xp = get_array_module(*[a for a in args if hasattr(a, "dtype")])
    rng = np.random.default_rng([STREAM, seed])
    noise_rng = np.random.default_rng([STREAM, seed, 1])   # its own, so a measurement moves no direction

    args = [a.astype(xp.float64) if _is_float(a) else a for a in args]   # float64 copies
    originals = [a.copy() if hasattr(a, "copy") else a for a in args]
    names = _argument_names(forward, len(args))
    kwargs_given = {k: v.copy() for k, v in kwargs.items() if hasattr(v, "shape") and hasattr(v, "copy")}

    result = forward(*args, **kwargs)
    if not (isinstance(result, tuple) and len(result) == 2):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise TypeError(f"gradcheck: the forward must return (output, cache), as the op contract says; got {got}")
    out, cache = result
    if not (_is_float(out) or (isinstance(out, numbers.Real) and not isinstance(out, bool))):
        got = f"{out.dtype} array" if hasattr(out, "dtype") else type(out).__name__
        raise TypeError(f"gradcheck: {op}: the forward's output must be one real floating-point array (the "
                        f"contract's out), got {got}")
    def require_kwargs_unchanged(by):
        changed = [k for k, v in kwargs_given.items()
                   if not bool(xp.array_equal(kwargs[k], v, equal_nan=_is_float(v)))]
        if changed:
            raise ValueError(f"gradcheck: {op}: the {by} modified the forward's keyword argument(s) "
                             f"{', '.join(changed)} in place; finite differences need the same options at every "
                             f"evaluation")
    require_kwargs_unchanged("forward")

    def deterministic():
        again, _ = forward(*[a.copy() if hasattr(a, "copy") else a for a in originals], **kwargs)
        if not bool(xp.array_equal(out, again, equal_nan=True)):
            raise ValueError(f"gradcheck: {op}: the forward gave two different outputs for the same inputs (random "
                             f"numbers drawn without a fixed seed?); finite differences need a deterministic "
                             f"forward: give it a fixed seed, e.g. an int in kwargs, not a Generator or np.random")
    deterministic()
    low_precision = _is_float(out) and out.dtype.itemsize < 8   # float64 in, float32 out: its round-off remains
    R = xp.asarray(rng.standard_normal(np.shape(out)))
    dout = R.copy()                                            # the backward's own: R stays as drawn
    given = out.copy() if hasattr(out, "copy") else out        # the cache may hold out itself
    grads = backward(dout, cache, **backward_kwargs)
    require_kwargs_unchanged("backward (through the cache)")
    out_changed = hasattr(out, "shape") and not bool(xp.array_equal(out, given, equal_nan=True))
    out = given
    L0 = float(xp.sum(out * R))                                # the loss at the inputs themselves
    # the stencil's round-off, predicted (the module docstring); an argument's floor is max(1e-8, it / tol)
    roundoff = ROUNDOFF_UNITS * np.finfo(np.float64).eps / 2 * float(xp.sum(xp.abs(out * R))) / eps

    report = GradcheckReport(op)
    # An input the forward or backward changed in place is reported, and the finite differences
    # below start again from the inputs as given, each forward on copies of its own, so that one
    # changed input does not make the other arguments' rows wrong as well.
    mutated = [i for i, (before, after) in enumerate(zip(originals, args))
               if hasattr(before, "shape") and not bool(xp.array_equal(before, after, equal_nan=_is_float(before)))]
    args = [a.copy() if hasattr(a, "copy") else a for a in originals]

    def finish():
        # a changed input's row fails and says so, with what its check (from the input as given) found
        for i in mutated:
            checked = [a for a in report.arguments if a.index == i]
            found = f"; from the input as given, its gradient's rel error is {checked[0].max_rel_error:.3e}" \
                if checked and checked[0].mode in ("elements", "directions") else ""
            row = ArgumentCheck(i, names[i], "error", 0, float("inf"), tol,
                                "forward or backward modified this input in place" + found)
            report.arguments = [a for a in report.arguments if a.index != i] + [row]
        report.arguments.sort(key=lambda a: a.index)
        if out_changed:
            report.arguments.append(ArgumentCheck(
                len(args), "out", "error", 0, float("inf"), tol,
                "the backward modified the forward's output in place, through the cache, which holds it; the "
                "next layer's input is that array too: compute into new arrays, and leave the cache as it was"))
        if not bool(xp.array_equal(dout, R)):
            report.arguments.append(ArgumentCheck(
                len(args), "dout", "error", 0, float("inf"), tol,
                "the backward modified its incoming gradient dout in place (a caller's array: a residual's "
                "other branch reads it too); compute the gradients into new arrays"))
        deterministic()                                         # again, after every evaluation
        return report.raise_if_failed() if raise_on_fail else report

    if not isinstance(grads, (tuple, list)) or len(grads) != len(args):
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
        """The stencil's n along d; D, the direction it really took: x + c h d is rounded, by up to
        u |x| an element, which next to h is not small when |x| is large; D is d with those roundings
        in (p - x is exact), so that n estimates a . D, and a . D is what it is compared with; and
        how far the loss is from smooth there, beyond a smooth function's own O(h^2) (``rough``)."""
        x = args[i]
        p = {c: x + (c * eps) * d for c in (1, -1, 2, -2)}
        L = {c: loss(i, p[c]) for c in p}
        # grouped as differences so that a loss that does not depend on x gives exactly 0
        near, far = L[1] - L[-1], L[2] - L[-2]
        D = (8 * (p[1] - p[-1]) - (p[2] - p[-2])) / (12 * eps)
        # smooth, the difference over 4h is twice that over 2h, to O(h^2) relative; a kink, a branch or
        # a random draw between the points breaks that
        excess = abs(far - 2 * near) - 1e-3 * (abs(far) + 2 * abs(near))
        # a kink at x itself (a ReLU at 0) keeps that ratio 2; the second differences tell it: smooth,
        # h^2 L'' and 4 h^2 L'' (ratio 4); a kink with a jump J in the slope, J h and 2 J h (ratio 2)
        bend, bend2 = L[1] - 2 * L0 + L[-1], L[2] - 2 * L0 + L[-2]
        excess = max(excess, abs(bend2 - 4 * bend) - 0.25 * abs(bend2))
        moved.append(max(abs(L[c] - L0) / (abs(c) * eps) for c in L))    # the loss's slope over the steps
        return (8 * near - far) / (12 * eps), D, excess

    def rough(excess, roundoff):
        """Not smooth: the excess is more than the loss's round-off (roundoff * h a loss) explains."""
        return excess > 10 * roundoff * eps

    def not_checkable(i, checked, notes, why):
        """Argument i's row fails: finite differences cannot tell a right gradient from a wrong one here."""
        report.arguments.append(ArgumentCheck(i, names[i], "error", checked, float("inf"), tol, "; ".join(
            notes + [f"cannot be checked by finite differences at these inputs: {why}"])))

    def measured_roundoff(i):
        """The stencil's round-off on argument i, from the loss's own round-off measured near x rather
        than predicted from the output's size: sigma, the error of one loss, from the fourth differences
        of L at x + k s, k = 0 .. NOISE_POINTS - 1, with s a random step of length h / 100 and of h (and
        of 100 h where neither showed any), so short that L's smooth part there is a cubic in k to far
        below round-off (at 100 h its fourth difference may add to sigma, which only widens the floor).
        Errors of size sigma, independent from point to point, give a fourth difference the variance
        C(8, 4) sigma^2 = 70 sigma^2. sigma then stands where u sum|out_i R_i| stands in the prediction.
        The points are exact (an element whose x + k s would round is left where it is), so that the
        differences hold the loss's round-off alone, not the rounding of the points, which the stencil
        allows for in D."""
        x = args[i]
        d = xp.asarray(noise_rng.standard_normal(x.shape))
        d = d / float(xp.linalg.norm(d))
        k = xp.arange(NOISE_POINTS, dtype=x.dtype).reshape((-1,) + (1,) * x.ndim)
        sigmas = []
        # at h / 100 and at h, the larger: a loss rounded to a coarse grid (lse - x_t at a margin of 25)
        # takes a few values only at the short spacing, which reads low; 100 h where both are flat
        for length in (eps / 100, eps, 100 * eps):
            if length == 100 * eps and any(sigmas):
                break
            s = (x + length * d) - x                                        # exact: x and x + s are close
            s = xp.where(xp.all((x + k * s) - x == k * s, axis=0), s, 0)   # so s has few bits: k s exact
            L = np.array([loss(i, x + j * s) for j in range(NOISE_POINTS)])
            sigmas.append(float(np.sqrt(np.mean(np.diff(L, 4) ** 2) / 70)))
        return ROUNDOFF_UNITS * max(sigmas) / eps

    for i, (x, g) in enumerate(zip(args, grads)):
        if isinstance(x, float) and not hasattr(x, "shape"):      # a NumPy scalar has a shape and is checked
            report.arguments.append(ArgumentCheck(i, names[i], "skipped", 0, 0.0, tol,
                                                  f"a Python float is not checked; pass np.array({x!r}) to check it"))
            continue
        if hasattr(x, "dtype") and getattr(x.dtype, "kind", "") == "c":
            report.arguments.append(ArgumentCheck(i, names[i], "skipped", 0, 0.0, tol,
                                                  f"a {x.dtype} argument is not checked; only real ones are"))
            continue
        if not _is_float(x):
            continue
        # a gradient of another kind would be cast to float64 below: a complex one's imaginary part dropped
        # (and a wrong backward passed), a bool one (np.zeros_like of a mask) failed without saying why
        floating = hasattr(g, "dtype") and (_is_float(g) or g.dtype.name == "bfloat16")
        if g is None or not hasattr(g, "shape") or tuple(g.shape) != tuple(x.shape) or not floating:
            got = ("None" if g is None else type(g).__name__ if not hasattr(g, "shape") else
                   f"shape {tuple(g.shape)}" if tuple(g.shape) != tuple(x.shape) else f"dtype {g.dtype}")
            report.arguments.append(ArgumentCheck(i, names[i], "error", 0, float("inf"), tol,
                                                  f"gradient must be a float array of shape {tuple(x.shape)}, "
                                                  f"got {got}"))
            continue
        if x.size == 0:
            report.arguments.append(ArgumentCheck(i, names[i], "skipped", 0, 0.0, tol, "it has no elements"))
            continue
        moved = []                      # how far the loss moved over the stencil's steps, as a slope (0: not at all)
        narrow = g.dtype.itemsize < 8
        notes = [f"the backward returned {g.dtype} for this float64 argument"] if narrow else []
        g = xp.asarray(g, dtype=xp.float64)
        if x.size <= max_elements:
            n = xp.zeros(x.shape, dtype=x.dtype)               # C-ordered, whatever x's strides
            a = xp.zeros(x.shape, dtype=x.dtype)               # g_j D_j: D_j is 1 up to the step's rounding
            excess = np.zeros(x.shape)
            for j in range(x.size):
                d = xp.zeros(x.shape, dtype=x.dtype)
                d.reshape(-1)[j] = 1.0
                n.reshape(-1)[j], D, excess.reshape(-1)[j] = numerical(i, d)
                a.reshape(-1)[j] = g.reshape(-1)[j] * D.reshape(-1)[j]
            scale = float(xp.max(xp.abs(a)) + xp.max(xp.abs(n)))
            mode, checked = "elements", int(x.size)
        else:
            directions = [xp.asarray(rng.standard_normal(x.shape)) for _ in range(n_directions)]
            gnorm = float(xp.linalg.norm(g))
            if 0 < gnorm < float("inf"):                # g's own direction, when it has one
                directions.append(g / gnorm)
            n, a, excess = np.zeros(len(directions)), np.zeros(len(directions)), np.zeros(len(directions))
            for k, d in enumerate(directions):
                n[k], D, excess[k] = numerical(i, d / float(xp.linalg.norm(d)))
                a[k] = float(xp.sum(g * D))
            scale = float(np.max(np.abs(a) + np.abs(n)))
            mode, checked = "directions", len(directions)
        # what the resolution is held against: the largest gradient (directional derivative), the numerical
        # one, so that no answer of the backward's moves it; near a stationary point (x^2 at 0 or at 1e-13),
        # where it is 0 or tiny but the loss moved, the loss's slope over the steps
        largest = float(abs(n).max())
        gauge = max(largest, max(moved))
        size = (f"up to {largest:.1e}" if largest > 0 else
                f"0, at a stationary point where the loss's slope over the steps is {gauge:.1e}" if gauge > 0 else
                "0: the loss did not move over the steps")
        # element by element, or direction by direction (a wrong small element must not hide under the
        # argument's largest); the floor keeps the stencil's round-off from failing a difference that
        # finite differences cannot resolve
        def judge(roundoff):
            floor = max(1e-8, roundoff / tol)
            with np.errstate(invalid="ignore"):                     # inf - inf: NaN, a failure
                errors = abs(a - n) / get_array_module(a).maximum(floor, abs(a) + abs(n))
            return errors, float(errors.max()), floor     # NaN, from a NaN or inf in g or the loss, stays NaN
        roundoff_i = roundoff
        errors, err, floor_i = judge(roundoff_i)
        measured_note = None
        flat = not bool((n != 0).any())                 # the loss never moved: its steps may be below its grid
        if (err > tol or flat) and not low_precision:
            # The prediction of the round-off from the output's size falls short where the forward
            # subtracts terms much larger than its output (a confident cross-entropy's lse - x_t, ~1e-4
            # from terms ~10): measure it, and judge again by what finite differences can resolve.
            # n does not depend on the backward, so no error of the backward's can widen this floor;
            # and it may pass the row only where it still resolves the largest gradient closely.
            measured = measured_roundoff(i)
            if measured > roundoff_i:
                predicted_err, roundoff_i = err, measured
                errors, err, floor_i = judge(roundoff_i)
                notable = measured >= NOTABLE_ROUNDOFF * roundoff > 0
                why = ("the loss's round-off, measured, is " + (
                    f"{measured:.1e} where the output, 0 here, predicts none" if roundoff == 0 else
                    f"{measured / roundoff:.2g} times what the output's size predicts") + (
                    " (the forward subtracts terms much larger than its output, as a confident cross-entropy "
                    "does, or rounds through float32 or float16 inside)" if notable else ""))
                resolution = tol * floor_i                  # the difference an element may show and pass
                resolved = resolution <= RESOLUTION_LIMIT * tol * gauge
                if err <= tol and not resolved:                 # a wrong backward would pass as well
                    not_checkable(i, checked, notes, f"{why}, so only differences above {resolution:.1e} show, "
                                  f"against this gradient ({size}); compute the forward in float64 throughout, or "
                                  f"check it at inputs where the loss is not a small difference of large terms (a "
                                  f"cross-entropy: smaller logits)")
                    continue
                # a failure whose differences are far above the round-off is the backward's, whatever the floor
                near = float(abs(a - n).max()) <= ROUNDOFF_REACH * resolution
                if notable or (not resolved and near) or predicted_err > tol >= err:   # else it explains no verdict
                    measured_note = f"{why}, so differences below {resolution:.1e} were not judged" + (
                        "" if resolved or not near else f"; that is {resolution / gauge:.1e} of the largest gradient, "
                                                        f"so this failure may be that round-off: compute the forward "
                                                        f"in float64, or check it at other inputs")
        worst = None
        if not err <= tol and mode == "elements" and bool(xp.all(xp.isfinite(a))) and bool(xp.all(xp.isfinite(n))):
            worst = np.unravel_index(int(xp.argmax(errors)), x.shape)
            notes.append(f"worst at index {tuple(int(k) for k in worst)}: backward {float(g[worst]):.10g}, "
                         f"numerical {float(n[worst]):.10g} (difference {float(a[worst] - n[worst]):.3g})")
        rough_i = bool(rough(excess[worst], roundoff_i)) if worst is not None else bool(rough(excess, roundoff_i).any())
        resolution = tol * floor_i                      # the difference an element may show and pass
        if err <= tol and flat and low_precision:       # n is 0 on the float32 output's grid, not the loss's
            not_checkable(i, checked, notes, f"the numerical gradient is 0 along this argument, and the forward "
                          f"returns {out.dtype} for float64 inputs: either the loss does not depend on it here, or "
                          f"that rounding hides the stencil's steps, and nothing here tells which, nor the right "
                          f"gradient from zeros; compute in the input's dtype")
            continue
        if err <= tol and gauge > 0 and resolution > RESOLUTION_LIMIT * tol * gauge:
            why = ("the check's absolute floor, 1e-8 of the relative error's scale" if floor_i == 1e-8 else
                   "the output's other terms are far larger")
            not_checkable(i, checked, notes, f"this gradient ({size}) is below what differences of this loss "
                          f"resolve ({resolution:.1e}; {why}), so a wrong value would pass too: choose inputs that "
                          f"make it larger next to the output (inputs of size about 1 usually do), or shrink the "
                          f"arguments that dominate the output")
            continue
        if not bool(xp.all(xp.isfinite(x))):
            notes.append("the input holds NaN or inf")
        elif not bool(xp.all(xp.isfinite(out))):
            notes.append("the forward's output holds NaN or inf for these inputs, so the numerical gradient is "
                         "undefined; choose inputs inside the forward's domain")
        elif not bool(xp.all(xp.isfinite(g))):
            notes.append("the backward's gradient holds NaN or inf")
        elif not err <= tol and low_precision:
            notes.append(f"the forward returns {out.dtype} for float64 inputs, so the differences carry its "
                         f"round-off; compute in the input's dtype (or try eps=1e-3, tol=1e-3)")
        elif err <= tol and largest == 0 and not any(moved):
            # a loss constant here (a ReLU's negative side, a softmax of one class, every target ignored)
            # or one that rounds so small a change away: finite differences cannot tell the two apart
            notes.append(f"the loss did not move at all at the stencil's steps along this argument, so nothing was "
                         f"checked: a gradient of zeros agrees with that, as would any other below {resolution:.1e}; "
                         f"if the output should depend on it here, choose inputs where it moves (a forward saturated "
                         f"there, or rounding through float16 inside, hides it)")
        elif err <= tol and (floor_i > max(1e-8, scale) or 0 < scale < 1e-8):
            what = f", {resolution / largest:.1e} of it," if largest > 0 else ""
            notes.append(f"unresolved: finite differences of this loss resolve this gradient ({size}) only "
                         f"to {resolution:.1e}{what} short of the tolerance: only larger errors were "
                         f"caught" + ("" if measured_note else "; to check it closely, choose inputs that make it "
                                      "larger next to the output, or shrink the arguments that dominate the output"))
        elif not err <= tol and worst is not None and float(n[worst]) == 0 and float(g[worst]) != 0:
            if moved[int(np.ravel_multi_index(worst, x.shape))] > 0:
                notes.append("the loss moved over the stencil's steps along this element, alike on both sides: "
                             "its slope here is 0 (a stationary point, as x^2 at 0), and the backward's value is "
                             "wrong")
            else:
                notes.append("the loss did not change at all over the stencil's steps along this element: either "
                             "it does not depend on it (and the backward's value is wrong), or the forward rounds so "
                             "small a change away (float16 inside, or a loss far below the round-off of the terms it "
                             "is computed from)")
        elif not err <= tol and rough_i:
            notes.append("the loss's differences over h and 2h do not scale as a smooth function's: the forward "
                         "has a kink or a branch at or next to these inputs (a ReLU at 0, say), draws random "
                         "numbers, or computes part of its work in float32 (finite differences need a smooth, "
                         "deterministic forward in float64)")
        elif not err <= tol and float(xp.max(xp.abs(x))) >= 100:
            notes.append(f"the argument's values reach {float(xp.max(xp.abs(x))):.0e}: a forward's round-off grows "
                         f"with its inputs (x - mean, say), which the tolerance does not allow for; if the error "
                         f"is near it, check at inputs of size about 1")
        elif not err <= tol and mode == "directions":
            notes.append(f"checked along {checked} random directions (it has more than max_elements = "
                         f"{max_elements} elements), which cannot point at an element: to see the worst one, "
                         f"check smaller arguments or raise max_elements")
        if measured_note:
            notes.append(measured_note)
        report.arguments.append(ArgumentCheck(i, names[i], mode, checked, err, tol, "; ".join(notes)))

    return finish()
