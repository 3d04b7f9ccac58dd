"""`minilm eval`: validation loss, perplexity and bits per character of a checkpoint."""
import math
import sys

import numpy as np

from minilm import backend, checkpoint
from minilm.data import CharTokenizer, load_saved_text, split
from minilm.models import model_from_meta, param_count
from minilm.parallel import batch_runner
from minilm.validate import require_bool, require_positive


MODEL_META = ("model", "tokenizer")                          # what rebuilding the model reads
EVAL_META = MODEL_META + ("data", "train_config", "iter")    # and what `minilm eval` reads besides


def load_model(path, required_meta=MODEL_META):
    """The model saved in the checkpoint at ``path``, on the active backend, its tokenizer and the
    checkpoint's meta, which must hold ``required_meta``."""
    saved = checkpoint.load(path, required_meta=required_meta)
    try:
        _require_params_of(saved.meta["model"], saved.params)      # before a model of that size is built
        model = model_from_meta(saved.meta["model"])
        load_finite(model.params, saved.params)
    except (ValueError, TypeError) as e:        # an edited file's entries: the file is named, then the entry
        raise type(e)(f"load_model: '{path}': {e}") from None
    return model, saved_tokenizer(saved.meta, path, "load_model"), saved.meta


def saved_tokenizer(meta, path, op):
    """The tokenizer in a checkpoint's meta, refused (naming the file) where it is not one, or not of
    as many characters as the saved model's vocabulary."""
    try:
        tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
    except (ValueError, TypeError) as e:
        raise type(e)(f"{op}: '{path}' meta entry 'tokenizer': {e}") from None
    model = meta.get("model")
    config = model.get("config") if isinstance(model, dict) else None
    vocab_size = config.get("vocab_size") if isinstance(config, dict) else None     # else the model's reader says
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{op}: '{path}' holds a tokenizer of {tokenizer.vocab_size} characters for a model "
                         f"of vocab_size {vocab_size!r}; they were not saved together")
    return tokenizer


def _require_params_of(model_meta, params):
    """Refuse saved parameters that are not as many as the saved model holds, counted without building it."""
    if not (isinstance(model_meta, dict) and "kind" in model_meta and isinstance(model_meta.get("config"), dict)):
        return                                                  # model_from_meta says what it must be
    n = param_count(model_meta["kind"], dict(model_meta["config"]))
    if tuple(params.shape) != (n,):
        raise ValueError(f"its entry 'params' has shape {tuple(params.shape)}, but the model its meta describes has "
                         f"{n:,} parameters; they were not saved together")


def load_finite(params, flat):
    """``params.load(flat)``, then ``require_finite``: a saved value too large for the model's dtype
    is refused by name there, without NumPy's warning of an overflow in the cast before it."""
    with np.errstate(over="ignore"):
        params.load(flat)
    require_finite(params, flat)


def require_finite(params, flat):
    """Refuse loaded weights that hold NaN or an infinity, which would make the losses and the logits
    NaN (``minilm train`` stops on such a loss before it saves). ``params`` has loaded ``flat``, the
    saved buffer laid out as it: the weights the forward reads are checked, in their own dtype (no
    copy), so a saved value too large for that dtype, which loads as an infinity, is refused too."""
    weights = params.compute                                    # what the forward reads (params.data unmixed)
    xp = backend.get_array_module(weights)
    if bool(xp.isfinite(weights).all()):
        return
    for name in params:
        where = params.slice(name)
        bad = backend.to_numpy(xp.flatnonzero(~xp.isfinite(weights[where])))
        if bad.size:
            i = where.start + int(bad[0])
            first, saved = float(weights[i]), float(flat[i])
            if math.isfinite(saved):                            # finite in the file, not in the model's dtype
                first = f"{first}, saved as {saved!r}, which {weights.dtype} cannot hold"
            raise ValueError(f"its parameter '{name}' holds {bad.size:,} value{'s' if bad.size > 1 else ''} that "
                             f"{'are' if bad.size > 1 else 'is'} not finite (first {first}); a model with it "
                             f"would compute NaN losses and logits")


def _noticed(forward):
    """``forward`` with ``backend.compile_notice`` around its first call: on a cold cache that call
    compiles Numba's kernels, and a wait of seconds is said to be that, not a hang."""
    called = []

    def call(*args, **kwargs):
        if called:
            return forward(*args, **kwargs)
        called.append(True)
        with backend.compile_notice():
            return forward(*args, **kwargs)
    return call


