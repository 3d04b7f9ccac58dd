"""`minilm train`: the training loop, one flat function you can read top to bottom (``_train``).

    minilm train --preset shakespeare-char-cpu --data shakespeare --out out/shakespeare

writes into ``--out``: ``last.npz`` and ``best.npz`` (checkpoints, written atomically),
``metrics.jsonl`` (one JSON object per evaluation) and ``loss.png`` (when matplotlib is
installed). ``--resume`` continues from ``last.npz`` so that it computes exactly the losses
the uninterrupted run would have; Ctrl-C (or a SIGTERM) saves ``last.npz`` before exiting.

Read in this order: the pieces of one step (optimiser, schedule, ``TrainStep``), then ``_train``:
the settings and the corpus, the model and its batches, the saved run's state, then the loop
(evaluate and save every ``eval_interval``; one step). The functions after it refuse bad runs,
hold the ``--out`` folder, and save and resume; none is needed to follow the loop.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import stat
import sys
import threading
import time
import warnings

import numpy as np

try:
    import fcntl                    # the folder's lock; Windows has none
except ImportError:
    fcntl = None

from minilm import backend, checkpoint, config, optim
from minilm.precision import LossScaler
from minilm.validate import as_numpy_dtype, require_bool
from minilm.data import (CharTokenizer, ContiguousBatches, RandomBatches, evaluation_batches, load_saved_text,
                         load_text, physical_memory as _physical_memory, split, text_digest)
from minilm.models import build_model, model_meta, param_count
from minilm.evaluate import load_finite, saved_tokenizer, stream_loss
from minilm.parallel import batch_runner


# The pieces of a training step: the optimiser, the learning-rate schedule, the model's settings,
# one step (forward, backward, update) and the evaluation loss.

def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return optim.AdamW(params, cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(params, cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer == "sgd":
        return optim.SGD(params, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return optim.RMSprop(params, cfg.lr, alpha=cfg.rmsprop_alpha, momentum=cfg.momentum)


def make_schedule(cfg):
    if cfg.schedule == "constant":
        return optim.Constant(cfg.lr)
    if cfg.schedule == "step":
        return optim.Step(cfg.lr, cfg.lr_step_size, cfg.lr_gamma)
    return optim.WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.schedule_length())


def model_settings(cfg, vocab_size):
    """The model kind and the config dict ``build_model`` takes, from a TrainConfig."""
    if cfg.model == "gpt":
        return "gpt", dict(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    return "rnn", dict(vocab_size=vocab_size, cell=cfg.model, n_layer=cfg.n_layer,
                       hidden_size=cfg.hidden_size, n_embd=cfg.n_embd, dropout=cfg.dropout)


def apply_gradients(model, optimizer, lr, *, grad_clip, scaler, finite=None):
    """After ``model.backward(scaler.scale)``: unscale, clip and update; False when the step is skipped.

    With mixed precision the 16-bit gradients become float32 (divided by the loss scale), a step
    whose gradients overflowed is skipped (and the scale lowered), and the updated master weights
    are copied back into the 16-bit compute weights. ``finite`` given: the gradients are unscaled
    already and that says whether they are finite (a captured step, ``TrainStep``).
    """
    if finite is None:
        finite = model.params.unscale_grads(1.0 / scaler.scale)
    scaler.update(finite)
    if not finite and model.params.mixed:
        return False
    if grad_clip:
        optim.clip_grad_norm(model.params, grad_clip)
    optimizer.step(lr)
    model.params.sync()
    return True


class TrainStep:
    """One training step on a batch: forward, backward, unscale, clip and update.

    ``step(x, y, lr, rng=rng, state=None) -> (loss, state)``: ``x``, ``y`` are (B, T) NumPy id
    arrays, ``rng`` the dropout rng, ``state`` a recurrent model's carried state (None: zeros);
    ``loss`` is a 0-d array on the backend's device. On the cupy backend a GPT's forward, backward
    and unscaling run as one CUDA graph (``minilm.gpu.graph``: captured on the second step, then
    replayed), unless ``cuda_graph`` is False or float16's loss scaling is on. The graph computes
    the step the op calls compute, and draws the same dropout seeds from ``rng``.
    """

    def __init__(self, model, runner, optimizer, scaler, *, grad_clip, cuda_graph=True):
        self.model, self.runner, self.optimizer, self.scaler, self.grad_clip = model, runner, optimizer, scaler, grad_clip
        self.captured = None
        if cuda_graph and backend.current() == "cupy" and model.kind == "gpt" and not scaler.enabled:
            from minilm.gpu.graph import CapturedStep, CaptureError
            self.captured, self._capture_error = CapturedStep(model), CaptureError

    def __call__(self, x, y, lr, *, rng, state=None):
        if self.captured is not None:                       # the cupy backend's CUDA graph
            loss = self._replay(x, y, lr, rng)
            if loss is not None:
                return loss, state
        x, y = backend.to_backend(x), backend.to_backend(y)
        if self.model.kind == "rnn":
            _, loss, state = self.runner.forward(x, y, state=state, train=True, rng=rng)
        else:
            _, loss = self.runner.forward(x, y, train=True, rng=rng)
        self.runner.backward(self.scaler.scale)
        apply_gradients(self.model, self.optimizer, lr, grad_clip=self.grad_clip, scaler=self.scaler)
        return loss, state

    def _replay(self, x, y, lr, rng):
        """The step as the captured CUDA graph; None when it cannot be captured (nothing ran and
        nothing was drawn), and every step from then on runs op by op."""
        try:
            loss, finite = self.captured(x, y, rng)
        except self._capture_error as e:
            warnings.warn(f"{e}; running every step op by op", RuntimeWarning, stacklevel=3)
            self.captured = None
            return None
        apply_gradients(self.model, self.optimizer, lr, grad_clip=self.grad_clip, scaler=self.scaler,
                        finite=True if finite is None else bool(finite))
        return loss


def estimate_loss(model, batches):
    """Mean loss over a fixed list of batches (the same batches at every evaluation)."""
    return float(np.mean([float(model.forward(backend.to_backend(x), backend.to_backend(y))[1]) for x, y in batches]))


def train(cfg, *, data, out_dir, resume=False, overwrite=False, progress=True, cuda_graph=True, log=print):
    """Train a model as ``cfg`` says on the text ``data``; write checkpoints and metrics to ``out_dir``.

    With ``resume``, the model, optimiser, data order and random states come from
    ``out_dir/last.npz``; ``cfg`` must describe the same model (start from ``saved_config``).
    ``data`` None then means the saved run's text, and any other ``data`` must hold that same
    text (a resumed run computes the losses the uninterrupted one would have). Without it, an
    ``out_dir`` that already holds a run's checkpoints is refused unless ``overwrite``.
    ``cuda_graph`` False runs every step op by op on the cupy backend (``TrainStep``).

    Returns a dict with the final iteration (``iter``), the last evaluation (``last_eval``),
    ``stopped_early``, and ``interrupted``: False, or the name of the signal that stopped the run
    ("SIGINT" for Ctrl-C, "SIGTERM"), after it saved ``last.npz``.

    Its errors name the command line's options, as ``minilm train`` reports them: ``--out`` is
    ``out_dir``, ``--data``, ``--resume`` and ``--overwrite`` the arguments of those names,
    ``--backend`` is ``minilm.use``, and every other option the ``cfg`` field of its name
    (``--block-size`` is ``cfg.block_size``).
    """
    flags = {"resume": resume, "overwrite": overwrite, "progress": progress, "cuda_graph": cuda_graph}
    for name, value in flags.items():
        require_bool("minilm train", name, value)            # progress="no" would draw the bar
    if not callable(log):
        raise TypeError(f"minilm train: argument 'log' must be a callable such as print, got {type(log).__name__}")
    check_out_dir(out_dir)
    with _RunFolder(out_dir) as folder:                 # held by this run until it ends
        return _train(cfg, data, folder, resume=resume, overwrite=overwrite, progress=progress,
                      cuda_graph=cuda_graph, log=log)


def _train(cfg, data, folder, *, resume, overwrite, progress, cuda_graph, log):
    out_dir = folder.path
    if os.path.isdir(out_dir):                          # a run's folder is held before its files are read
        folder.hold()
    last_path, best_path = os.path.join(out_dir, "last.npz"), os.path.join(out_dir, "best.npz")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # 1. the settings (checked) and the corpus, split 90/10 into training and validation ids
    cfg, saved = _run_settings(cfg, out_dir, resume=resume, overwrite=overwrite, log=log)
    if saved is not None:
        text, source = load_saved_text(saved.meta, data, command="minilm train: --resume", path=last_path)
        data = saved.meta["data"] if data is None else data
        tokenizer = saved_tokenizer(saved.meta, last_path, "minilm train: --resume")
    else:
        text, source = load_text(data)
        tokenizer = CharTokenizer.from_text(text)
    digest = text_digest(text)
    ids = tokenizer.encode(text, what=f"option '--data' {data!r}")    # a resumed run's vocabulary
    train_ids, val_ids = _split_checked(ids, cfg, data)
    dtype = as_numpy_dtype("minilm train", "--dtype", cfg.dtype)
    # forward and backward over the cores (minilm.parallel), one slice a Numba thread; a resumed run cuts
    # its batches into as many slices as the saved run did, whatever this machine's thread count, since the
    # slices set the rounding (never more slices than rows: a batch of B rows is cut into at most B)
    same_backend = saved is not None and saved.meta.get("backend") == backend.current()
    slices = saved.meta.get("slices") if same_backend and backend.current() == "numba" else None
    threads = slices or _numba_threads()                    # None: not numba, the model runs itself
    threads = min(threads, cfg.batch_size) if threads else None
    _check_memory(cfg, tokenizer.vocab_size, slices=threads or 1, saved_slices=slices is not None,
                  resumed_from=last_path if saved is not None else None)

    # 2. the model, its optimiser and schedule, the training batches and the evaluation loss
    kind, model_cfg = model_settings(cfg, tokenizer.vocab_size)
    model = build_model(kind, model_cfg, dtype=dtype, seed=cfg.seed)
    runner = batch_runner(model, threads=threads)
    optimizer = make_optimizer(cfg, model.params)
    schedule = make_schedule(cfg)
    dropout_rng = np.random.default_rng(cfg.seed + 1)
    # a recurrent model on contiguous batches carries its state from one batch to the next
    # (truncated backpropagation through time), and is scored the same way
    carry_state = kind == "rnn" and cfg.batching == "contiguous"
    if carry_state:
        batches = ContiguousBatches(train_ids, cfg.block_size, cfg.batch_size)
        n = cfg.eval_iters * cfg.batch_size * cfg.block_size + 1     # as many characters as the random batches
        eval_texts = {"train": train_ids[:n], "val": val_ids[:n]}

        def split_loss(name):
            return stream_loss(runner, eval_texts[name], cfg.block_size, cfg.batch_size)[0]
    else:
        batches = RandomBatches(train_ids, cfg.block_size, cfg.batch_size, seed=cfg.seed)
        eval_batches = {"train": evaluation_batches(train_ids, cfg.block_size, cfg.batch_size, cfg.eval_iters,
                                                    seed=cfg.seed + 2),
                        "val": evaluation_batches(val_ids, cfg.block_size, cfg.batch_size, cfg.eval_iters,
                                                  seed=cfg.seed + 3)}

        def split_loss(name):
            return estimate_loss(runner, eval_batches[name])
    stopper = optim.EarlyStopping(cfg.patience) if cfg.patience else None
    scaler = LossScaler(enabled=cfg.dtype == "float16")
    step = TrainStep(model, runner, optimizer, scaler, grad_clip=cfg.grad_clip, cuda_graph=cuda_graph)
    it, best_val, state, last_eval_iter, elapsed_before = 0, math.inf, None, None, 0.0
    rows, drawn_rows, drawn_at = 0, 0, -math.inf            # metrics.jsonl's rows, those in loss.png, and when
    result = {"stopped_early": False, "interrupted": False, "last_eval": None}

    # 3. the --out folder, and with --resume the saved run's weights, moments, data order and rngs
    folder.hold()                                       # made once everything is built: a refused run leaves none
    if not resume and not overwrite:                    # again: another run may have written there since
        _refuse_a_held_run(out_dir)
    _remove_stale_temporaries(out_dir)

    if saved is not None:
        checkpoint.check_compatible(saved.meta, {"model": model_meta(model)}, path=last_path)
        try:                        # states that their readers check, but know no file of
            load_finite(model.params, saved.params)
            optimizer.load_state_dict(saved.optimizer_state)
            batches.load_state_dict(saved.meta["batches"])
            dropout_rng.bit_generator.state = saved.meta["dropout_rng"]
            if saved.meta.get("loss_scaler"):
                scaler.load_state_dict(saved.meta["loss_scaler"])
            if carry_state and saved.meta.get("rnn_state") is not None:     # (older random-batched runs saved one too)
                state = [tuple(backend.to_backend(np.asarray(s, dtype=dtype)) for s in layer)
                         for layer in saved.meta["rnn_state"]]
                model._check_state("its meta entry 'rnn_state'", state, cfg.batch_size)     # before a step uses it
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"checkpoint.load: '{last_path}' holds a run state that minilm train cannot restore "
                             f"({type(e).__name__}: {e}); was it edited?") from None
        it, best_val = saved.meta["iter"], saved.meta["best_val_loss"]
        last_eval_iter = saved.meta["last_eval_iter"]
        if stopper is not None and saved.meta.get("early_stopping"):
            stopper.load_state_dict(saved.meta["early_stopping"])
        elif stopper is not None and math.isfinite(best_val):     # --patience given only now: from the run's best
            stopper.best = best_val
        kept_rows = _keep_metrics_up_to(metrics_path, last_eval_iter)
        rows = len(kept_rows)
        elapsed_before = _elapsed_before(saved.meta, kept_rows)  # the run's earlier sessions
        log(f"resuming {last_path} at iteration {it}")
        notes = [_rounding_note(saved.meta, runner, model, cfg.batch_size, slices, cfg.dropout),
                 _dropout_note(saved.meta, cfg)]
        if carry_state and "slices" not in saved.meta and math.isfinite(best_val):    # scored in windows, maybe
            best_val, note = _best_scored_now(best_path, saved, model, lambda: split_loss("val"))
            notes.append(note)
            if stopper is not None:
                stopper.best = best_val
        for note in filter(None, notes):
            log(f"note: {note}")
        saved.params, saved.optimizer_state = None, {}      # copied into the model and optimiser: not held on
        if stopper is not None and stopper.stopped:                 # the saved run had stopped here, or stops now
            before = saved.meta["train_config"]["patience"]
            why = (f"the saved run stopped early at iteration {it}" if before and stopper.bad_evals >= before else
                   f"--patience {cfg.patience} ends the run at iteration {it}, where it was saved (its --patience "
                   f"was {before})")
            log(f"{why}: no improvement in {stopper.bad_evals} evaluations; give a larger --patience (or 0) "
                f"to train on")
            result.update(stopped_early=True, iter=it)
            return result
    else:
        if os.path.lexists(metrics_path):    # a link to nothing too: appends would go through it
            os.remove(metrics_path)          # a fresh run starts a fresh metrics file (--overwrite: else refused)
        if overwrite:                        # and no old curve, which this run may never draw over
            with contextlib.suppress(OSError):      # (one that is not a file is said when the curve is drawn)
                os.remove(os.path.join(out_dir, "loss.png"))

    # 4. the loop: evaluate (and save) every eval_interval and at the end, then one step
    log(f"{cfg.model} model, {model.params.size:,} parameters, vocabulary {tokenizer.vocab_size}, "
        f"{len(train_ids):,} training / {len(val_ids):,} validation characters from {source}, "
        f"backend {backend.current()}, {cfg.dtype}")
    if saved is not None and it >= cfg.max_iters:           # said after the summary, which reads as a start
        log(f"the saved run is at iteration {it} already, --max-iters is {cfg.max_iters}: nothing to train; "
            f"give a larger --max-iters to train on")
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_iters, initial=it, disable=not progress, unit="it", dynamic_ncols=True)
    say = bar.write if progress and log is print else log      # printed above the bar, or to the caller's log
    warn = (lambda line: bar.write(line, file=sys.stderr)) if log is print else log
    if carry_state and batches.n_chunks == 1:       # every batch then starts the streams over, from zeros
        warn(f"minilm train: warning: --batching contiguous carries no state here: the training text "
             f"({len(train_ids):,} characters) cut into --batch-size {cfg.batch_size} streams holds one "
             f"--block-size {cfg.block_size} chunk per stream, so every batch starts from a zero state; a "
             f"smaller --batch-size or --block-size carries it")
    train_time, train_tokens, start = 0.0, 0, time.perf_counter()
    tokens_per_step = cfg.batch_size * cfg.block_size
    first_step, png_failed, skipped_before = True, False, scaler.skipped

    def draw():
        """loss.png from metrics.jsonl; a failure is said once and the run goes on."""
        nonlocal png_failed, drawn_rows, drawn_at
        png_error = _plot(metrics_path, os.path.join(out_dir, "loss.png"))
        if png_error is not None and not png_failed:            # said once
            warn(f"minilm train: warning: could not write {os.path.join(out_dir, 'loss.png')}: "
                 f"{getattr(png_error, 'strerror', None) or png_error}; training goes on without the loss "
                 f"curve")
        png_failed = png_error is not None
        drawn_rows, drawn_at = rows, time.perf_counter()

    def elapsed():
        """Seconds spent in the training loop (training and evaluating), summed over the run's sessions."""
        return elapsed_before + time.perf_counter() - start

    # what a checkpoint holds beside the weights and the optimiser's moments: all that --resume
    # needs to compute exactly the losses the uninterrupted run would have
    def meta():
        return {
            "model": model_meta(model),
            "train_config": dataclasses.asdict(cfg), "tokenizer": tokenizer.to_dict(), "iter": it,
            "best_val_loss": best_val, "batches": batches.state_dict(), "dropout_rng": dropout_rng.bit_generator.state,
            "early_stopping": stopper.state_dict() if stopper else None, "backend": backend.current(),
            "slices": getattr(runner, "threads", 1), "threads": _numba_threads(),
            "loss_scaler": scaler.state_dict(),
            "dtype": cfg.dtype, "last_eval_iter": last_eval_iter,
            "data": data if data == "shakespeare" else os.path.abspath(data), "data_sha256": digest,
            "rnn_state": None if state is None else [[backend.to_numpy(s).tolist() for s in layer] for layer in state],
            "elapsed_s": elapsed(), "meta_version": META_VERSION,
        }

    def draw_the_rest(kind, error, trace):
        """loss.png's rows not drawn yet, when the session ends: at its last evaluation, interrupted,
        stopped early or by an error (a loss that is not finite); not on a second Ctrl-C, which quits at
        once. Returns None: an error goes on."""
        if drawn_rows < rows and (kind is None or issubclass(kind, Exception)):
            draw()

    # the bar is closed however the session ends: one left open by an error stays in tqdm's list of bars
    # (a notebook keeps the traceback that holds it), and every later bar is drawn below it, with it
    with bar, _StopRequest() as stop, contextlib.ExitStack() as session_end:
        session_end.push(draw_the_rest)
        while True:
            # evaluate at every eval_interval and at the end (not again right after resuming there, nor
            # past the end: a run saved beyond a --max-iters given now has nothing to train or evaluate)
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != last_eval_iter and it <= cfg.max_iters:
                train_loss, val_loss = split_loss("train"), split_loss("val")
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):   # before anything is written
                    raise FloatingPointError(_diverged(f"the evaluation loss became {val_loss} (train "
                                                       f"{train_loss})", it, last_path, cfg.lr))
                row = {"iter": it, "train_loss": train_loss, "val_loss": val_loss, "lr": schedule(it),
                       "tokens_per_s": train_tokens / train_time if train_time else None,
                       "elapsed_s": elapsed()}
                if scaler.enabled:                      # float16: the loss scale, and the steps it skipped
                    row.update(loss_scale=scaler.scale, skipped_steps=scaler.skipped)
                train_time, train_tokens = 0.0, 0                   # tokens_per_s: since this evaluation
                _append_metrics(metrics_path, row, last_path, last_eval_iter)
                rows += 1
                result["last_eval"] = row
                improved = val_loss < best_val
                best_val = min(best_val, val_loss)
                last_eval_iter = it
                # counted before it is saved; an evaluation at --max-iters off the eval_interval grid is one a
                # run straight through never makes, so it does not count (a resumed run stops where that one does)
                on_grid = it % cfg.eval_interval == 0
                stop_early = stopper is not None and on_grid and stopper.update(val_loss)
                if improved:
                    _save(best_path, model, optimizer, meta())
                _save(last_path, model, optimizer, meta())
                if (rows - drawn_rows) * PLOT_GROWTH >= drawn_rows or time.perf_counter() - drawn_at >= PLOT_EVERY_S:
                    draw()
                skipped = scaler.skipped - skipped_before
                say(f"iter {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"     # once saved
                    + (f", {skipped} step{'s' * (skipped > 1)} skipped (float16 overflow; loss scale now "
                       f"{scaler.scale:g})" if skipped else ""))
                skipped_before = scaler.skipped
                if stop_early:
                    say(f"stopping early: no improvement in {cfg.patience} evaluations")
                    result["stopped_early"] = True
                    break
            if it >= cfg.max_iters:
                break
            if stop.requested:
                _save(last_path, model, optimizer, meta())
                say(f"interrupted: saved iteration {it} to {last_path}; continue with --resume")
                result["interrupted"] = signal.Signals(stop.requested).name
                break

            # one training step: batch, forward, backward, clip, update
            t0 = time.perf_counter()
            if carry_state:
                x, y, reset = batches.next_batch()
                state = None if reset else state         # the streams begin the text again: from zeros
            else:
                x, y = batches.next_batch()
            lr = schedule(it)
            with backend.compile_notice(write=warn) if first_step else contextlib.nullcontext():
                loss, state = step(x, y, lr, rng=dropout_rng, state=state if carry_state else None)
            state = state if carry_state else None      # random batches start from zeros: nothing to keep or save
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(_diverged(f"the training loss became {loss}", it, last_path, cfg.lr))
            it += 1
            dt = time.perf_counter() - t0
            if not first_step:              # the process's first step, which compiles Numba's kernels, is not timed
                train_time += dt
                train_tokens += tokens_per_step
            first_step = False
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            bar.update(1)
    result["iter"] = it
    return result


