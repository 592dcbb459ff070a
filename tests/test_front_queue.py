"""The front's queue, agent, recording and WebSocket-bridge handling, without sockets.

The Front runs on a real event loop with fakes around it: SIP messages are fed to
`message_received` and what it sends is parsed back; a fake media worker
(`tests.fake_media_worker`) announces its ports and answers MediaAllocate; a fake executor answers the session's events with scripted commands.
Queue timings are short (hundreds of ms) so the tests run on the loop's real clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.config import parse_config
from pbx.front import Front
from pbx.queue_calls import HOLD_PLAY_ID
from pbx.sip.message import SipRequest, SipResponse, make_response, parse_message
from tests.fake_media_worker import FakeMediaWorker

CALLER = ("127.0.0.1", 5999)
MEMBERS = {"2001": ("127.0.0.1", 6001), "2002": ("127.0.0.1", 6002),
           "2003": ("127.0.0.1", 6003)}
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\n")

CONFIG = """
[sip]
listen = "127.0.0.1:5060"

[logging]
dir = "{logs}"

{users}

[[routes]]
name = "main"
to_user = "*99"
app = "ivr"
app_params = {{ mode = "step", url = "http://127.0.0.1:1/ivr" }}

[queues.sales]
members = ["2001", "2002"]
strategy = "ring_all"
hold_music = "sounds/hold.wav"
timeout_ms = 600

[queues.support]
members = ["2001", "2002", "2003"]
strategy = "round_robin"
timeout_ms = 900
member_ring_ms = 200

