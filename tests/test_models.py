"""Whole-model checks: GPT and RNNLM backward against numerical gradients, weight tying,
overfitting one batch, the key/value cache and recurrent state, dtypes, and bad input."""
import dataclasses
import json

import numpy as np
import pytest

from minilm.gradcheck import DEFAULT_TOL, gradcheck
from minilm.models import GPT, RNNLM, GPTConfig, RNNConfig, build_model, model_from_meta, model_meta, param_count
from minilm.parallel import BatchParallel

# DESIGN's bound for a float64 gradient check (the five-point stencil's own error is ~1e-10 or less)
GRAD_TOL = DEFAULT_TOL
# random directions in the flat parameter space per check (plus the gradient's own direction)
N_DIRECTIONS = 4
# finite-difference step for a whole model: its loss is O(1) while the derivative along a random
# direction can be ~1e-3, so at gradcheck's h = 1e-5 round-off (~1e-16 |L| / h) reaches ~3e-8
# relative; at h = 1e-3 the stencil's O(h^4) truncation does (~7e-8 along the gradient of a GPT).
# h = 1e-4 keeps both near 1e-10 (measured on these configs).
MODEL_EPS = 1e-4
# float64 logits of two computations that differ only in the order of the same operations
# (cached vs full attention, chunked vs whole recurrence): rounding is ~1e-16 per operation
SAME_LOGITS_TOL = 1e-12
# the overfit test: a loss below this means the model puts ~96% probability on every target of
# the batch, from ln(7) ~ 1.95 at the start; a broken gradient stalls far above it
OVERFIT_LOSS = 0.05
# ... and it starts near chance, ln(7) ~ 1.95: a first loss under this would mean nothing was left to learn
CHANCE_LOSS_MIN = 1.5

V, B, T = 7, 2, 5
GPT_TINY = dict(vocab_size=V, block_size=6, n_layer=2, n_head=2, n_embd=8)
RNN_TINY = dict(vocab_size=V, n_layer=2, hidden_size=6, n_embd=5)


pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py


def batch(seed=0, T=T):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    return idx, targets


def check_model_gradient(model, idx, targets, **forward_kwargs):
    """model.backward() against the numerical gradient of the loss along random directions in the
    flat parameter space; a fresh Generator per forward keeps the dropout masks fixed."""
    def forward(theta):
        model.params.data[...] = theta
        out = model.forward(idx, targets, train=True, rng=np.random.default_rng(1234), **forward_kwargs)
        return out[1], None

    def backward(dloss, cache):
        return (dloss * model.backward().copy(),)

    report = gradcheck(forward, backward, (model.params.data.copy(),), max_elements=0, eps=MODEL_EPS,
                       n_directions=N_DIRECTIONS, tol=GRAD_TOL, name=type(model).__name__)
    assert report.passed, str(report)
    assert report.arguments[0].mode == "directions"


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_gpt_backward_equals_numerical_gradient(dropout, bias):
    model = GPT(GPTConfig(**GPT_TINY, dropout=dropout, bias=bias), dtype=np.float64, seed=1)
    model.params.data[...] += np.random.default_rng(5).normal(0, 0.1, model.params.size)  # off the init's symmetry
    idx, targets = batch()
    targets[0, 1] = -100                                    # an ignored position
    check_model_gradient(model, idx, targets)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnnlm_backward_equals_numerical_gradient(cell, dropout):
    model = RNNLM(RNNConfig(**RNN_TINY, cell=cell, dropout=dropout), dtype=np.float64, seed=2)
    idx, targets = batch(1)
    state = tuple(tuple(np.random.default_rng(l + 10 * i).normal(0, 0.5, (B, 6)) for i in range(len(s)))
                  for l, s in enumerate(model.init_state(B)))   # a carried-over state: a constant input
    check_model_gradient(model, idx, targets, state=state)


