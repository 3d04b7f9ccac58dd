"""Sampling: the distribution each option gives, one draw per token, cached == uncached tokens
(past block_size too), greedy determinism, and bad options."""
import types

import numpy as np
import pytest

from minilm.models import GPT, RNNLM, GPTConfig, RNNConfig
from minilm.sample import generate, next_token_probs, sample_token

# probabilities computed in float64 from logits written as log(p): exp(log(p)) returns p to a few ulps
PROB_TOL = 1e-12
# a proportion of 4000 draws at p = 0.25 has standard deviation sqrt(p (1 - p) / 4000) = 0.0068;
# 0.03 is 4.4 of them, so a correct sampler fails about once in 100,000 runs (the seed is fixed)
DRAWS_TOL = 0.03

V = 7
GPT_TINY = dict(vocab_size=V, block_size=6, n_layer=2, n_head=2, n_embd=8)
RNN_TINY = dict(vocab_size=V, n_layer=2, hidden_size=6, n_embd=5)
OPTIONS = [dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8), dict(temperature=1.5, top_k=5, top_p=0.9)]


pytestmark = pytest.mark.usefixtures("numpy_backend")    # tests/conftest.py


def gpt(dtype=np.float64):
    model = GPT(GPTConfig(**GPT_TINY), dtype=dtype, seed=1)
    model.params.data[...] += np.random.default_rng(0).normal(0, 0.3, model.params.size)  # sharper logits
    return model


def rnn(cell="lstm"):
    return RNNLM(RNNConfig(**RNN_TINY, cell=cell), dtype=np.float64, seed=2)


# --- the distribution ------------------------------------------------------------------------------

P = np.array([0.05, 0.5, 0.15, 0.3])
LOGITS = np.log(P)


def test_plain_sampling_is_the_softmax():
    assert np.allclose(next_token_probs(LOGITS), P, rtol=0, atol=PROB_TOL)
    assert np.allclose(next_token_probs(LOGITS + 100.0), P, rtol=0, atol=PROB_TOL)      # shift-invariant


def test_temperature_sharpens_and_zero_is_argmax():
    assert np.allclose(next_token_probs(LOGITS, temperature=0.5), P ** 2 / np.sum(P ** 2), rtol=0, atol=PROB_TOL)
    assert np.array_equal(next_token_probs(LOGITS, temperature=0), [0, 1, 0, 0])
    assert np.array_equal(next_token_probs(LOGITS, temperature=1e-300), [0, 1, 0, 0])  # no overflow to nan


def test_top_k_keeps_the_k_largest():
    assert np.allclose(next_token_probs(LOGITS, top_k=2), [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=0, atol=PROB_TOL)
    assert np.array_equal(next_token_probs(LOGITS, top_k=1), [0, 1, 0, 0])
    assert np.allclose(next_token_probs(LOGITS, top_k=4), P, rtol=0, atol=PROB_TOL)
    for k in (5, 40):                                   # k >= V keeps every token, as nanoGPT's min(k, V)
        assert np.array_equal(next_token_probs(LOGITS, top_k=k), next_token_probs(LOGITS))


def test_top_k_past_the_vocabulary_samples_as_without_it():
    """One setting (the README's --top-k 40) serves models of any vocabulary, here V = 7."""
    model = gpt()
    assert list(generate(model, [1, 2], 12, top_k=40, seed=5)) == list(generate(model, [1, 2], 12, seed=5))


@pytest.mark.parametrize("top_p, kept", [(0.1, [1]), (0.5, [1]), (0.75, [1, 3]), (0.9, [1, 3, 2]),
                                         (0.97, [1, 3, 2, 0]), (1.0, [1, 3, 2, 0])])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    expected = np.zeros_like(P)
    expected[kept] = P[kept] / P[kept].sum()
    assert np.allclose(next_token_probs(LOGITS, top_p=top_p), expected, rtol=0, atol=PROB_TOL)


def test_sample_token_is_the_inverse_cdf_with_one_draw():
    probs = np.array([0.0, 0.25, 0.0, 0.75])
    draws = []

    def fixed(u):
        return types.SimpleNamespace(random=lambda: draws.append(u) or u)

    assert [sample_token(probs, fixed(u)) for u in (0.0, 0.2, 0.25, 0.9, 0.999999)] == [1, 1, 3, 3, 3]
    assert len(draws) == 5                                          # exactly one number per token
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_token(probs, rng) for _ in range(4000)], minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 4000 - 0.25) < DRAWS_TOL