# What train() calls to refuse a run it cannot do, hold its --out folder, and save and resume it
# without losing what a user saved: none of it is needed to follow the loop.

def _run_settings(cfg, out_dir, *, resume, overwrite, log):
    """The settings this run trains with and, with ``resume``, the saved run it continues (else None):
    every refusal that needs no corpus, made before anything is read or built."""
    last_path = os.path.join(out_dir, "last.npz")
    if not isinstance(cfg, config.TrainConfig):
        config.validate(cfg)                            # which says what cfg must be
    saved = _load_last(out_dir) if resume else None
    schedule_kept = False                               # the saved run's schedule length kept (below)
    if saved is not None:
        saved_cfg = _train_config_of(saved, last_path)
        if (cfg.schedule == "cosine" and cfg.lr_decay_iters == 0 and saved_cfg.lr_decay_iters == 0
                and cfg.max_iters != saved_cfg.max_iters):
            # 0 made the schedule as long as the first run's --max-iters: a new --max-iters would
            # stretch or shrink it from here on, changing learning rates the run has planned with.
            # Done before the checks, which would otherwise take the new --max-iters for its length.
            cfg = dataclasses.replace(cfg, lr_decay_iters=saved_cfg.max_iters)
            schedule_kept = True
    try:
        cfg = config.validate(cfg)
    except ValueError as e:
        if saved is not None:       # a change --resume refuses anyway is the error, not what it makes of the
            _check_unchanged_on_resume(saved_cfg, cfg, last_path)       # saved settings (--model gpt: --n-head)
        if not schedule_kept or "'--lr-decay-iters'" not in str(e):    # another option's refusal: not the length's
            raise
        raise ValueError(f"{e}; that --lr-decay-iters is the saved run's schedule length, which --lr-decay-iters "
                         f"0 took from its --max-iters; give --lr-decay-iters to set another") from None
    if schedule_kept:
        log(f"the learning-rate schedule keeps its length of {cfg.lr_decay_iters} iterations (--lr-decay-iters 0 "
            f"took the saved run's --max-iters); give --lr-decay-iters to set another")
    if not resume and not overwrite:
        _refuse_a_held_run(out_dir)
    _require_dtype_runs_here(cfg.dtype, resumed=saved is not None and saved_cfg.dtype == cfg.dtype, out_dir=out_dir)
    if saved is not None:
        _check_unchanged_on_resume(saved_cfg, cfg, last_path)     # before anything is built
    return cfg, saved


