"""Issue 8, "a silent call", on the core's virtual clock: the exact sequences that leave
an IVR session waiting for an event that never comes, and the rules that end them.

The executor is the real one (`workers.ivr.handle_event` and the machine) with a
scripted provider client, run to its end at once (the client never waits, so no event
loop is needed); the rig's media worker fires the timers it is given when the clock
reaches them, and its plane can lose or refuse a command. The worker and executor
heartbeat as the clock advances.

* The finding: a collect_dtmf whose digit timer (`MediaTimer`) is lost on the way to
  the media worker. At 2554a5d the session waits forever and the provider never hears
  anything; now it gets an `error` event once the timer's own deadline plus the
  front's grace has passed.
* A media command the plane refuses, or one for a leg without a media worker: dropped
  in silence at 2554a5d; now the call ends at once with a traced error.
* A session no executor can take: IVR_NO_EXECUTOR_S was restarted by every executor
  heartbeat at 2554a5d, so it waited forever; an event an executor keeps "working on"
  (listed in its heartbeats) was kept alive forever. Both now end with a traced error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest

from pbx import messages as m
from pbx.calls.core import LIVENESS_CHECK_S
from pbx.calls.ivr import IVR_NO_EXECUTOR_S
from pbx.calls.state import call_from_dict
from pbx.ivr.requests import ProviderRequest, ProviderResult
from pbx.sip.message import SipRequest
from tests.calls.rig import CALLER, START, CoreRig, caller_invite
from workers.ivr import handle_event

COLLECT = {"type": "collect_dtmf", "max_digits": 16, "timeout_ms": 30_000}
HANGUP = {"type": "hangup"}

Answer = Callable[[dict[str, Any]], dict[str, Any]]


def collect_then_hangup(body: dict[str, Any]) -> dict[str, Any]:
    return COLLECT if body["event"]["type"] == "session_start" else HANGUP


class ScriptedClient:
    """The executor's ProviderClient: step requests answered by `answer` at once."""

    notify_timeout_ms = 500  # the /start the first step waits for is never sent here

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.events: list[tuple[str, dict[str, Any]]] = []  # (type, event)
        self.notified: list[tuple[str, dict[str, Any]]] = []  # (kind, body)

    async def step(self, params: Any, body: dict[str, Any]) -> ProviderResult:
        self.events.append((body["event"]["type"], body["event"]))
        return ProviderResult("ok", body=self.answer(body), status=200)

    def send(self, request: ProviderRequest) -> None:
        self.notified.append((request.kind, request.body))

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def finished(coro: Coroutine[Any, Any, m.IvrReply]) -> m.IvrReply:
    """Run a coroutine that never waits to its end, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the executor waited for something")


class Session:
    """A rig whose executor `e` is the real one, with a scripted provider."""

    def __init__(self, tmp: Path, answer: Answer = collect_then_hangup) -> None:
        self.rig = CoreRig(tmp)
        self.client = ScriptedClient(answer)
        self.rig.executors[b"e"].answer = self.execute

    def execute(self, event: m.IvrEvent) -> m.IvrReply:
        return finished(handle_event(event, self.client,  # type: ignore[arg-type]
                                     lambda: self.rig.now))

    def byes(self) -> list[SipRequest]:
        return self.rig.requests("BYE")


# ---------------------------------------------------------------- the finding


def test_healthy_collect_times_out_and_nothing_else_fires(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.answered()
    assert s.client.kinds == ["session_start"]
    at = rig.advance_until(lambda: len(s.client.kinds) > 1, 60)
    assert s.client.kinds == ["session_start", "dtmf_timeout"]
    assert at - START == pytest.approx(30)  # the digit timer's own 30 s
    rig.advance(3600)
    assert s.client.kinds == ["session_start", "dtmf_timeout"]
    assert not rig.trace_errors() and rig.core.ctx.stats["ivr_waits_expired"] == 0


def test_lost_digit_timer_gets_an_error_event_after_its_deadline(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.lose_media = lambda msg: isinstance(msg, m.MediaTimer) and msg.delay_ms > 0
    rig.answered()
    assert s.client.kinds == ["session_start"]
    assert [t.timer_id for t in rig.lost] == [1]  # the collect's timer never arrives
    started = rig.now
    # At 2554a5d: nothing, ever (the caller hears silence until they hang up).
    at = rig.advance_until(lambda: len(s.client.kinds) > 1, 120)
    assert s.client.kinds == ["session_start", "error"], (
        f"no event for {at - started:.0f} s after collect_dtmf: a silent call")
    reason = s.client.events[-1][1]["reason"]
    assert "collect_dtmf" in reason and "lost" in reason, reason
    # Not before its own deadline (the 30 s timer) plus the front's grace; at the first
    # liveness check after it.
    grace_s = rig.settings.sessions.wait_grace_ms / 1000
    assert 30 + grace_s <= at - started <= 30 + grace_s + LIVENESS_CHECK_S
    # The provider's answer (hang up) is carried out; the trace keeps the error.
    assert s.byes()
    assert any("collect_dtmf" in e for e in rig.trace_errors())
    assert rig.core.ctx.stats["ivr_waits_expired"] == 1


def test_prompt_whose_end_never_comes_is_bounded_by_max_wait(tmp_path: Path) -> None:
    def answer(body: dict[str, Any]) -> dict[str, Any]:
        start = body["event"]["type"] == "session_start"
        return {"type": "prompt", "file": "sounds/welcome.wav"} if start else HANGUP

    s = Session(tmp_path, answer=answer)  # the fake worker never ends a prompt
    rig = s.rig
    rig.answered()
    started = rig.now
    at = rig.advance_until(lambda: len(s.client.kinds) > 1, 1200)
    assert s.client.kinds == ["session_start", "error"]
    watch = rig.settings.sessions
    assert at - started >= (watch.max_wait_ms + watch.wait_grace_ms) / 1000
    # The prompt is given up (stopped) before the provider is asked.
    assert rig.of(m.MediaStop)


# ---------------------------------------------------------------- no silent drops


def test_refused_media_command_ends_the_call_with_a_traced_error(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.refuse_media = lambda msg: isinstance(msg, m.MediaTimer)
    rig.feed(caller_invite(), CALLER)  # answered, and the IVR's reply comes at once
    assert 200 in rig.statuses()
    assert [t.timer_id for t in rig.refused] == [1]
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    # At 2554a5d the refusal was ignored: a session waiting for nothing.
    byes = s.byes()
    assert byes, "the refused MediaTimer left the call up, silent"
    assert "MediaCommandLost" in (byes[0].headers.get("Reason") or "")
    assert any("timer command lost" in e for e in rig.trace_errors()), rig.trace_errors()
    assert rig.core.ctx.stats["ivr_commands_lost"] == 1
    rig.advance(5)
    assert not rig.core.ctx.table.calls and not rig.core.ctx.table.sessions
    assert "end" in [kind for kind, _ in s.client.notified]  # the provider hears


def test_command_for_a_leg_without_media_worker_ends_the_call(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    executor = rig.executors[b"e"]
    executor.answer = lambda event: None  # the provider's first answer is held
    call = rig.answered()
    assert call.a is not None and call.a.media.worker is not None
    rig.core.media.forget(call.a)  # the leg lost its port (what worker expiry does)
    event = executor.received[0]
    rig.reply(b"e", s.execute(event))  # the provider answers: collect_dtmf
    assert not rig.of(m.MediaTimer)
    assert s.byes(), "the TimerCommand was dropped in silence"
    assert any("no media worker" in e for e in rig.trace_errors()), rig.trace_errors()


# ---------------------------------------------------------------- executors


def test_an_event_the_plane_refuses_goes_to_another_executor(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    second = rig.add_executor(b"e2", answer=s.execute)
    first = rig.executors[b"e"]
    first.refuse = True  # the first chosen: its queue is full
    rig.answered()
    assert [type(event.input) for event in first.refused] == [m.SessionStartInput]
    assert not first.received
    assert [event.seq for event in second.received] == [1]
    assert s.client.kinds == ["session_start"] and rig.of(m.MediaTimer)
    assert not s.byes()


def test_session_no_executor_takes_ends_despite_heartbeats(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.executors[b"e"].full = True  # always full: busy == capacity
    rig.heartbeat()
    rig.answered()
    assert s.client.kinds == []  # the session start found no executor
    at = rig.advance_until(s.byes, 120)
    assert s.byes(), "heartbeats of full executors kept the session waiting"
    assert IVR_NO_EXECUTOR_S < at - START <= IVR_NO_EXECUTOR_S + 1
    assert "NoExecutor" in (s.byes()[0].headers.get("Reason") or "")
    assert any("NoExecutor" in e for e in rig.trace_errors())


def test_event_an_executor_keeps_working_on_is_cut_at_max_event(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    executor = rig.executors[b"e"]
    executor.answer = lambda event: None  # takes the event, lists it, never answers
    rig.answered()
    assert executor.working
    at = rig.advance_until(s.byes, 3600)
    assert s.byes(), "an event listed in every heartbeat was waited for forever"
    max_event_s = rig.settings.sessions.max_event_ms / 1000
    assert max_event_s < at - START <= max_event_s + 1
    assert any("IvrTimeout" in e for e in rig.trace_errors())


def test_provider_hears_end_of_a_session_given_up_on_through_another_executor(
        tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.answered()  # e answers session_start: collect_dtmf
    assert s.client.kinds == ["session_start"]
    stuck = rig.executors[b"e"]
    stuck.answer = lambda event: None  # from now on e takes events and never answers
    other = ScriptedClient(collect_then_hangup)
    rig.add_executor(b"e2", answer=lambda event: finished(
        handle_event(event, other, lambda: rig.now)))  # type: ignore[arg-type]
    rig.executors[b"e2"].full = True  # not chosen for the digit: it stays with e
    rig.heartbeat()
    call = next(iter(rig.core.ctx.table.calls.values()))
    assert call.a is not None
    rig.media_event(call.a.media_id, m.DtmfDigit(digit="1", source="rfc4733"))
    assert stuck.working and not other.events
    rig.executors[b"e2"].full = False
    at = rig.advance_until(s.byes, 3600)
    assert s.byes() and "IvrTimeout" in (s.byes()[0].headers.get("Reason") or "")
    assert at - START <= rig.settings.sessions.max_event_ms / 1000 + 1
    # At 0b64d7e the provider never heard of the session again.
    assert ("end", {"reason": "IvrTimeout", "session_id": call.call_id}) in other.notified
    assert not other.events  # no step request: the call is over
    assert rig.core.ctx.stats["ivr_farewells"] == 1
    rig.advance(60)
    assert not rig.core.ctx.table.sessions and not rig.core.ctx.table.calls


def test_no_farewell_before_the_first_answer(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.executors[b"e"].answer = lambda event: None
    other = ScriptedClient(collect_then_hangup)
    rig.add_executor(b"e2", answer=lambda event: finished(
        handle_event(event, other, lambda: rig.now)))  # type: ignore[arg-type]
    rig.executors[b"e2"].full = True
    rig.heartbeat()
    rig.answered()
    rig.executors[b"e2"].full = False
    rig.advance_until(s.byes, 3600)
    assert s.byes()
    assert rig.core.ctx.stats["ivr_farewells"] == 0 and not other.notified


def test_session_ending_without_handing_the_call_over_hangs_up(tmp_path: Path) -> None:
    s = Session(tmp_path)
    rig = s.rig
    rig.executors[b"e"].answer = lambda event: None
    rig.answered()
    session = next(iter(rig.core.ctx.table.sessions.values()))
    assert session.in_flight is not None
    # An executor says the session is over, with no hang-up and no transfer.
    rig.reply(b"e", m.IvrReply(session_id=session.session_id, seq=session.in_flight.seq,
                               state="{}", step_index=0, done=True))
    rig.advance(5)
    assert s.byes(), "the call was left up with no IVR and nobody else"
    assert any("nobody" in e for e in rig.trace_errors()), rig.trace_errors()


# ---------------------------------------------------------------- the state as text


def test_the_state_goes_back_to_the_executor_byte_for_byte(tmp_path: Path) -> None:
    # Protocol 5 (issue 9): the front keeps the executor's state text as it came (no
    # parsing, no re-serialising) and sends it back as it is; of it, it knows only what
    # the reply says (`step_index`, `end_reason`). The call's dict form keeps all three.
    s = Session(tmp_path)
    replies: list[m.IvrReply] = []

    def execute(event: m.IvrEvent) -> m.IvrReply:
        reply = s.execute(event)
        replies.append(reply)
        return reply

    s.rig.executors[b"e"].answer = execute
    call = s.rig.answered()
    assert len(replies) == 1 and not replies[0].done
    written = replies[0].state
    assert isinstance(written, str) and replies[0].step_index >= 1
    session = call.session
    assert session is not None
    assert (session.state, session.step_index, session.end_reason) == (
        written, replies[0].step_index, None)
    # The call's dict form, through JSON and back: the same text and fields.
    again = call_from_dict(json.loads(json.dumps(call.to_dict())),
                           {r.name: r for r in s.rig.settings.routes},
                           s.rig.core.queue.wait_from_dict)
    assert again.session is not None
    assert (again.session.state, again.session.step_index, again.session.end_reason) == (
        written, replies[0].step_index, None)
    assert again.to_dict() == call.to_dict()
    # The caller hangs up: the event carries the text unchanged, the executor reads it.
    s.rig.caller_request("BYE", 2)
    hangup = s.rig.ivr[-1]
    assert isinstance(hangup.input, m.CallEndedInput)
    assert hangup.state == written
    assert m.encode(hangup).count(orjson.dumps(written)) == 1  # as one JSON string
    assert replies[-1].done and replies[-1].end_reason is not None
    assert replies[-1].step_index == orjson.loads(replies[-1].state)["step_index"]


def test_front_traces_number_on_from_the_replys_step_index(tmp_path: Path) -> None:
    # The front's own trace (here: a session that ends without handing the call over)
    # follows the step index the executor's reply gave, not one read from the state.
    s = Session(tmp_path)
    rig = s.rig
    rig.executors[b"e"].answer = lambda event: None
    rig.answered()
    session = next(iter(rig.core.ctx.table.sessions.values()))
    assert session.in_flight is not None
    rig.reply(b"e", m.IvrReply(session_id=session.session_id, seq=session.in_flight.seq,
                               state='{"step_index": 1}', step_index=41, done=True))
    rig.advance(5)
    steps = rig.core.ctx.traces.get(session.session_id) or []
    front = [t for t in steps if t.get("trigger") == "front"]
    assert [t["step_index"] for t in front] == [42], steps