def test_tied_wte_receives_head_and_embedding_gradients():
    model = GPT(GPTConfig(**GPT_TINY), dtype=np.float64, seed=3)
    idx, targets = batch(2)
    idx[idx == 6] = 0                                       # token 6 never enters: its row only feeds the head

    def forward(wte):
        model.params["wte"][...] = wte
        return model.forward(idx, targets)[1], None

    def backward(dloss, cache):
        model.backward()
        return (dloss * model.params.grads["wte"].copy(),)

    # element by element: a missing share (head or lookup) shows up in the rows it touches
    report = gradcheck(forward, backward, (model.params["wte"].copy(),), tol=GRAD_TOL, name="GPT wte")
    assert report.passed, str(report)
    assert report.arguments[0].mode == "elements"

    # the two shares, separately: the head's is xf^T dlogits, the lookup's is what remains
    logits, _ = model.forward(idx, targets)
    dwte = model.backward()[model.params.slice("wte")].reshape(V, -1)
    xf = model._cache.lm_head.x                              # (B, T, C) the head's input, ln_f(x)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlogits = (p - np.eye(V)[targets]) / targets.size       # (B, T, V) of the mean cross-entropy
    head_share = np.einsum("btv,btc->vc", dlogits, xf)      # (V, C)  logits = xf @ wte.T
    lookup_share = dwte - head_share
    seen = np.isin(np.arange(V), idx)
    assert np.all(np.abs(head_share).sum(1) > 0)
    assert np.allclose(lookup_share[~seen], 0, atol=SAME_LOGITS_TOL)   # unseen rows: head only
    assert np.all(np.abs(lookup_share[seen]).sum(1) > 1e-6)          # seen rows: both


@pytest.mark.parametrize("make", [lambda: GPT(GPTConfig(**GPT_TINY), dtype=np.float64, seed=4),
                                  lambda: RNNLM(RNNConfig(**RNN_TINY, cell="lstm"), dtype=np.float64, seed=4)],
                         ids=["gpt", "lstm"])
def test_backward_replaces_what_the_gradient_buffer_held(make):
    # a backward copies each parameter's first gradient in rather than zeroing the buffer and
    # adding (Params.begin_grads): what the buffer held before must leave no trace
    model = make()
    idx, targets = batch(3)
    model.forward(idx, targets)
    clean = model.backward().copy()
    model.params.grad[...] = np.random.default_rng(0).normal(size=model.params.size)   # stale values
    model.forward(idx, targets)
    assert np.array_equal(model.backward(), clean)


def test_params_add_grad_copies_then_adds_and_zeroes_the_rest():
    from minilm.params import Params
    params = Params([("a", (2,)), ("b", (3,)), ("c", (1,))], dtype=np.float64)
    params.grad[...] = 7.0                                   # stale
    params.begin_grads()
    params.add_grad("a", np.array([1.0, 2.0]))
    params.add_grad("b", np.array([1.0, 1.0, 1.0]))
    params.add_grad("a", np.array([0.5, 0.5]))               # a second share is added
    params.end_grads()                                       # "c" got none: zero
    assert params.grad.tolist() == [1.5, 2.5, 1.0, 1.0, 1.0, 0.0]


# --- training ------------------------------------------------------------------------------------

def adam_steps(model, idx, targets, steps, lr, **forward_kwargs):
    """Plain Adam (beta1 0.9, beta2 0.999) on one fixed batch; returns the losses."""
    m = np.zeros_like(model.params.data)
    v = np.zeros_like(model.params.data)
    losses = []
    for t in range(1, steps + 1):
        _, loss, *_ = model.forward(idx, targets, train=True, **forward_kwargs)
        g = model.backward()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        model.params.data -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        losses.append(float(loss))
    return losses


def test_gpt_overfits_one_batch():
    model = GPT(GPTConfig(**dict(GPT_TINY, block_size=8, n_embd=16)), dtype=np.float64, seed=4)
    idx, targets = batch(3, T=8)
    losses = adam_steps(model, idx, targets, steps=200, lr=1e-2)
    assert losses[0] > CHANCE_LOSS_MIN
    assert losses[-1] < OVERFIT_LOSS, losses[-1]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnnlm_overfits_one_batch(cell):
    model = RNNLM(RNNConfig(**dict(RNN_TINY, hidden_size=16), cell=cell), dtype=np.float64, seed=5)
    idx, targets = batch(4, T=8)
    losses = adam_steps(model, idx, targets, steps=200, lr=3e-2)
    assert losses[0] > CHANCE_LOSS_MIN
    assert losses[-1] < OVERFIT_LOSS, losses[-1]


