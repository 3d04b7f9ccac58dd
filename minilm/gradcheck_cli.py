"""`minilm gradcheck`: check every op's backward on the chosen backend and print a table."""
import importlib
import os
import sys

import numpy as np

import minilm.reference
from minilm import backend
from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.opcases import CASES


def check_ops(ops, *, seed=0, tol=DEFAULT_TOL):
    """Gradient-check ``ops`` on the active backend; returns the list of GradcheckReports."""
    xp = backend.xp()
    reports = []
    for op in ops:
        forward, backward = backend.op(f"{op}_forward"), backend.op(f"{op}_backward")
        for label, case in CASES[op]:
            args, kwargs = case(np.random.default_rng(seed), np.float64)
            args = tuple(xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
            kwargs = {k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
            name = f"{op}[{label}]" if label else op
            reports.append(gradcheck(forward, backward, args, kwargs, tol=tol, name=name))
    return reports


def _code_checked():
    """Where the checked code comes from: a checkout, or an installed copy (which a checkout's
    edits do not reach), and which tier's files (numba's and cupy's kernels, not reference/)."""
    def folder(module):
        return os.path.dirname(os.path.abspath(module.__file__))
    tier = backend.current()
    if tier == "numpy":
        return f"the reference from {folder(minilm.reference)}"
    kernels = importlib.import_module("minilm.cpu" if tier == "numba" else "minilm.gpu")
    return f"the {tier} kernels from {folder(kernels)} (the reference's ops where they have none)"


def run(args, out=None):
    """Entry point of the subcommand; returns the exit status."""
    out = out or sys.stdout
    ops = list(dict.fromkeys(args.op or CASES))           # each op once, in the order given
    if args.seed < 0:
        raise ValueError(f"minilm gradcheck: option '--seed' must be an integer >= 0, got {args.seed}")
    reports = check_ops(ops, seed=args.seed)
    print(f"backend {backend.current()}, float64, tolerance {DEFAULT_TOL:.0e} relative, {_code_checked()}", file=out)
    print(f"{'op':<24} {'argument':<10} {'max rel error':>13}  result", file=out)
    failed = []
    for report in reports:
        for op, arg, how, err, result in report.rows():
            print(f"{op:<24} {arg:<10} {err:>13.3e}  {result}" + (f"  ({how})" if result != "pass" else ""), file=out)
            if result != "pass":
                failed.append(f"{op} argument '{arg}'")
    n = sum(len(r.arguments) for r in reports)
    if failed:
        print(f"{len(failed)} of {n} checks FAILED: {', '.join(failed)}", file=out)
        return 1
    print(f"all {n} check{'s' * (n != 1)} passed", file=out)
    return 0
