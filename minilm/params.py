"""Parameters in one flat buffer with named, reshaped views (llm.c's layout).

    params = Params([("wte", (V, C)), ("wpe", (T, C)), ...], dtype=np.float32)
    params["wte"]          # the (V, C) view the forward reads (into params.data without mixed precision)
    params.values["wte"]   # the (V, C) view into params.data, the master weights: initialise through it
    params.grads["wte"]    # the (V, C) view of the same parameter's gradient in params.grad

Gradients and optimizer moments use the same layout, so the optimizer, gradient clipping,
checkpointing and the whole-model gradient check are loops over one array.

Mixed precision (``compute_dtype`` float16 or bfloat16, on the GPU): ``data`` and ``grad`` stay
float32 -- the master weights that the optimizer updates, clipping reads and checkpoints save --
and a second flat pair, ``compute`` and ``compute_grad``, holds the weights in the low precision
for the forward and receives the backward's gradients. ``params[name]`` and ``params.grads[name]``
are views of that pair; ``values`` stays a view of the master weights. Two copies move between
them, once per step each:

    params.unscale_grads(1 / loss_scale)   # compute_grad -> grad, in float32; False on inf/NaN
    params.sync()                          # data -> compute, after the optimizer's update

Without a ``compute_dtype`` the pairs are the same arrays and both calls cost nothing.
"""
import copy
import math
import numbers

import numpy as np

from minilm.backend import get_array_module


class _Views:
    """name -> reshaped view of one flat array (each made once: a model asks for every view at
    every step)."""

    def __init__(self, flat, layout):
        self._flat, self._layout = flat, layout
        self._made = {}

    def __getitem__(self, name):
        view = self._made.get(name)
        if view is None:
            try:
                start, shape = self._layout[name]
            except KeyError:
                raise KeyError(f"no parameter called {name!r}; parameters are: {', '.join(self._layout)}") from None
            view = self._made[name] = self._flat[start:start + math.prod(shape)].reshape(shape)
        return view

    def __setitem__(self, name, value):
        view = self[name]
        _require_value(name, view, value, scalar_ok=True)
        view[...] = value

    def __iter__(self):
        return iter(self._layout)

    def items(self):
        return ((name, self[name]) for name in self._layout)


def _require_value(name, view, value, *, scalar_ok):
    """A value written into parameter ``name``'s view is real and has its shape (or, where
    ``scalar_ok``, is one number): NumPy would write NaN for None and broadcast a bias into a weight."""
    if value is None:
        raise TypeError(f"Params: parameter {name!r} takes an array of shape {view.shape}, got None (a backward "
                        f"returns None for integer inputs such as token ids: check the order of the unpacked "
                        f"gradients)")
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if dtype.kind not in "fiub" and dtype.name != "bfloat16":      # ml_dtypes' bfloat16 is of kind 'V'
        raise TypeError(f"Params: parameter {name!r} takes real numbers, got {dtype}")
    shape = tuple(np.shape(value))
    if shape != tuple(view.shape) and not (scalar_ok and shape == ()):
        raise ValueError(f"Params: parameter {name!r} has shape {tuple(view.shape)}, got an array of shape {shape}")


