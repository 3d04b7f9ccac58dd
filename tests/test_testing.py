"""minilm.testing: the helpers that many tests compare with. A wrong helper would make those tests
vacuous (a relative error that reads 0, a purity check that compares an array with itself), so
each is held to a case worked by hand."""
import numpy as np
import pytest

from minilm.reference import rnn_backward, rnn_forward
from minilm.testing import assert_backward_is_pure, relative_error


def test_relative_error_is_the_largest_difference_over_the_largest_expected_magnitude():
    expected = np.array([[4.0, -2.0], [0.5, 1.0]])
    actual = expected + np.array([[0.0, 0.5], [-1.0, 0.0]])     # the first entry exact; the worst, -1.0, the third
    assert relative_error(actual, expected) == 1.0 / 4.0
    assert relative_error(-expected, expected) == 8.0 / 4.0      # a sign error is a difference, not 0
    assert relative_error(expected, expected) == 0.0
    assert relative_error(actual, expected, floor=10.0) == 1.0 / 10.0   # a floor above the scale is the scale
    assert relative_error(actual, expected, floor=1.0) == 1.0 / 4.0     # ... one below it changes nothing
    assert relative_error(np.array([0.0, 3e-3]), np.zeros(2)) == 3e-3   # scale 0: the absolute error
    assert relative_error(np.array([0.25, -0.0625]), np.array([0.25, -0.125])) == 0.25   # a scale under 1 divides
    assert relative_error(np.zeros(0), np.zeros(0)) == 0.0
    one_ulp = np.float32(1.0) + np.finfo(np.float32).eps             # float32 inputs, compared in float64
    assert relative_error(one_ulp, np.float32(1.0)) == 2.0 ** -23


@pytest.mark.parametrize("flaw", ["writes into dh", "differs on a second call", "returns dh as a gradient"])
def test_assert_backward_is_pure_fails_an_impure_backward(flaw):
    calls = []

    def backward(dh, cache, **kwargs):
        if flaw == "writes into dh":
            dh[0, 0, 0] = 0.0                   # the same gradients at every call: only the copy of dh sees it
        grads = rnn_backward(dh, cache, **kwargs)
        calls.append(flaw)
        if flaw == "differs on a second call":
            grads = (grads[0] * len(calls),) + tuple(grads[1:])
        elif flaw == "returns dh as a gradient":
            grads = (dh,) + tuple(grads[1:])
        return grads

    with pytest.raises(AssertionError):
        assert_backward_is_pure("rnn", rnn_forward, backward, B=2, T=3, D=4, H=5)
    assert_backward_is_pure("rnn", rnn_forward, rnn_backward, B=2, T=3, D=4, H=5)    # the real one passes
