"""The versions .ci/run tests as the floors are the lowest pyproject.toml allows: a floor raised in
one place and not the other would leave the declared one untested."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cis_floors_are_pyprojects_lower_bounds():
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    floors_file = ROOT / ".ci" / "floors.txt"
    if not floors_file.exists():
        pytest.skip("a copy without .ci/ (an sdist) has no floors to check")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    required = project["dependencies"] + extras["test"] + extras["plot"]     # not gpu: CI has no GPU
    bounds = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r).groups() for r in required)
    lines = [line for line in floors_file.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    # a series (numpy==1.24.*) for a bound of its first release (>=1.24), or one release (tqdm==4.66.2)
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9]+(?:\.[0-9]+)*)(?:\.\*)?", line).groups()
                for line in lines if "==" in line)
    others = [re.fullmatch(r"([A-Za-z0-9_.-]+)<[0-9.]+", line).group(1) for line in lines if "==" not in line]
    assert pins == bounds
    assert not set(others) & set(bounds)            # a cap on another package's own dependency, not on a floor