"""The PyTorch peers: the same models, shapes and recipe as minilm's, for side-by-side timing.

Imported only when PyTorch is installed. ``TorchGPT`` is nanoGPT's model (learned positions,
pre-LayerNorm blocks, fused scaled-dot-product attention, tanh GELU as minilm's (``gelu="none"``:
nanoGPT's exact ``nn.GELU()``), tied head, nanoGPT's initialisation, and dropout where minilm's
GPT (and nanoGPT) has it: after the embeddings, on the attention weights, after the attention
projection and after the MLP); ``TorchRNNLM`` is embedding -> nn.LSTM / nn.GRU / nn.RNN -> linear
head.
On a GPU the peers run in PyTorch eager mode (no ``torch.compile``): float32, or mixed precision
with ``torch.autocast`` around the forward and the loss (and a ``GradScaler`` for float16).
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _dropout(x, p, training):
    return F.dropout(x, p, training) if p else x          # p = 0: no call at all, as in minilm


class _Block(nn.Module):
    def __init__(self, C, NH, bias, dropout=0.0, gelu="tanh"):
        super().__init__()
        self.NH, self.p, self.gelu = NH, dropout, gelu
        self.ln_1 = nn.LayerNorm(C, bias=bias)
        self.c_attn = nn.Linear(C, 3 * C, bias=bias)
        self.c_proj = nn.Linear(C, C, bias=bias)
        self.ln_2 = nn.LayerNorm(C, bias=bias)
        self.c_fc = nn.Linear(C, 4 * C, bias=bias)
        self.mlp_proj = nn.Linear(4 * C, C, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))   # (B, NH, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + _dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), self.p, self.training)
        return x + _dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=self.gelu)), self.p, self.training)


class TorchGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True, dropout=0.0, gelu="tanh"):
        super().__init__()
        self.block_size, self.p = block_size, dropout
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(_Block(n_embd, n_head, bias, dropout, gelu) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = _dropout(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)), self.p, self.training)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T                  # tied head
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0):
        """nanoGPT's generate: no key/value cache, the cropped context re-run every step."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


class TorchRNNLM(nn.Module):
    def __init__(self, vocab_size, cell, n_layer, hidden_size, n_embd):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](n_embd, hidden_size, n_layer, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx, targets=None):
        h, _ = self.rnn(self.embed(idx))
        logits = self.head(h)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def make_model(cfg, vocab_size):
    """The peer of the model a minilm TrainConfig describes."""
    if cfg.model == "gpt":
        return TorchGPT(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.dropout)
    return TorchRNNLM(vocab_size, cfg.model, cfg.n_layer, cfg.hidden_size, cfg.n_embd)


def one_recurrent_bias(model):
    """Hold b_hh of an LSTM or RNN peer at zero, untrained, so that b_ih alone is minilm's b.

    PyTorch's RNN and LSTM keep two biases, b_ih and b_hh, where minilm keeps their sum. Adam
    moves each of the two by a full step, so their sum moves twice as far as minilm's one bias:
    the two parametrizations train differently from the first update on. (A GRU's two biases are
    minilm's b_x and b_h: r multiplies b_hn, so they do not merge.) Other models: unchanged."""
    if isinstance(model, TorchRNNLM) and not isinstance(model.rnn, nn.GRU):
        for l in range(model.rnn.num_layers):
            bias = getattr(model.rnn, f"bias_hh_l{l}")
            with torch.no_grad():
                bias.zero_()
            bias.requires_grad_(False)
    return model


def minilm_arrays(model, grads=False):
    """The peer's parameters (``grads``: their gradients) as numpy arrays under minilm's names and
    in minilm's layout, to load into a minilm model's ``params.values`` (or to compare with its
    ``params.grads``): a linear's (out, in) weight transposed to (in, out), a LayerNorm's weight
    and bias as gamma and beta, and PyTorch's two recurrent biases summed into minilm's one
    (their gradients are equal, so the gradient is either's)."""
    def get(t):
        if grads and t.grad is None:                     # a frozen tensor: no gradient
            return np.zeros(tuple(t.shape))
        return (t.grad if grads else t).detach().cpu().numpy().copy()

    out = {}
    if isinstance(model, TorchGPT):
        out["wte"], out["wpe"] = get(model.wte.weight), get(model.wpe.weight)
        pairs = [("ln_1", "ln_1"), ("c_attn", "attn.W_qkv"), ("c_proj", "attn.W_o"), ("ln_2", "ln_2"),
                 ("c_fc", "mlp.W_1"), ("mlp_proj", "mlp.W_2")]
        for l, block in enumerate(model.h):
            for torch_name, name in pairs:
                module, h = getattr(block, torch_name), f"h.{l}."
                if isinstance(module, nn.LayerNorm):
                    out[h + name + ".gamma"] = get(module.weight)
                    if module.bias is not None:
                        out[h + name + ".beta"] = get(module.bias)
                else:
                    out[h + name] = get(module.weight).T
                    if module.bias is not None:
                        out[h + name.replace(".W", ".b")] = get(module.bias)
        out["ln_f.gamma"] = get(model.ln_f.weight)
        if model.ln_f.bias is not None:
            out["ln_f.beta"] = get(model.ln_f.bias)
        return out
    out["wte"] = get(model.embed.weight)
    for l in range(model.rnn.num_layers):
        n = f"rnn.{l}."
        out[n + "W_x"] = get(getattr(model.rnn, f"weight_ih_l{l}")).T
        out[n + "W_h"] = get(getattr(model.rnn, f"weight_hh_l{l}")).T
        b_ih, b_hh = get(getattr(model.rnn, f"bias_ih_l{l}")), get(getattr(model.rnn, f"bias_hh_l{l}"))
        if isinstance(model.rnn, nn.GRU):
            out[n + "b_x"], out[n + "b_h"] = b_ih, b_hh
        else:
            out[n + "b"] = b_ih if grads else b_ih + b_hh
    out["lm_head.W"], out["lm_head.b"] = get(model.head.weight).T, get(model.head.bias)
    return out


def make_optimizer(model, cfg, fused=True):
    """AdamW with weight decay on 2-D weights only (nanoGPT's configure_optimizers).

    ``fused`` (the peer's setting): PyTorch's fused AdamW kernel, on a CPU as on a GPU, its fastest
    (a GPT CPU preset step's update took 0.6-0.8 ms, against 2.8-3.3 ms for PyTorch's default and
    3.5-4.6 ms with ``foreach``); minilm's update is a fused kernel too. ``fused=False``: PyTorch's
    default, as nanoGPT's own loop gets it on a CPU (nanoGPT asks for ``fused`` on CUDA only)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **({"fused": True} if fused else {}))


def train_step(model, optimizer, x, y, lr, grad_clip, *, amp_dtype=None, scaler=None):
    """One full step: forward, backward, clip, AdamW. Returns the loss.

    ``amp_dtype`` (torch.bfloat16 or torch.float16): PyTorch's mixed precision, the forward and
    the loss under ``torch.autocast`` with float32 weights; ``scaler`` (a ``torch.amp.GradScaler``,
    for float16) scales the loss, unscales the gradients before clipping and skips a step whose
    gradients overflowed.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    autocast = contextlib.nullcontext() if amp_dtype is None else torch.autocast(x.device.type, dtype=amp_dtype)
    with autocast:
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)                 # clip the true gradients
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return loss.item()


@torch.no_grad()
def estimate_loss(model, batches):
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)
