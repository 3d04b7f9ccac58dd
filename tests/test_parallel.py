"""``minilm.parallel``: a model's forward and backward on slices of the batch, side by side.

The slices' results, combined, must equal the model's own forward and backward on the whole
batch: logits, loss, final state and every parameter's gradient, to ``SPLIT_TOL`` in float64.
With dropout the slices draw the whole batch's masks. Where it falls back to the whole batch (one
row, a slice with no counted target) the results must be the model's own, bit for bit. A run trained and resumed on the numba backend,
which trains through it, computes the same losses as one run straight through.
"""
import json
import os
from types import SimpleNamespace

import numba
import numpy as np
import pytest

import minilm
from minilm import backend, cli, optim
from minilm.cpu import _parallel
from minilm.models.gpt import GPT, GPTConfig, IGNORE_INDEX
from minilm.models.rnnlm import RNNLM, RNNConfig
from minilm.parallel import BatchParallel, batch_runner
from minilm.testing import relative_error

# float64: a slice's forward is the same sequence of ops on fewer rows, so its logits and state
# are the whole batch's rows to the ulp (BLAS may block a product differently for fewer rows).
# The loss and the gradients are sums over the batch added up in another grouping (per slice,
# then across slices), a few ulps of their size: ~1e-15.
SPLIT_TOL = 1e-12

MODELS = {
    "gpt": lambda dropout=0.0: GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                                             dropout=dropout), dtype=np.float64, seed=0),
    "gpt-bias": lambda dropout=0.0: GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                                                  dropout=dropout, bias=True), dtype=np.float64, seed=1),
    "lstm": lambda dropout=0.0: RNNLM(RNNConfig(vocab_size=11, cell="lstm", n_layer=2, hidden_size=12, n_embd=8,
                                                dropout=dropout), dtype=np.float64, seed=0),
    "gru": lambda dropout=0.0: RNNLM(RNNConfig(vocab_size=11, cell="gru", n_layer=1, hidden_size=10, n_embd=6,
                                               dropout=dropout), dtype=np.float64, seed=0),
    "rnn": lambda dropout=0.0: RNNLM(RNNConfig(vocab_size=11, cell="rnn", n_layer=2, hidden_size=9, n_embd=5,
                                               dropout=dropout), dtype=np.float64, seed=0),
}


@pytest.fixture(autouse=True)
def numba_backend(restore_backend):
    minilm.use("numba")


def _batch(B=5, T=7, V=11, seed=0):
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    targets[0, :3] = IGNORE_INDEX            # uneven counts: slice 0 has fewer targets that count
    targets[-1, 1] = IGNORE_INDEX
    return idx, targets


def _state(model, B, seed=1):
    """A non-zero starting state for a recurrent model, or no keyword for a GPT."""
    if model.kind != "rnn":
        return {}
    rng = np.random.default_rng(seed)
    state = tuple(tuple(rng.standard_normal((B, model.config.hidden_size)) * 0.5 for _ in layer)
                  for layer in model.init_state(B))
    return {"state": state}


def _step(runner, model, idx, targets, **kwargs):
    out = runner.forward(idx, targets, **kwargs)
    grad = runner.backward(0.5).copy()                  # a loss scale, as float16 training passes
    assert grad is model.params.compute_grad or np.array_equal(grad, model.params.compute_grad)
    return out, grad


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_slices_equal_the_whole_batch(name, threads):
    model = MODELS[name]()
    idx, targets = _batch()
    kwargs = _state(model, idx.shape[0])
    whole, grad_whole = _step(model, model, idx, targets, train=True, **kwargs)
    runner = BatchParallel(model, threads)
    split, grad_split = _step(runner, model, idx, targets, train=True, **kwargs)
    assert runner._split is not None and runner._split.n == threads      # it did run in slices
    assert relative_error(split[0], whole[0]) <= SPLIT_TOL                # logits
    assert split[1].shape == () and split[1].dtype == whole[1].dtype
    assert relative_error(split[1], whole[1]) <= SPLIT_TOL                # loss
    assert relative_error(grad_split, grad_whole) <= SPLIT_TOL
    if model.kind == "rnn":
        for layer_split, layer_whole in zip(split[2], whole[2]):
            for a, b in zip(layer_split, layer_whole):
                assert a.shape == b.shape and relative_error(a, b) <= SPLIT_TOL


