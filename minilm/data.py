"""Text corpora, a character tokenizer, and batches for training.

    text, source = load_text("shakespeare")         # or a path to a UTF-8 text file
    tok = CharTokenizer.from_text(text)
    train, val = split(tok.encode(text), 0.9)
    batches = RandomBatches(train, block_size=64, batch_size=12, seed=1337)
    x, y = batches.next_batch()                     # (B, T) int64 each; y is x shifted by one

Two ways to cut a corpus into batches:

| class               | for                          | each call returns                                      |
| ------------------- | ---------------------------- | ------------------------------------------------------ |
| ``RandomBatches``   | transformers (nanoGPT)       | B windows at random offsets                            |
| ``ContiguousBatches``| recurrent nets (char-rnn)   | the next chunk of B parallel streams, and a reset flag |

Both have ``state_dict()`` / ``load_state_dict()``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
import codecs
import collections
import hashlib
import http.client
import numbers
import os
import unicodedata
import urllib.error
import urllib.request
import warnings

import numpy as np

from minilm.checkpoint import atomic_write
from minilm.validate import is_count, require_ids, require_positive

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
DOWNLOAD_TIMEOUT_S = 30
# the least memory a text file takes per byte of it: its str and its int64 ids are held at once, 1 + 2 bytes a
# byte of the file for 4-byte characters (ASCII takes 1 + 8), so that a file it refuses could not have fit
TEXT_MEMORY_PER_BYTE = 3
ENCODE_CHUNK = 1 << 20      # characters CharTokenizer.encode converts at a time (its temporaries: ~29 bytes each)


# ---------------------------------------------------------------------------------------------
# tokenizer


class CharTokenizer:
    """One token per character; the vocabulary is a string of distinct characters.

    Parameters
    ----------
    chars : str
        The vocabulary: token id ``i`` is the character ``chars[i]``.
    """

    def __init__(self, chars):
        _require_text("CharTokenizer", "chars", chars)
        if len(set(chars)) != len(chars):
            repeated = [c for c, n in collections.Counter(chars).items() if n > 1]
            raise ValueError(f"CharTokenizer: argument 'chars' must not repeat a character, got "
                             f"{', '.join(map(repr, repeated))} more than once")
        self.chars = chars
        codes = _code_points(chars)
        self._order = np.argsort(codes, kind="stable")      # (V,) ids sorted by code point
        self._sorted_codes = codes[self._order]             # (V,)

    @classmethod
    def from_text(cls, text):
        """The tokenizer whose vocabulary is the sorted distinct characters of ``text``."""
        _require_text("CharTokenizer.from_text", "text", text)
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text, *, what="CharTokenizer.encode: argument 'text'"):
        """Token ids of ``text``, an int64 array of shape (len(text),).

        ``what`` names the text in an error message (a command names its option, e.g. --prompt).

        Raises
        ------
        ValueError
            When ``text`` holds characters outside the vocabulary; the message shows the first few.
        """
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a string, got {type(text).__name__}")
        ids = np.empty(len(text), dtype=np.int64)                              # (N,) the only full-size array
        for start in range(0, len(text), ENCODE_CHUNK):                        # a corpus: piece by piece
            codes = _code_points(text[start:start + ENCODE_CHUNK])              # (n,)
            pos = np.searchsorted(self._sorted_codes, codes).clip(0, self.vocab_size - 1)
            if not (self._sorted_codes[pos] == codes).all():
                known = np.isin(_code_points(text), self._sorted_codes)       # the whole text's, for the message
                raise ValueError(f"{what} has {_describe_unknown(text, known, self.chars)}")
            np.take(self._order, pos, out=ids[start:start + len(codes)])
        return ids

    def decode(self, ids):
        """The string whose characters are the tokens ``ids`` (any integer array-like)."""
        ids = np.asarray(ids.get() if hasattr(ids, "get") and not isinstance(ids, np.ndarray) else ids)
        if ids.size == 0:
            return ""
        require_ids("CharTokenizer.decode", "ids", ids, self.vocab_size)
        chars = self.chars      # a str, not a numpy string array: numpy would drop '\x00'
        return "".join([chars[i] for i in ids.ravel().tolist()])

    def to_dict(self):
        """A JSON-able description, saved inside checkpoints."""
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d):
        """The tokenizer described by ``to_dict()``'s output."""
        if not isinstance(d, dict) or d.get("kind") != "char" or not isinstance(d.get("chars"), str):
            raise ValueError(f"CharTokenizer.from_dict: argument 'd' must be a dict "
                             f"{{'kind': 'char', 'chars': str}}, got {d!r:.80}")
        return cls(d["chars"])

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _require_text(op, name, text):
    if not isinstance(text, str):
        raise TypeError(f"{op}: argument '{name}' must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{op}: argument '{name}' must be a non-empty string, got ''")


