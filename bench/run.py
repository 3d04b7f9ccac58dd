"""`minilm bench`: training-step and sampling speed per backend, side by side with PyTorch.

Every measurement runs in a fresh process (``minilm.bench.worker``) with the same thread
count for minilm's Numba pool, the BLAS pool and PyTorch; the table gives ms/step, tokens/s,
peak resident memory, and each backend's speed relative to PyTorch's in the same run.

Timings on a shared machine drift by tens of percent over minutes. So each table is measured
``--rounds`` times, every configuration once per round in turn (minilm, then PyTorch, then
minilm again...); a row gives its median round (``_median_round``), and the ratio to PyTorch is
the median of the ratios within each round, with their range, so that a drift hits both sides
of a ratio alike.

On a GPU (the cupy backend) each ``--dtypes`` entry gets its own table, minilm against PyTorch
eager on CUDA in the same dtype (16-bit: mixed precision on both sides), with the GPU memory
each holds and, for the GPT presets, the model-FLOPs utilisation (``gpt_flops_per_token``).
"""
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys

from minilm.backend import BACKENDS
from minilm.config import PRESETS

TRAIN_PRESETS = ("shakespeare-char-cpu", "shakespeare-lstm", "shakespeare-gru")
GPU_BACKENDS = ("cupy",)
GPU_DTYPES = ("float32", "bfloat16", "float16")     # 16-bit: mixed precision, float32 master weights

# Dense peak throughput (FLOP/s) of one NVIDIA H100 SXM, per training dtype; source: NVIDIA H100 SXM
# datasheet (its tensor-core figures are quoted with 2:4 sparsity; dense is half). float32 is the
# CUDA-core (non-tensor) peak: neither side's float32 matrix products use TF32 tensor cores here.
# An H200 has the same peaks. ``--peak-tflops`` overrides them for another GPU.
H100_SXM_PEAK_FLOPS = {"float32": 66.9e12, "bfloat16": 989.4e12, "float16": 989.4e12}