def test_dropout_changes_training_forward_only():
    model = GPT(GPTConfig(**GPT_TINY, dropout=0.5), dtype=np.float64)
    idx, targets = batch()
    eval_1, eval_2 = model.forward(idx)[0], model.forward(idx)[0]
    train_1 = model.forward(idx, train=True, rng=7)[0]
    train_2 = model.forward(idx, train=True, rng=7)[0]
    assert np.array_equal(eval_1, eval_2)
    assert np.array_equal(train_1, train_2)                  # same seed, same masks
    assert not np.allclose(train_1, eval_1)


class RecordingGenerator(np.random.Generator):
    """A Generator that records the shape of every ``random`` draw: dropout draws its masks there."""

    def __init__(self, seed):
        super().__init__(np.random.PCG64(seed))
        self.shapes = []

    def random(self, size=None, dtype=np.float64, out=None):
        self.shapes.append(tuple(np.atleast_1d(size)))
        return super().random(size, dtype, out)


def test_gpt_dropout_sits_where_nanogpts_does():
    """A mask on the embeddings, then per block on the attention probabilities and on the output of
    each residual branch (attn, mlp), in that order; none at evaluation. A missing dropout passes the
    gradient check (forward and backward lose it together), so the masks drawn are counted."""
    cfg = GPTConfig(**GPT_TINY, dropout=0.1)
    model = GPT(cfg, dtype=np.float64)
    idx, targets = batch()
    rng = RecordingGenerator(0)
    model.forward(idx, targets, train=True, rng=rng)
    C, NH = cfg.n_embd, cfg.n_head
    assert rng.shapes == [(B, T, C)] + [(B, NH, T, T), (B, T, C), (B, T, C)] * cfg.n_layer
    rng = RecordingGenerator(0)
    model.forward(idx, targets, rng=rng)
    assert rng.shapes == []


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnnlm_dropout_follows_every_recurrent_layer(cell):
    """char-rnn's placement: on the output of each of the L layers, the last one's included (before
    the head); none on the embeddings."""
    cfg = RNNConfig(**RNN_TINY, cell=cell, dropout=0.25)
    model = RNNLM(cfg, dtype=np.float64)
    idx, targets = batch()
    rng = RecordingGenerator(0)
    model.forward(idx, targets, train=True, rng=rng)
    assert rng.shapes == [(B, T, cfg.hidden_size)] * cfg.n_layer


# --- generation APIs -----------------------------------------------------------------------------

def test_gpt_kv_cache_step_equals_full_forward():
    model = GPT(GPTConfig(**GPT_TINY), dtype=np.float64, seed=6)
    model.params.data[...] += np.random.default_rng(0).normal(0, 0.2, model.params.size)
    idx = np.random.default_rng(1).integers(0, V, (B, 10))
    bs = model.config.block_size
    cache = model.init_kv_cache(B)
    logits, cache = model.forward_step(idx[:, :3], cache)   # a 3-token prompt, then one token a step
    assert np.allclose(logits, model.forward(idx[:, :3])[0][:, -1], rtol=0, atol=SAME_LOGITS_TOL)
    for t in range(4, 11):
        logits, cache = model.forward_step(idx[:, t - 1:t], cache)
        window = idx[:, max(0, t - bs):t]                     # past block_size: nanoGPT's crop
        full = model.forward(window)[0][:, -1]
        assert logits.shape == (B, V)
        assert np.allclose(logits, full, rtol=0, atol=SAME_LOGITS_TOL), t
    assert cache.length == bs


