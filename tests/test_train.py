"""End to end: `minilm train`, resume, Ctrl-C, `minilm eval`, `minilm sample`, and their bad input."""
import codecs
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minilm import checkpoint, cli, config, data, optim, train
from minilm.config import TrainConfig
from minilm.models import model_from_meta

# a tiny model and run, so each training takes a fraction of a second on the numpy backend
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--hidden-size", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-interval", "4", "--eval-iters", "2", "--warmup-iters", "2",
        "--lr-decay-iters", "12", "--backend", "numpy", "--no-progress"]


pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    text = " ".join(rng.choice(words, 1500)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _train(corpus, out, *extra):
    return cli.main(["train", "--data", corpus, "--out", str(out), *TINY, *extra])


@pytest.fixture
def trained(corpus, tmp_path, capsys):
    """The folder of a tiny run trained for 4 iterations on ``corpus`` (its output already read)."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4") == 0
    capsys.readouterr()
    return out


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _losses(rows):
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in rows}


def _evaluations(rows):
    """Every evaluation line in order, repeats included (a dict of them would hide a run that
    restarted from iteration 0 and wrote its lines again)."""
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in rows]


def test_train_writes_checkpoints_and_metrics(corpus, tmp_path):
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "12") == 0
    rows = _metrics(out)
    assert [r["iter"] for r in rows] == [0, 4, 8, 12]
    for r in rows:
        assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
    assert rows[0]["tokens_per_s"] is None and all(r["tokens_per_s"] > 0 for r in rows[1:])
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]          # it learned something
    best, last = checkpoint.load(out / "best.npz"), checkpoint.load(out / "last.npz")
    assert last.meta["iter"] == 12
    assert best.meta["best_val_loss"] == min(r["val_loss"] for r in rows)


def test_train_draws_the_loss_curves_when_matplotlib_is_installed(corpus, tmp_path):
    pytest.importorskip("matplotlib", reason="loss.png is drawn only where matplotlib is installed")
    from matplotlib import colors, image
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "12") == 0
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")   # the IHDR chunk
    assert (width, height) == (600, 400)                             # figsize (6, 4) at 100 dpi
    pixels = image.imread(out / "loss.png")[..., :3]
    for curve in ("C0", "C1"):                                       # train, then validation: both drawn
        rgb = np.array(colors.to_rgb(curve))
        assert np.sum(np.all(np.abs(pixels - rgb) < 0.05, axis=-1)) > 100, curve


def test_train_without_matplotlib_draws_nothing_and_still_trains(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # `import matplotlib` raises ImportError
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4") == 0
    assert not (out / "loss.png").exists()
    assert [r["iter"] for r in _metrics(out)] == [0, 4]


def test_an_overwritten_runs_curve_is_not_left_for_the_new_run(corpus, tmp_path, monkeypatch):
    """--overwrite removed the old metrics but kept the old loss.png, which a run without matplotlib
    (or one stopped before its first evaluation) never drew over: the folder showed the old curve."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4") == 0
    (out / "loss.png").write_bytes(b"the old run's curve")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _train(corpus, out, "--max-iters", "4", "--overwrite") == 0
    assert not (out / "loss.png").exists()
    (out / "loss.png").write_bytes(b"the old run's curve")
    (out / "metrics.jsonl").unlink()                            # its metrics deleted by hand: still a run
    assert _train(corpus, out, "--max-iters", "4", "--overwrite") == 0
    assert not (out / "loss.png").exists()


@pytest.mark.parametrize("error", ["AttributeError('_ARRAY_API not found')",        # a matplotlib for another NumPy
                                   "ImportError('numpy.core.multiarray failed to import')",
                                   "ModuleNotFoundError('no pyparsing', name='pyparsing')"])   # a dependency missing
def test_a_matplotlib_that_does_not_import_stops_nothing_and_is_said_once(corpus, tmp_path, monkeypatch, capsys,
                                                                           error):
    """An installed matplotlib that fails to import (matplotlib 3.6 under NumPy 2 prints a screenful
    each try) is tried once and said once; one that raised something other than ImportError had
    stopped the run at its first evaluation."""
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    tries = tmp_path / "tries"
    (fake / "__init__.py").write_text(f"open({str(tries)!r}, 'a').write('x')\nraise {error}\n")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setattr(train, "_matplotlib_error", None)          # this process's earlier tries forgotten
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "12") == 0
    assert [r["iter"] for r in _metrics(out)] == [0, 4, 8, 12] and not (out / "loss.png").exists()
    err = capsys.readouterr().err
    assert err.count(f"warning: could not write {out / 'loss.png'}: matplotlib did not import (") == 1, err
    assert "pip install -U matplotlib, then start Python again" in err          # the failure is kept a process
    assert tries.read_text() == "x"

@pytest.mark.parametrize("backend, model_options", [
    ("numpy", ["--model", "gpt", "--dropout", "0.1"]),            # dropout exercises the saved RNG state
    ("numpy", ["--model", "lstm", "--batching", "contiguous", "--n-layer", "2"]),   # carried hidden state
    ("numpy", ["--model", "gru", "--optimizer", "rmsprop", "--schedule", "step", "--lr-step-size", "5"]),
    # the default backend, where train splits each batch over the cores (minilm.parallel) and the
    # slices take their rows of the whole batch's dropout masks
    ("numba", ["--model", "gpt", "--dropout", "0.1"]),
    ("numba", ["--model", "lstm", "--batching", "contiguous", "--n-layer", "2", "--dropout", "0.1"]),
])
def test_resumed_run_computes_the_same_losses(corpus, tmp_path, backend, model_options):
    if backend == "numba":
        import numba
        if numba.get_num_threads() < 2:
            pytest.skip("splitting a batch over the cores needs 2 Numba threads")
    straight, split = tmp_path / "straight", tmp_path / "split"
    options = [*model_options, "--backend", backend]
    assert _train(corpus, straight, "--max-iters", "12", *options) == 0
    assert _train(corpus, split, "--max-iters", "6", *options) == 0
    assert cli.main(["train", "--data", corpus, "--out", str(split), "--resume", "--max-iters", "12",
                     "--backend", backend, "--no-progress"]) == 0
    a, b = _evaluations(_metrics(straight)), _evaluations(_metrics(split))
    assert [row[0] for row in b] == [0, 4, 6, 8, 12]             # 6 is where the first part stopped
    assert [row for row in b if row[0] != 6] == a                # bit for bit
    elapsed = [row["elapsed_s"] for row in _metrics(split)]
    assert elapsed == sorted(elapsed) and elapsed[3] > elapsed[2]     # the run's time, over both sessions


def test_resume_without_backend_continues_on_the_saved_runs_backend(corpus, tmp_path, monkeypatch, capsys):
    """`minilm train --out X --resume`, as the README shows it, goes on on the backend the run was
    saved on, which keeps its losses those of the run straight through."""
    monkeypatch.delenv("MINILM_BACKEND", raising=False)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(corpus, straight, "--max-iters", "12") == 0                 # TINY: --backend numpy
    assert _train(corpus, split, "--max-iters", "6") == 0
    capsys.readouterr()
    assert cli.main(["train", "--out", str(split), "--resume", "--max-iters", "12", "--no-progress"]) == 0
    assert "backend numpy" in capsys.readouterr().out
    assert [row for row in _evaluations(_metrics(split)) if row[0] != 6] == _evaluations(_metrics(straight))
    capsys.readouterr()
    assert cli.main(["train", "--out", str(split), "--resume", "--max-iters", "14", "--backend", "numba",
                     "--no-progress"]) == 0                                  # asked for: allowed, and said
    assert "saved on the numpy backend and goes on on numba" in capsys.readouterr().out


def test_a_run_resumed_with_another_thread_count_keeps_its_slices(corpus, tmp_path, monkeypatch, capsys):
    """The batch's slices set the rounding (minilm.parallel): a run resumed where Numba has fewer
    threads cuts its batches as the saved run did, and computes its losses bit for bit."""
    import numba
    if numba.get_num_threads() < 2:
        pytest.skip("a saved run of 2 slices needs 2 Numba threads")
    straight, split = tmp_path / "straight", tmp_path / "split"
    options = ["--dropout", "0.1", "--backend", "numba"]
    assert _train(corpus, straight, "--max-iters", "12", *options) == 0
    assert _train(corpus, split, "--max-iters", "6", *options) == 0
    slices = min(numba.get_num_threads(), 4)                   # TINY's batch of 4 rows: at most 4 slices
    assert checkpoint.load(split / "last.npz").meta["slices"] == slices
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)                  # a one-core machine now
    capsys.readouterr()
    assert cli.main(["train", "--out", str(split), "--resume", "--max-iters", "12", "--backend", "numba",
                     "--no-progress"]) == 0
    assert f"each batch is cut into {slices} slices, as the saved run's were (Numba has 1 thread here)" \
        in capsys.readouterr().out
    assert [row for row in _evaluations(_metrics(split)) if row[0] != 6] == _evaluations(_metrics(straight))


def test_a_run_of_one_thread_resumed_with_more_says_its_rounding_changes(corpus, tmp_path, monkeypatch, capsys):
    """A run of one slice rounds as its BLAS and Numba thread counts do; resumed with another count it
    cannot be exact, and says so."""
    import numba
    if numba.get_num_threads() < 2:
        pytest.skip("needs 2 Numba threads to resume with")
    out = tmp_path / "run"
    threads = numba.get_num_threads()
    with monkeypatch.context() as m:
        m.setattr(numba, "get_num_threads", lambda: 1)
        assert _train(corpus, out, "--max-iters", "4", "--backend", "numba") == 0
    assert checkpoint.load(out / "last.npz").meta["slices"] == 1
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "6", "--no-progress"]) == 0
    assert (f"saved with 1 Numba thread and goes on with {threads}: its losses agree with a run straight "
            f"through to rounding only") in capsys.readouterr().out

def test_resume_without_backend_of_a_checkpoint_whose_meta_is_not_a_dictionary(trained, capsys, monkeypatch):
    """`minilm train --resume` reads the saved run's backend before its settings: a last.npz whose
    meta is not a dictionary is still one line naming the file, not a traceback."""
    monkeypatch.delenv("MINILM_BACKEND", raising=False)
    path = trained / "last.npz"
    with np.load(path) as archive:
        entries = {name: archive[name] for name in archive.files}
    entries["meta"] = np.array("[1, 2]")
    checkpoint.atomic_write(path, lambda f: np.savez(f, **entries))
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"])
    assert f"'{path}' is truncated or is not a minilm checkpoint (its meta is a list, not a dictionary)" in err


def test_a_numba_run_saved_without_its_slice_count_says_its_rounding_may_change(trained, capsys, monkeypatch):
    """A checkpoint from before minilm recorded the slices does not say how its batches were cut;
    resumed on numba, the run says so instead of promising nothing silently."""
    import numba
    saved = checkpoint.load(trained / "last.npz")
    saved.meta.update(backend="numba")
    del saved.meta["slices"], saved.meta["threads"]
    checkpoint.save(trained / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numba",
                     "--no-progress"]) == 0
    n = min(numba.get_num_threads(), 4)                        # TINY's batch of 4 rows: at most 4 slices
    assert (f"does not record how its batches were cut (saved by an older minilm): they are cut into "
            f"{n} slice{'s' * (n != 1)} here") in capsys.readouterr().out


def _as_saved_by_an_older_minilm(path, *missing, **changed):
    """Rewrite the checkpoint at ``path`` as an older minilm saved it: without the meta entries it did
    not keep yet (``missing``), and with ``changed`` ones. Returns the meta as it was."""
    saved = checkpoint.load(path)
    before = dict(saved.meta)
    del saved.meta["meta_version"]
    for name in missing:
        del saved.meta[name]
    saved.meta.update(changed)
    checkpoint.save(path, params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    return before


def _as_saved_by_a_newer_minilm(out, *names, edit=lambda meta: None):
    """Rewrite the checkpoints ``names`` (default: last.npz and best.npz) in ``out`` as a minilm of the
    next meta version saved them, with ``edit`` applied to each meta."""
    for name in names or ("last.npz", "best.npz"):
        saved = checkpoint.load(out / name)
        saved.meta["meta_version"] = train.META_VERSION + 1
        edit(saved.meta)
        checkpoint.save(out / name, params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)


def test_a_checkpoint_records_what_its_meta_means(trained):
    """The entries of a run's meta at this meta version: an entry added or removed fails here, so that
    whoever changes them meets the version, and raises it where an entry's meaning changes."""
    meta = checkpoint.load(trained / "last.npz").meta
    assert meta["meta_version"] == train.META_VERSION == 2
    assert set(meta) == {"model", "train_config", "tokenizer", "iter", "best_val_loss", "batches", "dropout_rng",
                         "early_stopping", "backend", "slices", "threads", "loss_scaler", "dtype", "last_eval_iter",
                         "data", "data_sha256", "rnn_state", "elapsed_s", "meta_version"}


def test_a_run_saved_by_a_newer_minilm_is_not_resumed(trained, capsys):
    """A meta version above this minilm's may hold entries that mean what it cannot know."""
    path = trained / "last.npz"
    assert checkpoint.load(path).meta["meta_version"] == train.META_VERSION
    _as_saved_by_a_newer_minilm(trained, "last.npz")
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"])
    assert (f"'{path}' was saved by a newer minilm (its meta version is {train.META_VERSION + 1}; this one reads "
            f"up to {train.META_VERSION})") in err and "upgrade minilm" in err


@pytest.mark.parametrize("edit", [lambda meta: meta.pop("batches"),                              # renamed there
                                  lambda meta: meta.update(elapsed_s={"train": 1.0, "eval": 0.5})],  # another kind
                         ids=["an entry renamed", "an entry of another kind"])
def test_a_newer_run_whose_entries_changed_is_named_newer_before_its_entries_are_read(trained, capsys, edit):
    """The meta version says what the other entries mean, so it is read first: a run of a newer
    minilm that renamed an entry or changed its kind is not called edited, but newer."""
    _as_saved_by_a_newer_minilm(trained, edit=edit)
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"])
    assert f"'{trained / 'last.npz'}' was saved by a newer minilm" in err and "upgrade minilm" in err, err


@pytest.mark.parametrize("scored_in_windows", [True, False])
def test_a_contiguous_run_saved_before_its_state_was_carried_through_evaluations_keeps_its_best(
        corpus, tmp_path, capsys, scored_in_windows):
    """An older minilm scored a contiguous recurrent run in windows from a zero state, higher than
    the same weights score now, and its checkpoints do not say so (they lack 'slices'). Resumed,
    the run scores best.npz again, so that a worse model does not replace it; a run whose saved
    best is already scored as now has nothing to note."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", "--model", "lstm", "--batching", "contiguous") == 0
    best = checkpoint.load(out / "best.npz").meta["best_val_loss"]
    windowed = 1e4 if scored_in_windows else best        # above any loss the diverging steps below reach
    _as_saved_by_an_older_minilm(out / "last.npz", "slices", "threads", best_val_loss=windowed)
    capsys.readouterr()
    # a learning rate that makes every later model worse than the saved best
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8", "--lr", "100", "--no-progress"]) == 0
    out_text = capsys.readouterr().out
    later = [row["val_loss"] for row in _metrics(out) if row["iter"] > 4]
    assert later and min(later) > best
    assert checkpoint.load(out / "best.npz").meta["iter"] == 4                      # not replaced
    assert checkpoint.load(out / "last.npz").meta["best_val_loss"] == best
    note = f"is scored again with the state carried, as the evaluations from here on are: {windowed:.4f} -> {best:.4f}"
    assert (note in out_text) == scored_in_windows and ("scored again" in out_text) == scored_in_windows


def test_a_run_saved_with_a_relative_path_and_no_checksum_asks_for_its_text(trained, corpus, tmp_path, capsys,
                                                                         monkeypatch):
    """An older minilm saved --data as typed and no SHA-256 of the text: from another folder the name
    is another file, so eval and --resume ask for the file rather than follow it; given, it is
    checked by the run's vocabulary."""
    path = trained / "last.npz"
    _as_saved_by_an_older_minilm(path, "data_sha256", data="corpus.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "corpus.txt").write_text("other words in another file\n", encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    for argv in (["eval", "--checkpoint", str(path)],
                 ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"]):
        err = _error(capsys, argv)
        assert (f"{path} was saved by an older minilm, with the relative path 'corpus.txt' and no checksum of its "
                f"text, so that name may be another file from here; pass the file it was trained on with --data "
                f"PATH") in err
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress",
                          "--data", "corpus.txt"])
    assert ("option '--data' 'corpus.txt' is not the text the run saved in" in err
            and "its characters are not the run's vocabulary" in err)
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress",
                     "--data", corpus]) == 0


