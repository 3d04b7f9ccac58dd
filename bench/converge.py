"""Time to a target validation loss: minilm and PyTorch on one recipe, data order and evaluation.

Both runs use the same tokenizer, split, training batches (seeded), evaluation batches and
learning-rate schedule; only the model code differs. Both count training time as ``minilm train``
counts it: a step with its batch draw, evaluation excluded, and the first step (minilm's: Numba's
compilation; the peer's: PyTorch's first allocations) not timed, the steps before the first
evaluation billed at the average of the others.
"""
import dataclasses
import json
import os
import tempfile
import time

from minilm import config
from minilm.data import CharTokenizer, RandomBatches, evaluation_batches, load_text, split
from minilm.bench.threads import limited, torch_limited


def _silent(line):
    pass


def minilm_curve(cfg, data, backend_name, say=_silent):
    """minilm train's curve; ``say`` gets each evaluation's line as it is made. Its training seconds
    come from the tokens/s minilm train logs at each evaluation, over the steps since the one before
    (the first step left out of them, as ``_loop`` leaves it out)."""
    import minilm
    from minilm import train
    minilm.use(backend_name)
    with tempfile.TemporaryDirectory(prefix="minilm-converge-") as out:     # its checkpoints are not kept
        train.train(cfg, data=data, out_dir=out, progress=False, log=lambda line: say(f"  {backend_name}: {line}"))
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    curve, seconds, prev = [], 0.0, 0
    tokens_per_step = cfg.batch_size * cfg.block_size
    for r in rows:
        if r["tokens_per_s"]:
            seconds += (r["iter"] - prev) * tokens_per_step / r["tokens_per_s"]
        prev = r["iter"]
        curve.append({"iter": r["iter"], "train_seconds": seconds, "val_loss": r["val_loss"]})
    return curve


def _corpus(cfg, data):
    """The vocabulary size, the seeded training batches and the fixed evaluation batches of a run."""
    text, _ = load_text(data)
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = split(tokenizer.encode(text), 0.9)
    batches = RandomBatches(train_ids, cfg.block_size, cfg.batch_size, seed=cfg.seed)
    val = evaluation_batches(val_ids, cfg.block_size, cfg.batch_size, cfg.eval_iters, seed=cfg.seed + 3)
    return tokenizer.vocab_size, batches, val


def _loop(cfg, batches, val, step, evaluate, say=_silent):
    """max_iters training steps ``step(it, x, y)``, the validation loss ``evaluate(val)`` every
    eval_interval and at the end (each said as it is made). Training seconds are counted as
    minilm train counts them (``minilm_curve``): a step with its batch draw, evaluation excluded;
    the first step is not timed, and the steps between two evaluations are billed at the average
    of those timed (none timed: nothing billed, as minilm train then logs no tokens/s)."""
    curve, seconds = [], 0.0
    steps, timed, timed_seconds = 0, 0, 0.0             # since the last evaluation
    for it in range(cfg.max_iters + 1):
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            seconds += steps * timed_seconds / timed if timed else 0.0
            steps, timed, timed_seconds = 0, 0, 0.0
            curve.append({"iter": it, "train_seconds": seconds, "val_loss": evaluate(val)})
            say(f"iter {it}: val loss {curve[-1]['val_loss']:.4f}, {seconds:.1f} s of training")
        if it == cfg.max_iters:
            break
        t0 = time.perf_counter()
        x, y = batches.next_batch()
        step(it, x, y)
        dt = time.perf_counter() - t0
        steps += 1
        if it > 0:                                      # the first step: compilation, first allocations
            timed, timed_seconds = timed + 1, timed_seconds + dt
    return curve


def torch_curve(cfg, data, threads, initial_weights=None, say=_silent):
    """The PyTorch peer's curve; ``initial_weights`` (a dict) receives its initial weights in
    minilm's names and layout (``peers.minilm_arrays``)."""
    import torch
    from minilm.bench import peers
    from minilm.train import make_schedule
    with torch_limited(threads):
        torch.manual_seed(cfg.seed)
        vocab_size, batches, val = _corpus(cfg, data)
        val = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in val]
        model = peers.make_model(cfg, vocab_size)
        if initial_weights is not None:
            peers.one_recurrent_bias(model)
            initial_weights.update(peers.minilm_arrays(model))
        optimizer, schedule = peers.make_optimizer(model, cfg), make_schedule(cfg)

        def step(it, x, y):
            peers.train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y), schedule(it), cfg.grad_clip)
        return _loop(cfg, batches, val, step, lambda batches: peers.estimate_loss(model, batches),
                     say=lambda line: say(f"  pytorch: {line}"))


