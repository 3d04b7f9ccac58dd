"""Tokenizer, corpus loading (network mocked), splits and batches."""
import builtins
import hashlib
import io
import json
import os
import unicodedata
import urllib.error

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm import data
from minilm.data import (
    CharTokenizer, ContiguousBatches, RandomBatches, evaluation_batches, load_text, split,
)

# the real corpus where $MINILM_DATA_DIR holds it (as minilm's --data shakespeare reads it)
REAL_CORPUS = os.path.join(os.environ.get("MINILM_DATA_DIR", ""), "tinyshakespeare.txt")


# ---------------------------------------------------------------------------------------------
# tokenizer

def test_the_vocabulary_is_sorted_by_code_point_upper_case_first():
    assert CharTokenizer.from_text("baBA").chars == "ABab"            # nanoGPT's sorted(set(text))


def test_tokenizers_are_equal_only_with_the_same_characters():
    assert CharTokenizer("ab") == CharTokenizer("ab") and CharTokenizer("ab") != CharTokenizer("ba")


def test_decoding_no_ids_is_the_empty_string():
    tok = CharTokenizer("ab")
    assert tok.decode([]) == "" and tok.decode(np.zeros(0, dtype=np.int64)) == ""


def test_a_tokenizer_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="CharTokenizer.from_dict: argument 'd' must be a dict"):
        CharTokenizer.from_dict({"kind": "bpe", "chars": "ab"})



def test_tokenizer_vocabulary_is_the_sorted_distinct_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.vocab_size == 8
    ids = tok.encode("hello")
    assert ids.dtype == np.int64
    assert ids.tolist() == [3, 2, 4, 4, 5]                 # " dehlorw": h=3, e=2, l=4, o=5
    assert tok.decode(ids) == "hello"


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_tokenizer_round_trips_any_text(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert [tok.chars[i] for i in ids] == list(text)


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1).map(lambda s: "".join(dict.fromkeys(s))), st.data())
def test_tokenizer_with_an_unsorted_vocabulary(chars, draw):
    tok = CharTokenizer(chars)
    text = "".join(draw.draw(st.lists(st.sampled_from(chars))))
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_dict_round_trips_through_json():
    tok = CharTokenizer.from_text("To be, or not to be: that is the question.\n")
    again = CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok
    assert again.encode("to be").tolist() == tok.encode("to be").tolist()


def test_encode_names_characters_outside_the_vocabulary():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"CharTokenizer.encode: argument 'text' has 2 characters that are not "
                                         r"in the model's vocabulary: 'é' \(U\+00E9\), '\\n' \(U\+000A\)$"):
        tok.encode("abé\nc")
    with pytest.raises(ValueError, match=r"^option '--prompt' has 1 character that is not in the model's vocabulary: 'é'"):
        tok.encode("abé", what="option '--prompt'")             # a command names its own option


def test_encode_shows_only_the_first_few_unknown_characters():
    tok = CharTokenizer.from_text("a")
    with pytest.raises(ValueError, match=r"'b' \(U\+0062\), 'c' \(U\+0063\), 'd' \(U\+0064\), 'e' \(U\+0065\), "
                                         r"'f' \(U\+0066\) and 2 more$"):
        tok.encode("abcdefgh")


@pytest.mark.parametrize("stored, asked, form", [("NFD", "NFC", "NFD"), ("NFC", "NFD", "NFC")])
def test_encode_names_the_normal_form_of_look_alike_characters(stored, asked, form):
    """'é' is one code point (NFC) or 'e' and a combining accent (NFD): they look the same, so the
    message gives each unknown character's code point, and says which form the model's text uses."""
    tok = CharTokenizer.from_text(unicodedata.normalize(stored, "Café, naïve.\n"))
    with pytest.raises(ValueError, match=rf"in the model's vocabulary: .*\(U\+0{'0E9' if asked == 'NFC' else '301'}\).*; "
                                         rf"the model's text writes it in Unicode normal form {form}: "
                                         rf"unicodedata.normalize\('{form}', text\) gives characters it knows$"):
        tok.encode(unicodedata.normalize(asked, "Café"), what="option '--prompt'")
    assert tok.decode(tok.encode(unicodedata.normalize(form, "Café"))) == unicodedata.normalize(form, "Café")


