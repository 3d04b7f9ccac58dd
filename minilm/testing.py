"""Helpers for testing recurrent ops (minilm's own tests and a layer of your own).

``recurrent_args`` draws well-conditioned arguments for ``rnn``, ``lstm`` or ``gru``;
``with_final_states`` wraps a recurrent forward/backward pair so that ``minilm.gradcheck``
also checks the gradients the backward takes for the final states (``dh_T``, ``dc_T``);
``assert_backward_is_pure`` checks that a recurrent backward writes into nothing it is given.
"""
import copy
import functools

import numpy as np

ARGUMENTS = {                                                   # each forward's arguments, in order
    "rnn": ("x", "h0", "W_x", "W_h", "b"),
    "lstm": ("x", "h0", "c0", "W_x", "W_h", "b"),
    "gru": ("x", "h0", "W_x", "W_h", "b_x", "b_h"),
}
N_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
STATES = {"rnn": ("h",), "lstm": ("h", "c"), "gru": ("h",)}     # final states: cache.h_T, cache.c_T


def recurrent_args(op, B, T, D, H, seed=0, gain=1.0, dtype=np.float64):
    """Arguments for ``op``'s forward: every entry is ±scale·u with u ~ U(0.3, 1.2), the scale 1 for
    inputs, 1/2 for states and biases, gain/√fan-in for weights.

    Entries stay away from 0 and (for gain <= 1.5) from deep saturation, so no gradient is so
    small that the round-off of finite differences (~1e-11 absolute) is a sizeable part of it.
    """
    rng = np.random.default_rng(seed)
    G = N_GATES[op]
    shapes = {"x": (B, T, D), "h0": (B, H), "c0": (B, H), "W_x": (D, G * H), "W_h": (H, G * H),
              "b": (G * H,), "b_x": (G * H,), "b_h": (G * H,)}
    scales = {"x": 1.0, "h0": 0.5, "c0": 0.5, "W_x": gain / np.sqrt(D), "W_h": gain / np.sqrt(H),
              "b": 0.5, "b_x": 0.5, "b_h": 0.5}
    return tuple((scales[a] * rng.uniform(0.3, 1.2, shapes[a]) * rng.choice([-1.0, 1.0], shapes[a])).astype(dtype)
                 for a in ARGUMENTS[op])


def final_state_grads(op, B, H, seed, dtype=np.float64):
    """Random gradients for the final states: {"dh_T": (B, H)} and, for the LSTM, "dc_T"."""
    rng = np.random.default_rng(seed + 1)
    return {f"d{s}_T": rng.standard_normal((B, H)).astype(dtype) for s in STATES[op]}


def with_final_states(op, forward, backward):
    """``op``'s forward/backward with the final states appended to the output along time: (B, T + k, H).

    The gradient check contracts the whole output with a random array, so its loss then has a
    term for h_T (and c_T) beyond the one h_T gets as the last row of h; the backward hands that
    part of dout to the op's backward as ``dh_T`` (and ``dc_T``), and so checks them.
    """
    @functools.wraps(forward)                                   # the report names the real arguments
    def forward_with_states(*args):
        h, cache = forward(*args)
        finals = [getattr(cache, f"{s}_T")[:, None] for s in STATES[op]]
        return np.concatenate([h] + finals, axis=1), cache      # (B, T + k, H)

    def backward_with_states(dout, cache):
        T = cache.h.shape[1]
        kwargs = {f"d{s}_T": dout[:, T + k] for k, s in enumerate(STATES[op])}
        return backward(dout[:, :T], cache, **kwargs)

    return forward_with_states, backward_with_states


def assert_backward_is_pure(op, forward, backward, B, T, D, H):
    """Run ``op``'s backward twice on one forward's cache: it must change none of its inputs,
    the forward's arguments, output or cache; give the same gradients both times; and return
    no gradient that shares memory with an input."""
    args = recurrent_args(op, B, T, D, H, seed=9)
    h, cache = forward(*args)
    dh = np.random.default_rng(10).standard_normal((B, T, H))
    finals = final_state_grads(op, B, H, seed=10)
    arrays = [*args, h, *cache, dh, *finals.values()]
    before = copy.deepcopy(arrays)

    grads = backward(dh, cache, **finals)
    again = backward(dh, cache, **finals)

    for a, a_before in zip(arrays, before):
        np.testing.assert_array_equal(a, a_before)
    for g, g_again in zip(grads, again):
        np.testing.assert_array_equal(g, g_again)
    inputs = [dh, *finals.values(), *cache]
    assert not any(np.shares_memory(g, a) for g in grads for a in inputs), "a gradient aliases an input"


def relative_error(actual, expected, floor=0.0):
    """max|actual - expected| / max(max|expected|, floor): the error of a whole array, relative to its
    scale (the absolute error when that scale is 0).

    A floor of 1 compares on the scale of 1 where the expected values may be a tiny difference of
    near-equal terms (a peaked softmax's gradient, a saturated gate's), which any float32
    computation only resolves to its rounding.
    """
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
    return err / scale if scale > 0 else err
