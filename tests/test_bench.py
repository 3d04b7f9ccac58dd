"""`minilm bench`: the rounds, the medians and ratios it reports, one real measurement end to end, and
the GPU tables' options, layout and MFU arithmetic (from stand-in measurements: no GPU needed)."""
import json
import os

import numpy as np
import pytest

from minilm import cli
from minilm.bench import run as bench_run
from minilm.config import preset


def test_rounds_report_medians_and_the_ratio_within_each_round(monkeypatch):
    """Each job runs once per round, in turn; a row gives the median over rounds and the median
    (and range) of its ratio to PyTorch in the same round, not the ratio of the medians."""
    order = []
    speeds = {"numba": [100.0, 300.0, 200.0], "torch": [100.0, 100.0, 400.0]}

    def fake_run_job(job):
        name = job.get("backend", "torch")
        order.append(name)
        rate = speeds[name][sum(1 for n in order if n == name) - 1]
        return {"job": job, "tokens_per_s": rate, "ms_per_step": 1000 / rate, "peak_rss_mb": len(order)}

    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    jobs = [{"impl": "minilm", "backend": "numba"}, {"impl": "torch"}]
    numba_row, torch_row = bench_run._rounds(jobs, 3)
    assert order == ["numba", "torch"] * 3                          # in turn, round after round
    assert numba_row["tokens_per_s"] == 200.0 and numba_row["ms_per_step"] == 5.0
    assert numba_row["vs_torch"] == {"median": 1.0, "min": 0.5, "max": 3.0}   # ratios 1, 3, 0.5
    assert torch_row["vs_torch"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert numba_row["peak_rss_mb"] == 5 and len(numba_row["rounds"]) == 3


def test_training_rows_give_the_ratio_to_the_numpy_backend_within_each_round(monkeypatch, capsys):
    speeds = {"numpy": [100.0, 100.0, 50.0], "numba": [200.0, 150.0, 150.0], "torch": [100.0, 100.0, 100.0]}
    seen = {name: 0 for name in speeds}

    def fake_run_job(job):
        name = job.get("backend", "torch")
        rate = speeds[name][seen[name]]
        seen[name] += 1
        return {"job": job, "tokens_per_s": rate, "ms_per_step": 1000 / rate, "peak_rss_mb": 1.0}

    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    jobs = [{"impl": "minilm", "what": "train", "backend": name} for name in ("numpy", "numba")] + \
        [{"impl": "torch", "what": "train"}]
    numpy_row, numba_row, torch_row = bench_run._rounds(jobs, 3)
    assert numba_row["vs_numpy"] == {"median": 2.0, "min": 1.5, "max": 3.0}   # ratios 2, 1.5, 3
    assert numpy_row["vs_numpy"]["median"] == 1.0 and "vs_numpy" not in torch_row
    bench_run._print_rows(print, "training step", [numpy_row, numba_row, torch_row], "ms_per_step")
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].endswith("vs numpy (range)") and lines[4].endswith("2.00x (1.50-3.00)")
    sample = [{"impl": "minilm", "what": "sample", "backend": "numpy", "cache": True}, {"impl": "torch", "what": "sample"}]
    monkeypatch.setattr(bench_run, "run_job", lambda job: {"job": job, "tokens_per_s": 10.0, "peak_rss_mb": 1.0})
    assert all("vs_numpy" not in row for row in bench_run._rounds(sample, 1))   # only training steps


def test_rounds_report_the_median_speed_and_the_largest_memory(monkeypatch):
    """tokens/s and ms/step are the median round's (not means); peak memory, the memory the model
    and its run added and the GPU memory are the largest over the rounds."""
    measured = {"tokens_per_s": [100.0, 400.0, 200.0], "ms_per_step": [10.0, 2.5, 5.0],
                "peak_rss_mb": [5.0, 9.0, 7.0], "baseline_rss_mb": [1.0, 2.0, 6.0], "gpu_pool_mb": [300.0, 500.0, 400.0]}
    calls = []

    def fake_run_job(job):
        calls.append(job)
        return {"job": job, **{key: values[len(calls) - 1] for key, values in measured.items()}}

    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    (row,) = bench_run._rounds([{"impl": "minilm", "what": "train", "backend": "cupy"}], 3)
    assert row["tokens_per_s"] == 200.0 and row["ms_per_step"] == 5.0        # medians (the means are 233, 5.8)
    assert row["median_round"] == 2
    assert row["peak_rss_mb"] == 9.0 and row["run_rss_mb"] == 7.0            # 9 - 2 in round 2
    assert row["gpu_mb"] == 500.0
    assert "vs_torch" not in row and "vs_numpy" not in row


def test_peak_memory_is_read_in_each_systems_unit_and_left_out_where_it_cannot_be(monkeypatch, capsys, tmp_path):
    """Linux's /proc/self/status gives VmHWM in kB; without it, getrusage's ru_maxrss is KiB on Linux
    and bytes on macOS; Windows has neither, and there the column says n/a instead of the worker
    failing at its import."""
    import types
    from minilm.bench import worker
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t   43008 kB\nVmRSS:\t   40000 kB\n")
    monkeypatch.setattr(worker, "PROC_STATUS", str(status))
    assert worker._rss_mb() == 42.0
    monkeypatch.setattr(worker, "PROC_STATUS", str(tmp_path / "missing"))     # not Linux
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=2**30))
    monkeypatch.setattr(worker, "resource", fake)
    monkeypatch.setattr(worker.sys, "platform", "linux")
    assert worker._rss_mb() == 2**20
    monkeypatch.setattr(worker.sys, "platform", "darwin")
    assert worker._rss_mb() == 1024
    monkeypatch.setattr(worker, "resource", None)
    assert worker._rss_mb() is None
    monkeypatch.setattr(bench_run, "run_job", lambda job: {"job": job, "tokens_per_s": 10.0, "ms_per_step": 1.0,
                                                           "peak_rss_mb": None, "baseline_rss_mb": None})
    (row,) = bench_run._rounds([{"impl": "minilm", "what": "train", "backend": "numpy"}], 2)
    assert row["peak_rss_mb"] is None and "run_rss_mb" not in row
    bench_run._print_rows(print, "training step", [row], "ms_per_step")
    assert "n/a" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's /proc gives a process's own peak")
def test_a_workers_peak_memory_is_its_own_not_the_bench_processes():
    """A bench process holding 400 MB (as one that has loaded numba holds ~100) must neither raise a
    worker's peak MB nor hide its +MB model+run: getrusage's ru_maxrss is carried over fork and exec."""
    job = {"impl": "minilm", "backend": "numpy", "cache": True, "what": "sample",
           "preset": "shakespeare-char-cpu", "tokens": 2, "threads": 1}
    alone = bench_run.run_job(job)
    ballast = np.ones(400 * 2**20 // 8)                         # 400 MB resident in this process
    beside = bench_run.run_job(job)
    del ballast
    # 50 MB: far above two runs' own difference (a few MB), far below the 400 MB ballast
    assert beside["peak_rss_mb"] < alone["peak_rss_mb"] + 50
    assert beside["peak_rss_mb"] - beside["baseline_rss_mb"] > 2      # the model alone is 3.2 MB


def test_a_workers_step_statistics():
    from minilm.bench import worker
    stats = worker._stats([0.1, 0.6, 0.2], tokens=64)
    assert stats["steps"] == 3
    assert stats["ms_per_step"] == pytest.approx(200.0) and stats["ms_per_step_min"] == pytest.approx(100.0)
    assert stats["tokens_per_s"] == pytest.approx(64 / 0.2)                 # the tokens of a step / the median step


def test_a_sampling_measurement_counts_its_tokens_per_second(numpy_backend):
    import dataclasses
    from minilm.bench import worker
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=2, n_embd=16, block_size=16)
    result = worker.minilm_sample({"backend": "numpy", "cache": True, "tokens": 5}, cfg, 11)
    assert result["tokens"] == 5 and result["seconds"] > 0
    assert result["tokens_per_s"] * result["seconds"] == pytest.approx(5, rel=1e-12)


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    from minilm.bench.converge import time_to
    curve = [{"iter": 0, "train_seconds": 0.0, "val_loss": 4.0}, {"iter": 10, "train_seconds": 3.0, "val_loss": 2.0},
             {"iter": 20, "train_seconds": 6.0, "val_loss": 1.5}, {"iter": 30, "train_seconds": 9.0, "val_loss": 1.9}]
    assert time_to(curve, 2.0) == 3.0                                        # reached exactly: counts
    assert time_to(curve, 1.9) == 6.0                                        # the first time, not the last
    assert time_to(curve, 1.0) is None


