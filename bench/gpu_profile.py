"""Where a GPU training step of the baby GPT goes, minilm (cupy) beside PyTorch eager, in one process.

    python -m minilm.bench.gpu_profile [DTYPE ...]        # default: float32 bfloat16

For each dtype and side it prints the wall time of a step (median of 20, after 5 warm-up steps;
the GPU synchronised before and after each; minilm's step as ``minilm train`` runs it, replayed as
a CUDA graph where it can be), the device time of the step's kernels and the
kernels that take it, largest first (PyTorch's profiler through CUPTI sees every CUDA kernel of
the process, CuPy's and cuBLAS's included), and for minilm the Python functions that hold the
host longest (cProfile). Wall time above device time is time the GPU waited for the host.
Needs CuPy, a CUDA build of PyTorch and a GPU; ``gpu/run.sh OUTDIR profile`` runs it.
"""
import argparse
import cProfile
import importlib.util
import io
import pstats
import sys
import time

import numpy as np

STEPS, WARMUP, PROFILED = 20, 5, 5


def _kernel_table(prof, label, rows=25):
    """The profiled steps' kernels by device time: (ms a step, kernels a step, text of the table)."""
    kernels = []
    for event in prof.key_averages():                      # only CUDA activity was recorded: kernels, copies
        total = getattr(event, "device_time_total", None)
        if total is None:                                  # older PyTorch
            total = event.cuda_time_total
        if total and "CUDA" in str(event.device_type):
            kernels.append((total / 1000 / PROFILED, event.count / PROFILED, event.key))
    kernels.sort(reverse=True)
    device_ms = sum(k[0] for k in kernels)
    lines = [f"== {label}: device time {device_ms:.2f} ms a step, {sum(k[1] for k in kernels):.0f} kernels a step"]
    lines += [f"  {ms:8.3f} ms {count:6.1f}x  {name[:100]}" for ms, count, name in kernels[:rows]]
    return device_ms, "\n".join(lines)


def _measure(step, sync, label, host_profile):
    import torch.profiler
    for i in range(WARMUP):
        step(i)
    sync()
    times = []
    for i in range(STEPS):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    wall = 1000 * float(np.median(times))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(PROFILED):
            step(i)
        sync()
    device_ms, table = _kernel_table(prof, f"{label}, wall {wall:.2f} ms a step")
    print(table, flush=True)
    if host_profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(PROFILED):
            step(i)
        sync()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        print(f"== {label}: host time by function, {PROFILED} steps\n" + text.getvalue(), flush=True)
    return wall, device_ms


def main(dtypes):
    import cupy
    import torch
    import minilm
    from minilm.bench import peers
    from minilm.config import preset
    from minilm.models import build_model
    from minilm.precision import LossScaler
    from minilm.train import TrainStep, make_optimizer, make_schedule, model_settings
    cfg, V = preset("shakespeare-char"), 65
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, V, (8, cfg.batch_size, cfg.block_size)) for _ in range(2))
    minilm.use("cupy")
    summary = []
    for dtype in dtypes:
        kind, model_cfg = model_settings(cfg, V)
        model = build_model(kind, model_cfg, dtype=dtype, seed=0)
        optimizer, schedule = make_optimizer(cfg, model.params), make_schedule(cfg)
        scaler, dropout_rng = LossScaler(enabled=dtype == "float16"), np.random.default_rng(1)

        train_step = TrainStep(model, model, optimizer, scaler, grad_clip=cfg.grad_clip)   # as minilm train runs it

        def step(i):
            return float(train_step(x[i % 8], y[i % 8], schedule(i), rng=dropout_rng)[0])
        summary.append((f"minilm {dtype}",) + _measure(step, cupy.cuda.Device().synchronize, f"minilm {dtype}", True))
        model = optimizer = step = train_step = None       # free the GPU memory before the peer
        cupy.get_default_memory_pool().free_all_blocks()

        torch.manual_seed(0)
        peer = peers.make_model(cfg, V).to("cuda")
        peer_optimizer = peers.make_optimizer(peer, cfg)
        amp = None if dtype == "float32" else getattr(torch, dtype)
        grad_scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def peer_step(i):           # copies its batch to the device, as minilm's step copies it from NumPy
            return peers.train_step(peer, peer_optimizer, tx[i % 8].to("cuda"), ty[i % 8].to("cuda"), cfg.lr,
                                    cfg.grad_clip, amp_dtype=amp, scaler=grad_scaler)
        summary.append((f"pytorch {dtype}",) + _measure(peer_step, torch.cuda.synchronize, f"pytorch {dtype}", False))
        peer = peer_optimizer = peer_step = None
        torch.cuda.empty_cache()
    print("\n                      wall ms   device ms   (a step)")
    for label, wall, device_ms in summary:
        print(f"  {label:18s} {wall:9.2f} {device_ms:11.2f}")


def _parse(argv=None):
    """The command line: the dtypes to profile, each once, in the order given."""
    parser = argparse.ArgumentParser(
        prog="python -m minilm.bench.gpu_profile",
        description="Where a GPU training step of the baby GPT goes, minilm (cupy) beside PyTorch eager. "
                    "Needs CuPy, a CUDA build of PyTorch and a GPU.")
    parser.add_argument("dtypes", nargs="*", metavar="DTYPE",
                        help="float32, bfloat16 or float16 (default: float32 bfloat16)")
    dtypes = parser.parse_args(argv).dtypes
    # (argparse's choices= would refuse the empty list of no DTYPE before Python 3.12)
    unknown = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if unknown:
        parser.error(f"DTYPE must be float32, bfloat16 or float16; got {', '.join(map(repr, unknown))}")
    return list(dict.fromkeys(dtypes)) or ["float32", "bfloat16"]


if __name__ == "__main__":
    dtypes = _parse()
    missing = [m for m in ("cupy", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"minilm.bench.gpu_profile: needs CuPy and a CUDA PyTorch on a GPU machine; "
                 f"not installed: {', '.join(missing)}")
    main(dtypes)