@pytest.mark.parametrize("probs, rng, error, match", [
    (np.array([]), np.random.default_rng(0), ValueError, r"'probs' must be a 1-D array of V >= 1 numbers, got shape \(0,\)"),
    (np.ones((1, 3)), np.random.default_rng(0), ValueError, r"'probs' must be a 1-D array of V >= 1 numbers, got shape \(1, 3\)"),
    # these had drawn the last token, silently
    (np.zeros(3), np.random.default_rng(0), ValueError, r"'probs' must hold finite numbers >= 0 with a positive sum"),
    (np.array([0.5, np.nan]), np.random.default_rng(0), ValueError, r"'probs' must hold finite numbers >= 0"),
    (np.array([0.5, -0.1, 0.6]), np.random.default_rng(0), ValueError, r"'probs' must hold finite numbers >= 0"),
    (np.array([0.5, 0.5]), 0, TypeError, r"'rng' must be a NumPy Generator \(np.random.default_rng\(seed\)\), got int"),
])
def test_sample_token_refuses_what_it_cannot_draw_from(probs, rng, error, match):
    with pytest.raises(error, match="^sample_token: argument " + match):
        sample_token(probs, rng)


def test_next_token_probs_takes_one_row_of_logits():
    """(1, V) logits had given (1, V) "probabilities" back."""
    with pytest.raises(ValueError, match=r"^next_token_probs: argument 'logits' must be a 1-D array of V real numbers, "
                                         r"got shape \(1, 4\) and dtype float64$"):
        next_token_probs(LOGITS[None, :])
    assert np.array_equal(next_token_probs(list(LOGITS)), next_token_probs(LOGITS))      # a list is an array too

def test_top_p_of_one_keeps_every_token():
    # exp(-40) ~ 4e-18: the mass ahead of that token rounds to 1, yet top_p = 1 must keep it
    z = np.array([0.0, -40.0])
    np.testing.assert_array_equal(next_token_probs(z, top_p=1.0), next_token_probs(z))
    assert next_token_probs(z, top_p=1.0)[1] > 0


def test_a_token_of_probability_zero_is_never_drawn():
    # top_k = 3 of these logits leaves probabilities that sum to 1 - 2^-53 in float64, and the
    # largest u a Generator returns is 1 - 2^-53 too: u must be scaled by the sum, or that draw
    # falls past the last kept token onto the excluded one
    probs = next_token_probs(np.array([0.0, 1.0, 2.0, -50.0]), top_k=3)
    assert probs[3] == 0 and np.cumsum(probs)[-1] < 1
    largest = types.SimpleNamespace(random=lambda: np.nextafter(1.0, 0.0))
    assert sample_token(probs, largest) == 2


@pytest.mark.parametrize("logits, got", [([0.0, np.nan], "nan"), ([0.0, np.inf], r"\+inf"),
                                         ([-np.inf, -np.inf], "all -inf")])
def test_nan_plus_inf_or_no_finite_logit_is_an_error_naming_the_caller(logits, got):
    with pytest.raises(ValueError, match=rf"^next_token_probs: argument 'logits' must be finite or -inf .*got {got}$"):
        next_token_probs(np.array(logits))


@pytest.mark.parametrize("options", [{}, {"top_k": 2}, {"top_p": 0.9}, {"temperature": 0}, {"temperature": 0.5}])
def test_a_logit_of_minus_inf_is_a_banned_token(options):
    """-inf is how a caller bans a token (nanoGPT's top-k writes it): probability 0, the others as
    if the token were not in the vocabulary."""
    probs = next_token_probs(np.array([0.5, -np.inf, 1.0, -0.3]), **options)
    without = next_token_probs(np.array([0.5, 1.0, -0.3]), **options)
    # the same exponentials and sum, with the -inf term's 0 added: a few float64 ulps (1e-15) apart
    assert probs[1] == 0.0 and np.allclose(probs[[0, 2, 3]], without, rtol=1e-15, atol=0)