def test_a_run_saved_with_no_checksum_is_checked_by_its_vocabulary(trained, tmp_path, capsys):
    """The file an older run names (absolute, no SHA-256) now holds another text: its characters
    give it away."""
    other = tmp_path / "other.txt"
    other.write_text("quite another text, with its own characters\n", encoding="utf-8")
    path = trained / "last.npz"
    _as_saved_by_an_older_minilm(path, "data_sha256", data=str(other))
    for argv in (["eval", "--checkpoint", str(path)],
                 ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"]):
        err = _error(capsys, argv)
        assert (f"the text this run was trained on, {str(other)!r}, has changed since it was saved in {path}: its "
                f"characters are not the run's vocabulary") in err


@pytest.mark.parametrize("checksum", ["none", "of the text with the mark"])
def test_a_run_that_read_a_byte_order_mark_as_a_character_resumes_on_its_own_file(corpus, tmp_path, capsys, checksum):
    """An older minilm read a UTF-8 file's byte-order mark as the text's first character (its
    vocabulary holds U+FEFF), and saved no checksum of its text or, for a while, the checksum of the
    text with the mark: the very file it was trained on is its text, read as it read it, and the run
    resumed from it computes the losses of the run straight through."""
    text = open(corpus, encoding="utf-8").read()
    as_read_then = tmp_path / "as_read_then.txt"          # read now, it gives the text an older minilm read
    as_read_then.write_bytes(codecs.BOM_UTF8 + ("\ufeff" + text).encode("utf-8"))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert _train(str(as_read_then), straight, "--max-iters", "8") == 0
    assert _train(str(as_read_then), out, "--max-iters", "4") == 0
    meta = checkpoint.load(out / "last.npz").meta
    assert "\ufeff" in meta["tokenizer"]["chars"] and meta["data_sha256"] == data.text_digest("\ufeff" + text)
    _as_saved_by_an_older_minilm(out / "last.npz", *(["data_sha256"] if checksum == "none" else []), data=str(bom))
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "last.npz")]) == 0
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8", "--no-progress"]) == 0
    assert _losses(_metrics(out)) == _losses(_metrics(straight))


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_a_gpt_with_dropout_saved_by_an_older_minilm_says_its_attention_weights_are_dropped_now(
        corpus, tmp_path, capsys, dropout):
    """An older minilm applied --dropout to the embeddings and residual branches only; resumed, the
    run drops the attention weights too, and says so."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", "--dropout", str(dropout)) == 0
    _as_saved_by_an_older_minilm(out / "last.npz", "data_sha256")
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8", "--no-progress",
                     "--data", corpus]) == 0
    said = "may not have applied --dropout to the attention weights; from here on it does (dropout 0.1)"
    assert (said in capsys.readouterr().out) == (dropout > 0)


def test_a_run_saved_before_its_elapsed_time_was_kept_goes_on_from_its_last_metrics_row(trained, capsys):
    """metrics.jsonl's elapsed_s goes on from the saved run's last row, not from 0."""
    _as_saved_by_an_older_minilm(trained / "last.npz", "elapsed_s")
    rows = _metrics(trained)
    rows[-1]["elapsed_s"] = 1000.0                  # a run that trained for longer than this test does
    (trained / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"]) == 0
    assert _metrics(trained)[-1]["elapsed_s"] > 1000.0


def test_a_resumed_run_of_a_batch_smaller_than_the_thread_count_notes_nothing(corpus, tmp_path, monkeypatch,
                                                                               capsys):
    """A batch of 2 rows is cut into 2 slices wherever Numba has 2 threads or more: resumed where
    nothing changed, the run has nothing to note."""
    import numba
    monkeypatch.setattr(numba, "get_num_threads", lambda: 4)                  # a 4-core machine
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", "--backend", "numba", "--batch-size", "2") == 0
    assert checkpoint.load(out / "last.npz").meta["slices"] == 2
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8", "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_run_resumed_where_its_backend_cannot_start_says_why(trained, capsys, monkeypatch):
    """A run saved on cupy, resumed on a machine where cupy cannot start, goes on on the default
    backend; the note says why, rather than advising the --backend that cannot run here."""
    monkeypatch.delenv("MINILM_BACKEND", raising=False)
    saved = checkpoint.load(trained / "last.npz")
    saved.meta.update(backend="cupy", threads=None)
    checkpoint.save(trained / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    from minilm import backend
    real_load = backend._load

    def load(name):
        if name == "cupy":
            raise RuntimeError("backend 'cupy' needs an NVIDIA GPU, but none was found")
        return real_load(name)
    monkeypatch.setattr(backend, "_load", load)
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "saved on the cupy backend, which cannot start here (backend 'cupy' needs an NVIDIA GPU" in out
    assert "--backend cupy keeps them exact" not in out


@pytest.mark.parametrize("dropout", ["0", "0.1"])
def test_a_run_with_dropout_resumed_off_the_gpu_says_its_masks_change(corpus, tmp_path, capsys, dropout):
    """The GPU draws its dropout masks with another generator than the CPU backends, from the same
    seeds: a run with dropout saved on cupy goes on on a CPU backend as a run there would, not to
    rounding as the run straight through; without dropout only the rounding changes."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", "--dropout", dropout) == 0
    saved = checkpoint.load(out / "last.npz")
    saved.meta.update(backend="cupy", threads=None)                     # as a GPU run saves it
    checkpoint.save(out / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "6", "--backend", "numpy",
                     "--no-progress"]) == 0
    said = capsys.readouterr().out
    masks = ("saved on the cupy backend and goes on on numpy, which draws other dropout masks from the same "
             "seeds: from here on it trains as a run on numpy would, not as the run straight through on cupy")
    assert (masks in said) == (dropout != "0"), said
    assert ("its losses agree with a run straight through to rounding only" in said) == (dropout == "0"), said


def test_train_backend_help_says_resume_takes_the_saved_runs_backend():
    import argparse
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    backend_option = next(a for a in sub.choices["train"]._actions if a.dest == "backend")
    assert "with --resume: the saved run's" in backend_option.help


def test_resume_keeps_the_schedule_length_that_lr_decay_iters_0_gave(corpus, tmp_path, capsys):
    """With --lr-decay-iters 0 the schedule is as long as --max-iters; a resumed run that raises
    --max-iters keeps the first run's length, so no learning rate it planned with changes."""
    planned, resumed = tmp_path / "planned", tmp_path / "resumed"
    assert _train(corpus, planned, "--max-iters", "12", "--lr-decay-iters", "8") == 0
    assert _train(corpus, resumed, "--max-iters", "8", "--lr-decay-iters", "0") == 0
    capsys.readouterr()
    assert cli.main(["train", "--data", corpus, "--out", str(resumed), "--resume", "--max-iters", "12",
                     "--backend", "numpy", "--no-progress"]) == 0
    assert ("the learning-rate schedule keeps its length of 8 iterations (--lr-decay-iters 0 took the saved "
            "run's --max-iters); give --lr-decay-iters to set another") in capsys.readouterr().out
    assert [(r["iter"], r["lr"]) for r in _metrics(resumed)] == [(r["iter"], r["lr"]) for r in _metrics(planned)]
    assert _evaluations(_metrics(resumed)) == _evaluations(_metrics(planned))
    assert checkpoint.load(resumed / "last.npz").meta["train_config"]["lr_decay_iters"] == 8


def test_a_resume_refused_for_a_kept_schedule_length_says_where_that_length_came_from(corpus, tmp_path, capsys):
    """The refusal named an --lr-decay-iters the user never gave (the first run's --max-iters)."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8", "--lr-decay-iters", "0", "--warmup-iters", "2") == 0
    capsys.readouterr()
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), "--resume", "--max-iters", "12",
                          "--warmup-iters", "10", "--backend", "numpy", "--no-progress"])
    assert "'--lr-decay-iters' (8) must exceed '--warmup-iters' (10)" in err
    assert "that --lr-decay-iters is the saved run's schedule length, which --lr-decay-iters 0 took from its " \
           "--max-iters; give --lr-decay-iters to set another" in err


def test_a_resume_refused_for_another_option_does_not_blame_the_kept_schedule_length(corpus, tmp_path, capsys):
    """The note on a kept schedule length was added to every refusal of config.validate, such as a
    --min-lr above --lr, on a resume of a --lr-decay-iters 0 run that changes --max-iters."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8", "--lr-decay-iters", "0", "--warmup-iters", "2") == 0
    capsys.readouterr()
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), "--resume", "--max-iters", "12",
                          "--warmup-iters", "2", "--min-lr", "0.5", "--backend", "numpy", "--no-progress"])
    assert "option '--min-lr' (0.5) must not exceed '--lr'" in err
    assert "schedule length" not in err


def _signal_in_step(monkeypatch, signum, step):
    """Send ``signum`` to this process in the middle of training step ``step`` (inside its clipping)."""
    real_clip, calls = train.optim.clip_grad_norm, []

    def clip_then_signal(params, max_norm):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)        # os.kill would end the process on Windows
        return real_clip(params, max_norm)
    monkeypatch.setattr(train.optim, "clip_grad_norm", clip_then_signal)


def test_ctrl_c_saves_and_resume_continues_exactly(corpus, tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _train(corpus, straight, "--max-iters", "12") == 0

    real_clip = train.optim.clip_grad_norm
    _signal_in_step(monkeypatch, signal.SIGINT, 7)                       # Ctrl-C in the middle of step 7
    assert _train(corpus, interrupted, "--max-iters", "12") == 130
    assert checkpoint.load(interrupted / "last.npz").meta["iter"] == 7   # step 7 finished, then saved
    monkeypatch.setattr(train.optim, "clip_grad_norm", real_clip)
    assert cli.main(["train", "--data", corpus, "--out", str(interrupted), "--resume",
                     "--backend", "numpy", "--no-progress"]) == 0
    assert [row[0] for row in _evaluations(_metrics(interrupted))] == [0, 4, 8, 12]
    assert _evaluations(_metrics(straight)) == _evaluations(_metrics(interrupted))


@pytest.mark.parametrize("name", [".best.npz.k1ll3d.tmp", ".metrics.jsonl.k1ll3d.tmp"])
def test_a_killed_saves_temporary_file_is_removed_by_the_next_run(corpus, trained, name):
    stale = trained / name                                     # what a process killed inside a save leaves
    stale.write_bytes(b"half a checkpoint")
    kept = trained / "notes.tmp"                               # not ours: left alone
    kept.write_text("mine")
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy",
                     "--no-progress"]) == 0
    assert not stale.exists() and kept.read_text() == "mine"


def test_an_out_folder_that_cannot_be_written_is_named_before_training(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "locked"
    real_access = os.access
    monkeypatch.setattr(train.os, "access", lambda p, mode: False if os.fspath(p) == str(out) else real_access(p, mode))
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY])
    assert f"option '--out' {str(out)!r} is a folder this user cannot write in" in err
    assert os.listdir(out) == []


def test_a_failed_save_names_the_file_and_keeps_the_previous_checkpoint(corpus, trained, monkeypatch, capsys):
    before = (trained / "last.npz").read_bytes()

    def full_disk(path, **kwargs):
        raise OSError(27, "File too large")
    monkeypatch.setattr(train.checkpoint, "save", full_disk)
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy",
                          "--no-progress"])
    assert f"could not save {trained / 'best.npz'}: File too large; the checkpoint saved there before, if any, is intact" in err \
        or f"could not save {trained / 'last.npz'}: File too large" in err
    assert (trained / "last.npz").read_bytes() == before


def test_the_first_ctrl_c_says_what_happens_next(corpus, tmp_path, monkeypatch, capsys):
    _signal_in_step(monkeypatch, signal.SIGINT, 2)
    assert _train(corpus, tmp_path / "run", "--max-iters", "12") == 130
    assert ("SIGINT: stopping at the end of this iteration to save last.npz; press Ctrl-C again to quit without "
            "saving") in capsys.readouterr().err


def test_a_second_ctrl_c_quits_at_once_without_saving(corpus, tmp_path, monkeypatch, capsys):
    real_clip, calls = train.optim.clip_grad_norm, []

    def clip_then_two_signals(params, max_norm):
        calls.append(1)
        if len(calls) == 7:                                   # two Ctrl-C in the middle of step 7
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real_clip(params, max_norm)
    monkeypatch.setattr(train.optim, "clip_grad_norm", clip_then_two_signals)
    before = signal.getsignal(signal.SIGINT)
    assert _train(corpus, tmp_path / "run", "--max-iters", "12") == 130
    assert len(calls) == 7                                     # no step after the second
    assert checkpoint.load(tmp_path / "run" / "last.npz").meta["iter"] == 4   # the evaluation's save, not step 7's
    assert signal.getsignal(signal.SIGINT) == before
    assert "minilm train: interrupted; what it trained since its last checkpoint was not saved" in capsys.readouterr().err


def test_sigterm_saves_like_ctrl_c(corpus, tmp_path, monkeypatch):
    """``kill``, a job scheduler's or ``timeout``'s SIGTERM saves the run too, then exits with 143."""
    _signal_in_step(monkeypatch, signal.SIGTERM, 6)
    before = signal.getsignal(signal.SIGTERM)
    assert _train(corpus, tmp_path / "run", "--max-iters", "12") == 128 + signal.SIGTERM
    assert checkpoint.load(tmp_path / "run" / "last.npz").meta["iter"] == 6
    assert signal.getsignal(signal.SIGTERM) == before                       # the handler is given back


def test_training_in_another_thread_runs_without_signal_handlers(corpus, tmp_path):
    import threading
    results = []
    worker = threading.Thread(target=lambda: results.append(_train(corpus, tmp_path / "run", "--max-iters", "4")))
    worker.start()
    worker.join()
    assert results == [0] and checkpoint.load(tmp_path / "run" / "last.npz").meta["iter"] == 4


def test_resume_without_data_reads_the_saved_runs_text(corpus, tmp_path, monkeypatch):
    """The run remembers its text by absolute path: resumed from another folder without --data,
    it trains on the same text and computes the same losses."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(corpus, straight, "--max-iters", "12") == 0
    monkeypatch.chdir(os.path.dirname(corpus))
    assert _train(os.path.basename(corpus), split, "--max-iters", "6") == 0      # a relative --data
    assert checkpoint.load(split / "last.npz").meta["data"] == corpus
    monkeypatch.chdir(tmp_path / "split")
    assert cli.main(["train", "--out", str(split), "--resume", "--max-iters", "12", "--backend", "numpy",
                     "--no-progress"]) == 0
    a, b = _evaluations(_metrics(straight)), _evaluations(_metrics(split))
    assert [row[0] for row in b] == [0, 4, 6, 8, 12] and [row for row in b if row[0] != 6] == a


def test_a_fresh_run_never_replaces_a_saved_one(corpus, trained, tmp_path, capsys):
    out = trained
    saved = {name: (out / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "8"])
    assert "already holds a run (last.npz, best.npz, metrics.jsonl)" in err and "--resume" in err and "--overwrite" in err
    assert {name: (out / name).read_bytes() for name in saved} == saved          # nothing touched
    assert _train(corpus, out, "--max-iters", "8", "--overwrite") == 0           # asked for: starts afresh
    assert checkpoint.load(out / "last.npz").meta["iter"] == 8
    assert [r["iter"] for r in _metrics(out)] == [0, 4, 8]
    with pytest.raises(SystemExit) as e:
        _train(corpus, out, "--resume", "--overwrite")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_metrics_file_alone_is_a_run_too(corpus, trained, tmp_path, capsys):
    out = tmp_path / "metrics-only"
    out.mkdir()
    (out / "metrics.jsonl").write_bytes((trained / "metrics.jsonl").read_bytes())
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "4"])
    assert "already holds a run (metrics.jsonl)" in err
    assert (out / "metrics.jsonl").read_bytes() == (trained / "metrics.jsonl").read_bytes()   # kept


def test_a_loss_png_alone_is_not_drawn_over_unasked(corpus, tmp_path, capsys):
    """A folder with a loss.png and no run holds a file the user made or kept: a fresh run drew its own
    curve over it at the first evaluation."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "loss.png").write_bytes(b"the user's own picture")
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "4"])
    assert f"option '--out' {str(out)!r} holds a loss.png but no run" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["loss.png"] and (out / "loss.png").read_bytes() == b"the user's own picture"
    assert _train(corpus, out, "--max-iters", "4", "--overwrite") == 0              # asked for: replaced
    assert not (out / "loss.png").exists() or (out / "loss.png").read_bytes() != b"the user's own picture"


def test_out_that_is_a_file(corpus, tmp_path, capsys):
    err = _error(capsys, ["train", "--data", corpus, "--out", corpus, *TINY])
    assert f"option '--out' {corpus!r} is a file, not a folder" in err
    err = _error(capsys, ["train", "--data", corpus, "--out", corpus, "--resume", *TINY])
    assert f"option '--out' {corpus!r} is a file, not a folder" in err        # not "no last.npz in it"
    if os.path.exists("/dev/null") and not os.path.isfile("/dev/null"):
        err = _error(capsys, ["train", "--data", corpus, "--out", "/dev/null", *TINY])
        assert "option '--out' '/dev/null' is a character device, not a folder" in err     # not "a file"
    inside = os.path.join(corpus, "run")
    err = _error(capsys, ["train", "--data", corpus, "--out", inside, *TINY])
    assert f"option '--out' {inside!r} cannot be made a folder: Not a directory" in err
    err = _error(capsys, ["train", "--data", corpus, "--out", "", *TINY])
    assert "option '--out' must name a folder, got ''" in err


def test_a_run_stopped_between_its_metrics_and_its_checkpoint_resumes_without_a_repeated_line(
        corpus, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert _train(corpus, straight, "--max-iters", "12") == 0
    real_save = train._save

    def save_fails_at_8(path, model, optimizer, meta):        # as a full disk, or a kill, after the line
        if meta["iter"] == 8:
            raise OSError("No space left on device")
        real_save(path, model, optimizer, meta)
    monkeypatch.setattr(train, "_save", save_fails_at_8)
    stopped = tmp_path / "stopped"
    assert "No space left on device" in _error(capsys, ["train", "--data", corpus, "--out", str(stopped), *TINY,
                                                        "--max-iters", "12"])
    assert [r["iter"] for r in _metrics(stopped)] == [0, 4, 8]         # the line of 8 is written, 8 is not saved
    assert checkpoint.load(stopped / "last.npz").meta["iter"] == 4
    monkeypatch.setattr(train, "_save", real_save)
    assert _train(corpus, stopped, "--resume", "--max-iters", "12") == 0
    assert [r["iter"] for r in _metrics(stopped)] == [0, 4, 8, 12]     # 8 once, from the resumed run
    assert _losses(_metrics(stopped)) == _losses(_metrics(straight))


def test_the_banner_names_the_recurrent_cell(corpus, tmp_path, capsys):
    assert _train(corpus, tmp_path / "gru", "--model", "gru", "--max-iters", "1") == 0
    assert "gru model, " in capsys.readouterr().out


@pytest.mark.parametrize("command", ["eval", "sample", "resume"])
def test_a_checkpoint_whose_meta_lacks_an_entry(corpus, trained, tmp_path, command, capsys):
    saved = checkpoint.load(trained / "last.npz")
    meta = {key: value for key, value in saved.meta.items() if key != "tokenizer"}
    out = tmp_path / "edited"
    out.mkdir()
    checkpoint.save(out / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=meta)
    argv = (["train", "--data", corpus, "--out", str(out), "--resume", "--backend", "numpy", "--no-progress"]
            if command == "resume" else [command, "--checkpoint", str(out / "last.npz"), "--backend", "numpy"])
    err = _error(capsys, argv)
    assert "has no meta entries tokenizer, which this reads; the checkpoints minilm train writes have them" in err


@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize("command", ["eval", "sample", "resume"])
def test_weights_that_are_not_finite_are_refused_by_name(trained, command, value, capsys):
    """A NaN or infinite weight would make every loss NaN: eval used to print 'loss nan' and exit 0."""
    path = trained / "last.npz"
    saved = checkpoint.load(path)
    params = saved.params.copy()
    params[-1] = value                                          # the last parameter's last entry
    checkpoint.save(path, params=params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    argv = (["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy", "--no-progress"]
            if command == "resume" else [command, "--checkpoint", str(path), "--backend", "numpy"])
    kept = path.read_bytes()
    err = _error(capsys, argv)
    last = list(model_from_meta(saved.meta["model"]).params)[-1]
    assert f"'{path}'" in err and f"its parameter '{last}' holds 1 value that is not finite (first {value})" in err
    assert path.read_bytes() == kept


@pytest.mark.filterwarnings("error::RuntimeWarning")      # NumPy's overflow in the cast came before the refusal
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_saved_weight_too_large_for_the_models_dtype_is_refused(trained, command, capsys):
    """A float64 file's 1e39 loads into a float32 model as inf: the loaded weights, not the saved
    ones, are what the model computes with (eval printed 'loss nan' and exited 0)."""
    path = trained / "last.npz"
    saved = checkpoint.load(path)
    params = saved.params.astype(np.float64)
    params[-1] = 1e39                                           # finite in float64, past float32's largest
    checkpoint.save(path, params=params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    argv = (["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy", "--no-progress"]
            if command == "resume" else [command, "--checkpoint", str(path), "--backend", "numpy"])
    err = _error(capsys, argv)
    last = list(model_from_meta(saved.meta["model"]).params)[-1]
    assert f"'{path}'" in err and f"its parameter '{last}' holds 1 value that is not finite (first inf, saved as " \
                                  f"1e+39, which float32 cannot hold)" in err


def test_a_checkpoint_whose_tokenizer_does_not_fit_its_model(trained, tmp_path, capsys):
    saved = checkpoint.load(trained / "last.npz")
    saved.meta["tokenizer"]["chars"] = saved.meta["tokenizer"]["chars"][:-2]       # edited by hand
    checkpoint.save(tmp_path / "edited.npz", params=saved.params, optimizer_state=None, meta=saved.meta)
    err = _error(capsys, ["sample", "--checkpoint", str(tmp_path / "edited.npz"), "--backend", "numpy"])
    assert "edited.npz' holds a tokenizer of" in err and "they were not saved together" in err


def test_resume_refuses_other_text(corpus, trained, tmp_path, capsys):
    out = trained
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(open(corpus, encoding="utf-8").read().split())) + "\n", encoding="utf-8")
    err = _error(capsys, ["train", "--data", str(other), "--out", str(out), "--resume", "--max-iters", "8",
                          "--backend", "numpy", "--no-progress"])
    assert "option '--data'" in err and "other text" in err and repr(corpus) in err
    assert checkpoint.load(out / "last.npz").meta["iter"] == 4     # the saved run is untouched


def test_a_cut_off_last_metrics_line_does_not_block_resume(corpus, trained, capsys):
    metrics = trained / "metrics.jsonl"
    whole = metrics.read_text(encoding="utf-8")
    metrics.write_text(whole + '{"iter": 8, "train_lo', encoding="utf-8")       # a write cut off
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8",
                     "--backend", "numpy", "--no-progress"]) == 0
    assert [r["iter"] for r in _metrics(trained)] == [0, 4, 8]
    metrics.write_text("not json\n" + metrics.read_text(encoding="utf-8"), encoding="utf-8")   # not a cut-off write
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "12", "--backend", "numpy",
                          "--no-progress"])
    assert f"--resume: line 1 of {metrics} is not a JSON object ('not json'); remove or repair that line" in err



