"""nanoGPT's own training loop for its README's CPU run, on the PyTorch peer's model.

    minilm bench --what nanogpt [--seed 1337] [--gelu tanh] [--data shakespeare] [--threads 2] [--backends numba]

``minilm bench --what converge`` gives the peer minilm's data order; this gives it nanoGPT's.
Everything random comes from PyTorch's generator, seeded with the seed nanoGPT's ``train.py``
gives it (``torch.manual_seed(1337)`` by default): the initial weights, the training batches (each
drawn right after the forward of the one before, as ``train.py`` prefetches) and the evaluation
batches (``estimate_loss``: 20 random batches of each split every 250 iterations, the README's
``--eval_iters=20``). The peer's weights are drawn again in the order nanoGPT's ``GPT`` draws
them (``_init_as_nanogpt``), so the initial weights, and every draw after them, are those of
nanoGPT's own run of that seed. The recipe is the ``shakespeare-char-cpu`` preset's, which is
that README command's, and the GELU is nanoGPT's exact ``nn.GELU()`` unless ``gelu="tanh"``
(minilm's form).
At the end the model is also scored on the whole validation split, as ``minilm eval`` scores a
checkpoint. With ``--backends``, minilm then trains on each from the same initial weights, on the
batches nanoGPT's loop drew, each where that loop drew it, and is estimated and scored alike.
"""
import dataclasses
import math
import time

import numpy as np
import torch

from minilm.bench import converge, peers
from minilm.bench.threads import limited, torch_limited
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
        max_iters=None, backends=()):
    """Train as nanoGPT's loop does; returns the curve (nanoGPT's estimates) and the final losses.
    ``max_iters`` stops it early (the learning-rate schedule keeps the preset's length). Each of
    ``backends`` then trains minilm on that backend from the same initial weights, on the batches
    nanoGPT's loop drew, in its order, with the same estimates (``result["minilm"]``)."""
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"minilm bench: option '--seed' must be an integer >= 0, got {seed!r}")
    cfg = preset(preset_name)
    if cfg.model != "gpt":
        raise ValueError(f"minilm bench: nanoGPT's loop trains a GPT, and preset {preset_name!r} is a model of "
                         f"{cfg.model} layers")
    if max_iters is not None:
        cfg = dataclasses.replace(cfg, max_iters=max_iters)
    with torch_limited(threads):
        result, drawn, weights, ids = _train(cfg, seed, data, gelu, preset_name, out, record=bool(backends))
    result["minilm"] = []
    for name in backends:
        with limited(threads):
            result["minilm"].append(_minilm_on(cfg, drawn, weights, ids, name, result, out))
    return result


def _init_as_nanogpt(model, seed):
    """Draw the peer's weights again from ``torch.manual_seed(seed)`` in the order nanoGPT's ``GPT``
    draws them, which leaves PyTorch's generator where nanoGPT's model leaves it.

    nanoGPT's constructor draws each module's default initialisation as it builds it (an
    embedding N(0, 1), a linear layer's weight and bias uniform), and builds one more module than
    the peer: the output ``Linear`` (V, C), after the blocks, whose weight it then ties to the
    token embedding. ``apply(_init_weights)`` then draws every weight from N(0, 0.02), children
    before parents in the order they were built: the tied weight twice, first as the embedding and
    last as the head, which is the draw it keeps. Last come the residual projections, from
    N(0, 0.02 / sqrt(2 * n_layer))."""
    torch.manual_seed(seed)
    blocks = [(block.c_attn, block.c_proj, block.c_fc, block.mlp_proj) for block in model.h]
    linears = [linear for block in blocks for linear in block]
    vocab_size, n_embd = model.wte.weight.shape
    with torch.no_grad():
        for module in (model.wte, model.wpe, *linears):     # as built: PyTorch's default draws
            module.reset_parameters()
        torch.nn.Linear(n_embd, vocab_size, bias=False)     # nanoGPT's output layer, built and tied
        for module in (model.wte, model.wpe, *linears, model.wte):     # apply(_init_weights); the last: the head
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
        for c_proj, mlp_proj in ((block[1], block[3]) for block in blocks):
            for linear in (c_proj, mlp_proj):               # its 'attn.c_proj' and 'mlp.c_proj'
                torch.nn.init.normal_(linear.weight, mean=0.0, std=0.02 / math.sqrt(2 * len(blocks)))


