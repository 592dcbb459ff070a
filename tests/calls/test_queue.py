"""Queue, agent, recording and WebSocket-bridge calls on the core's virtual clock.

Each test drives `pbx.calls.CallCore` through `CoreRig`: the caller's and members' SIP
goes in as bytes, the fake media worker and executor answer at once, and queue
deadlines fire when `advance` reaches them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.calls.queue import HOLD_PLAY_ID
from pbx.sip.message import SipRequest, make_response
from tests.calls.rig import CALLER, MEMBERS, CoreRig, caller_invite, first_then

SALES_TIMEOUT_S = 0.6  # [queues.sales] timeout_ms in the rig's config
MEMBER_RING_S = 0.2  # [queues.support] and [skill_groups.billing] member_ring_ms


def invites_by_addr(rig: CoreRig) -> dict[tuple[str, int], SipRequest]:
    return {to: msg for msg, to in rig.sip
            if isinstance(msg, SipRequest) and msg.method == "INVITE"}


def ring_every_member(rig: CoreRig) -> None:
    for to, invite in invites_by_addr(rig).items():
        rig.feed(make_response(invite, 180, to_tag=f"t{to[1]}"), to)


# ---------------------------------------------------------------- queue


def test_ring_all_first_answer_wins_others_cancelled_then_record(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    call = rig.call()
    assert len(rig.requests("INVITE")) == 2
    rig.caller_request("ACK", 1)
    hold = rig.of(m.MediaPlay)
    assert hold and hold[-1].loop and hold[-1].file == "sounds/hold.wav"
    assert hold[-1].play_id == HOLD_PLAY_ID
    by_addr = invites_by_addr(rig)
    assert set(by_addr) == {MEMBERS["2001"], MEMBERS["2002"]}
    # 2002 rings; 2001 answers: 2002 gets a CANCEL, the caller is bridged to 2001.
    rig.feed(make_response(by_addr[MEMBERS["2002"]], 180, to_tag="m2"), MEMBERS["2002"])
    rig.answer(by_addr[MEMBERS["2001"]], MEMBERS["2001"], "m1")
    bridge = rig.of(m.MediaBridge)
    assert bridge
    assert rig.requests("CANCEL", MEMBERS["2002"])
    assert rig.requests("ACK", MEMBERS["2001"])
    assert isinstance(rig.media[rig.media.index(bridge[0]) - 1], m.MediaStop)
    assert call.b is not None and call.b.member == "2001" and call.ringing == []
    assert rig.core.queue.books[("queue", "sales")].busy == {"2001"}
    # The caller hangs up: BYE to the member, a record with the queue and RTP stats.
    rig.caller_request("BYE", 2)
    assert rig.requests("BYE", MEMBERS["2001"])
    rec = rig.records()[0]
    assert rec["queue"] == "sales" and rec["queue_member"] == "2001"
    assert rec["outcome"] == "bridged" and rec["end_reason"] == "Hangup"
    assert rec["rtp"]["a"]["packets_sent"] == 10 and rec["rtp_complete"]
    assert rec["rtp"]["a"]["packets_received"] == 9
    assert rec["codec"] == "PCMU" and rec["peer_codec"] == "PCMU"
    assert rig.core.queue.books[("queue", "sales")].busy == set()
    ended = [e for e in rig.events if e.get("event") == "ended"]
    assert ended and ended[0]["queue"] == "sales"


def test_second_member_answering_late_gets_a_bye(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    rig.answered()
    by_addr = invites_by_addr(rig)
    assert len(by_addr) == 2
    rig.answer(by_addr[MEMBERS["2001"]], MEMBERS["2001"], "m1")
    rig.answer(by_addr[MEMBERS["2002"]], MEMBERS["2002"], "m2")  # too late
    assert rig.requests("BYE", MEMBERS["2002"])
    assert len(rig.of(m.MediaBridge)) == 1
    assert not rig.requests("BYE", MEMBERS["2001"])


def test_nobody_answers_with_return_to_ivr_starts_a_new_session(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales", return_to_ivr=True)]))
    call = rig.answered()
    assert len(rig.requests("INVITE")) == 2
    ring_every_member(rig)

    def starts() -> list[m.IvrEvent]:
        return [e for e in rig.ivr if isinstance(e.input, m.SessionStartInput)]

    rig.advance(SALES_TIMEOUT_S - 0.01)
    assert len(starts()) == 1  # the queue still waits
    rig.advance(0.02)
    assert len(starts()) == 2
    second = starts()[-1]
    assert second.state is None
    assert second.session_id.endswith("-2")
    assert isinstance(second.input, m.SessionStartInput)
    assert second.input.call.variables == {"transferred_from": "queue",
                                           "return_reason": "no_answer",
                                           "caller_trust": "anonymous"}
    assert len(rig.requests("CANCEL")) == 2
    hold = [i for i, msg in enumerate(rig.media)
            if isinstance(msg, m.MediaPlay) and msg.play_id == HOLD_PLAY_ID]
    assert any(isinstance(msg, m.MediaStop) for msg in rig.media[hold[0]:])
    assert call.session_ids == [call.call_id, second.session_id]
    assert call.queue_run is None and not call.ended


def test_nobody_answers_without_return_hangs_up(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    rig.answered()
    assert len(rig.requests("INVITE")) == 2
    rig.advance(SALES_TIMEOUT_S - 0.01)
    assert not rig.requests("BYE", CALLER)
    rig.advance(0.02)
    assert rig.requests("BYE", CALLER)
    rec = rig.records()[0]
    assert rec["end_reason"] == "QueueNoAnswer" and rec["outcome"] == "no_answer"
    assert rig.core.ctx.table.calls == {}


def test_unknown_queue_hangs_up(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="nope")]))
    rig.feed(caller_invite(), CALLER)
    assert 200 in rig.statuses()  # the IVR answered, then asked for the queue
    assert rig.core.ctx.table.calls == {}
    assert not rig.requests("INVITE")
    assert rig.records()[0]["end_reason"] == "UnknownQueue(nope)"


def test_caller_hanging_up_cancels_every_member(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    rig.answered()
    assert len(rig.requests("INVITE")) == 2
    ring_every_member(rig)
    rig.caller_request("BYE", 2)
    assert {to for msg, to in rig.sip
            if isinstance(msg, SipRequest) and msg.method == "CANCEL"} == {
                MEMBERS["2001"], MEMBERS["2002"]}
    assert rig.records()[0]["outcome"] == "completed"
    assert rig.core.ctx.table.legs_by_media == {}


def test_round_robin_rings_one_member_at_a_time(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="support")]))
    rig.answered()
    first = rig.requests("INVITE")
    assert len(first) == 1 and first[0].uri.startswith("sip:2001@")
    # 2001 is busy: 2002 at once.
    rig.feed(make_response(first[0], 486, to_tag="x"), MEMBERS["2001"])
    assert len(rig.requests("INVITE")) == 2
    second = rig.requests("INVITE")[1]
    assert second.uri.startswith("sip:2002@")
    rig.feed(make_response(second, 180, to_tag="y"), MEMBERS["2002"])
    # 2002's turn (200 ms) ends: CANCEL, then 2003.
    rig.advance(MEMBER_RING_S - 0.01)
    assert len(rig.requests("INVITE")) == 2 and not rig.requests("CANCEL")
    rig.advance(0.02)
    assert len(rig.requests("INVITE")) == 3
    assert rig.requests("CANCEL", MEMBERS["2002"])
    assert rig.requests("INVITE")[2].uri.startswith("sip:2003@")


# ---------------------------------------------------------------- agent


def test_agent_without_answer_falls_back_to_the_skill_group(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.AgentCommand(target="2001",
                                                       skill_group_id="billing")]))
    call = rig.answered()
    assert len(rig.requests("INVITE")) == 1
    assert rig.requests("INVITE")[0].uri.startswith("sip:2001@")
    rig.feed(make_response(rig.requests("INVITE")[0], 480, to_tag="a"), MEMBERS["2001"])
    assert len(rig.requests("INVITE")) == 3
    assert set(invites_by_addr(rig)) == {MEMBERS["2001"], MEMBERS["2002"], MEMBERS["2003"]}
    rig.answer(invites_by_addr(rig)[MEMBERS["2003"]], MEMBERS["2003"], "g3")
    assert rig.of(m.MediaBridge)
    # 2002 has not sent a 1xx yet: its CANCEL waits for one (RFC 3261 §9.1).
    assert not rig.requests("CANCEL", MEMBERS["2002"])
    rig.feed(make_response(rig.requests("INVITE", MEMBERS["2002"])[0], 180, to_tag="g2"),
             MEMBERS["2002"])
    assert rig.requests("CANCEL", MEMBERS["2002"])
    assert call.agent == "2001" and call.queue_member == "2003"


def test_agent_without_skill_group_is_a_transfer(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.AgentCommand(target="2002")]))
    call = rig.answered()
    invite = rig.requests("INVITE")
    assert invite
    rig.answer(invite[0], MEMBERS["2002"], "a2")
    assert rig.of(m.MediaBridge)
    assert call.transfer_target == "2002" and call.agent == "2002"


# ---------------------------------------------------------------- recording, ws bridge


def test_record_commands_and_recording_in_the_call_record(tmp_path: Path) -> None:
    record = m.RecordCommand(record_id=7, path="abc/20240101_000000.wav", max_duration_ms=5000,
                             stereo=True, beep=True)

    def later(event: m.IvrEvent) -> list[Any]:
        if isinstance(event.input, m.MediaInput):
            assert isinstance(event.input.event, m.RecordingFinished)
            return [m.StopRecordCommand(), m.HangupCommand()]
        return []

    rig = CoreRig(tmp_path, first_then([record], later))
    rig.call()
    sent = rig.of(m.MediaRecord)
    assert sent and sent[0].record_id == 7 and sent[0].stereo and sent[0].beep
    assert sent[0].max_duration_ms == 5000 and sent[0].path == record.path
    a_id = sent[0].call_id
    rig.caller_request("ACK", 1)
    rig.media_event(a_id, m.RecordingFinished(record_id=7, path=record.path,
                                              duration_ms=1234, reason="dtmf"))
    assert rig.of(m.MediaRecordStop)
    rec = rig.records()[0]
    assert rec["recordings"] == [{
        "record_id": 7, "path": record.path, "area": "recordings",
        "file": str(Path("recordings") / record.path), "duration_ms": 1234,
        "reason": "dtmf"}]


def test_ws_bridge_then_its_end_hangs_up(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.WsBridgeCommand(
        uri="ws://127.0.0.1:9/room", headers={"X-Room": "1"}, timeout_ms=1500)]))
    rig.call()
    sent = rig.of(m.MediaWsBridge)
    assert sent and sent[0].uri == "ws://127.0.0.1:9/room"
    assert sent[0].headers == {"X-Room": "1"} and sent[0].timeout_ms == 1500
    rig.caller_request("ACK", 1)
    rig.advance(10)  # the bridge holds the call for as long as it lasts
    assert not rig.requests("BYE", CALLER)
    rig.media_event(sent[0].call_id, m.WsBridgeEnded(reason="closed by peer"))
    assert rig.requests("BYE", CALLER)
    rec = rig.records()[0]
    assert rec["ws_bridge"] == "ws://127.0.0.1:9/room"
    assert rec["end_reason"] == "WsBridgeEnded"


def test_a_failed_hand_over_is_in_the_sessions_traces(tmp_path: Path) -> None:
    """The provider heard `/end` name the queue; that the queue does not exist shows in
    the session's traces (and the call record), not only in the log."""
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="nope")]))
    rig.feed(caller_invite(), CALLER)
    assert rig.records()[0]["end_reason"] == "UnknownQueue(nope)"
    assert any("failed: UnknownQueue(nope)" in e for e in rig.trace_errors()), \
        rig.trace_errors()
    traces = rig.core.ctx.traces
    (session_id,) = list(traces.sessions)
    last = (traces.get(session_id) or [])[-1]
    assert last["end_reason"] == "UnknownQueue(nope)"


