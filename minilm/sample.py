r"""Sampling text from a model, one token at a time.

Each step turns the logits z of the last position into a distribution and draws one token:

1. ``top_k``: keep the k largest logits (ties with the k-th are kept, as nanoGPT does), the rest
   get probability 0; k >= V keeps them all.
2. temperature τ: :math:`p = \operatorname{softmax}(z / τ)`; τ = 0 is greedy, p is one-hot at argmax.
3. ``top_p`` (nucleus): keep the smallest set of most probable tokens whose probabilities sum to
   at least ``top_p`` (always at least one), renormalise. Tokens of equal probability are taken
   lowest id first, so a tie at the boundary keeps the lower ids (``top_k`` keeps every tie).
4. Draw :math:`u \sim U[0, 1)` and take the first token whose cumulative probability exceeds
   :math:`u` (inverse-CDF sampling).

Exactly one random number is drawn per token, whatever the options, with a numpy Generator seeded
from ``seed``; the cached and the uncached paths therefore produce the same tokens for the same
seed whenever their logits agree (they agree to rounding; see ``minilm.models``).
"""
import os

import numpy as np

from minilm.backend import to_numpy
from minilm.validate import is_finite, is_integer, is_real, option_error, require_bool, require_seed


def _check_options(max_new_tokens, temperature, top_k, top_p, seed, *, op="generate", names=None):
    """Refuse a bad sampling option, naming it as the caller knows it: ``names`` maps each keyword to
    the name shown (``minilm sample`` shows its options, e.g. '--top-k'); default the keyword."""
    def name(keyword):
        return (names or {}).get(keyword, keyword)
    # a command line cannot say None: there an option is left out instead
    none, all_tokens = ("", " (leave it out for every token)") if names else ("None or ", "")
    def check(keyword, value, what, right_kind, ok):
        if not (right_kind and ok()):
            raise option_error(op, name(keyword), what, value, right_kind)
    check("max_new_tokens", max_new_tokens, "an integer >= 0", is_integer(max_new_tokens), lambda: max_new_tokens >= 0)
    # (an int past float's range counts as inf; np.isfinite of one past 2**64 had raised NumPy's TypeError)
    check("temperature", temperature, "a finite number >= 0 (0 = greedy)", is_real(temperature),
          lambda: temperature >= 0 and is_finite(temperature))
    if top_k is not None:
        check("top_k", top_k, f"{none}an integer >= 1{all_tokens}", is_integer(top_k), lambda: top_k >= 1)
    if top_p is not None:
        check("top_p", top_p, f"{none}a number in (0, 1]{all_tokens}", is_real(top_p), lambda: 0 < top_p <= 1)
    if seed is not None or not names:                # a command line leaves it out rather than say None
        require_seed(op, name("seed"), seed, allow_none=not names)


def _check_prompt(prompt_ids, V):
    if isinstance(prompt_ids, str):                 # text, where ids are asked for: say how to get them
        raise TypeError("generate: argument 'prompt_ids' must be a sequence of token ids, got a str; encode "
                        "the text with the model's tokenizer (tokenizer.encode(text)), or sample from a "
                        "checkpoint with minilm.sample.sample_text(path, text)")
    try:
        prompt = np.asarray(prompt_ids)
    except (TypeError, ValueError):
        raise TypeError(f"generate: argument 'prompt_ids' must be a sequence of token ids, "
                        f"got {type(prompt_ids).__name__}") from None
    if prompt.ndim != 1:
        raise ValueError(f"generate: argument 'prompt_ids' must be a 1-D sequence of token ids, "
                         f"got shape {prompt.shape}")
    if prompt.size == 0:
        raise ValueError("generate: argument 'prompt_ids' must hold at least one token id, got an empty sequence")
    if prompt.dtype.kind not in "iu":
        raise TypeError(f"generate: argument 'prompt_ids' must hold integer token ids, got dtype {prompt.dtype}")
    if int(prompt.min()) < 0 or int(prompt.max()) >= V:
        bad = int(prompt.min()) if int(prompt.min()) < 0 else int(prompt.max())
        raise ValueError(f"generate: argument 'prompt_ids' must hold ids in [0, {V}) (V = {V}), got {bad}")
    return [int(t) for t in prompt]


def next_token_probs(logits, *, temperature=1.0, top_k=None, top_p=None):
    """The distribution (float64, sums to 1) that the next token is drawn from, given (V,) logits.

    A logit of -inf is a banned token: probability 0, as in nanoGPT's top-k. The options are those
    of ``generate``, checked here too.
    """
    _check_options(0, temperature, top_k, top_p, None, op="next_token_probs")
    logits = np.asarray(to_numpy(logits))
    # (1, V) had given (1, V) "probabilities", and (0,) the message "got all -inf"
    if logits.ndim != 1 or logits.size == 0 or logits.dtype.kind not in "fiu":
        raise ValueError(f"next_token_probs: argument 'logits' must be a 1-D array of V real numbers, got shape "
                         f"{logits.shape} and dtype {logits.dtype}")
    return _probs(logits, temperature, top_k, top_p, op="next_token_probs", what="argument 'logits'")


