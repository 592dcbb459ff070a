"""Every flow in the provider guide runs: docs/flows/*.yaml through `pbx-sim`.

A flow is a pbx-sim scenario (the caller's keys and what must happen) with a header
naming its provider, a real process: `tests/flow_provider.py`, which answers from the
flow's `.answers.yaml` table, or an example of the guide. A flow that does not go the
way the guide says fails its expectations, and so this test. Each flow is linked from
the guide, so the sequences the guide describes are the ones tested.

    # provider: tests/flow_provider.py (answers: x.answers.yaml)
    # exit: 3        (optional: the exit code the flow shows; default 0)
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.provider_process import provider_process

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "docs" / "flows"
SCENARIOS = sorted(p for p in FLOWS.glob("*.yaml") if not p.name.endswith(".answers.yaml"))
_PROVIDER = re.compile(r"^# provider: (\S+)", re.M)
_EXIT = re.compile(r"^# exit: (\d+)", re.M)


class Providers:
    """The providers the flows name, each started once, on a free port."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.running: dict[str, str] = {}

    def url(self, script: str) -> str:
        if script not in self.running:
            self.running[script] = self._stack.enter_context(provider_process(ROOT / script))
        return self.running[script]

    def stop(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def providers() -> Iterator[Providers]:
    running = Providers()
    try:
        yield running
    finally:
        running.stop()


def pbx_sim(scenario: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pbx.sim.cli", "--scenario", str(scenario), url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def header(scenario: Path) -> tuple[str, int]:
    text = scenario.read_text(encoding="utf-8")
    provider = _PROVIDER.search(text)
    assert provider is not None, f"{scenario.name}: no `# provider:` line"
    expected_exit = _EXIT.search(text)
    return provider.group(1), int(expected_exit.group(1)) if expected_exit else 0


def test_there_are_flows() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"menu_retries", "type_ahead", "collect", "api", "quickstart"} <= names


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_the_flow_runs_as_the_guide_says(scenario: Path, providers: Providers) -> None:
    script, expected_exit = header(scenario)
    if script == "tests/flow_provider.py":
        answers = FLOWS / f"{scenario.stem}.answers.yaml"
        assert answers.is_file(), f"{scenario.name}: no {answers.name}"
    run = pbx_sim(scenario, providers.url(script))
    assert run.returncode == expected_exit, run.stdout[-8000:] + run.stderr
    assert "expectation not met" not in run.stdout, run.stdout[-8000:]
    assert "INTERNAL ERROR" not in run.stdout
    assert "✓ expect" in run.stdout


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_the_guide_links_the_flow(scenario: Path) -> None:
    link = f"flows/{scenario.name}"
    pages = [
        p.name for p in (ROOT / "docs").glob("*.md") if f"({link})" in p.read_text(encoding="utf-8")
    ]
    assert pages, f"no guide page links {link}"


def test_a_wrong_flow_fails(providers: Providers, tmp_path: Path) -> None:
    """The guide's menu rule, told wrong (the provider hears each miss): exit 1."""
    scenario = FLOWS / "menu_retries.yaml"
    wrong = tmp_path / "menu_retries.yaml"
    wrong.write_text(
        scenario.read_text(encoding="utf-8").replace(
            "      - not: {event: {type: dtmf_menu_invalid}}   # the provider hears none of the misses",
            "      - event: {type: dtmf_menu_invalid}",
            1,
        )
    )
    assert wrong.read_text() != scenario.read_text()
    run = pbx_sim(wrong, providers.url("tests/flow_provider.py"))
    assert run.returncode == 1, run.stdout[-4000:]
    assert "expectation not met: event {'type': 'dtmf_menu_invalid'}" in run.stdout