def test_evaluation_without_targets_runs_in_slices():
    model = MODELS["gpt"]()
    idx, _ = _batch(B=4)
    runner = BatchParallel(model, 2)
    logits, loss = runner.forward(idx)
    assert loss is None and runner._split is not None
    assert relative_error(logits, model.forward(idx)[0]) <= SPLIT_TOL
    with pytest.raises(RuntimeError, match=r"GPT\.backward: call forward\(idx, targets\) with targets first"):
        runner.backward()


def test_training_in_slices_gives_the_same_losses_and_weights():
    """Replicas read the model's weights: each update reaches every slice's next forward."""
    results = []
    for make_runner in (lambda m: m, lambda m: BatchParallel(m, 2)):
        model = MODELS["gpt-bias"]()
        runner = make_runner(model)
        opt = optim.AdamW(model.params, lr=1e-2, weight_decay=0.1)
        losses = []
        for step in range(4):
            idx, targets = _batch(B=4, seed=step)
            losses.append(float(runner.forward(idx, targets, train=True)[1]))
            runner.backward()
            optim.clip_grad_norm(model.params, 1.0)
            opt.step()
        results.append((np.array(losses), model.params.data.copy()))
    (losses_whole, w_whole), (losses_split, w_split) = results
    assert relative_error(losses_split, losses_whole) <= SPLIT_TOL
    assert relative_error(w_split, w_whole) <= SPLIT_TOL


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_dropout_in_slices_draws_the_whole_batchs_masks(name, threads):
    """Same masks, so the same results to rounding, and the generator left where the whole batch
    leaves it (a resumed run goes on with the same masks)."""
    model = MODELS[name](dropout=0.3)
    idx, targets = _batch(B=5)
    rng_whole, rng_split = np.random.default_rng(7), np.random.default_rng(7)
    whole, grad_whole = _step(model, model, idx, targets, train=True, rng=rng_whole)
    runner = BatchParallel(model, threads)
    split, grad_split = _step(runner, model, idx, targets, train=True, rng=rng_split)
    assert runner._split is not None and runner._split.n == threads
    assert relative_error(split[1], whole[1]) <= SPLIT_TOL
    assert relative_error(grad_split, grad_whole) <= SPLIT_TOL
    assert rng_split.bit_generator.state == rng_whole.bit_generator.state
    assert rng_split.random() == rng_whole.random()


def test_dropout_in_slices_with_the_models_own_generator():
    model_whole, model_split = MODELS["gpt"](dropout=0.3), MODELS["gpt"](dropout=0.3)
    idx, targets = _batch(B=4)
    loss_whole = model_whole.forward(idx, targets, train=True)[1]         # rng=None: the model's own
    loss_split = BatchParallel(model_split, 2).forward(idx, targets, train=True)[1]
    assert relative_error(loss_split, loss_whole) <= SPLIT_TOL
    assert model_split.rng.bit_generator.state == model_whole.rng.bit_generator.state


def test_a_slices_generator_serves_only_the_batchs_rows():
    from minilm.parallel import _Draws, _RowsOfDraws
    draws = _Draws(np.random.default_rng(0), batch=4, slices=2)
    first, second = _RowsOfDraws(draws, slice(0, 2)), _RowsOfDraws(draws, slice(2, 4))
    whole = np.random.default_rng(0).random((4, 3))
    np.testing.assert_array_equal(np.concatenate([first.random((2, 3)), second.random((2, 3))]), whole)
    with pytest.raises(ValueError, match=r"a slice of 2 rows drew random\(size=\(3, 3\)\)"):
        first.random((3, 3))
    with pytest.raises(RuntimeError, match=r"serves only random\(\), not integers\(\)"):
        first.integers(5)