[skill_groups.billing]
members = ["2002", "2003"]
member_ring_ms = 200
timeout_ms = 600
"""

Script = Callable[[m.IvrEvent], list[Any]]


def caller_invite() -> bytes:
    """CALLER's INVITE to *99 (an unknown caller: From 1001 at its own address)."""
    return (
        "INVITE sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-1\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        "To: <sip:*99@127.0.0.1:5060>\r\nCall-ID: caller-call@127.0.0.1\r\n"
        "CSeq: 1 INVITE\r\nContact: <sip:1001@127.0.0.1:5999>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP


class Rig:
    """`extra`: more config (TOML tables) after the test's own."""

    def __init__(self, tmp: Path, script: Script, extra: str = "") -> None:
        users = "\n".join(f'[users."{u}"]\ncontact = "sip:{u}@{h}:{p}"'
                          for u, (h, p) in MEMBERS.items())
        self.settings = parse_config(CONFIG.format(logs=tmp / "logs", users=users) + extra)
        self.sip: list[tuple[Any, tuple[str, int]]] = []
        self.media: list[Any] = []
        self.events: list[dict[str, Any]] = []
        self.ivr_events: list[m.IvrEvent] = []
        self.script = script
        self.front = Front(self.settings, self._send_sip, self._send_media, self._send_ivr,
                           self.events.append)
        self.worker = FakeMediaWorker(self.front)
        self.worker.join()
        self.front.on_ivr_message(b"e", m.IvrReady(executor_id="e", capacity=10))

    # fakes -------------------------------------------------------------

    def _send_sip(self, data: bytes, addr: tuple[str, int], reliable: bool = False) -> None:
        self.sip.append((parse_message(data), addr))

    def _send_media(self, worker: bytes, msg: Any) -> bool:
        self.media.append(msg)
        self.worker.answer_soon(msg)
        return True

    def _send_ivr(self, executor: bytes, event: m.IvrEvent) -> bool:
        self.ivr_events.append(event)
        commands = self.script(event)
        done = any(isinstance(c, m.QueueCommand | m.AgentCommand | m.WsBridgeCommand
                              | m.HangupCommand) for c in commands)
        reply = m.IvrReply(session_id=event.session_id, seq=event.seq, state={"s": 1},
                           commands=commands, done=done)
        asyncio.get_running_loop().call_soon(self.front.on_ivr_message, b"e", reply)
        return True

    # helpers -----------------------------------------------------------

    def call(self) -> None:
        self.front.message_received(caller_invite(), CALLER)

    def feed(self, msg: SipRequest | SipResponse, addr: tuple[str, int]) -> None:
        self.front.message_received(msg.serialize(), addr)

    def requests(self, method: str, addr: tuple[str, int] | None = None) -> list[SipRequest]:
        return [msg for msg, to in self.sip if isinstance(msg, SipRequest)
                and msg.method == method and (addr is None or to == addr)]

    def responses(self, addr: tuple[str, int]) -> list[SipResponse]:
        return [msg for msg, to in self.sip if isinstance(msg, SipResponse) and to == addr]

    def answer(self, invite: SipRequest, addr: tuple[str, int], tag: str) -> None:
        user = invite.uri.split(":")[1].split("@")[0]
        self.feed(make_response(invite, 180, to_tag=tag), addr)
        self.feed(make_response(invite, 200, to_tag=tag, body=SDP, headers=[
            ("Contact", f"<sip:{user}@{addr[0]}:{addr[1]}>"),
            ("Content-Type", "application/sdp")]), addr)

    def ack_caller(self) -> None:
        ok = [r for r in self.responses(CALLER) if r.status == 200]
        assert ok, "the caller was not answered"
        ack = (
            "ACK sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-ack\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            f"To: {ok[0].headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
            "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()
        self.front.message_received(ack, CALLER)

    def caller_bye(self) -> None:
        ok = [r for r in self.responses(CALLER) if r.status == 200][0]
        bye = (
            "BYE sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-bye\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
            "CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n").encode()
        self.front.message_received(bye, CALLER)

    def of(self, kind: type) -> list[Any]:
        return [msg for msg in self.media if isinstance(msg, kind)]


async def until(predicate: Callable[[], Any], timeout: float = 2.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def first_then(commands: list[Any], later: Script | None = None) -> Script:
    """Answer the session start with `commands`; anything else per `later` (or nothing)."""

    def script(event: m.IvrEvent) -> list[Any]:
        first_session = "-" not in event.session_id  # a return from a queue is "<id>-2"
        if isinstance(event.input, m.SessionStartInput) and first_session:
            return commands
        return later(event) if later else []

    return script


def records(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "logs" / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- queue


def test_ring_all_first_answer_wins_others_cancelled_then_record(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="sales")]))
        rig.call()
        invites = await until(lambda: len(rig.requests("INVITE")) == 2 and rig.requests("INVITE"))
        rig.ack_caller()
        hold = rig.of(m.MediaPlay)
        assert hold and hold[-1].loop and hold[-1].file == "sounds/hold.wav"
        assert hold[-1].play_id == HOLD_PLAY_ID
        by_addr = {to: msg for msg, to in rig.sip
                   if isinstance(msg, SipRequest) and msg.method == "INVITE"}
        assert set(by_addr) == {MEMBERS["2001"], MEMBERS["2002"]}
        assert invites
        # 2002 rings; 2001 answers: 2002 gets a CANCEL, the caller is bridged to 2001.
        rig.feed(make_response(by_addr[MEMBERS["2002"]], 180, to_tag="m2"), MEMBERS["2002"])
        rig.answer(by_addr[MEMBERS["2001"]], MEMBERS["2001"], "m1")
        bridge = await until(lambda: rig.of(m.MediaBridge))
        assert rig.requests("CANCEL", MEMBERS["2002"])
        assert rig.requests("ACK", MEMBERS["2001"])
        assert isinstance(rig.media[rig.media.index(bridge[0]) - 1], m.MediaStop)
        call = next(iter(rig.front.calls.values()))
        assert call.b is not None and call.b.member == "2001" and call.ringing == []
        assert rig.front.queue_calls.books[("queue", "sales")].busy == {"2001"}
        # The caller hangs up: BYE to the member, a record with the queue and RTP stats.
        rig.caller_bye()
        assert rig.requests("BYE", MEMBERS["2001"])
        await until(lambda: records(tmp_path))
        rec = records(tmp_path)[0]
        assert rec["queue"] == "sales" and rec["queue_member"] == "2001"
        assert rec["outcome"] == "bridged" and rec["end_reason"] == "Hangup"
        assert rec["rtp"]["a"]["packets_sent"] == 10 and rec["rtp_complete"]
        assert rec["rtp"]["a"]["packets_received"] == 9
        assert rec["codec"] == "PCMU" and rec["peer_codec"] == "PCMU"
        assert rig.front.queue_calls.books[("queue", "sales")].busy == set()
        ended = [e for e in rig.events if e.get("event") == "ended"]
        assert ended and ended[0]["queue"] == "sales"

    asyncio.run(main())


def test_second_member_answering_late_gets_a_bye(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="sales")]))
        rig.call()
        await until(lambda: len(rig.requests("INVITE")) == 2)
        rig.ack_caller()
        by_addr = {to: msg for msg, to in rig.sip
                   if isinstance(msg, SipRequest) and msg.method == "INVITE"}
        rig.answer(by_addr[MEMBERS["2001"]], MEMBERS["2001"], "m1")
        rig.answer(by_addr[MEMBERS["2002"]], MEMBERS["2002"], "m2")  # too late
        await until(lambda: rig.requests("BYE", MEMBERS["2002"]))
        assert len(rig.of(m.MediaBridge)) == 1
        assert not rig.requests("BYE", MEMBERS["2001"])

    asyncio.run(main())


