"""nanoGPT's own training loop for its README's CPU run, on the PyTorch peer's model.

    minilm bench --what nanogpt [--seed 1337] [--gelu tanh] [--data shakespeare] [--threads 2]

``minilm bench --what converge`` gives the peer minilm's data order; this gives it nanoGPT's.
Everything random comes from PyTorch's generator, seeded with the seed nanoGPT's ``train.py``
gives it (``torch.manual_seed(1337)`` by default): the initial weights, the training batches (each
drawn right after the forward of the one before, as ``train.py`` prefetches) and the evaluation
batches (``estimate_loss``: 20 random batches of each split every 250 iterations, the README's
``--eval_iters=20``). The seed is nanoGPT's but the draws are not: nanoGPT's model also builds an
output ``Linear`` whose weight it ties to the embedding, and draws that (V, C) weight twice more
(PyTorch's default init, then its own), where the peer draws it once, so every later draw is
offset. A seed's run is therefore a sample of nanoGPT's recipe, not nanoGPT's own run of that
seed. The recipe is the ``shakespeare-char-cpu`` preset's, which is that README command's, and the
GELU is nanoGPT's exact ``nn.GELU()`` unless ``gelu="tanh"`` (minilm's form).
At the end the model is also scored on the whole validation split, as ``minilm eval`` scores a
checkpoint.
"""
import dataclasses
import time

import numpy as np
import torch

from minilm.bench import peers
from minilm.bench.threads import torch_limited
from minilm.config import preset
from minilm.data import CharTokenizer, load_text, split
from minilm.evaluate import evaluate
from minilm.train import make_schedule

EVAL_ITERS = 20          # nanoGPT README's CPU command: --eval_iters=20


class _Scorer:
    """The peer behind the ``forward(x, y) -> (logits, loss)`` that ``minilm.evaluate`` calls."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def forward(self, x, y):
        return self.model(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)))


def run(seed=1337, data="shakespeare", gelu="none", threads=2, preset_name="shakespeare-char-cpu", out=print,
        max_iters=None):
    """Train as nanoGPT's loop does; returns the curve (nanoGPT's estimates) and the final losses.
    ``max_iters`` stops it early (the learning-rate schedule keeps the preset's length)."""
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"minilm bench: option '--seed' must be an integer >= 0, got {seed!r}")
    cfg = preset(preset_name)
    if max_iters is not None:
        cfg = dataclasses.replace(cfg, max_iters=max_iters)
    with torch_limited(threads):
        return _train(cfg, seed, data, gelu, preset_name, out)


def _train(cfg, seed, data, gelu, preset_name, out):
    """``run``'s loop, on the threads ``run`` gives PyTorch."""
    torch.manual_seed(seed)
    text, _ = load_text(data)
    tokenizer = CharTokenizer.from_text(text)
    splits = dict(zip(("train", "val"), (torch.from_numpy(ids.astype(np.int64))
                                         for ids in split(tokenizer.encode(text), 0.9))))
    T, B = cfg.block_size, cfg.batch_size

    def get_batch(name):                                  # train.py's get_batch
        ids = splits[name]
        ix = torch.randint(len(ids) - T, (B,))
        return torch.stack([ids[i:i + T] for i in ix]), torch.stack([ids[i + 1:i + 1 + T] for i in ix])

    model = peers.TorchGPT(tokenizer.vocab_size, T, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.dropout, gelu)
    optimizer, schedule = peers.make_optimizer(model, cfg, fused=False), make_schedule(cfg)   # as nanoGPT on a CPU

    @torch.no_grad()
    def estimate_loss():                                  # train.py's estimate_loss
        model.eval()
        out = {name: float(np.mean([model(*get_batch(name))[1].item() for _ in range(EVAL_ITERS)]))
               for name in ("train", "val")}
        model.train()
        return out

    curve, t0 = [], time.perf_counter()
    x, y = get_batch("train")
    for it in range(cfg.max_iters + 1):
        lr = schedule(it)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            curve.append({"iter": it, **estimate_loss()})
            out(f"  nanoGPT's loop: iter {it}: train loss {curve[-1]['train']:.4f}, val loss {curve[-1]['val']:.4f}")
        if it == cfg.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    model.eval()
    whole = evaluate(_Scorer(model), splits["val"].numpy(), block_size=T, batch_size=B)["loss"]
    out(f"\nnanoGPT's loop on the PyTorch peer, {preset_name}, torch.manual_seed({seed}), "
        f"{'exact' if gelu == 'none' else 'tanh'} GELU: {seconds:.0f} s")
    out(f"  {'iter':>6} {'train (20 batches)':>19} {'val (20 batches)':>17}")
    for point in curve:
        out(f"  {point['iter']:>6} {point['train']:19.4f} {point['val']:17.4f}")
    out(f"  validation loss over the whole split at {cfg.max_iters}: {whole:.4f}")
    return {"seed": seed, "gelu": gelu, "preset": preset_name, "curve": curve, "val_loss_20_batches": curve[-1]["val"],
            "val_loss_whole_split": whole, "seconds": seconds}
