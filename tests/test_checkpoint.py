"""Checkpoints: bit-exact round trip, atomic writes, and clear errors for bad files."""
import json
import os

import numpy as np
import pytest

from minilm import checkpoint
from minilm.checkpoint import Checkpoint, check_compatible, load, save
from minilm.data import CharTokenizer, RandomBatches
from minilm.optim import AdamW
from minilm.params import Params

NOT_A_CHECKPOINT = "is truncated or is not a minilm checkpoint"


def trained_state(dtype=np.float32):
    """Params after one AdamW step, the optimizer's state, and a realistic meta dict."""
    params = Params([("wte", (5, 4)), ("ln_b", (4,))], dtype=dtype)
    rng = np.random.default_rng(0)
    params.data[...] = rng.standard_normal(params.size)
    params.grad[...] = rng.standard_normal(params.size)
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    opt.step()
    batches = RandomBatches(np.arange(100), 8, 2, seed=1)
    batches.next_batch()
    meta = {
        "model": {"kind": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
        "tokenizer": CharTokenizer.from_text("hello world").to_dict(),
        "train": {"iter": 250, "best_val_loss": 1.4703, "schedule": {"name": "cosine", "lr": 1e-3},
                  "batch_rng": batches.state_dict()},                     # 128-bit ints inside
        "backend": "numpy", "dtype": str(np.dtype(dtype)),
    }
    return params, opt.state_dict(), meta


def assert_same_state(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)
        else:
            assert got[key] == value


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    params, opt_state, meta = trained_state(dtype)
    path = tmp_path / "ckpt.npz"
    save(path, params=params, optimizer_state=opt_state, meta=meta)
    ckpt = load(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.params.dtype == dtype
    assert ckpt.params.tobytes() == params.data.tobytes()                  # bit-exact
    assert ckpt.meta == meta
    assert_same_state(ckpt.optimizer_state, opt_state)
    assert ckpt.format_version == checkpoint.FORMAT_VERSION


def test_loaded_state_restores_the_optimizer(tmp_path):
    params, opt_state, meta = trained_state()
    save(tmp_path / "c.npz", params=params, optimizer_state=opt_state, meta=meta)
    ckpt = load(tmp_path / "c.npz")
    resumed = Params([("wte", (5, 4)), ("ln_b", (4,))])
    resumed.load(ckpt.params)
    opt = AdamW(resumed, lr=1e-3, weight_decay=0.1)
    opt.load_state_dict(ckpt.optimizer_state)
    assert opt.steps == 1
    np.testing.assert_array_equal(opt.m, opt_state["m"])


def test_save_accepts_a_flat_array_and_no_optimizer(tmp_path):
    flat = np.arange(6, dtype=np.float32)
    save(tmp_path / "c.npz", params=flat, optimizer_state=None, meta={})
    ckpt = load(tmp_path / "c.npz")
    np.testing.assert_array_equal(ckpt.params, flat)
    assert ckpt.optimizer_state == {} and ckpt.meta == {}


def test_save_creates_the_parent_directory_and_keeps_the_name(tmp_path):
    path = tmp_path / "runs" / "shakespeare" / "ckpt.bin"                  # no .npz suffix added
    save(path, params=np.zeros(3), optimizer_state=None, meta={"a": 1})
    assert os.listdir(path.parent) == ["ckpt.bin"]
    assert load(path).meta == {"a": 1}


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    save(path, params=np.zeros(3), optimizer_state=None, meta={"iter": 1})
    save(path, params=np.ones(3), optimizer_state=None, meta={"iter": 2})
    ckpt = load(path)
    assert ckpt.meta == {"iter": 2}
    np.testing.assert_array_equal(ckpt.params, np.ones(3))


def test_saving_works_where_os_has_no_fchmod(tmp_path, monkeypatch):
    """Windows has os.fchmod only from Python 3.13: there a save (and the download's cache) had failed
    with AttributeError, so no checkpoint was ever written."""
    monkeypatch.delattr(os, "fchmod", raising=False)
    path = tmp_path / "c.npz"
    save(path, params=np.zeros(3), optimizer_state=None, meta={"iter": 1})
    save(path, params=np.ones(3), optimizer_state=None, meta={"iter": 2})
    assert load(path).meta == {"iter": 2}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_a_new_checkpoint_follows_the_umask_and_a_replaced_one_keeps_its_mode(tmp_path):
    path = tmp_path / "c.npz"
    old = os.umask(0o027)
    try:
        save(path, params=np.zeros(3), optimizer_state=None, meta={})
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)          # 0666 less the umask, not mkstemp's 0600
    os.chmod(path, 0o604)                                              # the user's own choice survives a save
    save(path, params=np.ones(3), optimizer_state=None, meta={})
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o604)


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, interruption):
    path = tmp_path / "c.npz"
    save(path, params=np.zeros(3), optimizer_state=None, meta={"iter": 1})
    before = path.read_bytes()

    def savez_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half of a zip file")                          # partially written
        raise interruption
    monkeypatch.setattr(checkpoint.np, "savez", savez_then_fail)
    with pytest.raises(type(interruption)):
        save(path, params=np.ones(3), optimizer_state=None, meta={"iter": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]                               # the temporary file is gone
    monkeypatch.undo()
    assert load(path).meta == {"iter": 1}


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=r"checkpoint.load: checkpoint file '.*nope.npz' does not exist"):
        load(path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a checkpoint file"):
        load(tmp_path)


def test_a_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save(path, params=np.zeros(3), optimizer_state=None, meta={})
    import builtins
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if os.fspath(p) == str(path) else real_open(p, *a, **k))
    with pytest.raises(OSError, match=r"checkpoint.load: '.*c.npz' cannot be read: Permission denied"):
        load(path)