# What a run's meta means, numbered from 2. Checkpoints saved before the number was kept have none;
# their age shows in the entries they lack ('slices', 'data_sha256', 'elapsed_s'), which is how --resume
# tells them apart. Raise it whenever an entry changes meaning, and give --resume a branch for the old one.
META_VERSION = 2

# what a checkpoint's meta must hold for --resume (the other entries are optional: older runs lack them)
RUN_META = ("model", "tokenizer", "train_config", "data", "iter", "best_val_loss", "batches", "dropout_rng",
            "last_eval_iter")


def _load_last(out_dir):
    """The saved run ``--resume`` continues: ``out_dir/last.npz``, or an error that says what else there is."""
    path = os.path.join(out_dir, "last.npz")
    try:
        saved = checkpoint.load(path)
    except (OSError, ValueError) as e:
        raise _with_best_hint(e, out_dir) from None
    _refuse_a_newer_run(saved.meta, path)       # first: the version says what the other entries mean
    try:
        checkpoint.require_meta(saved.meta, path, RUN_META)
    except ValueError as e:
        raise _with_best_hint(e, out_dir) from None
    return saved


def _with_best_hint(e, out_dir):
    """Error ``e`` about last.npz, with the hint of ``_resume_from_best`` where there is one."""
    hint = _resume_from_best(out_dir)
    return type(e)(f"{e}; {hint}") if hint else e