def test_encode_gives_no_normal_form_when_none_would_do():
    tok = CharTokenizer.from_text("Cafe\n")
    with pytest.raises(ValueError) as raised:
        tok.encode("Café")
    assert str(raised.value).endswith("'é' (U+00E9)")


@pytest.mark.parametrize("call,error,message", [
    (lambda: CharTokenizer.from_text(""), ValueError, r"from_text: argument 'text' must be a non-empty string"),
    (lambda: CharTokenizer.from_text(["a"]), TypeError, r"from_text: argument 'text' must be a string, got list"),
    (lambda: CharTokenizer("abca"), ValueError, r"^CharTokenizer: argument 'chars' must not repeat a character, "
                                                 r"got 'a' more than once$"),
    (lambda: CharTokenizer.from_dict({"kind": "bpe"}), ValueError, r"from_dict: argument 'd' must be a dict"),
    (lambda: CharTokenizer("ab").encode(b"ab"), TypeError, r"encode: argument 'text' must be a string, got bytes"),
    (lambda: CharTokenizer("ab").decode([0, 2]), ValueError, r"decode: argument 'ids' must hold ids in \[0, 2\)"),
    (lambda: CharTokenizer("ab").decode([0.5]), TypeError, r"decode: argument 'ids' must be an integer array"),
])
def test_tokenizer_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# load_text: local files


def test_load_text_reads_a_utf8_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Ünïcödé text\n", encoding="utf-8")
    text, source = load_text(str(path))
    assert text == "Ünïcödé text\n"
    assert str(path) in source


