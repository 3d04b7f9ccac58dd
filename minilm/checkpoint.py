"""Checkpoints: one ``.npz`` file per training run, written atomically.

A checkpoint holds five entries:

| entry            | what                                                                   |
| ---------------- | ---------------------------------------------------------------------- |
| ``params``       | the flat parameter buffer (``Params.data``) as a numpy array           |
| ``optim/<name>`` | each array of the optimizer's ``state_dict()`` (moments, buffers)      |
| ``optim_json``   | the optimizer's scalars (step count, options) as a JSON string         |
| ``meta``         | a JSON string: model kind and config, tokenizer, training state, ...   |
| ``header``       | a JSON string: the format marker, format version and minilm version    |

The file is numpy's own format (a zip of ``.npy`` arrays), read with ``allow_pickle=False``, so
loading a checkpoint never runs code. It is written to a temporary file in the same directory,
flushed to disk, and renamed over the old one, so a crash or Ctrl-C midway leaves the previous
checkpoint intact.

    save("out/ckpt.npz", params=model.params, optimizer_state=opt.state_dict(),
         meta={"model": model_meta(model), "tokenizer": tokenizer.to_dict()})   # JSON-able values only
    ckpt = load("out/ckpt.npz")
    check_compatible(ckpt.meta["model"], {"config": {"n_layer": 6}}, path="out/ckpt.npz")

(``model_meta`` from ``minilm.models``; with these two entries ``minilm sample`` reads the file,
and ``minilm eval`` and ``--resume`` read the further entries ``minilm train`` writes.)
"""
import contextlib
import json
import math
import os
import secrets
import stat
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from minilm.backend import to_numpy
from minilm.validate import is_count

FORMAT = "minilm checkpoint"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)


@dataclass
class Checkpoint:
    """What ``load`` returns.

    Attributes
    ----------
    params : numpy.ndarray
        The flat parameter buffer, in the dtype it was saved in.
    optimizer_state : dict
        The optimizer's ``state_dict()``: scalars and numpy arrays.
    meta : dict
        The ``meta`` dictionary given to ``save``.
    format_version : int
        The file format version.
    minilm_version : str
        The minilm version that wrote the file.
    """

    params: np.ndarray
    optimizer_state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    minilm_version: str = ""


