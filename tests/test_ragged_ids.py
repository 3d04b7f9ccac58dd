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