def evaluate(model, ids, *, block_size, batch_size, carry_state=False, what="argument 'ids'"):
    """Mean cross-entropy (nats per character) over ``ids``; every character after the first is
    predicted exactly once.

    By default ``ids`` is cut into non-overlapping windows (starting at 0, T, 2T, ...; a shorter
    last window is scored too), each scored on its own (a GPT predicts its first character from
    that character alone, a recurrent model starts it from a zero state), as a model trained on
    random windows saw them. With ``carry_state`` (a recurrent model trained with contiguous batches,
    which carries its state from one chunk to the next) ``ids`` is cut into ``batch_size`` streams
    instead, as ``ContiguousBatches`` cuts a corpus, and each stream is scored chunk by chunk with
    the state carried, so that every character is predicted from all of its stream's history
    (with ``batch_size`` 1: one pass over the whole text). ``what`` names ``ids`` in an error
    message (a command names the text they come from).
    """
    require_positive("evaluate", "block_size", block_size, int)
    require_positive("evaluate", "batch_size", batch_size, int)
    require_bool("evaluate", "carry_state", carry_state)
    # checked here, by the name the caller knows, rather than as the model's 'idx' or 'targets'
    try:
        ids = np.asarray(backend.to_numpy(ids) if hasattr(ids, "shape") else ids)
    except (TypeError, ValueError):                             # nested lists of unequal rows
        raise ValueError(f"evaluate: {what} must be a 1-D sequence of integer token ids, got a "
                         f"{type(ids).__name__} that is not one array") from None
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        got = f"shape {ids.shape}" if ids.ndim != 1 else f"dtype {ids.dtype}"
        raise ValueError(f"evaluate: {what} must be a 1-D sequence of integer token ids, got {got}")
    config = getattr(model, "config", None)                     # (evaluate also scores models of other kinds)
    V = getattr(config, "vocab_size", None)
    if V is not None and ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"evaluate: {what} must hold ids in [0, {V}) (the model's vocabulary), got {bad}")
    window = getattr(config, "block_size", None)
    if window is not None and block_size > window:
        raise ValueError(f"evaluate: option 'block_size' must be at most the model's block_size = {window}, "
                         f"got {block_size}")
    if len(ids) < 2:
        raise ValueError(f"evaluate: {what} must hold at least 2 characters (one to predict from, one to "
                         f"predict), got {len(ids)}")
    runner = batch_runner(model)                                # the batch's rows over the cores
    forward = _noticed(runner.forward)
    if carry_state:
        if getattr(model, "kind", None) != "rnn":
            raise ValueError(f"evaluate: option 'carry_state' is for recurrent models, which carry a state; "
                             f"got a {type(model).__name__}")
        return _result(*stream_loss(runner, np.asarray(ids), block_size, batch_size))
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
            loss = float(forward(backend.to_backend(x), backend.to_backend(y))[1])
            total += loss * y.size
            count += y.size
    return _result(total / count, count)


def _result(mean, count):
    # e^mean overflows a float past ~709.8 nats (a diverged model's loss can be finite and that large)
    perplexity = math.exp(mean) if not mean > math.log(sys.float_info.max) else math.inf
    return {"loss": mean, "perplexity": perplexity, "bits_per_char": mean / math.log(2), "characters": count}


def stream_loss(model, ids, block_size, batch_size):
    """(mean loss, characters) of a recurrent ``model`` over ``ids`` cut into streams, the state
    carried from chunk to chunk (``evaluate(..., carry_state=True)``).

    The B = min(batch_size, len(ids) - 1) streams have L = (len(ids) - 1) // B predictions each,
    stream b those of ids[b L + 1 : (b + 1) L + 1]; the r < B predictions left over follow the last
    stream's, so they are scored last, from its final state.
    """
    n = len(ids) - 1                                            # characters to predict
    B = min(batch_size, n)
    L = n // B
    x, y = ids[:B * L].reshape(B, L), ids[1:B * L + 1].reshape(B, L)    # (B, L): stream b is row b
    total, state = 0.0, None
    forward = _noticed(model.forward)

    def chunk(xc, yc, state):
        _, loss, state = forward(backend.to_backend(xc), backend.to_backend(yc), state=state)
        return float(loss) * yc.size, state

    for t in range(0, L, block_size):                           # the B streams side by side
        loss, state = chunk(x[:, t:t + block_size], y[:, t:t + block_size], state)
        total += loss
    state = tuple(tuple(s[-1:] for s in layer) for layer in state)      # the last stream's, for the rest
    for t in range(B * L, n, block_size):
        end = min(t + block_size, n)
        loss, state = chunk(ids[None, t:end], ids[None, t + 1:end + 1], state)
        total += loss
    return total / n, n


def run(args, out=print):
    if args.batch_size is not None:                             # 0 is refused, not the default
        require_positive("minilm eval", "--batch-size", args.batch_size, int)
    model, tokenizer, meta = load_model(args.checkpoint, EVAL_META)
    checkpoint.check_meta(meta, args.checkpoint, {"data": checkpoint.TEXT, "iter": checkpoint.COUNT,
                                                  "train_config.block_size": checkpoint.POSITIVE_COUNT,
                                                  "train_config.batch_size": checkpoint.POSITIVE_COUNT})
    text, source = load_saved_text(meta, args.data, command="minilm eval", path=args.checkpoint, other_text_ok=True)
    data = args.data or meta["data"]
    train_ids, val_ids = split(tokenizer.encode(text, what=f"option '--data' {data!r}"), 0.9,
                               what=f"option '--data' {data!r}")
    ids = val_ids if args.split == "val" else train_ids
    cfg = meta["train_config"]
    batch_size = cfg["batch_size"] if args.batch_size is None else args.batch_size
    carry = model.kind == "rnn" and cfg.get("batching") == "contiguous"    # scored as it was trained
    result = evaluate(model, ids, block_size=cfg["block_size"], batch_size=batch_size, carry_state=carry,
                      what=f"the {args.split} split of --data {data!r}")
    streams = min(batch_size, len(ids) - 1)
    how = (f"{streams} stream{'s' if streams > 1 else ''}, the state carried (trained with --batching contiguous)"
           if carry else f"windows of {cfg['block_size']}, each scored on its own"
           + ("" if model.kind == "gpt" else " from a zero state"))
    out(f"{args.checkpoint} (iteration {meta['iter']}) on the {args.split} split of {source}, "
        f"{result['characters']:,} characters in {how}:")
    out(f"  loss {result['loss']:.4f} nats/char, perplexity {result['perplexity']:.3f}, "
        f"{result['bits_per_char']:.4f} bits/char")
    return 0
