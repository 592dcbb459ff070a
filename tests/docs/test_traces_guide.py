"""docs/protocol.md "Traces": which steps leave a trace, as the guide says.

A trace per step request; none for what the PBX does on its own (a menu entry matched
locally); one more when the session ends after the last step's action has played,
with the call event that ended it as `trigger`, no `request`, and `end_reason`; none
more when the answered action ends the session at once.
"""

from __future__ import annotations

from typing import Any

from pbx.messages import PlayCommand
from tests.ivr.sim import WELCOME_MENU, Sim


def _play(commands: list[Any]) -> PlayCommand:
    return [c for c in commands if isinstance(c, PlayCommand)][-1]


def _shape(sim: Sim) -> list[tuple[str | None, str | None, bool, str | None]]:
    return [(t.trigger, t.action_type, t.request is not None, t.end_reason) for t in sim.traces]


def test_hangup_after_a_step_adds_the_closing_trace() -> None:
    sim = Sim([{"type": "prompt", "file": "sounds/welcome.wav"},
               {"type": "hangup", "prompt": "sounds/goodbye.wav"}])
    welcome = _play(sim.start())
    goodbye = _play(sim.audio_done(welcome.play_id))
    sim.audio_done(goodbye.play_id)
    assert _shape(sim) == [
        ("session_start", "prompt", True, None),
        ("audio_complete", "hangup", True, None),
        ("audio_complete", "hangup", False, "Normal"),  # the goodbye ended: the session ends
    ]
    assert sim.traces[-1].duration_ms == 0.0
    assert [t.step_index for t in sim.traces] == [1, 2, 3]


def test_a_menu_entry_leaves_no_step_of_its_own() -> None:
    sim = Sim([WELCOME_MENU])
    welcome = _play(sim.start())
    sim.audio_done(welcome.play_id)
    sim.digit("1")  # entry 1: transfer, resolved locally
    assert _shape(sim) == [
        ("session_start", "prompt", True, None),
        ("dtmf", "transfer", False, "Transfer(2001)"),
    ]


def test_a_terminal_answer_ends_on_its_own_trace() -> None:
    sim = Sim([{"type": "transfer", "target": "2001"}])
    sim.start()
    assert _shape(sim) == [("session_start", "transfer", True, "Transfer(2001)")]
