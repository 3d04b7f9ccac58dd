"""Per-op microbenchmarks at the shapes of the CPU presets: forward + backward, per backend."""
import time

import numpy as np

from minilm.bench.threads import limited
from minilm.bench.worker import _cupy_sync, _no_sync

# the GPT CPU preset's shapes and the LSTM/GRU presets'
B, T, C, NH, V = 12, 64, 128, 4, 65
RB, RT, RD, RH = 32, 64, 128, 256


def _cases(rng):
    f = np.float32
    n = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(f)  # noqa: E731
    hs = C // NH
    return {
        "layernorm": ((n(B, T, C), np.ones(C, f), np.zeros(C, f)), {}),
        "gelu": ((n(B, T, 4 * C),), {}),
        "softmax": ((n(B, NH, T, T),), {}),
        "attention": ((n(B, NH, T, hs), n(B, NH, T, hs), n(B, NH, T, hs)), {"causal": True}),
        "self_attention": ((n(B, T, C), n(C, 3 * C, scale=0.02), np.zeros(3 * C, f), n(C, C, scale=0.02),
                            np.zeros(C, f)), {"n_head": NH}),
        "ffn": ((n(B, T, C), n(C, 4 * C, scale=0.02), np.zeros(4 * C, f), n(4 * C, C, scale=0.02),
                 np.zeros(C, f)), {}),
        "embedding": ((rng.integers(0, V, (B, T)), n(V, C)), {}),
        "cross_entropy": ((n(B, T, V), rng.integers(0, V, (B, T))), {}),
        "dropout": ((n(B, T, C),), {"p": 0.2, "rng": 0}),
        "lstm": ((n(RB, RT, RD), np.zeros((RB, RH), f), np.zeros((RB, RH), f), n(RD, 4 * RH, scale=0.06),
                  n(RH, 4 * RH, scale=0.06), np.zeros(4 * RH, f)), {}),
        "gru": ((n(RB, RT, RD), np.zeros((RB, RH), f), n(RD, 3 * RH, scale=0.06), n(RH, 3 * RH, scale=0.06),
                 np.zeros(3 * RH, f), np.zeros(3 * RH, f)), {}),
    }


def _time(fn, repeats, sync=_no_sync):
    """The median ms of ``repeats`` calls of ``fn`` after one untimed call. ``sync`` waits for the
    device: CuPy only queues its kernels, so each clock read comes after one (else the time is the
    launches' alone)."""
    fn()                                   # compile / warm up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def run(backends, *, threads, repeats=20, out=print):
    import minilm
    from minilm import backend
    rows = []
    cases = _cases(np.random.default_rng(0))
    for b in backends:
        minilm.use(b)
        xp = backend.xp()
        sync = _cupy_sync() if b == "cupy" else _no_sync
        with limited(threads):                          # --threads, as the worker processes get it
            for name, (args, kwargs) in cases.items():
                args = tuple(xp.asarray(a) for a in args)
                forward, backward = backend.op(f"{name}_forward"), backend.op(f"{name}_backward")

                def step():
                    y, cache = forward(*args, **kwargs)
                    backward(xp.ones_like(y), cache)
                rows.append({"backend": b, "op": name, "ms": _time(step, repeats, sync)})
    out(f"\nper-op forward + backward, ms (median of {repeats}; GPT CPU preset and LSTM preset shapes, float32)")
    out(f"  {'op':<16}" + "".join(f"{b:>10}" for b in backends))
    for name in cases:
        out(f"  {name:<16}" + "".join(f"{r['ms']:10.3f}" for b in backends for r in rows
                                      if r["backend"] == b and r["op"] == name))
    return rows