def test_real_corpus_has_the_expected_checksum():
    if not os.path.exists(REAL_CORPUS):
        pytest.skip(f"{REAL_CORPUS} is not present (set MINILM_DATA_DIR to a folder that holds it)")
    with open(REAL_CORPUS, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == data.SHAKESPEARE_SHA256


@pytest.mark.parametrize("content,error,message", [
    (None, FileNotFoundError, r"which does not exist"),
    ("dir", IsADirectoryError, r"which is a directory"),
    (b"", ValueError, r"which is empty"),
    (b"\xef\xbb\xbf", ValueError, r"which is empty"),             # a byte-order mark alone
    (b"\xef\xbb\xbfline one\nbad \xff", ValueError, r"byte 0xff at offset 16 \(line 2\)"),   # offsets in the file
    (b"line one\nbad \xff byte", ValueError, r"not UTF-8 text: byte 0xff at offset 13 \(line 2\)"),
    # what the file is and what to do, from its first bytes
    (b"\x1f\x8b\x08\x00 compressed", ValueError, r"cannot be decoded .*; it is a gzip file: decompress it first"),
    ("ab".encode("utf-16"), ValueError, r"; it is UTF-16 text: convert it to UTF-8 first \(iconv -f UTF-16"),
    ("caf\u00e9 au lait".encode("latin-1"), ValueError, r"; convert it to UTF-8 first \(iconv -f ENCODING"),
])
def test_load_text_bad_files_name_the_argument_and_path(tmp_path, content, error, message):
    path = tmp_path / "corpus.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message) as info:
        load_text(str(path))
    assert "argument 'data' (--data)" in str(info.value)
    assert str(path) in str(info.value)


def test_load_text_of_an_unreadable_file_names_it(tmp_path, monkeypatch):
    # a file without read permission (chmod cannot show it to root, who may read anything)
    path = tmp_path / "corpus.txt"
    path.write_text("to be\n", encoding="utf-8")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(OSError, match=r"load_text: argument 'data' \(--data\) is '.*corpus.txt', which could not "
                                      r"be read: Permission denied$"):
        load_text(str(path))


def test_load_text_drops_a_byte_order_mark(tmp_path):
    """An editor's UTF-8 byte-order mark is not text: it would become a character of the vocabulary."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbfto be\n")
    assert load_text(str(path))[0] == "to be\n"
    path.write_bytes(b"to \xef\xbb\xbfbe\n")                         # one inside the text is a character
    assert load_text(str(path))[0] == "to \ufeffbe\n"


def test_load_text_rejects_a_non_path():
    with pytest.raises(TypeError, match=r"load_text: argument 'data' \(--data\) must be 'shakespeare' or a file"):
        load_text(42)


# ---------------------------------------------------------------------------------------------
# load_text("shakespeare"): data dir, cache, download (network always mocked)


FAKE_CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n".encode()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No MINILM_DATA_DIR, the cache under tmp_path, and a network that fails the test if touched."""
    monkeypatch.delenv("MINILM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))      # were XDG_CACHE_HOME not read: not the user's cache

    def no_network(*args, **kwargs):
        raise AssertionError("the test touched the network")
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    return tmp_path


def fake_download(monkeypatch, payload=FAKE_CORPUS, checksum=None):
    """Serve ``payload`` from a mocked urlopen; its SHA-256 is the expected one unless ``checksum`` is given."""
    calls = []

    class Response(io.BytesIO):
        pass

    def urlopen(url, timeout=None):
        calls.append((url, timeout))
        return Response(payload)
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", checksum or hashlib.sha256(payload).hexdigest())
    return calls


def test_shakespeare_from_minilm_data_dir(offline, monkeypatch):
    (offline / "tinyshakespeare.txt").write_bytes(FAKE_CORPUS)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(FAKE_CORPUS).hexdigest())
    monkeypatch.setenv("MINILM_DATA_DIR", str(offline))
    text, source = load_text("shakespeare")
    assert text == FAKE_CORPUS.decode()
    assert source == f"tiny Shakespeare, {offline / 'tinyshakespeare.txt'}"


def test_another_file_in_minilm_data_dir_is_used_with_a_warning(offline, monkeypatch):
    (offline / "tinyshakespeare.txt").write_bytes(FAKE_CORPUS)
    monkeypatch.setenv("MINILM_DATA_DIR", str(offline))
    with pytest.warns(UserWarning, match=r"\(from MINILM_DATA_DIR\) is not tiny Shakespeare as published: its "
                                         r"SHA-256 is not 86c4e6aa.*; training on it anyway"):
        text, source = load_text("shakespeare")
    assert text == FAKE_CORPUS.decode() and source.endswith("(not the published tiny Shakespeare)")


def test_a_cached_copy_cut_short_is_downloaded_again(offline, monkeypatch):
    calls = fake_download(monkeypatch)
    load_text("shakespeare")
    cached = offline / "xdg" / "minilm" / "tinyshakespeare.txt"
    cached.write_bytes(FAKE_CORPUS[:40])
    with pytest.warns(UserWarning, match=r"the cached .* does not have tiny Shakespeare's SHA-256 .*downloading it again"):
        text, source = load_text("shakespeare")
    assert text == FAKE_CORPUS.decode() and len(calls) == 2 and cached.read_bytes() == FAKE_CORPUS


def test_minilm_data_dir_without_the_file_is_an_error(offline, monkeypatch):
    monkeypatch.setenv("MINILM_DATA_DIR", str(offline))
    with pytest.raises(FileNotFoundError, match=r"MINILM_DATA_DIR is set to .* but it holds no tinyshakespeare.txt"):
        load_text("shakespeare")


def test_download_once_into_the_default_cache(offline, monkeypatch):
    calls = fake_download(monkeypatch)
    text, source = load_text("shakespeare")
    cached = offline / "xdg" / "minilm" / "tinyshakespeare.txt"
    assert text == FAKE_CORPUS.decode()
    assert cached.read_bytes() == FAKE_CORPUS
    assert os.listdir(cached.parent) == ["tinyshakespeare.txt"]           # no temporary file left
    assert calls == [(data.SHAKESPEARE_URL, data.DOWNLOAD_TIMEOUT_S)]
    assert "downloaded" in source
    text_again, source_again = load_text("shakespeare")
    assert text_again == text and len(calls) == 1                           # the cache, not the network
    assert "downloaded" not in source_again


def test_download_into_an_explicit_cache_dir(offline, monkeypatch):
    fake_download(monkeypatch)
    load_text("shakespeare", cache_dir=offline / "mine")
    assert (offline / "mine" / "tinyshakespeare.txt").read_bytes() == FAKE_CORPUS


def test_an_unwritable_cache_warns_and_still_returns_the_text(offline, monkeypatch):
    fake_download(monkeypatch)
    (offline / "a_file").write_text("not a folder")
    with pytest.warns(UserWarning, match=r"could not cache tiny Shakespeare"):
        text, source = load_text("shakespeare", cache_dir=offline / "a_file" / "cache")
    assert source == f"tiny Shakespeare, downloaded from {data.SHAKESPEARE_URL}"        # saved nowhere
    assert text == FAKE_CORPUS.decode()


@pytest.mark.parametrize("failure", [urllib.error.URLError("Name or service not known"), TimeoutError("timed out")])
def test_failed_download_without_cache_says_how_to_use_a_local_file(offline, monkeypatch, failure):
    def urlopen(url, timeout=None):
        raise failure
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    with pytest.raises(RuntimeError, match=r"could not download tiny Shakespeare") as info:
        load_text("shakespeare", cache_dir=offline / "cache")
    assert "--data PATH" in str(info.value)
    assert "MINILM_DATA_DIR" in str(info.value)
    assert not (offline / "cache" / "tinyshakespeare.txt").exists()


def test_checksum_mismatch_is_an_error_and_saves_nothing(offline, monkeypatch):
    fake_download(monkeypatch, checksum="0" * 64)
    with pytest.raises(RuntimeError, match=r"has SHA-256 [0-9a-f]{64}, expected 0{64}; nothing was saved") as info:
        load_text("shakespeare", cache_dir=offline / "cache")
    assert "MINILM_DATA_DIR" in str(info.value)
    assert not (offline / "cache").exists() or not os.listdir(offline / "cache")


# ---------------------------------------------------------------------------------------------
# split


def test_split_is_nanogpts_ninety_ten():
    train, val = split(np.arange(100))
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    assert train.dtype == np.int64
    train, val = split(np.arange(15))                   # int(0.9 * 15) = int(13.5): rounded down, as nanoGPT
    assert (len(train), len(val)) == (13, 2)


@pytest.mark.parametrize("ids,fraction,message", [
    (np.arange(10), 1.0, r"split: argument 'train_fraction' must be a number in \(0, 1\), got 1.0"),
    (np.arange(10), 0.0, r"split: argument 'train_fraction' must be a number in \(0, 1\), got 0.0"),
    (np.arange(1), 0.9, r"split: the corpus has 1 tokens, too few to split"),
    (np.zeros((2, 2), dtype=np.int64), 0.5, r"split: argument 'ids' must be a 1-D array of token ids, got shape"),
])
def test_split_bad_input(ids, fraction, message):
    with pytest.raises(ValueError, match=message):
        split(ids, fraction)


def test_split_takes_a_numpy_fraction():
    """np.float32(0.9) had been refused as "not a number in (0, 1)". The product is taken in float64
    on every NumPy: float32(0.9) is 0.899999976, so 89 of 100 (NumPy 2 had rounded the float32
    product up to 90, NumPy 1 not)."""
    assert [len(part) for part in split(np.arange(100), np.float64(0.9))] == [90, 10]
    assert [len(part) for part in split(np.arange(100), np.float32(0.5))] == [50, 50]
    assert [len(part) for part in split(np.arange(100), np.float32(0.9))] == [89, 11]
    with pytest.raises(ValueError, match=r"'train_fraction' must be a number in \(0, 1\), got True"):
        split(np.arange(100), True)


# ---------------------------------------------------------------------------------------------
# RandomBatches


def test_random_batches_are_windows_and_y_is_x_shifted():
    corpus = np.arange(1000)                            # token i is i: a window is a run of consecutive ints
    x, y = RandomBatches(corpus, block_size=16, batch_size=8, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(16))
    np.testing.assert_array_equal(y, x + 1)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 60), st.integers(0, 2**32 - 1))
