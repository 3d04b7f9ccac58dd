"""Optimizers, gradient clipping, learning-rate schedules and early stopping.

Every optimizer works on the flat buffers of a ``Params``: ``params.data`` (θ), ``params.grad`` (g),
and moment buffers of the same layout, so one update is a handful of whole-array operations.
The formulas are PyTorch's (``torch.optim``), step for step:

SGD (dampening 0; b starts at zeros, which gives torch's first step b = g)::

    g ← g + λ θ                     weight decay λ as an L2 penalty
    b ← μ b + g                     momentum μ
    θ ← θ − η (g + μ b)             with nesterov; otherwise θ ← θ − η b

Adam (t counts steps from 1)::

    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g²
    θ ← θ − η / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

AdamW: first θ ← θ (1 − η λ) on the tensors of 2 or more dimensions (nanoGPT's rule), then Adam.

RMSprop (not centered)::

    s ← α s + (1 − α) g²
    b ← μ b + g / (√s + ε)
    θ ← θ − η b                     with μ = 0: θ ← θ − η g / (√s + ε)

Each update is a plain function over flat arrays (``sgd_update``, ``adamw_update``,
``rmsprop_update``) that updates θ and the buffers in place, written against ``xp`` so it runs
on NumPy and CuPy arrays alike; the classes hold the buffers and the options.

    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    schedule = WarmupCosine(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=5000)
    for it in range(max_iters):
        ...                                    # forward, backward into params.grad
        clip_grad_norm(params, 1.0)
        opt.step(lr=schedule(it))
"""
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from minilm import backend
from minilm.backend import get_array_module, to_numpy
from minilm.validate import (is_count, is_finite, is_real, option_error, require_bool, require_count,
                             require_positive, require_probability)

# ---------------------------------------------------------------------------------------------
# the updates: plain functions over flat arrays, in place


def sgd_update(p, g, buf, *, lr, momentum, nesterov, weight_decay):
    """One SGD step (``torch.optim.SGD``, dampening 0): updates ``p`` and ``buf`` in place.

    Parameters
    ----------
    p, g : array, shape (N,)
        Parameters and their gradient.
    buf : array, shape (N,), or None
        The momentum buffer (None when ``momentum`` is 0). Starting from zeros gives
        PyTorch's first step ``buf = g``.
    lr, momentum, weight_decay : float
    nesterov : bool
    """
    if weight_decay:
        g = g + weight_decay * p              # L2 penalty, as torch's SGD
    if momentum:
        buf *= momentum
        buf += g                              # b = μ b + g
        g = g + momentum * buf if nesterov else buf
    p -= lr * g


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decay_mask, step):
    """One AdamW step (``torch.optim.AdamW``): updates ``p``, ``m`` and ``v`` in place.

    With ``weight_decay = 0`` this is Adam (``torch.optim.Adam``).

    Parameters
    ----------
    p, g, m, v : array, shape (N,)
        Parameters, gradient, first and second moments.
    lr, beta1, beta2, eps, weight_decay : float
    decay_mask : array, shape (N,), or None
        1 where weight decay applies, 0 elsewhere; None decays every parameter.
    step : int
        The number of this step, counted from 1 (for the bias corrections).
    """
    xp = get_array_module(p)
    if weight_decay:
        decay = lr * weight_decay if decay_mask is None else lr * weight_decay * decay_mask
        p *= 1 - decay                        # decoupled weight decay: θ = θ (1 - ηλ)
    m *= beta1
    m += (1 - beta1) * g                      # m = β1 m + (1 - β1) g
    v *= beta2
    v += (1 - beta2) * (g * g)                # v = β2 v + (1 - β2) g²
    step_size = lr / (1 - beta1 ** step)
    denom = xp.sqrt(v)
    denom /= math.sqrt(1 - beta2 ** step)
    denom += eps                              # √v̂ + ε, as torch orders it
    p -= step_size * (m / denom)


