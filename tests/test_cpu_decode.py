"""The Numba tier's fused GPT decode step (minilm/cpu/gpt_decode.py) against the reference ops.

``GPT.forward_step`` with one new token per sequence runs one kernel on the numba backend and
some forty reference ops on the numpy backend; the logits must agree step after step, the key/
value caches must hold the same keys and values, and sampling must give the same tokens.
"""
import numpy as np
import pytest

import minilm
from minilm.cpu import gpt_decode
from minilm.models.gpt import GPT, GPTConfig
from minilm.sample import generate
from minilm.testing import relative_error

# float64: the same sums in another order, through 2 blocks: ~1e-16 measured
F64_TOL = 1e-12
# float32: DESIGN's kernel bound; the kernel's products accumulate in another order than BLAS's,
# ~2e-7 measured on the logits after 2 blocks
F32_TOL = 1e-5
TOL = {np.float64: F64_TOL, np.float32: F32_TOL}
CONFIG = dict(vocab_size=11, block_size=9, n_layer=2, n_head=2, n_embd=8)


def model(dtype, bias, seed=3):
    m = GPT(GPTConfig(**CONFIG, bias=bias), dtype=dtype, seed=seed)
    m.params.data[...] += np.random.default_rng(seed).normal(0, 0.3, m.params.size).astype(dtype)  # biases, betas != 0
    return m


def decode_all(name, m, tokens, prompt=2):
    """Logits of every step: a prompt of ``prompt`` tokens, then one token per step, past block_size.
    A one-token prompt runs the decode kernel from position 0, a softmax over one key."""
    minilm.use(name)
    logits, cache = m.forward_step(tokens[:, :prompt])
    steps = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = m.forward_step(tokens[:, t:t + 1], cache)
        steps.append(logits)
    return np.stack(steps), cache


@pytest.mark.parametrize("prompt", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decode_kernel_equals_the_reference_forward_step(dtype, bias, prompt):
    m = model(dtype, bias)
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (3, 14))   # crops once at block_size
    ref, ref_cache = decode_all("numpy", m, tokens, prompt)
    cpu, cpu_cache = decode_all("numba", m, tokens, prompt)
    assert cpu.dtype == ref.dtype == dtype and cpu.shape == ref.shape
    assert relative_error(cpu, ref) <= TOL[dtype]
    n = ref_cache.length
    assert cpu_cache.length == n
    assert relative_error(cpu_cache.k[:, :, :, :n], ref_cache.k[:, :, :, :n]) <= TOL[dtype]
    assert relative_error(cpu_cache.v[:, :, :, :n], ref_cache.v[:, :, :, :n]) <= TOL[dtype]


def test_forward_step_runs_the_kernel_for_one_token_only(monkeypatch):
    calls = []
    real = gpt_decode.gpt_decode_step
    monkeypatch.setattr(minilm.cpu, "gpt_decode_step", lambda *a: calls.append(a[1].shape) or real(*a))
    minilm.use("numba")
    m = model(np.float32, False)
    _, cache = m.forward_step(np.array([[1, 2, 3]]))        # a prompt: the ops
    assert calls == []
    m.forward_step(np.array([[4]]), cache)                  # one token: the kernel
    assert calls == [(1,)]


def test_a_dtype_without_kernel_runs_the_ops():
    minilm.use("numba")
    m = GPT(GPTConfig(**CONFIG), dtype=np.float16, seed=0)
    _, cache = m.forward_step(np.array([[1, 2]]))
    assert gpt_decode.gpt_decode_step(m, np.array([3]), cache, 2) is None
    logits, _ = m.forward_step(np.array([[3]]), cache)
    assert logits.dtype == np.float16 and np.all(np.isfinite(logits))


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, top_k=5), dict(top_p=0.9)])
def test_numba_sampling_with_and_without_the_cache_gives_the_same_tokens(options):
    minilm.use("numba")
    m = model(np.float64, True)
    cached = list(generate(m, [1, 2, 3], 25, seed=5, **options))      # well past block_size: context shifts
    uncached = list(generate(m, [1, 2, 3], 25, seed=5, use_cache=False, **options))
    assert cached == uncached and len(cached) == 25


def test_the_token_that_fills_the_cache_is_one_kernel_step(monkeypatch):
    """Only a token past block_size crops and recomputes the window; the one that fills the
    cache to block_size is an ordinary step (the kernel, at position block_size - 1)."""
    from minilm.cpu import gpt_decode
    at = []
    real = gpt_decode.gpt_decode_step
    monkeypatch.setattr(minilm.cpu, "gpt_decode_step", lambda *a: at.append(a[3]) or real(*a))
    minilm.use("numba")
    m = model(np.float32, False)
    bs = CONFIG["block_size"]
    _, cache = m.forward_step(np.arange(bs - 1)[None] % CONFIG["vocab_size"])   # a prompt of block_size - 1
    m.forward_step(np.array([[4]]), cache)
    assert at == [bs - 1] and cache.length == bs


def test_two_live_models_decode_each_with_its_own_layout():
    """The kernel reads each model's parameters at that model's offsets: a GPT without biases
    decoded while one with biases is alive (its offsets cached) must equal its reference."""
    with_bias, without = model(np.float64, True), model(np.float64, False, seed=4)
    tokens = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 6))
    for m in (with_bias, without):
        ref, _ = decode_all("numpy", m, tokens)
        cpu, _ = decode_all("numba", m, tokens)
        assert relative_error(cpu, ref) <= TOL[np.float64]