def add_options(p):
    p.add_argument("--what", choices=("train", "sample", "ops", "all", "converge", "replay", "nanogpt"),
                   default="all",
                   help="'all' is train, sample and ops; 'converge' (long) times training to --target; "
                        "'replay' (long) trains minilm from the PyTorch peer's initial weights on the same "
                        "batches as the peer; 'nanogpt' (long) trains the peer with nanoGPT's own loop and "
                        "PyTorch's random numbers, then minilm on each of --backends, when given, from the same "
                        "draws (default: all)")
    p.add_argument("--target", type=float, default=1.90, help="converge: the validation loss to reach (default: 1.90)")
    p.add_argument("--converge-preset", default="shakespeare-char-cpu", choices=list(PRESETS), metavar="PRESET",
                   help="converge, replay: the preset to train (default: shakespeare-char-cpu)")
    p.add_argument("--data", default="shakespeare", help="converge, replay, nanogpt: the corpus (default: shakespeare)")
    p.add_argument("--seed", type=int, default=None, help="converge, replay, nanogpt: the seed (default: the preset's)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="converge, replay, nanogpt: training iterations (default: the preset's); the learning-rate "
                        "schedule keeps the preset's length, so past it the rate stays at its floor")
    p.add_argument("--gelu", choices=("none", "tanh"), default="none",
                   help="nanogpt: the peer's GELU, nanoGPT's exact one ('none', the default) or minilm's tanh form")
    p.add_argument("--presets", nargs="+", default=list(TRAIN_PRESETS), choices=list(PRESETS), metavar="PRESET",
                   help=f"train: the presets to time, among {', '.join(PRESETS)}; default: {' '.join(TRAIN_PRESETS)}")
    p.add_argument("--backends", nargs="+", default=None, choices=BACKENDS, metavar="BACKEND",
                   help=f"among {', '.join(BACKENDS)}; default: numpy and numba (and cupy when a GPU is present); "
                        "nanogpt: none unless given")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per configuration (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (JIT compilation, caches; default: 5)")
    p.add_argument("--tokens", type=int, default=500, help="tokens to sample (default: 500)")
    p.add_argument("--rounds", type=int, default=3,
                   help="times each training and sampling table is measured, in turn (each row: its median round; "
                        "default: 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for Numba, BLAS and PyTorch (default: the machine's cores)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=GPU_DTYPES, metavar="DTYPE",
                   help="train: the dtypes of the GPU (cupy) tables, one table each, among "
                        f"{', '.join(GPU_DTYPES)} (16-bit = mixed precision; default: float32); CPU backends train in float32")
    p.add_argument("--batch-size", type=int, default=None, help="train: override the presets' batch size")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's peak TFLOPS for the MFU column (default: H100 SXM dense peak of the dtype)")


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
    """The backends measured where --backends is not given: numpy, numba where it imports, and cupy
    where CuPy finds a GPU."""
    from minilm.backend import numba_import_error, numba_repair
    names = ["numpy"]
    e = numba_import_error()
    if e is None:
        names.append("numba")
    else:
        import warnings
        warnings.warn(f"the numba backend is left out: numba does not import ({e}); {numba_repair(e)}",
                      RuntimeWarning, stacklevel=2)
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


def _torch_installed():
    return importlib.util.find_spec("torch") is not None


def _torch_has_cuda():
    import torch
    return torch.cuda.is_available()


def train_tables(args, backends, torch):
    """The training-step tables, as (title, jobs) pairs: per preset, one float32 table of the CPU
    backends against PyTorch on the CPU, then one table per dtype of the GPU backends against
    PyTorch on CUDA in the same dtype."""
    cpu = [b for b in backends if b not in GPU_BACKENDS]
    gpu = [b for b in backends if b in GPU_BACKENDS]
    torch_cuda = torch and bool(gpu) and _torch_has_cuda()
    batch = f", batch {args.batch_size}" if args.batch_size else ""
    tables = []
    for name in args.presets:
        common = {"what": "train", "preset": name, "steps": args.steps, "warmup": args.warmup,
                  "threads": args.threads, **({"batch_size": args.batch_size} if args.batch_size else {})}
        if cpu:
            jobs = [{"impl": "minilm", "backend": b, **common} for b in cpu]
            if torch:
                jobs.append({"impl": "torch", **common})
            tables.append((f"training step, {name} (float32{batch})", jobs))
        for dtype in (args.dtypes if gpu else ()):
            jobs = [{"impl": "minilm", "backend": b, "dtype": dtype, **common} for b in gpu]
            if PRESETS[name]["model"] == "gpt" and dtype != "float16":   # float16's loss scaling is never captured
                jobs = [{**job, "cuda_graph": graph} for graph in (True, False) for job in jobs]
            if torch_cuda:
                jobs.append({"impl": "torch", "device": "cuda", "dtype": dtype, **common})
            tables.append((f"training step, {name} ({dtype} on the GPU{batch})", jobs))
    return tables


def sample_tables(args, backends, torch):
    """The sampling tables, as (title, jobs) pairs: the CPU backends against PyTorch on the CPU, then
    the GPU backends against PyTorch on CUDA (no peer without a CUDA build of PyTorch)."""
    common = {"what": "sample", "preset": "shakespeare-char-cpu", "tokens": args.tokens, "threads": args.threads}
    title = f"sampling {args.tokens} tokens, shakespeare-char-cpu GPT"
    tables = []
    for on_gpu in (False, True):
        group = [b for b in backends if (b in GPU_BACKENDS) == on_gpu]
        if not group:
            continue
        jobs = [{"impl": "minilm", "backend": b, "cache": cache, **common} for b in group for cache in (True, False)]
        if torch and not on_gpu:
            jobs.append({"impl": "torch", **common})
        elif torch and _torch_has_cuda():
            jobs.append({"impl": "torch", "device": "cuda", **common})
        tables.append((title + (" on the GPU" if on_gpu else ""), jobs))
    return tables


# the --what values each option is for (as its help says); given with another, it is said to be ignored
# (--what itself, --threads and --json are used by every run)
_USED_BY = {"target": ("converge",), "converge_preset": ("converge", "replay"), "gelu": ("nanogpt",),
            "data": ("converge", "replay", "nanogpt"), "seed": ("converge", "replay", "nanogpt"),
            "max_iters": ("converge", "replay", "nanogpt"), "presets": ("train", "all"),
            "dtypes": ("train", "all"), "batch_size": ("train", "all"), "steps": ("train", "all"),
            "warmup": ("train", "all"), "peak_tflops": ("train", "all"), "tokens": ("sample", "all"),
            "rounds": ("train", "sample", "all"),
            "backends": ("train", "sample", "ops", "all", "converge", "replay", "nanogpt"),
            "no_torch": ("train", "sample", "all", "converge", "replay", "nanogpt")}
EVERY_RUN = ("what", "threads", "json")


def ignored_options(args, backends=None):
    """A warning for each option given a value other than its default that ``args.what`` does not use,
    or, for the GPU tables' options, that no GPU backend among ``backends`` (default: ``--backends``,
    else those available) uses."""
    import argparse
    defaults = argparse.ArgumentParser()
    add_options(defaults)
    defaults = vars(defaults.parse_args([]))
    given = [name for name in _USED_BY if getattr(args, name) != defaults[name]]
    lines = [f"option '--{name.replace('_', '-')}' is ignored: it is used only by --what {' or '.join(_USED_BY[name])}"
             for name in given if args.what not in _USED_BY[name]]
    backends = backends or args.backends or _available_backends()
    if args.what in ("train", "all") and not any(b in GPU_BACKENDS for b in backends):
        lines += [f"option '--{name.replace('_', '-')}' is ignored: it applies to the GPU (cupy) backend's "
                  f"tables, and none is measured (CPU backends train in float32)"
                  for name in ("dtypes", "peak_tflops") if name in given]
    return lines


def _check_backends(backends):
    """Each backend asked for can run here (its packages import, a GPU for cupy), checked before any
    measurement: a worker would fail only after the tables before it, with its whole traceback."""
    from minilm import backend
    for b in backends:
        try:
            backend._load(b, instead=f"leave {b} out of --backends")     # what minilm.use(b) imports, without switching to it
        except RuntimeError as e:
            raise ValueError(f"minilm bench: option '--backends': {e}") from None


def _check_writable(path):
    """``--json``'s file can be written: opened for appending (a file that was not there is removed
    again), so that minutes of measurements are not lost at the end."""
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ValueError(f"minilm bench: option '--json' {path!r} cannot be written ({e.strerror or e}; "
                         f"checked first, so that minutes of measurements are not lost at the end)") from None
    if not existed:
        os.remove(path)


def _write_json(path, results):
    """``--json``'s file, written atomically where it is a file (or new): a full disk leaves the results
    an earlier run wrote there whole; a device or a pipe (/dev/stdout) is written in place."""
    from minilm.checkpoint import atomic_write
    text = json.dumps(results, indent=1).encode("utf-8")
    try:
        try:
            if os.path.isfile(path) and not os.path.islink(path) or not os.path.lexists(path):
                atomic_write(path, lambda f: f.write(text))
                return
        except PermissionError:         # a file the user may write, in a folder where no file can be made or
            if not os.path.isfile(path):    # replaced (_check_writable passed it): written in place, as before
                raise
        with open(path, "wb") as f:
            f.write(text)
    except OSError as e:
        raise OSError(f"minilm bench: could not write option '--json' {path!r}: {e.strerror or e}; the tables "
                      f"above hold the results") from None


def _git_commit():
    """The commit of the checkout minilm runs from ('-dirty' added when tracked files changed), or
    None where it is not a git checkout (an installed package) or git cannot say. The links that
    gpu/run.sh runs minilm through are followed to the checkout."""
    import minilm
    root = os.path.dirname(os.path.dirname(os.path.realpath(minilm.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        head, status = (subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=30)
                        for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.returncode == 0 and status.stdout.strip() else "")


def _versions(backends, torch):
    """The versions of the libraries measured: NumPy, Numba, CuPy (when a GPU backend is measured),
    PyTorch (when the peer runs) and the BLAS libraries NumPy loaded (threadpoolctl, where installed)."""
    import importlib.metadata
    import numpy
    versions = {"numpy": numpy.__version__}
    names = ["numba"] + ["cupy" for b in backends if b in GPU_BACKENDS][:1] + (["torch"] if torch else [])
    for name in names:
        if importlib.util.find_spec(name) is not None:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:     # CuPy's wheels are cupy-cuda12x, ...
                versions[name] = importlib.import_module(name).__version__
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return versions
    versions["blas"] = [{key: lib.get(key) for key in ("internal_api", "version", "threading_layer", "architecture",
                                                       "filepath")}
                        for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return versions


def _measured(title, jobs, rounds, out, failed):
    """A table's rows (``_rounds``), or None when a measurement failed: then it is reported and added
    to ``failed``, and the other tables (say, beside a failed GPU peer's) are still measured."""
    try:
        return _rounds(jobs, rounds)
    except RuntimeError as e:
        out(f"\n{title}: failed\n{e}")
        failed.append({"table": title, "error": str(e)})
        return None


def benchmark(args, out=print):
    backends = args.backends or _available_backends()
    for line in ignored_options(args, backends):
        print(f"minilm bench: warning: {line}", file=sys.stderr)
    torch = not args.no_torch and _torch_installed()
    for option, low in (("steps", 1), ("warmup", 0), ("tokens", 1), ("rounds", 1), ("threads", 1), ("batch_size", 1),
                       ("max_iters", 1)):
        value = getattr(args, option)
        if value is not None and value < low:           # --batch-size, --max-iters None: the presets' own
            raise ValueError(f"minilm bench: option '--{option.replace('_', '-')}' must be an integer >= {low}, "
                             f"got {value}")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"minilm bench: option '--json' {args.json!r} is in a folder that does not exist "
                         f"(checked first, so that minutes of measurements are not lost at the end)")
    if args.json is not None and os.path.isdir(args.json):
        raise ValueError(f"minilm bench: option '--json' {args.json!r} is a folder; give a file path in it "
                         f"(checked first, so that minutes of measurements are not lost at the end)")
    if args.json is not None:
        _check_writable(args.json)
    for option in ("peak_tflops", "target"):
        value = getattr(args, option)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"minilm bench: option '--{option.replace('_', '-')}' must be a finite number > 0, "
                             f"got {value}")
    if args.what in _USED_BY["backends"]:
        _check_backends(backends)
    results = {"date": datetime.date.today().isoformat(),
               "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "git_commit": _git_commit(), "versions": _versions(backends, torch), "machine": _machine(),
               "threads": args.threads, "command": shlex.join(["minilm", "bench", *sys.argv[2:]]),
               "train": [], "sample": [], "ops": []}
    failed = []
    if args.what in ("train", "all"):
        for title, jobs in train_tables(args, backends, torch):
            rows = _measured(title, jobs, args.rounds, out, failed)
            if rows is None:
                continue
            for row in rows:
                add_mfu(row, args.peak_tflops)
            results["train"] += rows
            _print_rows(out, title, rows, "ms_per_step")
            mfu = next((r for r in rows if "mfu" in r), None)
            if mfu:
                source = f"--peak-tflops {args.peak_tflops:g}" if args.peak_tflops else "H100 SXM dense peak"
                out(f"  MFU = {mfu['flops_per_token'] / 1e6:.1f} MFLOPs/token (6N + 12LTC) x tokens/s "
                    f"/ {mfu['peak_flops'] / 1e12:.1f} TFLOPS ({source})")
            skipped = {_label(r): sum(x.get("skipped_steps", 0) for x in r["rounds"]) for r in rows}
            if any(skipped.values()):
                out("  steps skipped for a float16 overflow, all rounds: "
                    + ", ".join(f"{label} {n}" for label, n in skipped.items()))
        results["mfu_peak_flops"] = {"source": "NVIDIA H100 SXM datasheet, dense", **H100_SXM_PEAK_FLOPS,
                                     "override_tflops": args.peak_tflops}
    if args.what in ("sample", "all"):
        for title, jobs in sample_tables(args, backends, torch):
            rows = _measured(title, jobs, args.rounds, out, failed)
            if rows is not None:
                results["sample"] += rows
                _print_rows(out, title, rows, None)
    gpus = {x["gpu"] for row in results["train"] + results["sample"] for x in row["rounds"] if "gpu" in x}
    if gpus:
        results["machine"]["gpu"] = ", ".join(sorted(gpus))
    if args.what in ("ops", "all"):
        from minilm.bench import ops as op_bench
        results["ops"] = op_bench.run(backends, threads=args.threads, out=out)
    if args.what == "converge":
        from minilm.bench import converge
        results["converge"] = converge.run(args.converge_preset, args.data, backends=backends, threads=args.threads,
                                           target=args.target, torch_peer=torch, seed=args.seed, max_iters=args.max_iters,
                                           out=out)
    if args.what == "nanogpt":
        if not torch:
            raise ValueError("minilm bench: --what nanogpt needs PyTorch (pip install torch), and not --no-torch")
        from minilm.bench import nanogpt
        from minilm.config import preset
        seed = preset("shakespeare-char-cpu").seed if args.seed is None else args.seed
        results["nanogpt"] = nanogpt.run(seed, args.data, args.gelu, args.threads, out=out, max_iters=args.max_iters,
                                         backends=args.backends or ())
    if args.what == "replay":
        from minilm.bench import converge
        if not torch:
            raise ValueError("minilm bench: --what replay needs PyTorch (pip install torch), "
                             "and not --no-torch")
        results["replay"] = [converge.replay(args.converge_preset, args.data, backend=b, threads=args.threads,
                                             seed=args.seed, max_iters=args.max_iters, out=out) for b in backends]
    if failed:
        results["failed"] = failed
    if args.json:
        _write_json(args.json, results)
    if failed:
        raise RuntimeError(f"{len(failed)} table(s) failed: {'; '.join(f['table'] for f in failed)}")
    return results


def gpt_flops_per_token(cfg, vocab_size):
    """FLOPs of one training step per token of a GPT, nanoGPT's ``estimate_mfu`` (PaLM, appendix B):
    6 N for the forward and backward of the matrix products, N the parameter count without the
    position embedding (the tied token embedding counts: it is the output head), plus 12 L T C
    for attention's scores and weighted sum."""
    L, T, C, V = cfg.n_layer, cfg.block_size, cfg.n_embd, vocab_size
    N = V * C + L * 12 * C * C + (2 * L + 1) * C                  # wte, block weights, layernorm gammas
    if cfg.bias:
        N += L * (2 * C + 3 * C + C + 4 * C + C) + C              # layernorm betas, linear biases, ln_f beta
    return 6 * N + 12 * L * T * C


def add_mfu(row, peak_tflops=None):
    """Model-FLOPs utilisation of a GPU row of a GPT preset: achieved FLOP/s over the dtype's peak."""
    job = row["job"]
    on_gpu = job.get("backend") in GPU_BACKENDS or job.get("device") == "cuda"
    if job["what"] != "train" or not on_gpu:
        return row
    from minilm.config import preset
    cfg = preset(job["preset"])
    if cfg.model != "gpt":
        return row
    dtype = job.get("dtype", "float32")
    peak = peak_tflops * 1e12 if peak_tflops else H100_SXM_PEAK_FLOPS[dtype]
    flops = gpt_flops_per_token(cfg, job.get("vocab_size", 65))
    row.update(flops_per_token=flops, peak_flops=peak, mfu=flops * row["tokens_per_s"] / peak)
    return row


def _label(row):
    job = row["job"]
    if job["impl"] == "torch":
        name = "pytorch eager" if job.get("device") == "cuda" else "pytorch"
        if job["what"] == "sample":
            return name + " (generate, no cache)"
        return name + ("" if job.get("dtype", "float32") == "float32" else " autocast")
    if job["what"] == "train":
        return job["backend"] + {True: " CUDA graph", False: " op by op"}.get(job.get("cuda_graph"), "")
    return job["backend"] + (" kv-cache" if job["cache"] else " no cache")


def _median_round(runs):
    """The index of the round of median speed; of an even count, the slower of the middle two. A row
    gives this one round's tokens/s and ms/step, so that they agree (tokens/s = B·T / ms/step): the
    medians of each taken apart would not, for an even count (the mean of the middle two)."""
    by_speed = sorted(range(len(runs)), key=lambda r: runs[r]["tokens_per_s"])
    return by_speed[(len(runs) - 1) // 2]


def _rounds(jobs, rounds):
    """Each job measured ``rounds`` times, in turn; one row per job with its median round's speed
    (``_median_round``), the largest memory of the rounds, every round's result (``rounds``) and,
    when a PyTorch job is among them, the median (and range) of the ratio to it within each round
    (``vs_torch``); for training, the same ratio to the numpy backend's step when it was measured
    (``vs_numpy``)."""
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"minilm bench: option '--rounds' must be an integer >= 1, got {rounds!r}")
    measured = [[run_job(job) for job in jobs] for _ in range(rounds)]        # [round][job]
    torch_at = next((i for i, job in enumerate(jobs) if job["impl"] == "torch"), None)
    numpy_at = next((i for i, job in enumerate(jobs)
                     if job["impl"] != "torch" and job.get("what") == "train" and job.get("backend") == "numpy"), None)

    def ratio_to(i, at):
        ratios = [measured[r][i]["tokens_per_s"] / measured[r][at]["tokens_per_s"] for r in range(rounds)]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    rows = []
    for i, job in enumerate(jobs):
        runs = [measured[r][i] for r in range(rounds)]
        median = _median_round(runs)
        peaks = [x["peak_rss_mb"] for x in runs]
        row = {"job": job, "rounds": runs, "median_round": median, "tokens_per_s": runs[median]["tokens_per_s"],
               "peak_rss_mb": None if None in peaks else max(peaks)}       # None: not readable (Windows)
        if None not in peaks and all("baseline_rss_mb" in x for x in runs):   # what the model and run added
            row["run_rss_mb"] = max(x["peak_rss_mb"] - x["baseline_rss_mb"] for x in runs)
        if "ms_per_step" in runs[median]:
            row["ms_per_step"] = runs[median]["ms_per_step"]
        gpu_mb = [x.get("gpu_pool_mb", x.get("gpu_reserved_mb")) for x in runs]
        if None not in gpu_mb:
            row["gpu_mb"] = max(gpu_mb)
        if torch_at is not None:
            row["vs_torch"] = ratio_to(i, torch_at)
        if numpy_at is not None and job["impl"] != "torch":
            row["vs_numpy"] = ratio_to(i, numpy_at)
        rows.append(row)
    return rows


def _print_rows(out, title, rows, ms_key):
    n = len(rows[0]["rounds"])
    gpu = any("gpu_mb" in r for r in rows)
    mfu = any("mfu" in r for r in rows)
    out(f"\n{title}; " + ("1 round" if n == 1 else f"the median round of {n}"
                            + (" (of an even count, the slower middle one)" if n % 2 == 0 else "")
                            + ", memory: the largest of the rounds"))
    vs_numpy = any("vs_numpy" in r for r in rows)
    steps = any("run_rss_mb" in r for r in rows)
    vs_torch = any("vs_torch" in r for r in rows)          # no peer (--no-torch, no PyTorch): no column
    out(f"  {'':<28}" + (f" {'ms/step':>9}" if ms_key else "") + f" {'tokens/s':>10} {'peak MB':>9}"
        + (f" {'+MB model+run':>13}" if steps else "") + (f" {'GPU MB':>8}" if gpu else "")
        + (f" {'MFU':>6}" if mfu else "") + (f" {'vs pytorch (range)':>22}" if vs_torch else "")
        + (f" {'vs numpy (range)':>22}" if vs_numpy else ""))

    def ratio(v):
        return f"{v['median']:6.2f}x ({v['min']:.2f}-{v['max']:.2f})" if v else ""
    for r in rows:
        ms = f" {r[ms_key]:9.2f}" if ms_key else ""
        peak = f"{r['peak_rss_mb']:9.0f}" if r["peak_rss_mb"] is not None else f"{'n/a':>9}"
        line = f"  {_label(r):<28}{ms} {r['tokens_per_s']:10.0f} {peak}"
        if steps:
            line += f" {r['run_rss_mb']:13.0f}" if "run_rss_mb" in r else f" {'':>13}"
        if gpu:
            line += f" {r['gpu_mb']:8.0f}" if "gpu_mb" in r else f" {'':>8}"
        if mfu:
            line += f" {100 * r['mfu']:5.1f}%" if "mfu" in r else f" {'':>6}"
        if vs_torch:
            line += f" {ratio(r.get('vs_torch')):>22}"
        if vs_numpy:
            line += f" {ratio(r.get('vs_numpy')):>22}"
        out(line.rstrip())
