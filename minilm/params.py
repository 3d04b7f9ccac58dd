"""Parameters in one flat buffer with named, reshaped views (llm.c's layout).

    params = Params([("wte", (V, C)), ("wpe", (T, C)), ...], dtype=np.float32)
    params["wte"]          # a (V, C) view into params.data
    params.grads["wte"]    # the (V, C) view of the same parameter's gradient in params.grad

Gradients and optimizer moments use the same layout, so the optimizer, gradient clipping,
checkpointing and the whole-model gradient check are loops over one array.
"""
import math

import numpy as np

from minilm.backend import get_array_module


class _Views:
    """name -> reshaped view of one flat array."""

    def __init__(self, flat, layout):
        self._flat, self._layout = flat, layout

    def __getitem__(self, name):
        try:
            start, shape = self._layout[name]
        except KeyError:
            raise KeyError(f"no parameter called {name!r}; parameters are: {', '.join(self._layout)}") from None
        return self._flat[start:start + math.prod(shape)].reshape(shape)

    def __setitem__(self, name, value):
        self[name][...] = value

    def __iter__(self):
        return iter(self._layout)

    def items(self):
        return ((name, self[name]) for name in self._layout)


class Params:
    """A flat float buffer ``data`` and its gradient ``grad``, both viewed by name."""

    def __init__(self, specs, dtype=np.float32, xp=np):
        self.layout = {}                # name -> (offset, shape)
        offset = 0
        for name, shape in specs:
            if name in self.layout:
                raise ValueError(f"Params: parameter name {name!r} appears twice")
            shape = tuple(int(s) for s in shape)
            self.layout[name] = (offset, shape)
            offset += math.prod(shape)
        self.size = offset
        self.data = xp.zeros(offset, dtype=dtype)
        self.grad = xp.zeros(offset, dtype=dtype)
        self._refresh_views()

    def _refresh_views(self):
        self.values = _Views(self.data, self.layout)
        self.grads = _Views(self.grad, self.layout)

    def __getitem__(self, name):
        return self.values[name]

    def __iter__(self):
        return iter(self.layout)

    def shape(self, name):
        return self.layout[name][1]

    def slice(self, name):
        """The range of ``name`` in the flat buffer."""
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

    def zero_grad(self):
        self.grad[...] = 0

    def load(self, flat):
        """Copy a flat array (numpy or cupy, any float dtype) into ``data``."""
        if tuple(flat.shape) != (self.size,):
            raise ValueError(f"Params.load: argument 'flat' must have shape ({self.size},), got {tuple(flat.shape)}")
        xp = get_array_module(self.data)
        self.data[...] = xp.asarray(flat.get() if hasattr(flat, "get") and xp is np else flat, dtype=self.data.dtype)

    def to(self, xp=np, dtype=None):
        """Move the buffers to another array module (numpy <-> cupy) and/or dtype, in place."""
        dtype = dtype or self.data.dtype
        host = (lambda a: a.get()) if hasattr(self.data, "get") and not isinstance(self.data, np.ndarray) else (lambda a: a)
        self.data = xp.asarray(host(self.data), dtype=dtype)
        self.grad = xp.asarray(host(self.grad), dtype=dtype)
        self._refresh_views()
        return self

    def __repr__(self):
        return f"Params({len(self.layout)} tensors, {self.size:,} values, {self.data.dtype})"
