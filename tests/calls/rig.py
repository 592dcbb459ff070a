"""A rig around `pbx.calls.CallCore` on a virtual clock: no sockets, no event loop.

SIP messages go in as bytes with the rig's `now`; the core's commands are carried out
by fakes: a media worker that allocates ports (unless `auto_allocate` is off), an
executor that answers each IVR event with what `script` says. `advance(seconds)` moves
the clock through every deadline the core reports, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.calls.context import Publish, Resolve, ToIvr, ToMedia
from pbx.calls.core import CallCore
from pbx.calls.state import Call
from pbx.config import parse_config
from pbx.jsonl import JsonLinesLog
from pbx.records import CallRecords
from pbx.sip.message import SipRequest, SipResponse, make_response, parse_message
from pbx.sip.transaction import SendBytes
from pbx.traces import TraceStore
from tests.test_front_queue import CALLER, CONFIG, MEMBERS, SDP, caller_invite

Script = Callable[[m.IvrEvent], list[Any]]
START = 1_000.0
WALL_OFFSET = 1.7e9


class CoreRig:
    def __init__(self, tmp: Path, script: Script | None = None, extra: str = "") -> None:
        users = "\n".join(f'[users."{u}"]\ncontact = "sip:{u}@{h}:{p}"'
                          for u, (h, p) in MEMBERS.items())
        self.settings = parse_config(CONFIG.format(logs=tmp / "logs", users=users) + extra)
        self.now = START
        self.core = CallCore(
            self.settings, records=CallRecords(JsonLinesLog(tmp / "calls.jsonl")),
            traces=TraceStore(), now=self.now, wall_offset=WALL_OFFSET)
        self.sip: list[tuple[SipRequest | SipResponse, tuple[str, int]]] = []
        self.media: list[Any] = []
        self.ivr: list[m.IvrEvent] = []
        self.events: list[dict[str, Any]] = []
        self.resolves: list[Resolve] = []
        self.script = script or (lambda event: [])
        self.auto_allocate = True
        self.alive = True  # the worker and executor heartbeat
        self.last_beat = self.now
        self.port = 30_000
        self.core.media_message(b"w", m.MediaReady(worker_id="w", capacity=100,
                                                   rtp_ip="127.0.0.1"), self.now)
        self.core.ivr_message(b"e", m.IvrReady(executor_id="e", capacity=10), self.now)
        self.pump()

    # ---------------------------------------------------------------- the shell's part

    def pump(self) -> None:
        while out := self.core.drain():
            for command in out:
                self._execute(command)

    def _execute(self, command: Any) -> None:
        if isinstance(command, SendBytes):
            self.sip.append((parse_message(command.data), command.addr))
        elif isinstance(command, ToMedia):
            msg = command.msg
            self.media.append(msg)
            if isinstance(msg, m.MediaAllocate) and self.auto_allocate:
                self.port += 2
                self.core.media_message(b"w", m.MediaAllocated(
                    call_id=msg.call_id, rtp_ip="127.0.0.1", rtp_port=self.port), self.now)
            elif isinstance(msg, m.MediaRelease):
                self.core.media_message(b"w", m.MediaReleased(
                    call_id=msg.call_id, packets_sent=1, packets_received=1), self.now)
        elif isinstance(command, ToIvr):
            event = command.event
            self.ivr.append(event)
            commands = self.script(event)
            done = any(isinstance(c, m.QueueCommand | m.AgentCommand | m.WsBridgeCommand
                                  | m.HangupCommand | m.TransferCommand) for c in commands)
            self.core.ivr_message(b"e", m.IvrReply(
                session_id=event.session_id, seq=event.seq, state={"step_index": event.seq},
                commands=commands, done=done), self.now)
        elif isinstance(command, Publish):
            self.events.append(command.event)
        elif isinstance(command, Resolve):
            self.resolves.append(command)

    def heartbeat(self) -> None:
        """What the live worker and executor send every `heartbeat_ms`."""
        self.core.media_message(b"w", m.MediaHeartbeat(
            worker_id="w", calls=len(self.core.ctx.table.legs_by_media), capacity=100,
            rtp_ip="127.0.0.1"), self.now)
        self.core.ivr_message(b"e", m.IvrHeartbeat(executor_id="e", busy=0, capacity=10),
                              self.now)
        self.pump()

    def advance(self, seconds: float) -> None:
        """Move the clock by `seconds`, firing every deadline on the way, in order; the
        worker and the executor heartbeat as they would, unless `alive` is off."""
        target = self.now + seconds
        every = self.settings.media.heartbeat_ms / 1000
        while True:
            deadline = self.core.get_timer()
            beat = self.last_beat + every if self.alive else None
            due = min(d for d in (deadline, beat, target) if d is not None)
            if due >= target and not (deadline is not None and deadline <= target):
                break
            self.now = max(self.now, due)
            if beat is not None and due == beat:
                self.last_beat = self.now
                self.heartbeat()
            else:
                self.core.handle_timer(self.now)
                self.pump()
        self.now = target

    # ---------------------------------------------------------------- SIP

    def feed(self, data: bytes | SipRequest | SipResponse, addr: tuple[str, int]) -> None:
        raw = data if isinstance(data, bytes) else data.serialize()
        self.core.sip_received(raw, addr, self.now)
        self.pump()

    def call(self, invite: bytes | None = None) -> Call:
        self.feed(invite or caller_invite(), CALLER)
        calls = list(self.core.ctx.table.calls.values())
        assert calls, "the INVITE made no call"
        return calls[-1]

    def requests(self, method: str, addr: tuple[str, int] | None = None) -> list[SipRequest]:
        return [msg for msg, to in self.sip if isinstance(msg, SipRequest)
                and msg.method == method and (addr is None or to == addr)]

    def responses(self, addr: tuple[str, int] = CALLER) -> list[SipResponse]:
        return [msg for msg, to in self.sip if isinstance(msg, SipResponse) and to == addr]

    def statuses(self, addr: tuple[str, int] = CALLER) -> list[int]:
        return [r.status for r in self.responses(addr)]

    def answer(self, invite: SipRequest, addr: tuple[str, int], tag: str,
               ring_only: bool = False) -> None:
        user = invite.uri.split(":")[1].split("@")[0]
        self.feed(make_response(invite, 180, to_tag=tag), addr)
        if ring_only:
            return
        self.feed(make_response(invite, 200, to_tag=tag, body=SDP, headers=[
            ("Contact", f"<sip:{user}@{addr[0]}:{addr[1]}>"),
            ("Content-Type", "application/sdp")]), addr)

    def caller_request(self, method: str, cseq: int, extra: str = "",
                       branch: str | None = None) -> None:
        """A request of the caller in its dialog (after our 200)."""
        ok = [r for r in self.responses() if r.status == 200 and r.cseq[1] == "INVITE"][0]
        msg = (
            f"{method} sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-{branch or method}-{cseq}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
            f"CSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n").encode()
        self.feed(msg, CALLER)

    def cancel_call(self) -> None:
        msg = (
            b"CANCEL sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-1\r\n"
            b"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            b"To: <sip:*99@127.0.0.1:5060>\r\nCall-ID: caller-call@127.0.0.1\r\n"
            b"CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n")
        self.feed(msg, CALLER)