def test_gpt_forward_step_crops_a_long_prompt():
    model = GPT(GPTConfig(**GPT_TINY), dtype=np.float64, seed=6)
    idx = np.random.default_rng(2).integers(0, V, (1, 9))
    logits, cache = model.forward_step(idx)
    assert np.allclose(logits, model.forward(idx[:, -6:])[0][:, -1], rtol=0, atol=SAME_LOGITS_TOL)
    assert np.array_equal(cache.tokens, idx[:, -6:])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnnlm_state_carried_across_halves_equals_whole(cell):
    model = RNNLM(RNNConfig(**RNN_TINY, cell=cell), dtype=np.float64, seed=7)
    idx = np.random.default_rng(3).integers(0, V, (B, 8))
    whole, _, state_whole = model.forward(idx)
    first, _, state = model.forward(idx[:, :3])
    second, _, state = model.forward(idx[:, 3:], state=state)
    assert np.allclose(np.concatenate([first, second], axis=1), whole, rtol=0, atol=SAME_LOGITS_TOL)
    for a, b in zip(np.concatenate(state), np.concatenate(state_whole)):
        assert np.allclose(a, b, rtol=0, atol=SAME_LOGITS_TOL)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnnlm_step_equals_full_forward(cell):
    model = RNNLM(RNNConfig(**RNN_TINY, cell=cell), dtype=np.float64, seed=8)
    idx = np.random.default_rng(4).integers(0, V, (B, 6))
    full = model.forward(idx)[0]
    logits, state = model.forward_step(idx[:, :2])
    assert np.allclose(logits, full[:, 1], rtol=0, atol=SAME_LOGITS_TOL)
    for t in range(2, 6):
        logits, state = model.forward_step(idx[:, t:t + 1], state)
        assert np.allclose(logits, full[:, t], rtol=0, atol=SAME_LOGITS_TOL)


def test_float32_models_give_float32_logits():
    gpt = GPT(GPTConfig(**GPT_TINY), dtype=np.float32)
    rnn = RNNLM(RNNConfig(**RNN_TINY, cell="lstm"), dtype="float32")
    idx, targets = batch()
    logits, loss = gpt.forward(idx, targets)
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    assert gpt.backward().dtype == np.float32
    assert gpt.forward_step(idx)[0].dtype == np.float32
    logits, loss, state = rnn.forward(idx, targets)
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    assert all(a.dtype == np.float32 for s in state for a in s)
    assert rnn.forward_step(idx, state)[0].dtype == np.float32


# ten AdamW steps in float32 against float64 from the same (float32) weights and batches: the
# losses agree to float32's rounding, carried through the steps; measured <= 1.7e-7 on both tiers
F32_TRAINING_TOL = 1e-5


@pytest.mark.parametrize("tier", ["numpy", "numba"])
@pytest.mark.parametrize("kind, config", [
    ("gpt", dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)),
    ("rnn", dict(vocab_size=13, cell="lstm", n_layer=2, hidden_size=24, n_embd=8)),
    ("rnn", dict(vocab_size=13, cell="gru", n_layer=2, hidden_size=24, n_embd=8)),
])
def test_float32_training_follows_float64(kind, config, tier):
    """Every other whole-model value test runs in float64; float32 is what training runs in."""
    import minilm
    from minilm.optim import AdamW
    weights = build_model(kind, config, dtype=np.float64, seed=0).params.data.astype(np.float32)
    minilm.use(tier)
    losses = {}
    for dtype in (np.float32, np.float64):
        model = build_model(kind, config, dtype=dtype, seed=0)
        model.params.data[...] = weights
        optimizer = AdamW(model.params, lr=1e-2, weight_decay=0.1)
        rng = np.random.default_rng(0)
        losses[dtype] = []
        for _ in range(10):
            x, y = rng.integers(0, 13, (4, 16)), rng.integers(0, 13, (4, 16))
            _, loss, *_ = model.forward(x, y, train=True)
            model.backward()
            optimizer.step()
            losses[dtype].append(float(loss))
    l32, l64 = np.array(losses[np.float32]), np.array(losses[np.float64])
    assert np.max(np.abs(l32 - l64) / np.abs(l64)) <= F32_TRAINING_TOL


# --- parameters, init, rebuilding ----------------------------------------------------------------