@pytest.mark.parametrize("line", ['{}', '[1, 2]', '{"iter": "x"}', '5', '{"iter": 0}', '{"iter": true, '
                                  '"train_loss": 1.0, "val_loss": 1.0}'])
def test_resume_names_a_metrics_line_that_is_not_an_evaluation(trained, capsys, line):
    """JSON that is not an evaluation's row (another file's lines, or one edited) had given a
    KeyError traceback, an error naming nothing, or ({"iter": 0}) a traceback from the plot after
    the checkpoints were saved."""
    metrics = trained / "metrics.jsonl"
    metrics.write_text(line + "\n" + metrics.read_text(encoding="utf-8"), encoding="utf-8")
    saved = {name: (trained / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy",
                          "--no-progress"])
    assert f"--resume: line 1 of {metrics} is not an evaluation's row" in err and "remove or repair that line" in err
    assert {name: (trained / name).read_bytes() for name in saved} == saved


@pytest.mark.parametrize("entry, value", [("loss_scaler", {"scale": 1.0}), ("dropout_rng", {"bit_generator": "PCG64"}),
                                          ("dropout_rng", {"state": []}), ("data", None), ("elapsed_s", "x"),
                                          ("best_val_loss", float("nan"))])
def test_resume_names_the_file_of_a_hand_edited_run_state(trained, capsys, entry, value):
    """Entries that the meta's checks left to the objects reading them had given KeyError tracebacks
    or errors naming neither the file nor the entry; a NaN best loss was taken, and best.npz then
    never written again."""
    path = trained / "last.npz"
    ckpt = checkpoint.load(path)
    checkpoint.save(path, params=ckpt.params, optimizer_state=ckpt.optimizer_state, meta={**ckpt.meta, entry: value})
    saved = {name: (trained / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy",
                          "--no-progress"])
    assert f"'{path}'" in err and "Traceback" not in err
    assert {name: (trained / name).read_bytes() for name in saved} == saved


def test_resume_names_the_file_of_a_carried_state_of_the_wrong_shape(corpus, tmp_path, capsys):
    """A contiguous run's saved state, edited to another width, was refused by the model's forward,
    which names neither the file nor the entry."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--model", "lstm", "--batching", "contiguous", "--max-iters", "4") == 0
    path = out / "last.npz"
    ckpt = checkpoint.load(path)
    state = [[np.asarray(s)[:, :-1].tolist() for s in layer] for layer in ckpt.meta["rnn_state"]]
    checkpoint.save(path, params=ckpt.params, optimizer_state=ckpt.optimizer_state, meta={**ckpt.meta, "rnn_state": state})
    kept = path.read_bytes()
    capsys.readouterr()
    err = _error(capsys, ["train", "--out", str(out), "--resume", "--max-iters", "8", "--backend", "numpy",
                          "--no-progress"])
    assert f"'{path}' holds a run state" in err and "its meta entry 'rnn_state'" in err and "shape (" in err
    assert path.read_bytes() == kept


@pytest.mark.parametrize("edit", ["steps", "int_params", "batches"])
def test_resume_names_the_file_of_edited_weights_optimizer_or_batches(trained, capsys, edit):
    """The weights, the optimizer's state and the batches' state are refused by their own readers,
    which know no file: --resume names it, as for the other run-state entries."""
    path = trained / "last.npz"
    ckpt = checkpoint.load(path)
    params, state, meta = ckpt.params, dict(ckpt.optimizer_state), dict(ckpt.meta)
    if edit == "steps":
        state["steps"] = -1
    elif edit == "int_params":
        params = params.astype(np.int64)
    else:
        meta["batches"] = {"bit_generator": {"bit_generator": "PCG64", "state": {"state": 1}}}
    checkpoint.save(path, params=params, optimizer_state=state, meta=meta)
    saved = {name: (trained / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy",
                          "--no-progress"])
    assert f"'{path}'" in err and "Traceback" not in err
    assert {name: (trained / name).read_bytes() for name in saved} == saved


def test_resume_drops_blank_metrics_lines_and_starts_a_deleted_file_afresh(corpus, trained):
    metrics = trained / "metrics.jsonl"
    metrics.write_text(metrics.read_text(encoding="utf-8").replace("\n", "\n\n", 1), encoding="utf-8")
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8",
                     "--backend", "numpy", "--no-progress"]) == 0
    assert "\n\n" not in metrics.read_text(encoding="utf-8") and [r["iter"] for r in _metrics(trained)] == [0, 4, 8]
    metrics.unlink()                                # deleted by hand: the resumed run's rows alone
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "12",
                     "--backend", "numpy", "--no-progress"]) == 0
    assert [r["iter"] for r in _metrics(trained)] == [12]


@pytest.mark.parametrize("first, then, option", [
    ([], ["--optimizer", "sgd"], "optimizer"),
    ([], ["--seed", "7"], "seed"),
    (["--optimizer", "sgd"], ["--momentum", "0.9"], "momentum"),
    (["--model", "lstm"], ["--batching", "contiguous"], "batching"),
    (["--model", "lstm", "--batching", "contiguous"], ["--batch-size", "2"], "batch-size"),
    # the evaluation batches are drawn from these: best.npz would be picked on other batches
    ([], ["--batch-size", "2"], "batch-size"),
    ([], ["--eval-iters", "1"], "eval-iters"),
    (["--model", "lstm"], ["--block-size", "8"], "block-size"),
    (["--model", "lstm", "--batching", "contiguous"], ["--block-size", "8"], "block-size"),
    # the saved model's settings, named by their options
    ([], ["--block-size", "8"], "block-size"),
    ([], ["--dropout", "0.1"], "dropout"),
    ([], ["--bias", "true"], "bias"),
    ([], ["--model", "lstm"], "model"),
    (["--model", "lstm"], ["--model", "gru"], "model"),
    (["--model", "lstm"], ["--hidden-size", "8"], "hidden-size"),
    ([], ["--dtype", "float64"], "dtype"),
    # a change --resume refuses is said before what the changed setting makes of the saved ones
    (["--model", "lstm", "--batching", "contiguous"], ["--model", "gpt"], "model"),
    (["--model", "lstm", "--n-embd", "15"], ["--model", "gpt"], "model"),
    (["--optimizer", "adam", "--nesterov", "true"], ["--optimizer", "sgd"], "optimizer"),
])
def test_resume_names_an_option_that_cannot_change(corpus, tmp_path, capsys, first, then, option):
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", *first) == 0
    err = _error(capsys, ["train", "--out", str(out), "--resume", "--max-iters", "8", *then,
                          "--backend", "numpy", "--no-progress"])
    assert f"--resume: option '--{option}' cannot change when a run is resumed" in err
    assert checkpoint.load(out / "last.npz").meta["iter"] == 4


@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_a_runs_text_changed_since_training_is_named_by_resume_and_eval(corpus, trained, capsys, change):
    """Without --data, resume and eval read the text the run was trained on; once that file has
    changed, eval would score a 'validation split' holding training text, so both refuse it."""
    text = open(corpus, encoding="utf-8").read()
    if change == "edited":
        open(corpus, "a", encoding="utf-8").write(text[:2000])
        said = "has changed since (its SHA-256 is not the one saved in"
    else:
        os.remove(corpus)
        said = "is no longer there; pass a copy of it with --data PATH"
    resume = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8",
                             "--backend", "numpy", "--no-progress"])
    assert f"--resume: the text this run was trained on, {corpus!r}" in resume and said in resume
    assert "option '--data'" not in resume                       # an option the user did not give
    evaluation = _error(capsys, ["eval", "--checkpoint", str(trained / "last.npz"), "--backend", "numpy"])
    assert f"the text this run was trained on, {corpus!r}" in evaluation and said in evaluation
    copy = trained.parent / "copy.txt"                           # an unchanged copy, given with --data, works
    copy.write_text(text, encoding="utf-8")
    assert cli.main(["eval", "--checkpoint", str(trained / "last.npz"), "--data", str(copy), "--backend", "numpy"]) == 0
    assert cli.main(["train", "--out", str(trained), "--resume", "--data", str(copy), "--max-iters", "8",
                     "--backend", "numpy", "--no-progress"]) == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # NumPy's overflow and invalid values, on the way to nan
def test_a_diverged_loss_is_a_clear_error_and_keeps_the_checkpoints(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "40",
                          "--optimizer", "sgd", "--lr", "1e30", "--grad-clip", "0", "--schedule", "constant"])
    assert "minilm train: error: the training loss became nan at iteration" in err and "smaller --lr" in err
    assert "Traceback" not in err
    assert checkpoint.load(out / "last.npz").meta["iter"] == 0         # saved at the first evaluation, intact
    assert f"{out / 'last.npz'} keeps iteration 0" in err


def test_a_loss_that_diverges_at_an_evaluation_keeps_the_checkpoints(corpus, tmp_path, capsys, monkeypatch):
    """Weights an update has just blown up show first in an evaluation: it must stop the run before
    metrics.jsonl gets NaN (not JSON) and before last.npz, which --resume needs, gets the weights."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8") == 0
    saved = {name: (out / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    monkeypatch.setattr(train, "estimate_loss", lambda model, batches: float("nan"))
    err = _error(capsys, ["train", "--out", str(out), "--resume", "--max-iters", "12", "--eval-interval", "1",
                          "--no-progress"])
    assert (f"minilm train: error: the evaluation loss became nan (train nan) at iteration 9; "
            f"{out / 'last.npz'} keeps iteration 8; try a smaller --lr") in err
    assert {name: (out / name).read_bytes() for name in saved} == saved


def test_early_stopping(corpus, tmp_path):
    # with lr 1e-6 nothing improves by more than noise, so patience 1 stops at the second evaluation
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "40", "--lr", "1e-9", "--min-lr", "1e-9", "--patience", "1") == 0
    assert len(_metrics(out)) < 11


def _early_stopping_after(rows, patience):
    """The early-stopping state after the evaluations ``rows`` of metrics.jsonl, counted afresh."""
    stopper = optim.EarlyStopping(patience)
    for r in rows:
        stopper.update(r["val_loss"])
    return stopper.state_dict()


def test_early_stopping_resumes_with_its_count(corpus, tmp_path, capsys):
    """last.npz holds the early-stopping count of every evaluation up to its own, so a resumed run
    stops where the run straight through stops; resuming a run that stopped early trains nothing
    more unless --patience is raised."""
    stop = ["--lr", "1e-9", "--min-lr", "1e-9", "--patience", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(corpus, straight, "--max-iters", "80", *stop) == 0
    assert _train(corpus, split, "--max-iters", "8", *stop) == 0
    assert checkpoint.load(split / "last.npz").meta["early_stopping"] == _early_stopping_after(_metrics(split), 3)
    resume = ["train", "--data", corpus, "--out", str(split), "--resume", "--backend", "numpy", "--no-progress"]
    assert cli.main([*resume, "--max-iters", "80"]) == 0
    a, b = _losses(_metrics(straight)), _losses(_metrics(split))
    assert max(a) < 80 and a == b                                        # the same evaluations, the same stop
    saved = checkpoint.load(split / "last.npz").meta
    assert saved["early_stopping"] == _early_stopping_after(_metrics(split), 3)
    capsys.readouterr()
    assert cli.main([*resume, "--max-iters", "80"]) == 0                 # stopped: nothing more to do
    assert "stopped early at iteration" in capsys.readouterr().out
    assert checkpoint.load(split / "last.npz").meta["iter"] == saved["iter"]
    assert cli.main([*resume, "--max-iters", "80", "--patience", "5"]) == 0   # more patience: on it goes
    assert checkpoint.load(split / "last.npz").meta["iter"] > saved["iter"]
    capsys.readouterr()
    assert cli.main([*resume, "--max-iters", "4", "--patience", "0", "--preset", "shakespeare-lstm"]) == 0
    captured = capsys.readouterr()
    assert "--max-iters is 4: nothing to train" in captured.out
    assert captured.out.index(" parameters, vocabulary ") < captured.out.index("nothing to train")   # summary first
    assert "warning: option '--preset' is ignored with --resume" in captured.err


def test_a_resume_with_a_smaller_patience_does_not_say_the_saved_run_stopped_early(tmp_path, corpus, capsys):
    """A run saved with --patience 3 after two evaluations without improvement had not stopped;
    resumed with --patience 1 it ends at once, and says that the new --patience ends it."""
    out = tmp_path / "run"
    diverging = ["--lr", "1.0", "--schedule", "constant", "--eval-interval", "2"]
    assert _train(corpus, out, *diverging, "--patience", "3", "--max-iters", "4") == 0
    assert checkpoint.load(out / "last.npz").meta["early_stopping"]["bad_evals"] == 2     # not stopped
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress", "--patience", "1"]) == 0
    said = capsys.readouterr().out
    assert "saved run stopped early" not in said
    assert "--patience 1 ends the run at iteration 4, where it was saved (its --patience was 3)" in said


def test_a_run_saved_past_the_max_iters_given_at_resume_neither_trains_nor_evaluates(corpus, tmp_path,
                                                                                        monkeypatch, capsys):
    """Saved by Ctrl-C at iteration 6, off the grid of 4, and resumed with --max-iters 5 and an
    --eval-interval of 3, on whose grid 6 lies: nothing to train, and nothing evaluated either."""
    out = tmp_path / "run"
    real_clip = train.optim.clip_grad_norm
    _signal_in_step(monkeypatch, signal.SIGINT, 6)
    assert _train(corpus, out, "--max-iters", "12") == 130
    monkeypatch.setattr(train.optim, "clip_grad_norm", real_clip)
    saved = (out / "last.npz").read_bytes()
    assert checkpoint.load(out / "last.npz").meta["iter"] == 6
    rows = _metrics(out)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "5", "--eval-interval", "3",
                     "--backend", "numpy", "--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert _metrics(out) == rows and (out / "last.npz").read_bytes() == saved


def test_a_run_trained_in_two_sessions_stops_early_where_the_straight_run_does(corpus, tmp_path):
    """The evaluation a run makes at its --max-iters, off the --eval-interval grid, is one the
    straight run never makes: it must not count towards --patience, or a run trained in two
    sessions stops at another iteration."""
    straight = tmp_path / "straight"
    options = ["--lr", "3e-2", "--patience", "1", "--lr-decay-iters", "60", "--max-iters", "60"]
    assert _train(corpus, straight, *options) == 0
    stop = checkpoint.load(straight / "last.npz").meta["iter"]
    assert stop < 60                                            # it did stop early
    for first in (stop - 1, stop - 3):                          # off the grid of 4
        split = tmp_path / f"split{first}"
        assert _train(corpus, split, *options[:-1], str(first)) == 0
        assert cli.main(["train", "--out", str(split), "--resume", "--max-iters", "60", "--backend", "numpy",
                         "--no-progress"]) == 0
        assert checkpoint.load(split / "last.npz").meta["iter"] == stop, first
        assert [row for row in _evaluations(_metrics(split)) if row[0] != first] == _evaluations(_metrics(straight))

def test_eval_and_sample(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8") == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "best.npz"), "--backend", "numpy"]) == 0
    text = capsys.readouterr().out
    loss = float(text.split("loss ")[1].split()[0])
    perplexity = float(text.split("perplexity ")[1].split(",")[0])
    bits = float(text.split("nats/char, perplexity")[1].split(", ")[1].split()[0])
    # the loss is printed to 4 decimals (an error of 5e-5, and so 5e-5 relative in e^loss), the
    # perplexity (>= 1) to 3 and the bits to 4: within PRINTED_RTOL of what the printed loss gives
    PRINTED_RTOL = 2e-4
    assert perplexity == pytest.approx(np.exp(loss), rel=PRINTED_RTOL)
    assert bits == pytest.approx(loss / np.log(2), rel=PRINTED_RTOL)
    assert cli.main(["sample", "--checkpoint", str(out / "best.npz"), "--prompt", "to be", "--max-new-tokens", "30",
                     "--seed", "1", "--backend", "numpy"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith("to be") and len(sampled) == len("to be") + 30 + 1


def test_eval_bad_batch_size_and_too_short_text(trained, tmp_path, capsys):
    out = trained
    err = _error(capsys, ["eval", "--checkpoint", str(out / "last.npz"), "--batch-size", "0", "--backend", "numpy"])
    assert "option '--batch-size' must be a positive integer, got 0" in err
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be", encoding="utf-8")    # a validation split of 2 characters: fine
    assert cli.main(["eval", "--checkpoint", str(out / "last.npz"), "--data", str(short), "--backend", "numpy"]) == 0
    short.write_text("to be or", encoding="utf-8")              # 1 character: nothing to score
    capsys.readouterr()
    err = _error(capsys, ["eval", "--checkpoint", str(out / "last.npz"), "--data", str(short), "--backend", "numpy"])
    assert "the val split of --data" in err and "must hold at least 2 characters" in err and "got 1" in err


def test_sample_prints_the_compile_notice_before_the_prompt(corpus, tmp_path, monkeypatch):
    """On a cold Numba cache the notice (stderr) comes while the first token is computed; the
    prompt (stdout) is written after it, so that a terminal never shows the notice inside the text."""
    import contextlib
    import io
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "2") == 0
    terminal = io.StringIO()                                   # stdout and stderr, as a terminal shows them

    @contextlib.contextmanager
    def notice_at_once(seconds=2.0, stream=None):
        terminal.write("numba: compiling...\n")
        yield
    monkeypatch.setattr(cli.backend, "compile_notice", notice_at_once)
    args = cli.build_parser().parse_args(["sample", "--checkpoint", str(out / "best.npz"), "--prompt", "to be",
                                          "--max-new-tokens", "5", "--backend", "numpy"])
    assert cli._sample(args, out=terminal) == 0
    assert terminal.getvalue().startswith("numba: compiling...\nto be")


def test_sample_text_is_the_command_from_python(trained, capsys):
    from minilm.evaluate import load_model
    from minilm.sample import generate, sample_text
    ckpt = str(trained / "last.npz")
    options = dict(temperature=0.8, top_k=5, seed=3)
    text = "".join(sample_text(ckpt, "to be", 40, **options))
    assert len(text) == 40
    assert cli.main(["sample", "--checkpoint", ckpt, "--prompt", "to be", "--max-new-tokens", "40", "--temperature",
                     "0.8", "--top-k", "5", "--seed", "3", "--backend", "numpy"]) == 0
    assert capsys.readouterr().out == "to be" + text + "\n"
    model, tokenizer, _ = load_model(ckpt)                       # the same as generate on the ids
    assert text == tokenizer.decode(list(generate(model, tokenizer.encode("to be"), 40, **options)))
    assert cli.main(["sample", "--checkpoint", ckpt, "--seed", "4", "--backend", "numpy"]) == 0
    assert capsys.readouterr().out == "\n" + "".join(sample_text(ckpt, seed=4)) + "\n"   # the same defaults
    default = "".join(sample_text(ckpt, max_new_tokens=10, seed=3))   # the corpus ends in a newline
    assert default == "".join(sample_text(ckpt, "\n", 10, seed=3))
    assert "".join(sample_text(ckpt, "to", 0)) == ""


@pytest.mark.parametrize("prompt, kwargs, error, match", [
    ("ZEBRA", {}, ValueError, r"sample_text: argument 'prompt' has 5 characters that are not in the model's vocabulary"),
    ("", {}, ValueError, r"sample_text: argument 'prompt' must hold at least one character, got ''"),
    ([1, 2], {}, TypeError, r"sample_text: argument 'prompt' must be a string, got list"),
    ("to", {"temperature": -1.0}, ValueError, r"sample_text: option 'temperature' must be a finite number >= 0"),
    ("to", {"max_new_tokens": -1}, ValueError, r"sample_text: option 'max_new_tokens' must be an integer >= 0"),
    ("to", {"top_k": 0}, ValueError, r"sample_text: option 'top_k' must be None or an integer >= 1, got 0"),
    ("to", {"seed": -1}, ValueError, r"sample_text: option 'seed' must be None or an integer >= 0, got -1"),
    ("to", {"use_cache": "no"}, ValueError, r"sample_text: option 'use_cache' must be True or False"),
])
def test_sample_text_checks_its_arguments_when_called(trained, prompt, kwargs, error, match):
    from minilm.sample import sample_text
    with pytest.raises(error, match=match):
        sample_text(str(trained / "last.npz"), prompt, **kwargs)        # before any next()


def test_sample_text_without_a_newline_in_the_vocabulary_asks_for_a_prompt(tmp_path):
    from minilm.sample import sample_text
    one_line = tmp_path / "one-line.txt"
    one_line.write_text("to be or not to be " * 40, encoding="utf-8")
    assert _train(str(one_line), tmp_path / "run", "--max-iters", "1") == 0
    with pytest.raises(ValueError, match=r"sample_text: argument 'prompt' was not given, and its default, a newline, "
                                         r"is not in the model's vocabulary"):
        sample_text(str(tmp_path / "run" / "last.npz"))
    assert len("".join(sample_text(str(tmp_path / "run" / "last.npz"), "to", 5))) == 5


def test_sample_text_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from minilm.sample import sample_text
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        sample_text(str(tmp_path / "missing.npz"), "to")


@pytest.mark.parametrize("carry_state", [False, True])
def test_evaluate_says_it_compiles_around_its_first_batch_alone(monkeypatch, carry_state):
    """On a cold cache the first batch compiles Numba's kernels (seconds of silence in `minilm eval`):
    the notice is around that batch only, since a whole evaluation may take longer than its delay."""
    import contextlib
    from minilm import evaluate as evaluate_module

    class Uniform:
        kind = "rnn"

        def forward(self, x, y, state=None):
            calls.append(noticing[0])
            return None, np.float64(np.log(5.0)), state or ((np.zeros((len(x), 1)),),)

    calls, noticing = [], [False]

    @contextlib.contextmanager
    def notice(**options):
        noticing[0] = True
        yield
        noticing[0] = False
    monkeypatch.setattr(evaluate_module.backend, "compile_notice", notice)
    evaluate_module.evaluate(Uniform(), np.arange(103) % 5, block_size=16, batch_size=2, carry_state=carry_state)
    assert len(calls) > 2 and calls == [True] + [False] * (len(calls) - 1)


def test_evaluate_scores_every_character_once(corpus):
    from minilm.evaluate import evaluate

    class Uniform:
        def forward(self, x, y):
            self.seen = getattr(self, "seen", 0) + y.size
            return None, np.float64(np.log(5.0))

    model = Uniform()
    ids = np.arange(103) % 5
    result = evaluate(model, ids, block_size=16, batch_size=3)
    assert result["characters"] == 102 == model.seen
    assert result["perplexity"] == pytest.approx(5.0, rel=1e-12)          # e^(ln 5): a few float64 roundings
    assert evaluate(model, ids[:2], block_size=16, batch_size=3)["characters"] == 1
    with pytest.raises(ValueError, match=r"evaluate: argument 'ids' must hold at least 2 characters .*got 1"):
        evaluate(model, ids[:1], block_size=16, batch_size=3)
    with pytest.raises(ValueError, match=r"evaluate: option 'batch_size' must be a positive integer, got 0"):
        evaluate(model, ids, block_size=16, batch_size=0)
    for block_size in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"evaluate: option 'block_size' must be a positive integer, got"):
            evaluate(model, ids, block_size=block_size, batch_size=3)


@pytest.mark.parametrize("ids, kwargs, message", [
    (np.arange(8), {}, r"argument 'ids' must hold ids in \[0, 5\) \(the model's vocabulary\), got 7"),
    (np.arange(8) - 1, {}, r"argument 'ids' must hold ids in \[0, 5\) \(the model's vocabulary\), got -1"),
    (np.array([[0, 1], [2, 3]]), {}, r"argument 'ids' must be a 1-D sequence of integer token ids, got shape \(2, 2\)"),
    (np.array([0.0, 1.0, 2.0]), {}, r"argument 'ids' must be a 1-D sequence of integer token ids, got dtype float64"),
    (np.arange(5), {"block_size": 8}, r"option 'block_size' must be at most the model's block_size = 4, got 8"),
])
def test_evaluate_names_its_own_argument(ids, kwargs, message):
    """Ids out of the model's vocabulary, of another shape or dtype, and windows longer than a GPT
    takes were refused inside the model, as GPT.forward's 'idx' or 'targets'."""
    from minilm.evaluate import evaluate
    from minilm.models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=4))
    with pytest.raises(ValueError, match="^evaluate: " + message + "$"):
        evaluate(model, ids, **{"block_size": 4, "batch_size": 2, **kwargs})

@pytest.mark.parametrize("n, block_size, batch_size", [(103, 16, 3), (96, 16, 3), (96, 16, 1), (33, 8, 4), (17, 16, 2)])
def test_evaluate_is_the_mean_loss_over_every_predicted_character(n, block_size, batch_size):
    """Each character after the first is predicted once, from the one before it in the same window:
    the result is the mean of a per-position loss over every (input, target) pair of the text,
    whatever the windows and batches (a full last window, a short one, a lone one)."""
    from minilm.evaluate import evaluate

    def pair_loss(x, y):                      # a loss that differs for every (input, target) pair
        return np.sin(1.0 + x + 0.37 * y) + 2.0

    class PairLoss:
        def forward(self, x, y):
            assert x.shape == y.shape
            return None, np.float64(np.mean(pair_loss(x, y)))

    ids = (np.arange(n) * 7 + 3) % 11
    result = evaluate(PairLoss(), ids, block_size=block_size, batch_size=batch_size)
    expected = np.mean(pair_loss(ids[:-1], ids[1:]))
    assert result["characters"] == n - 1
    # a sum of ~100 float64 terms in two orders: equal to a few ulps
    assert result["loss"] == pytest.approx(expected, rel=1e-12)
    assert result["perplexity"] == pytest.approx(np.exp(expected), rel=1e-12)
    assert result["bits_per_char"] == pytest.approx(expected / np.log(2), rel=1e-12)


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_evaluate_with_the_state_carried_is_one_pass_over_each_stream(cell, backend_name):
    """carry_state: one stream is one forward over the whole text; three streams of 66 predictions
    (200 = 3 x 66 + 2) are three forwards, the 2 left over continuing the last stream. float64:
    the same sums in another grouping, equal to 1e-12."""
    import minilm
    from minilm.evaluate import evaluate
    from minilm.models import RNNLM, GPT, GPTConfig, RNNConfig
    minilm.use(backend_name)                                    # the autouse fixture restores the backend
    model = RNNLM(RNNConfig(vocab_size=11, cell=cell, n_layer=2, hidden_size=16, n_embd=8), dtype=np.float64, seed=0)
    ids = np.random.default_rng(0).integers(0, 11, 201)

    def loss_of(a, b):                                          # predictions a+1 .. b, in one pass
        return float(model.forward(ids[None, a:b], ids[None, a + 1:b + 1])[1]) * (b - a)

    one = evaluate(model, ids, block_size=8, batch_size=1, carry_state=True)
    assert one["characters"] == 200 and one["loss"] == pytest.approx(loss_of(0, 200) / 200, rel=1e-12)
    three = evaluate(model, ids, block_size=8, batch_size=3, carry_state=True)
    assert three["loss"] == pytest.approx((loss_of(0, 66) + loss_of(66, 132) + loss_of(132, 200)) / 200, rel=1e-12)
    assert evaluate(model, ids[:3], block_size=8, batch_size=5, carry_state=True)["characters"] == 2
    windows = evaluate(model, ids, block_size=8, batch_size=1)["loss"]
    assert abs(windows - one["loss"]) > 1e-6                   # each window from zeros is another number
    with pytest.raises(ValueError, match="evaluate: option 'carry_state' is for recurrent models.*got a GPT"):
        evaluate(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=4)), ids, block_size=8,
                 batch_size=1, carry_state=True)