def _refuse_a_newer_run(meta, path):
    """Refuse a run saved by a newer minilm (a higher meta version), before any entry is read: a newer
    minilm may have renamed an entry or changed its kind, which would read as an edited file."""
    if not isinstance(meta, dict) or "meta_version" not in meta:
        return
    checkpoint.check_meta(meta, path, {"meta_version": checkpoint.POSITIVE_COUNT})
    if meta["meta_version"] > META_VERSION:
        raise ValueError(f"checkpoint.load: '{path}' was saved by a newer minilm (its meta version is "
                         f"{meta['meta_version']}; this one reads up to {META_VERSION}), whose entries may "
                         f"mean what this one cannot know; upgrade minilm to resume it")


def _resume_from_best(out_dir):
    """A hint: the run's best.npz is a whole resume point too, when it is readable."""
    best = os.path.join(out_dir, "best.npz")
    try:
        meta = checkpoint.load(best, required_meta=RUN_META).meta
        _refuse_a_newer_run(meta, best)             # a newer minilm's: --resume would refuse it as well
    except (OSError, ValueError):
        return ""
    return (f"{best} holds iteration {meta['iter']} of the run (validation loss {meta['best_val_loss']:.4f}): "
            f"copy it to last.npz to continue from there with --resume (metrics.jsonl's lines after it are "
            f"dropped then)")


