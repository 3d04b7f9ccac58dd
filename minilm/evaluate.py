"""`minilm eval`: validation loss, perplexity and bits per character of a checkpoint."""
import math

import numpy as np

from minilm import backend, checkpoint
from minilm.data import CharTokenizer, load_saved_text, split
from minilm.models import model_from_meta
from minilm.parallel import batch_runner
from minilm.validate import require_positive


MODEL_META = ("model", "tokenizer")                          # what rebuilding the model reads
EVAL_META = MODEL_META + ("data", "train_config", "iter")    # and what `minilm eval` reads besides


def load_model(path, required_meta=MODEL_META):
    """The model saved in the checkpoint at ``path``, on the active backend, its tokenizer and the
    checkpoint's meta, which must hold ``required_meta``."""
    saved = checkpoint.load(path, required_meta=required_meta)
    model = model_from_meta(saved.meta["model"])
    model.params.load(saved.params)
    tokenizer = CharTokenizer.from_dict(saved.meta["tokenizer"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"load_model: '{path}' holds a tokenizer of {tokenizer.vocab_size} characters for a model "
                         f"of vocab_size {model.config.vocab_size}; they were not saved together")
    return model, tokenizer, saved.meta


def evaluate(model, ids, *, block_size, batch_size, what="argument 'ids'"):
    """Mean cross-entropy (nats per character) over ``ids`` cut into non-overlapping windows.

    Every character after the first is predicted exactly once (windows start at 0, T, 2T, ...;
    a shorter last window is scored too), each window from an empty context. ``what`` names
    ``ids`` in an error message (a command names the text they come from).
    """
    require_positive("evaluate", "block_size", block_size, int)
    require_positive("evaluate", "batch_size", batch_size, int)
    if len(ids) < 2:
        raise ValueError(f"evaluate: {what} must hold at least 2 characters (one to predict from, one to "
                         f"predict), got {len(ids)}")
    runner = batch_runner(model)                                # the batch's rows over the cores
    starts = list(range(0, len(ids) - 1, block_size))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        T = min(block_size, len(ids) - 1 - group[-1])           # the last window may be short
        full = [s for s in group if s + block_size < len(ids)] if T < block_size else group
        for windows, length in ((full, block_size), ([s for s in group if s not in full], T)):
            if not windows or length == 0:
                continue
            x = np.stack([ids[s:s + length] for s in windows])
            y = np.stack([ids[s + 1:s + 1 + length] for s in windows])
            loss = float(runner.forward(backend.to_backend(x), backend.to_backend(y))[1])
            total += loss * y.size
            count += y.size
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "bits_per_char": mean / math.log(2), "characters": count}


def run(args, out=print):
    if args.batch_size is not None:                             # 0 is refused, not the default
        require_positive("minilm eval", "--batch-size", args.batch_size, int)
    model, tokenizer, meta = load_model(args.checkpoint, EVAL_META)
    text, source = load_saved_text(meta, args.data, command="minilm eval", path=args.checkpoint, other_text_ok=True)
    data = args.data or meta["data"]
    train_ids, val_ids = split(tokenizer.encode(text, what=f"option '--data' {data!r}"), 0.9)
    ids = val_ids if args.split == "val" else train_ids
    cfg = meta["train_config"]
    batch_size = cfg["batch_size"] if args.batch_size is None else args.batch_size
    result = evaluate(model, ids, block_size=cfg["block_size"], batch_size=batch_size,
                      what=f"the {args.split} split of --data {data!r}")
    out(f"{args.checkpoint} (iteration {meta['iter']}) on the {args.split} split of {source}, "
        f"{result['characters']:,} characters:")
    out(f"  loss {result['loss']:.4f} nats/char, perplexity {result['perplexity']:.3f}, "
        f"{result['bits_per_char']:.4f} bits/char")
    return 0
