"""The front's shell (`pbx.front.Front`) on a real asyncio loop: that it wires the call
core to I/O. What the core decides is tested on its virtual clock in tests/calls/.

Fakes stand for what is around the shell: the transport (SIP parsed back), a media
worker that answers allocations and an executor that answers events on the loop
(`call_soon`), either of whose planes may refuse a send. The loop is real; its clock
can be moved on (`SkippingLoop.skip`), so timers due by then run at once, and nothing
waits for time to pass: each step waits for the shell's next send.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from pbx import logs
from pbx import messages as m
from pbx.admin import EventHub
from pbx.app import GC_FULL_EVERY, GC_YOUNG, tune_gc
from pbx.calls import events
from pbx.front import Front
from pbx.logs import SimilarLinesFilter
from pbx.sip.message import SipRequest, SipResponse, parse_message
from tests.calls.rig import (
    CALLER,
    MEMBERS,
    PLAY,
    Script,
    caller_invite,
    first_then,
    rig_settings,
    scripted_reply,
)
from tests.fake_media_worker import FakeMediaWorker

# No heartbeats come in these tests: workers and executors stay alive regardless.
NO_EXPIRY = "\n[media]\nexpiry_ms = 600000\n[ivr]\nexpiry_ms = 600000\n"
RUN_BOUND_S = 10.0


class SkippingLoop(asyncio.SelectorEventLoop):
    """A loop whose clock `skip` moves on; it also notes the host names it resolves."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0.0
        self.resolved: list[tuple[str, int]] = []

    def time(self) -> float:
        return super().time() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds

    async def getaddrinfo(self, host: Any, port: Any, *args: Any,
                          **kwargs: Any) -> list[Any]:
        self.resolved.append((host, port))
        return await super().getaddrinfo(host, port, *args, **kwargs)


def run(main: Callable[[SkippingLoop], Coroutine[Any, Any, None]]) -> None:
    loop = SkippingLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(loop), RUN_BOUND_S))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