def _train_config_of(saved, path):
    """The TrainConfig a saved run was trained with (every setting: a run resumes on all of them)."""
    c = checkpoint
    loss = (lambda v: c.NUMBER[0](v) and v >= 0, "a number >= 0 (inf: nothing evaluated yet)")   # a cross-entropy
    seconds = (lambda v: c.NUMBER[0](v) and 0 <= v < math.inf, "a finite number >= 0")
    c.check_meta(saved.meta, path, {"train_config": c.DICT, "iter": c.COUNT, "last_eval_iter": (c.COUNT, None),
                                    "best_val_loss": loss, "batches": c.DICT, "dropout_rng": c.DICT,
                                    "data": c.TEXT})
    later = {"slices": c.POSITIVE_COUNT, "threads": (c.POSITIVE_COUNT, None),      # older runs lack them
             "elapsed_s": seconds}
    c.check_meta(saved.meta, path, {name: kind for name, kind in later.items() if name in saved.meta})
    # every TrainConfig field dates from the first checkpoints: a field added later must be given its
    # old behaviour's value here for the checkpoints saved without it, rather than be called missing
    settings, names = saved.meta["train_config"], [f.name for f in dataclasses.fields(config.TrainConfig)]
    missing, unknown = [n for n in names if n not in settings], [n for n in settings if n not in names]
    if missing or unknown:
        raise ValueError(f"checkpoint.load: '{path}' meta entry 'train_config' must hold minilm train's settings; "
                         + "; ".join(f"{what}: {', '.join(map(repr, keys))}" for what, keys in
                                     (("missing", missing), ("unknown", unknown)) if keys))
    try:
        return config.validate(config.TrainConfig(**settings))
    except ValueError as e:
        raise ValueError(f"checkpoint.load: '{path}' meta entry 'train_config' holds a setting minilm train "
                         f"refuses ({e})") from None


def _refuse_a_held_run(out_dir):
    """A new run never replaces another run's files unasked."""
    held = [name for name in ("last.npz", "best.npz", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, name))]
    if not held:
        if os.path.lexists(os.path.join(out_dir, "loss.png")):         # a run draws it only beside its metrics
            raise ValueError(f"minilm train: option '--out' {os.fspath(out_dir)!r} holds a loss.png but no run, "
                             f"and a run draws its loss curve there; move that file, train into another --out, "
                             f"or pass --overwrite to replace it")
        return
    if "last.npz" in held:
        raise ValueError(f"minilm train: option '--out' {os.fspath(out_dir)!r} already holds a run "
                         f"({', '.join(held)}); continue it with --resume, train into another --out, "
                         f"or pass --overwrite to start afresh there")
    hint = _resume_from_best(out_dir)
    replaces = " (which replaces best.npz)" if "best.npz" in held else ""
    raise ValueError(f"minilm train: option '--out' {os.fspath(out_dir)!r} already holds a run "
                     f"({', '.join(held)}) with no last.npz to continue from; {hint + '; or ' if hint else ''}"
                     f"train into another --out, or pass --overwrite to start afresh there{replaces}")


def _require_dtype_runs_here(dtype, *, resumed, out_dir):
    """16-bit training runs on the cupy backend only (checked before the corpus is read)."""
    if dtype in ("float32", "float64") or backend.current() == "cupy":
        return
    if resumed:                                         # its --dtype cannot change: float32 is no way out
        raise ValueError(f"minilm train: --resume: the run in {os.fspath(out_dir)!r} trains in {dtype}, "
                         f"which only the cupy backend runs; continue it with --backend cupy on a GPU "
                         f"(minilm eval and minilm sample read its checkpoints on any backend)")
    raise ValueError(f"minilm train: option '--dtype' {dtype} needs the cupy backend; on a CPU use float32 or float64")


def _check_unchanged_on_resume(saved, cfg, path):
    """Refuse, naming the option, a resumed run's settings that its saved state cannot serve:
    another model, shape or dropout (the weights and the model saved are the old one's), dtype,
    optimizer (the moments are the saved one's), momentum switched on or off (its buffer),
    batching, or batch size, block size, evaluation batch count or seed: the evaluation batches
    are drawn from these four, and ``best.npz`` would then be picked on other batches than the
    best validation loss saved (contiguous batches also carry one state row per stream, and their
    position in the text counts blocks)."""
    fixed = ["optimizer", "batching", "dtype", "batch_size", "block_size", "eval_iters", "seed"]
    if cfg.optimizer in ("sgd", "rmsprop") and (saved.momentum == 0) != (cfg.momentum == 0):
        fixed.append("momentum")
    for name in fixed:
        before, now = getattr(saved, name), getattr(cfg, name)
        if before != now:
            _refuse_change(name, before, now, path)
    if (saved.model == "gpt") != (cfg.model == "gpt"):
        _refuse_change("model", saved.model, cfg.model, path)
    (_, before), (_, now) = model_settings(saved, 1), model_settings(cfg, 1)
    for name in before:                                 # the settings this kind of model is built from
        if before[name] != now[name]:
            option = "model" if name == "cell" else name
            _refuse_change(option, before[name], now[name], path)


def _refuse_change(name, before, now, path):
    raise ValueError(f"minilm train: --resume: option '--{name.replace('_', '-')}' cannot change when a run "
                     f"is resumed (the state saved in {path} is for {before!r}), got {now!r}; train a new "
                     f"run in another --out for that")