@pytest.mark.parametrize("kind, config", [
    ("gpt", dict(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=32)),
    ("gpt", dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)),
    ("rnn", dict(vocab_size=11, cell="lstm", n_layer=2, hidden_size=24, n_embd=8)),
    ("rnn", dict(vocab_size=11, cell="gru", n_layer=3, hidden_size=24, n_embd=8)),
])
def test_param_count_is_what_the_model_holds(kind, config):
    """The count a memory estimate reads without building the model (``param_count``)."""
    assert param_count(kind, config) == build_model(kind, config).params.size

def test_an_rnnlms_count_its_gradients_zeroed_and_its_repr():
    model = RNNLM(RNNConfig(vocab_size=5, cell="lstm", n_layer=1, hidden_size=4, n_embd=4, dropout=0.0),
                  dtype=np.float32, seed=0)
    P = model.params
    # embedding 5x4, the LSTM's W_x 4x16, W_h 4x16 and b 16, the head 4x5 and 5
    assert model.n_params() == P.size == 20 + 64 + 64 + 16 + 20 + 5
    P.grad[...] = 1.0
    P.zero_grad()
    assert not P.grad.any()
    assert repr(P) == f"Params({len(list(P))} tensors, 189 values, float32)"


def test_gpt_parameters_and_init():
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=32)
    model = GPT(cfg, dtype=np.float64, seed=0)
    P = model.params
    assert list(P)[:2] == ["wte", "wpe"] and list(P)[-2:] == ["ln_f.gamma", "ln_f.beta"]
    assert P.shape("h.2.attn.W_qkv") == (32, 96) and P.shape("h.0.mlp.W_2") == (128, 32)
    assert model.n_params() == P.size
    assert model.n_params(non_embedding=True) == P.size - 16 * 32
    assert np.all(P["h.1.ln_1.gamma"] == 1) and np.all(P["h.1.attn.b_qkv"] == 0) and np.all(P["ln_f.beta"] == 0)
    # nanoGPT: N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 L)); 4096 draws estimate std to ~2%
    assert abs(P["h.0.mlp.W_1"].std() - 0.02) < 0.002
    assert abs(np.concatenate([P[f"h.{l}.mlp.W_2"].ravel() for l in range(3)]).std() - 0.02 / np.sqrt(6)) < 0.001
    # both residual projections are scaled, the attention's W_o (3 x 1024 draws) as the MLP's W_2
    assert abs(np.concatenate([P[f"h.{l}.attn.W_o"].ravel() for l in range(3)]).std() - 0.02 / np.sqrt(6)) < 0.001
    no_bias = GPT(dataclasses.replace(cfg, bias=False))
    assert not any(name.endswith(("beta", "b_qkv", "b_o", "b_1", "b_2")) for name in no_bias.params)


def test_rnnlm_parameters_and_init():
    model = RNNLM(RNNConfig(vocab_size=11, cell="gru", n_layer=2, hidden_size=16, n_embd=8), dtype=np.float64)
    P = model.params
    assert P.shape("rnn.0.W_x") == (8, 48) and P.shape("rnn.1.W_x") == (16, 48) and P.shape("rnn.1.b_h") == (48,)
    assert P.shape("lm_head.W") == (16, 11)
    # wte is nn.Embedding's N(0, 1): 88 draws estimate the std to ~8%; U(-1/4, 1/4) would give 0.14, never beyond 1/4
    assert abs(P["wte"].std() - 1.0) < 0.25 and np.abs(P["wte"]).max() > 1.0
    assert np.all(np.abs(P.data[P.size - P["lm_head.W"].size - 11:]) <= 0.25)   # U(-1/sqrt(H), 1/sqrt(H))
    lstm = RNNLM(RNNConfig(vocab_size=11, cell="lstm", n_layer=1, hidden_size=16, n_embd=8), dtype=np.float64)
    assert lstm.params.shape("rnn.0.b") == (64,)
    # PyTorch's b_ih + b_hh: the sum of two U(-1/4, 1/4) draws, in (-1/2, 1/2), spread wider than one draw
    b = lstm.params["rnn.0.b"]
    assert np.all(np.abs(b) < 0.5) and np.any(np.abs(b) > 0.25)
    assert np.all(np.abs(lstm.params["rnn.0.W_h"]) <= 0.25) and np.all(np.abs(lstm.params["lm_head.b"]) <= 0.25)


