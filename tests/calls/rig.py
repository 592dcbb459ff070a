"""A rig around `pbx.calls.CallCore` on a virtual clock: no sockets, no event loop.

SIP messages go in as bytes with the rig's `now`; the core's commands are carried out
by fakes:

* a media worker `w` (`worker`, tests/fake_media_worker.py, the shell test's too) with
  an announced pool of ports, which confirms each allocation (`allocate`, unless
  `auto_allocate` is off), fires the timers it is given when the clock reaches them and
  reports RTP counts on release; the plane can refuse a command (`refuse_media`: the core hears
  `media_send_failed`) or lose it (`lose_media`: accepted, never arrives);
* IVR executors (`e`, and any `add_executor` adds): each answers an event with what its
  `answer` says (by default the commands `script` gives), or keeps working on it; the
  plane can refuse events to one (`refuse`: the core hears `ivr_send_failed`).

`advance(seconds)` moves the clock through every deadline the core reports, the media
worker's timers and the heartbeats of the worker and executors, in order;
`advance_until` stops at the first moment a condition holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.calls.context import Publish, Resolve, ToIvr, ToMedia
from pbx.calls.core import CallCore
from pbx.calls.state import Call
from pbx.config import Settings, parse_config
from pbx.jsonl import JsonLinesLog
from pbx.records import CallRecords
from pbx.sip.message import SipRequest, SipResponse, make_response, parse_message
from pbx.sip.transaction import SendBytes
from pbx.traces import TraceStore
from tests.fake_media_worker import FakeMediaWorker

CALLER = ("127.0.0.1", 5999)
MEMBERS = {"2001": ("127.0.0.1", 6001), "2002": ("127.0.0.1", 6002),
           "2003": ("127.0.0.1", 6003)}
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\n")
PLAY = [m.PlayCommand(play_id=1, file="sounds/menu.wav")]
# The caller's source is a trusted network: it may call extensions and its REFERs may
# reach them (pbx.policy).
TRUSTED_CALLER = '\n[policy]\ntrusted_networks = ["127.0.0.1/32"]\n'

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

START = 1_000.0
WALL_OFFSET = 1.7e9

Script = Callable[[m.IvrEvent], list[Any]]
# An executor's answer to an event: its reply, or None while it keeps working on it.
Answer = Callable[[m.IvrEvent], m.IvrReply | None]
# Commands after which the session is over: the call is handed on or ended.
FINAL_COMMANDS = (m.QueueCommand, m.AgentCommand, m.WsBridgeCommand, m.HangupCommand,
                  m.TransferCommand)


def caller_invite(extra: str = "", branch: str = "1") -> bytes:
    """CALLER's INVITE to *99 (an unknown caller: From 1001 at its own address), with
    `extra` header lines; `branch` is its Via branch and CSeq number."""
    return (
        "INVITE sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-{branch}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        "To: <sip:*99@127.0.0.1:5060>\r\nCall-ID: caller-call@127.0.0.1\r\n"
        f"CSeq: {branch} INVITE\r\nContact: <sip:1001@127.0.0.1:5999>\r\n{extra}"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP


def first_then(commands: list[Any], later: Script | None = None) -> Script:
    """Answer the session start with `commands`; anything else per `later` (or nothing)."""

    def script(event: m.IvrEvent) -> list[Any]:
        first_session = "-" not in event.session_id  # a return from a queue is "<id>-2"
        if isinstance(event.input, m.SessionStartInput) and first_session:
            return commands
        return later(event) if later else []

    return script


def rig_settings(tmp: Path, extra: str = "", replace: dict[str, str] | None = None
                 ) -> Settings:
    """The rig's config (MEMBERS as users with static contacts), logs under `tmp`, and
    `extra` (more TOML) after it; `replace`: text of the config to replace first."""
    users = "\n".join(f'[users."{u}"]\ncontact = "sip:{u}@{h}:{p}"'
                      for u, (h, p) in MEMBERS.items())
    text = CONFIG.format(logs=tmp / "logs", users=users)
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_config(text + extra)


def reply(event: m.IvrEvent, *commands: Any, done: bool = False) -> m.IvrReply:
    """An executor's reply to `event` with `commands`."""
    return m.IvrReply(session_id=event.session_id, seq=event.seq,
                      state=f'{{"step_index":{event.seq}}}', step_index=event.seq,
                      commands=list(commands), done=done)