def check_out_dir(out_dir):
    """Refuse an ``--out`` that cannot be a folder: not a path, empty, or an existing file."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"minilm train: option '--out' must be a path, got {type(out_dir).__name__}")
    if not os.fspath(out_dir):
        raise ValueError("minilm train: option '--out' must name a folder, got ''")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        kind = "a file" if os.path.isfile(out_dir) else checkpoint.file_kind(out_dir)     # /dev/full: a device
        raise ValueError(f"minilm train: option '--out' {os.fspath(out_dir)!r} is {kind}, not a folder")


def saved_config(out_dir):
    """The TrainConfig of the run saved in ``out_dir/last.npz`` (what ``--resume`` starts from)."""
    check_out_dir(out_dir)
    return _train_config_of(_load_last(out_dir), os.path.join(out_dir, "last.npz"))


def _numba_threads():
    """Numba's thread count on the numba backend (which sets BLAS's too, and so the rounding), else None."""
    if backend.current() != "numba":
        return None
    import numba
    return numba.get_num_threads()


def _rounding_note(meta, runner, model, batch_size, slices, dropout=0.0):
    """The note a resumed run prints about its rounding, else None. The backend and the batch's
    slices set the rounding: the note says where it changes (another backend, a checkpoint that
    does not record its slices, one slice on another thread count) and where it stays the same only
    because the batches are cut into the saved run's ``slices``, not this machine's thread count.
    With ``dropout``, the GPU draws other masks than the CPU backends (``minilm.gpu.dropout``)."""
    here, threads = backend.current(), _numba_threads()
    if meta.get("backend", here) != here and dropout > 0 and "cupy" in (meta["backend"], here):
        return (f"the run was saved on the {meta['backend']} backend and goes on on {here}, which draws other "
                f"dropout masks from the same seeds: from here on it trains as a run on {here} would, not as "
                f"the run straight through on {meta['backend']}")
    if meta.get("backend", here) != here:
        return (f"the run was saved on the {meta['backend']} backend and goes on on {here}: its losses agree "
                f"with a run straight through to rounding only (on {meta['backend']} they stay exact)")
    if slices and slices > 1 and slices != min(threads, batch_size):        # else as a new run's here
        return (f"each batch is cut into {getattr(runner, 'threads', 1)} slices, as the saved run's were (Numba "
                f"has {threads} thread{'s' * (threads != 1)} here): the losses stay exact")
    if here == "numba" and "slices" not in meta:                             # saved before they were kept
        n = getattr(runner, "threads", 1)
        return (f"the checkpoint does not record how its batches were cut (saved by an older minilm): they are "
                f"cut into {n} slice{'s' * (n != 1)} here, and the losses agree with a run straight through "
                f"to rounding only, unless the saved run had as many")
    if runner is model and meta.get("threads", threads) != threads:          # one slice: BLAS's threads round
        n = meta["threads"]
        return (f"the run was saved with {n} Numba thread{'s' * (n != 1)} and goes on with {threads}: its "
                f"losses agree with a run straight through to rounding only (NUMBA_NUM_THREADS={n} keeps "
                f"them exact)")
    return None


def _elapsed_before(meta, kept_rows):
    """The seconds a resumed run spent in its earlier sessions. A run saved before the meta kept them
    has its last session's in its last metrics row (the rows did not sum the sessions then)."""
    if "elapsed_s" in meta:
        return meta["elapsed_s"]
    last = kept_rows[-1].get("elapsed_s") if kept_rows else None
    ok = isinstance(last, (int, float)) and not isinstance(last, bool) and math.isfinite(last) and last >= 0
    return float(last) if ok else 0.0


def _dropout_note(meta, cfg):
    """The note for a GPT with dropout saved before its text's checksum was kept: minilm may not have
    dropped its attention weights then (it began to in between), and does from here on."""
    if cfg.model == "gpt" and cfg.dropout > 0 and "data_sha256" not in meta:
        return (f"the run was saved by an older minilm, which may not have applied --dropout to the attention "
                f"weights; from here on it does (dropout {cfg.dropout:g}), so the run goes on as a newer run "
                f"would, not exactly as it would have gone on there")
    return None


# the two ways of scoring a contiguous recurrent run differ by a few percent; the same scoring on another
# backend or slice count by float32 rounding, about 1e-6 of the mean loss
SCORING_CHANGED = 1e-4


def _best_scored_now(best_path, saved, model, val_loss):
    """The best validation loss of a contiguous recurrent run that may have been saved before minilm
    carried the state through its evaluations, and a note (or None). Such a run scored its
    validation in windows from a zero state, which for a trained model comes out higher than
    ``val_loss()`` scores the same weights (an untrained one may come out lower), so the resumed
    run's first evaluation would count as an improvement and replace best.npz even with a worse
    model: best.npz is scored again the way the evaluations from here on are."""
    old = saved.meta["best_val_loss"]
    if not os.path.exists(best_path):               # nothing to lose, and nothing to score
        return old, None
    best = checkpoint.load(best_path)
    checkpoint.check_compatible(best.meta, {"model": saved.meta["model"]}, path=best_path)
    model.params.load(best.params)
    try:
        new = val_loss()
    finally:
        model.params.load(saved.params)
    if abs(new - old) <= SCORING_CHANGED * abs(old):
        return new, None
    return new, (f"the run was saved by an older minilm, which scored a contiguous run's validation in windows "
                 f"from a zero state; {best_path} is scored again with the state carried, as the evaluations "
                 f"from here on are: {old:.4f} -> {new:.4f} (metrics.jsonl's earlier rows keep the old scoring)")


def saved_backend(out_dir):
    """The backend the run saved in ``out_dir/last.npz`` trained on (None: not said, or unreadable:
    ``--resume`` then says what is wrong with the file)."""
    try:
        meta = checkpoint.load(os.path.join(out_dir, "last.npz")).meta
    except (OSError, ValueError):
        return None
    name = meta.get("backend") if isinstance(meta, dict) else None     # not a dictionary: --resume says so
    return name if name in backend.BACKENDS else None


def _split_checked(ids, cfg, data):
    """The 90/10 training and validation split of the corpus ``ids``, refused where a split is
    shorter than one block (or, for --batching contiguous, than one block per stream)."""
    if len(ids) < 2:                                    # split's own message would not name --data
        raise ValueError(f"minilm train: option '--data' {data!r} holds {len(ids)} character; each of its "
                         f"training and validation splits needs one block (--block-size {cfg.block_size} + 1)")
    train_ids, val_ids = split(ids, 0.9)
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < cfg.block_size + 1:
            raise ValueError(f"minilm train: the {name} split of --data {data!r} has {len(part)} characters, "
                             f"fewer than one block (--block-size {cfg.block_size} + 1)")
    if cfg.model != "gpt" and cfg.batching == "contiguous" and len(train_ids) < cfg.batch_size * cfg.block_size + 1:
        raise ValueError(f"minilm train: the training split of --data {data!r} has {len(train_ids)} characters; "
                         f"--batching contiguous cuts it into --batch-size {cfg.batch_size} streams of at least "
                         f"--block-size {cfg.block_size} + 1, which needs {cfg.batch_size * cfg.block_size + 1}; "
                         f"give a smaller --batch-size or --block-size")
    return train_ids, val_ids