def adamw_scalars(dtype, *, lr, beta1, beta2, eps, weight_decay, decay_mask, step):
    """The scalars of one ``adamw_update`` step as its kernels take them, each rounded to ``dtype``
    as the reference's array-times-Python-float arithmetic rounds it.

    Returns (decay_mode, decay, beta1, 1 - beta1, beta2, 1 - beta2, step_size, sqrt(1 - beta2^step),
    eps): decay_mode 0 is no weight decay; 1 is θ *= ``decay`` (= 1 - ηλ, rounded once); 2 is
    θ *= 1 - ``decay`` mask (``decay`` = ηλ), the two ways the reference rounds it.
    """
    s = np.dtype(dtype).type
    if not weight_decay:
        decay_mode, decay = 0, s(0)
    elif decay_mask is None:
        decay_mode, decay = 1, s(1 - lr * weight_decay)        # reference: p *= 1 - ηλ, a Python float
    else:
        decay_mode, decay = 2, s(lr * weight_decay)            # reference: p *= 1 - (ηλ) * mask, in p's dtype
    return (decay_mode, decay, s(beta1), s(1 - beta1), s(beta2), s(1 - beta2), s(lr / (1 - beta1 ** step)),
            s(math.sqrt(1 - beta2 ** step)), s(eps))


def rmsprop_update(p, g, square_avg, buf, *, lr, alpha, eps, momentum):
    """One RMSprop step (``torch.optim.RMSprop``, not centered): updates ``p`` and the buffers in place.

    Parameters
    ----------
    p, g, square_avg : array, shape (N,)
        Parameters, gradient, running mean of the squared gradient.
    buf : array, shape (N,), or None
        The momentum buffer (None when ``momentum`` is 0).
    lr, alpha, eps, momentum : float
    """
    xp = get_array_module(p)
    square_avg *= alpha
    square_avg += (1 - alpha) * (g * g)       # s = α s + (1 - α) g²
    avg = xp.sqrt(square_avg)
    avg += eps
    if momentum:
        buf *= momentum
        buf += g / avg                        # b = μ b + g / (√s + ε)
        p -= lr * buf
    else:
        p -= lr * (g / avg)


# ---------------------------------------------------------------------------------------------
# argument checks


def _require_nonnegative(op, name, value):
    if not (is_real(value) and is_finite(value) and value >= 0):
        raise option_error(op, name, "a finite number >= 0", value, is_real(value))


def _require_params(op, params):
    if not (hasattr(params, "data") and hasattr(params, "grad") and hasattr(params, "mask")):
        raise TypeError(f"{op}: argument 'params' must be a minilm Params, got {type(params).__name__}")
    dtype = params.data.dtype
    if dtype.itemsize < 4:      # float16, bfloat16: the master weights themselves, not a compute copy
        raise TypeError(f"{op}: argument 'params' holds {dtype} master weights (params.data), which are not "
                        f"updated in 16 bits: a step below half a weight's last bit rounds away, and in float16 "
                        f"Adam's eps = 1e-8 is 0 and a squared gradient norm past 65504 is inf; keep float32 master "
                        f"weights with a {dtype} compute copy, Params(specs, dtype=np.float32, compute_dtype={dtype}), "
                        f"as GPT(config, dtype={dtype}) builds them")


def _require_betas(op, betas):
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise option_error(op, "betas", "a pair (beta1, beta2)", betas, isinstance(betas, (tuple, list)))
    require_probability(op, "betas[0]", betas[0])
    require_probability(op, "betas[1]", betas[1])
    return float(betas[0]), float(betas[1])


# ---------------------------------------------------------------------------------------------
# optimizers