def test_nobody_answers_with_return_to_ivr_starts_a_new_session(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="sales", return_to_ivr=True)]))
        rig.call()
        await until(lambda: len(rig.requests("INVITE")) == 2)
        rig.ack_caller()
        for msg, to in list(rig.sip):
            if isinstance(msg, SipRequest) and msg.method == "INVITE":
                rig.feed(make_response(msg, 180, to_tag=f"t{to[1]}"), to)
        starts = await until(lambda: [e for e in rig.ivr_events
                                      if isinstance(e.input, m.SessionStartInput)
                                      and len(rig.ivr_events) > 1], timeout=3.0)
        second = starts[-1]
        assert second.state is None
        assert second.session_id.endswith("-2")
        assert second.input.call.variables == {"transferred_from": "queue",
                                               "return_reason": "no_answer",
                                               "caller_trust": "anonymous"}
        assert len(rig.requests("CANCEL")) == 2
        hold = [i for i, msg in enumerate(rig.media)
                if isinstance(msg, m.MediaPlay) and msg.play_id == HOLD_PLAY_ID]
        assert any(isinstance(msg, m.MediaStop) for msg in rig.media[hold[0]:])
        call = next(iter(rig.front.calls.values()))
        assert call.session_ids == [call.call_id, second.session_id]
        assert call.queue_run is None and not call.ended

    asyncio.run(main())


def test_nobody_answers_without_return_hangs_up(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="sales")]))
        rig.call()
        await until(lambda: len(rig.requests("INVITE")) == 2)
        rig.ack_caller()
        await until(lambda: rig.requests("BYE", CALLER), timeout=3.0)
        await until(lambda: records(tmp_path))
        rec = records(tmp_path)[0]
        assert rec["end_reason"] == "QueueNoAnswer" and rec["outcome"] == "no_answer"
        assert rig.front.calls == {}

    asyncio.run(main())


def test_unknown_queue_hangs_up(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="nope")]))
        rig.call()
        await until(lambda: rig.front.calls == {} or None)
        assert not rig.requests("INVITE")
        await until(lambda: records(tmp_path))
        assert records(tmp_path)[0]["end_reason"] == "UnknownQueue(nope)"

    asyncio.run(main())


def test_caller_hanging_up_cancels_every_member(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="sales")]))
        rig.call()
        await until(lambda: len(rig.requests("INVITE")) == 2)
        rig.ack_caller()
        for msg, to in list(rig.sip):
            if isinstance(msg, SipRequest) and msg.method == "INVITE":
                rig.feed(make_response(msg, 180, to_tag=f"t{to[1]}"), to)
        rig.caller_bye()
        assert {to for msg, to in rig.sip
                if isinstance(msg, SipRequest) and msg.method == "CANCEL"} == {
                    MEMBERS["2001"], MEMBERS["2002"]}
        await until(lambda: records(tmp_path))
        assert records(tmp_path)[0]["outcome"] == "completed"
        assert rig.front.legs_by_media == {}

    asyncio.run(main())


def test_round_robin_rings_one_member_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.QueueCommand(target="support")]))
        rig.call()
        await until(lambda: rig.requests("INVITE"))
        rig.ack_caller()
        first = rig.requests("INVITE")
        assert len(first) == 1 and first[0].uri.startswith("sip:2001@")
        # 2001 is busy: 2002 at once.
        rig.feed(make_response(first[0], 486, to_tag="x"), MEMBERS["2001"])
        await until(lambda: len(rig.requests("INVITE")) == 2)
        second = rig.requests("INVITE")[1]
        assert second.uri.startswith("sip:2002@")
        rig.feed(make_response(second, 180, to_tag="y"), MEMBERS["2002"])
        # 2002's turn (200 ms) ends: CANCEL, then 2003.
        await until(lambda: len(rig.requests("INVITE")) == 3)
        assert rig.requests("CANCEL", MEMBERS["2002"])
        assert rig.requests("INVITE")[2].uri.startswith("sip:2003@")

    asyncio.run(main())


# ---------------------------------------------------------------- agent