def test_random_batches_stay_inside_the_corpus(T, B, extra, seed):
    corpus = np.random.default_rng(seed).integers(0, 5, size=T + 1 + extra)
    batches = RandomBatches(corpus, block_size=T, batch_size=B, seed=seed)
    for _ in range(3):
        x, y = batches.next_batch()
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        offsets = [next(i for i in range(extra + 1) if (corpus[i:i + T] == row).all()) for row in x]
        assert all(0 <= i <= extra for i in offsets)


def test_random_batches_are_determined_by_the_seed():
    corpus = np.arange(500)
    a, b, c = (RandomBatches(corpus, 8, 4, seed=s) for s in (7, 7, 8))
    first_a, first_b, first_c = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    np.testing.assert_array_equal(first_a, first_b)
    assert not np.array_equal(first_a, first_c)


def test_random_batches_resume_exactly_after_state_restore():
    corpus = np.arange(500)
    run = RandomBatches(corpus, 8, 4, seed=3)
    for _ in range(5):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))               # as stored in a checkpoint's meta
    resumed = RandomBatches(corpus, 8, 4, seed=12345)
    resumed.load_state_dict(state)
    for _ in range(3):
        for a, b in zip(run.next_batch(), resumed.next_batch()):
            np.testing.assert_array_equal(a, b)