def _check_memory(cfg, vocab_size, slices=1, saved_slices=False, resumed_from=None):
    """Refuse, before any file is written, a run this machine's memory cannot hold (on a CPU: a GPU's
    memory is its own, and CuPy says when it is full). ``slices``: the batch's slices run side by side,
    set by Numba's thread count unless ``saved_slices`` (a resumed run keeps its saved run's).
    ``resumed_from``: the last.npz of a resumed run, whose sizes --resume cannot change."""
    if backend.current() == "cupy":
        return
    need, have = memory_estimate(cfg, vocab_size, slices=slices), _physical_memory()
    if have is not None and need > have:
        sizes = ("--n-layer, --n-embd, --n-head, --block-size or --batch-size" if cfg.model == "gpt" else
                 "--n-layer, --n-embd, --hidden-size, --block-size or --batch-size")
        if _evaluation_bytes(cfg) > need / 2:                    # mostly the evaluation's batches
            sizes = f"--eval-iters (now {cfg.eval_iters}), or {sizes}"
        # a new run's slices are set by the thread count (a resumed run keeps its saved run's): the most that fit
        fits = None if saved_slices else next((k for k in range(slices - 1, 0, -1)
                                               if memory_estimate(cfg, vocab_size, slices=k) <= have), None)
        threads = (f"; or fewer Numba threads, each of which holds a gradient buffer of its own (minilm.parallel): "
                   f"NUMBA_NUM_THREADS={fits} (the batch is cut into {slices} slices now)" if fits else "")
        needs = f"this run needs about {need / 2**30:,.1f} GiB of memory and this machine has {have / 2**30:,.1f} GiB"
        if resumed_from is None:
            raise ValueError(f"minilm train: {needs}; give smaller sizes: {sizes}{threads}")
        raise ValueError(f"minilm train: --resume: {needs}; its sizes are those saved in {resumed_from}, which "
                         f"--resume cannot change: resume it on a machine with more memory{threads}, or train a "
                         f"new run in another --out with smaller sizes: {sizes}")


# (B, T, H) arrays a recurrent layer's cache holds: the tanh RNN h; the LSTM its 4 gates, c, tanh(c)
# and h; the GRU its 3 gates, h W_hn + b_hn and h
CACHED_PER_LAYER = {"rnn": 1, "lstm": 7, "gru": 5}


def memory_estimate(cfg, vocab_size, slices=1):
    """Roughly the bytes a training run of ``cfg`` on a CPU holds (float32 or float64): the parameters
    and a gradient buffer for each of the ``slices`` the numba backend runs a batch in side by side
    (``minilm.parallel``), the optimiser's buffers (Adam's two moments; SGD's and RMSprop's momentum
    buffer only with --momentum, RMSprop's mean square always) and one step's activations (a GPT
    keeps about 16 arrays of (B, T, C) a layer and its attention weights; a recurrent layer its
    cache, ``CACHED_PER_LAYER``), and the evaluation's fixed batches (``--eval-iters`` pairs of int64
    ids a split; a run on contiguous batches scores the text itself). It errs low (0.35-0.9 of the
    arrays a step allocates, measured over the presets and the tests' models; 0.26 at a block of
    2048 on the numpy backend, whose attention holds several (B, heads, T, T) arrays at once), so
    that a run it refuses could not have fit."""
    V, B, T, L, C, H = vocab_size, cfg.batch_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.hidden_size
    if cfg.model == "gpt":
        activations = B * T * (L * (16 * C + cfg.n_head * T) + 2 * V)
    else:
        activations = B * T * (C + L * CACHED_PER_LAYER[cfg.model] * H + 2 * V)
    buffers = {"adamw": 2, "adam": 2, "sgd": 0, "rmsprop": 1}[cfg.optimizer] + (
        cfg.optimizer in ("sgd", "rmsprop") and cfg.momentum > 0)
    n_params = param_count(*model_settings(cfg, vocab_size))
    itemsize = as_numpy_dtype("memory_estimate", "dtype", cfg.dtype).itemsize
    return ((1 + slices + buffers) * n_params + activations) * itemsize + _evaluation_bytes(cfg)


def _evaluation_bytes(cfg):
    """The evaluation's fixed batches: --eval-iters pairs (x, y) of int64 ids for each split (a run on
    contiguous batches scores slices of the text instead)."""
    if cfg.model != "gpt" and cfg.batching == "contiguous":
        return 0
    return 2 * cfg.eval_iters * 2 * cfg.batch_size * cfg.block_size * np.dtype(np.int64).itemsize


class _RunFolder:
    """The ``--out`` folder of a run, held by this process from ``hold()`` until the run ends.

    A second ``minilm train`` on a held folder is refused: two runs would replace each other's
    checkpoints and interleave their metrics. The hold is the system's advisory lock on the folder
    (``flock``), which ends with the process however it ends, so none is ever left behind. Windows
    has no ``flock``, and some filesystems (NFS, Lustre) lock no folder: there the folder is not
    held (on those, with a warning).
    """

    def __init__(self, path):
        self.path, self._fd, self._tried = path, None, False

    def hold(self):
        """Make the folder if it is missing (once the run's settings are checked, so that a refused
        run leaves none), check it can be written in, and hold it."""
        if self._tried:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"minilm train: option '--out' {os.fspath(self.path)!r} cannot be made a folder: "
                             f"{e.strerror or e}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):      # found now, not at the first evaluation's save
            raise ValueError(f"minilm train: option '--out' {os.fspath(self.path)!r} is a folder this user "
                             f"cannot write in")
        self._tried = True
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:                              # held by another process
            os.close(fd)
            raise ValueError(f"minilm train: option '--out' {os.fspath(self.path)!r} is in use by another "
                             f"minilm train that is still running; wait for it to end, or train into "
                             f"another --out") from None
        except OSError as e:                                 # NFS, Lustre, some FUSE mounts: no lock on a folder
            os.close(fd)
            warnings.warn(f"minilm train: option '--out' {os.fspath(self.path)!r} cannot be held on this "
                          f"filesystem ({e.strerror or e}): a second minilm train there would not be refused",
                          stacklevel=3)
            return
        self._fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)                               # which ends the hold
            self._fd = None


# atomic_write's temporary files, left by a process killed in a save
STALE = (".last.npz.", ".best.npz.", ".loss.png.", ".metrics.jsonl.")


def _remove_stale_temporaries(out_dir):
    """Remove the temporary files a run killed inside a save left in ``out_dir`` (the files it was
    replacing are intact)."""
    for name in os.listdir(out_dir):
        if name.startswith(STALE) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


MAX_METRICS_LINE = 1 << 16      # bytes; an evaluation's row in metrics.jsonl is some 200