def _train(cfg, seed, data, gelu, preset_name, out, record=False):
    """``run``'s loop, on the threads ``run`` gives PyTorch. Returns its result; with ``record``
    also every batch it drew, as (split, x, y) in the order drawn, the initial weights in minilm's
    names and layout, and the split's ids (else None for the three)."""
    torch.manual_seed(seed)
    text, _ = load_text(data)
    tokenizer = CharTokenizer.from_text(text)
    splits = dict(zip(("train", "val"), (torch.from_numpy(ids.astype(np.int64))
                                         for ids in split(tokenizer.encode(text), 0.9))))
    T, B = cfg.block_size, cfg.batch_size

    drawn = [] if record else None

    def get_batch(name):                                  # train.py's get_batch
        ids = splits[name]
        ix = torch.randint(len(ids) - T, (B,))
        x, y = torch.stack([ids[i:i + T] for i in ix]), torch.stack([ids[i + 1:i + 1 + T] for i in ix])
        if record:
            drawn.append((name, x.numpy(), y.numpy()))
        return x, y

    model = peers.TorchGPT(tokenizer.vocab_size, T, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.dropout, gelu)
    _init_as_nanogpt(model, seed)
    weights = peers.minilm_arrays(model) if record else None
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
    result = {"seed": seed, "gelu": gelu, "preset": preset_name, "curve": curve,
              "val_loss_20_batches": curve[-1]["val"], "val_loss_whole_split": whole, "seconds": seconds}
    ids = {"vocab_size": tokenizer.vocab_size, "val": splits["val"].numpy()} if record else None
    return result, drawn, weights, ids


def _minilm_on(cfg, drawn, weights, ids, backend_name, theirs, out):
    """minilm on ``backend_name`` from nanoGPT's initial weights ``weights``, trained and estimated
    on the batches nanoGPT's loop drew (``drawn``), each where that loop drew it; minilm's GELU is
    the tanh form. Said beside nanoGPT's curve ``theirs``."""
    T, B = cfg.block_size, cfg.batch_size
    model, step, loss_of = converge.minilm_trainer(cfg, ids["vocab_size"], backend_name, weights)
    batches = iter(drawn)

    def get_batch(name):                                  # the next batch nanoGPT's loop drew, of that split
        drawn_name, x, y = next(batches)
        if drawn_name != name:
            raise RuntimeError(f"minilm's loop asked for a {name} batch where nanoGPT's loop drew a {drawn_name} one")
        return x, y

    curve, t0 = [], time.perf_counter()
    x, y = get_batch("train")
    for it in range(cfg.max_iters + 1):
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            curve.append({"iter": it, **{name: loss_of([get_batch(name) for _ in range(EVAL_ITERS)])
                                         for name in ("train", "val")}})
            out(f"  minilm ({backend_name}): iter {it}: train loss {curve[-1]['train']:.4f}, "
                f"val loss {curve[-1]['val']:.4f}")
        if it == cfg.max_iters:
            break
        step(it, x, y)
        x, y = get_batch("train")
    seconds = time.perf_counter() - t0
    whole = evaluate(model, ids["val"], block_size=T, batch_size=B)["loss"]
    out(f"\nminilm ({backend_name}, tanh GELU) from nanoGPT's initial weights of torch.manual_seed({theirs['seed']}), "
        f"on the batches its loop drew: {seconds:.0f} s")
    if theirs["gelu"] == "none":
        out("  (the peer's GELU is nanoGPT's exact one, minilm's the tanh form; --gelu tanh gives both the tanh form)")
    out(f"  {'iter':>6} {'nanoGPT val (20)':>17} {'minilm val (20)':>16} {'difference':>11}")
    for mine, their in zip(curve, theirs["curve"]):
        out(f"  {mine['iter']:>6} {their['val']:17.4f} {mine['val']:16.4f} {mine['val'] - their['val']:11.4f}")
    out(f"  validation loss over the whole split at {cfg.max_iters}: nanoGPT {theirs['val_loss_whole_split']:.4f}, "
        f"minilm {whole:.4f}")
    return {"backend": backend_name, "curve": curve, "val_loss_20_batches": curve[-1]["val"],
            "val_loss_whole_split": whole, "seconds": seconds}