def test_a_minilm_curve_adds_up_the_training_time_of_each_interval(tmp_path, monkeypatch):
    """minilm train logs, per evaluation, the tokens/s of the steps since the one before; the
    curve's training seconds are the running sum of (steps x B x T) / (tokens/s)."""
    import dataclasses
    import minilm
    from minilm import train
    from minilm.bench import converge
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), batch_size=4, block_size=16)     # 64 tokens a step
    rows = [{"iter": 0, "tokens_per_s": None, "val_loss": 4.0}, {"iter": 10, "tokens_per_s": 640.0, "val_loss": 3.0},
            {"iter": 20, "tokens_per_s": 320.0, "val_loss": 2.5}, {"iter": 25, "tokens_per_s": 160.0, "val_loss": 2.4}]

    def fake_train(cfg, *, data, out_dir, **kwargs):
        with open(os.path.join(out_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(minilm, "use", lambda name: None)
    monkeypatch.setattr(converge.tempfile, "tempdir", str(tmp_path))
    curve = converge.minilm_curve(cfg, "shakespeare", "numpy")
    assert list(tmp_path.iterdir()) == []                     # the run's folder is not left behind
    assert [p["iter"] for p in curve] == [0, 10, 20, 25] and [p["val_loss"] for p in curve] == [4.0, 3.0, 2.5, 2.4]
    # 640 tokens at 640/s, 640 at 320/s, 320 at 160/s: 1 + 2 + 2 seconds
    assert [p["train_seconds"] for p in curve] == pytest.approx([0.0, 1.0, 3.0, 5.0], rel=1e-12)


def test_the_peer_loop_counts_training_time_as_minilm_train_counts_it(tmp_path, monkeypatch):
    """Both sides of converge count a step with its batch draw, leave evaluation out and leave the
    first step (Numba's compilation; PyTorch's first allocations) untimed, billing the steps before
    the first evaluation at the average of the others: the same stand-in step times give the same
    curve from minilm train (read back by ``minilm_curve``) and from the peer's loop (``_loop``)."""
    import dataclasses
    import types
    from minilm import train
    from minilm.bench import converge
    now, BATCH = [0.0], 0.5                                  # a stand-in clock; a batch draw takes 0.5 s

    def cost(it):                                            # step 0 takes 1000 s, step it 1 + it
        return 1000.0 if it == 0 else 1.0 + it
    clock = types.SimpleNamespace(perf_counter=lambda: now[0])
    expected = [0.0, 5.0, 13.0, 18.5]                        # 2 x (0.5 + 2), + (2.5 + 3) + (3.5 + 4), + (4.5 + 5)

    class Batches:
        def next_batch(self):
            now[0] += BATCH
            return None, None

    def step(it, x, y):
        now[0] += cost(it)

    def evaluate(val):
        now[0] += 1e4                                        # evaluating: not training time
        return 3.0
    monkeypatch.setattr(converge, "time", clock)
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=2, n_embd=8, block_size=8,
                              batch_size=2, max_iters=5, eval_interval=2, eval_iters=1, warmup_iters=1,
                              lr_decay_iters=5)
    peer = converge._loop(cfg, Batches(), [], step, evaluate)
    assert [p["iter"] for p in peer] == [0, 2, 4, 5] and [p["train_seconds"] for p in peer] == expected

    class TimedBatches(train.RandomBatches):                 # minilm train's, with the same costs
        def next_batch(self):
            now[0] += BATCH
            return super().next_batch()

    class TimedStep(train.TrainStep):
        calls = 0

        def __call__(self, *args, **kwargs):
            now[0] += cost(TimedStep.calls)
            TimedStep.calls += 1
            return super().__call__(*args, **kwargs)
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "RandomBatches", TimedBatches)
    monkeypatch.setattr(train, "TrainStep", TimedStep)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    ours = converge.minilm_curve(cfg, str(corpus), "numpy")
    assert [p["iter"] for p in ours] == [0, 2, 4, 5]
    # minilm's seconds go through tokens/s and back: equal to a few float64 roundings
    assert [p["train_seconds"] for p in ours] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("option, value, low", [("--rounds", "0", 1), ("--rounds", "-1", 1), ("--steps", "0", 1),
                                               ("--warmup", "-1", 0), ("--tokens", "0", 1), ("--threads", "0", 1)])
