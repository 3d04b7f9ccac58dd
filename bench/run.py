"""`minilm bench`: training-step and sampling speed per backend, side by side with PyTorch.

Every measurement runs in a fresh process (``minilm.bench.worker``) with the same thread
count for minilm's Numba pool, the BLAS pool and PyTorch; the table gives ms/step, tokens/s,
peak resident memory, and each backend's speed relative to PyTorch's in the same run.

Timings on a shared machine drift by tens of percent over minutes. So each table is measured
``--rounds`` times, every configuration once per round in turn (minilm, then PyTorch, then
minilm again...), and the table gives the medians; the ratio to PyTorch is the median of the
ratios within each round, with their range, so that a drift hits both sides of a ratio alike.
"""
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys

TRAIN_PRESETS = ("shakespeare-char-cpu", "shakespeare-lstm", "shakespeare-gru")


def add_options(p):
    p.add_argument("--what", choices=("train", "sample", "ops", "all", "converge"), default="all",
                   help="'all' is train, sample and ops; 'converge' (long) times training to --target")
    p.add_argument("--target", type=float, default=1.90, help="converge: the validation loss to reach")
    p.add_argument("--converge-preset", default="shakespeare-char-cpu", help="converge: the preset to train")
    p.add_argument("--data", default="shakespeare", help="converge: the corpus")
    p.add_argument("--seed", type=int, default=None, help="converge: the seed (default: the preset's)")
    p.add_argument("--presets", nargs="+", default=list(TRAIN_PRESETS), metavar="PRESET")
    p.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                   help="default: numpy and numba (and cupy when a GPU is present)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (JIT compilation, caches)")
    p.add_argument("--tokens", type=int, default=500, help="tokens to sample")
    p.add_argument("--rounds", type=int, default=3, help="times each table is measured, in turn (medians reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for Numba, BLAS and PyTorch")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")


def _env(threads):
    env = dict(os.environ)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


# The worker runs as ``python -c`` with the current directory taken off the module path first:
# ``python -m`` would put it there, and from a source checkout its ``minilm/`` folder (which has no
# ``bench`` inside; pyproject maps ``bench/`` to ``minilm.bench``) would hide the installed package.
_WORKER = "import runpy, sys; sys.path[:] = [p for p in sys.path if p != '']; runpy.run_module('minilm.bench.worker', run_name='__main__')"


def run_job(job):
    """Run one measurement in a fresh process; returns its JSON result."""
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(job)], capture_output=True,
                          text=True, env=_env(job["threads"]))
    if proc.returncode != 0:
        raise RuntimeError(f"minilm bench: the measurement {job} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_backends():
    names = ["numpy", "numba"]
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                names.append("cupy")
        except Exception:
            pass
    return names


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def benchmark(args, out=print):
    backends = args.backends or _available_backends()
    torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    results = {"date": datetime.date.today().isoformat(), "machine": _machine(), "threads": args.threads,
               "command": "minilm bench " + " ".join(sys.argv[2:]), "train": [], "sample": [], "ops": []}
    if args.what in ("train", "all"):
        for name in args.presets:
            jobs = [{"impl": "minilm", "what": "train", "backend": b, "preset": name, "steps": args.steps,
                     "warmup": args.warmup, "threads": args.threads} for b in backends]
            if torch:
                jobs.append({"impl": "torch", "what": "train", "preset": name, "steps": args.steps,
                             "warmup": args.warmup, "threads": args.threads})
            rows = _rounds(jobs, args.rounds)
            results["train"] += rows
            _print_rows(out, f"training step, {name} (float32)", rows, "ms_per_step")
    if args.what in ("sample", "all"):
        jobs = [{"impl": "minilm", "what": "sample", "backend": b, "cache": cache, "preset": "shakespeare-char-cpu",
                 "tokens": args.tokens, "threads": args.threads} for b in backends for cache in (True, False)]
        if torch:
            jobs.append({"impl": "torch", "what": "sample", "preset": "shakespeare-char-cpu",
                         "tokens": args.tokens, "threads": args.threads})
        rows = _rounds(jobs, args.rounds)
        results["sample"] = rows
        _print_rows(out, f"sampling {args.tokens} tokens, shakespeare-char-cpu GPT", rows, None)
    if args.what in ("ops", "all"):
        from minilm.bench import ops as op_bench
        results["ops"] = op_bench.run(backends, threads=args.threads, out=out)
    if args.what == "converge":
        from minilm.bench import converge
        results["converge"] = converge.run(args.converge_preset, args.data, backends=backends, threads=args.threads,
                                           target=args.target, torch_peer=torch, seed=args.seed, out=out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


def _label(row):
    job = row["job"]
    if job["impl"] == "torch":
        return "pytorch" + (" (generate, no cache)" if job["what"] == "sample" else "")
    return job["backend"] + ("" if job["what"] == "train" else (" kv-cache" if job["cache"] else " no cache"))


def _rounds(jobs, rounds):
    """Each job measured ``rounds`` times, in turn; one row per job with the medians, every round's
    result (``rounds``) and, when a PyTorch job is among them, the ratio to it within each round."""
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"minilm bench: option '--rounds' must be an integer >= 1, got {rounds!r}")
    measured = [[run_job(job) for job in jobs] for _ in range(rounds)]        # [round][job]
    torch_at = next((i for i, job in enumerate(jobs) if job["impl"] == "torch"), None)
    rows = []
    for i, job in enumerate(jobs):
        runs = [measured[r][i] for r in range(rounds)]
        row = {"job": job, "rounds": runs, "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
               "peak_rss_mb": max(x["peak_rss_mb"] for x in runs)}
        if "ms_per_step" in runs[0]:
            row["ms_per_step"] = statistics.median(x["ms_per_step"] for x in runs)
        if torch_at is not None:
            ratios = [measured[r][i]["tokens_per_s"] / measured[r][torch_at]["tokens_per_s"] for r in range(rounds)]
            row["vs_torch"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        rows.append(row)
    return rows


def _print_rows(out, title, rows, ms_key):
    n = len(rows[0]["rounds"])
    out(f"\n{title}; medians of {n} round{'s' if n > 1 else ''}")
    out(f"  {'':<28} {'ms/step':>9} {'tokens/s':>10} {'peak MB':>9} {'vs pytorch (range)':>22}")
    for r in rows:
        ms = f"{r[ms_key]:9.2f}" if ms_key else f"{'':>9}"
        v = r.get("vs_torch")
        ratio = f"{v['median']:6.2f}x ({v['min']:.2f}-{v['max']:.2f})" if v else ""
        out(f"  {_label(r):<28} {ms} {r['tokens_per_s']:10.0f} {r['peak_rss_mb']:9.0f} {ratio:>22}")