def _keep_metrics_up_to(metrics_path, last_eval_iter):
    """Drop the lines of evaluations after ``last_eval_iter`` from metrics.jsonl (atomically).

    Each evaluation appends its line before it saves the checkpoints; a run that stopped between
    the two (killed, or its output closed) left a line that the saved run does not know of, and
    that the resumed run is about to write again. Returns the rows kept, in order."""
    if not os.path.exists(metrics_path):
        if os.path.islink(metrics_path):            # a link to nothing: the run's appends would go through it
            os.remove(metrics_path)
        return []
    if not stat.S_ISREG(os.stat(metrics_path).st_mode):         # a FIFO would hang, /dev/zero fill the memory
        raise ValueError(f"minilm train: --resume: {metrics_path} is {checkpoint.file_kind(metrics_path)}, not "
                         f"a file of metrics; remove it")
    kept, number, cut_off = [], 0, None
    with open(metrics_path, "rb") as f:         # each line checked as it is read: a bad file is not held first
        while raw := f.readline(MAX_METRICS_LINE + 1):       # a row is some 200 bytes
            if cut_off is not None:                 # a line after it: not a write cut off, but a damaged line
                raise cut_off
            number += 1
            if len(raw) > MAX_METRICS_LINE:
                raise ValueError(f"minilm train: --resume: line {number} of {metrics_path} is longer than "
                                 f"{MAX_METRICS_LINE:,} bytes, which no evaluation's row is; remove or repair that line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"minilm train: --resume: line {number} of {metrics_path} is not UTF-8 text (byte "
                                 f"0x{raw[e.start]:02x} at column {e.start + 1}); remove or repair that line") from None
            if not line.strip() or last_eval_iter is None:
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):    # RecursionError: nested too deep
                # the last line may be a write cut off (killed, or the disk full): after the save
                cut_off = ValueError(f"minilm train: --resume: line {number} of {metrics_path} is not a JSON object "
                                     f"({line.strip()[:40]!r}); remove or repair that line")
                continue
            if not _is_evaluation_row(row):         # another file's lines, or one edited: the plot reads them too
                raise ValueError(f"minilm train: --resume: line {number} of {metrics_path} is not an evaluation's "
                                 f"row (an object with an integer 'iter' and the numbers 'train_loss' and 'val_loss'; "
                                 f"got {line.strip()[:40]!r}); remove or repair that line")
            if row["iter"] <= last_eval_iter:
                kept.append((line, row))
    # rewritten through a temporary of its own (never one a link points elsewhere) when a line is dropped,
    # or when metrics.jsonl is itself a link, symbolic or hard (another run's file under a second name, as
    # `cp -al` makes): the run appends to it, and must not append to another file
    if len(kept) != number or os.path.islink(metrics_path) or os.stat(metrics_path).st_nlink > 1:
        checkpoint.atomic_write(metrics_path, lambda f: f.write("".join(line for line, _ in kept).encode("utf-8")))
    return [row for _, row in kept]


def _is_evaluation_row(row):
    count, number = checkpoint.COUNT[0], checkpoint.NUMBER[0]      # the checks of a checkpoint's meta entries
    return (isinstance(row, dict) and count(row.get("iter")) and number(row.get("train_loss"))
            and number(row.get("val_loss")))


class _StopRequest:
    """Turns the first Ctrl-C (SIGINT), or a SIGTERM (``kill``, a job scheduler, ``timeout``), into a
    request to stop at the end of the current iteration, which then saves. Signal handlers can only
    be set in the main thread; a run in another thread stops on them as Python does by default."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None                    # the signal's number, once one came

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:                       # a second one stops at once
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\nminilm train: {signal.Signals(signum).name}: stopping at the end of this iteration to save "
              f"last.npz; press Ctrl-C again to quit without saving", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _append_metrics(metrics_path, row, last_path, last_eval_iter):
    """Append one evaluation's ``row`` to metrics.jsonl, or say what is saved when it cannot. A line
    that a full disk cut short is taken back: the file stays whole lines, which loss.png reads."""
    existed = os.path.exists(metrics_path)
    size = os.path.getsize(metrics_path) if existed else 0
    try:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        with contextlib.suppress(OSError):              # closed by now: nothing of the line is written later
            if not existed:                             # made by this append: a retry finds no run's file here
                os.remove(metrics_path)
            elif os.path.getsize(metrics_path) > size:
                os.truncate(metrics_path, size)
        kept = ("nothing was saved yet" if last_eval_iter is None else
                f"{last_path} keeps iteration {last_eval_iter}")
        raise OSError(f"minilm train: could not append to {metrics_path}: {e.strerror or e}; {kept}") from None


def _save(path, model, optimizer, meta):
    try:
        checkpoint.save(path, params=backend.to_numpy(model.params.data), optimizer_state=optimizer.state_dict(),
                        meta=meta)
    except OSError as e:                    # a full disk, a file-size limit, a folder made read-only
        raise OSError(f"minilm train: could not save {path}: {e.strerror or e}; the checkpoint saved there "
                      f"before, if any, is intact") from None


_matplotlib_error = None        # why an installed matplotlib did not import: it is tried once a process

# A drawing of loss.png reads and draws every row of metrics.jsonl (55 ms, plus 3.5 us a row): drawn at
# every evaluation, a run's drawing time grew with the square of its evaluations. It is drawn when the
# rows have grown by 1/PLOT_GROWTH since the last drawing, or PLOT_EVERY_S seconds have passed, and when
# a session ends (at its last evaluation, interrupted, stopped early or by an error).
PLOT_GROWTH = 8
PLOT_EVERY_S = 60.0


def _plot(metrics_path, png_path):
    """A loss-curve PNG from metrics.jsonl, when matplotlib is installed, written atomically. A PNG
    that cannot be written is no reason to stop a run: that error is returned, not raised. So is
    a matplotlib that is installed but does not import (one built for another NumPy prints a
    screenful each time it is tried, so it is tried once)."""
    global _matplotlib_error
    if _matplotlib_error is not None:
        return _matplotlib_error
    try:
        # a Figure of its own, not pyplot's: the process's backend and open figures stay the user's
        import matplotlib.figure
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "matplotlib":
            return None                                 # not installed: no curve, and nothing to say
        _matplotlib_error = RuntimeError(f"matplotlib did not import ({type(e).__name__}: {e}); "
                                         f"pip install -U matplotlib, then start Python again")
        return _matplotlib_error
    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    fig = matplotlib.figure.Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    marker = "o" if len(rows) == 1 else None           # one evaluation so far: a line of one point draws nothing
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train", marker=marker)
    ax.plot([r["iter"] for r in rows], [r["val_loss"] for r in rows], label="validation", marker=marker)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per character)")
    ax.legend()
    fig.tight_layout()
    try:
        checkpoint.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    except OSError as e:
        return e
    return None


def _diverged(what, it, last_path, lr):
    """The message of a run stopped by a loss that is not finite: the weights have diverged, so
    nothing of this iteration is saved, and last.npz keeps the last evaluation's state."""
    kept = (f"{last_path} keeps iteration {checkpoint.load(last_path).meta['iter']}" if os.path.exists(last_path)
            else "nothing was saved")
    return f"minilm train: {what} at iteration {it}; {kept}; try a smaller --lr (now {lr})"