def scripted_reply(script: Script, event: m.IvrEvent) -> m.IvrReply:
    """The reply `script` gives: its commands; done after one that ends the session."""
    commands = script(event)
    return reply(event, *commands, done=any(isinstance(c, FINAL_COMMANDS) for c in commands))


@dataclass
class FakeExecutor:
    identity: bytes
    answer: Answer
    capacity: int = 10
    full: bool = False  # its heartbeats say it is busy to capacity: never chosen
    refuse: bool = False  # the plane refuses every event for it
    refused: list[m.IvrEvent] = field(default_factory=list)
    received: list[m.IvrEvent] = field(default_factory=list)
    # Events taken and not answered yet: listed in its heartbeats, as the real one does.
    working: dict[str, int] = field(default_factory=dict)


class CoreRig:
    def __init__(self, tmp: Path, script: Script | None = None, extra: str = "") -> None:
        self.settings = rig_settings(tmp, extra)
        self.now = START
        self.records_path = tmp / "calls.jsonl"
        self.core = CallCore(
            self.settings, records=CallRecords(JsonLinesLog(self.records_path)),
            traces=TraceStore(), now=self.now, wall_offset=WALL_OFFSET)
        self.sip: list[tuple[SipRequest | SipResponse, tuple[str, int]]] = []
        self.events: list[dict[str, Any]] = []
        self.resolves: list[Resolve] = []
        self.alive = True  # the worker and the executors heartbeat
        self.last_beat = self.now
        # The media worker `w`: what it got, what the plane refused or lost, its timers.
        self.media: list[Any] = []
        self.refused: list[Any] = []
        self.lost: list[Any] = []
        self.refuse_media: bool | Callable[[Any], bool] = False
        self.lose_media: Callable[[Any], bool] = lambda msg: False
        self.auto_allocate = True
        self.allocate_from = b"w"  # who answers its allocations
        self.worker = FakeMediaWorker(self._from_worker)
        self.media_timers: dict[str, tuple[float, int]] = {}  # media id -> (due, timer id)
        # The IVR executors; `ivr` is every event sent to any of them, in order.
        self.script = script or (lambda event: [])
        self.executors: dict[bytes, FakeExecutor] = {}
        self.ivr: list[m.IvrEvent] = []
        self.worker.join()
        self.add_executor(b"e")
        self.pump()

    def add_executor(self, identity: bytes, answer: Answer | None = None,
                     capacity: int = 10) -> FakeExecutor:
        """An executor that joins now; by default it answers per the rig's `script`."""
        executor = FakeExecutor(identity, answer or self.scripted, capacity)
        self.executors[identity] = executor
        self.core.ivr_message(identity, m.IvrReady(executor_id=identity.decode(),
                                                   capacity=capacity), self.now)
        self.pump()
        return executor

    def scripted(self, event: m.IvrEvent) -> m.IvrReply:
        return scripted_reply(self.script, event)

    # ---------------------------------------------------------------- the shell's part

    def pump(self) -> None:
        while out := self.core.drain():
            for command in out:
                self._execute(command)

    def _execute(self, command: Any) -> None:
        if isinstance(command, SendBytes):
            self.sip.append((parse_message(command.data), command.addr))
        elif isinstance(command, ToMedia):
            self._to_media(command)
        elif isinstance(command, ToIvr):
            self._to_ivr(command.executor, command.event)
        elif isinstance(command, Publish):
            self.events.append(command.event)
        elif isinstance(command, Resolve):
            self.resolves.append(command)

    def _to_media(self, command: ToMedia) -> None:
        msg = command.msg
        refuse = self.refuse_media
        if refuse is True or (callable(refuse) and refuse(msg)):
            self.refused.append(msg)
            self.core.media_send_failed(command, "refused by the plane", self.now)
            return
        if self.lose_media(msg):
            self.lost.append(msg)
            return
        self.media.append(msg)
        if isinstance(msg, m.MediaAllocate):
            if msg.remote is not None:  # what the worker is told, as if sent on its own
                self.media.append(msg.remote)
            if self.auto_allocate:
                self.allocate(msg)
        elif isinstance(msg, m.MediaTimer):
            if msg.delay_ms > 0:
                self.media_timers[msg.call_id] = (self.now + msg.delay_ms / 1000,
                                                  msg.timer_id)
            else:
                self.media_timers.pop(msg.call_id, None)
        elif isinstance(msg, m.MediaRelease):
            self.media_timers.pop(msg.call_id, None)
            for answer in self.worker.answer(msg):
                self.core.media_message(b"w", answer, self.now)

    def _from_worker(self, identity: bytes, msg: Any) -> None:
        self.core.media_message(identity, msg, self.now)

    def allocate(self, msg: m.MediaAllocate) -> None:
        """The media worker answers an allocation (its confirmation seemingly from
        `allocate_from`; at `worker.allocated_ip`) and announces its pool."""
        for answer in self.worker.answer(msg):
            sender = self.allocate_from if isinstance(answer, m.MediaAllocated) else b"w"
            self.core.media_message(sender, answer, self.now)

    def _to_ivr(self, identity: bytes, event: m.IvrEvent) -> None:
        executor = self.executors[identity]
        if executor.refuse:
            executor.refused.append(event)
            self.core.ivr_send_failed(identity, event, self.now)
            return
        event = m.decode(m.encode(event))  # through the wire format, as over ZeroMQ
        self.ivr.append(event)
        executor.received.append(event)
        executor.working[event.session_id] = event.seq
        answer = executor.answer(event)
        if answer is not None:
            self._send_reply(identity, answer)

    def reply(self, identity: bytes, answer: m.IvrReply) -> None:
        """`identity` sends `answer` (an executor's, or anyone's)."""
        self._send_reply(identity, answer)
        self.pump()

    def _send_reply(self, identity: bytes, answer: m.IvrReply) -> None:
        executor = self.executors.get(identity)
        if executor is not None and executor.working.get(answer.session_id) == answer.seq:
            del executor.working[answer.session_id]
        self.core.ivr_message(identity, m.decode(m.encode(answer)), self.now)

    def media_event(self, media_id: str, event: Any) -> None:
        """The media worker reports `event` on the leg `media_id`."""
        self.core.media_message(b"w", m.MediaEvent(call_id=media_id, event=event), self.now)
        self.pump()

    def heartbeat(self) -> None:
        """What the live worker and executors send every `heartbeat_ms`."""
        self.core.media_message(b"w", self.worker.heartbeat(), self.now)
        for identity, executor in self.executors.items():
            busy = executor.capacity if executor.full else len(executor.working)
            self.core.ivr_message(identity, m.IvrHeartbeat(
                executor_id=identity.decode(), busy=busy, capacity=executor.capacity,
                working=dict(executor.working)), self.now)
        self.pump()

    # ---------------------------------------------------------------- the clock

    def _next_due(self) -> float | None:
        every = self.settings.media.heartbeat_ms / 1000
        dues = [self.core.get_timer(), self.last_beat + every if self.alive else None,
                *(due for due, _ in self.media_timers.values())]
        return min((d for d in dues if d is not None), default=None)

    def _fire_due(self) -> None:
        """Everything due at `now`: heartbeats, the worker's timers, the core's timer."""
        now = self.now
        if self.alive and self.last_beat + self.settings.media.heartbeat_ms / 1000 <= now:
            self.last_beat = now
            self.heartbeat()
        for media_id, (due, timer_id) in sorted(self.media_timers.items(),
                                                key=lambda item: item[1]):
            if due <= now and self.media_timers.get(media_id) == (due, timer_id):
                del self.media_timers[media_id]
                self.media_event(media_id, m.TimerFired(timer_id=timer_id))
        deadline = self.core.get_timer()
        if deadline is not None and deadline <= now:
            self.core.handle_timer(now)
            self.pump()

    def advance(self, seconds: float) -> None:
        """Move the clock by `seconds`, firing every deadline on the way, in order; the
        worker and the executors heartbeat as they would, unless `alive` is off."""
        self.advance_until(lambda: False, seconds)

    def advance_until(self, done: Callable[[], object], seconds: float) -> float:
        """`advance(seconds)`, but stop at the first moment `done()` holds: that moment
        (else the end of the `seconds`)."""
        target = self.now + seconds
        while not done():
            due = self._next_due()
            if due is None or due > target:
                self.now = target
                break
            self.now = max(self.now, due)
            self._fire_due()
        return self.now

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

    def answered(self, invite: bytes | None = None) -> Call:
        """CALLER's call, answered (200) and acknowledged."""
        call = self.call(invite)
        assert 200 in self.statuses(), f"the caller was not answered: {self.statuses()}"
        self.caller_request("ACK", 1)
        return call

    def requests(self, method: str, addr: tuple[str, int] | None = None) -> list[SipRequest]:
        return [msg for msg, to in self.sip if isinstance(msg, SipRequest)
                and msg.method == method and (addr is None or to == addr)]

    def responses(self, addr: tuple[str, int] = CALLER) -> list[SipResponse]:
        return [msg for msg, to in self.sip if isinstance(msg, SipResponse) and to == addr]

    def statuses(self, addr: tuple[str, int] = CALLER) -> list[int]:
        return [r.status for r in self.responses(addr)]

    def last(self, cseq: int, addr: tuple[str, int] = CALLER) -> SipResponse:
        """The last response to `addr`'s request with CSeq number `cseq`."""
        return [r for r in self.responses(addr) if r.cseq[0] == cseq][-1]

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
                       branch: str | None = None, body: bytes = b"",
                       content_type: str = "application/sdp",
                       source: tuple[str, int] = CALLER) -> None:
        """A request of the caller in its dialog (after our 200), with `extra` header
        lines and a `body` of `content_type`; from `source` (a stranger's, to test)."""
        ok = [r for r in self.responses() if r.status == 200 and r.cseq[1] == "INVITE"][0]
        ctype = f"Content-Type: {content_type}\r\n" if body else ""
        msg = (
            f"{method} sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bK-{branch or method}-{cseq}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
            f"CSeq: {cseq} {method}\r\nContact: <sip:1001@127.0.0.1:5999>\r\n{extra}"
            f"{ctype}Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.feed(msg, source)

    def cancel_call(self, source: tuple[str, int] = CALLER) -> None:
        """The caller's CANCEL of its INVITE; from `source` (a stranger who copied it)."""
        msg = (
            b"CANCEL sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-1\r\n"
            b"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            b"To: <sip:*99@127.0.0.1:5060>\r\nCall-ID: caller-call@127.0.0.1\r\n"
            b"CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n")
        self.feed(msg, source)

    # ---------------------------------------------------------------- what is left

    def of(self, kind: type) -> list[Any]:
        """The media worker's messages of `kind`."""
        return [msg for msg in self.media if isinstance(msg, kind)]

    def records(self) -> list[dict[str, Any]]:
        """The call records written so far."""
        path = self.records_path
        return ([json.loads(line) for line in path.read_text().splitlines()]
                if path.exists() else [])

    def trace_errors(self) -> list[str]:
        """The errors in the stored step traces, every session's."""
        traces = self.core.ctx.traces
        return [str(step.get("error")) for session_id in list(traces.sessions)
                for step in traces.get(session_id) or [] if step.get("error")]
