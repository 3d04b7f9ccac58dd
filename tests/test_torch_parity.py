"""Whole models against PyTorch: from the same weights, on the same batches, the same training.

The PyTorch peers of ``minilm.bench.peers`` (nanoGPT's GPT; embedding, nn.LSTM / nn.GRU / nn.RNN
and a linear head) start from random weights that are copied into a minilm model
(``peers.minilm_arrays``). Both then train for a few steps on the same random batches with the
same recipe (AdamW with weight decay on the 2-D weights, warm-up and cosine schedule, gradient
clipping by global norm), in float64. Every step's loss, the first step's gradients and the
final weights must agree. This checks the models' hand-written backward calls, the optimizer,
the clipping and the schedule together against an independent implementation, where the op
tests check each piece alone. Skipped without PyTorch.
"""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minilm  # noqa: E402
from minilm.bench import peers  # noqa: E402
from minilm.config import preset  # noqa: E402
from minilm.models import build_model  # noqa: E402
from minilm.precision import LossScaler  # noqa: E402
from minilm.testing import relative_error  # noqa: E402
from minilm.train import apply_gradients, make_optimizer, make_schedule, model_settings  # noqa: E402

# float64 on both sides. The two differ only in the order of their sums (BLAS blocking, pairwise
# against sequential), a few ulps, ~1e-15, per op. Six steps of AdamW carry such differences
# forward nearly unchanged: its update m / (sqrt(v) + eps) is a smooth function of the gradients
# away from g = 0, and no entry of these gradients is near 0 relative to eps = 1e-8. The measured
# errors are 2e-16 to 3e-13; 1e-10 leaves a margin of 300 or more and still fails on a real
# difference: PyTorch's two LSTM biases, each moved by Adam (``peers.one_recurrent_bias``), change
# the second step's loss by 8e-6.
TOL = 1e-10
STEPS = 6
V, B, T = 13, 3, 8


def recipe(**model):
    """shakespeare-char-cpu's optimizer and schedule on a tiny model, with a short warm-up and decay."""
    return dataclasses.replace(preset("shakespeare-char-cpu"), block_size=T, batch_size=B, warmup_iters=2,
                               lr_decay_iters=STEPS, max_iters=STEPS, lr=3e-3, dropout=0.0, **model)


# Each case's clipping threshold lies among its steps' gradient norms (GPT 0.6-1.2, LSTM 0.19-0.23,
# GRU and RNN 0.26-0.34 with these seeds), so that clipped and unclipped steps are both compared.
CASES = {
    "gpt": dict(model="gpt", n_layer=2, n_head=2, n_embd=8, bias=False, grad_clip=0.75),
    "gpt with biases": dict(model="gpt", n_layer=2, n_head=2, n_embd=8, bias=True, grad_clip=0.75),
    "lstm": dict(model="lstm", n_layer=2, hidden_size=6, n_embd=5, grad_clip=0.2),
    "gru": dict(model="gru", n_layer=2, hidden_size=6, n_embd=5, grad_clip=0.3),
    "rnn": dict(model="rnn", n_layer=2, hidden_size=6, n_embd=5, grad_clip=0.3),
}


def twins(cfg, seed=0):
    """The PyTorch peer in float64 and a minilm model holding the same weights."""
    torch.manual_seed(seed)
    peer = peers.one_recurrent_bias(peers.make_model(cfg, V).double())   # minilm's parametrization
    kind, model_cfg = model_settings(cfg, V)
    model = build_model(kind, model_cfg, dtype=np.float64, seed=seed + 1)
    weights = peers.minilm_arrays(peer)
    assert sorted(weights) == sorted(model.params.layout), "the peer and the model name different parameters"
    for name, value in weights.items():
        model.params.values[name][...] = value
    return peer, model, kind


def minilm_step(model, kind, x, y, lr, cfg, optimizer):
    if kind == "rnn":
        loss = model.forward(x, y, state=None, train=True)[1]
    else:
        loss = model.forward(x, y, train=True)[1]
    model.backward(1.0)
    grads = {name: model.params.grads[name].copy() for name in model.params.layout}
    apply_gradients(model, optimizer, lr, grad_clip=cfg.grad_clip, scaler=LossScaler(enabled=False))
    return float(loss), grads