def atomic_write(path, write):
    """Write a file so that readers see either the old file or the complete new one.

    ``write(f)`` is called with a binary file object on a temporary file in the same
    directory; the file is then flushed, fsynced and renamed over ``path``. If ``write``
    raises (or the user presses Ctrl-C), the temporary file is removed and ``path`` is
    left as it was. The parent directory is created when missing.

    Parameters
    ----------
    path : str or os.PathLike
        The destination file.
    write : callable
        ``write(f)`` writes the content to the binary file object ``f``.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = _new_temporary(parent, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):                  # not on Windows before Python 3.13
                with contextlib.suppress(FileNotFoundError):   # a replaced file's permissions stay as they were
                    os.fchmod(f.fileno(), os.stat(path).st_mode & 0o7777)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(parent)


def _new_temporary(folder, name):
    """A new file ``.NAME.XXXXXXXX.tmp`` in ``folder``, opened for writing: (fd, path). Made with mode
    0666, which the umask reduces as for any new file (``tempfile.mkstemp`` would make it 0600, and
    hide a run's checkpoints from the user's group)."""
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _to_json(op, name, value):
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: argument '{name}' must hold only JSON-serialisable values ({e})") from None


def _split_optimizer_state(state):
    """Arrays (stored as npz entries) and scalars (stored as JSON) of an optimizer state_dict."""
    arrays, scalars = {}, {}
    for key, value in (state or {}).items():
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            arrays[f"optim/{key}"] = to_numpy(value)
        else:
            scalars[key] = value
    return arrays, scalars


def save(path, *, params, optimizer_state, meta):
    """Save a checkpoint to ``path`` atomically (see ``atomic_write``).

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file; its parent directory is created when missing.
    params : Params or array
        The model's parameters (a ``Params``, or its flat ``data`` array; numpy or cupy).
    optimizer_state : dict or None
        ``optimizer.state_dict()``: JSON-able scalars and arrays.
    meta : dict
        JSON-able description of the run: model kind and config, tokenizer, training state.
    """
    if os.path.isdir(path):
        raise ValueError(f"checkpoint.save: argument 'path' {os.fspath(path)!r} is a folder; give a file name "
                         f"in it, such as {os.path.join(os.fspath(path), 'last.npz')!r}")
    flat = getattr(params, "data", params)
    if not (hasattr(flat, "shape") and getattr(flat, "ndim", None) == 1):
        raise TypeError(f"checkpoint.save: argument 'params' must be a Params or a flat 1-D array, "
                        f"got {type(params).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"checkpoint.save: argument 'meta' must be a dict, got {type(meta).__name__}")
    import minilm
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "minilm_version": minilm.__version__}
    optim_arrays, optim_scalars = _split_optimizer_state(optimizer_state)
    entries = {
        "header": np.array(json.dumps(header)),
        "meta": np.array(_to_json("checkpoint.save", "meta", meta)),
        "optim_json": np.array(_to_json("checkpoint.save", "optimizer_state", optim_scalars)),
        "params": to_numpy(flat),
        **optim_arrays,
    }
    atomic_write(path, lambda f: np.savez(f, **entries))


def _not_a_checkpoint(path, reason):
    return ValueError(f"checkpoint.load: '{path}' is truncated or is not a minilm checkpoint ({reason})")


def file_kind(path):
    """What a path that is not a regular file is, for a message: "a FIFO", "a character device", ..."""
    mode = os.stat(path).st_mode
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")    # a zip file's first four bytes (an empty zip: the second)


# np.savez stores its members uncompressed; a compressed member that inflates more than this is refused
# (a zip bomb: a few megabytes of zeros inflate to gigabytes before any entry can be checked)
MAX_INFLATION = 100


def _check_members(f):
    """Refuse, before any array is allocated, a member whose .npy header declares other than the
    bytes the member holds (a shape of 10**12 in a file of a few bytes), or a compressed member
    that would inflate more than ``MAX_INFLATION``-fold. The sizes are the zip's central directory's, which
    a file can state falsely: a member larger than the file, or stored but of two sizes, is refused too."""
    archive_size = f.seek(0, os.SEEK_END)
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.compress_size > archive_size or (info.compress_type == zipfile.ZIP_STORED
                                                     and info.file_size != info.compress_size):
                raise ValueError(f"entry {info.filename!r} states {info.file_size:,} bytes stored in "
                                 f"{info.compress_size:,}, in a file of {archive_size:,} bytes")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_INFLATION * max(info.compress_size, 1024):
                raise ValueError(f"entry {info.filename!r} inflates from {info.compress_size:,} to "
                                 f"{info.file_size:,} bytes")
            with archive.open(info) as member:
                if member.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                    continue                                            # not an array: np.load reads its bytes
                major, _ = member.read(2)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    continue                                            # pickled: np.load refuses it
                declared = member.tell() + math.prod(shape) * dtype.itemsize
                if declared != info.file_size:
                    raise ValueError(f"entry {info.filename!r} declares shape {shape} of {dtype} ({declared:,} "
                                     f"bytes with its header) but holds {info.file_size:,} bytes")
    f.seek(0)


def _read_archive(f):
    """Every array of the npz archive in the binary file ``f``."""
    _check_members(f)
    with np.load(f, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _read_entries(path):
    """Every array in the checkpoint file; file-format errors become one clear error."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise OSError(f"checkpoint.load: '{path}' cannot be read: {e.strerror or e}") from None
    with f:                                 # ours to close, even when np.load fails midway
        try:
            if f.read(4) in ZIP_MAGIC:
                f.seek(0)
                return _read_archive(f)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError) as e:
            first_line = (str(e).splitlines() or [""])[0]      # numpy's header errors run to three lines
            raise _not_a_checkpoint(path, f"{type(e).__name__}: {first_line}") from None
    raise _not_a_checkpoint(path, "it is not an .npz (zip) archive")


def _read_header(path, entries):
    missing = [name for name in ("header", "meta", "optim_json", "params") if name not in entries]
    if missing:
        raise _not_a_checkpoint(path, f"missing entries: {', '.join(missing)}")
    try:
        header = json.loads(str(entries["header"]))
    except (ValueError, RecursionError) as e:                   # RecursionError: nested too deep
        raise _not_a_checkpoint(path, f"unreadable header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _not_a_checkpoint(path, "no minilm checkpoint header")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"checkpoint.load: '{path}' has checkpoint format version {version!r} "
            f"(written by minilm {header.get('minilm_version', '?')}), but this minilm reads format "
            f"version{'s' * (len(READABLE_VERSIONS) > 1)} {', '.join(map(str, READABLE_VERSIONS))}; "
            "use the minilm version that wrote it"
        )
    return header