def _probs(logits, temperature, top_k, top_p, *, op="generate", what="the model's logits"):
    """``next_token_probs`` without the option checks, which ``generate`` makes once."""
    z = np.asarray(to_numpy(logits), dtype=np.float64)                  # (V,)
    if np.isnan(z).any() or (z == np.inf).any() or not np.isfinite(z).any():
        raise ValueError(f"{op}: {what} must be finite or -inf (a banned token), with at least one finite, "
                         f"got {'nan' if np.isnan(z).any() else '+inf' if (z == np.inf).any() else 'all -inf'}")
    if top_k is not None and top_k < len(z):                           # k >= V keeps every token
        k = int(top_k)                                                   # -k of a NumPy uint wraps around
        kth = np.partition(z, -k)[-k]                                    # the k-th largest logit
        z = np.where(z < kth, -np.inf, z)
    if temperature == 0:
        probs = np.zeros_like(z)
        probs[np.argmax(z)] = 1.0                                        # greedy: the first maximum
        return probs
    e = np.exp((z - np.max(z)) / float(temperature))                     # every exponent <= 0 (an int past
                                                                         # 2**64 made an object array)
    probs = e / np.sum(e)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, kind="stable")                        # most probable first
        sorted_probs = probs[order]
        mass_before = np.cumsum(sorted_probs) - sorted_probs             # probability of the tokens ahead
        # a mass within the sum's rounding (V ulps of 1) of top_p has reached it: V equal tokens reach
        # top_p = j / V after j of them, whichever way the j-th partial sum rounds
        reached = np.flatnonzero(mass_before >= top_p - len(probs) * np.finfo(np.float64).eps)
        n_keep = max(1, int(reached[0])) if reached.size else len(probs)   # the first token is always kept
        keep = np.zeros(probs.shape, dtype=bool)
        keep[order[:n_keep]] = True
        probs = np.where(keep, probs, 0.0)
        probs = probs / np.sum(probs)
    return probs