class Shell:
    """The real Front with fakes around it; executors `executors`, in that order."""

    def __init__(self, tmp: Path, script: Script, extra: str = "",
                 executors: tuple[bytes, ...] = (b"e",),
                 has_subscribers: Callable[[], bool] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.script = script
        self.sip: list[tuple[SipRequest | SipResponse, tuple[str, int]]] = []
        self.media: list[Any] = []
        self.ivr: list[tuple[bytes, m.IvrEvent]] = []  # (executor, event) delivered
        self.events: list[dict[str, Any]] = []
        self.refuse_media: Callable[[Any], bool] = lambda msg: False
        self.refuse_ivr: set[bytes] = set()
        self.refused: list[tuple[bytes, Any]] = []  # (worker or executor, message)
        self.changed = asyncio.Event()
        self.front = Front(rig_settings(tmp, NO_EXPIRY + extra), self._send_sip,
                           self._send_media, self._send_ivr, self.events.append,
                           has_subscribers=has_subscribers)
        self.worker = FakeMediaWorker(self.front.on_media_message)
        self.worker.join()
        for identity in executors:
            self.front.on_ivr_message(identity, m.IvrReady(executor_id=identity.decode(),
                                                           capacity=10))

    # fakes -------------------------------------------------------------

    def _send_sip(self, data: bytes, addr: tuple[str, int], reliable: bool = False) -> None:
        self.sip.append((parse_message(data), addr))
        self.changed.set()

    def _send_media(self, worker: bytes, msg: Any) -> bool:
        self.changed.set()
        if self.refuse_media(msg):
            self.refused.append((worker, msg))
            return False
        self.media.append(msg)
        for answer in self.worker.answer(msg):  # over ZeroMQ: on the loop's next turns
            self.loop.call_soon(self.front.on_media_message, worker, answer)
        return True

    def _send_ivr(self, executor: bytes, event: m.IvrEvent) -> bool:
        self.changed.set()
        if executor in self.refuse_ivr:
            self.refused.append((executor, event))
            return False
        self.ivr.append((executor, event))
        self.loop.call_soon(self.front.on_ivr_message, executor,
                            scripted_reply(self.script, event))
        return True

    # helpers -----------------------------------------------------------

    async def until(self, predicate: Callable[[], Any]) -> Any:
        """Wait for the shell's sends until `predicate()` holds (bounded by `run`)."""
        while not (value := predicate()):
            self.changed.clear()
            await self.changed.wait()
        return value

    def requests(self, method: str, addr: tuple[str, int] | None = None) -> list[SipRequest]:
        return [msg for msg, to in self.sip if isinstance(msg, SipRequest)
                and msg.method == method and (addr is None or to == addr)]

    def ack(self) -> None:
        """The caller's ACK of our 200 (our BYE waits for it: RFC 3261 §15)."""
        ok = next(msg for msg, to in self.sip if isinstance(msg, SipResponse)
                  and msg.status == 200 and msg.cseq[1] == "INVITE")
        self.front.message_received(
            (f"ACK sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
             f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-ack\r\nMax-Forwards: 70\r\n"
             f"From: {ok.headers.get('From')}\r\nTo: {ok.headers.get('To')}\r\n"
             f"Call-ID: {ok.headers.get('Call-ID')}\r\nCSeq: 1 ACK\r\n"
             f"Content-Length: 0\r\n\r\n").encode(), CALLER)

    def statuses(self) -> list[int]:
        return [msg.status for msg, to in self.sip
                if isinstance(msg, SipResponse) and to == CALLER]


def test_a_call_is_answered(tmp_path: Path) -> None:
    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then(PLAY))
        shell.front.message_received(caller_invite(), CALLER)
        # Carried out before message_received returns: the port handed out
        # from the worker's pool, the 200 (no other process asked).
        assert shell.statuses() == [200]
        (allocate,) = shell.media  # the caller's RTP address rides in it
        assert isinstance(allocate, m.MediaAllocate) and allocate.remote is not None
        plays = await shell.until(lambda: [x for x in shell.media
                                           if isinstance(x, m.MediaPlay)])
        assert plays[0].file == "sounds/menu.wav"
        assert [e["event"] for e in shell.events if e.get("type") == "call"][:2] == [
            "started", "answered"]
        assert len(shell.front.calls) == 1

    run(main)


def test_a_refused_media_command_ends_the_call(tmp_path: Path) -> None:
    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then(PLAY))
        shell.refuse_media = lambda msg: isinstance(msg, m.MediaPlay)
        shell.front.message_received(caller_invite(), CALLER)
        shell.ack()
        byes = await shell.until(lambda: shell.requests("BYE", CALLER))
        assert [type(msg) for _, msg in shell.refused] == [m.MediaPlay]
        assert "MediaCommandLost" in (byes[0].headers.get("Reason") or "")
        assert not shell.front.calls and shell.front.stats["ivr_commands_lost"] == 1

    run(main)


def test_a_refused_ivr_event_goes_to_another_executor(tmp_path: Path) -> None:
    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then(PLAY), executors=(b"e1", b"e2"))
        shell.refuse_ivr = {b"e1"}  # the first chosen: its queue is full
        shell.front.message_received(caller_invite(), CALLER)
        await shell.until(lambda: [x for x in shell.media if isinstance(x, m.MediaPlay)])
        assert [(executor, type(event.input)) for executor, event in shell.refused] == [
            (b"e1", m.SessionStartInput)]
        assert [(executor, event.seq) for executor, event in shell.ivr] == [(b"e2", 1)]

    run(main)


