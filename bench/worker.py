"""One measurement in a fresh process: ``python -m minilm.bench.worker '<json job>'``.

Each job runs alone in its own process, so its peak resident memory is its own, thread
settings are applied before any library starts its pool, and one backend's compiled code or
allocator never warms another's. Prints one JSON object.
"""
import json
import os
import resource
import sys
import time

import numpy as np


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux reports KiB


def _stats(times, tokens):
    ms = 1000 * np.asarray(times)
    return {"ms_per_step": float(np.median(ms)), "ms_per_step_min": float(ms.min()),
            "tokens_per_s": tokens / float(np.median(times)), "steps": len(times)}


def _data(V, B, T, steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (steps, B, T))
    y = rng.integers(0, V, (steps, B, T))
    return x, y


def minilm_train(job, cfg, V):
    import minilm
    from minilm import backend, optim
    from minilm.train import make_optimizer, make_schedule, model_settings
    from minilm.models import build_model
    minilm.use(job["backend"])
    kind, model_cfg = model_settings(cfg, V)
    model = build_model(kind, model_cfg, dtype=np.float32, seed=0)
    optimizer, schedule = make_optimizer(cfg, model.params), make_schedule(cfg)
    baseline = _rss_mb()
    x, y = _data(V, cfg.batch_size, cfg.block_size, job["warmup"] + job["steps"])
    rng = np.random.default_rng(1)
    times = []
    for i in range(len(x)):
        xb, yb = backend.to_backend(x[i]), backend.to_backend(y[i])
        t0 = time.perf_counter()
        loss = model.forward(xb, yb, train=True, rng=rng)[1]
        model.backward()
        optim.clip_grad_norm(model.params, cfg.grad_clip)
        optimizer.step(schedule(i))
        float(loss)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    return {**_stats(times, cfg.batch_size * cfg.block_size), "baseline_rss_mb": baseline}


def torch_train(job, cfg, V):
    import torch
    from minilm.bench import peers
    torch.manual_seed(0)
    model = peers.make_model(cfg, V)
    optimizer = peers.make_optimizer(model, cfg)
    baseline = _rss_mb()
    x, y = _data(V, cfg.batch_size, cfg.block_size, job["warmup"] + job["steps"])
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        peers.train_step(model, optimizer, x[i], y[i], cfg.lr, cfg.grad_clip)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    return {**_stats(times, cfg.batch_size * cfg.block_size), "baseline_rss_mb": baseline}


def minilm_sample(job, cfg, V):
    import minilm
    from minilm.models import build_model
    from minilm.sample import generate
    from minilm.train import model_settings
    minilm.use(job["backend"])
    kind, model_cfg = model_settings(cfg, V)
    model = build_model(kind, model_cfg, dtype=np.float32, seed=0)
    prompt = np.array([1])
    list(generate(model, prompt, 8, seed=0, use_cache=job["cache"]))          # compile / warm up
    baseline = _rss_mb()
    t0 = time.perf_counter()
    n = len(list(generate(model, prompt, job["tokens"], seed=0, use_cache=job["cache"])))
    dt = time.perf_counter() - t0
    return {"tokens_per_s": n / dt, "seconds": dt, "tokens": n, "baseline_rss_mb": baseline}


def torch_sample(job, cfg, V):
    import torch
    from minilm.bench import peers
    torch.manual_seed(0)
    model = peers.make_model(cfg, V).eval()
    idx = torch.ones((1, 1), dtype=torch.long)
    model.generate(idx, 8)
    baseline = _rss_mb()
    t0 = time.perf_counter()
    out = model.generate(idx, job["tokens"])
    dt = time.perf_counter() - t0
    n = out.shape[1] - 1
    return {"tokens_per_s": n / dt, "seconds": dt, "tokens": n, "baseline_rss_mb": baseline}


def main(argv):
    job = json.loads(argv[0])
    threads = job["threads"]
    if job["impl"] == "torch":
        import torch
        torch.set_num_threads(threads)
    from minilm.config import preset
    cfg = preset(job["preset"])
    V = job.get("vocab_size", 65)
    run = {("minilm", "train"): minilm_train, ("torch", "train"): torch_train,
           ("minilm", "sample"): minilm_sample, ("torch", "sample"): torch_sample}[job["impl"], job["what"]]
    result = run(job, cfg, V)
    result.update(job=job, peak_rss_mb=_rss_mb(), threads=threads,
                  numba_threads=os.environ.get("NUMBA_NUM_THREADS"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