def test_bad_counts_are_clear_errors_before_anything_runs(option, value, low, capsys, monkeypatch):
    monkeypatch.setattr(bench_run, "run_job", lambda job: pytest.fail("a job ran"))
    assert cli.main(["bench", "--what", "all", option, value, "--no-torch", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert f"'{option}'" in err and f"integer >= {low}" in err and value in err


@pytest.mark.parametrize("argv, words", [(["--presets", "shakespeare-huge"], ["--presets", "'shakespeare-huge'"]),
                                         (["--backends", "jax"], ["--backends", "'jax'"]),
                                         (["--converge-preset", "nope"], ["--converge-preset", "'nope'"])])
def test_unknown_presets_and_backends_are_refused_by_the_parser(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice" in err and all(w in err for w in words)


def test_without_backends_a_numba_that_does_not_import_is_left_out_with_a_word(monkeypatch, broken_numba):
    """The default list had always held numba: on a machine whose numba does not import (beside a
    NumPy it does not support), every bench without --backends stopped with an error."""
    broken_numba(ImportError("Numba needs NumPy 2.3 or less. Got NumPy 2.4."))
    with pytest.warns(RuntimeWarning, match=r"the numba backend is left out: numba does not import \(Numba needs.*\); "
                                            r"install a NumPy it supports with `pip install 'numpy<2.4'`"):
        backends = bench_run._available_backends()
    assert backends[0] == "numpy" and "numba" not in backends
    monkeypatch.undo()
    assert bench_run._available_backends()[:2] == ["numpy", "numba"]


def test_asking_for_a_numba_that_does_not_import_names_the_option_given(broken_numba, capsys, monkeypatch):
    """The way round a numba that does not import had been `--backend numpy`, train's option."""
    monkeypatch.setattr(bench_run, "run_job", lambda job: pytest.fail("a job ran"))
    broken_numba(ImportError("Numba needs NumPy 2.3 or less. Got NumPy 2.4."))
    assert cli.main(["bench", "--what", "train", "--no-torch", "--backends", "numpy", "numba"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilm bench: error: option '--backends': backend 'numba' needs the numba package")
    assert "`pip install 'numpy<2.4'`, or leave numba out of --backends" in err and "--backend " not in err


def test_a_training_step_measurement_end_to_end(tmp_path, capsys):
    """One real measurement in a fresh worker process, written as JSON and as a table."""
    path = tmp_path / "bench.json"
    code = cli.main(["bench", "--what", "train", "--presets", "shakespeare-gru", "--backends", "numpy",
                     "--steps", "1", "--warmup", "1", "--rounds", "1", "--threads", "1", "--no-torch",
                     "--json", str(path)])
    assert code == 0
    results = json.loads(path.read_text())
    (row,) = results["train"]
    assert row["job"]["preset"] == "shakespeare-gru" and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
    (measured,) = row["rounds"]
    assert measured["steps"] == 1                          # the warmup step is run but not timed
    # one timed step: tokens/s x s/step is the B x T tokens of a step (to the rounding of a division)
    cfg = preset("shakespeare-gru")
    assert row["tokens_per_s"] * row["ms_per_step"] / 1000 == pytest.approx(cfg.batch_size * cfg.block_size, rel=1e-9)
    assert row["run_rss_mb"] == measured["peak_rss_mb"] - measured["baseline_rss_mb"] >= 0
    # in MiB: a Python process with NumPy and minilm imported holds tens of MiB, not a fraction of one
    assert 10 < measured["baseline_rss_mb"] <= measured["peak_rss_mb"] < 2 ** 20
    printed = capsys.readouterr().out
    assert "training step, shakespeare-gru" in printed and "+MB model+run" in printed
    assert "vs pytorch" not in printed                     # --no-torch: no peer, no empty column


def test_a_sampling_measurement_end_to_end(tmp_path, capsys):
    """Sampling with and without the key/value cache, each in a fresh worker process."""
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--what", "sample", "--backends", "numpy", "--tokens", "8", "--rounds", "1",
                     "--threads", "1", "--no-torch", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["sample"]
    assert [(r["job"]["backend"], r["job"]["cache"]) for r in rows] == [("numpy", True), ("numpy", False)]
    for row in rows:
        (measured,) = row["rounds"]
        assert measured["tokens"] == 8 and row["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "sampling 8 tokens, shakespeare-char-cpu GPT" in printed
    assert "numpy kv-cache" in printed and "numpy no cache" in printed and "ms/step" not in printed


def test_converge_with_a_negative_seed_is_a_clear_error(capsys):
    assert cli.main(["bench", "--what", "converge", "--seed", "-1", "--no-torch", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "-1" in err


# --- the GPU tables: options, table layout and MFU arithmetic (CPU-runnable; no timing asserted) -----

def _corpus(tmp_path):
    """A small text for the training runs (converge, replay) to read."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40,
                      encoding="utf-8")
    return corpus


def _bench_args(argv):
    import argparse
    p = argparse.ArgumentParser()
    bench_run.add_options(p)
    return p.parse_args(argv)


def test_gpu_tables_pair_each_dtype_with_a_cuda_peer_of_that_dtype(monkeypatch):
    """CPU backends get one float32 table against PyTorch on the CPU; the cupy backend gets one table
    per --dtypes entry against PyTorch on CUDA in the same dtype; --batch-size reaches every job."""
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: True)
    args = _bench_args(["--presets", "shakespeare-lstm", "--backends", "numba", "cupy",
                        "--dtypes", "float32", "bfloat16", "--batch-size", "256"])
    tables = bench_run.train_tables(args, args.backends, torch=True)
    assert [title for title, _ in tables] == ["training step, shakespeare-lstm (float32, batch 256)",
                                              "training step, shakespeare-lstm (float32 on the GPU, batch 256)",
                                              "training step, shakespeare-lstm (bfloat16 on the GPU, batch 256)"]
    (_, cpu), (_, gpu32), (_, gpu16) = tables
    assert [(j["impl"], j.get("backend"), j.get("device"), j.get("dtype")) for j in cpu] == \
        [("minilm", "numba", None, None), ("torch", None, None, None)]
    assert [(j["impl"], j.get("backend"), j.get("device"), j["dtype"]) for j in gpu16] == \
        [("minilm", "cupy", None, "bfloat16"), ("torch", None, "cuda", "bfloat16")]
    assert all(j["batch_size"] == 256 for _, jobs in tables for j in jobs)
    assert gpu32[1]["dtype"] == "float32"


def test_gpu_gpt_tables_time_the_cuda_graph_and_the_step_op_by_op(monkeypatch):
    """A GPT preset on the cupy backend gets two minilm rows, the captured step and the step op by
    op, in float32 and bfloat16; float16, whose loss scaling is never captured, gets one."""
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: True)
    args = _bench_args(["--presets", "shakespeare-char", "--backends", "cupy", "--dtypes", "float32", "float16"])
    (_, gpu32), (_, gpu16) = bench_run.train_tables(args, args.backends, torch=True)
    assert [bench_run._label({"job": j}) for j in gpu32] == ["cupy CUDA graph", "cupy op by op", "pytorch eager"]
    assert [bench_run._label({"job": j}) for j in gpu16] == ["cupy", "pytorch eager autocast"]


def test_cpu_tables_are_unchanged_by_the_gpu_options():
    """Without cupy among the backends, --dtypes changes nothing and no CUDA check is made."""
    args = _bench_args(["--presets", "shakespeare-char-cpu", "--backends", "numpy", "--dtypes", "bfloat16"])
    ((title, jobs),) = bench_run.train_tables(args, args.backends, torch=True)
    assert title == "training step, shakespeare-char-cpu (float32)"
    assert [j["impl"] for j in jobs] == ["minilm", "torch"]
    assert not any("dtype" in j or "device" in j or "batch_size" in j for j in jobs)


def test_gpu_table_without_a_cuda_pytorch_has_no_peer(monkeypatch):
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: False)
    args = _bench_args(["--presets", "shakespeare-char", "--backends", "cupy"])
    ((_, jobs),) = bench_run.train_tables(args, args.backends, torch=True)
    assert [j["impl"] for j in jobs] == ["minilm", "minilm"]           # the CUDA graph and op by op


@pytest.mark.parametrize("argv, words", [(["--dtypes", "float64"], ["--dtypes", "float64"]),
                                         (["--batch-size", "0"], ["'--batch-size'", ">= 1", "0"]),
                                         (["--peak-tflops", "-1"], ["'--peak-tflops'", "-1"]),
                                         (["--max-iters", "0"], ["'--max-iters'", ">= 1", "0"]),
                                         (["--target", "-1"], ["'--target'", "> 0", "-1"]),
                                         (["--json", "no/such/folder/out.json"], ["'--json'", "does not exist"]),
                                         (["--json", "."], ["'--json' '.' is a folder"])])
def test_bad_options_are_clear_errors(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(bench_run, "run_job", lambda job: pytest.fail("a job ran"))
    try:
        code = cli.main(["bench", "--what", "train", "--no-torch", "--backends", "numpy", *argv])
    except SystemExit as e:                     # argparse rejects a choice itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words)


# A GPT with V = 5, L = 1, C = 2, T = 3, counted by hand. Without biases: wte 5*2 = 10; the block's
# W_qkv 2*6 = 12, W_o 2*2 = 4, W_1 2*8 = 16, W_2 8*2 = 16 and two layernorm gammas 2 + 2; ln_f's
# gamma 2: N = 10 + 52 + 2 = 64 (wpe, 3*2, is left out as nanoGPT leaves it out).
# With biases, add the betas 2 + 2, b_qkv 6, b_o 2, b_1 8, b_2 2 and ln_f's beta 2: N = 88.
# FLOPs per token = 6 N + 12 L T C = 6 N + 72.
TINY = dict(model="gpt", vocab_size=5, n_layer=1, n_head=1, n_embd=2, block_size=3)
TINY_N = {False: 64, True: 88}


@pytest.mark.parametrize("bias", [False, True])
def test_gpt_flops_per_token_against_a_hand_count(bias):
    import dataclasses
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=1, n_embd=2, block_size=3, bias=bias)
    assert bench_run.gpt_flops_per_token(cfg, vocab_size=5) == 6 * TINY_N[bias] + 12 * 1 * 3 * 2


@pytest.mark.parametrize("bias", [False, True])
def test_the_hand_count_is_the_models_own_parameter_count(bias):
    """N of the FLOPs formula is what minilm's GPT and the PyTorch peer count (without wpe)."""
    from minilm.models import build_model
    cfg = {k: v for k, v in TINY.items() if k != "model"}
    model = build_model("gpt", {**cfg, "bias": bias})
    assert model.n_params(non_embedding=True) == TINY_N[bias]
    pytest.importorskip("torch")
    from minilm.bench import peers
    peer = peers.TorchGPT(5, 3, 1, 1, 2, bias=bias)
    assert sum(p.numel() for p in peer.parameters()) - peer.wpe.weight.numel() == TINY_N[bias]


def test_mfu_is_achieved_flops_over_the_dtype_peak():
    def row(**job):
        return {"job": {"what": "train", "preset": "shakespeare-char", **job}, "tokens_per_s": 1e6}

    flops = bench_run.gpt_flops_per_token(preset("shakespeare-char"), 65)
    gpu = bench_run.add_mfu(row(impl="minilm", backend="cupy", dtype="bfloat16"))
    assert gpu["flops_per_token"] == flops and gpu["peak_flops"] == 989.4e12
    assert gpu["mfu"] == pytest.approx(flops * 1e6 / 989.4e12)
    peer = bench_run.add_mfu(row(impl="torch", device="cuda"), peak_tflops=100)          # float32, overridden
    assert peer["mfu"] == pytest.approx(flops * 1e6 / 100e12)
    assert "mfu" not in bench_run.add_mfu(row(impl="minilm", backend="numba"))           # a CPU row
    assert "mfu" not in bench_run.add_mfu(row(impl="minilm", backend="cupy", preset="shakespeare-lstm"))


def test_a_gpu_table_with_memory_and_mfu_columns(monkeypatch, tmp_path, capsys):
    """The GPU table's layout and JSON, from stand-in measurements (no GPU here)."""
    def fake_run_job(job):
        gpu = {"gpu_pool_mb": 300.0} if job["impl"] == "minilm" else {"gpu_reserved_mb": 200.0}
        return {"job": job, "tokens_per_s": 5e5, "ms_per_step": 32.0, "peak_rss_mb": 900.0, "gpu": "H100", **gpu}

    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: True)
    monkeypatch.setattr(bench_run, "_torch_installed", lambda: True)
    monkeypatch.setattr(bench_run, "_check_backends", lambda backends: None)      # a GPU machine, stood in
    path = tmp_path / "gpu.json"
    assert cli.main(["bench", "--what", "train", "--presets", "shakespeare-char", "--backends", "cupy",
                     "--dtypes", "bfloat16", "--rounds", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 on the GPU" in out and "GPU MB" in out and "MFU" in out and "pytorch eager autocast" in out
    results = json.loads(path.read_text())
    assert results["machine"]["gpu"] == "H100"
    graph_row, op_row, torch_row = results["train"]                  # the CUDA graph, op by op, the peer
    assert "cupy CUDA graph" in out and "cupy op by op" in out
    for minilm_row in (graph_row, op_row):
        assert minilm_row["gpu_mb"] == 300.0 and torch_row["gpu_mb"] == 200.0
        assert minilm_row["mfu"] == torch_row["mfu"] > 0 and minilm_row["vs_torch"]["median"] == 1.0


# --- the PyTorch peer's mixed precision and dropout (on the CPU here; the worker runs them on CUDA) --


def test_peer_train_step_under_autocast_and_a_grad_scaler():
    torch = pytest.importorskip("torch")
    from minilm.bench import peers
    cfg = preset("shakespeare-char-cpu")
    x = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(0))   # whatever ran before
    for amp_dtype, scaler in ((None, None), (torch.bfloat16, None), (torch.bfloat16, torch.amp.GradScaler("cpu"))):
        torch.manual_seed(0)
        model = peers.TorchGPT(65, 8, 1, 2, 16)
        optimizer = peers.make_optimizer(model, cfg)
        before = model.wte.weight.detach().clone()
        loss = peers.train_step(model, optimizer, x, x, 1e-3, 1.0, amp_dtype=amp_dtype, scaler=scaler)
        assert 3.0 < loss < 5.5                                    # about ln 65 = 4.17 at initialisation
        assert not torch.equal(model.wte.weight, before)           # the step updated the weights
        assert model.wte.weight.dtype == torch.float32             # float32 master weights


def test_peer_gpt_has_dropout_where_minilm_has_it():
    torch = pytest.importorskip("torch")
    from minilm.bench import peers
    x = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(0))   # whatever ran before
    torch.manual_seed(0)
    model = peers.TorchGPT(65, 8, 1, 2, 16, dropout=0.5)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])                   # evaluation: no dropout
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])               # training: fresh masks


def test_torch_worker_refuses_16_bit_on_the_cpu():
    pytest.importorskip("torch")
    from minilm.bench import worker
    job = {"impl": "torch", "what": "train", "preset": "shakespeare-gru", "steps": 1, "warmup": 0, "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="only on cuda"):
        worker.torch_train(job, preset("shakespeare-gru"), 65)


def test_a_failed_table_does_not_lose_the_others(monkeypatch, tmp_path, capsys):
    """A table whose measurement fails is reported; the other tables are still measured and written,
    and the command ends with an error."""
    def fake_run_job(job):
        if job.get("dtype") == "float16":
            raise RuntimeError("minilm bench: the measurement failed: CUDA error")
        return {"job": job, "tokens_per_s": 1e5, "ms_per_step": 10.0, "peak_rss_mb": 1.0, "gpu_pool_mb": 1.0}

    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    monkeypatch.setattr(bench_run, "_check_backends", lambda backends: None)      # a GPU machine, stood in
    path = tmp_path / "gpu.json"
    assert cli.main(["bench", "--what", "train", "--presets", "shakespeare-gru", "--backends", "cupy", "--no-torch",
                     "--dtypes", "float16", "bfloat16", "--rounds", "1", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    assert "float16 on the GPU): failed" in captured.out and "CUDA error" in captured.out
    assert "1 table(s) failed" in captured.err
    results = json.loads(path.read_text())
    assert [r["job"]["dtype"] for r in results["train"]] == ["bfloat16"]
    assert results["failed"][0]["table"] == "training step, shakespeare-gru (float16 on the GPU)"


def test_replay_without_pytorch_is_a_clear_error(capsys):
    assert cli.main(["bench", "--what", "replay", "--no-torch", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "--what replay" in err and "PyTorch" in err


# float32 on both sides, 20 steps: each op differs by rounding (~1e-7 relative) and the steps
# carry it forward; the measured gap in the validation loss is at most 1.6e-7 (two float32 ulps
# of the loss), and 1e-4 leaves a margin of 500. (tests/test_torch_parity.py holds the models and
# the recipe to PyTorch in float64, far more tightly; this checks the benchmark's own loop.)
REPLAY_TOL = 1e-4


@pytest.mark.parametrize("preset_name", ["shakespeare-char-cpu", "shakespeare-lstm"])
def test_replay_trains_minilm_from_the_peers_weights_to_the_peers_curve(preset_name, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import converge
    corpus = _corpus(tmp_path)
    short = dataclasses.replace(preset(preset_name), max_iters=20, eval_interval=10, eval_iters=3, block_size=16,
                                batch_size=4, warmup_iters=5, lr_decay_iters=20)
    monkeypatch.setattr(converge.config, "preset", lambda name: short)
    lines = []
    result = converge.replay(preset_name, str(corpus), backend="numpy", threads=1, out=lines.append)
    ours, peer = result["minilm"], result["pytorch"]
    assert [p["iter"] for p in ours] == [p["iter"] for p in peer] == [0, 10, 20]
    assert peer[-1]["val_loss"] < peer[0]["val_loss"] - 0.1            # it trained
    for a, b in zip(ours, peer):
        assert abs(a["val_loss"] - b["val_loss"]) <= REPLAY_TOL, (a, b)
    assert any("from the PyTorch peer's initial weights" in line for line in lines)
    # each evaluation is said as it is made, the peer's first: minutes of silence otherwise
    # with the training seconds so far, which the table at the end gives only at the target and the end
    said = "  %s: iter %d: val loss %.4f, %.1f s of training"
    assert lines.index(said % ("pytorch", 20, peer[-1]["val_loss"], peer[-1]["train_seconds"])) < lines.index(
        said % ("numpy", 0, ours[0]["val_loss"], 0.0))


def test_converge_past_the_presets_iterations_keeps_its_schedule(tmp_path, monkeypatch):
    """--max-iters beyond the preset's trains on at the schedule's floor, so that a target the
    preset's run does not reach still gets a time on both sides."""
    import dataclasses
    from minilm.bench import converge
    from minilm.train import make_schedule
    cfg = converge._config("shakespeare-char-cpu", None, 3000)
    assert (cfg.max_iters, cfg.lr_decay_iters) == (3000, 2000)
    assert make_schedule(cfg)(2500) == cfg.min_lr
    corpus = _corpus(tmp_path)
    short = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=20, eval_interval=10, eval_iters=2,
                                block_size=16, batch_size=4, warmup_iters=5, lr_decay_iters=0)
    monkeypatch.setattr(converge.config, "preset", lambda name: short)
    lines = []
    (result,) = converge.run("shakespeare-char-cpu", str(corpus), backends=["numpy"], threads=1, target=0.0,
                             torch_peer=False, max_iters=30, out=lines.append)
    assert [p["iter"] for p in result["curve"]] == [0, 10, 20, 30] and result["seconds_to_target"] is None
    assert [line.split(":")[1] for line in lines if line.startswith("  numpy: iter")] == [" iter 0", " iter 10",
                                                                                          " iter 20", " iter 30"]
    assert converge._config("shakespeare-char-cpu", None, 30).lr_decay_iters == 20   # 0 meant the preset's 20


def test_nanogpt_without_pytorch_or_with_a_negative_seed_is_a_clear_error(capsys):
    for what in ("nanogpt", "replay"):                      # both are PyTorch's runs
        assert cli.main(["bench", "--what", what, "--no-torch", "--backends", "numpy"]) == 2
        assert f"--what {what}" in capsys.readouterr().err
    pytest.importorskip("torch")
    assert cli.main(["bench", "--what", "nanogpt", "--seed", "-3", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "'--seed'" in err and "-3" in err


def test_nanogpts_loop_trains_and_scores_the_whole_split(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import nanogpt
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 40,
                      encoding="utf-8")
    short = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=20, eval_interval=10, block_size=16,
                                batch_size=4, warmup_iters=5, lr_decay_iters=20)
    monkeypatch.setattr(nanogpt, "preset", lambda name: short)
    lines = []
    result = nanogpt.run(seed=5, data=str(corpus), threads=1, out=lines.append)
    assert [p["iter"] for p in result["curve"]] == [0, 10, 20]
    assert result["curve"][-1]["val"] < result["curve"][0]["val"] - 0.1            # it trained
    # two estimates of one loss: 20 batches x 4 x 16 = 1,280 targets of a per-target loss with a
    # spread of ~1 give a standard error of ~0.03 (measured gap 0.009 on this seed); 0.1 is 3 of them
    WHOLE_VS_SAMPLED_TOL = 0.1
    assert abs(result["val_loss_whole_split"] - result["val_loss_20_batches"]) < WHOLE_VS_SAMPLED_TOL
    again = nanogpt.run(seed=5, data=str(corpus), threads=1, out=lines.append)
    assert again["curve"] == result["curve"]                                        # the seed fixes everything
    assert any("nanoGPT's loop" in line for line in lines)
    assert "  nanoGPT's loop: iter 10: train loss %.4f, val loss %.4f" % (result["curve"][1]["train"],
                                                                        result["curve"][1]["val"]) in lines
    shorter = nanogpt.run(seed=5, data=str(corpus), threads=1, out=lines.append, max_iters=5)   # --max-iters
    assert [p["iter"] for p in shorter["curve"]] == [0, 5]


def test_bench_nanogpt_trains_minilm_only_on_the_backends_given(monkeypatch, capsys):
    pytest.importorskip("torch")
    from minilm.bench import nanogpt
    seen = []
    monkeypatch.setattr(nanogpt, "run", lambda *args, **kwargs: seen.append(kwargs["backends"]) or {})
    assert cli.main(["bench", "--what", "nanogpt", "--backends", "numpy", "numba"]) == 0
    assert cli.main(["bench", "--what", "nanogpt"]) == 0
    assert [list(b) for b in seen] == [["numpy", "numba"], []]          # by default the peer alone, as before
    capsys.readouterr()


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_minilm_on_nanogpts_draws_follows_nanogpts_curve(tmp_path, monkeypatch, backend_name):
    """With --backends, minilm trains from nanoGPT's initial weights on the batches nanoGPT's loop
    drew, in its order, and is estimated on the same 20 batches: with the same (tanh) GELU, its
    curve is the peer's to float32 rounding."""
    pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import nanogpt
    short = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=20, eval_interval=10, block_size=16,
                                batch_size=4, n_layer=2, n_head=2, n_embd=16, warmup_iters=5, lr_decay_iters=20)
    monkeypatch.setattr(nanogpt, "preset", lambda name: short)
    lines = []
    result = nanogpt.run(seed=5, data=str(_corpus(tmp_path)), gelu="tanh", threads=1, out=lines.append,
                         backends=(backend_name,))
    [ours] = result["minilm"]
    assert ours["backend"] == backend_name
    assert [p["iter"] for p in ours["curve"]] == [p["iter"] for p in result["curve"]] == [0, 10, 20]
    # float32 on both sides, summed in different orders, over 20 Adam steps: measured differences
    # of at most 1.5e-7 here on either backend; a training batch swapped with an estimate's moved
    # the losses by 7e-4, and the learning rate a step late by 6e-3
    FLOAT32_TRAINING_TOL = 1e-5
    for mine, theirs in zip(ours["curve"], result["curve"]):
        assert mine["train"] == pytest.approx(theirs["train"], abs=FLOAT32_TRAINING_TOL)
        assert mine["val"] == pytest.approx(theirs["val"], abs=FLOAT32_TRAINING_TOL)
    assert ours["val_loss_whole_split"] == pytest.approx(result["val_loss_whole_split"], abs=FLOAT32_TRAINING_TOL)
    assert result["curve"][-1]["val"] < result["curve"][0]["val"] - 0.1            # it trained
    assert any(line.startswith(f"\nminilm ({backend_name}, tanh GELU) from nanoGPT's initial weights") for line in lines)
    plain = nanogpt.run(seed=5, data=str(_corpus(tmp_path)), gelu="tanh", threads=1, out=lines.append)
    assert plain["minilm"] == [] and plain["curve"] == result["curve"]             # recording changes no draw


def test_nanogpts_loop_refuses_a_recurrent_preset_before_training():
    pytest.importorskip("torch")
    from minilm.bench import nanogpt
    with pytest.raises(ValueError, match="nanoGPT's loop trains a GPT, and preset 'shakespeare-lstm' is a model of "
                                         "lstm layers"):
        nanogpt.run(data="no-such-file.txt", preset_name="shakespeare-lstm", backends=("numpy",))


def test_threads_limit_minilm_in_the_bench_process_as_the_peer_is_limited():
    """``--threads`` reaches the benchmarks that run minilm in the bench process (ops, converge,
    replay) as it reaches the worker processes and the PyTorch peer, and is undone afterwards."""
    import numba
    from threadpoolctl import threadpool_info

    import minilm
    from minilm import backend
    from minilm.bench.threads import limited
    from minilm.models import GPT, GPTConfig
    from minilm.parallel import BatchParallel, batch_runner

    def blas():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    minilm.use("numba")
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    numba_before, blas_before = numba.get_num_threads(), blas()
    with limited(1):
        assert backend.current() == "numba" and numba.get_num_threads() == 1 and set(blas()) == {1}
        assert batch_runner(model) is model                 # one thread: no slices side by side
    assert (backend.current(), numba.get_num_threads(), blas()) == ("numba", numba_before, blas_before)
    if numba_before > 1:
        assert isinstance(batch_runner(model), BatchParallel)


def test_the_per_op_table_times_every_op_on_every_backend():
    from minilm.bench import ops as op_bench
    lines = []
    rows = op_bench.run(["numpy", "numba"], threads=1, repeats=1, out=lines.append)
    names = list(op_bench._cases(np.random.default_rng(0)))
    assert {"layernorm", "attention", "self_attention", "cross_entropy", "lstm", "gru"} <= set(names)
    assert [(r["backend"], r["op"]) for r in rows] == [(b, n) for b in ("numpy", "numba") for n in names]
    assert all(r["ms"] > 0 for r in rows)
    assert "per-op forward + backward, ms (median of 1;" in lines[0]
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert lines[1].split() == ["op", "numpy", "numba"] and list(table) == names
    for r in rows:                                       # each row printed in its backend's column
        assert table[r["op"]][("numpy", "numba").index(r["backend"])] == pytest.approx(r["ms"], abs=5e-4)   # .3f


def test_an_option_the_chosen_run_does_not_use_is_said_to_be_ignored():
    """--max-iters with --what train, --target with nanogpt: dropped without a word, a user who
    shortened a run that way waited for the whole of it."""
    assert bench_run.ignored_options(_bench_args(["--what", "train", "--max-iters", "20", "--target", "1.5"])) == [
        "option '--target' is ignored: it is used only by --what converge",
        "option '--max-iters' is ignored: it is used only by --what converge or replay or nanogpt"]
    assert bench_run.ignored_options(_bench_args(["--what", "nanogpt", "--max-iters", "20", "--seed", "3",
                                                  "--backends", "numba"])) == []     # minilm on nanoGPT's draws
    assert bench_run.ignored_options(_bench_args(["--what", "converge", "--presets", "shakespeare-lstm"])) == [
        "option '--presets' is ignored: it is used only by --what train or all"]


def test_a_failed_measurement_names_its_job_and_passes_on_the_workers_error():
    """run_job's one error: a worker that exits non-zero (here, a preset it does not know)."""
    job = {"impl": "minilm", "what": "train", "backend": "numpy", "preset": "no-such-preset", "threads": 1,
           "steps": 1, "warmup": 0}
    with pytest.raises(RuntimeError, match=r"(?s)^minilm bench: the measurement \{.*'preset': 'no-such-preset'.*\} "
                                           r"failed:\n.*option '--preset' must be one of .*, got 'no-such-preset'"):
        bench_run.run_job(job)


@pytest.mark.parametrize("rounds", [0, 1.5, None])
def test_rounds_takes_only_a_positive_integer(rounds, monkeypatch):
    monkeypatch.setattr(bench_run, "run_job", lambda job: pytest.fail("a job ran"))
    with pytest.raises(ValueError, match=rf"^minilm bench: option '--rounds' must be an integer >= 1, got {rounds!r}$"):
        bench_run._rounds([{"impl": "torch"}], rounds)


def test_every_bench_option_is_for_every_run_or_says_which():
    """An option left out of the table is never said to be ignored: --steps with converge trained
    the preset's 2000 iterations without a word."""
    options = set(vars(_bench_args([])))
    assert options == set(bench_run._USED_BY) | set(bench_run.EVERY_RUN)
    assert bench_run.ignored_options(_bench_args(["--what", "converge", "--steps", "100", "--rounds", "2"])) == [
        "option '--steps' is ignored: it is used only by --what train or all",
        "option '--rounds' is ignored: it is used only by --what train or sample or all"]


def test_the_per_op_table_waits_for_the_device_before_each_clock_read(monkeypatch):
    """On cupy an op returns once its kernels are queued: the clock is read only after a device
    synchronisation, else the cupy column times the launches (stand-in backend, no GPU)."""
    import contextlib
    import types
    import minilm
    from minilm import backend
    from minilm.bench import ops as op_bench
    pending, reads = [False], []

    def queued(*args, **kwargs):                          # an op that only queues device work
        pending[0] = True
        return np.zeros(1), None

    def clock():
        reads.append(pending[0])
        return float(len(reads))

    monkeypatch.setattr(minilm, "use", lambda name: None)
    monkeypatch.setattr(backend, "xp", lambda: np)
    monkeypatch.setattr(backend, "op", lambda name: queued)
    monkeypatch.setattr(op_bench, "limited", lambda threads: contextlib.nullcontext())
    monkeypatch.setattr(op_bench, "_cupy_sync", lambda: lambda: pending.__setitem__(0, False), raising=False)
    monkeypatch.setattr(op_bench, "time", types.SimpleNamespace(perf_counter=clock))
    rows = op_bench.run(["cupy"], threads=1, repeats=3, out=lambda line: None)
    assert len(rows) == len(op_bench._cases(np.random.default_rng(0)))
    assert len(reads) == 2 * 3 * len(rows) and not any(reads)     # every read after the device's work


def test_the_peers_batch_copy_to_the_device_is_inside_its_timer(monkeypatch):
    """minilm's step copies its batch to the device inside the timer; the peer's copy (``.to``) is
    timed too (on the CPU here, where it returns the tensor itself; stand-in clock and step)."""
    torch = pytest.importorskip("torch")
    import dataclasses
    import types
    from minilm.bench import peers, worker
    events, to = [], torch.Tensor.to

    def copy(self, *args, **kwargs):
        events.append("copy")
        return to(self, *args, **kwargs)

    def step(*args, **kwargs):
        events.append("step")
        return 1.0
    monkeypatch.setattr(torch.Tensor, "to", copy)
    monkeypatch.setattr(peers, "train_step", step)
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or len(events))   # stand-in
    monkeypatch.setattr(worker, "time", clock)
    cfg = dataclasses.replace(preset("shakespeare-gru"), n_layer=1, n_embd=4, hidden_size=4, batch_size=2,
                              block_size=3)
    worker.torch_train({"impl": "torch", "what": "train", "steps": 2, "warmup": 1}, cfg, 7)
    steps = events[events.index("clock"):]                 # (the model's own .to(device) comes before)
    warmup, timed = ["clock", "copy", "copy", "step"], ["clock", "copy", "copy", "step", "clock"]
    assert steps == warmup + timed * 2                     # the warm-up step's end is not read


def test_sampling_warms_up_with_the_timed_run_itself_on_both_sides(monkeypatch, numpy_backend):
    """The warm-up takes every path the timed run takes: at block 16, 20 tokens shift the context at
    token 16, a prefill of 8 tokens (``forward_step`` with T = 8) whose first call costs extra; the
    peer warms up the same way (stand-in clock)."""
    import dataclasses
    import types
    import minilm.models
    from minilm.bench import worker
    events = []
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or len(events))   # stand-in
    monkeypatch.setattr(worker, "time", clock)
    build = minilm.models.build_model

    def build_recording(*args, **kwargs):
        model = build(*args, **kwargs)
        forward_step = model.forward_step

        def recorded(x, state):
            events.append(np.shape(x)[1])                          # T of each call
            return forward_step(x, state)
        model.forward_step = recorded
        return model
    monkeypatch.setattr(minilm.models, "build_model", build_recording)
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=2, n_embd=16, block_size=16)
    worker.minilm_sample({"backend": "numpy", "cache": True, "tokens": 20}, cfg, 11)
    start, end = events.index("clock"), len(events) - 1
    warmup, timed = events[:start], events[start + 1:end]
    assert events[end] == "clock" and 16 // 2 in timed             # the context shift's prefill, timed
    assert warmup == timed                                         # ... and run once before
    pytest.importorskip("torch")
    from minilm.bench import peers
    generate, events[:] = peers.TorchGPT.generate, []
    monkeypatch.setattr(peers.TorchGPT, "generate", lambda self, idx, n: events.append(n) or generate(self, idx, n))
    result = worker.torch_sample({"tokens": 20}, cfg, 11)
    assert events == [20, "clock", 20, "clock"] and result["tokens"] == 20


def test_the_memory_a_run_adds_counts_from_before_the_model_on_both_sides(monkeypatch, numpy_backend):
    """PyTorch allocates its gradients and AdamW's moments at its first step, minilm with the model
    and optimizer: each side reads the baseline of the +MB column before it builds its model, so that
    the column holds them on both sides, in training and in sampling. The peer makes a scratch
    optimizer first, whose imports (~70 MB of library) then fall in the baseline."""
    import dataclasses
    import importlib.util
    import minilm.models
    import minilm.train
    from minilm.bench import worker
    events = []

    def recording(name, fn):
        return lambda *a, **k: events.append(name) or fn(*a, **k)
    monkeypatch.setattr(worker, "_rss_mb", lambda: events.append("baseline") or 1.0)
    monkeypatch.setattr(minilm.models, "build_model", recording("model", minilm.models.build_model))
    monkeypatch.setattr(minilm.train, "make_optimizer", recording("optimizer", minilm.train.make_optimizer))
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=2, n_embd=16, block_size=8,
                              batch_size=2)
    runs = [(lambda: worker.minilm_train({"backend": "numpy", "steps": 1, "warmup": 1}, cfg, 11),
             ["baseline", "model", "optimizer"]),
            (lambda: worker.minilm_sample({"backend": "numpy", "cache": True, "tokens": 2}, cfg, 11),
             ["baseline", "model"])]
    if importlib.util.find_spec("torch") is not None:
        from minilm.bench import peers
        monkeypatch.setattr(peers, "make_model", recording("model", peers.make_model))
        monkeypatch.setattr(peers, "make_optimizer", recording("optimizer", peers.make_optimizer))
        runs += [(lambda: worker.torch_train({"steps": 1, "warmup": 1}, cfg, 11),
                  ["optimizer", "baseline", "model", "optimizer"]),              # the scratch one first
                 (lambda: worker.torch_sample({"tokens": 2}, cfg, 11), ["baseline", "model"])]
    for run, expected in runs:
        events.clear()
        assert run()["baseline_rss_mb"] == 1.0 and events == expected


def test_a_cuda_sampling_peer_puts_its_model_and_prompt_on_the_device_and_waits_for_it(monkeypatch):
    """The peer of the cupy sampling rows: model and prompt on CUDA, the device synchronised before
    each clock read (stand-ins for the model, the device and the clock: no GPU here)."""
    torch = pytest.importorskip("torch")
    import types
    from minilm.bench import peers, worker
    events = []

    class Model:
        def to(self, device):
            events.append(("model", device))
            return self

        def eval(self):
            return self

        def generate(self, idx, n):
            events.append("generate")
            return torch.zeros((1, n + 1), dtype=torch.long)
    ones = torch.ones
    monkeypatch.setattr(peers, "make_model", lambda cfg, V: Model())
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **k: events.append(("prompt", device)) or ones(*a, **k))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "H100")
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or len(events))   # stand-in
    monkeypatch.setattr(worker, "time", clock)
    monkeypatch.setattr(worker, "_start_cuda", lambda torch=None: events.append("context"))
    monkeypatch.setattr(worker, "_rss_mb", lambda: events.append("baseline") or 0.0)
    result = worker.torch_sample({"tokens": 5, "device": "cuda"}, preset("shakespeare-char-cpu"), 11)
    # the CUDA context before the memory baseline: its host memory is the libraries', not the model's
    assert events == ["context", "baseline", ("model", "cuda"), ("prompt", "cuda"), "generate", "sync", "clock",
                      "generate", "sync", "clock"]
    assert result["tokens"] == 5 and result["gpu"] == "H100"


def _captured_jobs(monkeypatch):
    """run_job replaced by a stand-in that records each job and answers at once."""
    jobs = []

    def fake_run_job(job):
        jobs.append(job)
        return {"job": job, "tokens_per_s": 100.0, "peak_rss_mb": 1.0, "baseline_rss_mb": 0.5}
    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    monkeypatch.setattr(bench_run, "_torch_installed", lambda: True)
    monkeypatch.setattr(bench_run, "_check_backends", lambda backends: None, raising=False)   # a GPU machine
    return jobs


@pytest.mark.parametrize("cuda_torch", [True, False])
def test_sampling_compares_each_backend_with_a_peer_on_its_own_device(cuda_torch, monkeypatch, capsys):
    """The cupy rows get their own table against PyTorch on CUDA (none without a CUDA PyTorch), the
    CPU rows theirs against PyTorch on the CPU."""
    jobs = _captured_jobs(monkeypatch)
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: cuda_torch)
    results = bench_run.benchmark(_bench_args(["--what", "sample", "--backends", "numba", "cupy", "--rounds", "1",
                                               "--tokens", "5"]), out=print)
    rows = {(r["job"]["impl"], r["job"].get("backend"), r["job"].get("device")) for r in results["sample"]}
    peers = {("torch", None, None)} | ({("torch", None, "cuda")} if cuda_torch else set())
    assert rows == {("minilm", b, None) for b in ("numba", "cupy")} | peers and len(jobs) == 4 + len(peers)
    out = capsys.readouterr().out
    cpu, gpu = out.split("sampling 5 tokens, shakespeare-char-cpu GPT on the GPU")
    assert "numba kv-cache" in cpu and "pytorch (generate, no cache)" in cpu and "cupy" not in cpu
    assert "cupy kv-cache" in gpu and "numba" not in gpu and "pytorch (generate" not in gpu
    assert ("pytorch eager (generate, no cache)" in gpu) == cuda_torch and ("vs pytorch" in gpu) == cuda_torch


