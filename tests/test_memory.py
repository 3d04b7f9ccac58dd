"""Memory of a training step: a model's forward lets go of the previous batch's caches before it
makes the new batch's, so that two batches' activations are never held at once."""
import weakref

import numpy as np
import pytest

from minilm import ops
from minilm.models import GPT, RNNLM, GPTConfig, RNNConfig
from minilm.parallel import BatchParallel

V, B, T = 7, 4, 5
MODELS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=V, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.1)),
    "lstm": lambda: RNNLM(RNNConfig(vocab_size=V, cell="lstm", n_layer=2, hidden_size=6, n_embd=5, dropout=0.1)),
}

pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("parallel", [False, True])
def test_a_forward_frees_the_previous_batchs_caches_before_making_its_own(kind, parallel, monkeypatch):
    model = MODELS[kind]()
    runner = BatchParallel(model, 2) if parallel else model
    owner = runner._replicas[0] if parallel else model
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    runner.forward(idx, targets, train=True, rng=1)
    runner.backward()
    old = weakref.ref(owner._cache.loss.p)                   # an array that only the old cache holds
    alive_at_first_op = []
    embedding_forward = ops.embedding_forward

    def first_op(*args, **kwargs):                           # the forward's first op: nothing of the new batch yet
        alive_at_first_op.append(old() is not None)
        return embedding_forward(*args, **kwargs)

    monkeypatch.setattr(ops, "embedding_forward", first_op)
    runner.forward(idx.copy(), targets, train=True, rng=2)
    assert alive_at_first_op and not any(alive_at_first_op)
