"""An entry point given the last Step goes on from its memory (`Step.resume`): the same
outcome as from the Step's state dict, and the Step's own state unchanged."""

from __future__ import annotations

from typing import Any

import orjson

from pbx.ivr import machine
from pbx.ivr.requests import ProviderResult
from tests.ivr.sim import make_call

# An answer whose `variables` the session applies in place (`Session.prepare`), with a
# prompt whose file names one of them, chained to a menu.
ANSWER: dict[str, Any] = {
    "type": "prompt",
    "file": "sounds/$lang$/welcome.wav",
    "variables": {"lang": "de", "caller": "changed"},
    "step_id": "s1",
    "extra": {"flow": "resume"},
    "next": {"type": "dtmf_menu", "greeting": "sounds/menu.wav",
             "entries": {"1": {"type": "transfer", "target": "2001"}}},
}


def ok(body: dict[str, Any]) -> ProviderResult:
    return ProviderResult("ok", body=body, status=200, attempts=1)


def outcome(step: machine.Step) -> dict[str, Any]:
    return {
        "state": step.state,
        "commands": [c.model_dump() for c in step.commands],
        "requests": [(r.kind, r.url, r.body) for r in step.requests],
        "traces": [t.model_dump() for t in step.traces],
        "done": step.done,
        "wait_ms": step.wait_ms,
    }


def test_result_from_the_step_equals_result_from_its_state_dict() -> None:
    started = machine.start(make_call(), 100.0)
    as_dict = orjson.loads(orjson.dumps(started.state))  # as it travels
    from_dict = machine.provider_result(as_dict, ok(ANSWER), 100.04)
    from_memory = machine.provider_result(machine.start(make_call(), 100.0), ok(ANSWER),
                                          100.04)
    assert outcome(from_memory) == outcome(from_dict)
    assert from_memory.state["variables"]["lang"] == "de"  # the answer was applied


def test_the_step_keeps_its_state_whatever_the_next_entry_point_changes() -> None:
    # The same start twice: one Step's state dumped at once, the other's only after an
    # entry point went on from it and applied the answer's variables.
    reference = machine.start(make_call(), 100.0).state
    started = machine.start(make_call(), 100.0)
    machine.provider_result(started, ok(ANSWER), 100.04)
    assert started.state == reference
    assert "lang" not in started.state["variables"]
    assert started.state["variables"]["caller"] == "1001"


def test_a_step_made_from_a_dict_resumes_by_loading_it() -> None:
    started = machine.start(make_call(), 100.0)
    state = orjson.loads(orjson.dumps(started.state))
    replayed = machine.Step(dumped=state, waiting_for_provider=True)
    step = machine.provider_result(replayed, ok(ANSWER), 100.04)
    assert outcome(step) == outcome(machine.provider_result(state, ok(ANSWER), 100.04))
    assert replayed.state == state
