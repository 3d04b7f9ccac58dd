"""One measurement in a fresh process: ``python -m minilm.bench.worker '<json job>'``.

Each job runs alone in its own process, so its peak resident memory is its own, thread
settings are applied before any library starts its pool, and one backend's compiled code or
allocator never warms another's. Prints one JSON object.
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np

try:
    import resource
except ImportError:                         # Windows: no getrusage, and no peak memory column
    resource = None


# Linux's own count of this process's peak resident memory. getrusage's ru_maxrss is carried over
# fork and exec there (getrusage(2)), so a worker's would start at the bench process's peak.
PROC_STATUS = "/proc/self/status"


def _rss_mb():
    """The process's peak resident memory in MB (None where it cannot be read: Windows)."""
    try:
        with open(PROC_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):                  # "VmHWM:   43256 kB"
                    return int(line.split()[1]) / 2**10
    except OSError:                                            # not Linux
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10     # bytes on macOS, KiB on Linux


def _stats(times, tokens):
    ms = 1000 * np.asarray(times)
    return {"ms_per_step": float(np.median(ms)), "ms_per_step_min": float(ms.min()),
            "tokens_per_s": tokens / float(np.median(times)), "steps": len(times)}


def _data(V, B, T, steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (steps, B, T))
    y = rng.integers(0, V, (steps, B, T))
    return x, y


def _cupy_sync():
    """Waits for the GPU: CuPy launches work asynchronously, so a clock read needs this first."""
    import cupy
    return cupy.cuda.Device().synchronize


def _no_sync():
    pass


def _start_cuda(torch=None):
    """Create the CUDA context (CuPy's, or ``torch``'s) before a memory baseline: its host memory,
    hundreds of MB, belongs with the libraries', not in +MB model+run (on a GPU the model's own
    memory is in the GPU MB column)."""
    if torch is not None:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    else:
        import cupy
        cupy.zeros(1)
        cupy.cuda.Device().synchronize()


def minilm_train(job, cfg, V):
    import minilm
    from minilm.models import build_model
    from minilm.parallel import batch_runner
    from minilm.precision import LossScaler
    from minilm.train import TrainStep, make_optimizer, make_schedule, model_settings
    minilm.use(job["backend"])
    dtype = job.get("dtype", "float32")
    on_gpu = job["backend"] == "cupy"
    sync = _cupy_sync() if on_gpu else _no_sync
    if on_gpu:
        _start_cuda()
    baseline = _rss_mb()            # before the model, as the peer's (see torch_train)
    kind, model_cfg = model_settings(cfg, V)
    model = build_model(kind, model_cfg, dtype=dtype, seed=0)          # 16-bit: mixed precision
    runner = batch_runner(model)        # as minilm train runs it: on numba, the batch over the cores
    optimizer, schedule = make_optimizer(cfg, model.params), make_schedule(cfg)
    scaler = LossScaler(enabled=dtype == "float16")
    step = TrainStep(model, runner, optimizer, scaler, grad_clip=cfg.grad_clip, cuda_graph=job.get("cuda_graph", True))
    x, y = _data(V, cfg.batch_size, cfg.block_size, job["warmup"] + job["steps"])
    rng = np.random.default_rng(1)
    times = []
    for i in range(len(x)):
        sync()
        t0 = time.perf_counter()       # the step copies its batch to the device, as minilm train's does
        loss, _ = step(x[i], y[i], schedule(i), rng=rng)
        loss = float(loss)
        sync()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    result = {**_stats(times, cfg.batch_size * cfg.block_size), "baseline_rss_mb": baseline,
              "final_loss": loss, "skipped_steps": scaler.skipped, "cuda_graph": step.captured is not None}
    if kind == "gpt":
        result["n_params"] = model.n_params(non_embedding=True)
    if on_gpu:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        pools = cupy.get_default_memory_pool().total_bytes() + (step.captured.pool_bytes() if step.captured else 0)
        result.update(gpu_pool_mb=pools / 2 ** 20, cupy=cupy.__version__,
                      gpu=name.decode() if isinstance(name, bytes) else str(name))
    return result