@pytest.mark.parametrize("kind, config", [("gpt", GPT_TINY), ("rnn", dict(RNN_TINY, cell="gru"))])
def test_model_from_meta_rebuilds_the_same_model(kind, config):
    model = build_model(kind, config, dtype=np.float64, seed=9)
    rebuilt = model_from_meta(model_meta(model))
    assert rebuilt.kind == kind and rebuilt.config == model.config and rebuilt.params.data.dtype == np.float64
    rebuilt.params.load(model.params.data)
    idx, _ = batch()
    assert np.array_equal(rebuilt.forward(idx)[0], model.forward(idx)[0])
    assert model.config_dict() == model_meta(model)["config"]


# --- bad input ------------------------------------------------------------------------------------

def test_configs_hold_numpy_numbers_as_python_ones_so_a_model_saves():
    gpt_cfg = GPTConfig(**dict(GPT_TINY, vocab_size=np.int64(V), dropout=np.float32(0.25)))
    rnn_cfg = RNNConfig(**dict(RNN_TINY, cell="gru", n_layer=np.int32(2), dropout=np.float64(0.5)))
    assert type(gpt_cfg.vocab_size) is int and type(gpt_cfg.dropout) is float and gpt_cfg.dropout == 0.25
    assert type(rnn_cfg.n_layer) is int and type(rnn_cfg.dropout) is float
    for model in (GPT(gpt_cfg), RNNLM(rnn_cfg)):
        json.dumps(model_meta(model))                  # what checkpoint.save writes


@pytest.mark.parametrize("change, match", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(n_embd=9), "n_embd = 9 must be divisible by n_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(bias="yes"), "bias"),
])
def test_gpt_config_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**dict(GPT_TINY, **change))


@pytest.mark.parametrize("change, match", [
    (dict(cell="transformer"), "cell"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(n_embd=True), "n_embd"),
    (dict(dropout=1), "dropout"),
])
def test_rnn_config_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        RNNConfig(**dict(RNN_TINY, **{"cell": "lstm", **change}))


def test_gpt_forward_rejects_bad_input():
    model = GPT(GPTConfig(**GPT_TINY), dtype=np.float64)
    idx, targets = batch()
    with pytest.raises(ValueError, match="'idx' has T = 7 positions, more than block_size = 6"):
        model.forward(np.zeros((1, 7), dtype=int))
    with pytest.raises(ValueError, match=r"'idx' must hold ids in \[0, 7\).*got 7"):
        model.forward(np.full((1, 3), 7))
    with pytest.raises(ValueError, match="'idx'.*got -1"):
        model.forward(np.full((1, 3), -1))
    with pytest.raises(TypeError, match="'idx' must be an integer array"):
        model.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"'idx' must have 2 dimensions \(B, T\)"):
        model.forward(np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="'idx' must hold at least one"):
        model.forward(np.zeros((1, 0), dtype=int))
    with pytest.raises(ValueError, match="'targets' must have the shape of idx"):
        model.forward(idx, targets[:, :3])
    with pytest.raises(ValueError, match="'targets' must hold ids"):
        model.forward(idx, np.full_like(targets, 9))
    with pytest.raises(TypeError, match="'rng'"):
        model.forward(idx, targets, train=True, rng="seed")
    with pytest.raises(RuntimeError, match="with targets first"):
        GPT(GPTConfig(**GPT_TINY)).backward()
    model.forward(idx)
    with pytest.raises(RuntimeError, match="with targets first"):
        model.backward()
    with pytest.raises(ValueError, match="'dtype'"):
        GPT(GPTConfig(**GPT_TINY), dtype=np.int32)
    with pytest.raises(TypeError, match="'config'"):
        GPT(GPT_TINY)
    with pytest.raises(ValueError, match=r"GPT.forward: option 'train' must be True or False, got 'no'"):
        model.forward(idx, targets, train="no")


@pytest.mark.parametrize("make", [lambda: GPT(GPTConfig(**GPT_TINY)), lambda: RNNLM(RNNConfig(cell="lstm", **RNN_TINY))],
                         ids=["GPT", "RNNLM"])