def test_a_row_gives_one_rounds_numbers_also_for_an_even_count_of_rounds(monkeypatch):
    """With 2 rounds the medians of ms/step and of tokens/s taken apart are each the mean of two and
    disagree (numba at 30 and 60 ms: 45 ms but 19,200 tokens/s, not B·T / 45 ms = 17,067). A row
    gives its median round's: for an even count the slower middle one."""
    tokens = 12 * 64
    ms = {"numba": [30.0, 60.0], "torch": [40.0, 45.0]}
    seen = {name: 0 for name in ms}

    def fake_run_job(job):
        name = job.get("backend", "torch")
        step = ms[name][seen[name]]
        seen[name] += 1
        return {"job": job, "ms_per_step": step, "tokens_per_s": tokens * 1000 / step, "peak_rss_mb": 1.0}
    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    jobs = [{"impl": "minilm", "what": "train", "backend": "numba"}, {"impl": "torch", "what": "train"}]
    rows = bench_run._rounds(jobs, 2)
    for row in rows:
        assert row["tokens_per_s"] * row["ms_per_step"] / 1000 == pytest.approx(tokens, rel=1e-12)   # rounding
    assert [row["ms_per_step"] for row in rows] == [60.0, 45.0]                   # the slower middle rounds
    assert rows[0]["vs_torch"] == {"median": pytest.approx((40 / 30 + 45 / 60) / 2), "min": 0.75, "max": 40 / 30}
    lines = []
    bench_run._print_rows(lines.append, "training step", rows, "ms_per_step")
    assert lines[0].endswith("the median round of 2 (of an even count, the slower middle one), "
                             "memory: the largest of the rounds")


