"""The quick start's provider (examples/quickstart_provider.py, shown whole in
docs/quickstart.md), run as a subprocess and driven over HTTP by the real IVR state
machine (tests/ivr/sim.py: virtual clock, no SIP): every answer it gives is a valid
ActionNode, and the calls go where the guide says."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pbx.ivr.models import parse_action
from pbx.messages import HangupCommand, PlayCommand, TimerCommand, TransferCommand
from tests.ivr.sim import Sim
from tests.provider_process import provider_process

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart_provider.py"


@pytest.fixture(scope="module")
def step_url() -> Iterator[str]:
    with provider_process(SCRIPT, start_s=20) as url:
        yield url


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def http_provider(url: str) -> Sim:
    """A simulated call whose provider is the running example; each answer is checked."""

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        action = post(url, body)
        parse_action(action)  # raises on an invalid ActionNode
        return action  # type: ignore[no-any-return]

    return Sim(answer)


def last(commands: list[Any], kind: type) -> Any:
    found = [c for c in commands if isinstance(c, kind)]
    assert found, commands
    return found[-1]


def test_notifications_are_answered(step_url: str) -> None:
    for path in ("/start", "/end", "/dtmf-match"):
        assert post(step_url + path, {"session_id": "s"}) == {"status": "ok"}


def test_a_key_in_the_menu(step_url: str) -> None:
    sim = http_provider(step_url)
    welcome = last(sim.start(), PlayCommand)
    assert welcome.file == "sounds/welcome.wav"
    menu = last(sim.audio_done(welcome.play_id), PlayCommand)
    assert menu.file == "sounds/menu.wav"
    sim.digit("2")  # entry 2: goodbye, resolved by the PBX without a step request
    assert [e["type"] for e in sim.events] == ["session_start"]
    assert sim.notified_body("dtmf_match")["digit"] == "2"


def test_silence_three_times_hangs_up(step_url: str) -> None:
    sim = http_provider(step_url)
    play = last(sim.start(), PlayCommand)
    commands = sim.audio_done(play.play_id)
    for _ in range(3):
        menu = last(commands, PlayCommand)
        assert menu.file == "sounds/menu.wav"
        timer = last(sim.audio_done(menu.play_id), TimerCommand)
        commands = sim.timer(timer.timer_id)  # no key: dtmf_menu_timeout
        notice = last(commands, PlayCommand)
        commands = sim.audio_done(notice.play_id)
    assert notice.file == "sounds/goodbye.wav"
    assert isinstance(commands[-1], HangupCommand)
    assert [e["type"] for e in sim.events].count("dtmf_menu_timeout") == 3
    assert sim.variables["misses"] == "2"
    assert sim.notified_body("end")["reason"] == "Normal"


def test_a_wrong_key_then_a_transfer(step_url: str) -> None:
    sim = http_provider(step_url)
    play = last(sim.start(), PlayCommand)
    assert last(sim.audio_done(play.play_id), PlayCommand).file == "sounds/menu.wav"
    notice = last(sim.digit("7"), PlayCommand)  # dtmf_menu_invalid
    assert notice.file == "sounds/invalid.wav"
    assert last(sim.audio_done(notice.play_id), PlayCommand).file == "sounds/menu.wav"
    commands = sim.digit("1")
    assert last(commands, TransferCommand).target == "2001"
    assert sim.notified_body("end")["reason"] == "Transfer(2001)"