def torch_train(job, cfg, V):
    import torch
    from minilm.bench import peers
    device, dtype = job.get("device", "cpu"), job.get("dtype", "float32")
    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else _no_sync
    amp_dtype = None if dtype == "float32" else getattr(torch, dtype)       # torch.bfloat16, torch.float16
    if amp_dtype is not None and not on_gpu:
        raise ValueError(f"minilm bench: the PyTorch peer runs {dtype} only on cuda, got device {device!r}")
    if on_gpu and dtype == "float32":
        torch.backends.cudnn.allow_tf32 = False     # cuDNN's RNNs would take TF32 tensor cores (PyTorch's default)
    torch.manual_seed(0)
    # the baseline before the model on both sides: PyTorch allocates its gradients and AdamW's moments
    # at the first step, minilm with the model and optimizer; from here, +MB holds them on both. The
    # first optimizer PyTorch makes imports some 800 modules (dynamo, sympy: ~70 MB of library, no
    # state): a scratch one, made first, puts them in the baseline with the other libraries
    peers.make_optimizer(torch.nn.Linear(1, 1), cfg)
    if on_gpu:
        _start_cuda(torch)
    baseline = _rss_mb()
    model = peers.make_model(cfg, V).to(device)             # float32 weights, also under autocast
    optimizer = peers.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    x, y = _data(V, cfg.batch_size, cfg.block_size, job["warmup"] + job["steps"])
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    times, skipped = [], 0
    for i in range(len(x)):
        scale = scaler.get_scale() if scaler else None
        sync()
        t0 = time.perf_counter()
        xb, yb = x[i].to(device), y[i].to(device)       # timed, as minilm's step copies its batch in its timer
        loss = peers.train_step(model, optimizer, xb, yb, cfg.lr, cfg.grad_clip, amp_dtype=amp_dtype, scaler=scaler)
        sync()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
        skipped += bool(scaler and scaler.get_scale() < scale)     # GradScaler lowers the scale on a skipped step
    result = {**_stats(times, cfg.batch_size * cfg.block_size), "baseline_rss_mb": baseline,
              "final_loss": loss, "skipped_steps": skipped}
    if cfg.model == "gpt":
        result["n_params"] = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    if on_gpu:
        result.update(gpu_peak_allocated_mb=torch.cuda.max_memory_allocated() / 2 ** 20,
                      gpu_reserved_mb=torch.cuda.max_memory_reserved() / 2 ** 20,
                      gpu=torch.cuda.get_device_name(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                      tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    if cfg.model != "gpt" and amp_dtype is not None:    # what autocast gave cuDNN's RNN (float16 for bfloat16?)
        with torch.no_grad(), torch.autocast(device, dtype=amp_dtype):
            result["rnn_output_dtype"] = str(model.rnn(model.embed(xb))[0].dtype)
    return result


def minilm_sample(job, cfg, V):
    import minilm
    from minilm.models import build_model
    from minilm.sample import generate
    from minilm.train import model_settings
    minilm.use(job["backend"])
    sync = _cupy_sync() if job["backend"] == "cupy" else _no_sync
    if job["backend"] == "cupy":
        _start_cuda()
    baseline = _rss_mb()                                # before the model, as in training
    kind, model_cfg = model_settings(cfg, V)
    model = build_model(kind, model_cfg, dtype=np.float32, seed=0)
    prompt = np.array([1])

    def sample():
        return len(list(generate(model, prompt, job["tokens"], seed=0, use_cache=job["cache"])))
    sample()            # warm-up: the timed run itself, so that its context shifts' prefills have run once too
    sync()
    t0 = time.perf_counter()
    n = sample()
    sync()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": n / dt, "seconds": dt, "tokens": n, "baseline_rss_mb": baseline}


def torch_sample(job, cfg, V):
    import torch
    from minilm.bench import peers
    device = job.get("device", "cpu")                   # "cuda": the peer of the cupy rows
    sync = torch.cuda.synchronize if device == "cuda" else _no_sync
    torch.manual_seed(0)
    if device == "cuda":
        _start_cuda(torch)
    baseline = _rss_mb()
    model = peers.make_model(cfg, V).to(device).eval()
    idx = torch.ones((1, 1), dtype=torch.long, device=device)
    model.generate(idx, job["tokens"])                  # warm-up: the timed run itself, as minilm's
    sync()
    t0 = time.perf_counter()
    out = model.generate(idx, job["tokens"])
    sync()
    dt = time.perf_counter() - t0
    n = out.shape[1] - 1
    result = {"tokens_per_s": n / dt, "seconds": dt, "tokens": n, "baseline_rss_mb": baseline}
    if device == "cuda":
        result.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, torch_cuda=torch.version.cuda)
    return result


def main(argv):
    job = json.loads(argv[0])
    threads = job["threads"]
    if job["impl"] == "torch":
        import torch
        torch.set_num_threads(threads)
    from minilm.config import preset
    cfg = preset(job["preset"])
    if job.get("batch_size"):
        cfg = dataclasses.replace(cfg, batch_size=job["batch_size"])
    V = job.get("vocab_size", 65)
    run = {("minilm", "train"): minilm_train, ("torch", "train"): torch_train,
           ("minilm", "sample"): minilm_sample, ("torch", "sample"): torch_sample}[job["impl"], job["what"]]
    result = run(job, cfg, V)
    result.update(job=job, peak_rss_mb=_rss_mb(), threads=threads,
                  numba_threads=os.environ.get("NUMBA_NUM_THREADS"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