class Optimizer:
    """What every optimizer shares: the step counter, the per-step learning rate, state_dict.

    A subclass sets ``name`` and ``buffers`` (the names of its moment arrays, which it creates
    as attributes, None when unused), and defines ``_update(lr)`` (one step with that learning
    rate) and ``options()`` (the constructor's options, JSON-able).
    """

    name: ClassVar[str] = ""
    buffers: ClassVar[tuple] = ()

    def __init__(self, params, lr):
        _require_params(type(self).__name__, params)
        require_positive(type(self).__name__, "lr", lr)
        self.params = params
        self.lr = float(lr)
        self.steps = 0          # steps taken so far

    def _zeros(self):
        return get_array_module(self.params.data).zeros_like(self.params.data)

    def step(self, lr=None):
        """Update ``params.data`` from ``params.grad``, with learning rate ``lr`` (default: the constructor's)."""
        if lr is None:
            lr = self.lr
        else:
            _require_nonnegative(f"{type(self).__name__}.step", "lr", lr)
        if getattr(self.params, "grad_in_compute", False):       # else the step would read a stale grad
            raise RuntimeError(f"{type(self).__name__}.step: with mixed precision ({self.params.compute_dtype}) the "
                               f"backward's gradient is in params.compute_grad; call "
                               f"params.unscale_grads(1 / loss_scale) first, which moves it to params.grad")
        self._require_buffers_like_params()
        self.steps += 1
        self._update(float(lr))

    def __repr__(self):
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({options}) after {self.steps} step{'s' * (self.steps != 1)}"

    def _arrays(self):
        """The optimizer's own arrays, which must match ``params.data`` in dtype and array module."""
        return {key: getattr(self, key) for key in self.buffers if getattr(self, key) is not None}

    def _require_buffers_like_params(self):
        data = self.params.data
        for key, buffer in self._arrays().items():
            if buffer.dtype != data.dtype or type(buffer) is not type(data):
                raise RuntimeError(
                    f"{type(self).__name__}.step: its {key!r} is a {type(buffer).__module__}.{type(buffer).__name__} of "
                    f"{buffer.dtype}, params.data a {type(data).__module__}.{type(data).__name__} of {data.dtype}: the "
                    f"parameters were moved (params.to) after this optimizer was built; build it after the move, "
                    f"or move it too with opt.load_state_dict(opt.state_dict())")

    def state_dict(self):
        """``{"name", "steps", options..., buffer name -> numpy array}``: JSON-able scalars and numpy arrays."""
        state = {"name": self.name, "steps": self.steps, **self.options()}
        for key in self.buffers:
            if getattr(self, key) is not None:
                state[key] = to_numpy(getattr(self, key)).copy()
        return state

    def load_state_dict(self, state):
        """Restore the step counter and the buffers from ``state_dict()``'s output.

        The options (lr, betas, ...) stay the constructor's, so a resumed run may change them.
        """
        op = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: argument 'state' must be the state of a {self.name!r} optimizer, got {got!r}")
        steps = state.get("steps", 0)
        if not is_count(steps):
            raise ValueError(f"{op}: argument 'state' entry 'steps' must be an integer >= 0, got {steps!r}")
        restored = {key: self._restore_buffer(op, key, state.get(key))        # all checked before any is kept
                    for key in self.buffers if getattr(self, key) is not None}
        for key, buffer in restored.items():
            setattr(self, key, buffer)
        self.steps = int(steps)

    def _restore_buffer(self, op, key, saved):
        data = self.params.data
        if saved is None:
            raise ValueError(f"{op}: argument 'state' has no {key!r} buffer, which this {self.name} optimizer needs")
        if not hasattr(saved, "shape"):
            raise TypeError(f"{op}: buffer {key!r} must be an array, as state_dict() returns it, "
                            f"got {type(saved).__name__}")
        if tuple(saved.shape) != tuple(data.shape):
            raise ValueError(f"{op}: buffer {key!r} must have shape {tuple(data.shape)} (the parameters'), "
                             f"got {tuple(saved.shape)}")
        saved = to_numpy(saved)                 # its dtype as NumPy's (a torch tensor's dtype has no .kind)
        if saved.dtype.kind not in "fiu":       # None, text: NaN or an error later
            raise TypeError(f"{op}: buffer {key!r} must be an array of real numbers, as state_dict() returns it, "
                            f"got one of dtype {saved.dtype}")
        xp = get_array_module(data)
        return xp.asarray(saved, dtype=data.dtype).copy()


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    name = "sgd"
    buffers = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        require_probability("SGD", "momentum", momentum)
        _require_nonnegative("SGD", "weight_decay", weight_decay)
        require_bool("SGD", "nesterov", nesterov)
        if nesterov and momentum == 0:
            raise ValueError("SGD: option 'nesterov' needs momentum > 0, got momentum = 0")
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.momentum_buffer = self._zeros() if momentum else None

    def options(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _update(self, lr):
        update = backend.kernel("sgd_update", sgd_update)       # a Numba/CuPy kernel where the backend has one
        update(self.params.data, self.params.grad, self.momentum_buffer, lr=lr, momentum=self.momentum,
                   nesterov=self.nesterov, weight_decay=self.weight_decay)


class AdamW(Optimizer):
    """Adam with decoupled weight decay on the tensors of 2 or more dimensions (nanoGPT's rule).

    Biases, layer-norm gains and other 1-D tensors are not decayed.
    """

    name = "adamw"
    buffers = ("m", "v")

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr)
        op = type(self).__name__
        self.beta1, self.beta2 = _require_betas(op, betas)
        require_positive(op, "eps", eps)            # 0: a parameter whose moments are 0 steps by 0 / 0 = nan
        _require_nonnegative(op, "weight_decay", weight_decay)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.m, self.v = self._zeros(), self._zeros()
        self.decay_mask = self._decay_mask()

    def _decay_mask(self):
        """1 on the 2-D and larger weights, which decay (nanoGPT's rule), 0 on biases and gains."""
        return self.params.mask(lambda name, shape: len(shape) >= 2) if self.weight_decay else None

    def _arrays(self):
        return {**super()._arrays(), **({} if self.decay_mask is None else {"decay_mask": self.decay_mask})}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.decay_mask = self._decay_mask()                   # on the parameters' module and dtype

    def options(self):
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps, "weight_decay": self.weight_decay}

    def _update(self, lr):
        update = backend.kernel("adamw_update", adamw_update)
        update(self.params.data, self.params.grad, self.m, self.v, lr=lr, beta1=self.beta1, beta2=self.beta2,
                     eps=self.eps, weight_decay=self.weight_decay, decay_mask=self.decay_mask, step=self.steps)