def test_a_contiguous_run_is_evaluated_with_its_state_carried(corpus, tmp_path, capsys):
    """char-rnn's batches train the model to use its history: the run's evaluations (the first
    eval_iters x batch_size x block_size characters of each split) and minilm eval (the whole split)
    score it with the state carried, and say so."""
    from minilm.data import split
    from minilm.evaluate import evaluate, load_model, stream_loss
    out = tmp_path / "run"
    assert _train(corpus, out, "--model", "lstm", "--batching", "contiguous", "--max-iters", "8") == 0
    model, tokenizer, meta = load_model(str(out / "last.npz"))
    train_ids, val_ids = split(tokenizer.encode(open(corpus, encoding="utf-8").read()), 0.9)
    n = 2 * 4 * 16 + 1                                          # --eval-iters x --batch-size x --block-size + 1
    assert _metrics(out)[-1]["val_loss"] == stream_loss(model, val_ids[:n], 16, 4)[0]    # the same float32 forward
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "last.npz"), "--backend", "numpy"]) == 0
    said = capsys.readouterr().out
    whole = evaluate(model, val_ids, block_size=16, batch_size=4, carry_state=True)["loss"]
    assert "in 4 streams, the state carried (trained with --batching contiguous)" in said
    assert f"loss {whole:.4f} nats/char" in said


@pytest.mark.parametrize("model, how", [("gpt", "windows of 16, each scored on its own:"),
                                        ("lstm", "windows of 16, each scored on its own from a zero state:")])