def torch_step(peer, x, y, lr, cfg, optimizer):
    """``peers.train_step``, keeping the gradients before the update for the comparison."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    _, loss = peer(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    grads = peers.minilm_arrays(peer, grads=True)
    torch.nn.utils.clip_grad_norm_(peer.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item(), grads


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_from_the_same_weights_matches_pytorch(case, backend_name):
    minilm.use(backend_name)
    cfg = recipe(**CASES[case])
    peer, model, kind = twins(cfg)
    optimizer, schedule = make_optimizer(cfg, model.params), make_schedule(cfg)
    peer_optimizer = peers.make_optimizer(peer, cfg)
    rng = np.random.default_rng(7)
    clipped = 0
    for it in range(STEPS):
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        loss, grads = minilm_step(model, kind, x, y, schedule(it), cfg, optimizer)
        peer_loss, peer_grads = torch_step(peer, x, y, schedule(it), cfg, peer_optimizer)
        assert abs(loss - peer_loss) <= TOL * abs(peer_loss), f"step {it}: loss {loss!r} != PyTorch's {peer_loss!r}"
        if it == 0:
            for name, g in peer_grads.items():
                assert relative_error(grads[name], g) <= TOL, f"gradient of {name}"
        clipped += np.sqrt(sum(float(np.sum(g * g)) for g in peer_grads.values())) > cfg.grad_clip
    assert 0 < clipped < STEPS, "the threshold should clip some steps and not others, to compare both"
    for name, w in peers.minilm_arrays(peer).items():
        assert relative_error(model.params.values[name], w) <= TOL, f"weights {name} after {STEPS} steps"


# The recurrent cases again, trained by ``minilm train``'s own loop on contiguous batches, whose
# state it carries from batch to batch, against a PyTorch loop that carries it as PyTorch's
# word_language_model example does: the state of batch i starts batch i + 1, detached (no
# gradient flows back into batch i), and starts from zeros where the streams begin the text again.
# A text of 301 characters of 13 kinds has a training split of 270, B = 3 streams of 89 inputs, 11
# chunks of T = 8: 40 steps cross three wrap-arounds, with an evaluation, which must leave the
# carried state alone, every 3 steps.
# Over 40 steps the float64 differences (a few ulps an op) grow to 7e-14 at most (measured); TOL.
CARRIED_STEPS = 40


def _text_of_13_characters(path):
    rng = np.random.default_rng(5)
    path.write_text("".join(rng.choice(list("abcdefghijkl "), 301)), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("case", ["lstm", "gru", "rnn"])
def test_a_contiguous_run_carries_its_state_as_a_pytorch_loop_does(case, backend_name, tmp_path, monkeypatch):
    import torch.nn.functional as F
    from minilm import checkpoint, train
    from minilm.data import CharTokenizer, ContiguousBatches, split
    minilm.use(backend_name)
    data = _text_of_13_characters(tmp_path / "text.txt")
    tokenizer = CharTokenizer.from_text(open(data, encoding="utf-8").read())
    assert tokenizer.vocab_size == V
    cfg = dataclasses.replace(recipe(**CASES[case]), dtype="float64", batching="contiguous", max_iters=CARRIED_STEPS,
                              lr_decay_iters=CARRIED_STEPS, eval_interval=3, eval_iters=1)
    peer, model, _ = twins(cfg)
    start = {name: value.copy() for name, value in model.params.values.items()}
    build = train.build_model

    def from_the_peers_weights(*args, **kwargs):                 # minilm train's model, the peer's weights
        built = build(*args, **kwargs)
        for name, value in start.items():
            built.params.values[name][...] = value
        return built
    monkeypatch.setattr(train, "build_model", from_the_peers_weights)
    train.train(cfg, data=data, out_dir=tmp_path / "run", progress=False, log=lambda line: None)
    saved = checkpoint.load(tmp_path / "run" / "last.npz")

    optimizer, schedule = peers.make_optimizer(peer, cfg), make_schedule(cfg)
    train_ids, _ = split(tokenizer.encode(open(data, encoding="utf-8").read()), 0.9)
    batches, hidden, resets = ContiguousBatches(train_ids, T, B), None, 0
    for it in range(CARRIED_STEPS):
        x, y, reset = batches.next_batch()
        hidden, resets = (None, resets + 1) if reset else (hidden, resets)
        for group in optimizer.param_groups:
            group["lr"] = schedule(it)
        optimizer.zero_grad(set_to_none=True)
        h, hidden = peer.rnn(peer.embed(torch.from_numpy(x)), hidden)
        hidden = tuple(s.detach() for s in hidden) if isinstance(hidden, tuple) else hidden.detach()
        logits = peer.head(h)
        F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), cfg.grad_clip)
        optimizer.step()
    assert resets == 4, "the run should start the streams over more than once"
    model.params.load(saved.params)
    for name, w in peers.minilm_arrays(peer).items():
        assert relative_error(model.params.values[name], w) <= TOL, f"weights {name} after {CARRIED_STEPS} steps"
    # the state the run saved to go on with: per layer (h,), or (h, c) for an LSTM, each (B, H)
    theirs = hidden if isinstance(hidden, tuple) else (hidden,)             # each (layers, B, H)
    for layer, ours in enumerate(saved.meta["rnn_state"]):
        for s, t in zip(ours, theirs):
            assert relative_error(np.array(s), t[layer].numpy()) <= TOL, f"the carried state of layer {layer}"


# Dropout against PyTorch: the masks minilm draws (minilm.reference.dropout._uniform, which both
# CPU backends call) are recorded and handed, in the order drawn, to the peer's dropout calls, so
# that the two models drop the same elements. One step of each case, in float64, to TOL: what is
# compared is where dropout sits and its math (the 1/(1 - p) scale, the backward's mask).
DROPOUT = 0.2


class _RecurrentPeerWithDropout(torch.nn.Module):
    """The recurrent peer with dropout after every layer, the last too, where minilm's RNNLM has it
    (char-rnn's placement; nn.LSTM's own ``dropout`` skips the last layer). Layer by layer, each a
    one-layer module holding the peer's own tensors, so that the gradients land in the peer."""

    def __init__(self, peer):
        super().__init__()
        self.peer = peer

    def forward(self, idx, targets):
        import torch.nn.functional as F
        rnn, x = self.peer.rnn, self.peer.embed(idx)
        for layer in range(rnn.num_layers):
            one = type(rnn)(x.shape[-1], rnn.hidden_size, 1, batch_first=True).double()
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                setattr(one, f"{name}_l0", getattr(rnn, f"{name}_l{layer}"))
            x = F.dropout(one(x)[0], DROPOUT, True)
        logits = self.peer.head(x)
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_dropout_with_pytorchs_masks_gives_pytorchs_step(case, backend_name, monkeypatch):
    import math
    import torch.nn.functional as F
    from minilm.reference import dropout as reference_dropout
    minilm.use(backend_name)
    cfg = dataclasses.replace(recipe(**CASES[case]), dropout=DROPOUT)
    peer, model, kind = twins(cfg)
    masks, draw = [], reference_dropout._uniform

    def recording(xp, rng, shape):                               # minilm's draw, its mask kept
        u = draw(xp, rng, shape)
        masks.append(u < 1.0 - DROPOUT)
        return u

    def replayed(shape):
        mask = masks.pop(0)
        assert mask.shape == tuple(shape), "the peer drops out elsewhere than minilm"
        return torch.from_numpy(mask.astype(np.float64))

    def peer_dropout(x, p=0.5, training=True, inplace=False):
        return x * replayed(x.shape) / (1 - p) if training and p else x

    def peer_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **unused):
        att = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # (B, NH, T, T)
        T_ = att.shape[-1]
        att = att.masked_fill(~torch.ones(T_, T_, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        return (att * replayed(att.shape) / (1 - dropout_p) if dropout_p else att) @ v
    monkeypatch.setattr(reference_dropout, "_uniform", recording)
    monkeypatch.setattr(F, "dropout", peer_dropout)
    monkeypatch.setattr(F, "scaled_dot_product_attention", peer_attention)
    rng = np.random.default_rng(7)
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    loss = float(model.forward(x, y, train=True, rng=np.random.default_rng(3))[1])
    model.backward(1.0)
    drawn = len(masks)
    assert drawn == (1 + 3 * cfg.n_layer if kind == "gpt" else cfg.n_layer)    # every place dropout sits
    peer.train()
    _, peer_loss = (peer if kind == "gpt" else _RecurrentPeerWithDropout(peer))(torch.from_numpy(x), torch.from_numpy(y))
    peer_loss.backward()
    assert not masks, "minilm drops out where the peer does not"
    assert abs(loss - peer_loss.item()) <= TOL * abs(peer_loss.item())
    for name, g in peers.minilm_arrays(peer, grads=True).items():
        assert relative_error(model.params.grads[name], g) <= TOL, f"gradient of {name}"