def test_a_json_path_that_cannot_be_written_is_refused_before_anything_runs(monkeypatch, tmp_path, capsys):
    """A folder that exists but cannot be written (here a stand-in ``open`` that refuses the path:
    the tests may run as root, which any folder lets write)."""
    path = str(tmp_path / "out.json")

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return open(file, *args, **kwargs)
    monkeypatch.setattr(bench_run, "open", refusing_open, raising=False)
    monkeypatch.setattr(bench_run, "run_job", lambda job: pytest.fail("a job ran"))
    assert cli.main(["bench", "--what", "train", "--no-torch", "--backends", "numpy", "--json", path]) == 2
    err = capsys.readouterr().err
    assert f"'--json' {path!r} cannot be written (Permission denied" in err
    monkeypatch.undo()
    bench_run._check_writable(path)                          # a path that can be written: not left behind
    assert os.listdir(tmp_path) == []


def test_gpu_options_without_a_gpu_backend_are_said_to_be_ignored():
    """--dtypes float16 on CPU backends trained in float32 without a word."""
    for option in (["--dtypes", "float16"], ["--peak-tflops", "100"]):
        assert bench_run.ignored_options(_bench_args(["--what", "train", "--backends", "numpy", *option])) == [
            f"option '{option[0]}' is ignored: it applies to the GPU (cupy) backend's tables, and none is "
            f"measured (CPU backends train in float32)"]
        assert bench_run.ignored_options(_bench_args(["--what", "all", "--backends", "numpy", "cupy", *option])) == []


