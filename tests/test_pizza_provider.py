"""The pizza line (examples/pizza_provider.py) passes its pbx-sim scenarios.

The provider runs as a real process on a free port; `pbx-sim` (docs/simulator.md) runs
examples/pizza_scenarios.yaml against it (its last call is the `error` branch, a PBX
without text to speech: `options: {tts: false}`), and that branch from the command
line too (`--no-tts`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.provider_process import provider_process

ROOT = Path(__file__).resolve().parent.parent

PROVIDER = ROOT / "examples" / "pizza_provider.py"
SCENARIOS = ROOT / "examples" / "pizza_scenarios.yaml"


@pytest.fixture(scope="module")
def pizza_url() -> Iterator[str]:
    with provider_process(PROVIDER) as url:
        yield url


def pbx_sim(*args: str) -> subprocess.CompletedProcess[str]:
    """`pbx-sim` as installed next to this Python (else `python -m pbx.sim.cli`)."""
    script = Path(sys.executable).with_name("pbx-sim")
    command = [str(script)] if script.exists() else (
        [shutil.which("pbx-sim")] if shutil.which("pbx-sim")
        else [sys.executable, "-m", "pbx.sim.cli"])
    return subprocess.run([*(c for c in command if c), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_every_scenario_passes(pizza_url: str) -> None:
    run = pbx_sim("--scenario", str(SCENARIOS), pizza_url)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr
    assert "FAILED" not in run.stdout
    assert "the caller hangs up while ordering: ok" in run.stdout
    assert "a PBX without text to speech sends the caller to the operator: ok" in run.stdout


def test_no_tts_error_goes_to_the_operator(pizza_url: str) -> None:
    run = pbx_sim(pizza_url, "--no-tts", "--wait", "idle",
                  "--expect-event", '{"type": "error"}',
                  "--expect-error", "TTS service not available",
                  "--expect-end-reason", "Transfer(operator)")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