class Adam(AdamW):
    """Adam (``torch.optim.Adam`` without weight decay): AdamW with ``weight_decay = 0``."""

    name = "adam"

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=0.0)

    def options(self):
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps}


class RMSprop(Optimizer):
    """RMSprop (``torch.optim.RMSprop``, not centered), char-rnn's optimizer."""

    name = "rmsprop"
    buffers = ("square_avg", "momentum_buffer")

    def __init__(self, params, lr, alpha=0.99, eps=1e-8, momentum=0.0):
        super().__init__(params, lr)
        require_probability("RMSprop", "alpha", alpha)
        require_positive("RMSprop", "eps", eps)     # 0: as Adam's
        require_probability("RMSprop", "momentum", momentum)
        self.alpha, self.eps, self.momentum = float(alpha), float(eps), float(momentum)
        self.square_avg = self._zeros()
        self.momentum_buffer = self._zeros() if momentum else None

    def options(self):
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps, "momentum": self.momentum}

    def _update(self, lr):
        update = backend.kernel("rmsprop_update", rmsprop_update)
        update(self.params.data, self.params.grad, self.square_avg, self.momentum_buffer,
                       lr=lr, alpha=self.alpha, eps=self.eps, momentum=self.momentum)


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam, AdamW, RMSprop)}


# ---------------------------------------------------------------------------------------------
# gradient clipping


CLIP_EPS = 1e-6     # torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing


def clip_grad_norm(params, max_norm):
    """Scale ``params.grad`` in place so its global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the gradient is multiplied by
    ``max_norm / (norm + 1e-6)`` when that factor is below 1.

    Returns
    -------
    float, or a 0-d array on a GPU
        The norm before clipping (inf or nan when the gradient is not finite; a nan gradient is
        left as it is, where torch's multiplies it by nan). On a GPU the factor is applied there,
        so the step never waits for the device to read the norm back.
    """
    _require_params("clip_grad_norm", params)
    require_positive("clip_grad_norm", "max_norm", max_norm, finite=False)     # inf: measure, never clip
    g = params.grad
    xp = get_array_module(g)
    total_norm = xp.sqrt(xp.dot(g, g))
    if xp is not np:
        clip_coef = max_norm / (total_norm + CLIP_EPS)
        g *= xp.where(clip_coef < 1, clip_coef, 1).astype(g.dtype)    # nan < 1 is False: nan is left alone
        return total_norm
    total_norm = float(total_norm)
    clip_coef = max_norm / (total_norm + CLIP_EPS)
    if clip_coef < 1:
        g *= clip_coef
    return total_norm


# ---------------------------------------------------------------------------------------------
# learning-rate schedules


def _require_iter(op, it):
    if not is_count(it):
        raise ValueError(f"{op}: argument 'it' must be an iteration number >= 0, got {it!r}")


@dataclass(frozen=True)
class Constant:
    """The same learning rate at every iteration."""

    lr: float
    name: ClassVar[str] = "constant"

    def __post_init__(self):
        require_positive("Constant", "lr", self.lr)

    def __call__(self, it):
        _require_iter("Constant", it)
        return self.lr