class Params:
    """A flat float buffer ``data`` and its gradient ``grad``, both viewed by name."""

    def __init__(self, specs, dtype=np.float32, xp=np, compute_dtype=None):
        self.layout = {}                # name -> (offset, shape)
        offset = 0
        for name, shape in specs:
            if name in self.layout:
                raise ValueError(f"Params: parameter name {name!r} appears twice")
            if any(not isinstance(s, numbers.Integral) or isinstance(s, bool) for s in shape):   # int(2.5) is 2
                raise ValueError(f"Params: parameter {name!r} must have a shape of integer sizes, got {tuple(shape)}")
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"Params: parameter {name!r} must have a shape of sizes >= 0, got {shape}")
            self.layout[name] = (offset, shape)
            offset += math.prod(shape)
        self.size = offset
        self.data = xp.zeros(offset, dtype=dtype)
        self.grad = xp.zeros(offset, dtype=dtype)
        self.compute_dtype = None if compute_dtype is None or np.dtype(compute_dtype) == self.data.dtype \
            else np.dtype(compute_dtype)
        self._pending = set()          # parameters a running backward has not written yet (``begin_grads``)
        self.grad_in_compute = False   # mixed precision: a backward's gradient not yet moved to ``grad``
        self._refresh_views()

    @property
    def mixed(self):
        """True when the forward runs on a low-precision copy of the float32 master weights."""
        return self.compute_dtype is not None

    def _refresh_views(self):
        if self.mixed:
            xp = get_array_module(self.data)
            self.compute = self.data.astype(self.compute_dtype)
            self.compute_grad = xp.zeros(self.size, dtype=self.compute_dtype)
        else:
            self.compute, self.compute_grad = self.data, self.grad
        self.values = _Views(self.data, self.layout)            # master weights
        self._weights = _Views(self.compute, self.layout)       # what the forward reads
        self.grads = _Views(self.compute_grad, self.layout)     # where the backward accumulates

    def __getitem__(self, name):
        """The weights the forward computes with: a view of ``compute`` (``data`` without mixed precision)."""
        return self._weights[name]

    def __setitem__(self, name, value):
        """``params[name] = value`` sets the master weights (``values[name]``), then the compute copy."""
        self.values[name] = value
        self.sync()

    def sync(self):
        """Copy the master weights into the low-precision ``compute`` copy (after an update or a load)."""
        if self.mixed:
            self.compute[...] = self.data          # rounds to the compute dtype

    def unscale_grads(self, inv_scale=1.0, *, wait=True):
        """``grad`` = ``compute_grad`` * inv_scale in float32; False when any of it is inf or NaN.

        Without mixed precision ``grad`` already holds the gradient (scaled by the loss scale the
        backward was given), so it is only multiplied by ``inv_scale`` when that is not 1, and
        True is returned without a look when it is 1. With ``wait=False`` the answer is a 0-d bool
        array on the data's device, not read back (a captured GPU step, ``minilm.gpu.graph``).
        """
        xp = get_array_module(self.data)
        self.grad_in_compute = False
        if self.mixed:
            xp.multiply(self.compute_grad, self.data.dtype.type(inv_scale), out=self.grad, casting="unsafe")
        elif inv_scale != 1.0:
            self.grad *= self.data.dtype.type(inv_scale)
        else:
            return True
        finite = xp.isfinite(xp.sum(self.grad))
        return bool(finite) if wait else finite

    def __iter__(self):
        return iter(self.layout)

    def shape(self, name):
        return self.layout[name][1]

    def slice(self, name):
        """The range of ``name`` in the flat buffer."""
        if name not in self.layout:
            raise KeyError(f"no parameter called {name!r}; parameters are: {', '.join(self.layout)}")
        start, shape = self.layout[name]
        return slice(start, start + math.prod(shape))

    def mask(self, predicate):
        """A flat 0/1 array that is 1 on the parameters whose (name, shape) satisfy ``predicate``."""
        xp = get_array_module(self.data)
        m = np.zeros(self.size, dtype=self.data.dtype)
        for name, (_, shape) in self.layout.items():
            if predicate(name, shape):
                m[self.slice(name)] = 1
        return xp.asarray(m)

    def sharing_weights(self):
        """A Params that reads the same weights (the same arrays, so every update and ``load`` reaches
        it too) and has gradient buffers of its own, zeroed: for a backward that runs beside this
        one's on another part of the batch (``minilm.parallel``). ``to`` replaces the arrays, so a
        Params moved with ``to`` shares nothing with the ones made from it before."""
        xp = get_array_module(self.data)
        other = copy.copy(self)
        other.grad = xp.zeros_like(self.grad)
        other.compute_grad = xp.zeros_like(self.compute_grad) if self.mixed else other.grad
        other.grads = _Views(other.compute_grad, self.layout)
        return other

    def zero_grad(self):
        self.compute_grad[...] = 0

    # A model's backward writes its gradients with these three calls. The result is that of
    # ``zero_grad`` followed by adding every gradient in, without the pass that zeroes the whole
    # buffer first: a parameter's first gradient is copied into its view, and only a second one
    # (the tied embedding's) is added.

    def begin_grads(self):
        """Start a backward: no parameter has a gradient yet."""
        self._pending = set(self.layout)

    def add_grad(self, name, grad):
        """grads[name] += grad, since ``begin_grads``: a copy for the parameter's first gradient."""
        view = self.grads[name]
        _require_value(name, view, grad, scalar_ok=False)
        if name in self._pending:
            view[...] = grad
            self._pending.discard(name)
        else:
            view += grad

    def end_grads(self):
        """End a backward: the parameters that got no gradient get zero."""
        for name in self._pending:
            self.grads[name][...] = 0
        self._pending = set()
        self.grad_in_compute = self.mixed

    def load(self, flat):
        """Copy a flat array (numpy or cupy, any float dtype) into ``data``."""
        if not hasattr(flat, "shape"):
            raise TypeError(f"Params.load: argument 'flat' must be an array, got {type(flat).__name__}")
        if tuple(flat.shape) != (self.size,):
            raise ValueError(f"Params.load: argument 'flat' must have shape ({self.size},), got {tuple(flat.shape)}")
        if flat.dtype.kind != "f" and flat.dtype.name != "bfloat16":     # an int one would load truncated, silently
            raise TypeError(f"Params.load: argument 'flat' must hold floating-point numbers, got dtype {flat.dtype}")
        xp = get_array_module(self.data)
        self.data[...] = xp.asarray(flat.get() if hasattr(flat, "get") and xp is np else flat, dtype=self.data.dtype)
        self.sync()

    def to(self, xp=np, dtype=None):
        """Move the buffers to another array module (numpy <-> cupy) and/or dtype.

        The arrays are replaced, not converted in place: views taken before, and an optimizer
        built before (its moments), still hold the old ones. Take views and build optimizers after
        the move (an optimizer moves too with ``opt.load_state_dict(opt.state_dict())``).
        """
        dtype = dtype or self.data.dtype
        host = (lambda a: a.get()) if hasattr(self.data, "get") and not isinstance(self.data, np.ndarray) else (lambda a: a)
        self.data = xp.asarray(host(self.data), dtype=dtype)
        self.grad = xp.asarray(host(self.grad), dtype=dtype)
        self._refresh_views()
        return self

    def __repr__(self):
        mixed = f", computing in {self.compute_dtype}" if self.mixed else ""
        return f"Params({len(self.layout)} tensors, {self.size:,} values, {self.data.dtype}{mixed})"


def precision_of(dtype):
    """``Params`` arguments for a model of ``dtype``: float16 and bfloat16 train as mixed precision,
    with float32 master weights and a 16-bit compute copy; other dtypes are used as they are."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 2:                    # float16, bfloat16
        return {"dtype": np.dtype(np.float32), "compute_dtype": dtype}
    return {"dtype": dtype}