def test_eval_says_how_a_model_trained_on_random_windows_is_scored(corpus, tmp_path, capsys, model, how):
    """Not "from an empty context": a GPT predicts each window's first character from that character."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--model", model, "--max-iters", "2") == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "last.npz"), "--backend", "numpy"]) == 0
    said = capsys.readouterr().out
    assert f"characters in {how}" in said and "empty context" not in said, said


def test_eval_uses_the_given_batch_size(trained, monkeypatch, capsys):
    from minilm import evaluate as evaluate_module
    seen = []
    real = evaluate_module.evaluate

    def spy(model, ids, **kwargs):
        seen.append(kwargs["batch_size"])
        return real(model, ids, **kwargs)
    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    assert cli.main(["eval", "--checkpoint", str(trained / "last.npz"), "--batch-size", "3", "--backend", "numpy"]) == 0
    assert cli.main(["eval", "--checkpoint", str(trained / "last.npz"), "--backend", "numpy"]) == 0
    saved = checkpoint.load(trained / "last.npz").meta["train_config"]["batch_size"]
    assert seen == [3, saved] and saved != 3

# --- training from Python ---------------------------------------------------------------------

PY_TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=4, eval_interval=2,
               eval_iters=1, warmup_iters=1, lr_decay_iters=8)


@pytest.mark.parametrize("change, match", [
    (dict(optimizer="bogus"), r"option '--optimizer' must be one of adamw, adam, sgd, rmsprop, got 'bogus'"),
    (dict(schedule="bogus"), r"option '--schedule' must be one of cosine, constant, step, got 'bogus'"),
    (dict(model="bogus"), r"option '--model' must be one of gpt, rnn, lstm, gru, got 'bogus'"),
    (dict(eval_interval=0), r"option '--eval-interval' must be an integer > 0, got 0"),
    (dict(grad_clip=-1.0), r"option '--grad-clip' must be a finite number >= 0, got -1.0"),
    (dict(seed=-1), r"option '--seed' must be an integer >= 0, got -1"),
    (dict(n_layer=2.0), r"option '--n-layer' must be an integer, got 2.0"),
    (dict(lr="0.1"), r"option '--lr' must be a number, got '0.1'"),
    (dict(nesterov="no"), r"option '--nesterov' must be True or False, got 'no'"),
    (dict(batching="contiguous"), r"option '--batching' contiguous is for the recurrent models"),
])
def test_train_from_python_checks_its_config_before_writing(corpus, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train.train(TrainConfig(**dict(PY_TINY, **change)), data=corpus, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("keyword, value, error, match", [
    ("progress", "no", ValueError, r"option 'progress' must be True or False, got 'no'"),    # had drawn the bar
    ("resume", "yes", ValueError, r"option 'resume' must be True or False, got 'yes'"),
    ("overwrite", 1, ValueError, r"option 'overwrite' must be True or False, got 1"),
    ("log", None, TypeError, r"argument 'log' must be a callable such as print, got NoneType"),   # once it had begun
    ("out_dir", None, TypeError, r"option '--out' must be a path, got NoneType"),
])
def test_train_from_python_checks_its_arguments_before_writing(corpus, tmp_path, keyword, value, error, match):
    arguments = {"data": corpus, "out_dir": tmp_path / "run", "progress": False, keyword: value}
    with pytest.raises(error, match="^minilm train: " + match + "$"):
        train.train(TrainConfig(**PY_TINY), **arguments)
    assert not (tmp_path / "run").exists()

def test_train_from_python_takes_numpy_numbers_and_logs_through_log(corpus, tmp_path, capsys):
    lines = []
    cfg = TrainConfig(**dict(PY_TINY, lr=np.float32(2e-3), batch_size=np.int64(4), bias=np.False_))
    train.train(cfg, data=corpus, out_dir=tmp_path / "run", progress=False, log=lines.append)
    assert capsys.readouterr().out == ""                   # every line went to log
    assert [line.split(":")[0] for line in lines if line.startswith("iter ")] == ["iter 0", "iter 2", "iter 4"]
    saved = checkpoint.load(tmp_path / "run" / "last.npz").meta["train_config"]
    assert saved["lr"] == float(np.float32(2e-3)) and type(saved["batch_size"]) is int and saved["bias"] is False


def test_each_step_takes_the_schedules_lr_and_clips_to_grad_clip(corpus, tmp_path, monkeypatch):
    """Step i updates with schedule(i) (warm-up, then the cosine), after clipping to --grad-clip, and
    the run ends after max_iters steps. The runs straight through and resumed would agree on a wrong
    lr, so it is read where the optimizer gets it."""
    cfg = TrainConfig(**dict(PY_TINY, max_iters=6, warmup_iters=2, lr_decay_iters=5, grad_clip=0.5))
    lrs, max_norms = [], []
    real_step, real_clip = optim.AdamW.step, train.optim.clip_grad_norm
    monkeypatch.setattr(optim.AdamW, "step", lambda self, lr=None: lrs.append(lr) or real_step(self, lr))
    monkeypatch.setattr(train.optim, "clip_grad_norm", lambda p, m: max_norms.append(m) or real_clip(p, m))
    result = train.train(cfg, data=corpus, out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    schedule = optim.WarmupCosine(cfg.lr, cfg.min_lr, warmup_iters=2, decay_iters=5)
    assert lrs == [schedule(it) for it in range(6)]          # 2 warm-up steps, the cosine, then min_lr
    assert max_norms == [0.5] * 6
    assert result["iter"] == 6 and checkpoint.load(tmp_path / "run" / "last.npz").meta["iter"] == 6


def test_best_checkpoint_is_the_first_lowest_validation_loss(corpus, tmp_path, monkeypatch):
    """best.npz is saved only on a strict improvement over the lowest validation loss so far: not on
    a tie, and not on a loss lower than a worse one that came after the best."""
    val_losses, calls = iter([3.0, 2.0, 2.0, 2.5, 2.4]), []     # evaluations at 0, 2, 4, 6, 8

    def scripted(runner, batches):                              # train loss, then val loss, per evaluation
        calls.append(1)
        return 1.0 if len(calls) % 2 else next(val_losses)
    monkeypatch.setattr(train, "estimate_loss", scripted)
    cfg = TrainConfig(**dict(PY_TINY, max_iters=8))
    train.train(cfg, data=corpus, out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    best, last = checkpoint.load(tmp_path / "run" / "best.npz"), checkpoint.load(tmp_path / "run" / "last.npz")
    assert (best.meta["iter"], best.meta["best_val_loss"]) == (2, 2.0)
    assert (last.meta["iter"], last.meta["best_val_loss"]) == (8, 2.0)


@pytest.mark.parametrize("batching", ["contiguous", "random"])
def test_the_recurrent_state_is_carried_only_by_contiguous_batches(corpus, tmp_path, monkeypatch, batching):
    """Contiguous streams hand each step the state the step before returned (zeros, None, only when
    the streams start over); random windows start every step from zeros."""
    given, returned = [], []
    real_call = train.TrainStep.__call__

    def spy(self, x, y, lr, *, rng, state=None):
        given.append(state)
        out = real_call(self, x, y, lr, rng=rng, state=state)
        returned.append(out[1])
        return out
    monkeypatch.setattr(train.TrainStep, "__call__", spy)
    cfg = TrainConfig(**dict(PY_TINY, model="lstm", hidden_size=8, batching=batching))
    train.train(cfg, data=corpus, out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    assert len(given) == 4 and given[0] is None                 # the corpus has far more than 4 chunks
    if batching == "contiguous":
        assert all(given[k] is returned[k - 1] is not None for k in range(1, 4))
    else:
        assert all(state is None for state in given)


@pytest.mark.parametrize("characters, warned", [(200, True), (400, False)])
def test_a_contiguous_run_whose_streams_hold_one_chunk_says_it_carries_no_state(tmp_path, characters, warned):
    """180 training characters in 8 streams are 22 a stream: one chunk of 16, so every batch starts
    the streams over from zeros, and --batching contiguous silently carried nothing. 360 hold two."""
    path = tmp_path / "short.txt"
    path.write_text("".join(np.random.default_rng(0).choice(list("abcdefgh "), characters)), encoding="utf-8")
    said = []
    cfg = TrainConfig(**dict(PY_TINY, model="lstm", hidden_size=8, batching="contiguous", batch_size=8))
    train.train(cfg, data=str(path), out_dir=tmp_path / "run", progress=False, log=said.append)
    warning = [line for line in said if "carries no state" in line]
    assert len(warning) == int(warned), said
    if warned:
        assert warning[0] == ("minilm train: warning: --batching contiguous carries no state here: the training "
                              "text (180 characters) cut into --batch-size 8 streams holds one --block-size 16 "
                              "chunk per stream, so every batch starts from a zero state; a smaller --batch-size "
                              "or --block-size carries it")


@pytest.mark.parametrize("options, expected", [
    (dict(optimizer="adamw", lr=3e-3, beta1=0.8, beta2=0.95, weight_decay=0.05),
     {"name": "adamw", "lr": 3e-3, "betas": [0.8, 0.95], "weight_decay": 0.05}),
    (dict(optimizer="adam", lr=3e-3, beta1=0.8, beta2=0.95), {"name": "adam", "lr": 3e-3, "betas": [0.8, 0.95]}),
    (dict(optimizer="sgd", lr=0.2, momentum=0.5, nesterov=True),
     {"name": "sgd", "lr": 0.2, "momentum": 0.5, "nesterov": True}),
    (dict(optimizer="rmsprop", lr=0.02, momentum=0.3, rmsprop_alpha=0.9),
     {"name": "rmsprop", "lr": 0.02, "momentum": 0.3, "alpha": 0.9}),
])
def test_the_optimizer_gets_every_option_of_the_config(options, expected):
    from minilm.params import Params
    optimizer = train.make_optimizer(TrainConfig(**dict(PY_TINY, **options)), Params([("W", (2, 2))]))
    state = optimizer.state_dict()
    assert {key: state[key] for key in expected} == expected


# --- bad input ------------------------------------------------------------------------------

def _error(capsys, argv):
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_empty_corpus(tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("")
    err = _error(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "o"), *TINY])
    assert "empty" in err and str(path) in err


def test_a_one_character_corpus_names_data(tmp_path, capsys):
    path = tmp_path / "one.txt"
    path.write_text("a")
    err = _error(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "o"), *TINY])
    assert f"option '--data' {str(path)!r} holds 1 character; each of its training and validation splits" in err


def test_undecodable_corpus(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff\xfe world" * 10)
    err = _error(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "o"), *TINY])
    assert "UTF-8" in err and str(path) in err


def test_corpus_shorter_than_a_block(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 10)                           # its validation split has 10 characters
    err = _error(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "o"), *TINY])
    assert "fewer than one block" in err and "--block-size 16" in err


def test_missing_corpus(tmp_path, capsys):
    err = _error(capsys, ["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), *TINY])
    assert "nope.txt" in err


def test_unknown_preset_and_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "shakespeare-huge"])
    assert e.value.code == 2 and "invalid choice: 'shakespeare-huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--n-layers", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --n-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "lion"])
    assert "invalid choice: 'lion'" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "0", "'--lr' must be a finite number > 0"),
    ("--lr", "inf", "'--lr' must be a finite number > 0, got inf"),
    ("--lr-gamma", "inf", "'--lr-gamma' must be a finite number > 0, got inf"),
    ("--weight-decay", "nan", "'--weight-decay' must be a finite number >= 0, got nan"),
    ("--dropout", "1.0", "'--dropout' must be in [0, 1)"),
    ("--n-embd", "30", "'--n-embd' (30) must be divisible by '--n-head' (4)"),
    ("--min-lr", "1", "'--min-lr' (1.0) must not exceed '--lr'"),
    ("--lr-decay-iters", "50", "'--lr-decay-iters' (50) must exceed '--warmup-iters' (100)"),
    ("--batching", "contiguous", "'--batching' contiguous is for the recurrent models"),
    ("--beta2", "1.5", "'--beta2' must be in [0, 1)"),
    ("--bias", "maybe", "expected true or false"),
    # past a float's range: "int too large to convert to float", naming no option
    ("--max-iters", "1" + "0" * 400, "'--max-iters' must be an integer below 2**63, got 1000"),
    ("--seed", str(2**63), "'--seed' must be an integer below 2**63, got 9223372036854775808"),
    ("--seed", "-1" + "0" * 400, "'--seed' must be an integer >= 0, got -1000"),     # below, but not >= 0
])
def test_bad_option_values(option, value, message, tmp_path, capsys):
    # a --data that does not exist: were a check to let the value through, the run fails at once on
    # the data instead of downloading tiny Shakespeare and training the preset
    argv = ["train", "--n-head", "4", option, value, "--out", str(tmp_path / "o"), "--data", str(tmp_path / "none.txt")]
    try:
        status = cli.main(argv)
    except SystemExit as e:                                      # argparse rejects what it can parse
        status = e.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()                         # nothing started


def test_options_the_run_does_not_use_are_said_to_be_ignored(corpus, tmp_path, capsys):
    assert _train(corpus, tmp_path / "run", "--max-iters", "2", "--model", "lstm", "--optimizer", "sgd",
                  "--momentum", "0.9", "--beta2", "0.95", "--no-cuda-graph") == 0      # TINY gives --n-head as well
    err = capsys.readouterr().err
    assert "warning: option '--n-head' is ignored: it is used only by --model gpt" in err
    assert "warning: option '--beta2' is ignored: it is used only by --optimizer adam or adamw" in err
    assert "warning: option '--no-cuda-graph' is ignored: it is used only by --backend cupy" in err
    assert "--momentum" not in err and "--hidden-size" not in err      # both used by this run


def test_low_precision_needs_the_gpu(corpus, tmp_path, capsys):
    err = _error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "o"), *TINY, "--dtype", "float16"])
    assert "'--dtype' float16 needs the cupy backend" in err


def test_missing_truncated_and_foreign_checkpoints(corpus, tmp_path, capsys):
    err = _error(capsys, ["eval", "--checkpoint", str(tmp_path / "nope.npz"), "--backend", "numpy"])
    assert "nope.npz" in err and "does not exist" in err
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4") == 0
    raw = (out / "last.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(raw[: len(raw) // 2])
    err = _error(capsys, ["sample", "--checkpoint", str(tmp_path / "half.npz"), "--backend", "numpy"])
    assert "truncated" in err
    (tmp_path / "notes.npz").write_text("not a checkpoint")
    assert "not a minilm checkpoint" in _error(capsys, ["eval", "--checkpoint", str(tmp_path / "notes.npz")])
    # resuming with a different model is refused, naming the setting
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), "--resume", "--n-layer", "2",
                          "--backend", "numpy", "--no-progress"])
    assert "--resume: option '--n-layer' cannot change when a run is resumed" in err and "is for 1), got 2" in err
    assert checkpoint.load(out / "last.npz").meta["iter"] == 4     # the saved run is untouched


@pytest.mark.parametrize("options, message", [
    (["--optimizer", "sgd", "--nesterov", "true"], "option '--nesterov' needs '--momentum' > 0, got --momentum 0.0"),
    (["--model", "lstm", "--batching", "contiguous", "--batch-size", "1000"],
     "--batching contiguous cuts it into --batch-size 1000 streams of at least --block-size 16 + 1, which needs "
     "16001; give a smaller --batch-size or --block-size"),
])
def test_a_refused_run_names_its_options_and_leaves_no_folder(corpus, tmp_path, capsys, options, message):
    out = tmp_path / "refused"
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "2", *options])
    assert message in err
    assert not out.exists()


def test_resume_without_a_checkpoint(corpus, tmp_path, capsys):
    err = _error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "empty"), "--resume", *TINY])
    assert "last.npz" in err and "does not exist" in err


@pytest.mark.parametrize("option, value, message", [
    ("--top-k", "0", "option '--top-k' must be an integer >= 1 (leave it out for every token), got 0"),
    ("--top-p", "1.5", "option '--top-p' must be a number in (0, 1] (leave it out for every token), got 1.5"),
    ("--temperature", "-1", "option '--temperature' must be a finite number >= 0 (0 = greedy), got -1.0"),
    ("--max-new-tokens", "-2", "option '--max-new-tokens' must be an integer >= 0, got -2"),
    ("--seed", "-1", "option '--seed' must be an integer >= 0, got -1"),
])
def test_sample_names_its_options_in_errors(trained, capsys, option, value, message):
    err = _error(capsys, ["sample", "--checkpoint", str(trained / "last.npz"), option, value, "--backend", "numpy"])
    assert f"minilm sample: error: {message}" in err


def test_sample_into_an_output_that_cannot_encode_the_text_says_how_to_fix_it(tmp_path, capsys, monkeypatch):
    arrows = tmp_path / "arrows.txt"
    arrows.write_text("to → be → or → not\n" * 60, encoding="utf-8")
    assert _train(str(arrows), tmp_path / "run", "--max-iters", "1") == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "run" / "last.npz"), "--prompt", "to →",
                     "--max-new-tokens", "3", "--backend", "numpy"]) == 2
    assert ("minilm sample: error: the output's encoding, latin-1, cannot write '→'; "
            "set PYTHONIOENCODING=utf-8 (or a UTF-8 locale) to print the model's text") in capsys.readouterr().err


def test_sample_top_k_past_the_vocabulary_is_all_of_it(trained, capsys):
    ckpt = str(trained / "last.npz")
    outs = []
    for extra in (["--top-k", "1000"], []):
        assert cli.main(["sample", "--checkpoint", ckpt, "--prompt", "to", "--max-new-tokens", "30", "--seed", "2",
                         "--backend", "numpy", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_prompt_outside_the_vocabulary(trained, tmp_path, capsys):
    out = trained
    err = _error(capsys, ["sample", "--checkpoint", str(out / "last.npz"), "--prompt", "ZEBRA", "--backend", "numpy"])
    assert "minilm sample: error: option '--prompt' has 5 characters that are not in the model's vocabulary" in err
    assert "'Z'" in err


def test_the_default_prompt_and_an_empty_one(tmp_path, capsys):
    one_line = tmp_path / "one-line.txt"
    one_line.write_text("to be or not to be " * 40, encoding="utf-8")         # no newline anywhere
    out = tmp_path / "run"
    assert _train(str(one_line), out, "--max-iters", "1") == 0
    ckpt = str(out / "last.npz")
    err = _error(capsys, ["sample", "--checkpoint", ckpt, "--backend", "numpy"])
    assert ("option '--prompt' was not given, and its default, a newline, is not in the model's vocabulary "
            "(its training text was one line); give the text to continue") in err
    err = _error(capsys, ["sample", "--checkpoint", ckpt, "--prompt", "", "--backend", "numpy"])
    assert "option '--prompt' must hold at least one character, got ''" in err
    assert cli.main(["sample", "--checkpoint", ckpt, "--prompt", "to", "--max-new-tokens", "3",
                     "--backend", "numpy"]) == 0
    assert capsys.readouterr().out.startswith("to")


def test_a_bad_backend_in_the_environment_is_named(trained, monkeypatch, capsys):
    monkeypatch.setenv("MINILM_BACKEND", "foo")
    assert cli.main(["sample", "--checkpoint", str(trained / "last.npz")]) == 2
    assert capsys.readouterr().err == ("minilm sample: error: environment variable MINILM_BACKEND must be one of "
                                       "numpy, numba, cupy, got 'foo'\n")


def test_output_into_a_closed_pipe_ends_quietly(trained, monkeypatch, capsys):
    from minilm import sample

    def reader_gone(*args, **kwargs):                            # as `minilm sample | head -c 50`
        yield 1
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sample, "generate", reader_gone)
    assert cli.main(["sample", "--checkpoint", str(trained / "last.npz"), "--prompt", "to", "--backend", "numpy"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("sizes", [["--n-embd", "100000000", "--n-head", "1"], ["--batch-size", "100000000"],
                                   ["--model", "lstm", "--hidden-size", "10000000"],
                                   # the evaluation's batches, built before the first step (a typo: a run that had
                                   # grown until the machine ran out of memory)
                                   ["--eval-iters", "1000000000"]])
def test_a_run_larger_than_the_memory_is_refused_before_it_starts(corpus, tmp_path, sizes, capsys):
    out = tmp_path / "huge"
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, *sizes])
    assert "minilm train: error: this run needs about" in err and "GiB of memory and this machine has" in err
    assert sizes[-2] in err or "--hidden-size" in err
    assert ("--eval-iters (now 1000000000)" in err) == (sizes[0] == "--eval-iters")
    assert not out.exists()                                     # nothing written


def test_running_out_of_memory_names_the_size_options(corpus, tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):                             # past the estimate: the allocation fails
        raise MemoryError("Unable to allocate 9.00 GiB for an array with shape (3, 805306368)")
    monkeypatch.setattr(train, "build_model", no_memory)
    err = _error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "o"), *TINY])
    assert "minilm train: error: not enough memory (Unable to allocate 9.00 GiB" in err
    assert "--n-embd" in err and "--batch-size" in err
    monkeypatch.setattr(train, "build_model", lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError()))
    err = _error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "o"), *TINY])
    assert "minilm train: error: not enough memory; give smaller sizes: --n-layer" in err       # no empty "()"


@pytest.mark.parametrize("settings", [dict(model="gpt", n_embd=64, block_size=32, batch_size=4),
                                      # deep: the per-layer count dominates (nanoGPT's 12 layers, narrow)
                                      dict(model="gpt", n_layer=12, n_embd=64, n_head=4, block_size=64,
                                           batch_size=4, optimizer="sgd"),
                                      dict(model="lstm", n_embd=32, hidden_size=64, block_size=32, batch_size=8),
                                      dict(model="gru", n_embd=32, hidden_size=64, block_size=32, batch_size=8),
                                      dict(model="rnn", n_embd=32, hidden_size=64, block_size=32, batch_size=8),
                                      dict(model="rnn", n_embd=32, hidden_size=64, block_size=32, batch_size=8,
                                           optimizer="sgd"),
                                      # evaluation batches that outweigh the model: the run holds them all along
                                      dict(model="gpt", n_layer=1, n_embd=16, n_head=2, block_size=32, batch_size=4,
                                           eval_iters=5000),
                                      dict(model="lstm", n_embd=32, hidden_size=64, block_size=32, batch_size=8,
                                           batching="contiguous", eval_iters=5000)])
def test_the_memory_estimate_is_below_a_measured_step_but_not_far(settings):
    import dataclasses
    import tracemalloc
    from minilm.data import evaluation_batches
    from minilm.models import build_model
    cfg = dataclasses.replace(config.preset("shakespeare-char-cpu"), **settings)
    ids = np.random.default_rng(0).integers(0, 65, 10_000)
    tracemalloc.start()                                         # NumPy reports its arrays to it
    try:
        held = []                                               # as a run holds them, from start to end
        if cfg.batching != "contiguous":                        # (a contiguous run scores slices of the text)
            held += [evaluation_batches(ids, cfg.block_size, cfg.batch_size, cfg.eval_iters, seed=s) for s in (2, 3)]
        kind, model_cfg = train.model_settings(cfg, 65)
        model = build_model(kind, model_cfg, dtype=np.float32, seed=0)
        optimizer = train.make_optimizer(cfg, model.params)
        x = np.random.default_rng(0).integers(0, 65, (cfg.batch_size, cfg.block_size))
        model.forward(x, x, train=True)
        model.backward(1.0)
        optimizer.step(1e-3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a refusal must never be wrong, so the estimate stays under the real peak (0.63-0.8 of it
    # when this test was written), yet within a factor of two of it
    assert 0.5 * peak < train.memory_estimate(cfg, 65) <= peak


def test_ctrl_c_while_sampling_stops_without_a_traceback(trained, tmp_path, capsys, monkeypatch):
    out = trained
    from minilm import sample

    def interrupted(*args, **kwargs):
        yield 1
        raise KeyboardInterrupt                                  # Ctrl-C after the first token
    monkeypatch.setattr(sample, "generate", interrupted)
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(out / "last.npz"), "--prompt", "to", "--backend", "numpy"]) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith("to") and captured.err.strip() == "minilm sample: interrupted"


def test_eval_on_text_outside_the_vocabulary(trained, tmp_path, capsys):
    out = trained
    other = tmp_path / "other.txt"
    other.write_text("QUEEN: to be or not to be\n" * 20, encoding="utf-8")
    err = _error(capsys, ["eval", "--checkpoint", str(out / "last.npz"), "--data", str(other), "--backend", "numpy"])
    assert f"minilm eval: error: option '--data' {str(other)!r} has " in err and "'Q'" in err


# --- presets, options and their checks (minilm/config.py), without training ---------------------

# the recipes the presets stand for: nanoGPT's config/train_shakespeare_char.py (its CPU run, and its
# "baby GPT" for a GPU), and the two recurrent runs; every one AdamW on a cosine from lr to min_lr
RECIPES = {
    "shakespeare-char-cpu": dict(model="gpt", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                                 dropout=0.0, bias=False, lr=1e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9,
                                 beta2=0.99, weight_decay=0.1, grad_clip=1.0, max_iters=2000),
    "shakespeare-char": dict(model="gpt", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                             dropout=0.2, bias=False, lr=1e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9,
                             beta2=0.99, weight_decay=0.1, grad_clip=1.0, max_iters=5000),
    "shakespeare-lstm": dict(model="lstm", n_layer=2, hidden_size=256, n_embd=128, block_size=64, batch_size=32,
                             lr=2e-3, min_lr=2e-4, max_iters=2000),
    "shakespeare-gru": dict(model="gru", n_layer=2, hidden_size=256, n_embd=128, block_size=64, batch_size=32,
                            lr=2e-3, min_lr=2e-4, max_iters=2000),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_preset_is_its_recipe(name):
    cfg = config.preset(name)
    assert {key: getattr(cfg, key) for key in RECIPES[name]} == RECIPES[name]
    assert (cfg.optimizer, cfg.schedule, cfg.schedule_length()) == ("adamw", "cosine", cfg.max_iters)
    assert config.validate(cfg) == cfg                           # a preset passes its own checks
    assert set(config.PRESETS) == set(RECIPES)


@pytest.fixture
def given_to_train(monkeypatch):
    """What ``minilm train`` hands to ``train.train`` (which is not run): the config, then the keywords."""
    calls = []

    def record(cfg, **kwargs):
        calls.append((cfg, kwargs))
        return {"interrupted": False}
    monkeypatch.setattr(train, "train", record)
    return calls


def test_train_starts_from_the_cpu_preset_and_the_options_override_it(given_to_train, capsys):
    assert cli.main(["train", "--backend", "numpy"]) == 0
    cfg, kwargs = given_to_train[-1]
    assert cfg == config.preset("shakespeare-char-cpu") and kwargs["data"] == "shakespeare"
    # 0 and false are given values too: they override the preset's 0.2, 1.0 and True
    assert cli.main(["train", "--preset", "shakespeare-char", "--dropout", "0", "--grad-clip", "0",
                     "--patience", "0", "--seed", "0", "--backend", "numpy"]) == 0
    cfg = given_to_train[-1][0]
    assert (cfg.dropout, cfg.grad_clip, cfg.seed, cfg.n_layer) == (0.0, 0.0, 0, 6)
    for text, value in [("True", True), ("YES", True), ("on", True), ("1", True),
                        ("False", False), ("No", False), ("OFF", False), ("0", False)]:
        assert cli.main(["train", "--bias", text, "--optimizer", "sgd", "--momentum", "0.9", "--nesterov", text,
                         "--backend", "numpy"]) == 0
        cfg = given_to_train[-1][0]
        assert cfg.bias is value and cfg.nesterov is value
    assert capsys.readouterr().err == ""                       # every option given was used; no --resume


def test_a_warning_only_for_options_the_run_does_not_use(given_to_train, capsys):
    assert cli.main(["train", "--preset", "shakespeare-char", "--optimizer", "adam", "--beta1", "0.8",
                     "--beta2", "0.95", "--backend", "numpy"]) == 0
    assert capsys.readouterr().err == ""                       # adam reads both betas; --preset without --resume
    assert cli.main(["train", "--optimizer", "sgd", "--schedule", "constant", "--beta1", "0.8",
                     "--weight-decay", "0.05", "--min-lr", "1e-5", "--backend", "numpy"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["minilm train: warning: option '--min-lr' is ignored: it is used only by --schedule cosine",
                   "minilm train: warning: option '--beta1' is ignored: it is used only by --optimizer adam or adamw",
                   "minilm train: warning: option '--weight-decay' is ignored: it is used only by --optimizer adamw"]


def test_an_error_names_the_command_once(capsys):
    assert cli.main(["train", "--lr", "-1", "--backend", "numpy"]) == 2
    assert capsys.readouterr().err == "minilm train: error: option '--lr' must be a finite number > 0, got -1.0\n"


@pytest.mark.parametrize("change, match", [
    (dict(beta1=1.0), r"'--beta1' must be in \[0, 1\), got 1.0"),
    (dict(optimizer="rmsprop", rmsprop_alpha=1.0), r"'--rmsprop-alpha' must be in \[0, 1\), got 1.0"),
    (dict(optimizer="rmsprop", rmsprop_alpha=-0.5), r"'--rmsprop-alpha' must be a finite number >= 0, got -0.5"),
    (dict(n_layer=True), r"'--n-layer' must be an integer, got True"),
    (dict(lr=np.True_), r"'--lr' must be a number, got (np\.)?True"),          # NumPy's bool is no number either
    (dict(warmup_iters=100, lr_decay_iters=100), r"'--lr-decay-iters' \(100\) must exceed '--warmup-iters' \(100\)"),
    (dict(warmup_iters=100, lr_decay_iters=0, max_iters=100),
     r"'--max-iters' \(100\), the schedule's length while '--lr-decay-iters' is 0, must exceed '--warmup-iters'"),
    (dict(lr=1e-3, min_lr=1.5e-3), r"'--min-lr' \(0.0015\) must not exceed '--lr' \(0.001\)"),
    (dict(dropout=-0.1), r"'--dropout' must be a finite number >= 0, got -0.1"),
    (dict(lr_gamma=float("nan"), schedule="step"), r"'--lr-gamma' must be a finite number > 0, got nan"),
    # finite, but lr * gamma ** 2 passes the largest float by the last iteration: refused before training,
    # where the schedule's overflow had stopped the run at iteration 2 naming no option
    (dict(schedule="step", lr=1e-3, lr_gamma=1e300, lr_step_size=1, max_iters=2),
     r"'--lr-gamma' \(1e\+300\) every '--lr-step-size' \(1\) iterations takes '--lr' \(0.001\) past the "
     r"largest float before '--max-iters' \(2\); choose a smaller --lr-gamma or a larger --lr-step-size"),
])
def test_validate_refuses_each_value_out_of_range(change, match):
    with pytest.raises(ValueError, match=match):
        config.validate(config.TrainConfig(**dict(PY_TINY, **change)))


@pytest.mark.parametrize("change", [
    dict(seed=0, patience=0, grad_clip=0.0, weight_decay=0.0, momentum=0.0, beta1=0.0, beta2=0.0, dropout=0.0),
    dict(optimizer="rmsprop", rmsprop_alpha=0.0),                # s = g², no running average: RMSprop's alpha range is [0, 1)
    dict(min_lr=1e-3, lr=1e-3),                                  # a flat cosine: the floor may equal the peak
    dict(lr_decay_iters=0, max_iters=5, warmup_iters=4),         # the schedule's length falls back to max_iters
    dict(schedule="constant", warmup_iters=100, max_iters=10),   # warm-up belongs to the cosine alone
    dict(model="lstm", n_embd=30, n_head=4),                     # n_head is the GPT's only
    dict(n_layer=np.int64(2), lr=np.float32(0.5), bias=np.True_),
    dict(schedule="step", lr=1e-3, lr_gamma=1e300, lr_step_size=1, max_iters=1),   # 1e297 at the last iteration
    dict(schedule="step", lr_gamma=1e-300, lr_step_size=1, max_iters=10**6),       # underflows to 0: no overflow
])
def test_validate_accepts_each_value_at_its_bound(change):
    cfg = config.validate(config.TrainConfig(**dict(PY_TINY, **change)))
    defaults = config.TrainConfig()
    for key, value in change.items():                            # NumPy numbers become Python's
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(getattr(defaults, key))
    assert cfg.schedule_length() == (cfg.lr_decay_iters or cfg.max_iters)


@pytest.mark.parametrize("n_chars, refused", [(160, True), (170, False)])
def test_each_split_needs_one_block_and_one_more_character(tmp_path, n_chars, refused):
    """A split of block_size + 1 characters holds one window and its targets; one of block_size does not.
    160 characters split 144 + 16 (refused, with --block-size 16), 170 split 153 + 17 (trained on)."""
    path = tmp_path / "text.txt"
    path.write_text(("to be or not " * 20)[:n_chars], encoding="utf-8")
    cfg = TrainConfig(**dict(PY_TINY, max_iters=1, eval_interval=1))
    run = lambda: train.train(cfg, data=str(path), out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    if refused:
        with pytest.raises(ValueError, match=r"the validation split of --data .* has 16 characters, fewer than one "
                                             r"block \(--block-size 16 \+ 1\)"):
            run()
    else:
        assert run()["iter"] == 1


def test_no_cuda_graph_is_passed_on_and_used_on_the_cupy_backend(given_to_train, monkeypatch, capsys):
    """Where the backend is cupy (stood in for here: train.train is not run), --no-cuda-graph is used,
    so there is no warning; elsewhere it is said to be ignored. Either way train gets cuda_graph=False."""
    from minilm import backend
    assert cli.main(["train", "--no-cuda-graph", "--backend", "numpy"]) == 0
    assert given_to_train[-1][1]["cuda_graph"] is False
    assert "'--no-cuda-graph' is ignored: it is used only by --backend cupy" in capsys.readouterr().err
    monkeypatch.setattr(backend, "current", lambda: "cupy")
    assert cli.main(["train", "--no-cuda-graph", "--backend", "numpy"]) == 0
    assert given_to_train[-1][1]["cuda_graph"] is False and capsys.readouterr().err == ""
    assert cli.main(["train", "--backend", "numpy"]) == 0
    assert given_to_train[-1][1]["cuda_graph"] is True
    for other in (["--model", "lstm"], ["--dtype", "float16"]):     # never a graph: said to be ignored
        assert cli.main(["train", "--no-cuda-graph", "--backend", "numpy", *other]) == 0
        assert "'--no-cuda-graph' is ignored: only a GPT's step, in float32 or bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "sample", "gradcheck", "bench"])
def test_help_says_what_every_option_does_and_its_default(command, capsys, monkeypatch):
    """--help is where a user learns the options: each says what it does, and each that has a
    default says it (train's: the default preset's, which applies when no --preset is given);
    the command's own help says what it does."""
    monkeypatch.setenv("COLUMNS", "10000")                      # no line breaks inside hyphenated names
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())            # argparse wraps the lines
    if command == "train":
        base = config.preset(config.DEFAULT_PRESET)
        for f in dataclasses.fields(TrainConfig):
            meaning = " ".join(config.MEANING[f.name].split())
            value = getattr(base, f.name)
            assert f"{meaning}; default: the preset's ({config.DEFAULT_PRESET}'s: {value!r})" in text, f.name
    import argparse
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices[command].description.rstrip(".").lower() in text.lower()
    for action in sub.choices[command]._actions:
        assert action.help and len(action.help.split()) >= 2, f"{command}: {action.option_strings} has no help"
        # `is not`: a default of 0 equals False, and must be said too
        if (action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
                and action.option_strings):
            assert "default" in action.help, f"{command}: {action.option_strings} does not give its default"


