"""Hostile and damaged files: a checkpoint, a text or a run folder from elsewhere gets an error that
names the file, and is never followed into a user's files, allocated from its say-so, or waited on."""
import io
import json
import os
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

from minilm import checkpoint, cli, data, evaluate, train
from minilm.data import CharTokenizer

pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py


def _saved(path, meta=None):
    """A small checkpoint at ``path``; its members as {name: bytes}."""
    meta = meta or {"tokenizer": CharTokenizer.from_text("ab").to_dict()}
    checkpoint.save(path, params=np.zeros(8, np.float32), optimizer_state={"m": np.zeros(8, np.float32)}, meta=meta)
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def _rewrite(path, members, compress=None):
    """Write ``members`` ({name: bytes}) as the zip at ``path``; ``compress`` {name: True} deflates those."""
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw, compress_type=zipfile.ZIP_DEFLATED if (compress or {}).get(name) else zipfile.ZIP_STORED)


def _npy(header, payload=b""):
    """A .npy member whose header says ``header`` whatever ``payload`` holds."""
    text = repr(header).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def _with_member(tmp_path, name, raw, compress=False):
    """A small checkpoint whose member ``name`` holds ``raw`` (deflated with ``compress``)."""
    path = tmp_path / "c.npz"
    members = _saved(path)
    members[name] = raw
    _rewrite(path, members, compress={name: compress})
    return path


def test_a_member_declaring_a_huge_shape_is_refused_before_it_is_allocated(tmp_path):
    path = _with_member(tmp_path, "params.npy", _npy({"descr": "<f4", "fortran_order": False, "shape": (10**12,)},
                                                     b"\0" * 64))
    with pytest.raises(ValueError, match=r"c\.npz.*'params\.npy' declares shape \(1000000000000,\)"):
        checkpoint.load(path)


def test_a_member_that_inflates_a_thousandfold_is_refused(tmp_path):
    n = 4 << 20                                                  # 16 MiB of zeros, deflated to some 16 KiB
    path = _with_member(tmp_path, "params.npy", _npy({"descr": "<f4", "fortran_order": False, "shape": (n,)},
                                                     bytes(4 * n)), compress=True)
    with pytest.raises(ValueError, match=r"c\.npz.*'params\.npy' inflates from"):
        checkpoint.load(path)


def test_a_checkpoint_nested_too_deep_is_named(tmp_path):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array("[" * 100_000 + "]" * 100_000))
    path = _with_member(tmp_path, "meta.npy", buffer.getvalue())
    with pytest.raises(ValueError, match=r"c\.npz.*unreadable JSON"):
        checkpoint.load(path)


def test_numpys_header_error_is_one_line(tmp_path):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (8,), " + " " * 20_000 + "}"
    path = _with_member(tmp_path, "params.npy", _npy(header, bytes(32)))
    with pytest.raises(ValueError, match=r"c\.npz") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and "allow_pickle" not in str(e.value)


def _fifo_with_a_writer(path, text):
    """A FIFO at ``path`` that a thread writes ``text`` into once it is opened; returns a function that
    unblocks and joins the thread (the reader never came: opened and closed here)."""
    os.mkfifo(path)

    def write():
        try:
            with open(path, "wb") as f:
                f.write(text)
        except BrokenPipeError:
            pass
    thread = threading.Thread(target=write, daemon=True)
    thread.start()

    def done():
        if thread.is_alive():
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)
    return done


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_checkpoint_that_is_a_fifo_is_refused_without_waiting_on_it(tmp_path):
    path = tmp_path / "c.npz"
    done = _fifo_with_a_writer(path, b"PK\x03\x04 not a zip")
    try:
        with pytest.raises(ValueError, match=r"c\.npz' is a FIFO"):
            checkpoint.load(path)
    finally:
        done()


