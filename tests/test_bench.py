"""`minilm bench`: the rounds, the medians and ratios it reports, and one real measurement end to end."""
import json

import pytest

from minilm import cli
from minilm.bench import run as bench_run


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


@pytest.mark.parametrize("rounds", ["0", "-1"])
def test_bad_rounds_is_a_clear_error(rounds, capsys):
    assert cli.main(["bench", "--what", "train", "--rounds", rounds, "--no-torch", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "'--rounds'" in err and "integer >= 1" in err and rounds in err


def test_a_training_step_measurement_end_to_end(tmp_path, capsys):
    """One real measurement in a fresh worker process, written as JSON and as a table."""
    path = tmp_path / "bench.json"
    code = cli.main(["bench", "--what", "train", "--presets", "shakespeare-gru", "--backends", "numpy",
                     "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1", "--no-torch",
                     "--json", str(path)])
    assert code == 0
    results = json.loads(path.read_text())
    (row,) = results["train"]
    assert row["job"]["preset"] == "shakespeare-gru" and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
    assert "training step, shakespeare-gru" in capsys.readouterr().out


def test_converge_with_a_negative_seed_is_a_clear_error(capsys):
    assert cli.main(["bench", "--what", "converge", "--seed", "-1", "--no-torch", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "-1" in err