def test_presets_and_configs_from_python_are_checked():
    with pytest.raises(ValueError, match=r"option '--preset' must be one of shakespeare-char-cpu, shakespeare-char, "
                                         r"shakespeare-lstm, shakespeare-gru, got 'nope'"):
        config.preset("nope")
    with pytest.raises(TypeError, match=r"minilm train: argument 'cfg' must be a TrainConfig, got dict"):
        config.validate({"max_iters": 10})


# --- options and resume: the interplay ---------------------------------------------------------

def test_min_lr_holds_back_no_schedule_that_does_not_use_it(corpus, tmp_path, capsys):
    """--min-lr is the cosine's floor alone: a constant or step run whose --lr is under the preset's
    floor (1e-4) had been refused over an option the user never gave."""
    for schedule in (["--schedule", "constant"], ["--schedule", "step", "--lr-step-size", "100"]):
        out = tmp_path / schedule[1]
        assert _train(corpus, out, "--max-iters", "4", *schedule, "--lr", "5e-5", "--min-lr", "1e-3") == 0
        assert "option '--min-lr' is ignored: it is used only by --schedule cosine" in capsys.readouterr().err
        assert {r["lr"] for r in _metrics(out)} == {5e-5}


def test_a_resume_keeps_its_schedule_length_before_the_schedule_is_checked(corpus, tmp_path, monkeypatch, capsys):
    """With --lr-decay-iters 0 a resumed run keeps its first run's schedule length (12): a new
    --max-iters of 6, inside the warm-up of 8, had been refused as a schedule too short for it."""
    out = tmp_path / "run"
    first = ["--max-iters", "12", "--warmup-iters", "8", "--lr-decay-iters", "0", "--eval-interval", "2"]
    _signal_in_step(monkeypatch, signal.SIGINT, 3)
    assert _train(corpus, out, *first) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "6", "--backend", "numpy",
                     "--no-progress"]) == 0
    assert "the learning-rate schedule keeps its length of 12 iterations" in capsys.readouterr().out
    schedule = optim.WarmupCosine(1e-3, 1e-4, 8, 12)
    assert [(r["iter"], r["lr"]) for r in _metrics(out)] == [(i, schedule(i)) for i in (0, 2, 4, 6)]


def test_patience_given_at_resume_counts_from_the_runs_best(trained, capsys):
    """The run's best validation loss (iteration 4) is where a --patience first given at --resume
    counts from: with a learning rate too small to move a weight, the next evaluation is no better
    and stops the run. It had counted from an infinite best, so that evaluation was an improvement."""
    best = checkpoint.load(trained / "last.npz").meta["best_val_loss"]
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "16", "--patience", "1",
                     "--lr", "1e-30", "--min-lr", "1e-30", "--backend", "numpy", "--no-progress"]) == 0
    assert "stopping early: no improvement in 1 evaluations" in capsys.readouterr().out
    last = checkpoint.load(trained / "last.npz").meta
    assert last["iter"] == 8 and last["early_stopping"] == {"best": best, "bad_evals": 1}


def test_tokens_per_s_leaves_out_the_step_that_compiles(corpus, tmp_path, monkeypatch):
    """The process's first step runs under compile_notice, where Numba compiles its kernels (a
    minute on a cold cache). Here that step is made to take 1000 s on the clock: it must not count,
    or the first row would read about 0.26 tokens/s (256 tokens in 1000 s)."""
    import contextlib
    import time
    offset, real = [0.0], time.perf_counter
    monkeypatch.setattr(train.time, "perf_counter", lambda: real() + offset[0])

    @contextlib.contextmanager
    def compiling(**options):
        offset[0] += 1000.0
        yield
    monkeypatch.setattr(train.backend, "compile_notice", compiling)
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8") == 0
    rows = _metrics(out)
    assert rows[0]["tokens_per_s"] is None and rows[1]["tokens_per_s"] > 1 and rows[2]["tokens_per_s"] > 1
    assert rows[1]["elapsed_s"] > 1000                          # the step itself was run and timed


def test_the_loss_curve_of_one_evaluation_is_drawn(tmp_path, monkeypatch):
    """A run stopped before its second evaluation has curves of one point each, which a line alone
    does not draw (the PNG showed only the legend): they get markers."""
    pytest.importorskip("matplotlib", reason="loss.png is drawn only where matplotlib is installed")
    from matplotlib.figure import Figure
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"iter": 0, "train_loss": 3.3, "val_loss": 3.31}) + "\n", encoding="utf-8")
    saved, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    assert train._plot(str(metrics), str(tmp_path / "loss.png")) is None
    ((fig,),) = [saved]
    assert [line.get_marker() for line in fig.axes[0].lines] == ["o", "o"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_leaves_the_users_matplotlib_backend_and_figures_alone(corpus, tmp_path):
    """In a notebook, train() had switched the process to the Agg backend: the user's later plots
    stopped showing. The loss curve is drawn on a figure of its own."""
    plt = pytest.importorskip("matplotlib.pyplot", reason="loss.png is drawn only where matplotlib is installed")
    import matplotlib
    before = matplotlib.get_backend()
    plt.switch_backend("svg")                        # the user's choice, and a figure of theirs open
    fig = plt.figure()
    try:
        assert _train(corpus, tmp_path / "run", "--max-iters", "4") == 0
        assert (tmp_path / "run" / "loss.png").exists()
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [fig.number]
    finally:
        plt.close(fig)
        plt.switch_backend(before)


def test_eval_gives_an_infinite_perplexity_for_a_huge_finite_loss(trained, capsys):
    """e^loss overflows a float past ~709.8 nats: a diverging run can save such a checkpoint (only a
    loss that is not finite stops it), and minilm eval had failed with 'math range error'."""
    saved = checkpoint.load(trained / "last.npz")
    path = trained / "huge.npz"
    checkpoint.save(path, params=saved.params * 1e3, optimizer_state=saved.optimizer_state, meta=saved.meta)
    assert cli.main(["eval", "--checkpoint", str(path), "--backend", "numpy"]) == 0
    said = capsys.readouterr().out
    loss = float(said.split("loss ")[1].split(" nats")[0])
    assert loss > 710 and "perplexity inf," in said


def test_eval_of_a_contiguous_run_in_one_stream_says_one_stream(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(corpus, out, "--model", "lstm", "--batching", "contiguous", "--max-iters", "4") == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "last.npz"), "--batch-size", "1", "--backend", "numpy"]) == 0
    assert "in 1 stream, the state carried" in capsys.readouterr().out


def test_momentum_out_of_range_is_refused_as_an_option(corpus, tmp_path, capsys):
    err = _error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "o"), *TINY,
                          "--optimizer", "rmsprop", "--momentum", "1.5"])
    assert "minilm train: error: option '--momentum' must be in [0, 1), got 1.5" in err
    assert not (tmp_path / "o").exists()


