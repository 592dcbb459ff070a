"""The IVR machine's phases: the transition table (every pair of phases, legal or
not), the walks that take every legal transition, the handler tables, and each
phase's data through the state dict and back (its wire format, version 1)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from pbx.config import IvrAppParams
from pbx.ivr import machine, session
from pbx.ivr.handlers import EXECUTORS, INPUTS, InputHandler
from pbx.ivr.models import ACTION_TYPES, PromptAction
from pbx.ivr.phases import (
    PHASE_DATA,
    TRANSITIONS,
    AwaitingApi,
    AwaitingRecognition,
    AwaitingSpeech,
    AwaitingStep,
    Closing,
    Collecting,
    CollectPrompt,
    Done,
    IllegalTransition,
    InputKind,
    IvrStateError,
    MenuGreeting,
    MenuNotice,
    MenuProgress,
    MenuWaiting,
    PendingRequest,
    Phase,
    PhaseData,
    Prompting,
    Recording,
    RecordPrompt,
    Timer,
    VoicemailGreeting,
    check_transition,
)
from pbx.ivr.requests import ProviderResult
from pbx.ivr.state import Envelope, dump, load
from pbx.messages import CallInfo, DtmfDigit, HangupCommand, MediaInput
from tests.ivr.walk import STRUCTURED_ANSWERS, make_call, walk

# ---------------------------------------------------------------- the transition table


@pytest.mark.parametrize("origin", [None, *Phase], ids=lambda p: "new" if p is None else p.value)
def test_each_transition_is_legal_exactly_when_the_table_lists_it(origin: Phase | None) -> None:
    for target in Phase:
        if target in TRANSITIONS[origin]:
            check_transition(origin, target, "dtmf")
            continue
        with pytest.raises(IllegalTransition) as caught:
            check_transition(origin, target, "dtmf")
        error = caught.value
        assert isinstance(error, IvrStateError)  # what the shell already handles
        assert (error.from_phase, error.to_phase, error.cause) == (origin, target, "dtmf")
        named = "(new session)" if origin is None else repr(origin.value)
        assert f"from phase {named} to {target.value!r} on 'dtmf'" in str(error)


def test_the_table_keeps_the_phases_that_cannot_go_everywhere_narrow() -> None:
    assert TRANSITIONS[Phase.DONE] == frozenset()
    assert TRANSITIONS[Phase.CLOSING] == {Phase.CLOSING, Phase.DONE}
    assert TRANSITIONS[Phase.VM_GREETING] == {
        Phase.VM_GREETING, Phase.RECORDING, Phase.CLOSING, Phase.DONE,
    }
    assert TRANSITIONS[None] == {Phase.WAIT_PROVIDER, Phase.CLOSING}
    # A menu notice only comes of type-ahead or the menu's own inputs.
    for origin in (Phase.WAIT_API, Phase.COLLECT_PROMPT, Phase.COLLECT_WAIT, Phase.RECORDING):
        assert Phase.MENU_NOTICE not in TRANSITIONS[origin]
        assert TRANSITIONS[origin] == frozenset(Phase) - {Phase.MENU_NOTICE}


def test_walks_take_every_transition_of_the_table_and_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random sessions (every action under every action that hands over to it, random
    call events, aborts, late and wrong answers) until every legal transition has been
    taken: the table lists none that cannot happen, and nothing happens that it does
    not list."""
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    taken: set[tuple[Phase | None, Phase]] = set()
    check = session.check_transition

    def recording_check(origin: Phase | None, target: Phase, cause: str) -> None:
        taken.add((origin, target))
        check(origin, target, cause)

    monkeypatch.setattr(session, "check_transition", recording_check)
    refused: set[str] = set()
    for rep in range(20):  # deterministic: the same seeds every run
        for i, answer in enumerate(STRUCTURED_ANSWERS):
            for move in walk(machine, random.Random(rep * 1000 + i), first_answer=answer):
                if move.error is not None:
                    assert not isinstance(move.error, IllegalTransition), move.error
                    assert isinstance(move.error, IvrStateError), move.error
                    refused.add(str(move.error).split(" not allowed")[0])
        if taken >= table:
            break
    assert taken - table == set()
    assert sorted(map(str, table - taken)) == []
    # The walks also fed inputs that the phases waiting for an answer refuse.
    assert "input 'dtmf'" in refused and "input 'api_result'" in refused


