"""`app_params.compat = "rustpbx"` (docs/compat-rustpbx.md): where rustpbx's code and
the upstream document differ, the provider gets what rustpbx sends; the default keeps
the document. Each test runs the same calls under both settings."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from pbx.config import IvrAppParams, RetrySettings
from pbx.ivr.provider import ProviderClient, step_attempts
from pbx.messages import PlayCommand, TimerCommand, TransferCommand
from tests.ivr.sim import URL, WELCOME_MENU, Sim


def menu(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "dtmf_menu",
        "greeting": "menu.wav",
        "timeout_ms": 3000,
        "entries": {"1": {"type": "transfer", "target": "2001"}},
    }
    base.update(fields)
    return base


def test_compat_defaults_to_the_document_and_refuses_unknown_values() -> None:
    assert IvrAppParams(url=URL).compat == "spec"
    assert IvrAppParams(url=URL, compat="rustpbx").compat == "rustpbx"
    with pytest.raises(ValueError, match="compat"):
        IvrAppParams(url=URL, compat="asterisk")


@pytest.mark.parametrize(("compat", "event"), [
    ("spec", {"type": "dtmf_menu_invalid", "digit": "9"}),
    ("rustpbx", {"type": "dtmf", "digit": "9"}),
])
def test_menu_miss_reaches_the_provider_as(compat: str, event: dict[str, Any]) -> None:
    sim = Sim([menu(), {"type": "hangup"}], compat=compat)
    sim.start()
    sim.digit("9", stopped=1)
    assert sim.events[-1] == event


@pytest.mark.parametrize(("compat", "event"), [
    ("spec", {"type": "dtmf_menu_invalid", "digit": "1"}),
    ("rustpbx", {"type": "dtmf", "digit": "1"}),
])
def test_menu_without_entries_sends_digits_as(compat: str, event: dict[str, Any]) -> None:
    sim = Sim([menu(entries={}), {"type": "hangup"}], compat=compat)
    sim.start()
    sim.digit("1", stopped=1)
    assert sim.events[-1] == event


@pytest.mark.parametrize(("compat", "event"), [
    ("spec", {"type": "dtmf_menu_timeout"}),
    ("rustpbx", {"type": "dtmf_timeout"}),
])
def test_menu_timeout_reaches_the_provider_as(compat: str, event: dict[str, Any]) -> None:
    sim = Sim([menu(), {"type": "hangup"}], compat=compat)
    sim.start()
    assert sim.audio_done(1) == [TimerCommand(timer_id=1, delay_ms=3000)]
    sim.timer(1)
    assert sim.events[-1] == event


@pytest.mark.parametrize(("compat", "interrupted"), [("spec", True), ("rustpbx", False)])
def test_audio_complete_interrupted_flag(compat: str, interrupted: bool) -> None:
    sim = Sim([{"type": "prompt", "file": "a.wav"}, {"type": "hangup"}], compat=compat)
    sim.start()
    sim.digit("4")  # kept: the prompt is not interruptible
    sim.audio_done(1)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": interrupted}


def test_digit_interrupting_a_prompt_goes_to_its_menu_or_to_the_provider() -> None:
    spec = Sim([WELCOME_MENU])
    spec.start()
    # The document: the digit goes to the chained menu, resolved locally.
    assert spec.digit("1", stopped=1) == [TransferCommand(target="2001")]
    assert len(spec.sent) == 1
    rust = Sim([WELCOME_MENU, {"type": "transfer", "target": "2001"}], compat="rustpbx")
    rust.start()
    # rustpbx asks the provider about it, whatever `next` is.
    assert rust.digit("1", stopped=1) == [TransferCommand(target="2001")]
    assert rust.events[-1] == {"type": "dtmf", "digit": "1"}


@pytest.mark.parametrize(("compat", "max_retries", "notices"), [
    ("spec", 0, 0), ("spec", 1, 1), ("spec", 2, 2),
    ("rustpbx", 0, 0), ("rustpbx", 1, 0), ("rustpbx", 2, 1),
])
def test_menu_max_retries_counts(compat: str, max_retries: int, notices: int) -> None:
    """How many misses play the notice and repeat the greeting before invalid_action
    is the outcome: `max_retries` of them by the document (retries, like
    `retry.max_retries`), one fewer in rustpbx (where 0 and 1 are the same)."""
    invalid = {"type": "prompt", "file": "invalid.wav"}
    sim = Sim([menu(max_retries=max_retries, invalid_action=invalid), {"type": "hangup"}],
              compat=compat)
    sim.start()
    played = 0
    for _ in range(notices):
        commands = sim.digit("9")
        notice = [c for c in commands if isinstance(c, PlayCommand)][-1]
        assert notice.file == "invalid.wav"
        played += 1
        # The greeting repeats after the notice: the menu is still on.
        assert [c.file for c in sim.audio_done(notice.play_id)
                if isinstance(c, PlayCommand)] == ["menu.wav"]
    commands = sim.digit("9")
    outcome = [c for c in commands if isinstance(c, PlayCommand)][-1]
    sim.audio_done(outcome.play_id)
    # The outcome is a plain prompt: its end goes to the provider.
    assert sim.events[-1]["type"] == "audio_complete"
    assert played == notices


@pytest.mark.parametrize(("compat", "name"), [("spec", "sip_X-Customer"),
                                               ("rustpbx", "sip_X_Customer")])
def test_sip_header_variable_names(compat: str, name: str) -> None:
    sim = Sim([{"type": "hangup"}], compat=compat)
    sim.start()
    variables = sim.sent[0]["variables"]
    assert variables[name] == "gold"
    assert [k for k in variables if k.startswith("sip_")] == [name]


@pytest.mark.parametrize(("compat", "max_retries", "attempts"), [
    ("spec", 0, 1), ("spec", 3, 4), ("rustpbx", 0, 1), ("rustpbx", 1, 1), ("rustpbx", 3, 3),
])
def test_step_attempts(compat: str, max_retries: int, attempts: int) -> None:
    """A failing step request is POSTed once plus `max_retries` retries (the document);
    rustpbx tries `max_retries` times in all."""
    params = IvrAppParams(url=URL, compat=compat,
                          retry=RetrySettings(max_retries=max_retries))
    assert step_attempts(params) == attempts


def test_a_step_to_a_provider_that_is_down_is_tried_as_rustpbx_does() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = IvrAppParams(url=f"http://127.0.0.1:{port}/ivr/step", compat="rustpbx",
                          retry=RetrySettings(max_retries=3, timeout_ms=200))

    async def main() -> int:
        async with ProviderClient(retry_delay_ms=1) as client:
            result = await client.step(params, {"session_id": "s"})
        assert result.outcome == "fallback"
        return result.attempts

    assert asyncio.run(asyncio.wait_for(main(), 15)) == 3