def test_backward_rejects_a_loss_scale_that_is_not_a_positive_number(make):
    model = make()
    idx, targets = batch()
    model.forward(idx, targets)
    for bad in (None, "2", 0.0, float("nan")):             # None had given a gradient of NaN
        with pytest.raises(ValueError, match=r"(GPT|RNNLM)\.backward: option 'loss_scale' must be a positive finite "
                                             r"number, got"):
            model.backward(bad)


@pytest.mark.parametrize("make", [lambda seed: GPT(GPTConfig(**GPT_TINY), seed=seed),
                                  lambda seed: RNNLM(RNNConfig(cell="gru", **RNN_TINY), seed=seed)],
                         ids=["GPT", "RNNLM"])
def test_models_reject_a_bad_seed(make):
    for seed in (-1, "a", 1.5, True, None):          # None: weights from fresh entropy, no run reproducible
        with pytest.raises(ValueError, match=r"(GPT|RNNLM): option 'seed' must be an integer >= 0, got"):
            make(seed)
    make(np.int64(3))


@pytest.mark.parametrize("make", [lambda dtype: GPT(GPTConfig(**GPT_TINY), dtype=dtype),
                                  lambda dtype: RNNLM(RNNConfig(cell="lstm", **RNN_TINY), dtype=dtype)],
                         ids=["GPT", "RNNLM"])
def test_models_reject_a_dtype_that_is_not_floating_point(make):
    with pytest.raises(ValueError, match=r"option 'dtype' must be a floating-point dtype such as float32, got int32"):
        make(np.int32)
    with pytest.raises(ValueError, match=r"option 'dtype' must be a dtype name such as 'float32', got 'floaty'"):
        make("floaty")


def test_gpt_forward_step_rejects_bad_input():
    model = GPT(GPTConfig(**GPT_TINY), dtype=np.float64)
    cache = model.init_kv_cache(2)
    with pytest.raises(ValueError, match="B = 1 sequences but 'kv_cache' holds 2"):
        model.forward_step(np.zeros((1, 1), dtype=int), cache)
    with pytest.raises(TypeError, match="'kv_cache' must be a KVCache"):
        model.forward_step(np.zeros((1, 1), dtype=int), {})
    with pytest.raises(ValueError, match="'idx_new'"):
        model.forward_step(np.full((2, 1), V), cache)
    with pytest.raises(ValueError, match="'batch'"):
        model.init_kv_cache(0)


def test_rnnlm_rejects_bad_input():
    model = RNNLM(RNNConfig(**RNN_TINY, cell="lstm"), dtype=np.float64)
    idx, targets = batch()
    with pytest.raises(ValueError, match=r"'state' must be a tuple of 2 per-layer tuples \(h, c\), as returned by "
                                         r"forward or init_state, got a tuple of 1 \(a tuple of 2\)$"):
        model.forward(idx, state=model.init_state(B)[:1])
    with pytest.raises(ValueError, match="'state' of layer 0 must hold"):
        model.forward(idx, state=model.init_state(B + 1))
    with pytest.raises(ValueError, match="'idx' must hold ids"):
        model.forward(np.full((1, 3), V))
    with pytest.raises(ValueError, match="'idx_new' must hold ids"):
        model.forward_step(np.full((1, 3), V))
    with pytest.raises(ValueError, match="'targets' must have the shape"):
        model.forward(idx, targets[:1])
    with pytest.raises(RuntimeError, match="with targets first"):
        model.backward()
    with pytest.raises(ValueError, match=r"RNNLM.forward_step: argument 'state' must be a tuple"):
        model.forward_step(idx, "s")
    with pytest.raises(ValueError, match=r"RNNLM.forward: option 'train' must be True or False, got 1"):
        model.forward(idx, targets, train=1)
    with pytest.raises(TypeError, match=r"^RNNLM: argument 'config' must be an RNNConfig, got GPTConfig$"):
        RNNLM(GPTConfig(**GPT_TINY))
    with pytest.raises(ValueError, match=r"^RNNLM.init_state: option 'batch' must be a positive integer, got 0$"):
        model.init_state(0)


