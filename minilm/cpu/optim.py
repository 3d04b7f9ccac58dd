r"""The optimizer updates over the flat parameter buffer, as Numba kernels.

Each function here replaces the one of the same name in ``minilm.optim`` (the optimizer classes
look them up with ``backend.kernel``) and takes the same arguments. The formulas, PyTorch's, are
written out in ``minilm.optim``'s docstring; ``tests/test_cpu_kernels.py`` holds every kernel to
its reference over several steps.

The reference runs each update as a handful of whole-array operations, every one a pass over the
buffers with a temporary; a kernel makes one pass, element by element, in ``prange``. The update
runs after the step's matrix products, so it takes Numba's pool even where the layers' kernels
leave the cores to BLAS (``pick(..., beside_blas=False)``, see ``minilm.cpu._parallel``). It performs
the very same floating-point operations in the same order and in the buffers' dtype: every
scalar is first rounded to that dtype (as NumPy does when it multiplies a float32 array by a
Python float), and multiplication, division, addition and the square root are correctly
rounded, so the result equals the reference's bit for bit, in float32 as in float64.
"""

import numpy as np
from numba import prange

from minilm import optim as reference
from minilm.cpu._parallel import pick, rows_kernel

__all__ = ["sgd_update", "adamw_update", "rmsprop_update"]

KERNEL_DTYPES = (np.float32, np.float64)   # what the kernels compile for; other dtypes (float16) run the reference


@rows_kernel
def _sgd(p, g, buf, lr, momentum, weight_decay, use_momentum, nesterov, use_decay):
    """Equals ``minilm.optim.sgd_update``; buf is unused (any array) when ``use_momentum`` is False."""
    for i in prange(p.shape[0]):
        d = g[i]
        if use_decay:
            d = d + weight_decay * p[i]                        # g + λ θ
        if use_momentum:
            b = buf[i] * momentum
            b = b + d                                          # b = μ b + g
            buf[i] = b
            d = d + momentum * b if nesterov else b
        p[i] = p[i] - lr * d


@rows_kernel
def _adamw(p, g, m, v, decay_mask, one, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
           step_size, bias_correction2_sqrt, eps, decay_mode):
    """Equals ``minilm.optim.adamw_update``.

    decay_mode: 0 no weight decay; 1 θ *= ``decay`` (= 1 - ηλ, rounded once); 2 θ *= 1 - ``decay`` mask_i
    (``decay`` = ηλ), as the reference rounds each case.
    """
    for i in prange(p.shape[0]):
        if decay_mode == 1:
            p[i] = p[i] * decay                                # θ = θ (1 - ηλ)
        elif decay_mode == 2:
            p[i] = p[i] * (one - decay * decay_mask[i])        # θ = θ (1 - ηλ mask)
        mi = m[i] * beta1
        mi = mi + one_minus_beta1 * g[i]                       # m = β1 m + (1 - β1) g
        m[i] = mi
        vi = v[i] * beta2
        vi = vi + one_minus_beta2 * (g[i] * g[i])              # v = β2 v + (1 - β2) g²
        v[i] = vi
        denom = np.sqrt(vi) / bias_correction2_sqrt + eps      # √v̂ + ε, as torch orders it
        p[i] = p[i] - step_size * (mi / denom)


@rows_kernel
def _rmsprop(p, g, square_avg, buf, lr, alpha, one_minus_alpha, eps, momentum, use_momentum):
    """Equals ``minilm.optim.rmsprop_update``; buf is unused (any array) when ``use_momentum`` is False."""
    for i in prange(p.shape[0]):
        s = square_avg[i] * alpha
        s = s + one_minus_alpha * (g[i] * g[i])                # s = α s + (1 - α) g²
        square_avg[i] = s
        avg = np.sqrt(s) + eps
        if use_momentum:
            b = buf[i] * momentum
            b = b + g[i] / avg                                 # b = μ b + g / (√s + ε)
            buf[i] = b
            p[i] = p[i] - lr * b
        else:
            p[i] = p[i] - lr * (g[i] / avg)


def sgd_update(p, g, buf, *, lr, momentum, nesterov, weight_decay):
    """Numba ``minilm.optim.sgd_update``: updates ``p`` and ``buf`` in place."""
    if p.dtype not in KERNEL_DTYPES:
        return reference.sgd_update(p, g, buf, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    s = p.dtype.type
    kernel = pick(_sgd, p.size, beside_blas=False)
    kernel(p, g, p if buf is None else buf, s(lr), s(momentum), s(weight_decay),
           bool(momentum), bool(nesterov), bool(weight_decay))


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decay_mask, step):
    """Numba ``minilm.optim.adamw_update``: updates ``p``, ``m`` and ``v`` in place."""
    if p.dtype not in KERNEL_DTYPES:
        return reference.adamw_update(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay, decay_mask=decay_mask, step=step)
    decay_mode, decay, *scalars = reference.adamw_scalars(p.dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                          weight_decay=weight_decay, decay_mask=decay_mask, step=step)
    kernel = pick(_adamw, p.size, beside_blas=False)
    kernel(p, g, m, v, p if decay_mask is None else decay_mask, p.dtype.type(1), decay, *scalars, decay_mode)


def rmsprop_update(p, g, square_avg, buf, *, lr, alpha, eps, momentum):
    """Numba ``minilm.optim.rmsprop_update``: updates ``p`` and the buffers in place."""
    if p.dtype not in KERNEL_DTYPES:
        return reference.rmsprop_update(p, g, square_avg, buf, lr=lr, alpha=alpha, eps=eps, momentum=momentum)
    s = p.dtype.type
    kernel = pick(_rmsprop, p.size, beside_blas=False)
    kernel(p, g, square_avg, p if buf is None else buf, s(lr), s(alpha), s(1 - alpha), s(eps),
           s(momentum), bool(momentum))
