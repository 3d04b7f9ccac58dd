r"""The optimizer updates over the flat parameter buffer, as CuPy elementwise kernels.

Each function here replaces the one of the same name in ``minilm.optim`` (the optimizer classes
look them up with ``backend.kernel``) and takes the same arguments; the formulas, PyTorch's, are
written out in ``minilm.optim``'s docstring. The reference runs an update as a handful of
whole-array expressions, each a pass over the buffers with a temporary; each kernel here reads
and writes every buffer once. Scalars are rounded to the buffers' dtype first, as the reference's
array-times-Python-float arithmetic does.
"""

import numpy as np

from minilm import optim as reference
from minilm.gpu._core import elementwise

__all__ = ["sgd_update", "adamw_update", "rmsprop_update"]

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))   # master weights: never 16-bit

_sgd = elementwise(
    "T g, T lr, T momentum, T weight_decay, bool nesterov", "T p, T buf", """
    T d = g;
    if (weight_decay != (T)0) d = d + weight_decay * p;            // g + lambda theta
    if (momentum != (T)0) {
        T b = buf * momentum + d;                                  // b = mu b + g
        buf = b;
        d = nesterov ? d + momentum * b : b;
    }
    p = p - lr * d;
""", "minilm_sgd_update")

_adamw = elementwise(
    "T g, T decay_mask, T decay, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, "
    "T step_size, T bias_correction2_sqrt, T eps, int32 decay_mode", "T p, T m, T v", """
    if (decay_mode == 1) p = p * decay;                            // theta = theta (1 - eta lambda)
    else if (decay_mode == 2) p = p * ((T)1 - decay * decay_mask);
    T mi = m * beta1 + one_minus_beta1 * g;                        // m = b1 m + (1 - b1) g
    m = mi;
    T vi = v * beta2 + one_minus_beta2 * (g * g);                  // v = b2 v + (1 - b2) g^2
    v = vi;
    T denom = sqrt_acc(vi) / bias_correction2_sqrt + eps;          // sqrt(v_hat) + eps, as torch orders it
    p = p - step_size * (mi / denom);
""", "minilm_adamw_update")

_rmsprop = elementwise(
    "T g, T lr, T alpha, T one_minus_alpha, T eps, T momentum", "T p, T square_avg, T buf", """
    T s = square_avg * alpha + one_minus_alpha * (g * g);          // s = alpha s + (1 - alpha) g^2
    square_avg = s;
    T avg = sqrt_acc(s) + eps;
    if (momentum != (T)0) {
        T b = buf * momentum + g / avg;                            // b = mu b + g / (sqrt(s) + eps)
        buf = b;
        p = p - lr * b;
    } else {
        p = p - lr * (g / avg);
    }
""", "minilm_rmsprop_update")


def sgd_update(p, g, buf, *, lr, momentum, nesterov, weight_decay):
    """CuPy ``minilm.optim.sgd_update``: updates ``p`` and ``buf`` in place."""
    if p.dtype not in KERNEL_DTYPES:
        return reference.sgd_update(p, g, buf, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    s = p.dtype.type
    _sgd(g, s(lr), s(momentum), s(weight_decay), bool(nesterov), p, p if buf is None else buf)


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decay_mask, step):
    """CuPy ``minilm.optim.adamw_update``: updates ``p``, ``m`` and ``v`` in place."""
    if p.dtype not in KERNEL_DTYPES:
        return reference.adamw_update(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay, decay_mask=decay_mask, step=step)
    decay_mode, decay, *scalars = reference.adamw_scalars(p.dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                          weight_decay=weight_decay, decay_mask=decay_mask, step=step)
    _adamw(g, g if decay_mask is None else decay_mask, decay, *scalars, np.int32(decay_mode), p, m, v)


def rmsprop_update(p, g, square_avg, buf, *, lr, alpha, eps, momentum):
    """CuPy ``minilm.optim.rmsprop_update``: updates ``p`` and the buffers in place."""
    if p.dtype not in KERNEL_DTYPES:
        return reference.rmsprop_update(p, g, square_avg, buf, lr=lr, alpha=alpha, eps=eps, momentum=momentum)
    s = p.dtype.type
    _rmsprop(g, s(lr), s(alpha), s(1 - alpha), s(eps), s(momentum), p, square_avg, p if buf is None else buf)
