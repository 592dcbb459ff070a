"""A bounded run of every fuzz target (part of `make test`): atheris in a subprocess,
a fixed number of inputs from a fixed seed, starting from the committed seeds; any
crash fails the test with the fuzzer's report. Long runs: tests/fuzz/README.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import ROOT, TARGETS

RUNS = 3000
SEED = 4475


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_bounded_run(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [str(d) for d in TARGETS[name].seeds]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", name, f"-runs={RUNS}", f"-seed={SEED}",
         f"-artifact_prefix={tmp_path}/", str(corpus), *seeds],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"Done {RUNS} runs" in report, report[-6000:]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_run_clean_and_exist(name: str) -> None:
    """The committed seeds are there and pass their target (a seed that crashes, or
    a missing seed directory, would make every fuzz run start from nothing)."""
    target = TARGETS[name]
    files = [f for d in target.seeds for f in sorted(d.iterdir()) if f.is_file()]
    assert files, f"no seeds for {name}"
    for seed in files:
        target.run(seed.read_bytes())