def test_a_queue_nobody_answers_is_in_the_sessions_traces(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    rig.answered()
    rig.advance(SALES_TIMEOUT_S + 0.02)
    assert rig.records()[0]["end_reason"] == "QueueNoAnswer"
    assert any("failed: QueueNoAnswer" in e for e in rig.trace_errors()), rig.trace_errors()


def test_agent_routing_hints_ride_in_the_agents_invites(tmp_path: Path) -> None:
    """route_to_agent's key_id and channel_code (accepted and ignored before) reach
    every INVITE of the agent and its skill group; a value that could inject a header
    is not sent."""
    command = m.AgentCommand(target="2001", skill_group_id="billing", key_id="K-17",
                             channel_code="wechat")
    rig = CoreRig(tmp_path, first_then([command]))
    rig.answered()
    first = rig.requests("INVITE")[0]
    assert first.headers.get("X-Key-Id") == "K-17"
    assert first.headers.get("X-Channel-Code") == "wechat"
    rig.feed(make_response(first, 480, to_tag="a"), MEMBERS["2001"])
    group = rig.requests("INVITE")[1:]
    assert len(group) == 2
    assert all(i.headers.get("X-Key-Id") == "K-17" for i in group)


def test_agent_routing_hint_with_a_line_break_is_not_sent(tmp_path: Path) -> None:
    command = m.AgentCommand(target="2002", key_id="K1\r\nX-Evil: 1", channel_code="ok")
    rig = CoreRig(tmp_path, first_then([command]))
    rig.answered()
    invite = rig.requests("INVITE")[0]
    assert invite.headers.get("X-Key-Id") is None
    assert invite.headers.get("X-Evil") is None
    assert invite.headers.get("X-Channel-Code") == "ok"


def test_a_member_on_two_queue_calls_stays_busy_until_both_end(tmp_path: Path) -> None:
    """2001 (a phone with two lines) answers two callers of `sales`: the first caller's
    end freed it while it was still on the second call, and the next caller rang it."""
    def nth_caller(n: int) -> bytes:
        return (caller_invite(branch="1").replace(b"caller-call@", f"caller{n}-call@".encode())
                .replace(b"tag=caller", f"tag=caller{n}".encode())
                .replace(b"z9hG4bK-caller-1", f"z9hG4bK-caller{n}-1".encode()))

    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    first, second = rig.call(), rig.call(nth_caller(2))
    book = rig.core.queue.books[("queue", "sales")]
    ringing = rig.requests("INVITE", MEMBERS["2001"])
    assert len(ringing) == 2  # rung for both callers
    rig.answer(ringing[0], MEMBERS["2001"], "x1")
    rig.answer(ringing[1], MEMBERS["2001"], "x2")
    assert first.b is not None and second.b is not None
    rig.core.teardown.hangup(first, "Hangup", None)
    rig.pump()
    assert not second.ended and set(book.busy) == {"2001"}
    rig.call(nth_caller(3))
    assert len(rig.requests("INVITE", MEMBERS["2001"])) == 2  # not rung for the third
    rig.core.teardown.hangup(second, "Hangup", None)
    rig.pump()
    assert set(book.busy) == set()
