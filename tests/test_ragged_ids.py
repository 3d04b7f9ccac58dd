"""Token ids given as nested lists of unequal rows: every entry point that takes lists of ids names
itself and the argument, as ``generate`` does for a ragged prompt, rather than NumPy's
"setting an array element with a sequence"."""
import numpy as np
import pytest

from minilm.evaluate import evaluate
from minilm.models import GPT, RNNLM, GPTConfig, RNNConfig
from minilm.parallel import BatchParallel

pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py

RAGGED = [[1, 2], [3]]
GPT_TINY = dict(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=2)
RNN_TINY = dict(vocab_size=5, cell="gru", n_layer=1, hidden_size=2, n_embd=2)


def _calls():
    gpt, rnn = GPT(GPTConfig(**GPT_TINY)), RNNLM(RNNConfig(**RNN_TINY))
    return [
        ("GPT.forward", "idx", lambda: gpt.forward(RAGGED)),
        ("GPT.forward", "targets", lambda: gpt.forward([[1, 2], [3, 4]], targets=RAGGED)),
        ("GPT.forward_step", "idx_new", lambda: gpt.forward_step(RAGGED)),
        ("RNNLM.forward", "idx", lambda: rnn.forward(RAGGED)),
        ("RNNLM.forward", "targets", lambda: rnn.forward([[1, 2], [3, 4]], targets=RAGGED)),
        ("RNNLM.forward_step", "idx_new", lambda: rnn.forward_step(RAGGED)),
        ("GPT.forward", "idx", lambda: BatchParallel(gpt, 2).forward(RAGGED)),
    ]


@pytest.mark.parametrize("i", range(7))
def test_ragged_ids_are_refused_by_name(i):
    op, name, call = _calls()[i]
    with pytest.raises(TypeError, match=rf"^{op}: argument '{name}' must be an array of token ids \(nested lists: "
                                        rf"rows of one length\), got a list that is not one array$"):
        call()


def test_evaluate_refuses_ragged_ids_by_name():
    with pytest.raises(ValueError, match=r"^evaluate: argument 'ids' must be a 1-D sequence of integer token ids, "
                                         r"got a list that is not one array$"):
        evaluate(GPT(GPTConfig(**GPT_TINY)), [[1, 2], [3]], block_size=2, batch_size=1)


class _DeviceIds:
    """As a cupy array on a CPU backend: one array, with a shape, that NumPy may not convert implicitly."""
    shape, ndim, dtype = (1, 2), 2, np.dtype(np.int64)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")


@pytest.mark.parametrize("argument", ["idx", "targets"])
def test_an_array_of_another_module_is_not_called_ragged(argument):
    """A cupy array given to a model on a CPU backend is one array, not nested lists of unequal rows:
    the error says what NumPy could not take, and keeps cupy's own words on what to do."""
    gpt = GPT(GPTConfig(**GPT_TINY))
    args = (_DeviceIds(),) if argument == "idx" else ([[1, 2]],)
    kwargs = {} if argument == "idx" else {"targets": _DeviceIds()}
    with pytest.raises(TypeError, match=rf"^GPT.forward: argument '{argument}' must be a numpy array of token ids on "
                                        rf"this backend, got a .*_DeviceIds \(Implicit conversion .*\.get\(\)"):
        gpt.forward(*args, **kwargs)