def minilm_trainer(cfg, vocab_size, backend_name, weights):
    """minilm's model of ``cfg`` on ``backend_name`` from the given initial weights, with the step
    ``step(it, x, y)`` minilm train takes and the mean loss ``loss_of(batches)`` of a list of
    batches; recurrent models start each batch from a zero state. Returns (model, step, loss_of)."""
    import numpy as np
    import minilm
    from minilm.models import build_model
    from minilm.parallel import batch_runner
    from minilm.precision import LossScaler
    from minilm.train import apply_gradients, make_optimizer, make_schedule, model_settings
    minilm.use(backend_name)
    kind, model_cfg = model_settings(cfg, vocab_size)
    model = build_model(kind, model_cfg, dtype=np.float32, seed=cfg.seed)
    for name, value in weights.items():
        model.params.values[name][...] = value
    optimizer, schedule, scaler = make_optimizer(cfg, model.params), make_schedule(cfg), LossScaler(enabled=False)
    state = {"state": None} if kind == "rnn" else {}
    runner = batch_runner(model)        # as minilm train runs it

    def step(it, x, y):
        runner.forward(x, y, train=True, **state)
        runner.backward(scaler.scale)
        apply_gradients(model, optimizer, schedule(it), grad_clip=cfg.grad_clip, scaler=scaler)

    def loss_of(batches):
        return float(np.mean([float(runner.forward(x, y, **state)[1]) for x, y in batches]))
    return model, step, loss_of


def minilm_curve_from(cfg, data, backend_name, weights, say=_silent):
    """minilm's curve from the given initial weights, with the peer's loop: the same batches,
    random ones for recurrent models too, each starting from a zero state."""
    vocab_size, batches, val = _corpus(cfg, data)
    _, step, loss_of = minilm_trainer(cfg, vocab_size, backend_name, weights)
    return _loop(cfg, batches, val, step, loss_of, say=lambda line: say(f"  {backend_name}: {line}"))


def time_to(curve, target):
    """Training seconds at the first evaluation with val loss <= target (None if never)."""
    return next((p["train_seconds"] for p in curve if p["val_loss"] <= target), None)


def _config(preset_name, seed, max_iters=None):
    """The preset's settings, with another seed or number of iterations when given; the schedule
    keeps the preset's length (``lr_decay_iters``), so past it the learning rate stays at its floor."""
    cfg = config.preset(preset_name)
    cfg = dataclasses.replace(cfg, lr_decay_iters=cfg.schedule_length())
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    if max_iters is not None:
        cfg = dataclasses.replace(cfg, max_iters=max_iters)
    return config.validate(cfg)


def run(preset_name, data, *, backends, threads, target, torch_peer=True, seed=None, max_iters=None, out=print):
    cfg = _config(preset_name, seed, max_iters)
    results = []
    for b in backends:
        with limited(threads):                          # as many threads as the peer's
            curve = minilm_curve(cfg, data, b, say=out)
        results.append({"impl": b, "curve": curve, "seconds_to_target": time_to(curve, target)})
    if torch_peer:
        curve = torch_curve(cfg, data, threads, say=out)
        results.append({"impl": "pytorch", "curve": curve, "seconds_to_target": time_to(curve, target)})
    out(f"\ntime to validation loss {target} on {preset_name}, seed {cfg.seed} (training time as minilm train "
        "counts it: evaluation excluded, the first step billed at the others' average)")
    out(f"  {'':<10} {'final val loss':>15} {'seconds to target':>18} {'total seconds':>14}")
    for r in results:
        t = r["seconds_to_target"]
        out(f"  {r['impl']:<10} {r['curve'][-1]['val_loss']:15.4f} {('never' if t is None else f'{t:.1f}'):>18} "
            f"{r['curve'][-1]['train_seconds']:14.1f}")
    return results


def replay(preset_name, data, *, backend, threads, seed=None, max_iters=None, out=print):
    """minilm and the PyTorch peer from the same initial weights (the peer's, drawn with seed), on
    the same batches and evaluation batches: what is left between the two is the implementations."""
    cfg = _config(preset_name, seed, max_iters)
    weights = {}
    peer = torch_curve(cfg, data, threads, initial_weights=weights, say=out)
    with limited(threads):
        ours = minilm_curve_from(cfg, data, backend, weights, say=out)
    out(f"\n{preset_name}, seed {cfg.seed}: minilm ({backend}) from the PyTorch peer's initial weights, "
        "on the same batches; validation loss")
    out(f"  {'iter':>6} {'minilm':>9} {'pytorch':>9} {'difference':>11}")
    for a, b in zip(ours, peer):
        out(f"  {a['iter']:>6} {a['val_loss']:9.4f} {b['val_loss']:9.4f} {a['val_loss'] - b['val_loss']:11.4f}")
    return {"preset": preset_name, "seed": cfg.seed, "backend": backend, "minilm": ours, "pytorch": peer}