def test_a_transfer_target_host_name_is_resolved_through_the_loop(tmp_path: Path) -> None:
    target = "sip:2001@localhost:6001"
    outbound = f'\n[[policy.outbound]]\nmatch = "{target}"\ncallers = ["provider"]\n'

    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then([m.TransferCommand(target=target)]), outbound)
        shell.front.message_received(caller_invite(), CALLER)
        ip = str(socket.getaddrinfo("localhost", 6001, type=socket.SOCK_DGRAM)[0][4][0])
        invites = await shell.until(lambda: shell.requests("INVITE", (ip, 6001)))
        assert invites[0].uri == target
        assert loop.resolved == [("localhost", 6001)]

    run(main)


def test_the_one_timer_follows_the_core_deadlines(tmp_path: Path) -> None:
    """A member that never answers: our INVITE is retransmitted at T1, then 2·T1 later
    (RFC 3261 §17.1.1.2), each on the one timer, re-armed after it fires."""
    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then([m.TransferCommand(target="2001")]))
        shell.front.message_received(caller_invite(), CALLER)

        def invites() -> list[SipRequest]:
            return shell.requests("INVITE", MEMBERS["2001"])

        await shell.until(invites)
        for sent, interval_s in ((1, 0.5), (2, 1.0)):
            loop.skip(interval_s)
            await shell.until(lambda: len(invites()) > sent)  # noqa: B023 (awaited here)

    run(main)


ENDED_LINE = re.compile(r"call ([0-9a-f]{16}) ended: (\{.*\}) \[sip-call-id a=\S+\]$")


def test_events_are_built_only_while_someone_listens(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """No PUB subscriber and no admin WebSocket client: the core builds no event (issue
    9), but the ended call's log line and record are the same; a WebSocket client or a
    subscriber hears every event of the next call."""
    heard: dict[str, list[dict[str, Any]]] = {}
    ended: dict[str, str] = {}

    def one_call(name: str, subscribers: bool, ws_client: bool) -> None:
        async def main(loop: SkippingLoop) -> None:
            shell = Shell(tmp_path / name, first_then([m.HangupCommand()]),
                          has_subscribers=lambda: subscribers)
            hub = EventHub()
            shell.front.add_listener(hub.publish, hub.has_clients)
            queue = hub.subscribe() if ws_client else None
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="pbx.calls"):
                shell.front.message_received(caller_invite(), CALLER)
                shell.ack()
                await shell.until(lambda: shell.requests("BYE", CALLER))
            heard[name] = list(shell.events)
            if queue is not None:
                assert [queue.get_nowait() for _ in range(queue.qsize())] == shell.events
            (line,) = [r.getMessage() for r in caplog.records if " ended: " in r.getMessage()]
            ended[name] = line
            shell.front.records.flush_all()
            shell.front.calls_log.flush()
            (record,) = (tmp_path / name / "logs" / "calls.jsonl").read_text().splitlines()
            assert json.loads(record)["end_reason"] == "Normal"

        run(main)

    one_call("nobody", subscribers=False, ws_client=False)
    one_call("ws", subscribers=False, ws_client=True)
    one_call("pub", subscribers=True, ws_client=False)
    assert heard["nobody"] == []
    for name in ("ws", "pub"):
        assert [e["event"] for e in heard[name] if e["type"] == "call"] == [
            "started", "answered", "ended"], name
    # The log line does not depend on who listens (its JSON is the ended event's).
    fields = {}
    for name, line in ended.items():
        match = ENDED_LINE.match(line)
        assert match is not None, line
        fields[name] = json.loads(match[2])
    assert set(fields["nobody"]) == set(fields["ws"]) == set(fields["pub"])
    assert fields["ws"] == next(e for e in heard["ws"] if e.get("event") == "ended")


