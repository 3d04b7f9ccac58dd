"""The README's Python examples run as written (so that they stay true)."""
import pathlib
import re
import string

import numpy as np
import pytest

from minilm import cli

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
CHECKPOINT = "out/gpt/best.npz"          # what the README's commands train, and its sampling example reads


def test_the_readme_has_python_examples():
    assert len(EXAMPLES) >= 3          # the gradcheck of a user's layer, sampling a checkpoint, the model API


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if CHECKPOINT in code:             # a tiny model trained for one step stands in for the README's run
        rng = np.random.default_rng(0)
        letters = list(string.ascii_letters + string.punctuation)
        words = ["".join(rng.choice(letters, 5)) for _ in range(400)]
        (tmp_path / "corpus.txt").write_text("KING:\n" + " ".join(words) + "\n", encoding="utf-8")
        assert cli.main(["train", "--data", "corpus.txt", "--out", "out/gpt", "--n-layer", "1", "--n-head", "2",
                         "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--max-iters", "1",
                         "--eval-iters", "1", "--backend", "numpy", "--no-progress"]) == 0
        capsys.readouterr()
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    if CHECKPOINT in code:
        assert len(capsys.readouterr().out) == 300


def test_the_reference_readme_checks_the_reference_files():
    """reference/README.md is read beside the files a student edits: its `minilm gradcheck` must check
    them (--backend numpy), not the numba kernels, where a broken reference backward passes."""
    text = (README.parent / "reference" / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"minilm gradcheck[^`\n]*", text)
    assert commands and all("--backend numpy" in c for c in commands), commands


def test_the_model_examples_losses_are_those_its_comments_give(tmp_path, monkeypatch, capsys):
    """The model example prints its loss before training and after; each printed number is the one
    its comment gives (the start) or below it (the end), so that the comments stay true."""
    code = next(c for c in EXAMPLES if "AdamW" in c)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    printed = [float(m) for m in re.findall(r"^loss (\S+)", capsys.readouterr().out, flags=re.M)]
    claimed = [float(m) for m in re.findall(r'print\(f"loss .*?# (?:from |to )?([0-9.]+)', code)]
    assert len(printed) == 2 and len(claimed) == 2, (printed, claimed)
    assert printed[0] == pytest.approx(claimed[0], abs=1e-4)          # the start, as the comment says
    assert printed[1] <= claimed[1] + 1e-3                            # "about 0"