def test_a_16_bit_run_resumed_on_a_cpu_is_told_where_it_can_go_on(trained, capsys):
    """A float16 run (trained on a GPU) cannot go on on a CPU backend, nor change its --dtype: the
    message says so, rather than advising float32, which --resume then refuses."""
    saved = checkpoint.load(trained / "last.npz")
    saved.meta["train_config"]["dtype"] = "float16"
    checkpoint.save(trained / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy"])
    assert (f"--resume: the run in {str(trained)!r} trains in float16, which only the cupy backend runs; "
            f"continue it with --backend cupy on a GPU") in err
    assert "use float32" not in err


# --- the run's folder ----------------------------------------------------------------------------

@pytest.mark.skipif(train.fcntl is None, reason="a run's folder is held with flock, which Windows has not")
def test_a_folder_in_use_by_another_run_is_refused(corpus, trained, capsys):
    """Two runs in one --out replace each other's checkpoints and interleave their metrics: while one
    holds the folder (another process, or here another hold in this one), a fresh run, a --resume
    and an --overwrite are all refused, and the files stay as they were."""
    files = {name: (trained / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    with train._RunFolder(trained) as held:
        held.hold()
        for extra in ([], ["--resume"], ["--overwrite"]):
            err = _error(capsys, ["train", "--data", corpus, "--out", str(trained), *TINY, "--max-iters", "8", *extra])
            assert f"option '--out' {str(trained)!r} is in use by another minilm train that is still running" in err
    assert files == {name: (trained / name).read_bytes() for name in files}
    assert _train(corpus, trained, "--max-iters", "8", "--resume") == 0     # free again once the hold ends


def test_a_missing_or_broken_last_npz_points_at_best_npz(corpus, trained, capsys):
    """best.npz is a whole resume point too: with last.npz gone or truncated, --resume and a fresh
    run's refusal say so, and the fresh run's refusal no longer offers --resume, which had just
    failed, nor --overwrite without saying that it replaces best.npz."""
    (trained / "last.npz").unlink()
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy"])
    assert "last.npz' does not exist" in err
    assert f"{trained / 'best.npz'} holds iteration 4 of the run" in err and "copy it to last.npz" in err
    err = _error(capsys, ["train", "--data", corpus, "--out", str(trained), *TINY, "--max-iters", "8"])
    assert "with no last.npz to continue from" in err and "continue it with --resume" not in err
    assert "copy it to last.npz" in err and "--overwrite to start afresh there (which replaces best.npz)" in err
    (trained / "last.npz").write_bytes((trained / "best.npz").read_bytes()[:100])
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy"])
    assert "is truncated or is not a minilm checkpoint" in err and "holds iteration 4 of the run" in err
    (trained / "last.npz").write_bytes((trained / "best.npz").read_bytes())
    assert cli.main(["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy",
                     "--no-progress"]) == 0


def test_a_loss_curve_that_cannot_be_written_stops_nothing(corpus, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="loss.png is drawn only where matplotlib is installed")
    from matplotlib.figure import Figure

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Figure, "savefig", refuse)
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "12") == 0
    assert [r["iter"] for r in _metrics(out)] == [0, 4, 8, 12]
    err = capsys.readouterr().err
    assert err.count(f"warning: could not write {out / 'loss.png'}: Permission denied; training goes on") == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.npz", "last.npz", "metrics.jsonl"]   # no temporary left


def test_a_metrics_file_that_cannot_be_appended_to_is_named(corpus, tmp_path, monkeypatch, capsys):
    import builtins

    def full_disk(path, mode="r", *args, **kwargs):
        if os.fspath(path).endswith("metrics.jsonl") and mode == "a":
            raise OSError(28, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)
    monkeypatch.setattr(train, "open", full_disk, raising=False)      # found before the builtin
    out = tmp_path / "run"
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "4"])
    assert f"could not append to {out / 'metrics.jsonl'}: No space left on device; nothing was saved yet" in err


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["train_config"].pop("block_size"), r"has no meta entry 'train_config.block_size'"),
    (lambda m: m.update(train_config=None), r"has no meta entry 'train_config.block_size'"),
    (lambda m: m["train_config"].update(batch_size=0), r"meta entry 'train_config.batch_size' must be a positive integer, got 0"),
    (lambda m: m.update(data=None), r"meta entry 'data' must be a string, got None"),
])
def test_eval_of_an_edited_checkpoint_names_the_file_and_the_entry(trained, capsys, edit, match):
    saved = checkpoint.load(trained / "last.npz")
    edit(saved.meta)
    path = trained / "edited.npz"
    checkpoint.save(path, params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    err = _error(capsys, ["eval", "--checkpoint", str(path), "--backend", "numpy"])
    assert f"'{path}'" in err and "Traceback" not in err
    assert re.search(match, err), err


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["train_config"].update(lr_warmup=10), r"meta entry 'train_config' must hold minilm train's settings; "
                                                       r"unknown: 'lr_warmup'"),
    (lambda m: m["train_config"].pop("batch_size"), r"missing: 'batch_size'"),
    (lambda m: m["train_config"].update(lr=-1.0), r"meta entry 'train_config' holds a setting minilm train refuses "
                                                  r"\(minilm train: option '--lr' must be a finite number > 0"),
    (lambda m: m.update(iter="4"), r"meta entry 'iter' must be an integer >= 0, got '4'"),
    (lambda m: m.update(best_val_loss=None), r"meta entry 'best_val_loss' must be a number >= 0 \(inf: nothing "
                                             r"evaluated yet\), got None"),
    # no evaluation can beat a best loss of -inf: best.npz would never be written again
    (lambda m: m.update(best_val_loss=float("-inf")), r"meta entry 'best_val_loss' must be a number >= 0"),
    (lambda m: m.update(elapsed_s=float("nan")), r"meta entry 'elapsed_s' must be a finite number >= 0, got nan"),
    (lambda m: m.update(elapsed_s=-5.0), r"meta entry 'elapsed_s' must be a finite number >= 0, got -5.0"),
    (lambda m: m.update(dropout_rng="x"), r"meta entry 'dropout_rng' must be a dictionary, got 'x'"),
    (lambda m: m.update(slices=0), r"meta entry 'slices' must be a positive integer, got 0"),
    (lambda m: m.update(threads="2"), r"meta entry 'threads' must be a positive integer or null, got '2'"),
])
def test_resume_of_an_edited_checkpoint_names_the_file_and_the_entry(trained, capsys, edit, match):
    saved = checkpoint.load(trained / "last.npz")
    edit(saved.meta)
    checkpoint.save(trained / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    metrics = (trained / "metrics.jsonl").read_bytes()
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--backend", "numpy"])
    assert f"'{trained / 'last.npz'}'" in err and "Traceback" not in err
    assert re.search(match, err), err
    assert (trained / "metrics.jsonl").read_bytes() == metrics


def test_eval_of_a_one_character_text_names_data(trained, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("t", encoding="utf-8")
    err = _error(capsys, ["eval", "--checkpoint", str(trained / "last.npz"), "--data", str(one), "--backend", "numpy"])
    assert f"split: option '--data' {str(one)!r} has 1 tokens, too few to split" in err
    assert "train_fraction" not in err


def _overflow_at_step_2(monkeypatch):
    """float16 on NumPy (it trains on the GPU only; the check that says so is lifted), with the
    gradients of the process's second step made to overflow."""
    from minilm.params import Params
    monkeypatch.setattr(train, "_require_dtype_runs_here", lambda *args, **kwargs: None)
    real, calls = Params.unscale_grads, []

    def overflow_once(self, factor):
        calls.append(1)
        return False if len(calls) == 2 else real(self, factor)
    monkeypatch.setattr(Params, "unscale_grads", overflow_once)


def test_a_float16_run_reports_its_skipped_steps_and_loss_scale(corpus, tmp_path, monkeypatch, capsys):
    """A float16 run skips a step whose gradients overflowed and halves its loss scale: metrics.jsonl
    and the log now say so (they had said nothing; only the checkpoint held the count). float16
    trains on the GPU only; the check that says so is lifted here to run the same loop on NumPy."""
    _overflow_at_step_2(monkeypatch)
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8", "--dtype", "float16") == 0
    rows = _metrics(out)
    assert [(r["iter"], r["skipped_steps"], r["loss_scale"]) for r in rows] == [(0, 0, 2.0 ** 16), (4, 1, 2.0 ** 15),
                                                                                 (8, 1, 2.0 ** 15)]
    said = capsys.readouterr().out
    assert "iter 4: train loss" in said and ", 1 step skipped (float16 overflow; loss scale now 32768)" in said
    assert said.count("skipped") == 1


@pytest.mark.skipif(train.fcntl is None, reason="a run's folder is held with flock, which Windows has not")
def test_a_filesystem_that_locks_no_folder_trains_with_a_warning(corpus, tmp_path, monkeypatch):
    """NFS, Lustre and some FUSE mounts fail flock on a folder with another error than 'held'
    (EWOULDBLOCK): there the run goes on unheld, and says so, rather than blaming another run."""
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"cannot be held on this filesystem \(No locks available\): a second "
                                         r"minilm train there would not be refused") as caught:
        assert _train(corpus, out, "--max-iters", "4") == 0
    assert len([w for w in caught if "cannot be held" in str(w.message)]) == 1 and [r["iter"] for r in _metrics(out)] == [0, 4]



def test_a_python_warning_reads_as_the_commands_own(tmp_path):
    """A warning from the library (here: a --data that is mostly NUL characters, as UTF-16 text
    reads) had reached the command line with Python's file path, line number and source line."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("ab \n"), 800)).replace("a", "a\0")      # a third NUL characters
    (tmp_path / "nul.txt").write_text(text, encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "minilm", "train", "--data", str(tmp_path / "nul.txt"), "--out",
                          str(tmp_path / "run"), *TINY, "--max-iters", "1"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "minilm train: warning: load_text: argument 'data' (--data) is " in run.stderr
    assert "NUL characters" in run.stderr and ".py:" not in run.stderr and "UserWarning" not in run.stderr

def test_a_resume_with_a_bad_option_says_only_the_error(trained, capsys):
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "-5", "--backend", "numpy"])
    assert "'--max-iters' must be an integer > 0, got -5" in err
    assert "keeps its length" not in capsys.readouterr().out
    with pytest.raises(TypeError, match=r"argument 'cfg' must be a TrainConfig, got dict"):
        train.train(dict(PY_TINY), data=None, out_dir=trained, resume=True, log=lambda line: None)


def test_a_resumed_schedule_without_a_length_says_nothing_of_its_length(corpus, tmp_path, capsys):
    """Only the cosine schedule has a length: a constant run resumed with a new --max-iters is told nothing of it."""
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", "--schedule", "constant", "--lr-decay-iters", "0") == 0
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8", "--backend", "numpy",
                     "--no-progress"]) == 0
    assert "keeps its length" not in capsys.readouterr().out


def test_a_folder_of_metrics_alone_is_refused_without_naming_best_npz(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("", encoding="utf-8")
    err = _error(capsys, ["train", "--data", corpus, "--out", str(out), *TINY, "--max-iters", "4"])
    assert "already holds a run (metrics.jsonl) with no last.npz" in err and "best.npz" not in err


def test_only_a_contiguous_run_saves_a_recurrent_state(corpus, tmp_path):
    """Random batches start every window from zeros: the last batch's final state is nothing a
    resumed run uses, and had been saved (and loaded) all the same."""
    for batching, kept in (("random", False), ("contiguous", True)):
        out = tmp_path / batching
        assert _train(corpus, out, "--model", "lstm", "--batching", batching, "--max-iters", "4") == 0
        assert (checkpoint.load(out / "last.npz").meta["rnn_state"] is not None) == kept, batching


def test_a_log_file_gets_no_progress_bar(corpus, tmp_path, capsys, monkeypatch):
    argv = ["train", "--data", corpus, "--out", str(tmp_path / "run"), "--max-iters", "4",
            *[a for a in TINY if a != "--no-progress"]]
    assert cli.main(argv) == 0
    assert "\r" not in capsys.readouterr().err              # capsys's stderr, like a log file, is not a terminal
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)
    assert cli.main(argv + ["--overwrite"]) == 0
    assert "\r" in capsys.readouterr().err                  # on a terminal, the bar is drawn


def test_a_misspelt_option_is_named_by_its_command_with_the_nearest(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--max-itres", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: minilm train") and "did you mean --max-iters?" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--bogus", "train"])                  # before the command: minilm's, with nothing to suggest
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: minilm [") and "did you mean" not in err


def test_a_tilde_after_an_equals_sign_is_the_home_folder(trained, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(trained))                 # the shell expands ~/x, not --checkpoint=~/x
    assert cli.main(["sample", "--checkpoint=~/last.npz", "--prompt", "to", "--max-new-tokens", "3",
                     "--backend", "numpy"]) == 0


def test_ctrl_c_while_the_backend_loads_stops_without_a_traceback(monkeypatch, capsys):
    from minilm import backend

    def interrupted(name):
        raise KeyboardInterrupt                                  # Ctrl-C while Numba imports
    monkeypatch.setattr(backend, "use", interrupted)
    assert cli.main(["eval", "--checkpoint", "x.npz"]) == 130
    assert capsys.readouterr().err.strip() == "minilm eval: interrupted"


def test_a_nan_loss_has_a_nan_perplexity():
    import math
    from minilm.evaluate import _result
    assert math.isnan(_result(math.nan, 10)["perplexity"])


def test_version_names_the_installed_minilm(capsys):
    import importlib.metadata
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"minilm {importlib.metadata.version('minilm')}"
    run = subprocess.run([sys.executable, "-m", "minilm", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"minilm {importlib.metadata.version('minilm')}"  # = `minilm`


def test_bench_does_not_start_the_environments_backend(monkeypatch):
    """bench measures the backends its --backends names; MINILM_BACKEND=cupy on a machine without
    CuPy had refused `minilm bench --backends numpy` before it began."""
    from minilm import backend
    from minilm.bench import run as bench_run
    started = []
    monkeypatch.setattr(backend, "use", lambda name: started.append(name))
    monkeypatch.setattr(bench_run, "benchmark", lambda args: None)
    monkeypatch.setenv("MINILM_BACKEND", "cupy")
    assert cli.main(["bench", "--backends", "numpy"]) == 0
    assert "cupy" not in started


def test_the_compile_notice_goes_where_it_is_told(monkeypatch):
    """train passes its progress bar's write, so that the notice lands above the bar, not inside it."""
    from minilm import backend
    monkeypatch.setattr(backend, "current", lambda: "numba")
    lines = []
    with backend.compile_notice(seconds=0.01, write=lines.append):
        time.sleep(0.5)                           # longer than the notice's delay: it is said
    assert lines == ["numba: compiling kernels on first use (cached on disk; later runs start at once)..."]


def test_an_edited_checkpoint_that_cannot_be_rebuilt_is_named(trained, tmp_path, capsys):
    """A checkpoint's entries are checked as a model is rebuilt from them; the message had named only
    the check (`Params.load: argument 'flat' ...`), not the file it came from."""
    saved = checkpoint.load(trained / "last.npz")
    path = tmp_path / "edited.npz"
    checkpoint.save(path, params=saved.params[:-1], optimizer_state=None, meta=saved.meta)
    assert cli.main(["sample", "--checkpoint", str(path), "--max-new-tokens", "2", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert f"load_model: '{path}': its entry 'params' has shape (" in err


def test_a_prompt_byte_that_is_not_utf8_is_named_as_a_byte(trained, capsys):
    """A shell passes a byte that is not UTF-8 as a lone surrogate (U+DCFF for 0xff): it is named as the byte."""
    prompt = b"to\xff".decode("utf-8", errors="surrogateescape")
    assert cli.main(["sample", "--checkpoint", str(trained / "last.npz"), "--prompt", prompt,
                     "--max-new-tokens", "2", "--backend", "numpy"]) == 2
    assert "byte 0xff, which is not UTF-8" in capsys.readouterr().err


def test_a_float16_run_resumes_with_its_loss_scale(corpus, tmp_path, monkeypatch):
    """A resumed float16 run goes on with the loss scale and skip count it saved, not 2^16 and 0."""
    _overflow_at_step_2(monkeypatch)
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "4", "--dtype", "float16") == 0
    assert _train(corpus, out, "--max-iters", "8", "--dtype", "float16", "--resume") == 0
    rows = _metrics(out)
    assert [(r["iter"], r["skipped_steps"], r["loss_scale"]) for r in rows] == [(0, 0, 2.0 ** 16), (4, 1, 2.0 ** 15),
                                                                                 (8, 1, 2.0 ** 15)]


def test_a_recurrent_run_starts_from_zeros_when_the_streams_begin_the_text_again(corpus, tmp_path, monkeypatch):
    """Contiguous batches wrap to the start of the text every n_chunks steps: the carried state is
    dropped there (it belongs to the text's end), and only there."""
    real, starts = train.TrainStep.__call__, []

    def record(self, x, y, lr, *, rng, state=None):
        starts.append(state is None)
        return real(self, x, y, lr, rng=rng, state=state)
    monkeypatch.setattr(train.TrainStep, "__call__", record)
    from minilm.data import ContiguousBatches
    seen = []
    real_init = ContiguousBatches.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append(self)
    monkeypatch.setattr(ContiguousBatches, "__init__", keep)
    out = tmp_path / "run"
    assert _train(corpus, out, "--model", "lstm", "--batching", "contiguous", "--batch-size", "16",
                  "--block-size", "64", "--max-iters", "14", "--eval-interval", "14") == 0
    n_chunks = seen[0].n_chunks
    assert 1 < n_chunks < 14
    assert starts == [i % n_chunks == 0 for i in range(14)]


def test_eval_scores_the_split_asked_for(corpus, trained, capsys):
    from minilm.data import CharTokenizer, split
    text = open(corpus, encoding="utf-8").read()
    train_ids, val_ids = split(CharTokenizer.from_text(text).encode(text), 0.9)
    for which, ids in (("train", train_ids), ("val", val_ids)):
        assert cli.main(["eval", "--checkpoint", str(trained / "last.npz"), "--split", which,
                         "--backend", "numpy"]) == 0
        out = capsys.readouterr().out
        assert f"on the {which} split" in out and f"{len(ids) - 1:,} characters" in out, out


def test_sample_text_and_minilm_sample_default_to_temperature_0_8(trained, capsys):
    from minilm.sample import sample_text
    path = str(trained / "last.npz")
    default = "".join(sample_text(path, "to", 40, seed=1))
    assert default == "".join(sample_text(path, "to", 40, seed=1, temperature=0.8))
    assert default != "".join(sample_text(path, "to", 40, seed=1, temperature=1.0))
    assert cli.main(["sample", "--checkpoint", path, "--prompt", "to", "--max-new-tokens", "40", "--seed", "1",
                     "--backend", "numpy"]) == 0
    assert capsys.readouterr().out == "to" + default + "\n"


# --- kill tests from the mutation run of the training loop (.dev/review/mutation-train.md) ---

def test_tokens_per_s_is_the_tokens_of_the_steps_since_the_last_evaluation_over_their_time(corpus, tmp_path,
                                                                                          monkeypatch):
    """Step i is made to take 10 (i + 1) s on the clock. tokens_per_s at 4 is 3 steps of 64 tokens
    (step 0, which compiles, left out) over 20 + 30 + 40 s; at 8 the 4 steps since then over
    50 + ... + 80 s (not the run's average since its start); elapsed_s is the run's clock."""
    offset, real, steps = [0.0], time.perf_counter, []
    monkeypatch.setattr(train.time, "perf_counter", lambda: real() + offset[0])
    real_call = train.TrainStep.__call__

    def slow(self, *args, **kwargs):
        steps.append(1)
        offset[0] += 10.0 * len(steps)
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(train.TrainStep, "__call__", slow)
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-iters", "8") == 0
    rows = _metrics(out)
    assert rows[0]["tokens_per_s"] is None
    # rel 1e-3 and 5 s: the steps' real time (milliseconds) and the evaluations' beside the fake 10 s units
    assert rows[1]["tokens_per_s"] == pytest.approx(3 * 64 / 90, rel=1e-3)
    assert rows[2]["tokens_per_s"] == pytest.approx(4 * 64 / 260, rel=1e-3)
    assert rows[2]["elapsed_s"] == pytest.approx(360, abs=5)


def test_the_optimizer_steps_on_the_clipped_gradient(corpus, tmp_path, monkeypatch):
    """Clipping comes before the update: the gradient the optimizer reads has a norm of at most
    --grad-clip (tiny here, so that every step clips)."""
    norms, real_step = [], optim.AdamW.step
    monkeypatch.setattr(optim.AdamW, "step",
                        lambda self, lr=None: norms.append(float(np.linalg.norm(self.params.grad))) or real_step(self, lr))
    cfg = TrainConfig(**dict(PY_TINY, grad_clip=1e-3))
    train.train(cfg, data=corpus, out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_presets_schedule_keeps_its_length_when_max_iters_is_cut(name):
    """--lr-decay-iters is the preset's own (its iteration count), so `--max-iters 500` with a preset
    stops the run early without squeezing the cosine into 500 iterations (the README's own-text
    example gives --lr-decay-iters 0 for that)."""
    cfg = dataclasses.replace(config.preset(name), max_iters=500)
    assert cfg.schedule_length() == RECIPES[name]["max_iters"]


def test_trainconfig_defaults_are_the_cpu_presets_but_for_bias_and_the_schedule_length():
    """A TrainConfig built in Python starts from the same recipe as `minilm train` (nanoGPT's CPU
    run), except bias (the model's default, True) and lr_decay_iters (0: the run's max_iters)."""
    assert TrainConfig() == dataclasses.replace(config.preset("shakespeare-char-cpu"), bias=True, lr_decay_iters=0)


def test_evaluate_with_a_stream_per_character_predicts_each_from_zeros():
    """With batch_size >= the characters to predict, each stream is one prediction from a zero
    state: the same as windows of one character."""
    from minilm.evaluate import evaluate
    from minilm.models import RNNLM, RNNConfig
    model = RNNLM(RNNConfig(vocab_size=11, cell="lstm", n_layer=1, hidden_size=8, n_embd=4), dtype=np.float64, seed=0)
    ids = np.random.default_rng(0).integers(0, 11, 6)
    streams = evaluate(model, ids, block_size=8, batch_size=8, carry_state=True)
    windows = evaluate(model, ids, block_size=1, batch_size=8)
    assert streams["characters"] == windows["characters"] == 5
    assert streams["loss"] == pytest.approx(windows["loss"], rel=1e-12)      # float64, one sum grouped otherwise


# the rest of each recipe: what `minilm train --preset NAME` trains with besides the sizes above
# (the LSTM's 1.60 and the PyTorch peer's numbers in bench/RESULTS.md were measured with these)
RECIPE_RUNS = {
    "shakespeare-char-cpu": dict(lr_decay_iters=2000, eval_interval=250, eval_iters=100),
    "shakespeare-char": dict(lr_decay_iters=5000, eval_interval=250, eval_iters=200),
    "shakespeare-lstm": dict(dropout=0.0, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                             lr_decay_iters=2000, eval_interval=250, eval_iters=100),
    "shakespeare-gru": dict(dropout=0.0, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                            lr_decay_iters=2000, eval_interval=250, eval_iters=100),
}


@pytest.mark.parametrize("name", list(RECIPE_RUNS))
def test_each_presets_run_settings(name):
    cfg = config.preset(name)
    assert {key: getattr(cfg, key) for key in RECIPE_RUNS[name]} == RECIPE_RUNS[name]


def test_estimate_loss_is_the_mean_over_its_batches():
    class Scripted:                                     # batch k has loss k**2: mean 5/3, median 1
        def forward(self, x, y):
            return None, np.float64(float(x[0, 0]) ** 2)
    batches = [(np.full((1, 2), k), np.zeros((1, 2), dtype=np.int64)) for k in range(3)]
    assert train.estimate_loss(Scripted(), batches) == pytest.approx(5 / 3, rel=1e-15)   # (0 + 1 + 4) / 3, one rounding


def test_a_resumed_run_holds_no_arrays_of_the_checkpoint_it_resumed_from(trained, monkeypatch):
    """--resume copies last.npz's weights and moments into the model and the optimiser; the arrays
    read from the file had stayed referenced for the rest of the run, three more copies of the
    parameters for AdamW (630 MiB more for a model of 50M parameters)."""
    import gc
    import weakref
    loaded, load = [], checkpoint.load

    def recording_load(*args, **kwargs):
        ckpt = load(*args, **kwargs)
        arrays = [ckpt.params, *(v for v in ckpt.optimizer_state.values() if isinstance(v, np.ndarray))]
        loaded.extend(weakref.ref(a) for a in arrays)
        return ckpt

    monkeypatch.setattr(checkpoint, "load", recording_load)
    alive = []

    def log(line):
        if line.startswith("iter "):                    # an evaluation, inside the training loop
            gc.collect()
            alive.append(sum(ref() is not None for ref in loaded))

    cfg = dataclasses.replace(train.saved_config(trained), max_iters=8)
    train.train(cfg, data=None, out_dir=trained, resume=True, progress=False, log=log)
    assert loaded and alive == [0], alive


def _tiny_run_in_four_slices(monkeypatch):
    """A tiny GPT's settings, on the numba backend with 8 Numba threads (faked): its batch of 4 rows
    runs in min(8, 4) = 4 slices. The corpus fixture has 16 distinct characters."""
    import minilm
    minilm.use("numba")
    monkeypatch.setattr(train, "_numba_threads", lambda: 8)
    return config.validate(dataclasses.replace(config.preset("shakespeare-char-cpu"), n_layer=1, n_head=2,
                                               n_embd=16, block_size=16, batch_size=4, eval_iters=2))


def test_the_memory_estimate_counts_the_gradient_buffer_of_every_slice(corpus, tmp_path, capsys, monkeypatch):
    """On the numba backend a batch runs in one slice per thread, each slice's backward into a
    gradient buffer of its own (minilm.parallel): (slices - 1) more copies of the parameters, which
    the estimate left out (a 50M-parameter GPT: 3.3 GiB measured with 8 threads, estimated 0.9 GiB),
    so a run that a many-core machine cannot hold was not refused."""
    from minilm.models import build_model, param_count
    from minilm.parallel import BatchParallel
    cfg = config.preset("shakespeare-char-cpu")
    n = param_count(*train.model_settings(cfg, 65))
    runner = BatchParallel(build_model(*train.model_settings(cfg, 65)), 4)
    extra = sum(r.params.grad.nbytes for r in runner._replicas if r.params is not runner.model.params)
    assert extra == 3 * n * 4
    assert train.memory_estimate(cfg, 65, slices=4) - train.memory_estimate(cfg, 65) == extra
    # and minilm train counts its slices: a machine that holds one slice's run but not four's refuses it
    tiny = _tiny_run_in_four_slices(monkeypatch)
    monkeypatch.setattr(train, "_physical_memory", lambda: train.memory_estimate(tiny, 16) + 1)
    with pytest.raises(ValueError, match="this run needs about"):
        train.train(tiny, data=corpus, out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    assert not (tmp_path / "run" / "last.npz").exists()


def _count_drawings(monkeypatch):
    """The rows of metrics.jsonl at each drawing of loss.png, drawn by growth only (no minute's redraw)."""
    drawn = []
    monkeypatch.setattr(train, "_plot", lambda metrics, png: drawn.append(len(_metrics(os.path.dirname(metrics)))))
    monkeypatch.setattr(train, "PLOT_EVERY_S", float("inf"))
    return drawn


def test_a_run_of_many_evaluations_draws_its_loss_curve_a_bounded_number_of_times(corpus, tmp_path, monkeypatch):
    """A drawing of loss.png reads and draws every row of metrics.jsonl (55 ms, and 3.5 us a row).
    Drawn at every evaluation, 2000 evaluations of a tiny GPT took 146 s where its training took 11 s,
    and the cost grew with the square of the evaluations (100 000 of them: hours). It is drawn when
    the curve has grown by an eighth (or a minute has passed), and always at the last evaluation."""
    drawn = _count_drawings(monkeypatch)
    assert _train(corpus, tmp_path / "run", "--max-iters", "200", "--eval-interval", "1",
                  "--lr-decay-iters", "300") == 0
    assert len(_metrics(tmp_path / "run")) == 201
    assert drawn[-1] == 201 and drawn == sorted(set(drawn))    # the last evaluation drawn, each drawing newer
    assert len(drawn) <= 40, len(drawn)


@pytest.mark.parametrize("ending", ["a loss that is not finite", "Ctrl-C"])
def test_a_session_that_ends_between_two_drawings_draws_its_last_evaluations(corpus, tmp_path, monkeypatch, ending):
    """loss.png is drawn when the curve has grown by an eighth; a session that ends between two such
    drawings (here after its 29th evaluation, the last drawing having been at the 26th) still draws
    the evaluations up to its end: a diverged run's are the ones its user looks at."""
    drawn = _count_drawings(monkeypatch)
    if ending == "Ctrl-C":
        _signal_in_step(monkeypatch, signal.SIGINT, 28)         # saved and drawn after the evaluation at 28
    else:
        calls, estimate = [], train.estimate_loss

        def diverging(runner, batches):                         # the 30th evaluation's loss is NaN
            calls.append(None)
            return float("nan") if len(calls) > 2 * 29 else estimate(runner, batches)
        monkeypatch.setattr(train, "estimate_loss", diverging)
    code = _train(corpus, tmp_path / "run", "--max-iters", "200", "--eval-interval", "1", "--lr-decay-iters", "300")
    assert code == (130 if ending == "Ctrl-C" else 2)
    assert len(_metrics(tmp_path / "run")) == 29 and drawn[-1] == 29, drawn


def test_a_run_refused_for_the_gradient_buffers_of_its_slices_is_told_of_the_thread_count(corpus, tmp_path,
                                                                                          monkeypatch):
    """On the numba backend every slice of the batch holds a gradient buffer of its own, one slice a
    Numba thread: where a run fits with fewer threads, the refusal names NUMBA_NUM_THREADS, not
    only the model's sizes."""
    tiny = _tiny_run_in_four_slices(monkeypatch)
    monkeypatch.setattr(train, "_physical_memory", lambda: train.memory_estimate(tiny, 16, slices=2))
    with pytest.raises(ValueError, match=r"or fewer Numba threads, each of which holds a gradient buffer of its own "
                                         r"\(minilm\.parallel\): NUMBA_NUM_THREADS=2 \(the batch is cut into 4 "
                                         r"slices now\)$"):
        train.train(tiny, data=corpus, out_dir=tmp_path / "run", progress=False, log=lambda line: None)


def test_a_resumed_run_refused_for_memory_is_not_told_to_give_smaller_sizes(trained, capsys, monkeypatch):
    """--resume refuses another size, so a resumed run that this machine cannot hold is told to resume
    on a machine with more memory or to train a new run with smaller sizes, and nothing is written."""
    before = {name: (trained / name).read_bytes() for name in ("last.npz", "best.npz", "metrics.jsonl")}
    monkeypatch.setattr(train, "_physical_memory", lambda: 1024)
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"])
    assert "--resume: this run needs about" in err and "GiB of memory and this machine has 0.0 GiB" in err, err
    assert (f"its sizes are those saved in {trained / 'last.npz'}, which --resume cannot change: resume it on a "
            "machine with more memory, or train a new run in another --out with smaller sizes: --n-layer") in err, err
    assert {name: (trained / name).read_bytes() for name in before} == before


def test_a_newer_runs_best_npz_is_not_offered_as_a_resume_point(trained, capsys):
    """A run of a newer minilm whose last.npz is cut short: its best.npz is newer too, and --resume
    refuses it once copied to last.npz, so the error about last.npz does not offer it."""
    _as_saved_by_a_newer_minilm(trained)
    with open(trained / "last.npz", "r+b") as f:
        f.truncate(1000)
    err = _error(capsys, ["train", "--out", str(trained), "--resume", "--max-iters", "8", "--no-progress"])
    assert "is truncated or is not a minilm checkpoint" in err and "copy it to last.npz" not in err, err


def test_a_run_that_raises_closes_its_progress_bar(corpus, tmp_path, monkeypatch):
    """A bar left open by an error stays in tqdm's list while the traceback holds it (a notebook keeps the
    last one), and every later run's bar is drawn one line below it, with the dead bar drawn again."""
    from tqdm import tqdm

    monkeypatch.setattr(train, "estimate_loss", lambda model, batches: float("nan"))
    bars = set(tqdm._instances)
    with pytest.raises(FloatingPointError) as raised:            # held, as IPython holds sys.last_traceback
        train.train(TrainConfig(**PY_TINY), data=corpus, out_dir=tmp_path / "run", progress=True,
                    log=lambda line: None)
    assert raised.value.__traceback__ is not None
    assert set(tqdm._instances) == bars


# ---------------------------------------------------------------------------------------------
# the output stream: closed, full, in an encoding short of a file name; a closed stderr


class _FullDisk(io.StringIO):
    """An output whose text is held until it is flushed, as a file's is, and then cannot be written."""
    failing = True

    def flush(self):
        if self.failing:
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_closed_stdout_is_a_one_line_error(trained, capsys, monkeypatch, command):
    monkeypatch.setattr(sys, "stdout", None)                        # minilm ... >&-
    argv = ["sample", "--checkpoint", str(trained / "last.npz"), "--max-new-tokens", "5"] if command == "sample" \
        else ["eval", "--checkpoint", str(trained / "last.npz")]
    assert cli.main([*argv, "--backend", "numpy"]) == 2
    assert f"minilm {command}: error: could not write the output: stdout is closed" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_named(trained, capsys, monkeypatch):
    full = _FullDisk()
    monkeypatch.setattr(sys, "stdout", full)                        # minilm eval ... > /dev/full
    assert cli.main(["eval", "--checkpoint", str(trained / "last.npz"), "--backend", "numpy"]) == 2
    full.failing = False
    assert ("minilm eval: error: could not write the output (stdout): No space left on device"
            in capsys.readouterr().err)


def test_a_log_line_naming_a_file_the_output_cannot_encode_is_escaped(corpus, tmp_path, capsys, monkeypatch):
    accented = tmp_path / "corpus é.txt"
    accented.write_text(open(corpus, encoding="utf-8").read(), encoding="utf-8")
    log = io.TextIOWrapper(io.BytesIO(), encoding="ascii")          # PYTHONIOENCODING=ascii, LC_ALL=POSIX
    monkeypatch.setattr(sys, "stdout", log)
    assert _train(str(accented), tmp_path / "run ü", "--max-iters", "4") == 0
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run ü" / "best.npz"), "--backend", "numpy"]) == 0
    log.flush()
    text = log.buffer.getvalue().decode("ascii")
    assert "from text file " + str(tmp_path / "corpus \\xe9.txt") in text and "run \\xfc/best.npz" in text
    assert "error" not in capsys.readouterr().err


def test_a_closed_stderr_keeps_the_errors_out_of_the_output(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)                        # minilm sample ... > text.txt 2>&-
    assert cli.main(["sample", "--checkpoint", str(trained / "last.npz"), "--top-k", "0",
                     "--backend", "numpy"]) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_an_error_naming_a_file_with_control_characters_stays_one_line(tmp_path, capsys, command):
    odd = str(tmp_path / "no\nsuch\x1b[31m\u202efile")              # a newline, a terminal escape, an RLO
    option = ["--data", odd, "--out", str(tmp_path / "o"), *TINY] if command == "train" else ["--checkpoint", odd]
    error = _error(capsys, [command, *option]).split(f"minilm {command}: error: ")[1]
    assert error.count("\n") == 1 and "\x1b" not in error and "\u202e" not in error
    assert "no\\nsuch\\x1b[31m\\u202efile" in error


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_an_error_after_output_to_a_full_disk_keeps_its_own_exit_code(corpus, tmp_path):
    """A run that fails (its loss diverges) after it printed into an output that cannot be written exits 2
    with its own error, not 120 with Python's 'Exception ignored' when the exit flushes the output."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "minilm.cli", "train", "--data", corpus, "--out",
                               str(tmp_path / "run"), *TINY, "--max-iters", "40", "--lr", "1e6", "--grad-clip", "0"],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert "the training loss became nan" in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert done.returncode == 2


def test_a_ctrl_c_while_the_command_exits_prints_no_traceback(corpus, tmp_path):
    """Ctrl-C just after a run has ended (its checkpoints saved) lands in the interpreter's exit, in
    tqdm's or the thread pools' finalizers: it ends the process as the signal does (the shell says
    130), where Python printed a KeyboardInterrupt traceback from the finalizer."""
    code = ("import atexit, os, runpy, signal, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(2)))   # Ctrl-C at exit\n"
            "runpy.run_module('minilm', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code, "train", "--data", corpus, "--out", str(tmp_path / "run"),
                          *TINY, "--max-iters", "2"], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert run.returncode == -signal.SIGINT
    assert checkpoint.load(tmp_path / "run" / "last.npz").meta["iter"] == 2


def _limited_minilm(limit):
    """Python code for ``python -c`` that runs the minilm command (its arguments after the code) with
    files limited to ``limit`` bytes, as a full disk limits them (the write that crosses the limit
    fails with EFBIG, after writing what fits). Set in the child itself: preexec_fn is not safe in a
    process with threads, as pytest's may be."""
    return ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            "sys.argv = ['minilm', *sys.argv[1:]]; runpy.run_module('minilm.cli', run_name='__main__')")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file-size limits (RLIMIT_FSIZE)")
def test_a_metrics_line_cut_short_by_a_full_disk_is_taken_back_and_the_error_stays_clear(trained):
    """A full disk can cut metrics.jsonl's new line in two (here a file-size limit does, which fails the
    write with EFBIG as a full disk does with ENOSPC, after writing what fits). The half line is taken
    back and the error names the file; loss.png's last drawing read the half line, and its JSON error
    ('Expecting ...') replaced the one that said what happened."""
    metrics = trained / "metrics.jsonl"
    rows = metrics.read_text().splitlines(keepends=True)         # iterations 0 and 4
    limit = 256 * 1024                                           # above a checkpoint's and loss.png's sizes
    text = "".join(rows * ((limit - 1000) // len("".join(rows))))
    text += rows[0].rstrip("\n") + " " * (limit - 50 - len(text) - len(rows[0])) + "\n"    # JSON allows the spaces
    metrics.write_text(text)
    assert metrics.stat().st_size == limit - 50                  # the next row, some 180 bytes, does not fit
    before = metrics.read_bytes()
    assert (trained / "last.npz").stat().st_size < limit

    run = subprocess.run([sys.executable, "-c", _limited_minilm(limit), "train", "--out", str(trained), "--resume",
                          "--max-iters", "8", "--backend", "numpy", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 2
    assert (f"minilm train: error: could not append to {metrics}: File too large; {trained / 'last.npz'} keeps "
            f"iteration 4") in run.stderr
    assert metrics.read_bytes() == before                        # whole lines only
    assert checkpoint.load(trained / "last.npz").meta["iter"] == 4


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file-size limits (RLIMIT_FSIZE)")
def test_a_first_metrics_line_that_cannot_be_written_leaves_no_run_behind(corpus, tmp_path):
    """A fresh run whose first metrics line does not fit (a full disk; here a file-size limit, set in
    the child before minilm starts) says that nothing was saved yet, and leaves nothing: the empty
    metrics.jsonl its append had made was refused as "a run" by the retry once the disk had room."""
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", _limited_minilm(100), "train", "--data", corpus, "--out", str(out), *TINY,
                          "--max-iters", "4"], capture_output=True, text=True)
    assert run.returncode == 2
    assert f"could not append to {out / 'metrics.jsonl'}: File too large; nothing was saved yet" in run.stderr
    assert os.listdir(out) == []
    assert _train(corpus, out, "--max-iters", "4") == 0                 # the retry, with room
