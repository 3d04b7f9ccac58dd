"""Time to a target validation loss: minilm and PyTorch on one recipe, data order and evaluation.

Both runs use the same tokenizer, split, training batches (seeded), evaluation batches and
learning-rate schedule; only the model code differs. Training time excludes evaluation.
"""
import dataclasses
import json
import os
import tempfile
import time

from minilm import config
from minilm.data import CharTokenizer, RandomBatches, evaluation_batches, load_text, split


def minilm_curve(cfg, data, backend_name):
    import minilm
    from minilm import train
    minilm.use(backend_name)
    out = tempfile.mkdtemp(prefix="minilm-converge-")
    train.train(cfg, data=data, out_dir=out, progress=False, log=lambda *a: None)
    curve, seconds, prev = [], 0.0, 0
    tokens_per_step = cfg.batch_size * cfg.block_size
    for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        if r["tokens_per_s"]:
            seconds += (r["iter"] - prev) * tokens_per_step / r["tokens_per_s"]
        prev = r["iter"]
        curve.append({"iter": r["iter"], "train_seconds": seconds, "val_loss": r["val_loss"]})
    return curve


def torch_curve(cfg, data, threads):
    import torch
    from minilm.bench import peers
    from minilm.train import make_schedule
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    text, _ = load_text(data)
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = split(tokenizer.encode(text), 0.9)
    batches = RandomBatches(train_ids, cfg.block_size, cfg.batch_size, seed=cfg.seed)
    val = [(torch.from_numpy(x), torch.from_numpy(y))
           for x, y in evaluation_batches(val_ids, cfg.block_size, cfg.batch_size, cfg.eval_iters, seed=cfg.seed + 3)]
    model = peers.make_model(cfg, tokenizer.vocab_size)
    optimizer, schedule = peers.make_optimizer(model, cfg), make_schedule(cfg)
    curve, seconds = [], 0.0
    for it in range(cfg.max_iters + 1):
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            curve.append({"iter": it, "train_seconds": seconds, "val_loss": peers.estimate_loss(model, val)})
        if it == cfg.max_iters:
            break
        x, y = batches.next_batch()
        t0 = time.perf_counter()
        peers.train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y), schedule(it), cfg.grad_clip)
        seconds += time.perf_counter() - t0
    return curve


def time_to(curve, target):
    """Training seconds at the first evaluation with val loss <= target (None if never)."""
    return next((p["train_seconds"] for p in curve if p["val_loss"] <= target), None)


def run(preset_name, data, *, backends, threads, target, torch_peer=True, seed=None, out=print):
    cfg = config.preset(preset_name)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
        config.validate(cfg)
    results = []
    for b in backends:
        curve = minilm_curve(cfg, data, b)
        results.append({"impl": b, "curve": curve, "seconds_to_target": time_to(curve, target)})
    if torch_peer:
        curve = torch_curve(cfg, data, threads)
        results.append({"impl": "pytorch", "curve": curve, "seconds_to_target": time_to(curve, target)})
    out(f"\ntime to validation loss {target} on {preset_name}, seed {cfg.seed} (training time, evaluation excluded)")
    out(f"  {'':<10} {'final val loss':>15} {'seconds to target':>18} {'total seconds':>14}")
    for r in results:
        t = r["seconds_to_target"]
        out(f"  {r['impl']:<10} {r['curve'][-1]['val_loss']:15.4f} {('never' if t is None else f'{t:.1f}'):>18} "
            f"{r['curve'][-1]['train_seconds']:14.1f}")
    return results
