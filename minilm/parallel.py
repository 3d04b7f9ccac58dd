r"""A model's forward and backward on slices of the batch, one slice per core (the numba backend).

On a CPU the numba backend would otherwise split each op over the cores: BLAS's threads run the
matrix products, and the kernels between them (layernorm, GELU, the attention's softmax, the
cross-entropy) run in the calling thread, since a parallel loop started beside BLAS's spinning
threads loses its cores to them (``minilm.backend._share_cores``). Many products are also too
small to share out: the attention's per-head products (64 × 32 by 32 × 64 on the GPT CPU preset)
run on one core while the others wait. ``BatchParallel`` instead runs the whole forward and the
whole backward of slice i of the batch in thread i, with BLAS and every kernel on one core per
thread, so that every op of the step is shared out, with one hand-over per call.

The math is the same. Rows of a batch never meet in a model's forward (every op works per
sequence), so slice i's logits, loss and final state are those rows of the whole batch's. The
loss of the batch is the mean over the N targets that count (not ``IGNORE_INDEX``); with
:math:`n_i` of them in slice i and :math:`L_i` that slice's mean,

.. math::
    L = \sum_i \frac{n_i}{N} L_i, \qquad
    \frac{\partial L}{\partial \theta} = \sum_i \frac{n_i}{N} \frac{\partial L_i}{\partial \theta},

so slice i's backward starts from :math:`n_i / N` (times the loss scale) and the parameter
gradient is the sum of the slices' gradients. Only the rounding differs from one call on the
whole batch (sums are added up in another order), and the same slices and threads give the same
rounding every time, so a run is reproducible.

Dropout draws the same masks as on the whole batch. A mask is ``rng.random(shape) < 1 - p``, and
the uniform draws of a (B, ...) array come out row after row, so slice i's mask is rows
:math:`a_i .. b_i` of the whole batch's draw. Each slice gets a ``_RowsOfDraws`` for its ``rng``:
the first slice to ask for the forward's k-th draw makes the whole batch's draw from the one
generator, in the forward's order, and every slice takes its rows of it. The generator ends in
the state one call on the whole batch leaves it in, so a run resumed from a checkpoint goes on
with the same masks.

It runs the model itself on the whole batch instead when the batch has one row, or a slice
would have no target that counts.

    runner = batch_runner(model)        # the model itself on other backends or with one thread
    logits, loss = runner.forward(idx, targets, train=True, rng=rng)
    runner.backward()                   # the gradient lands in model.params.grad, as usual

Each slice runs on a replica: a shallow copy of the model with its own caches whose ``Params``
reads the model's weights (``Params.sharing_weights``), so an optimizer update of the model's
parameters reaches every replica. The first replica's gradient is the model's own buffer; the
others' are added into it after the backward.
"""
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minilm import backend
from minilm.models.gpt import IGNORE_INDEX, as_ids, check_idx, check_targets, dropout_rng
from minilm.params import Params
from minilm.validate import is_integer, option_error, require_bool, require_positive

__all__ = ["BatchParallel", "batch_runner"]

_executors = {}                 # workers -> the ThreadPoolExecutor shared by every runner
_executors_lock = threading.Lock()


def _executor(workers):
    with _executors_lock:
        if workers not in _executors:
            _executors[workers] = ThreadPoolExecutor(workers, thread_name_prefix="minilm-batch")
        return _executors[workers]


def batch_runner(model, threads=None):
    """``model`` as ``BatchParallel`` runs it, or ``model`` itself where that gains nothing: on
    backends other than numba, with one thread, and for an object that is not one of minilm's
    models (no ``Params``; ``minilm.evaluate`` also scores other models). ``threads`` defaults to
    Numba's thread count (``NUMBA_NUM_THREADS``, default every core)."""
    if threads is not None:
        require_positive("batch_runner", "threads", threads, int)
    if backend.current() != "numba" or not isinstance(getattr(model, "params", None), Params):
        return model
    if threads is None:
        import numba
        threads = numba.get_num_threads()
    return BatchParallel(model, threads) if threads > 1 else model


class _Draws:
    """The whole batch's uniform draws of one forward, made once each, in the order asked for."""

    def __init__(self, rng, batch, slices):
        self.rng, self.batch, self.slices = rng, batch, slices
        self.made = []                  # [draw, slices that have not taken their rows yet]
        self.lock = threading.Lock()

    def rows(self, k, shape, rows):
        """Rows ``rows`` of the k-th draw, whose shape is ``shape`` with the whole batch as axis 0."""
        with self.lock:
            if k == len(self.made):
                self.made.append([self.rng.random((self.batch,) + tuple(shape[1:])), self.slices])
            entry = self.made[k]
            entry[1] -= 1
            draw = entry[0]
            if entry[1] == 0:
                entry[0] = None         # every slice has its rows: let the draw go
        return draw[rows]


class _RowsOfDraws(np.random.Generator):
    """A slice's generator: ``random(shape)`` gives the slice's rows of the draw that the whole
    batch makes there (see the module docstring). Dropout draws nothing else; any other method
    is refused rather than drawn from a stream of its own."""

    def __init__(self, draws, rows):
        super().__init__(np.random.PCG64(0))    # never drawn from: only ``random`` is served
        self._draws, self._rows, self._k = draws, rows, 0

    def random(self, size=None, dtype=np.float64, out=None):
        shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size or ())
        if len(shape) == 0 or shape[0] != self._rows.stop - self._rows.start or dtype != np.float64 or out is not None:
            raise ValueError(f"minilm.parallel: a slice of {self._rows.stop - self._rows.start} rows drew "
                             f"random(size={size!r}); only draws of (rows, ...) in float64 are shared out")
        draw = self._draws.rows(self._k, shape, self._rows)
        self._k += 1
        return draw

    def __getattribute__(self, name):
        if name in _GENERATOR_METHODS:
            raise RuntimeError(f"minilm.parallel: a slice's generator serves only random(), not {name}(), "
                               f"since only uniform draws can be cut into the slices' rows; run this model "
                               f"with the model itself")
        return super().__getattribute__(name)