def test_a_backend_that_cannot_run_here_is_refused_before_any_measurement(monkeypatch, capsys):
    """--backends cupy without CuPy: one clear error up front, not a worker's traceback in the table."""
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)           # import cupy fails, as where it is not installed
    monkeypatch.setattr(bench_run, "run_job", lambda job: pytest.fail("a job ran"))
    assert cli.main(["bench", "--what", "train", "--no-torch", "--backends", "numpy", "cupy"]) == 2
    captured = capsys.readouterr()
    assert "option '--backends': backend 'cupy' needs the cupy package" in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_the_json_records_when_with_what_and_by_which_command(monkeypatch, tmp_path):
    """UTC time, the checkout's commit, the libraries' versions and the command, quoted as a shell
    would need it."""
    import datetime
    import importlib.util
    import shlex
    import subprocess
    import sys
    import numba
    import minilm
    _captured_jobs(monkeypatch)
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: False)
    path = tmp_path / "a b.json"
    argv = ["bench", "--what", "sample", "--backends", "numpy", "--rounds", "1", "--json", str(path)]
    monkeypatch.setattr(sys, "argv", ["minilm", *argv])
    assert cli.main(argv) == 0
    results = json.loads(path.read_text())
    assert results["command"] == "minilm " + shlex.join(argv) and shlex.split(results["command"])[1:] == argv
    when = datetime.datetime.fromisoformat(results["time_utc"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(hours=1)
    versions = results["versions"]
    assert versions["numpy"] == np.__version__ and versions["numba"] == numba.__version__ and "cupy" not in versions
    if importlib.util.find_spec("threadpoolctl") is not None:
        assert any(lib["internal_api"] for lib in versions["blas"])
    if importlib.util.find_spec("torch") is not None:            # the peer ran (a stand-in here)
        assert versions["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(minilm.__file__)))
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    if os.path.exists(os.path.join(root, ".git")) and head.returncode == 0:
        assert results["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    else:
        assert results["git_commit"] is None


def test_the_ops_table_through_the_command(tmp_path, capsys):
    """`minilm bench --what ops`: each op of the issue's list timed on the backend asked for, in the
    table and in the JSON."""
    path = tmp_path / "ops.json"
    assert cli.main(["bench", "--what", "ops", "--backends", "numpy", "--threads", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["ops"]
    out = capsys.readouterr().out
    names = {"layernorm", "softmax", "attention", "gelu", "cross_entropy", "embedding", "dropout", "lstm", "gru"}
    assert names <= {r["op"] for r in rows} and {r["backend"] for r in rows} == {"numpy"}
    assert all(r["ms"] > 0 for r in rows) and all(name in out for name in names)


def test_converge_runs_the_pytorch_peer_on_the_same_recipe(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import converge
    corpus = _corpus(tmp_path)
    short = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=4, eval_interval=2, eval_iters=2,
                                block_size=16, batch_size=4, warmup_iters=1, lr_decay_iters=0, n_layer=1,
                                n_embd=16, n_head=2)
    monkeypatch.setattr(converge.config, "preset", lambda name: short)
    results = converge.run("shakespeare-char-cpu", str(corpus), backends=["numpy"], threads=1, target=0.0,
                           torch_peer=True, out=lambda line: None)
    assert [r["impl"] for r in results] == ["numpy", "pytorch"]
    for r in results:
        assert [p["iter"] for p in r["curve"]] == [0, 2, 4] and np.isfinite(r["curve"][-1]["val_loss"])
        assert r["curve"][-1]["val_loss"] < r["curve"][0]["val_loss"]         # both learn


def test_both_sides_of_a_training_measurement_step_as_their_trainers_do(monkeypatch, numpy_backend):
    """minilm's step runs as minilm train runs it (the batch through ``batch_runner``: on numba, in
    slices over the cores) with the preset's gradient clipping; the peer's in float32 with the same
    clipping. A side that skipped its clipping, or a peer in float64, is timed on other work. Both
    count a step's B x T tokens in tokens/s."""
    import dataclasses
    import minilm.parallel
    import minilm.train
    from minilm.bench import worker
    seen = {}
    batch_runner, TrainStep = minilm.parallel.batch_runner, minilm.train.TrainStep

    def runner_recording(model):
        seen["runner"] = batch_runner(model)
        return seen["runner"]

    def step_recording(model, runner, *args, **kwargs):
        seen["step"] = (runner, kwargs["grad_clip"])
        return TrainStep(model, runner, *args, **kwargs)
    monkeypatch.setattr(minilm.parallel, "batch_runner", runner_recording)
    monkeypatch.setattr(minilm.train, "TrainStep", step_recording)
    cfg = dataclasses.replace(preset("shakespeare-gru"), n_layer=1, n_embd=4, hidden_size=4, batch_size=2,
                              block_size=3, grad_clip=0.5)
    ours = worker.minilm_train({"backend": "numpy", "steps": 1, "warmup": 0}, cfg, 7)
    assert seen["step"] == (seen["runner"], 0.5)
    torch = pytest.importorskip("torch")
    from minilm.bench import peers

    def peer_step(model, optimizer, x, y, lr, grad_clip, **kwargs):
        seen["peer"] = (grad_clip, {p.dtype for p in model.parameters()})
        return 1.0
    monkeypatch.setattr(peers, "train_step", peer_step)
    peer = worker.torch_train({"steps": 1, "warmup": 0}, cfg, 7)
    assert seen["peer"] == (0.5, {torch.float32})
    for result in (ours, peer):               # one timed step: tokens/s x s/step, to a division's rounding
        assert result["tokens_per_s"] * result["ms_per_step"] / 1000 == pytest.approx(2 * 3, rel=1e-9)


@pytest.mark.parametrize("cache", [True, False])
def test_a_sampling_measurement_uses_the_cache_as_its_job_says(cache, monkeypatch, numpy_backend):
    """The 'no cache' row re-runs the whole context every token; a worker that sampled with the
    cache anyway would print two kv-cache speeds under two labels."""
    import dataclasses
    import minilm.sample
    from minilm.bench import worker
    used, generate = [], minilm.sample.generate

    def recording(*args, use_cache, **kwargs):
        used.append(use_cache)
        return generate(*args, use_cache=use_cache, **kwargs)
    monkeypatch.setattr(minilm.sample, "generate", recording)
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=2, n_embd=16, block_size=16)
    worker.minilm_sample({"backend": "numpy", "cache": cache, "tokens": 3}, cfg, 11)
    assert used == [cache, cache]                             # the warm-up and the timed run


def test_a_worker_gives_pytorch_its_threads_and_the_job_its_batch_size(monkeypatch, capsys):
    """The peer computes with --threads threads (PyTorch's own default is the machine's cores), and
    --batch-size reaches the model the worker builds, not only the job's description."""
    torch = pytest.importorskip("torch")
    from minilm.bench import worker
    seen = {}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.update(threads=n))
    monkeypatch.setattr(worker, "torch_train", lambda job, cfg, V: seen.update(batch_size=cfg.batch_size) or {})
    worker.main([json.dumps({"impl": "torch", "what": "train", "preset": "shakespeare-gru", "threads": 3,
                             "batch_size": 7})])
    assert seen == {"threads": 3, "batch_size": 7}
    assert json.loads(capsys.readouterr().out)["threads"] == 3


def test_a_worker_process_gets_the_thread_count_for_numba_and_every_blas(monkeypatch):
    """Each pool a worker may start (Numba's, OpenMP's, OpenBLAS's, MKL's) gets --threads through
    the environment, over a shell's own setting (stand-in subprocess: nothing runs)."""
    import subprocess
    import types
    seen = {}

    def fake_run(cmd, *, env, **kwargs):
        seen.update(env)
        return types.SimpleNamespace(returncode=0, stdout='{"tokens_per_s": 1.0}\n', stderr="")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert bench_run.run_job({"threads": 3}) == {"tokens_per_s": 1.0}
    names = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    assert {name: seen[name] for name in names} == dict.fromkeys(names, "3")


def test_every_job_carries_the_counts_and_threads_asked_for():
    """--steps, --warmup, --threads and --tokens reach each training and sampling job, minilm's and
    the peer's alike (a job's warm-up of 0 would time Numba's compilation in the first step)."""
    args = _bench_args(["--presets", "shakespeare-gru", "--backends", "numpy", "numba", "--steps", "7",
                        "--warmup", "3", "--threads", "5", "--tokens", "9"])
    ((_, train),) = bench_run.train_tables(args, args.backends, torch=True)
    ((_, sample),) = bench_run.sample_tables(args, args.backends, torch=True)
    assert [(j["impl"], j["steps"], j["warmup"], j["threads"]) for j in train] == \
        [("minilm", 7, 3, 5), ("minilm", 7, 3, 5), ("torch", 7, 3, 5)]
    assert [(j["impl"], j["tokens"], j["threads"]) for j in sample] == [("minilm", 9, 5)] * 4 + [("torch", 9, 5)]


def test_a_tables_columns_are_its_rows_own_numbers(monkeypatch):
    """Each printed number is the row's own, in its own column: the median round's ms/step and
    tokens/s, the largest peak and +MB over the rounds, the ratio to PyTorch and to numpy."""
    tokens = 12 * 64
    ms = {"numpy": [40.0, 10.0, 20.0], "numba": [8.0, 2.0, 4.0], "torch": [4.0, 4.0, 4.0]}
    peak, baseline = [100.0, 120.0, 110.0], [50.0, 90.0, 60.0]      # +MB: 50, 30, 50
    seen = {name: 0 for name in ms}

    def fake_run_job(job):
        name = job.get("backend", "torch")
        r = seen[name]
        seen[name] += 1
        return {"job": job, "ms_per_step": ms[name][r], "tokens_per_s": tokens * 1000 / ms[name][r],
                "peak_rss_mb": peak[r], "baseline_rss_mb": baseline[r]}
    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    jobs = [{"impl": "minilm", "what": "train", "backend": name} for name in ("numpy", "numba")] + \
        [{"impl": "torch", "what": "train"}]
    lines = []
    bench_run._print_rows(lines.append, "training step", bench_run._rounds(jobs, 3), "ms_per_step")
    assert [line.split() for line in lines[2:]] == [
        ["numpy", "20.00", "38400", "120", "50", "0.20x", "(0.10-0.40)", "1.00x", "(1.00-1.00)"],
        ["numba", "4.00", "192000", "120", "50", "1.00x", "(0.50-2.00)", "5.00x", "(5.00-5.00)"],
        ["pytorch", "4.00", "192000", "120", "50", "1.00x", "(1.00-1.00)"]]


def test_what_all_measures_training_sampling_and_ops_into_one_json(monkeypatch, tmp_path, capsys):
    """--what all (the default) gives the training table with its ms/step column, the sampling
    table and the per-op table, and the JSON records the thread count they ran with."""
    from minilm.bench import ops as op_bench

    def fake_run_job(job):
        return {"job": job, "tokens_per_s": 1000.0, "peak_rss_mb": 1.0,
                **({"ms_per_step": 1024.0} if job["what"] == "train" else {})}
    monkeypatch.setattr(bench_run, "run_job", fake_run_job)
    monkeypatch.setattr(op_bench, "run",
                        lambda backends, *, threads, out: [{"backend": "numpy", "op": "gelu", "ms": 1.0}])
    path = tmp_path / "all.json"
    assert cli.main(["bench", "--presets", "shakespeare-gru", "--backends", "numpy", "--no-torch", "--rounds", "1",
                     "--threads", "3", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert results["threads"] == 3
    assert [(r["job"]["what"], r["job"]["threads"]) for r in results["train"] + results["sample"]] == \
        [("train", 3), ("sample", 3), ("sample", 3)]
    assert results["ops"] == [{"backend": "numpy", "op": "gelu", "ms": 1.0}]
    training = capsys.readouterr().out.split("\nsampling")[0]
    assert "training step, shakespeare-gru" in training and "ms/step" in training and "1024.00" in training


def test_an_ops_time_is_the_median_in_ms_of_the_calls_after_an_untimed_one(monkeypatch):
    """The first call compiles (Numba) and is not timed; the others' median is reported in ms
    (stand-in clock: calls of 5 s, then 4, 1 and 2 ms)."""
    import types
    from minilm.bench import ops as op_bench
    now, costs = [0.0], iter([5.0, 0.004, 0.001, 0.002])
    monkeypatch.setattr(op_bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def fn():
        now[0] += next(costs)
    assert op_bench._time(fn, repeats=3) == pytest.approx(2.0, rel=1e-9)     # the median of 4, 1, 2 ms


def test_the_per_op_shapes_are_the_cpu_presets_shapes():
    """The per-op table says it times the ops at the CPU presets' shapes (and Shakespeare's 65
    characters)."""
    from minilm.bench import ops as op_bench
    gpt, lstm, gru = (preset(name) for name in ("shakespeare-char-cpu", "shakespeare-lstm", "shakespeare-gru"))
    assert (op_bench.B, op_bench.T, op_bench.C, op_bench.NH, op_bench.V) == \
        (gpt.batch_size, gpt.block_size, gpt.n_embd, gpt.n_head, 65)
    for rnn in (lstm, gru):
        assert (op_bench.RB, op_bench.RT, op_bench.RD, op_bench.RH) == \
            (rnn.batch_size, rnn.block_size, rnn.n_embd, rnn.hidden_size)


def test_the_benchmarks_in_the_bench_process_compute_with_the_threads_asked_for(tmp_path, monkeypatch):
    """The per-op table and converge run minilm in the bench process itself: there --threads holds
    Numba's pool and BLAS (``limited``), and the peer gets as many PyTorch threads (stand-ins for
    the ops and for minilm's training; the peer trains two steps)."""
    import dataclasses
    import numba
    from threadpoolctl import threadpool_info
    from minilm import backend
    from minilm.bench import converge
    from minilm.bench import ops as op_bench
    torch = pytest.importorskip("torch")
    from minilm.bench import peers
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: one thread is every pool's default, so no limit would show")

    def pools():
        return numba.get_num_threads(), {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    seen = {}

    def op(name):
        def call(*args, **kwargs):
            seen["ops"] = pools()
            return np.zeros(1), None
        return call
    monkeypatch.setattr(backend, "op", op)
    op_bench.run(["numpy"], threads=1, repeats=1, out=lambda line: None)
    curve = [{"iter": 0, "train_seconds": 0.0, "val_loss": 4.0}]
    monkeypatch.setattr(converge, "minilm_curve", lambda cfg, data, b, say: seen.update(minilm=pools()) or curve)
    train_step = peers.train_step
    monkeypatch.setattr(peers, "train_step",
                        lambda *a, **k: seen.update(peer=torch.get_num_threads()) or train_step(*a, **k))
    short = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=2, eval_interval=2, eval_iters=1,
                                block_size=8, batch_size=2, warmup_iters=1, lr_decay_iters=0, n_layer=1, n_embd=8,
                                n_head=2)
    monkeypatch.setattr(converge.config, "preset", lambda name: short)
    before = torch.get_num_threads()
    torch.set_num_threads(2)                                 # not the 1 asked for below
    try:
        converge.run("shakespeare-char-cpu", str(_corpus(tmp_path)), backends=["numpy"], threads=1, target=0.0,
                     out=lambda line: None)
    finally:
        torch.set_num_threads(before)
    assert seen == {"ops": (1, {1}), "minilm": (1, {1}), "peer": 1}


def test_converge_reports_each_sides_first_evaluation_at_or_below_the_target(monkeypatch):
    """A side that starts below the target reached it at 0 s (stand-in curves)."""
    import contextlib
    from minilm.bench import converge
    curves = {"numpy": [{"iter": 0, "train_seconds": 0.0, "val_loss": 1.8},
                        {"iter": 10, "train_seconds": 3.0, "val_loss": 1.5}],
              "pytorch": [{"iter": 0, "train_seconds": 0.0, "val_loss": 1.5},
                          {"iter": 10, "train_seconds": 2.0, "val_loss": 1.2}]}
    monkeypatch.setattr(converge, "minilm_curve", lambda cfg, data, b, say: curves[b])
    monkeypatch.setattr(converge, "torch_curve", lambda cfg, data, threads, say: curves["pytorch"])
    monkeypatch.setattr(converge, "limited", lambda threads: contextlib.nullcontext())
    lines = []
    results = converge.run("shakespeare-char-cpu", "unused", backends=["numpy"], threads=1, target=1.5,
                           out=lines.append)
    assert [(r["impl"], r["seconds_to_target"]) for r in results] == [("numpy", 3.0), ("pytorch", 0.0)]
    assert lines[-1].split() == ["pytorch", "1.2000", "0.0", "2.0"]


def test_converge_gives_the_peer_the_evaluation_batches_minilm_train_draws(tmp_path, monkeypatch):
    """'the same evaluation batches' on both sides: the peer's (``_corpus``) are those minilm train
    draws for the validation split from the same preset and seed."""
    import dataclasses
    from minilm import train
    from minilm.bench import converge
    corpus = str(_corpus(tmp_path))
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=2, eval_interval=2, eval_iters=2,
                              block_size=8, batch_size=2, warmup_iters=1, lr_decay_iters=0, n_layer=1, n_embd=8,
                              n_head=2, seed=7)
    drawn, evaluation_batches = [], train.evaluation_batches
    monkeypatch.setattr(train, "evaluation_batches",
                        lambda *a, **k: drawn.append(evaluation_batches(*a, **k)) or drawn[-1])
    train.train(cfg, data=corpus, out_dir=str(tmp_path / "run"), progress=False, log=lambda line: None)
    (_, minilm_val) = drawn                                  # the training split's, then the validation split's
    _, _, peer_val = converge._corpus(cfg, corpus)
    assert len(peer_val) == len(minilm_val) == 2
    for (x, y), (x_ours, y_ours) in zip(peer_val, minilm_val):
        assert np.array_equal(x, x_ours) and np.array_equal(y, y_ours)


def test_the_peer_of_a_preset_has_its_dropout_and_pytorchs_fused_adamw():
    """make_model gives the peer the preset's dropout (shakespeare-char's 0.2: a peer without it is
    timed on less work than minilm's GPT); make_optimizer gives PyTorch's fused AdamW, its fastest,
    and PyTorch's default where asked (nanoGPT's loop on a CPU)."""
    pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import peers
    cfg = dataclasses.replace(preset("shakespeare-char"), n_layer=1, n_head=2, n_embd=8, block_size=4)
    assert cfg.dropout == 0.2
    model = peers.make_model(cfg, 11)
    assert model.p == 0.2 and [block.p for block in model.h] == [0.2]
    assert peers.make_optimizer(model, cfg).defaults["fused"] is True
    assert not peers.make_optimizer(model, cfg, fused=False).defaults["fused"]


def test_nanogpts_loop_is_nanogpts_recipe_on_a_cpu(tmp_path, monkeypatch):
    """nanoGPT's CPU run: AdamW without ``fused`` (nanoGPT asks for it on CUDA only), the gradients
    clipped at the preset's grad_clip every step, and each estimate over EVAL_ITERS = 20 batches of
    each split (its README's --eval_iters=20, the table's "(20 batches)")."""
    torch = pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import nanogpt, peers
    short = dataclasses.replace(preset("shakespeare-char-cpu"), max_iters=2, eval_interval=2, block_size=8,
                                batch_size=2, n_layer=1, n_head=2, n_embd=8, warmup_iters=1, lr_decay_iters=2)
    monkeypatch.setattr(nanogpt, "preset", lambda name: short)
    monkeypatch.setattr(nanogpt, "evaluate", lambda *a, **k: {"loss": 0.0})     # the whole split: not counted
    seen = {"clip": [], "evaluated": 0}
    make_optimizer, forward, clip = peers.make_optimizer, peers.TorchGPT.forward, torch.nn.utils.clip_grad_norm_

    def optimizer(model, cfg, fused=True):
        seen["fused"] = fused
        return make_optimizer(model, cfg, fused=fused)

    def counting(self, *args, **kwargs):
        seen["evaluated"] += not self.training
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(peers, "make_optimizer", optimizer)
    monkeypatch.setattr(peers.TorchGPT, "forward", counting)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: seen["clip"].append(max_norm) or clip(params, max_norm))
    nanogpt.run(seed=1, data=str(_corpus(tmp_path)), threads=1, out=lambda line: None)
    assert seen == {"fused": False, "clip": [1.0, 1.0], "evaluated": 2 * 2 * 20}   # at iterations 0 and 2


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpts_loop_starts_from_nanogpts_own_draws(bias):
    """The peer, drawn again by ``_init_as_nanogpt``, holds the weights nanoGPT's ``GPT`` draws from
    the same seed and leaves the generator where nanoGPT's leaves it, so the batches that follow
    are nanoGPT's too. The model below is nanoGPT's module tree as its constructor builds it (its
    modules in its order, the head built after the blocks and tied to the token embedding, then
    ``apply`` and the residual projections drawn again); forwards are not needed."""
    torch = pytest.importorskip("torch")
    import math
    nn = torch.nn
    from minilm.bench import nanogpt, peers
    V, T, L, NH, C, seed = 11, 8, 2, 2, 16, 5

    def linears(*shapes):
        return [nn.Linear(i, o, bias=bias) for i, o in shapes]

    class NanoGPTTree(nn.Module):
        def __init__(self):
            super().__init__()
            blocks = nn.ModuleList()
            for _ in range(L):
                block = nn.Module()
                block.attn, block.mlp = nn.Module(), nn.Module()       # LayerNorms draw nothing: left out
                block.attn.c_attn, block.attn.c_proj = linears((C, 3 * C), (C, C))
                block.mlp.c_fc, block.mlp.c_proj = linears((C, 4 * C), (4 * C, C))
                blocks.append(block)
            self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C), h=blocks))
            self.lm_head = nn.Linear(C, V, bias=False)
            self.transformer.wte.weight = self.lm_head.weight
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * L))

        @staticmethod
        def _init_weights(module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    torch.manual_seed(seed)
    theirs = NanoGPTTree()
    their_next = torch.randint(1000, (12,))
    ours = peers.TorchGPT(V, T, L, NH, C, bias)
    nanogpt._init_as_nanogpt(ours, seed)
    assert torch.equal(torch.randint(1000, (12,)), their_next)
    t = theirs.transformer
    pairs = [(ours.wte, t.wte), (ours.wpe, t.wpe)]
    for block, their in zip(ours.h, t.h):
        pairs += [(block.c_attn, their.attn.c_attn), (block.c_proj, their.attn.c_proj),
                  (block.c_fc, their.mlp.c_fc), (block.mlp_proj, their.mlp.c_proj)]
    for mine, their in pairs:
        assert torch.equal(mine.weight, their.weight)
        mine_b, their_b = getattr(mine, "bias", None), getattr(their, "bias", None)
        assert (mine_b is None and their_b is None) or torch.equal(mine_b, their_b)
    torch.manual_seed(seed)
    assert not torch.equal(peers.TorchGPT(V, T, L, NH, C, bias).wte.weight, t.wte.weight)   # the peer's own order


def test_both_sides_of_a_gpt_measurement_count_its_parameters_alike(monkeypatch, numpy_backend):
    """The JSON's n_params: the same count (without the position embedding) on both sides."""
    pytest.importorskip("torch")
    import dataclasses
    from minilm.bench import peers, worker
    cfg = dataclasses.replace(preset("shakespeare-char-cpu"), n_layer=1, n_head=2, n_embd=8, block_size=4,
                              batch_size=2)
    monkeypatch.setattr(peers, "train_step", lambda *a, **k: 1.0)
    ours = worker.minilm_train({"backend": "numpy", "steps": 1, "warmup": 0}, cfg, 11)
    peer = worker.torch_train({"steps": 1, "warmup": 0}, cfg, 11)
    assert ours["n_params"] == peer["n_params"] == 11 * 8 + 12 * 8 * 8 + 3 * 8     # wte, one block, 3 gammas


def test_the_json_names_the_checkouts_commit_also_through_gpu_run_shs_links(monkeypatch, tmp_path):
    """gpu/run.sh runs minilm from a folder of links to the checkout's files (so that pyproject's
    mapping of bench/, gpu/ and reference/ holds without an install): the JSON names the
    checkout's commit there too, not none."""
    import shutil
    import subprocess
    import minilm
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "checkout"
    (repo / "minilm").mkdir(parents=True)
    (repo / "minilm" / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=minilm", "-c", "user.email=minilm@example.org",
           "-c", "commit.gpgsign=false"]                   # (a user's config may sign commits)
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    links = tmp_path / "links" / "minilm"                   # as gpu/run.sh builds it: ln -s "$repo"/minilm/* ...
    links.mkdir(parents=True)
    try:
        (links / "__init__.py").symlink_to(repo / "minilm" / "__init__.py")
    except OSError as e:                                    # Windows without the right to make links
        pytest.skip(f"cannot make a symbolic link here: {e}")
    monkeypatch.setattr(minilm, "__file__", str(links / "__init__.py"))
    assert bench_run._git_commit() == head


def test_gpu_profile_answers_help_and_refuses_an_unknown_dtype_by_name():
    """The GPU profiler's command line: --help exits 0 with the usage on any machine, and a dtype it
    does not profile is a usage error naming it, before CuPy or PyTorch is looked for."""
    import subprocess
    import sys

    help_run = subprocess.run([sys.executable, "-m", "minilm.bench.gpu_profile", "--help"],
                              capture_output=True, text=True)
    assert help_run.returncode == 0 and "DTYPE" in help_run.stdout and "bfloat16" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "minilm.bench.gpu_profile", "float32", "float64"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "DTYPE" in bad.stderr and "'float64'" in bad.stderr and "'float32'" not in bad.stderr
    from minilm.bench.gpu_profile import _parse
    assert _parse([]) == ["float32", "bfloat16"]
    assert _parse(["float16", "float32", "float16"]) == ["float16", "float32"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file-size limits (RLIMIT_FSIZE)")
def test_a_json_file_that_a_full_disk_cuts_short_is_named_and_the_old_one_kept(monkeypatch, tmp_path, capsys):
    """The results cannot be written at the end (a full disk; here a file-size limit, which fails the write
    with EFBIG as a full disk does with ENOSPC): the error names the file, where it said only '[Errno 27]
    File too large', as if the output were full; and the results an earlier run wrote there stay whole,
    where they were replaced by the first kilobyte of the new ones."""
    import resource
    _captured_jobs(monkeypatch)
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: False)
    monkeypatch.setattr(bench_run, "_git_commit", lambda: None)     # git would inherit the limit, and die in a write
    path = tmp_path / "bench.json"
    path.write_text('{"earlier": "results"}\n')
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))       # the results are some 3 kB
    try:
        code = cli.main(["bench", "--what", "sample", "--backends", "numpy", "--rounds", "1", "--json", str(path)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    assert f"could not write option '--json' {str(path)!r}: File too large" in capsys.readouterr().err
    assert path.read_text() == '{"earlier": "results"}\n'
    assert os.listdir(tmp_path) == ["bench.json"]


def test_a_json_file_in_a_folder_that_cannot_be_written_is_written_in_place(monkeypatch, tmp_path, capsys):
    """--json names a file the user may write, in a folder where no new file can be made (or, in a
    sticky folder such as /tmp, another user's file that cannot be replaced): the check before the
    measurements passes, so the results are written in place, as before, not refused at the end."""
    from minilm import checkpoint

    def no_new_file(folder, name):
        raise PermissionError(13, "Permission denied")     # what a folder without write permission answers
    _captured_jobs(monkeypatch)
    monkeypatch.setattr(bench_run, "_torch_has_cuda", lambda: False)
    monkeypatch.setattr(bench_run, "_git_commit", lambda: None)
    monkeypatch.setattr(checkpoint, "_new_temporary", no_new_file)
    path = tmp_path / "bench.json"
    path.write_text('{"earlier": "results"}\n')
    code = cli.main(["bench", "--what", "sample", "--backends", "numpy", "--rounds", "1", "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    assert "sample" in json.loads(path.read_text())