def test_build_model_rejects_bad_input():
    with pytest.raises(ValueError, match="'kind'"):
        build_model("transformer", GPT_TINY)
    with pytest.raises(ValueError, match="unknown field.*n_heads"):
        build_model("gpt", dict(GPT_TINY, n_heads=2))
    with pytest.raises(ValueError, match="lacks the field.*cell"):
        build_model("rnn", RNN_TINY)
    with pytest.raises(ValueError, match="'meta'"):
        model_from_meta({"config": GPT_TINY})
    with pytest.raises(ValueError, match=r"^model_from_meta: argument 'meta' must be a dict with keys 'kind' and "
                                         r"'config' \(a dict; and optionally 'dtype'\), got a config of type list$"):
        model_from_meta({"kind": "gpt", "config": [1, 2]})
    with pytest.raises(ValueError, match="param_count: argument 'kind' must be one of"):
        param_count("transformer", GPT_TINY)
    with pytest.raises(ValueError, match="param_count: argument 'config_dict' has unknown field"):
        param_count("gpt", dict(GPT_TINY, n_heads=2))
    with pytest.raises(TypeError, match="build_model: argument 'config_dict' must be a dict, got GPTConfig"):
        build_model("gpt", GPTConfig(**GPT_TINY))


@pytest.mark.usefixtures("numpy_backend")
def test_a_sixteen_bit_gpt_without_biases_computes_in_sixteen_bits():
    """bias=False gives the LayerNorms a zero beta made in the compute dtype, not the master's."""
    model = GPT(GPTConfig(**GPT_TINY, bias=False), dtype=np.float16, seed=0)
    idx, targets = batch()
    logits, loss = model.forward(idx, targets)
    assert logits.dtype == loss.dtype == model.backward().dtype == np.float16
    assert model.forward_step(idx)[0].dtype == np.float16


def test_models_and_optimizers_say_what_they_are_in_their_repr():
    """What a notebook shows for a cell that ends in the object: its settings, not a memory address."""
    from minilm.optim import SGD, AdamW

    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    assert repr(gpt) == (f"GPT({gpt.config!r}, Params({len(gpt.params.layout)} tensors, {gpt.params.size:,} values, "
                         f"float32))")
    rnn = RNNLM(RNNConfig(vocab_size=11, cell="gru", n_layer=1, hidden_size=8, n_embd=8), dtype=np.float64)
    assert repr(rnn).startswith(f"RNNLM({rnn.config!r}, Params(") and repr(rnn).endswith(" values, float64))")
    assert repr(AdamW(gpt.params, 1e-3)) == ("AdamW(lr=0.001, betas=[0.9, 0.999], eps=1e-08, weight_decay=0.01) "
                                            "after 0 steps")
    sgd = SGD(gpt.params, 0.1)
    gpt.params.zero_grad()
    sgd.step()
    assert repr(sgd).startswith("SGD(lr=0.1, momentum=0.0, ") and repr(sgd).endswith(") after 1 step")


@pytest.mark.parametrize("rng", [-1, np.int64(-3)])
@pytest.mark.parametrize("make", [lambda: GPT(GPTConfig(**GPT_TINY, dropout=0.1)),
                                  lambda: RNNLM(RNNConfig(cell="gru", **RNN_TINY, dropout=0.1))], ids=["GPT", "RNNLM"])
def test_forward_names_a_negative_dropout_seed(make, rng):
    """A negative int seed is refused by the model, naming it and its argument, as ops.dropout_forward
    refuses one; it had reached numpy.random.default_rng, whose error names neither."""
    model = make()
    idx, targets = batch()
    said = rf"{type(model).__name__}.forward: argument 'rng' must be .*an int seed >= 0.*, got .*-\d"
    with pytest.raises(ValueError, match=said):
        model.forward(idx, targets, train=True, rng=rng)
    with pytest.raises(ValueError, match=said):                 # the numba backend's runner: the same words
        BatchParallel(model, 2).forward(idx, targets, train=True, rng=rng)