def test_an_illegal_transition_raises_from_the_machine_naming_both_phases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check is in the one place every handler's answer goes through: a handler
    that answered a digit in CLOSING with a prompt is stopped there."""
    state = machine.abort(None, make_call(), "boom", 1000.0).state
    assert state["phase"] == "closing"

    def replay(s: session.Session, data: PhaseData, ev: DtmfDigit) -> PhaseData:
        return Prompting(play_id=s.play("sounds/again.wav", interruptible=False))

    monkeypatch.setitem(INPUTS, (Phase.CLOSING, InputKind.DIGIT), InputHandler(PhaseData, replay))
    with pytest.raises(IllegalTransition, match="from phase 'closing' to 'prompt' on 'dtmf'"):
        machine.handle(state, MediaInput(event=DtmfDigit(digit="1")), 1001.0)


# ---------------------------------------------------------------- the handler tables


def test_every_action_type_has_an_executor() -> None:
    assert set(EXECUTORS) == ACTION_TYPES


def test_an_executor_refuses_an_action_of_another_type() -> None:
    s = session.Session.new(make_call(), 1.0, "test", EXECUTORS)
    with pytest.raises(TypeError, match="transfer handler given PromptAction"):
        EXECUTORS["transfer"](s, PromptAction(file="x.wav"), ())


def test_every_input_handler_takes_its_phases_data() -> None:
    for (phase, _kind), handler in INPUTS.items():
        assert issubclass(PHASE_DATA[phase], handler.data), (phase, handler)
    assert set(PHASE_DATA) == set(Phase)
    assert all(cls.phase is phase for phase, cls in PHASE_DATA.items())


# ---------------------------------------------------------------- the state dict

PENDING = PendingRequest(trigger="dtmf", request={"event": {"type": "dtmf"}}, sent_at=12.5)
MENU = MenuProgress(attempts=2, spoken_greeting=".tts/greeting.wav")
TIMER = Timer(timer_id=7, due=1005.0)

# Each phase's data with every field away from its default, and the keys of the
# version-1 state dict that carry it (the rest stay at their defaults).
SAMPLES: list[tuple[PhaseData, dict[str, Any]]] = [
    (
        AwaitingStep(pending=PENDING, typeahead=("1", "#")),
        {"pending": {"trigger": "dtmf", "request": {"event": {"type": "dtmf"}}, "sent_at": 12.5},
         "digits": ["1", "#"]},
    ),
    (
        AwaitingApi(pending=PENDING),
        {"pending": {"trigger": "dtmf", "request": {"event": {"type": "dtmf"}}, "sent_at": 12.5}},
    ),
    (AwaitingSpeech(purpose="prompt"), {"tts_for": "prompt"}),
    (AwaitingRecognition(stage="recognize"), {"asr_stage": "recognize"}),
    (
        # The greeting being synthesised is not there yet.
        AwaitingSpeech(purpose="greeting", menu=MenuProgress(attempts=1)),
        {"tts_for": "greeting", "menu_attempts": 1, "tts_greeting": None},
    ),
    (
        AwaitingSpeech(purpose="notice", menu=MENU, notice_interruptible=True),
        {"tts_for": "notice", "menu_attempts": 2, "tts_greeting": ".tts/greeting.wav",
         "notice_interruptible": True},
    ),
    (Prompting(play_id=4, typeahead=("5",)), {"active_play": 4, "digits": ["5"]}),
    (Prompting(play_id=4, rest=("b.wav",)),
     {"active_play": 4, "digits": [], "prompt_rest": ["b.wav"]}),
    (
        MenuGreeting(play_id=4, menu=MENU),
        {"active_play": 4, "menu_attempts": 2, "tts_greeting": ".tts/greeting.wav"},
    ),
    (
        MenuNotice(play_id=4, interruptible=True, typeahead=("9",), menu=MENU),
        {"active_play": 4, "notice_interruptible": True, "digits": ["9"], "menu_attempts": 2,
         "tts_greeting": ".tts/greeting.wav"},
    ),
    (
        MenuWaiting(timer=TIMER, menu=MENU),
        {"active_timer": 7, "timer_due": 1005.0, "menu_attempts": 2,
         "tts_greeting": ".tts/greeting.wav"},
    ),
    (CollectPrompt(play_id=4), {"active_play": 4}),
    (
        Collecting(timer=TIMER, collected="12"),
        {"active_timer": 7, "timer_due": 1005.0, "collected": "12"},
    ),
    (RecordPrompt(play_id=4), {"active_play": 4}),
    (
        Recording(record_id=3, due=1122.0, failure="disk full", grace_timer=TIMER,
                  end_reason="Voicemail(2001)"),
        {"active_record": 3, "record_due": 1122.0, "record_failure": "disk full",
         "active_timer": 7, "timer_due": 1005.0, "end_reason": "Voicemail(2001)"},
    ),
    (
        VoicemailGreeting(play_id=4, end_reason="Voicemail(2001)"),
        {"active_play": 4, "end_reason": "Voicemail(2001)"},
    ),
    (
        Closing(play_id=4, end_reason="Error(boom)", hangup_code=486),
        {"active_play": 4, "end_reason": "Error(boom)", "hangup_code": 486},
    ),
    (Done(end_reason="Transfer(2001)", hangup_code=486),
     {"end_reason": "Transfer(2001)", "hangup_code": 486}),
]

# The version-1 state dict's phase keys and their defaults (written by every executor
# since the format had a version; changing one breaks sessions that move between
# executors of two versions).
PHASE_KEY_DEFAULTS: dict[str, Any] = {
    "active_play": None, "active_timer": None, "timer_due": None, "record_due": None,
    "active_record": None, "record_failure": None, "tts_for": None, "tts_greeting": None,
    "digits": [], "collected": "", "menu_attempts": 0, "notice_interruptible": False,
    "hangup_code": None, "end_reason": None, "pending": None,
}
# Phase keys written only when they are not empty (executors older than them refuse
# them): a record_name_list prompt's parts still to play, the stage of an `asr` request.
OPTIONAL_PHASE_KEYS = {"prompt_rest", "asr_stage"}
ENVELOPE_KEYS = {
    "v", "phase", "call", "variables", "node", "play_id", "timer_id", "record_id",
    "last_record_path", "step_index", "chained_steps", "step_id", "step_name", "extra",
}


def _envelope(call: CallInfo) -> Envelope:
    return Envelope(
        call=call, variables={"caller": "1001", "dtmf_input": "12"},
        node=PromptAction(file="sounds/a.wav", interruptible=True), play_id=4, timer_id=7,
        record_id=3, last_record_path="sess-w/20260101_000000.wav", step_index=5,
        chained_steps=2, step_id="s1", step_name="greet", extra={"k": [1, 2]},
    )


def test_the_samples_cover_every_phase() -> None:
    assert {data.phase for data, _ in SAMPLES} == set(Phase)


@pytest.mark.parametrize("data,keys", SAMPLES, ids=lambda x: getattr(x, "phase", ""))
def test_phase_data_round_trips_through_the_state_dict(
    data: PhaseData, keys: dict[str, Any]
) -> None:
    envelope = _envelope(make_call())
    state = orjson.loads(orjson.dumps(dump(envelope, data)))  # as it crosses ZeroMQ
    assert set(state) == ENVELOPE_KEYS | set(PHASE_KEY_DEFAULTS) | (
        set(keys) & OPTIONAL_PHASE_KEYS)
    assert state["v"] == 1 and state["phase"] == data.phase.value
    assert {k: state[k] for k in PHASE_KEY_DEFAULTS | keys} == PHASE_KEY_DEFAULTS | keys
    assert state["step_index"] == 5  # the one key the front reads
    back_envelope, back_data = load(state)
    assert back_data == data
    assert back_envelope == envelope


@pytest.mark.parametrize("data,keys", SAMPLES, ids=lambda x: getattr(x, "phase", ""))
def test_keys_a_phase_has_no_use_for_are_read_past(data: PhaseData, keys: dict[str, Any]) -> None:
    """Executors before the split left stale values behind (a timer's due time after
    it fired, a menu's attempts in the step after it): they load to the same data."""
    state = dump(_envelope(make_call()), data)
    stale = {"active_play": 99, "active_timer": 98, "timer_due": 1.0, "record_due": 2.0,
             "active_record": 97, "record_failure": "old", "tts_for": "prompt",
             "tts_greeting": "old.wav", "digits": ["7"], "collected": "77",
             "menu_attempts": 9, "notice_interruptible": True, "hangup_code": 500,
             "end_reason": "Old", "pending": {"trigger": "x", "request": {}, "sent_at": 0.0}}
    state.update({k: v for k, v in stale.items() if k not in keys})
    assert load(state)[1] == data


def test_a_state_without_its_phases_key_is_refused() -> None:
    state = dump(_envelope(make_call()), Prompting(play_id=4))
    state["active_play"] = None
    with pytest.raises(IvrStateError, match="phase 'prompt' without 'active_play'"):
        load(state)
    # The shell's last resort then hangs up without the state.
    step = machine.abort(state, None, "boom", 1.0)
    assert step.commands == [HangupCommand(reason="Error(boom)")] and step.done


def test_a_jump_keeps_the_envelope_fields_it_should() -> None:
    """jump_ivr swaps the call's IVR: play/timer ids, trace index and passthrough stay,
    variables and record ids start again (as before the split)."""
    params = IvrAppParams(url="http://other.test/ivr/step", ivr_id="other")
    call = make_call()
    state = dump(_envelope(call), AwaitingStep(pending=PENDING))
    step = machine.provider_result(
        state,
        ProviderResult("ok", body={"type": "jump_ivr", "route_point": "other"}),
        1001.0,
        ivrs={"other": params},
    )
    after = step.state
    assert after["phase"] == "wait_provider"
    assert after["call"]["params"]["ivr_id"] == "other"
    assert (after["play_id"], after["timer_id"], after["record_id"]) == (4, 7, 0)
    assert after["last_record_path"] is None
    assert after["variables"].get("dtmf_input") is None
    assert after["step_id"] is None  # the jump action's (none), as for any answer