@pytest.mark.parametrize("case", ["one row", "a slice counts nothing"])
def test_falls_back_to_the_whole_batch_bit_for_bit(case):
    model = MODELS["gpt"](dropout=0.2)
    idx, targets = _batch(B=1 if case == "one row" else 4)
    if case == "a slice counts nothing":
        targets[:2] = IGNORE_INDEX                   # slice 0 (rows 0-1) has no target that counts
    whole, grad_whole = _step(model, model, idx, targets, train=True, rng=3)
    runner = BatchParallel(model, 2)
    split, grad_split = _step(runner, model, idx, targets, train=True, rng=3)
    assert runner._split is None                     # the model ran on the whole batch
    np.testing.assert_array_equal(split[0], whole[0])
    np.testing.assert_array_equal(split[1], whole[1])
    np.testing.assert_array_equal(grad_split, grad_whole)


def test_dropout_off_at_evaluation_runs_in_slices():
    model = MODELS["gpt"](dropout=0.2)
    idx, targets = _batch(B=4)
    runner = BatchParallel(model, 2)
    loss = runner.forward(idx, targets)[1]           # train=False: no dropout, so no masks to keep
    assert runner._split is not None
    assert relative_error(loss, model.forward(idx, targets)[1]) <= SPLIT_TOL


def test_more_threads_than_rows_uses_one_row_each():
    model = MODELS["lstm"]()
    idx, targets = _batch(B=3)
    runner = BatchParallel(model, 8)
    split = runner.forward(idx, targets, state=None)
    assert runner._split.n == 3
    assert relative_error(split[1], model.forward(idx, targets, state=None)[1]) <= SPLIT_TOL


def test_bad_input_is_checked_on_the_whole_batch():
    """The errors name the caller's whole batch, not a slice of it."""
    runner = BatchParallel(MODELS["gpt"](), 2)
    idx, targets = _batch(B=4)
    with pytest.raises(ValueError, match=r"GPT\.forward: argument 'idx' has T = 9 positions, more than block_size = 8"):
        runner.forward(np.zeros((4, 9), dtype=np.int64))
    with pytest.raises(ValueError, match=r"GPT\.forward: argument 'targets' must have the shape of idx "
                                         r"\(B, T\) = \(4, 7\), got \(4, 6\)"):
        runner.forward(idx, targets[:, :6])
    with pytest.raises(ValueError, match=r"GPT\.forward: argument 'idx' must hold ids in \[0, 11\)"):
        runner.forward(idx + 11)
    rnn = BatchParallel(MODELS["gru"](), 2)
    with pytest.raises(ValueError, match=r"RNNLM\.forward: argument 'state' of layer 0 must hold \(B, H\) = \(4, 10\)"):
        rnn.forward(idx, targets, state=((np.zeros((2, 10)),),))
    for threads in (1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"BatchParallel: argument 'threads' must be an int >= 2, got") as info:
            BatchParallel(MODELS["gpt"](), threads)
        assert isinstance(info.value, TypeError) == (type(threads) is not int)      # a wrong kind is a TypeError too
    for threads in (0, -3, "x", 2.0):
        with pytest.raises(ValueError, match=r"batch_runner: option 'threads' must be a positive integer, got"):
            batch_runner(MODELS["gpt"](), threads)
    with pytest.raises(ValueError, match=r"GPT\.forward: option 'train' must be True or False, got 'no'"):
        runner.forward(idx, targets, train="no")
    runner.forward(idx, targets)
    with pytest.raises(ValueError, match=r"GPT\.backward: option 'loss_scale' must be a positive finite number, got None"):
        runner.backward(None)                                  # as the model's own backward says


def test_a_backward_after_the_model_ran_a_forward_of_its_own_is_refused():
    """The runner's caches are of its own batch; once the model has run a newer forward (as
    generate does), the runner's backward would differentiate the older batch."""
    model = MODELS["gpt"]()
    runner = BatchParallel(model, 2)
    idx, targets = _batch(B=4)
    runner.forward(idx, targets)
    model.forward(idx[:1], targets[:1])
    with pytest.raises(RuntimeError, match=r"GPT\.backward: the model ran a forward of its own after this runner's"):
        runner.backward()
    runner.forward(idx, targets)                           # a new forward of the runner: fine again
    runner.backward()