def sample_token(probs, rng):
    """Draw one token from ``probs`` (V numbers >= 0 with a positive sum) with exactly one uniform
    number from ``rng``, a NumPy Generator (inverse CDF)."""
    probs = np.asarray(to_numpy(probs))
    if probs.ndim != 1 or probs.size == 0 or probs.dtype.kind not in "fiu":
        raise ValueError(f"sample_token: argument 'probs' must be a 1-D array of V >= 1 numbers, got shape "
                         f"{probs.shape} and dtype {probs.dtype}")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and probs.sum() > 0):    # else the last token, silently
        raise ValueError(f"sample_token: argument 'probs' must hold finite numbers >= 0 with a positive sum, got "
                         f"min {probs.min()}, sum {probs.sum()}")
    if not callable(getattr(rng, "random", None)):
        raise TypeError(f"sample_token: argument 'rng' must be a NumPy Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return _draw(probs, rng)


def _draw(probs, rng):
    """``sample_token`` without its checks: ``generate``'s probabilities are ``_probs``'s."""
    cdf = np.cumsum(probs)                                               # (V,) non-decreasing
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


def generate(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, seed=None,
             use_cache=True):
    """Yield ``max_new_tokens`` sampled token ids (ints) that continue ``prompt_ids``, one at a time.

    Parameters
    ----------
    model : a GPT or RNNLM (anything with ``forward``, ``forward_step`` and ``config.vocab_size``).
    prompt_ids : 1-D sequence of at least one token id in [0, V).
    max_new_tokens : int >= 0.
    temperature : float >= 0; 0 is greedy (argmax).
    top_k : None, or int >= 1: sample among the k most likely tokens (k >= V: all of them, as
        nanoGPT takes min(k, V), so that one setting serves a model of any vocabulary).
    top_p : None, or float in (0, 1]: nucleus sampling.
    seed : None or int >= 0, seeds the numpy Generator (one draw per token).
    use_cache : bool. True feeds only the new token each step through ``model.forward_step``
        (a GPT's key/value cache, an RNN's state); False runs the whole context through
        ``model.forward`` every step. For a GPT both see the same context: at most ``block_size``
        tokens, shifted to its newest half when full (``context_shift``); a prompt longer than
        ``block_size`` starts from its newest ``block_size`` tokens.

    The options are checked when ``generate`` is called, before the first token is asked for.
    """
    if not (hasattr(model, "forward") and hasattr(model, "forward_step")
            and hasattr(getattr(model, "config", None), "vocab_size")):
        hint = ("; to sample from a checkpoint file, use minilm.sample.sample_text(path, text)"
                if isinstance(model, (str, os.PathLike)) else "")
        raise TypeError(f"generate: argument 'model' must be a GPT or an RNNLM (with forward, forward_step and "
                        f"config.vocab_size), got {type(model).__name__}{hint}")
    V = model.config.vocab_size
    _check_options(max_new_tokens, temperature, top_k, top_p, seed)
    prompt = _check_prompt(prompt_ids, V)
    require_bool("generate", "use_cache", use_cache)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return _tokens(model, prompt, max_new_tokens, options, np.random.default_rng(seed), use_cache)


def context_shift(n_tokens, window):
    """How many of the oldest of the model's ``n_tokens`` context tokens to drop: none until it is full.

    A GPT sees at most ``window`` (block_size) tokens. When one more would not fit, the context
    restarts from the newest ``window // 2`` tokens (a "context shift"), so that with a key/value
    cache the cache is rebuilt about once every ``window // 2`` tokens rather than at every step, and
    the cached and the cache-less paths see exactly the same context. ``window`` None: no limit.
    """
    if window is None or n_tokens <= window:
        return 0
    return n_tokens - max(1, window // 2)


def _tokens(model, tokens, max_new_tokens, options, rng, use_cache):
    window = getattr(model.config, "block_size", None)                   # None: a recurrent model
    context = list(tokens)                                               # the tokens the model sees
    if window is not None:
        context = context[max(0, len(context) - window):]                # a long prompt: its newest window
    # a recurrent model's cached state holds its whole context: the tokens need not be kept
    keep = window is not None or not use_cache
    state, new = None, context                                           # the first step feeds the prompt
    for _ in range(max_new_tokens):
        shift = context_shift(len(context), window)
        if shift:                                                        # the context is full: shift it
            context = context[shift:]
            state, new = None, context
        if use_cache:
            logits, state = model.forward_step(np.asarray([new]), state)  # (1, V)
        else:
            logits = model.forward(np.asarray([context]))[0][:, -1]     # (1, V)
        token = _draw(_probs(logits[0], **options), rng)
        if keep:
            context.append(token)
        new = [token]
        yield token


DEFAULT_PROMPT = "\n"        # what a prompt of None means: a newline, as at the start of a line
DEFAULT_TEMPERATURE = 0.8    # sample_text's and minilm sample's (nanoGPT's sample.py's)


def sample_text(checkpoint_path, prompt=None, max_new_tokens=500, *, temperature=DEFAULT_TEMPERATURE, top_k=None,
                top_p=None, seed=None, use_cache=True):
    """Yield the text that continues ``prompt``, one character at a time, from the model saved at
    ``checkpoint_path`` (rebuilt on the active backend): ``minilm sample`` from Python.

    ``prompt`` is a non-empty string of the model's characters; None is ``DEFAULT_PROMPT``, a
    newline. The other options are ``generate``'s, with ``minilm sample``'s defaults. The
    checkpoint, the prompt and the options are checked when ``sample_text`` is called, before the
    first character is asked for::

        for piece in sample_text("out/best.npz", "ROMEO:", 200, temperature=0.8, seed=1):
            print(piece, end="", flush=True)
    """
    return _sample_text(checkpoint_path, prompt, max_new_tokens, op="sample_text",
                        what="sample_text: argument 'prompt'", temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, use_cache=use_cache)


def _sample_text(checkpoint_path, prompt, max_new_tokens, *, op, what, names=None, **options):
    """``sample_text``, its errors from ``op``, with ``what`` naming the prompt and ``names`` the
    options as the caller knows them (``minilm sample`` says '--prompt' and '--top-k')."""
    from minilm.evaluate import load_model
    _check_options(max_new_tokens, options["temperature"], options["top_k"], options["top_p"], options["seed"],
                   op=op, names=names)
    require_bool(op, (names or {}).get("use_cache", "use_cache"), options["use_cache"])
    if not isinstance(checkpoint_path, (str, bytes, os.PathLike)):
        hint = ("; to sample from a model in memory, use minilm.sample.generate(model, prompt_ids, max_new_tokens)"
                if hasattr(checkpoint_path, "forward_step") else "")
        raise TypeError(f"{op}: argument 'checkpoint_path' must be the path of a checkpoint file (str or "
                        f"os.PathLike), got {type(checkpoint_path).__name__}{hint}")
    model, tokenizer, _ = load_model(checkpoint_path)
    if prompt is None:
        if DEFAULT_PROMPT not in tokenizer.chars:
            raise ValueError(f"{what} was not given, and its default, a newline, is not in the model's vocabulary "
                             f"(its training text was one line); give the text to continue")
        prompt = DEFAULT_PROMPT
    if isinstance(prompt, str) and not prompt:
        raise ValueError(f"{what} must hold at least one character, got ''")
    tokens = generate(model, tokenizer.encode(prompt, what=what), max_new_tokens, **options)
    return (tokenizer.decode([token]) for token in tokens)