def test_truncated_file(tmp_path):
    params, opt_state, meta = trained_state()
    path = tmp_path / "c.npz"
    save(path, params=params, optimizer_state=opt_state, meta=meta)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT) as info:
        load(path)
    assert str(path) in str(info.value)


def test_corrupted_bytes_inside_the_params(tmp_path):
    path = tmp_path / "c.npz"
    flat = np.full(64, 1234.5, dtype=np.float64)
    save(path, params=flat, optimizer_state=None, meta={})
    raw = bytearray(path.read_bytes())
    at = raw.find(flat[:8].tobytes()) + 20
    raw[at] ^= 0xFF                                                        # one flipped byte: a CRC mismatch
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        load(path)


@pytest.mark.parametrize("content", [b"", b"this is just text\n", bytes(range(256)) * 4])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "c.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        load(path)


def test_other_numpy_files_are_not_checkpoints(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT + r" \(missing entries: header, meta, optim_json, params\)"):
        load(tmp_path / "other.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT + r" \(it is not an .npz \(zip\) archive\)"):
        load(tmp_path / "single.npy")


def test_unknown_format_version(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    save(tmp_path / "future.npz", params=np.zeros(3), optimizer_state=None, meta={})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"future.npz' has checkpoint format version 99 .* but this minilm reads "
                                         r"format version 1"):
        load(tmp_path / "future.npz")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"params": np.zeros(3), "optimizer_state": None, "meta": {"x": object()}}, TypeError,
     r"checkpoint.save: argument 'meta' must hold only JSON-serialisable values"),
    ({"params": np.zeros(3), "optimizer_state": None, "meta": [1]}, TypeError,
     r"checkpoint.save: argument 'meta' must be a dict, got list"),
    ({"params": np.zeros((3, 2)), "optimizer_state": None, "meta": {}}, TypeError,
     r"checkpoint.save: argument 'params' must be a Params or a flat 1-D array"),
    ({"params": np.zeros(3), "optimizer_state": {"opts": {1, 2}}, "meta": {}}, TypeError,
     r"checkpoint.save: argument 'optimizer_state' must hold only JSON-serialisable values"),
])
def test_save_bad_input(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        save(tmp_path / "c.npz", **kwargs)
    assert not os.listdir(tmp_path)                                        # nothing written, nothing left over


def test_save_to_a_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"checkpoint.save: argument 'path' .*run' is a folder; give a file name "
                                         r"in it, such as .*last.npz"):
        save(folder, params=np.zeros(3), optimizer_state=None, meta={})
    assert os.listdir(tmp_path) == ["run"] and not os.listdir(folder)


# ---------------------------------------------------------------------------------------------
# check_compatible


def test_matching_settings_pass():
    meta = {"kind": "gpt", "n_layer": 4, "betas": [0.9, 0.95]}
    assert check_compatible(meta, {"kind": "gpt", "n_layer": 4, "betas": (0.9, 0.95)}) is None


def test_mismatched_setting_is_named():
    with pytest.raises(ValueError, match=r"^checkpoint 'out/c.npz' was saved from a model with n_layer=4, "
                                         r"but this run asks for n_layer=6$"):
        check_compatible({"n_layer": 4, "n_head": 4}, {"n_layer": 6, "n_head": 4}, path="out/c.npz")


def test_every_mismatch_is_named_with_nested_keys_dotted():
    meta = {"model": {"kind": "gpt", "n_embd": 128}, "dtype": "float32"}
    with pytest.raises(ValueError, match=r"with model.kind='gpt', no recorded vocab_size, but this run asks for "
                                         r"model.kind='lstm', vocab_size=65"):
        check_compatible(meta, {"model": {"kind": "lstm", "n_embd": 128}, "vocab_size": 65})


def test_check_compatible_bad_input():
    with pytest.raises(TypeError, match=r"check_compatible: argument 'expected' must be a dict, got list"):
        check_compatible({}, [("n_layer", 4)])
    with pytest.raises(TypeError, match=r"check_compatible: argument 'meta' must be a dict, got NoneType"):
        check_compatible(None, {"n_layer": 4})


def test_file_is_plain_numpy_and_json(tmp_path):
    """A checkpoint reads with nothing but numpy (no pickles) and json."""
    params, opt_state, meta = trained_state()
    save(tmp_path / "c.npz", params=params, optimizer_state=opt_state, meta=meta)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as archive:
        assert json.loads(str(archive["meta"])) == meta
        assert json.loads(str(archive["header"]))["format"] == checkpoint.FORMAT
        np.testing.assert_array_equal(archive["optim/v"], opt_state["v"])