def test_an_error_in_a_slice_reaches_the_caller_after_every_slice_ends():
    model = MODELS["gpt"]()
    runner = BatchParallel(model, 3)
    finished = []

    def failing(*args, **kwargs):
        raise FloatingPointError("slice 2 failed")

    def slow(*args, **kwargs):
        out = GPT.forward(runner._replicas[1], *args, **kwargs)
        finished.append(1)
        return out
    runner._replicas[2].forward = failing
    runner._replicas[1].forward = slow
    idx, targets = _batch(B=6)
    with pytest.raises(FloatingPointError, match="slice 2 failed"):
        runner.forward(idx, targets)
    assert finished == [1]


def test_the_cores_go_back_to_blas_and_the_pool_after_each_call():
    minilm.use("numpy")                 # reset BLAS to the numba backend's rule: a count an earlier
    minilm.use("numba")                 # test left at 1 would otherwise be taken as "before"
    from threadpoolctl import threadpool_info
    blas_before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    pool_before = _parallel.pool_in_use()
    seen = []
    model = MODELS["gpt"]()
    runner = BatchParallel(model, 2)
    replica_forward = runner._replicas[0].forward

    def watching(*args, **kwargs):
        seen.append(([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"],
                     _parallel.pool_in_use()))
        return replica_forward(*args, **kwargs)
    runner._replicas[0].forward = watching
    runner.forward(*_batch(B=4))
    assert seen == [([1] * len(blas_before), False)]          # inside: one thread each, serial kernels
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == blas_before
    assert _parallel.pool_in_use() == pool_before


def test_batch_runner_wraps_only_where_it_gains():
    model = MODELS["gpt"]()
    assert batch_runner(model, threads=1) is model
    assert isinstance(batch_runner(model, threads=2), BatchParallel)
    assert batch_runner(model, threads=2).params is model.params       # every other attribute is the model's
    not_minilms = SimpleNamespace(forward=lambda idx, targets=None: None)   # e.g. a PyTorch model's scorer
    assert batch_runner(not_minilms, threads=2) is not_minilms
    minilm.use("numpy")
    assert batch_runner(model, threads=2) is model                     # the reference tier stays as written


def test_a_params_sharing_weights_sees_updates_and_keeps_its_own_gradient():
    model = MODELS["gpt"]()
    other = model.params.sharing_weights()
    assert other.data is model.params.data
    assert other.grad is not model.params.grad and not other.grad.any()
    model.params.data += 1.0
    np.testing.assert_array_equal(other["wte"], model.params["wte"])
    other.grads["wte"][...] = 2.0
    assert not model.params.grad.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["full", "mixed"])
def test_a_params_sharing_weights_starts_from_a_zero_gradient_of_its_own(dtype):
    """Whatever the original's gradient holds, the sharing Params's starts at zero and is written
    apart: with mixed precision both the float32 ``grad`` and the 16-bit ``compute_grad``."""
    params = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), dtype=dtype, seed=3).params
    params.grad[...] = 1.0
    params.compute_grad[...] = 1.0
    other = params.sharing_weights()
    assert other.compute is params.compute and other.data is params.data
    assert other.compute_grad.dtype == params.compute_grad.dtype
    assert not other.grad.any() and not other.compute_grad.any()
    other.grads["wte"][...] = 2.0
    other.grad[...] = 3.0
    assert np.all(params.compute_grad == 1.0) and np.all(params.grad == 1.0)


def _tiny_run(tmp_path, name, *options):
    """The metrics of a tiny `minilm train` run in ``tmp_path / name``."""
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"], 1200)) + "\n", encoding="utf-8")
    out = tmp_path / name
    assert cli.main(["train", "--data", str(corpus), "--out", str(out), "--n-layer", "1", "--n-head", "2",
                     "--n-embd", "16", "--hidden-size", "16", "--block-size", "16", "--batch-size", "4",
                     "--eval-interval", "4", "--eval-iters", "2", "--warmup-iters", "2", "--lr-decay-iters", "12",
                     "--no-progress", *options]) == 0
    return _metrics(out)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in map(json.loads, f)}