def load(path, *, required_meta=()):
    """Load a checkpoint written by ``save``.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    required_meta : sequence of str
        Keys the meta dictionary must hold (what the caller reads from it); a meta that is not a
        dictionary, or lacks one of them, is an error naming the file and the missing keys.

    Returns
    -------
    Checkpoint
        The flat parameters (numpy), the optimizer state and the meta dictionary.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is truncated, corrupt, not a minilm checkpoint, of an unknown format version,
        or without a ``required_meta`` key.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint.load: checkpoint file '{path}' does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint.load: '{path}' is a directory, not a checkpoint file")
    if not stat.S_ISREG(os.stat(path).st_mode):             # a FIFO would hang, /dev/zero never end
        raise ValueError(f"checkpoint.load: '{path}' is {file_kind(path)}, not a checkpoint file")
    entries = _read_entries(path)
    header = _read_header(path, entries)
    try:
        meta = json.loads(str(entries["meta"]))
        optimizer_state = json.loads(str(entries["optim_json"]))
    except (ValueError, RecursionError) as e:
        raise _not_a_checkpoint(path, f"unreadable JSON: {e}") from None
    if not isinstance(optimizer_state, dict):                   # its buffers are added to it below
        raise _not_a_checkpoint(path, f"its optimizer state is a {type(optimizer_state).__name__}, not a dictionary")
    if required_meta:
        require_meta(meta, path, required_meta)
    for name, value in entries.items():
        if name.startswith("optim/"):
            optimizer_state[name[len("optim/"):]] = value
    return Checkpoint(params=entries["params"], optimizer_state=optimizer_state, meta=meta,
                      format_version=header["format_version"], minilm_version=header.get("minilm_version", ""))


def require_meta(meta, path, required):
    """Refuse a checkpoint's ``meta`` that is not a dictionary, or lacks a key of ``required``, naming
    the file at ``path``."""
    if not isinstance(meta, dict):
        raise _not_a_checkpoint(path, f"its meta is a {type(meta).__name__}, not a dictionary")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"checkpoint.load: '{path}' has no meta entries {', '.join(missing)}, which this reads; "
                         f"the checkpoints minilm train writes have them (was this one saved another way, "
                         f"or edited?)")


_MISSING = object()


# what a meta entry must be, for check_meta: (test, what it is called)
COUNT = (is_count, "an integer >= 0")
POSITIVE_COUNT = (lambda v: is_count(v) and v > 0, "a positive integer")
NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
TEXT = (lambda v: isinstance(v, str), "a string")
DICT = (lambda v: isinstance(v, dict), "a dictionary")


def check_meta(meta, path, kinds):
    """Check the meta entries a caller reads: ``kinds`` maps an entry's name (``"a.b"`` for
    ``meta["a"]["b"]``) to a kind above, or to a kind and ``None`` allowed. An edited or
    hand-written checkpoint then gets an error naming the file and the entry, where it would get
    a ``KeyError`` or a ``TypeError`` from deep inside the code that reads it."""
    for name, kind in kinds.items():
        (test, what), none_ok = (kind[0], True) if len(kind) == 2 and kind[1] is None else (kind, False)
        value = meta
        for part in name.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            raise ValueError(f"checkpoint.load: '{path}' has no meta entry '{name}', which this reads; the "
                             f"checkpoints minilm train writes have it (was this one saved another way, or edited?)")
        if not (test(value) or (none_ok and value is None)):
            raise ValueError(f"checkpoint.load: '{path}' meta entry '{name}' must be {what}"
                             f"{' or null' if none_ok else ''}, got {value!r}")


def _as_json_value(value):
    """The value as it reads back from JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(value))


def _differences(saved, expected, prefix=""):
    """(name, saved value, expected value) for each setting in ``expected`` that ``saved`` differs on."""
    out = []
    for key, want in expected.items():
        name = f"{prefix}{key}"
        have = saved.get(key, _MISSING) if isinstance(saved, dict) else _MISSING
        if isinstance(want, dict) and isinstance(have, dict):
            out += _differences(have, want, prefix=f"{name}.")
        elif have is _MISSING or _as_json_value(have) != _as_json_value(want):
            out.append((name, have, want))
    return out


def check_compatible(meta, expected, *, path=None):
    """Raise when a checkpoint's settings differ from the ones this run asks for.

    Parameters
    ----------
    meta : dict
        Settings recorded in the checkpoint (e.g. ``ckpt.meta["model"]``); nested dicts are
        compared key by key, and named by their keys joined with dots (``config.n_layer``).
    expected : dict
        The settings this run asks for.
    path : str, optional
        The checkpoint's path, named in the message.

    Raises
    ------
    ValueError
        Naming every setting that differs, e.g. "checkpoint 'out/ckpt.npz' was saved from a model
        with config.n_layer=4, but this run asks for config.n_layer=6".
    """
    if not isinstance(meta, dict):
        raise TypeError(f"check_compatible: argument 'meta' must be a dict, got {type(meta).__name__}")
    if not isinstance(expected, dict):
        raise TypeError(f"check_compatible: argument 'expected' must be a dict, got {type(expected).__name__}")
    diffs = _differences(meta, expected)
    if not diffs:
        return
    where = f"checkpoint '{path}'" if path is not None else "checkpoint"
    saved = ", ".join(f"{k}={v!r}" if v is not _MISSING else f"no recorded {k}" for k, v, _ in diffs)
    asked = ", ".join(f"{k}={w!r}" for k, _, w in diffs)
    raise ValueError(f"{where} was saved from a model with {saved}, but this run asks for {asked}")