# ---------------------------------------------------------------------------------------------
# archives with a checkpoint's four entries whose content is wrong (written by hand, not by save)

def _archive(path, header=None, meta="{}", optim_json="{}", write=np.savez, **extra):
    """An npz with the four entries a checkpoint has (and ``extra`` ones); ``header`` a dict (default:
    a valid one) or a string."""
    if header is None:
        header = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "minilm_version": "0"}
    write(path, header=np.array(header if isinstance(header, str) else json.dumps(header)), meta=np.array(meta),
          optim_json=np.array(optim_json), params=np.linspace(0.0, 1.0, 4096), **extra)
    return path


def test_a_hand_written_archive_with_a_valid_header_loads(tmp_path):
    ckpt = load(_archive(tmp_path / "c.npz", meta='{"a": 1}', optim_json='{"steps": 3}'))
    assert ckpt.meta == {"a": 1} and ckpt.optimizer_state == {"steps": 3} and ckpt.params.size == 4096


@pytest.mark.parametrize("header, reason", [
    ({"format": "some other format", "format_version": 1}, "no minilm checkpoint header"),
    ({"format_version": 1}, "no minilm checkpoint header"),
    ([checkpoint.FORMAT, 1], "no minilm checkpoint header"),
    ("{not json", "unreadable header"),
])
def test_an_archive_without_a_minilm_header_is_not_a_checkpoint(tmp_path, header, reason):
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT + r" \(" + reason):
        load(_archive(tmp_path / "c.npz", header=header))


@pytest.mark.parametrize("version", [0, None, "1", 2])
def test_only_the_readable_format_versions_load(tmp_path, version):
    header = {"format": checkpoint.FORMAT, "format_version": version}
    with pytest.raises(ValueError, match=rf"has checkpoint format version {version!r} .* reads format version 1"):
        load(_archive(tmp_path / "c.npz", header=header))


@pytest.mark.parametrize("entry", ["meta", "optim_json"])
def test_unreadable_json_in_meta_or_optimizer_state_is_not_a_checkpoint(tmp_path, entry):
    path = _archive(tmp_path / "c.npz", **{entry: '{"iter": 3'})
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT + r" \(unreadable JSON"):
        load(path)


def test_an_optimizer_state_that_is_not_a_dictionary_is_not_a_checkpoint(tmp_path):
    """It had failed as "list indices must be integers or slices, not str", naming no file."""
    path = _archive(tmp_path / "c.npz", optim_json="[1, 2]", **{"optim/m": np.zeros(3)})
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT + r" \(its optimizer state is a list, not a dictionary\)"):
        load(path)


def test_a_meta_that_is_not_a_dictionary_is_refused_when_entries_are_required(tmp_path):
    path = _archive(tmp_path / "c.npz", meta="[1, 2]")
    assert load(path).meta == [1, 2]                                       # nothing asked of it
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT + r" \(its meta is a list, not a dictionary\)"):
        load(path, required_meta=("model",))


def test_a_corrupted_compressed_archive_is_not_a_checkpoint(tmp_path):
    """An archive written with np.savez_compressed whose deflate stream is damaged (zlib's error)."""
    import zipfile
    path = _archive(tmp_path / "c.npz", write=np.savez_compressed)
    assert load(path).params.size == 4096                                  # readable before the damage
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("params.npy")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF        # inside the compressed params
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        load(path)


def test_the_content_reaches_the_file_before_it_is_fsynced(tmp_path, monkeypatch):
    """The durability promise: at the fsync the whole new content is in the file (flushed out of
    Python's buffer), so that a crash after the rename cannot leave a short checkpoint."""
    seen = []
    real_fsync = os.fsync

    def fsync(fd):
        seen.append(os.fstat(fd).st_size)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x" * 1000))
    assert seen and seen[0] == 1000                                        # the file's fsync (then the folder's)


def test_a_checkpoint_holding_a_pickled_object_is_refused_unread(tmp_path):
    """Loading never unpickles (np.load's allow_pickle=False): a crafted object array could run code."""
    path = _archive(tmp_path / "evil.npz", **{"optim/m": np.array([{"a": 1}], dtype=object)})   # savez pickles it
    with pytest.raises(ValueError, match="is truncated or is not a minilm checkpoint"):
        load(path)


def test_a_count_in_the_meta_is_not_a_boolean():
    with pytest.raises(ValueError, match="meta entry 'iter' must be an integer >= 0, got True"):
        checkpoint.check_meta({"iter": True}, "x.npz", {"iter": checkpoint.COUNT})


def test_an_entry_allowed_to_be_null_may_be_null():
    checkpoint.check_meta({"last_eval_iter": None}, "x.npz", {"last_eval_iter": (checkpoint.COUNT, None)})
    with pytest.raises(ValueError, match="must be an integer >= 0 or null, got -1"):
        checkpoint.check_meta({"last_eval_iter": -1}, "x.npz", {"last_eval_iter": (checkpoint.COUNT, None)})