def _iterations(out):
    """The iteration of every metrics line, in order, repeats included."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["iter"] for line in f]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="training runs in slices with 2 or more Numba threads")
def test_numba_training_in_slices_gives_the_numpy_backends_losses(tmp_path):
    """End to end, dropout included: the slices' masks are the whole batch's, so switching the
    backend changes the rounding only (float64, so that it shows)."""
    options = ["--max-iters", "8", "--model", "gpt", "--dropout", "0.1", "--dtype", "float64"]
    reference = _tiny_run(tmp_path, "numpy", *options, "--backend", "numpy")
    sliced = _tiny_run(tmp_path, "numba", *options, "--backend", "numba")
    assert set(sliced) == set(reference) == {0, 4, 8}
    for it in reference:
        assert relative_error(sliced[it], reference[it]) <= SPLIT_TOL, (it, sliced[it], reference[it])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="training runs in slices with 2 or more Numba threads")
@pytest.mark.parametrize("model_options", [
    ["--model", "gpt", "--dropout", "0.1"],                      # the masks' generator is saved and restored
    ["--model", "lstm", "--batching", "contiguous"],             # the carried state is cut and joined
])
def test_numba_run_resumed_computes_the_same_losses(tmp_path, model_options):
    a = _tiny_run(tmp_path, "straight", "--max-iters", "12", "--backend", "numba", *model_options)
    _tiny_run(tmp_path, "split", "--max-iters", "6", "--backend", "numba", *model_options)
    assert cli.main(["train", "--out", str(tmp_path / "split"), "--resume", "--max-iters", "12", "--backend", "numba",
                     "--no-progress"]) == 0
    b = _metrics(tmp_path / "split")
    assert _iterations(tmp_path / "split") == [0, 4, 6, 8, 12]   # resumed at 6, not trained again from 0
    for it in (0, 4, 8, 12):
        assert a[it] == b[it], f"iteration {it}: {a[it]} vs {b[it]}"   # bit for bit
    assert backend.current() == "numba"


def test_backward_returns_the_buffer_the_gradient_landed_in():
    """As the model's own backward: ``params.compute_grad``, which with mixed precision is not
    ``params.grad`` until ``unscale_grads``; the runner had returned the float32 master buffer,
    zeros or the last step's gradient."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), dtype=np.float16, seed=0)
    idx, targets = _batch()
    model.forward(idx, targets)
    own = model.backward().copy()
    runner = BatchParallel(model, 2)
    runner.forward(idx, targets)
    grad = runner.backward()
    assert grad is model.params.compute_grad and grad.dtype == np.float16
    # 1e-3: float16 gradients of ~0.1, whose slices' sums round apart by a few units of 6e-5
    assert np.allclose(grad, own, rtol=0, atol=1e-3)


def test_a_float32_models_loss_stays_float32():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), dtype=np.float32, seed=0)
    idx, targets = _batch()
    logits, loss = BatchParallel(model, 2).forward(idx, targets)
    assert logits.dtype == loss.dtype == model.forward(idx, targets)[1].dtype == np.float32


def test_each_draw_is_let_go_once_every_slice_has_its_rows(monkeypatch):
    """A forward in slices holds one whole-batch draw at a time, not all of them: each is dropped
    when the last slice has taken its rows (an attention mask's draw is (B, NH, T, T) float64)."""
    from minilm import parallel
    made = []
    real_init = parallel._Draws.__init__
    monkeypatch.setattr(parallel._Draws, "__init__", lambda self, *a: made.append(self) or real_init(self, *a))
    model = MODELS["gpt"](dropout=0.1)
    idx, targets = _batch()
    BatchParallel(model, 2).forward(idx, targets, train=True)
    draws, = made
    assert len(draws.made) == 1 + 3 * model.config.n_layer          # embeddings, then attn, resid, mlp per block
    assert all(draw is None and left == 0 for draw, left in draws.made)