_GENERATOR_METHODS = frozenset(name for name in dir(np.random.Generator)
                               if not name.startswith("_") and name not in ("random", "bit_generator", "spawn"))


class _Split:
    """What the latest sliced forward left for the backward."""

    def __init__(self, n, weights, model_cache):
        self.n = n                  # slices used (replicas 0 .. n-1)
        self.weights = weights      # n_i / N per slice, or None without targets
        self.model_cache = model_cache      # the model's own cache then: another one means it ran a forward since


class BatchParallel:
    """``model``'s ``forward`` and ``backward``, run on ``threads`` slices of the batch side by side.

    The same arguments and results as the model's own (see the module docstring); every other
    attribute is the model's.
    """

    def __init__(self, model, threads):
        if not (is_integer(threads) and threads >= 2):
            raise option_error("BatchParallel", "threads", "an int >= 2", threads, is_integer(threads), "argument")
        self.model = model
        self.threads = int(threads)
        self._replicas = [self._replica(own_grad=i > 0) for i in range(self.threads)]
        self._pool = _executor(self.threads - 1)
        self._split = None          # None: the latest forward ran on the model itself

    def _replica(self, own_grad):
        replica = copy.copy(self.model)
        replica._cache = None
        if own_grad:
            replica.params = self.model.params.sharing_weights()
        return replica

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _run(self, calls):
        """Run the n calls, call 0 in this thread and the others on the pool; their results in order.
        Every call has finished when this returns or raises."""
        with backend.one_core_per_thread():
            futures = [self._pool.submit(call) for call in calls[1:]]
            try:
                first = calls[0]()
            finally:
                rest = [f.exception() or f.result() for f in futures]     # wait for all of them
        for r in rest:
            if isinstance(r, BaseException):
                raise r
        return [first] + rest

    def forward(self, idx, targets=None, *, train=False, rng=None, **kwargs):
        """The model's ``forward``: (logits, loss), and the final state for a recurrent model."""
        model = self.model
        self._split = None          # until this forward has run in slices
        op = f"{type(model).__name__}.forward"
        V = model.config.vocab_size
        idx = check_idx(op, "idx", as_ids(op, "idx", idx), V, model.config.block_size if model.kind == "gpt" else None)
        if targets is not None:
            targets = check_targets(op, targets, idx, V)
        require_bool(op, "train", train)
        B = idx.shape[0]
        n = min(self.threads, B)
        bounds = [B * i // n for i in range(n + 1)]             # slice i is rows bounds[i]:bounds[i+1]
        rows = [slice(bounds[i], bounds[i + 1]) for i in range(n)]
        weights = None
        if targets is not None:
            counts = [int(np.count_nonzero(targets[r] != IGNORE_INDEX)) for r in rows]
            weights = [c / sum(counts) for c in counts] if min(counts) > 0 else None
        if n < 2 or (targets is not None and weights is None):
            return model.forward(idx, targets, train=train, rng=rng, **kwargs)
        rng = dropout_rng(op, rng, model.rng)
        if train and model.config.dropout > 0:
            draws = _Draws(rng, B, n)
            rngs = [_RowsOfDraws(draws, r) for r in rows]
        else:
            rngs = [rng] * n                                   # no dropout: nothing is drawn

        state = kwargs.pop("state", None)
        if state is not None:
            state = model._check_state(op, state, B)

        def call(i):
            r = rows[i]
            extra = dict(kwargs)
            if state is not None:
                extra["state"] = tuple(tuple(s[r] for s in layer) for layer in state)
            return lambda: self._replicas[i].forward(idx[r], None if targets is None else targets[r],
                                                     train=train, rng=rngs[i], **extra)

        results = self._run([call(i) for i in range(n)])
        self._split = _Split(n, weights, model._cache)
        logits = np.concatenate([res[0] for res in results])
        loss = None
        if targets is not None:
            losses = [res[1] for res in results]
            loss = np.asarray(sum(w * float(l) for w, l in zip(weights, losses)), dtype=losses[0].dtype)
        if len(results[0]) == 2:
            return logits, loss
        new_state = tuple(tuple(np.concatenate([res[2][l][k] for res in results]) for k in range(len(layer)))
                          for l, layer in enumerate(results[0][2]))
        return logits, loss, new_state

    def backward(self, loss_scale=1.0):
        """The model's ``backward``: the latest forward's gradient into ``model.params.grad``."""
        split = self._split
        if split is None:
            return self.model.backward(loss_scale)
        require_positive(f"{type(self.model).__name__}.backward", "loss_scale", loss_scale)
        if split.weights is None:
            raise RuntimeError(f"{type(self.model).__name__}.backward: call forward(idx, targets) with targets first")
        if self.model._cache is not split.model_cache:
            raise RuntimeError(f"{type(self.model).__name__}.backward: the model ran a forward of its own after this "
                               f"runner's (generate does too); the runner's caches are of its older batch. Call the "
                               f"runner's forward again, or the model's backward for the model's forward")
        replicas = self._replicas[:split.n]
        self._run([lambda r=r, w=w: r.backward(loss_scale * w) for r, w in zip(replicas, split.weights)])
        grad = self.model.params.compute_grad                  # replica 0's, the model's own buffer
        for r in replicas[1:]:
            grad += r.params.compute_grad
        return grad                     # as the model's backward: the buffer the gradient landed in