def test_agent_without_answer_falls_back_to_the_skill_group(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.AgentCommand(target="2001",
                                                       skill_group_id="billing")]))
        rig.call()
        await until(lambda: rig.requests("INVITE"))
        rig.ack_caller()
        assert rig.requests("INVITE")[0].uri.startswith("sip:2001@")
        rig.feed(make_response(rig.requests("INVITE")[0], 480, to_tag="a"), MEMBERS["2001"])
        await until(lambda: len(rig.requests("INVITE")) == 3)
        group = {to for msg, to in rig.sip
                 if isinstance(msg, SipRequest) and msg.method == "INVITE"}
        assert group == {MEMBERS["2001"], MEMBERS["2002"], MEMBERS["2003"]}
        invite = [msg for msg, to in rig.sip if isinstance(msg, SipRequest)
                  and msg.method == "INVITE" and to == MEMBERS["2003"]][0]
        rig.answer(invite, MEMBERS["2003"], "g3")
        await until(lambda: rig.of(m.MediaBridge))
        # 2002 has not sent a 1xx yet: its CANCEL waits for one (RFC 3261 §9.1).
        assert not rig.requests("CANCEL", MEMBERS["2002"])
        rig.feed(make_response(rig.requests("INVITE", MEMBERS["2002"])[0], 180, to_tag="g2"),
                 MEMBERS["2002"])
        assert rig.requests("CANCEL", MEMBERS["2002"])
        call = next(iter(rig.front.calls.values()))
        assert call.agent == "2001" and call.queue_member == "2003"

    asyncio.run(main())


def test_agent_without_skill_group_is_a_transfer(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.AgentCommand(target="2002")]))
        rig.call()
        invite = await until(lambda: rig.requests("INVITE"))
        rig.ack_caller()
        rig.answer(invite[0], MEMBERS["2002"], "a2")
        await until(lambda: rig.of(m.MediaBridge))
        call = next(iter(rig.front.calls.values()))
        assert call.transfer_target == "2002" and call.agent == "2002"

    asyncio.run(main())


# ---------------------------------------------------------------- recording, ws bridge


def test_record_commands_and_recording_in_the_call_record(tmp_path: Path) -> None:
    record = m.RecordCommand(record_id=7, path="abc/20240101_000000.wav", max_duration_ms=5000,
                             stereo=True, beep=True)

    def later(event: m.IvrEvent) -> list[Any]:
        if isinstance(event.input, m.MediaInput):
            assert isinstance(event.input.event, m.RecordingFinished)
            return [m.StopRecordCommand(), m.HangupCommand()]
        return []

    async def main() -> None:
        rig = Rig(tmp_path, first_then([record], later))
        rig.call()
        sent = await until(lambda: rig.of(m.MediaRecord))
        assert sent[0].record_id == 7 and sent[0].stereo and sent[0].beep
        assert sent[0].max_duration_ms == 5000 and sent[0].path == record.path
        a_id = sent[0].call_id
        rig.ack_caller()
        rig.front.on_media_message(b"w", m.MediaEvent(call_id=a_id, event=m.RecordingFinished(
            record_id=7, path=record.path, duration_ms=1234, reason="dtmf")))
        await until(lambda: rig.of(m.MediaRecordStop))
        await until(lambda: records(tmp_path))
        rec = records(tmp_path)[0]
        assert rec["recordings"] == [{
            "record_id": 7, "path": record.path, "area": "recordings",
            "file": str(Path("recordings") / record.path), "duration_ms": 1234,
            "reason": "dtmf"}]

    asyncio.run(main())


def test_ws_bridge_then_its_end_hangs_up(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.WsBridgeCommand(
            uri="ws://127.0.0.1:9/room", headers={"X-Room": "1"}, timeout_ms=1500)]))
        rig.call()
        sent = await until(lambda: rig.of(m.MediaWsBridge))
        assert sent[0].uri == "ws://127.0.0.1:9/room" and sent[0].headers == {"X-Room": "1"}
        assert sent[0].timeout_ms == 1500
        rig.ack_caller()
        await asyncio.sleep(0.01)
        assert not rig.requests("BYE", CALLER)
        rig.front.on_media_message(b"w", m.MediaEvent(
            call_id=sent[0].call_id, event=m.WsBridgeEnded(reason="closed by peer")))
        assert rig.requests("BYE", CALLER)
        await until(lambda: records(tmp_path))
        rec = records(tmp_path)[0]
        assert rec["ws_bridge"] == "ws://127.0.0.1:9/room"
        assert rec["end_reason"] == "WsBridgeEnded"

    asyncio.run(main())


def test_traces_are_stored_logged_and_given_to_listeners(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.HangupCommand()]))
        seen: list[dict[str, Any]] = []
        rig.front.listeners.append(seen.append)
        trace = m.StepTrace(call_id="c", session_id="s1", step_index=0, trigger="start",
                            step_id="x", step_name="y", extra={"k": 1}, at=1.0)
        rig.front._record_trace(trace)
        assert rig.front.traces.get("s1") == [trace.model_dump(mode="json")]
        assert seen[0]["type"] == "ivr_step_trace" and seen[0]["step_id"] == "x"
        assert rig.events[0] == seen[0]
        lines = (tmp_path / "logs" / "traces.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["extra"] == {"k": 1}

    asyncio.run(main())