def test_random_batches_on_a_corpus_of_exactly_one_block():
    x, y = RandomBatches(np.arange(9), block_size=8, batch_size=3, seed=0).next_batch()
    np.testing.assert_array_equal(x, np.tile(np.arange(8), (3, 1)))
    np.testing.assert_array_equal(y, x + 1)


@pytest.mark.parametrize("make,error,message", [
    (lambda: RandomBatches(np.arange(8), 8, 2, seed=0), ValueError,
     r"RandomBatches: the corpus has 8 tokens, but block_size = 8 needs at least block_size \+ 1 = 9"),
    (lambda: RandomBatches(np.arange(80), 0, 2, seed=0), ValueError, r"option 'block_size' must be a positive integer"),
    (lambda: RandomBatches(np.arange(80), 8, 2.0, seed=0), ValueError, r"option 'batch_size' must be a positive integer"),
    (lambda: RandomBatches(np.arange(80), 8, 2, seed=-1), ValueError, r"option 'seed' must be a non-negative integer"),
    (lambda: RandomBatches(np.linspace(0, 1, 80), 8, 2, seed=0), TypeError, r"argument 'data' must be an integer"),
    (lambda: RandomBatches(np.arange(80), 8, 2, seed=0).load_state_dict({}), ValueError,
     r"RandomBatches.load_state_dict: argument 'state' is not a state_dict"),
])
def test_random_batches_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_evaluation_batches_are_fixed_and_leave_training_batches_alone():
    corpus = np.arange(300)
    first = evaluation_batches(corpus, 8, 4, n_batches=3, seed=1)
    again = evaluation_batches(corpus, 8, 4, n_batches=3, seed=1)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    with_eval, without_eval = RandomBatches(corpus, 8, 4, seed=5), RandomBatches(corpus, 8, 4, seed=5)
    with_eval.next_batch(), without_eval.next_batch()
    evaluation_batches(corpus, 8, 4, n_batches=3)
    np.testing.assert_array_equal(with_eval.next_batch()[0], without_eval.next_batch()[0])
    # the seed picks the batches: those of RandomBatches with that seed (train and val use different ones)
    expected = RandomBatches(corpus, 8, 4, seed=1)
    for x, y in first:
        x_want, y_want = expected.next_batch()
        np.testing.assert_array_equal(x, x_want)
        np.testing.assert_array_equal(y, y_want)
    assert not np.array_equal(evaluation_batches(corpus, 8, 4, n_batches=1, seed=2)[0][0], first[0][0])


# ---------------------------------------------------------------------------------------------
# ContiguousBatches


