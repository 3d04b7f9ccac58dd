"""A GPT's training step captured once as a CUDA graph, then replayed: one launch per step.

A step of the baby GPT issues about 500 kernels. In float32 Python keeps ahead of the GPU, but
in 16 bits each kernel is shorter than the Python that issues it, and the GPU waits for the host
most of the step. CUDA graphs take that cost away: the step's kernels are recorded once from a
stream (``cupy.cuda.Stream.begin_capture``) and the whole list is launched again with one call.

What the graph holds: the forward (ids -> loss), the backward into ``params.grad`` and, with
mixed precision, the unscaling into float32 with its finiteness flag -- ``GPT.forward``,
``GPT.backward`` and ``Params.unscale_grads``, the same calls as the step run op by op. Clipping
and the optimizer update stay outside: a few kernels each, and they take the learning rate of
the iteration as a number. A replay computes what the uncaptured step computes:

* **inputs**: the ids and targets are copied into the graph's own input arrays before each launch,
  after ``require_ids`` has checked them on the host (the capture cannot read the device, so the
  ops' own check of the ids is skipped in it: ``minilm.validate.device_ids_checked_by_caller``);
* **randomness**: each dropout kernel reads its seed from a table in device memory, filled before
  each launch with the seeds the uncaptured step draws from ``rng``, in the same order
  (``minilm.gpu.dropout.SeedTable``), so ``rng`` advances exactly as it does without the graph;
* **memory**: the arrays the step allocates come from a memory pool of the graph's own, which
  nothing else allocates from, so their addresses stay the graph's between launches. The loss
  and the flag returned are those arrays: read them before the next call.

The first call with a new batch shape runs the step op by op (it compiles the kernels and fills
CuPy's caches, which a capture cannot do) and the second captures the graph, then launches it.
Float16 with loss scaling is not captured: its backward starts from the loss scale, a number that
changes during training.
"""
import cupy
import numpy as np

from minilm.gpu import dropout
from minilm.models.gpt import check_idx, check_targets
from minilm.validate import device_ids_checked_by_caller

__all__ = []        # not an op family: nothing here replaces a reference function (minilm.gpu's package docstring)


class CaptureError(RuntimeError):
    """The step did something a CUDA graph capture does not allow (for instance, a read of the device)."""


class _Captured:
    """One captured step: its graph, its input arrays, its seed table, its outputs and its memory."""

    def __init__(self, graph, idx, targets, seeds, loss, finite, pool, stream):
        self.graph, self.idx, self.targets, self.seeds = graph, idx, targets, seeds
        self.loss, self.finite, self.pool, self.stream = loss, finite, pool, stream


class CapturedStep:
    """``step(idx, targets, rng) -> (loss, finite)`` for ``model`` (a GPT on the cupy backend).

    ``idx`` and ``targets`` are (B, T) integer NumPy arrays; ``rng`` is the dropout rng the
    uncaptured ``model.forward(..., train=True, rng=rng)`` would take. ``loss`` is a 0-d device
    array; ``finite`` a 0-d device bool array with mixed precision (whether every gradient is
    finite), else None. After the call ``params.grad`` holds the unscaled gradient, as after
    ``model.backward()`` and ``params.unscale_grads()``.
    """

    def __init__(self, model):
        if model.kind != "gpt":
            raise TypeError(f"CapturedStep: argument 'model' must be a GPT, got {type(model).__name__}")
        self.model = model
        self._captured = {}          # (idx shape, dtypes) -> _Captured
        self._seen = set()           # keys whose first, uncaptured step has run

    def pool_bytes(self):
        """Device memory held by the captured graphs' own pools (outside CuPy's default pool)."""
        return sum(c.pool.total_bytes() for c in self._captured.values())

    def __call__(self, idx, targets, rng):
        cfg = self.model.config
        idx = check_idx("GPT.forward", "idx", np.ascontiguousarray(idx), cfg.vocab_size, cfg.block_size)
        targets = np.ascontiguousarray(check_targets("GPT.forward", targets, idx, cfg.vocab_size))
        key = (idx.shape, idx.dtype.str, targets.dtype.str)
        if key not in self._seen:                    # compile and warm up, op by op
            self._seen.add(key)
            return self._step(cupy.asarray(idx), cupy.asarray(targets), rng)
        if key not in self._captured:
            self._captured[key] = self._capture(idx, targets, rng)
        c = self._captured[key]
        c.idx.set(idx)
        c.targets.set(targets)
        c.seeds.fill(rng)                            # the draws the uncaptured step makes, in its order
        c.graph.launch(stream=cupy.cuda.get_current_stream())
        return c.loss, c.finite

    def _step(self, idx, targets, rng):
        """The step op by op: forward, backward and (mixed precision) the unscaling's flag."""
        model = self.model
        _, loss = model.forward(idx, targets, train=True, rng=rng)
        model.backward(1.0)
        finite = model.params.unscale_grads(1.0, wait=False)
        return loss, (None if finite is True else finite)

    def _capture(self, idx, targets, rng):
        idx_in = cupy.empty(idx.shape, dtype=idx.dtype)          # the graph's inputs: default pool, kept
        targets_in = cupy.empty(targets.shape, dtype=targets.dtype)
        seeds = dropout.SeedTable()
        pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.get_current_stream().synchronize()
        with cupy.cuda.using_allocator(pool.malloc), stream, dropout.recording_seeds(seeds), \
                device_ids_checked_by_caller():
            stream.begin_capture()
            try:
                loss, finite = self._step(idx_in, targets_in, rng)
            except Exception as e:
                try:
                    stream.end_capture()             # leave capture mode; the step's own error is the one to see
                except Exception:
                    pass
                raise CaptureError(f"CapturedStep: the step could not be captured as a CUDA graph: "
                                   f"{type(e).__name__}: {e}") from e
            graph = stream.end_capture()
        return _Captured(graph, idx_in, targets_in, seeds, loss, finite, pool, stream)