def _code_points(text):
    """The Unicode code points of ``text``, shape (len(text),)."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def _describe_unknown(text, known, chars, show=5):
    """Which characters of ``text`` are not among ``chars`` (``known`` marks those that are), each with
    its code point, since look-alikes differ only there; and, when the text in another Unicode normal
    form would be all known (an accent stored apart from its letter, or with it), which form."""
    unknown = list(dict.fromkeys(c for c, ok in zip(text, known.tolist()) if not ok))  # distinct, in order
    # a byte that is not UTF-8, from a command line or a file name, arrives as a lone surrogate U+DC80..U+DCFF
    listed = ", ".join(f"byte 0x{ord(c) - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= ord(c) <= 0xDCFF
                       else f"{str(c)!r} (U+{ord(c):04X})" for c in unknown[:show])
    more = f" and {len(unknown) - show} more" if len(unknown) > show else ""
    message = (f"{len(unknown)} character{'s' * (len(unknown) != 1)} that {'are' if len(unknown) != 1 else 'is'} "
               f"not in the model's vocabulary: {listed}{more}")
    vocabulary = set(chars)
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        normal = unicodedata.normalize(form, text)
        if normal != text and set(normal) <= vocabulary:
            them = "them" if len(unknown) != 1 else "it"
            return (f"{message}; the model's text writes {them} in Unicode normal form {form}: "
                    f"unicodedata.normalize({form!r}, text) gives characters it knows")
    return message


# ---------------------------------------------------------------------------------------------
# loading a corpus


def load_text(data, *, cache_dir=None):
    """Read a training corpus.

    Parameters
    ----------
    data : str or os.PathLike
        ``"shakespeare"`` for tiny Shakespeare, or the path of a UTF-8 text file.
        Tiny Shakespeare is read from ``$MINILM_DATA_DIR/tinyshakespeare.txt`` when that
        variable is set; otherwise from the cache folder, downloading it there once.
    cache_dir : str or os.PathLike, optional
        The cache folder; default ``$XDG_CACHE_HOME/minilm`` or ``~/.cache/minilm``.

    Returns
    -------
    text : str
        The corpus.
    source : str
        Where it came from, for logs.
    """
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"load_text: argument 'data' (--data) must be 'shakespeare' or a file path, "
                        f"got {type(data).__name__}")
    if data != "shakespeare":
        path = os.fspath(data)
        return _read_text_file(path), f"text file {path}"
    data_dir = os.environ.get("MINILM_DATA_DIR")
    if data_dir:
        path = os.path.join(data_dir, SHAKESPEARE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_text: MINILM_DATA_DIR is set to '{data_dir}', but it holds no "
                                    f"{SHAKESPEARE_FILE}; put the file there or unset MINILM_DATA_DIR")
        where = f"load_text: MINILM_DATA_DIR is set to '{data_dir}', and its {SHAKESPEARE_FILE}"
        try:
            text = _read_text_file(path, where=where)
        except (OSError, ValueError) as e:
            raise type(e)(f"{e}; replace it with tiny Shakespeare ({SHAKESPEARE_URL}) or unset "
                          f"MINILM_DATA_DIR") from None
        if text_digest(text) == SHAKESPEARE_SHA256:
            return text, f"tiny Shakespeare, {path}"
        warnings.warn(f"load_text: {path} (from MINILM_DATA_DIR) is not tiny Shakespeare as published: its "
                      f"SHA-256 is not {SHAKESPEARE_SHA256}; training on it anyway", stacklevel=2)
        return text, f"{path} (not the published tiny Shakespeare)"
    path = os.path.join(os.fspath(cache_dir or default_cache_dir()), SHAKESPEARE_FILE)
    damaged = None
    if os.path.isfile(path):
        try:                                   # an empty or undecodable copy is a damaged one: fetched again
            text = _read_text_file(path, where=f"load_text: the cached {path}", nul_warning=False)
        except (OSError, ValueError):
            text = ""
        if text_digest(text) == SHAKESPEARE_SHA256:
            return text, f"tiny Shakespeare, {path}"
        warnings.warn(f"load_text: the cached {path} does not have tiny Shakespeare's SHA-256 (cut short or "
                      f"changed); downloading it again", stacklevel=2)
        damaged = path
    raw = download_shakespeare(damaged_copy=damaged)
    saved = _save_to_cache(path, raw)
    return _decode(raw, path), f"tiny Shakespeare, downloaded from {SHAKESPEARE_URL}" + (f" to {path}" if saved else "")


def load_saved_text(meta, data, *, command, path, other_text_ok=False):
    """The text and source of a saved run (``meta`` of its checkpoint at ``path``): ``data`` when given,
    else the text the run was trained on. That must still be the text it was trained on (its SHA-256
    is saved), and so must ``data`` unless ``other_text_ok`` (``minilm eval`` may score any text;
    ``--resume`` may not train on another). A run saved before the SHA-256 was kept has only its
    vocabulary to check a text by, and may name it by a relative path, which from another folder
    is another file: such a path is not followed."""
    saved, digest = meta.get("data"), meta.get("data_sha256")
    if data is None:
        if digest is None and saved != "shakespeare" and not os.path.isabs(os.fspath(saved)):
            raise ValueError(f"{command}: {path} was saved by an older minilm, with the relative path {saved!r} "
                             f"and no checksum of its text, so that name may be another file from here; pass the "
                             f"file it was trained on with --data PATH")
        if saved != "shakespeare" and not os.path.isfile(os.fspath(saved)):
            raise FileNotFoundError(f"{command}: the text this run was trained on, {saved!r} (named in {path}), "
                                    f"is no longer there; pass a copy of it with --data PATH")
        text, source = load_text(saved)
        text = _as_the_run_read_it(text, saved, meta)
        if digest is not None and text_digest(text) != digest:
            raise ValueError(f"{command}: the text this run was trained on, {saved!r}, has changed since (its "
                             f"SHA-256 is not the one saved in {path}); pass an unchanged copy with --data PATH"
                             + (", or another text to score with --data" if other_text_ok else ""))
        if digest is None:
            _require_the_runs_characters(meta, text, f"the text this run was trained on, {saved!r}, has changed "
                                                     f"since it was saved in {path}", command)
        return text, source
    text, source = load_text(data)
    text = _as_the_run_read_it(text, data, meta)
    if not other_text_ok and digest is not None and text_digest(text) != digest:
        raise ValueError(f"{command}: option '--data' {os.fspath(data)!r} holds other text than the run saved in "
                         f"{path} was trained on ({saved!r}); pass that text to resume it, or train a new run "
                         f"in another --out")
    if not other_text_ok and digest is None:
        _require_the_runs_characters(meta, text, f"option '--data' {os.fspath(data)!r} is not the text the run "
                                                 f"saved in {path} was trained on", command)
    return text, source


def _runs_characters(meta):
    """The vocabulary of a saved run (its tokenizer's characters), or None where its meta has none."""
    tokenizer = meta.get("tokenizer")
    chars = tokenizer.get("chars") if isinstance(tokenizer, dict) else None
    return chars if isinstance(chars, str) else None


def _as_the_run_read_it(text, data, meta):
    """The text of the file ``data`` as the run saved with ``meta`` read it. Before minilm dropped a
    UTF-8 byte-order mark (``_decode``) it read the mark as the text's first character, U+FEFF of
    the run's vocabulary: where such a run saved no checksum of its text (every run that old), or
    the checksum of the text with the mark, the mark is put back."""
    if data == "shakespeare" or "\ufeff" not in (_runs_characters(meta) or ""):
        return text
    with open(os.fspath(data), "rb") as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            return text
    digest = meta.get("data_sha256")
    if digest is None or text_digest("\ufeff" + text) == digest:
        return "\ufeff" + text
    return text


def _require_the_runs_characters(meta, text, what, command):
    """A run saved before minilm kept its text's SHA-256 can only be checked by its vocabulary, which
    is the sorted distinct characters of the text it was trained on (``CharTokenizer.from_text``):
    refuse ``text`` where they differ, saying ``what`` it is."""
    chars = _runs_characters(meta)
    if chars is not None and "".join(sorted(set(text))) != chars:
        raise ValueError(f"{command}: {what}: its characters are not the run's vocabulary (the run was saved by an "
                         f"older minilm, without a checksum of its text); pass the file it was trained on with "
                         f"--data PATH")


def text_digest(text):
    """The SHA-256 of a text's UTF-8 bytes: tiny Shakespeare's published one for that corpus (which
    has no byte-order mark), and the digest a run saves so that ``--resume`` and ``eval`` can tell
    that a file still holds the text it was trained on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_cache_dir():
    """``$XDG_CACHE_HOME/minilm``, or ``~/.cache/minilm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minilm")


def _fetch(url, timeout):
    """The bytes at ``url`` (the only function that touches the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download_shakespeare(url=SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S, *, damaged_copy=None):
    """Download tiny Shakespeare and check its SHA-256; return the bytes. ``damaged_copy``: the
    cached copy this replaces, for the message of a failed download (None: there is none).

    Raises
    ------
    RuntimeError
        When the download fails or the checksum does not match; the message says how to use
        a local copy instead.
    """
    instead = (f"use a local copy instead: pass --data PATH (a UTF-8 text file), or set MINILM_DATA_DIR "
               f"to a folder holding {SHAKESPEARE_FILE}")
    try:
        raw = _fetch(url, timeout)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:   # cut off: IncompleteRead
        have = "there is no cached copy" if damaged_copy is None else f"the cached copy {damaged_copy} is damaged"
        raise RuntimeError(f"load_text: could not download tiny Shakespeare from {url} ({e}), and {have}; "
                           f"{instead}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"load_text: the file downloaded from {url} has SHA-256 {digest}, expected "
                           f"{SHAKESPEARE_SHA256}; nothing was saved; {instead}")
    return raw


def _save_to_cache(path, raw):
    """True when the bytes were saved at ``path``."""
    try:
        atomic_write(path, lambda f: f.write(raw))
    except OSError as e:
        warnings.warn(f"load_text: could not cache tiny Shakespeare at {path} ({e}); "
                      "it will be downloaded again next time", stacklevel=3)
        return False
    return True


def physical_memory():
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _read_text_file(path, where=None, nul_warning=True):
    where = where or f"load_text: argument 'data' (--data) is '{path}'"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}, which does not exist; give a UTF-8 text file or 'shakespeare'")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{where}, which is a directory; give a UTF-8 text file or 'shakespeare'")
    size = os.stat(path).st_size                # a pipe's is 0: it is read as it comes (/dev/stdin)
    need, memory = TEXT_MEMORY_PER_BYTE * size, physical_memory()
    if memory is not None and need > memory:
        raise ValueError(f"{where}, which is {size / 2**30:,.1f} GiB: reading it and its token ids takes at "
                         f"least {need / 2**30:,.1f} GiB of memory, and this machine has {memory / 2**30:,.1f} GiB; "
                         f"give a smaller text")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"{where}, which could not be read: {e.strerror or e}") from None
    return _decode(raw, path, where, nul_warning)


def _decode(raw, path, where=None, nul_warning=True):
    """The text of a UTF-8 file; a byte-order mark that an editor put first is not part of it.
    ``nul_warning``: warn when a tenth or more of the text is NUL characters (UTF-16 read as UTF-8)."""
    where = where or f"load_text: argument 'data' (--data) is '{path}'"
    mark = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if len(raw) == mark:
        raise ValueError(f"{where}, which is empty; a corpus needs some text")
    try:
        text = raw[mark:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = mark + e.start                                    # offset in the file
        line = raw.count(b"\n", 0, at) + 1
        raise ValueError(f"{where}, which is not UTF-8 text: byte 0x{raw[at]:02x} at offset {at} "
                         f"(line {line}) cannot be decoded ({e.reason}); {_what_to_do(raw)}") from None
    if nul_warning and text.count("\0") * 10 >= len(text):     # UTF-16 without a byte-order mark decodes so
        warnings.warn(f"{where}, which is {text.count(chr(0)) / len(text):.0%} NUL characters: if it is UTF-16 "
                      f"text, convert it to UTF-8 first (for example iconv -f UTF-16 -t UTF-8)", stacklevel=3)
    return text


def _what_to_do(raw):
    """How to make UTF-8 text of a file that is not: what its first bytes say it is."""
    if raw.startswith(b"\x1f\x8b"):
        return "it is a gzip file: decompress it first (gunzip -k FILE)"
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if raw.startswith(bom):
            return f"it is {name} text: convert it to UTF-8 first (iconv -f {name} -t UTF-8 FILE)"
    return "convert it to UTF-8 first (iconv -f ENCODING -t UTF-8 FILE, ENCODING being latin1 for example)"


def split(ids, train_fraction=0.9, *, what="the corpus"):
    """The first ``train_fraction`` of ``ids`` for training, the rest for validation. ``what``
    names ``ids`` in the error for too few of them (a command names the text they come from).

    Returns
    -------
    train, val : numpy.ndarray
        int64 arrays (views of ``ids`` when it is an int64 array), of lengths
        ``int(float(train_fraction) * len(ids))`` and the remainder.
    """
    if not (isinstance(train_fraction, numbers.Real) and not isinstance(train_fraction, bool)
            and 0.0 < train_fraction < 1.0):                  # a NumPy float32 too
        raise ValueError(f"split: argument 'train_fraction' must be a number in (0, 1), got {train_fraction!r}")
    ids = _as_corpus("split", "ids", ids)
    n = int(float(train_fraction) * len(ids))               # in float64 whatever the fraction's type and NumPy's
    if n == 0 or n == len(ids):
        raise ValueError(f"split: {what} has {len(ids)} tokens, too few to split into two non-empty parts, "
                         f"{train_fraction:g} for training and the rest for validation")
    return ids[:n], ids[n:]


def _as_corpus(op, name, data):
    """``data`` as a 1-D int64 numpy array."""
    data = np.asarray(data)
    if data.ndim != 1:
        raise ValueError(f"{op}: argument '{name}' must be a 1-D array of token ids, got shape {data.shape}")
    if data.size and data.dtype.kind not in "iu":
        raise TypeError(f"{op}: argument '{name}' must be an integer array of token ids, got dtype {data.dtype}")
    return data.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# batches


class RandomBatches:
    """nanoGPT's batches: ``batch_size`` windows of ``block_size`` tokens at random offsets.

    Parameters
    ----------
    data : array of int, shape (N,)
        The token ids of the corpus (split).
    block_size : int
        T, the length of each window.
    batch_size : int
        B, the number of windows per batch.
    seed : int
        Seed of the batch generator (a numpy ``Generator``, PCG64).
    """

    def __init__(self, data, block_size, batch_size, seed):
        require_positive("RandomBatches", "block_size", block_size, int)
        require_positive("RandomBatches", "batch_size", batch_size, int)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"RandomBatches: option 'seed' must be a non-negative integer, got {seed!r}")
        self.data = _as_corpus("RandomBatches", "data", data)
        if len(self.data) < block_size + 1:
            raise ValueError(f"RandomBatches: the corpus has {len(self.data)} tokens, but block_size = {block_size} "
                             f"needs at least block_size + 1 = {block_size + 1}; use a smaller "
                             "block_size or a longer corpus")
        self.block_size, self.batch_size = block_size, batch_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        """The next batch ``(x, y)``, both int64 of shape (B, T); ``y[b, t]`` is the token after ``x[b, t]``."""
        ix = self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)   # (B,)
        idx = ix[:, None] + np.arange(self.block_size)                                       # (B, T)
        return self.data[idx], self.data[idx + 1]

    def state_dict(self):
        """The generator's state (JSON-able)."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        """Restore the generator's state from ``state_dict()``'s output."""
        try:
            self.rng.bit_generator.state = state["bit_generator"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"RandomBatches.load_state_dict: argument 'state' is not a state_dict of "
                             f"RandomBatches ({type(e).__name__}: {e})") from None


class ContiguousBatches:
    """char-rnn's batches for truncated backpropagation through time.

    The corpus is cut into ``batch_size`` parallel streams of equal length; row b of every batch
    continues row b of the previous one, so a recurrent model carries its hidden state across
    batches. After the last full chunk the streams wrap around to their start (``reset``), so the
    same few characters are never trained on: the last ``L mod block_size`` inputs of each stream of
    L, and the ``N - 1 - batch_size L`` left after the last stream, at most
    ``batch_size * block_size - 1`` in all (char-rnn leaves out about as many).

    Parameters
    ----------
    data : array of int, shape (N,)
        The token ids of the corpus (split).
    block_size : int
        T, the number of time steps per chunk.
    batch_size : int
        B, the number of parallel streams.
    """

    def __init__(self, data, block_size, batch_size):
        require_positive("ContiguousBatches", "block_size", block_size, int)
        require_positive("ContiguousBatches", "batch_size", batch_size, int)
        data = _as_corpus("ContiguousBatches", "data", data)
        L = (len(data) - 1) // batch_size                  # inputs per stream; each stream has L + 1 tokens
        if L < block_size:
            raise ValueError(
                f"ContiguousBatches: the corpus has {len(data)} tokens; cut into batch_size = {batch_size} streams "
                f"that is {max(L + 1, 0)} tokens per stream, fewer than block_size + 1 = {block_size + 1}; needs at "
                f"least batch_size * block_size + 1 = {batch_size * block_size + 1} tokens"
            )
        self.x = data[:batch_size * L].reshape(batch_size, L)          # (B, L)
        self.y = data[1:batch_size * L + 1].reshape(batch_size, L)     # (B, L)
        self.block_size, self.batch_size = block_size, batch_size
        self.n_chunks = L // block_size
        self.chunk = 0

    def next_batch(self):
        """The next chunk ``(x, y, reset)``.

        Returns
        -------
        x, y : numpy.ndarray of int64, shape (B, T)
            Inputs and targets (``y`` is ``x`` shifted by one along each stream).
        reset : bool
            True when the streams start over (the first chunk, and after wrapping around):
            the recurrent state must be reset to zeros.
        """
        t0 = self.chunk * self.block_size
        x = self.x[:, t0:t0 + self.block_size]
        y = self.y[:, t0:t0 + self.block_size]
        reset = self.chunk == 0
        self.chunk = (self.chunk + 1) % self.n_chunks
        return x, y, reset

    def state_dict(self):
        return {"chunk": self.chunk}

    def load_state_dict(self, state):
        chunk = state.get("chunk") if isinstance(state, dict) else None
        if not (is_count(chunk) and chunk < self.n_chunks):
            raise ValueError(f"ContiguousBatches.load_state_dict: argument 'state' must be {{'chunk': int in "
                             f"[0, {self.n_chunks})}}, got {state!r:.80}")
        self.chunk = chunk


def evaluation_batches(data, block_size, batch_size, n_batches, *, seed=0):
    """A fixed list of ``n_batches`` random batches ``(x, y)`` for estimating the loss.

    Drawn with a generator of its own, so the same call gives the same batches and the
    training batches' generator is not disturbed.
    """
    require_positive("evaluation_batches", "n_batches", n_batches, int)
    batches = RandomBatches(data, block_size, batch_size, seed)
    return [batches.next_batch() for _ in range(n_batches)]