@dataclass(frozen=True)
class Step:
    """``lr * gamma ** (it // step_size)`` (``torch.optim.lr_scheduler.StepLR``)."""

    lr: float
    step_size: int
    gamma: float
    name: ClassVar[str] = "step"

    def __post_init__(self):
        require_positive("Step", "lr", self.lr)
        require_positive("Step", "step_size", self.step_size, int)
        require_positive("Step", "gamma", self.gamma)

    def __call__(self, it):
        _require_iter("Step", it)
        k = it // self.step_size
        try:
            lr = self.lr * self.gamma ** k
        except OverflowError:                                   # gamma > 1: gamma^k past the largest float
            lr = math.inf
        if not math.isfinite(lr):                               # or gamma^k finite and lr * gamma^k past it
            raise ValueError(f"Step: the learning rate lr * gamma ** (it // step_size) = {self.lr!r} * "
                             f"{self.gamma!r} ** {k} overflows at iteration {it}; choose a smaller 'gamma' "
                             f"or a larger 'step_size'")
        return lr


@dataclass(frozen=True)
class WarmupCosine:
    r"""nanoGPT's ``get_lr``: linear warm-up, cosine decay to ``min_lr``, then ``min_lr``.

    .. math::

        \eta(it) = \begin{cases}
            \eta_{max} \frac{it + 1}{W + 1} & it < W \\
            \eta_{min} + \tfrac12 (1 + \cos(\pi \frac{it - W}{D - W}))(\eta_{max} - \eta_{min}) & W \le it \le D \\
            \eta_{min} & it > D
        \end{cases}

    with W = ``warmup_iters`` and D = ``decay_iters``.
    """

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    name: ClassVar[str] = "cosine"

    def __post_init__(self):
        require_positive("WarmupCosine", "lr", self.lr)
        _require_nonnegative("WarmupCosine", "min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ValueError(f"WarmupCosine: option 'min_lr' must be at most lr = {self.lr}, got {self.min_lr!r}")
        require_count("WarmupCosine", "warmup_iters", self.warmup_iters)
        if not (is_count(self.decay_iters) and self.decay_iters > self.warmup_iters):
            raise ValueError(f"WarmupCosine: option 'decay_iters' must be an integer > warmup_iters = "
                             f"{self.warmup_iters}, got {self.decay_iters!r}")

    def __call__(self, it):
        _require_iter("WarmupCosine", it)
        if it < self.warmup_iters:
            return self.lr * (it + 1) / (self.warmup_iters + 1)
        if it > self.decay_iters:
            return self.min_lr
        decay_ratio = (it - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))     # from 1 down to 0
        return self.min_lr + coeff * (self.lr - self.min_lr)


SCHEDULES = {cls.name: cls for cls in (Constant, Step, WarmupCosine)}


# ---------------------------------------------------------------------------------------------
# early stopping


class EarlyStopping:
    """Stop when the validation loss has not improved by more than ``min_delta`` for ``patience`` evaluations.

    Parameters
    ----------
    patience : int
        Evaluations without improvement after which ``update`` says stop.
    min_delta : float
        An improvement is a loss below ``best - min_delta``.
    """

    def __init__(self, patience, min_delta=0.0):
        require_positive("EarlyStopping", "patience", patience, int)
        _require_nonnegative("EarlyStopping", "min_delta", min_delta)
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best = math.inf            # the lowest validation loss seen
        self.bad_evals = 0              # evaluations since the last improvement

    def update(self, val_loss):
        """Record one validation loss; return True when training should stop (a nan never improves)."""
        if val_loss is None or isinstance(val_loss, (str, bytes, bool)):      # a 0-d array is a number here
            raise TypeError(f"EarlyStopping.update: argument 'val_loss' must be a number, got "
                            f"{type(val_loss).__name__}")
        val_loss = float(val_loss)
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        return self.stopped

    @property
    def stopped(self):
        """Has the count of evaluations without improvement reached ``patience``?"""
        return self.bad_evals >= self.patience

    def state_dict(self):
        """JSON-able state (``best`` is None before the first evaluation)."""
        return {"best": self.best if math.isfinite(self.best) else None, "bad_evals": self.bad_evals}

    def load_state_dict(self, state):
        try:
            best, bad_evals = state["best"], state["bad_evals"]
            best = math.inf if best is None else float(best)
            if not is_count(bad_evals):
                raise ValueError(f"'bad_evals' must be an integer >= 0, got {bad_evals!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"EarlyStopping.load_state_dict: argument 'state' is not a state_dict of "
                             f"EarlyStopping ({type(e).__name__}: {e})") from None
        self.best, self.bad_evals = best, bad_evals