def test_an_ended_line_over_its_budget_is_not_built_but_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `[logging] max_similar_lines_per_s`, the ended call's line is counted as left
    out before it is built (no redaction, no JSON, no record: issue 9); the call's record
    is written all the same."""
    similar = SimilarLinesFilter(rate=0.001, burst=1.0)
    monkeypatch.setattr(logs, "_similar_lines", similar)
    built: list[Any] = []
    monkeypatch.setattr(events, "redact", lambda value: built.append(value) or value)

    def one_call(name: str) -> list[str]:
        async def main(loop: SkippingLoop) -> None:
            shell = Shell(tmp_path / name, first_then([m.HangupCommand()]),
                          has_subscribers=lambda: False)  # no one listens
            shell.front.message_received(caller_invite(), CALLER)
            shell.ack()
            await shell.until(lambda: shell.requests("BYE", CALLER))
            shell.front.records.flush_all()
            shell.front.calls_log.flush()

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pbx.calls"):
            run(main)
        return [r.getMessage() for r in caplog.records if " ended: " in r.getMessage()]

    (line,) = one_call("first")  # within the budget (the filter is not on caplog's
    assert ENDED_LINE.match(line)  # handler: taking from the budget is simulated below)
    assert len(built) == 1
    similar.buckets[("pbx.calls", logging.INFO, events.ENDED_LINE_KEY)][0] = 0.0
    assert one_call("second") == []
    assert len(built) == 1 and similar.suppressed == 1
    (record,) = (tmp_path / "second" / "logs" / "calls.jsonl").read_text().splitlines()
    assert json.loads(record)["end_reason"] == "Normal"


def test_traces_are_stored_logged_and_given_to_listeners(tmp_path: Path) -> None:
    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then([m.HangupCommand()]))
        seen: list[dict[str, Any]] = []
        shell.front.listeners.append(seen.append)
        trace = m.StepTrace(call_id="c", session_id="s1", step_index=0, trigger="start",
                            step_id="x", step_name="y", extra={"k": 1}, at=1.0)
        shell.front.record_trace(trace)
        # An unknown call has no legs: its SIP Call-IDs are an empty list.
        assert shell.front.traces.get("s1") == [{**trace.model_dump(mode="json"),
                                                 "sip_call_ids": []}]
        assert seen[0]["type"] == "ivr_step_trace" and seen[0]["step_id"] == "x"
        assert shell.events[0] == seen[0]
        # Buffered ([logging] jsonl_flush_s), flushed by the shell's timer.
        path = tmp_path / "logs" / "traces.jsonl"
        assert path.read_bytes() == b""
        loop.skip(shell.front.logs_flush_s)
        for _ in range(10):  # a few loop iterations: the timer is due at once
            await asyncio.sleep(0)
        lines = path.read_text().splitlines()
        assert json.loads(lines[0])["extra"] == {"k": 1}

    run(main)


def test_the_core_deadline_is_asked_once_per_loop_iteration(tmp_path: Path) -> None:
    """Inputs handled in one loop iteration (a drain of plane messages, several
    datagrams) cost one `get_timer()` of the core, after them, and the one timer is
    still armed for the earliest deadline."""
    async def main(loop: SkippingLoop) -> None:
        shell = Shell(tmp_path, first_then(PLAY))
        core = shell.front.core
        asked: list[float | None] = []
        real_get_timer = core.get_timer

        def get_timer() -> float | None:
            asked.append(real_get_timer())
            return asked[-1]

        core.get_timer = get_timer  # type: ignore[method-assign]
        await asyncio.sleep(0)
        asked.clear()
        for _ in range(3):
            shell.front.message_received(caller_invite(), CALLER)  # then 2 retransmissions
        assert asked == []
        await asyncio.sleep(0)
        assert len(asked) == 1 and asked[0] is not None
        assert shell.front._timer_at == asked[0]

    run(main)


def test_tune_gc_sets_the_front_collector_thresholds() -> None:
    """Young collections every GC_YOUNG allocations (not CPython 3.11's 700), full
    ones after GC_FULL_EVERY middle ones; what exists at start-up is frozen."""
    saved = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG, saved[1], GC_FULL_EVERY)
        assert GC_YOUNG > saved[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