def test_contiguous_streams_continue_and_reset_after_wrapping():
    corpus = np.arange(2 * 3 * 4 + 5)                  # 2 streams of 14 inputs: 3 chunks of 4, remainder dropped
    batches = ContiguousBatches(corpus, block_size=4, batch_size=2)
    assert batches.n_chunks == 3
    chunks = [batches.next_batch() for _ in range(4)]
    assert [reset for _, _, reset in chunks] == [True, False, False, True]
    (x0, y0, _), (x1, y1, _) = chunks[0], chunks[1]
    np.testing.assert_array_equal(y1, x1 + 1)
    np.testing.assert_array_equal(x0, [[0, 1, 2, 3], [14, 15, 16, 17]])
    np.testing.assert_array_equal(y0, x0 + 1)
    np.testing.assert_array_equal(x1[:, 0], y0[:, -1])                 # each stream goes on where it stopped
    np.testing.assert_array_equal(chunks[3][0], x0)                    # wrapped around to the start


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10), st.integers(1, 5), st.integers(0, 50), st.integers(0, 2**32 - 1))
def test_contiguous_epoch_covers_each_stream_in_order(T, B, extra, seed):
    corpus = np.random.default_rng(seed).integers(0, 7, size=B * T + 1 + extra)
    batches = ContiguousBatches(corpus, block_size=T, batch_size=B)
    L = (len(corpus) - 1) // B
    epoch = [batches.next_batch() for _ in range(batches.n_chunks)]
    xs = np.concatenate([x for x, _, _ in epoch], axis=1)               # (B, n_chunks * T)
    ys = np.concatenate([y for _, y, _ in epoch], axis=1)
    for b in range(B):
        np.testing.assert_array_equal(xs[b], corpus[b * L:b * L + xs.shape[1]])
        np.testing.assert_array_equal(ys[b], corpus[b * L + 1:b * L + 1 + xs.shape[1]])
    assert [r for _, _, r in epoch] == [True] + [False] * (batches.n_chunks - 1)


def test_contiguous_batches_resume_exactly():
    corpus = np.arange(200)
    run = ContiguousBatches(corpus, 5, 3)
    for _ in range(4):
        run.next_batch()
    resumed = ContiguousBatches(corpus, 5, 3)
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    for _ in range(run.n_chunks + 2):                                    # across a wrap-around
        (xa, ya, ra), (xb, yb, rb) = run.next_batch(), resumed.next_batch()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert ra == rb


@pytest.mark.parametrize("make,message", [
    (lambda: ContiguousBatches(np.arange(16), block_size=4, batch_size=4),
     r"the corpus has 16 tokens; cut into batch_size = 4 streams that is 4 tokens per stream, fewer than "
     r"block_size \+ 1 = 5; needs at least batch_size \* block_size \+ 1 = 17 tokens"),
    (lambda: ContiguousBatches(np.arange(16), block_size=4, batch_size=0), r"option 'batch_size' must be a positive"),
    (lambda: ContiguousBatches(np.arange(17), 4, 4).load_state_dict({"chunk": 1}),
     r"ContiguousBatches.load_state_dict: argument 'state' must be \{'chunk': int in \[0, 1\)\}"),
    (lambda: ContiguousBatches(np.arange(17), 4, 4).load_state_dict({"chunk": False}),          # had been taken as 0
     r"ContiguousBatches.load_state_dict: argument 'state' must be \{'chunk': int in \[0, 1\)\}, got \{'chunk': False\}"),
])
def test_contiguous_batches_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_contiguous_batches_on_the_minimum_corpus():
    x, y, reset = ContiguousBatches(np.arange(17), block_size=4, batch_size=4).next_batch()
    np.testing.assert_array_equal(x, np.arange(16).reshape(4, 4))
    np.testing.assert_array_equal(y, x + 1)
    assert reset


def test_an_empty_minilm_data_dir_counts_as_unset(offline, monkeypatch):
    """``MINILM_DATA_DIR= minilm train ...`` (set, but to nothing) reads the cache, as when it is unset;
    it does not look for tinyshakespeare.txt in the current folder."""
    calls = fake_download(monkeypatch)
    monkeypatch.setenv("MINILM_DATA_DIR", "")
    text, source = load_text("shakespeare")
    assert text == FAKE_CORPUS.decode() and len(calls) == 1
    assert (offline / "xdg" / "minilm" / "tinyshakespeare.txt").read_bytes() == FAKE_CORPUS


def test_utf16_text_without_a_byte_order_mark_is_warned_about(tmp_path):
    """ASCII in UTF-16 with no byte-order mark is valid UTF-8, every other character a NUL: it had
    trained silently on a NUL between every two characters."""
    path = tmp_path / "corpus.txt"
    path.write_bytes("to be or not to be\n".encode("utf-16-le"))
    with pytest.warns(UserWarning, match=r"which is 50% NUL characters: if it is UTF-16 text, convert it to UTF-8"):
        load_text(str(path))