@pytest.mark.parametrize("options, name", [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                                           ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p")])
def test_next_token_probs_checks_its_options(options, name):
    """Unchecked, temperature -1 inverted the distribution, top_k -1 dropped one token, top_p 0 gave NaN."""
    with pytest.raises(ValueError, match=f"^next_token_probs: option '{name}' must be"):
        next_token_probs(LOGITS, **options)


def test_a_top_p_tie_at_the_boundary_keeps_the_lower_ids():
    """As the module docstring says: equal probabilities are taken lowest id first (top_k keeps ties)."""
    assert next_token_probs(np.zeros(4), top_p=0.5).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert next_token_probs(np.zeros(4), top_k=2).tolist() == [0.25] * 4


# --- generate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS)
def test_gpt_cached_and_uncached_sampling_give_the_same_tokens(options):
    model = gpt()
    # 3-token prompt + 15 tokens: well past block_size = 6, so both paths crop
    cached = list(generate(model, [1, 2, 3], 15, seed=11, **options))
    uncached = list(generate(model, [1, 2, 3], 15, seed=11, use_cache=False, **options))
    assert cached == uncached
    assert len(cached) == 15 and all(isinstance(t, int) and 0 <= t < V for t in cached)


def test_gpt_prompt_longer_than_block_size():
    model = gpt()
    prompt = [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert list(generate(model, prompt, 8, seed=3)) == list(generate(model, prompt, 8, seed=3, use_cache=False))
    # the first token is predicted from the prompt's newest block_size tokens, as nanoGPT crops
    window = GPT_TINY["block_size"]
    for use_cache, method in ((True, "forward_step"), (False, "forward")):
        seen = []
        def spy(ids, *args, _run=getattr(model, method), **kwargs):
            seen.append(np.asarray(ids)[0].tolist())
            return _run(ids, *args, **kwargs)
        setattr(model, method, spy)
        try:
            list(generate(model, prompt, 1, seed=3, use_cache=use_cache))
        finally:
            delattr(model, method)
        assert seen == [prompt[-window:]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_block_size_of_one_keeps_the_newest_token(use_cache):
    """A full context of one token shifts to the newest token, never to an empty context:
    each token is then predicted from the one before it alone."""
    model = GPT(GPTConfig(**{**GPT_TINY, "block_size": 1}), dtype=np.float64, seed=1)
    tokens = list(generate(model, [2], 5, temperature=0, use_cache=use_cache))          # greedy
    assert tokens == [int(np.argmax(model.forward(np.array([[before]]))[0][0, -1])) for before in [2] + tokens[:-1]]


@pytest.mark.parametrize("make", [gpt, rnn])
def test_sampling_for_long_keeps_no_more_than_its_context(make):
    """A sampler left running holds the context the model sees (a GPT's block; nothing for a
    recurrent model, whose state holds it), not every token it has made."""
    model = make()
    tokens = generate(model, [1, 2, 3], 1000, seed=0)
    for _ in tokens:
        kept = len(tokens.gi_frame.f_locals["context"])
        assert kept <= (model.config.block_size + 1 if make is gpt else 3), kept     # + the token just made


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("options", OPTIONS[::2])
def test_rnn_cached_and_uncached_sampling_give_the_same_tokens(cell, options):
    model = rnn(cell)
    cached = list(generate(model, [4, 0], 12, seed=5, **options))
    assert cached == list(generate(model, [4, 0], 12, seed=5, use_cache=False, **options))


@pytest.mark.parametrize("make", [gpt, rnn])
def test_greedy_is_deterministic_and_equals_top_k_1(make):
    model = make()
    greedy = list(generate(model, [2], 10, temperature=0, seed=1))
    assert greedy == list(generate(model, [2], 10, temperature=0, seed=2))
    assert greedy == list(generate(model, [2], 10, temperature=0, seed=None, use_cache=False))
    assert greedy == list(generate(model, [2], 10, top_k=1, seed=3))
    # greedy by hand: the argmax of the full forward's last position, appended one at a time
    # (a GPT's context holds at most block_size tokens; when full it restarts from its newest half)
    tokens, start, window = [2], 0, GPT_TINY["block_size"]
    for _ in range(10):
        if make is gpt and len(tokens) - start > window:
            start = len(tokens) - window // 2
        logits = model.forward(np.asarray([tokens[start:]]))[0]
        tokens.append(int(np.argmax(logits[0, -1])))
    assert greedy == tokens[1:]


def test_same_seed_same_tokens_and_streaming():
    model = gpt()
    assert list(generate(model, [1], 10, seed=7)) == list(generate(model, [1], 10, seed=7))
    stream = generate(model, [1], 3, seed=7)
    assert next(stream) == list(generate(model, [1], 1, seed=7))[0]   # tokens come one at a time
    assert list(generate(model, [1], 0)) == []


def test_float32_model_samples():
    tokens = list(generate(gpt(np.float32), np.array([1, 2], dtype=np.int32), 8, seed=0, top_p=0.9))
    assert len(tokens) == 8 and all(0 <= t < V for t in tokens)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-0.5), ValueError, "'temperature' must be a finite number >= 0"),
    (dict(temperature=float("inf")), ValueError, "'temperature'"),
    (dict(top_k=0), ValueError, r"generate: option 'top_k' must be None or an integer >= 1, got 0"),
    (dict(top_k=-3), ValueError, "'top_k'"),
    (dict(top_k=2.0), ValueError, "'top_k'"),
    (dict(top_p=0.0), ValueError, r"'top_p' must be None or a number in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, "'top_p'"),
    (dict(max_new_tokens=-1), ValueError, "'max_new_tokens' must be an integer >= 0"),
    (dict(max_new_tokens=2.5), ValueError, "'max_new_tokens'"),
    (dict(prompt_ids=[]), ValueError, "'prompt_ids' must hold at least one token id"),
    (dict(prompt_ids=[1, 7]), ValueError, r"'prompt_ids' must hold ids in \[0, 7\).*got 7"),
    (dict(prompt_ids=[[1, 2]]), ValueError, "'prompt_ids' must be a 1-D sequence"),
    (dict(prompt_ids=[1.5]), TypeError, "'prompt_ids' must hold integer token ids"),
    (dict(seed=-1), ValueError, "'seed'"),
    (dict(seed=True), ValueError, r"'seed' must be None or an integer >= 0, got True"),   # not seed 1
    (dict(use_cache="yes"), ValueError, "'use_cache'"),
])
def test_generate_rejects_bad_options_when_called(kwargs, error, match):
    model = gpt()
    args = dict(prompt_ids=[1, 2], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)   # before any next()


def test_generate_given_text_says_how_to_turn_it_into_ids():
    with pytest.raises(TypeError, match=r"generate: argument 'prompt_ids' must be a sequence of token ids, got a str; "
                                        r"encode the text with the model's tokenizer \(tokenizer.encode\(text\)\), "
                                        r"or sample from a checkpoint with minilm.sample.sample_text\(path, text\)"):
        generate(gpt(), "to be", 3)


def test_generate_given_a_ragged_prompt_names_it():
    with pytest.raises(TypeError, match=r"generate: argument 'prompt_ids' must be a sequence of token ids, got list"):
        generate(gpt(), [[1, 2], [3]], 3)


def test_greedy_takes_the_first_of_tied_maxima():
    assert next_token_probs(np.log([0.2, 0.4, 0.4]), temperature=0).tolist() == [0, 1, 0]


def test_a_top_p_tie_among_many_tokens_keeps_the_lowest_ids():
    """Two tokens of 0.3, then eight of 0.05: top_p = 0.65 keeps the two and the lowest-id 0.05 token
    (NumPy's default sort is not stable at this size: the order must be asked for)."""
    p = np.array([0.05, 0.3, 0.05, 0.05, 0.3, 0.05, 0.05, 0.05, 0.05, 0.05])
    assert np.flatnonzero(next_token_probs(np.log(p), top_p=0.65)).tolist() == [0, 1, 4]


def test_a_small_temperature_is_not_greedy():
    # 1e-12: the float64 softmax of two logits is exact to a few units of 1e-16
    assert np.allclose(next_token_probs(np.array([0.0, 1e-3]), temperature=0.01),
                       np.exp([0, 0.1]) / np.sum(np.exp([0, 0.1])), rtol=0, atol=1e-12)


def test_generate_streams_its_tokens():
    model = gpt()
    calls = []
    step = model.forward_step
    model.forward_step = lambda *a, **k: calls.append(1) or step(*a, **k)
    stream = generate(model, [1], 10_000, seed=7)
    next(stream)
    assert len(calls) == 1                   # the first token is computed alone, not the 10,000


def test_an_odd_block_size_shifts_to_its_newest_half_rounded_down():
    from minilm.sample import context_shift
    assert [context_shift(n, 5) for n in (5, 6)] == [0, 6 - 5 // 2]
    assert context_shift(2, 1) == 1                   # block_size 1: the newest token alone


@pytest.mark.parametrize("V", [6, 10, 12, 13, 100])
def test_top_p_over_equal_tokens_keeps_the_smallest_set_reaching_it(V):
    """V equally likely tokens reach top_p = j / V with j of them, whichever way the partial sums
    round: 10 tokens at top_p = 0.8 had kept 9 (0.1 + ... + 0.1 rounds to 0.7999999999999999), at
    0.9 all 10; 100 tokens at 0.1 had kept 11."""
    for j in range(1, V + 1):
        assert np.count_nonzero(next_token_probs(np.zeros(V), top_p=j / V)) == j, f"top_p = {j}/{V}"
    assert np.count_nonzero(next_token_probs(np.zeros(V), top_p=1e-300)) == 1      # always one token


def test_next_token_probs_refuses_empty_logits():
    """No logits at all had been reported as "got all -inf"."""
    with pytest.raises(ValueError, match=r"^next_token_probs: argument 'logits' must be a 1-D array of V real numbers, "
                                         r"got shape \(0,\) and dtype float64$"):
        next_token_probs(np.zeros(0))


def test_generate_refuses_what_is_not_a_model_by_its_argument():
    with pytest.raises(TypeError, match=r"^generate: argument 'model' must be a GPT or an RNNLM .*got str; to sample "
                                        r"from a checkpoint file, use minilm.sample.sample_text\(path, text\)$"):
        generate("out/best.npz", [1], 3)
    with pytest.raises(TypeError, match=r"^generate: argument 'model' must be a GPT or an RNNLM .*got NoneType$"):
        generate(None, [1], 3)


def test_sample_text_refuses_a_model_for_its_path():
    from minilm.sample import sample_text
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(TypeError, match=r"^sample_text: argument 'checkpoint_path' must be the path of a checkpoint "
                                        r"file .*got GPT; to sample from a model in memory, use minilm.sample.generate"):
        sample_text(model, "a", 3)


def test_generate_takes_a_large_int_temperature_and_abridges_a_list_given_as_a_count():
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    assert len(list(generate(model, [1], 2, temperature=10**30, seed=0))) == 2    # np.isfinite raised TypeError
    with pytest.raises(ValueError, match=r"option 'temperature' must be a finite number >= 0 \(0 = greedy\), got 1000"):
        generate(model, [1], 2, temperature=10**400)                                # past float's range: inf
    prompt = [1, 2, 3, 4] * 25_000
    with pytest.raises(TypeError, match=r"^generate: option 'max_new_tokens' must be an integer >= 0, got \[1, 2, 3, 4, 1, 2, \.\.\.\]$") as info:
        generate(model, 5, prompt)                                                  # prompt and count swapped
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("k", [np.uint8(3), np.uint32(3), np.uint64(3)])
def test_top_k_of_a_numpy_unsigned_integer_keeps_k_tokens(k):
    """-k of a NumPy unsigned integer wraps around: np.uint8(3) kept 47 of 300 tokens."""
    assert np.count_nonzero(next_token_probs(np.arange(300.0), top_k=k)) == 3