def test_a_text_too_large_for_the_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "text"
    path.write_text("hello world\n" * 100)
    monkeypatch.setattr(data, "physical_memory", lambda: 1000)
    with pytest.raises(ValueError, match="this machine has"):
        data.load_text(str(path))


def test_a_model_larger_than_its_saved_parameters_is_not_built(tmp_path):
    path = tmp_path / "c.npz"
    config = {"vocab_size": 2, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 10**7, "dropout": 0.0,
              "bias": False}                                   # some 1.2e15 parameters: petabytes
    _saved(path, {"model": {"kind": "gpt", "config": config, "dtype": "float32"},
                  "tokenizer": CharTokenizer.from_text("ab").to_dict()})
    with pytest.raises(ValueError, match=r"c\.npz.*shape \(8,\).*parameters"):
        evaluate.load_model(str(path))


ROWS = "".join(json.dumps({"iter": i, "train_loss": 1.0, "val_loss": 1.0}) + "\n" for i in (0, 10, 20))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_dropping_metrics_rows_writes_through_no_link(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's notes\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(ROWS)
    os.symlink(notes, run / "metrics.jsonl.tmp")
    kept = train._keep_metrics_up_to(str(run / "metrics.jsonl"), 10)
    assert [row["iter"] for row in kept] == [0, 10]
    assert notes.read_text() == "a user's notes\n"
    assert not os.path.islink(run / "metrics.jsonl")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_linked_metrics_file_is_replaced_by_a_copy_before_the_run_appends(tmp_path):
    other = tmp_path / "other-run-metrics.jsonl"            # another run's metrics, every row of them kept
    other.write_text(ROWS)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(other, run / "metrics.jsonl")
    kept = train._keep_metrics_up_to(str(run / "metrics.jsonl"), 20)
    assert [row["iter"] for row in kept] == [0, 10, 20]
    assert not os.path.islink(run / "metrics.jsonl")
    train._append_metrics(str(run / "metrics.jsonl"), {"iter": 30, "train_loss": 1.0, "val_loss": 1.0},
                          str(run / "last.npz"), 20)
    assert other.read_text() == ROWS
    assert (run / "metrics.jsonl").read_text().splitlines()[-1].startswith('{"iter": 30')


@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links here")
def test_a_hard_linked_metrics_file_is_replaced_by_a_copy_before_the_run_appends(tmp_path):
    other = tmp_path / "other-run"                          # a run copied with `cp -al`: the same file, two names
    other.mkdir()
    (other / "metrics.jsonl").write_text(ROWS)
    run = tmp_path / "run"
    run.mkdir()
    os.link(other / "metrics.jsonl", run / "metrics.jsonl")
    kept = train._keep_metrics_up_to(str(run / "metrics.jsonl"), 20)     # every row kept
    assert [row["iter"] for row in kept] == [0, 10, 20]
    train._append_metrics(str(run / "metrics.jsonl"), {"iter": 30, "train_loss": 1.0, "val_loss": 1.0},
                          str(run / "last.npz"), 20)
    assert (other / "metrics.jsonl").read_text() == ROWS
    assert (run / "metrics.jsonl").read_text().splitlines()[-1].startswith('{"iter": 30')


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_metrics_link_to_nothing_is_removed_before_the_run_appends(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(tmp_path / "gone" / "metrics.jsonl", run / "metrics.jsonl")     # its target moved away
    assert train._keep_metrics_up_to(str(run / "metrics.jsonl"), 20) == []
    train._append_metrics(str(run / "metrics.jsonl"), {"iter": 30, "train_loss": 1.0, "val_loss": 1.0},
                          str(run / "last.npz"), 20)        # before: 'could not append ... No such file or directory'
    assert not os.path.islink(run / "metrics.jsonl") and not (tmp_path / "gone").exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_fresh_run_replaces_a_metrics_link_to_nothing(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be that is the question\n" * 40)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(elsewhere / "metrics.jsonl", out / "metrics.jsonl")        # its target not (yet) there
    options = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
               "--eval-interval", "2", "--eval-iters", "2", "--backend", "numpy", "--no-progress", "--max-iters", "2"]
    assert cli.main(["train", "--data", str(text), "--out", str(out), *options]) == 0
    capsys.readouterr()
    assert not os.path.islink(out / "metrics.jsonl") and not (elsewhere / "metrics.jsonl").exists()
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2]


@pytest.mark.parametrize("bad", [b"\xff\xfe{}\n", ("[" * 100_000 + "]" * 100_000 + "\n").encode(),
                                 ('{"iter": 0, "train_loss": 1, "val_loss": 1, "x": "' + "a" * 100_000 + '"}\n').encode()],
                         ids=["not-utf8", "nested", "long"])
def test_a_damaged_metrics_line_is_named(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(bad + ROWS.encode())
    with pytest.raises(ValueError, match=r"line 1 of .*metrics\.jsonl"):
        train._keep_metrics_up_to(str(path), 20)


@pytest.mark.parametrize("edit, said", [
    (lambda chars: chars[:-1] + chars[0], "meta entry 'tokenizer': CharTokenizer: argument 'chars' must not repeat"),
    # one character short: the text's own characters were blamed on a --data no one gave
    (lambda chars: chars[:-1], "holds a tokenizer of 13 characters for a model of vocab_size 14"),
], ids=["a character twice", "one character short"])
def test_resume_names_the_checkpoint_of_a_bad_tokenizer(tmp_path, capsys, edit, said):
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be that is the question\n" * 40)
    out = tmp_path / "run"
    options = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
               "--eval-interval", "4", "--eval-iters", "2", "--warmup-iters", "2", "--lr-decay-iters", "12",
               "--backend", "numpy", "--no-progress"]
    assert cli.main(["train", "--data", str(text), "--out", str(out), *options, "--max-iters", "4"]) == 0
    saved = checkpoint.load(out / "last.npz")
    saved.meta["tokenizer"]["chars"] = edit(saved.meta["tokenizer"]["chars"])
    checkpoint.save(out / "last.npz", params=saved.params, optimizer_state=saved.optimizer_state, meta=saved.meta)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: '{out / 'last.npz'}' {said}" in err, err


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_a_member_whose_zip_directory_states_a_false_size_is_refused_before_it_is_allocated(tmp_path, compress):
    """The sizes checked are the zip's central directory's, which a file states as it likes: a stored
    member of 192 bytes said to hold the 4 TB its header declares, or a deflated one said to be
    compressed a hundredfold less than it is."""
    path = tmp_path / "c.npz"
    members = _saved(path)
    n = 4 << 20 if compress else 10**12
    payload = bytes(4 * n) if compress else b"\0" * 64
    members["params.npy"] = _npy({"descr": "<f4", "fortran_order": False, "shape": (n,)}, payload)
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw, compress_type=zipfile.ZIP_DEFLATED if compress and name == "params.npy"
                       else zipfile.ZIP_STORED)
        info = z.getinfo("params.npy")                          # written to the central directory at close
        if compress:
            info.compress_size = info.file_size // (checkpoint.MAX_INFLATION - 1)
        else:
            info.file_size = 128 + 4 * n
    with pytest.raises(ValueError, match=r"c\.npz.*'params\.npy' states [0-9,]+ bytes stored in [0-9,]+, in a file of"):
        checkpoint.load(path)


def test_a_damaged_metrics_file_is_refused_at_its_first_bad_line_without_holding_the_rest(tmp_path):
    """Each line is checked as it is read: the first bad line is named (not a later, longer one), and the
    lines after it are neither read nor held (200,000 lines of '{}' took 20 times their size)."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"{}\n" * 200_000 + b"x" * 100_000 + b"\n")
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"line 1 of .*metrics\.jsonl is not an evaluation's row"):
            train._keep_metrics_up_to(str(path), 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak:,} bytes held"