@pytest.mark.parametrize("damaged", [b"", b"\xff\xfe garbage"])
def test_an_empty_or_undecodable_cached_copy_is_downloaded_again(offline, monkeypatch, damaged):
    """A failed `wget -O` leaves an empty file: a damaged cached copy, fetched again like one cut
    short, where it had stopped the run with a message about a --data the user never gave."""
    calls = fake_download(monkeypatch)
    cached = offline / "xdg" / "minilm" / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(damaged)
    with pytest.warns(UserWarning, match=r"the cached .* downloading it again"):
        text, _ = load_text("shakespeare")
    assert text == FAKE_CORPUS.decode() and len(calls) == 1 and cached.read_bytes() == FAKE_CORPUS


def test_a_failed_download_over_a_damaged_copy_says_so(offline, monkeypatch):
    cached = offline / "xdg" / "minilm" / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")

    def fail(url, timeout=None):
        raise data.urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", fail)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=rf"and the cached copy {cached} is damaged; "
                                                                      rf"use a local copy instead"):
        load_text("shakespeare")


@pytest.mark.parametrize("damaged, reason", [(b"", "empty"), (b"\xff\xfe", "not UTF-8")])
def test_a_damaged_file_in_minilm_data_dir_names_the_variable_not_data(offline, monkeypatch, damaged, reason):
    (offline / "tinyshakespeare.txt").write_bytes(damaged)
    monkeypatch.setenv("MINILM_DATA_DIR", str(offline))
    with pytest.raises(ValueError, match=reason) as info:
        load_text("shakespeare")
    assert f"MINILM_DATA_DIR is set to '{offline}'" in str(info.value) and "--data" not in str(info.value)
    assert str(info.value).endswith("or unset MINILM_DATA_DIR")


def test_a_download_cut_off_part_way_says_how_to_use_a_local_file(offline, monkeypatch):
    """http.client's IncompleteRead (the connection dropped mid-file) is no OSError: it had come
    through as a traceback."""
    import http.client

    class Response(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b"First", 1000)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: Response())
    with pytest.raises(RuntimeError, match=r"could not download tiny Shakespeare.*IncompleteRead.*--data PATH"):
        load_text("shakespeare", cache_dir=offline / "cache")


def test_a_cached_copy_of_nul_bytes_is_fetched_again_without_the_utf16_advice(offline, monkeypatch, recwarn):
    """A download cut off into a file of zeros is a damaged copy: downloaded again, and the user,
    who never made that file, is not told to convert it from UTF-16."""
    fake_download(monkeypatch)
    cached = offline / "xdg" / "minilm" / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\0" * 1000)
    text, _ = load_text("shakespeare")
    assert text == FAKE_CORPUS.decode()
    said = [str(w.message) for w in recwarn]
    assert len(said) == 1 and "downloading it again" in said[0]


@pytest.mark.parametrize("n_batches", [0, -1, 2.0, None])
def test_evaluation_batches_takes_a_positive_integer_count(n_batches):
    with pytest.raises(ValueError, match=rf"^evaluation_batches: option 'n_batches' must be a positive integer, "
                                         rf"got {n_batches!r}$"):
        evaluation_batches(np.arange(300), 8, 4, n_batches=n_batches)


def test_encode_of_a_corpus_holds_no_temporaries_of_its_size(monkeypatch):
    """A corpus of N characters encodes to 8N bytes of ids; encode's temporaries (code points,
    positions, the gathered ids and a copy of them) had come to 29N bytes at once, 3.6 times the ids:
    3 GiB for a 100 MB corpus. Piece by piece they stay a piece's size."""
    import tracemalloc
    monkeypatch.setattr(data, "ENCODE_CHUNK", 1 << 16)
    tok = CharTokenizer("abc\n")
    text = "abc\n" * 1_000_000
    tracemalloc.start()
    try:
        ids = tok.encode(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert peak < 1.2 * ids.nbytes, f"peak {peak / ids.nbytes:.2f} times the ids"
    expected = np.random.default_rng(0).integers(0, 4, 5 * (1 << 16) + 7)      # 6 pieces, each its own text
    mixed = "".join(tok.chars[i] for i in expected.tolist())
    np.testing.assert_array_equal(tok.encode(mixed), expected)                  # every piece, in its place
    with pytest.raises(ValueError, match=r"has 1 character that is not in the model's vocabulary: 'é' \(U\+00E9\)"):
        tok.encode(mixed + "é", what="x")                                       # in the last piece
