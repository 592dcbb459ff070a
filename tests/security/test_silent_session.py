"""Issue 8, "a silent call", on a virtual clock: the exact sequences that leave an IVR
session waiting for an event that never comes, and the rules that end them.

The front runs on a real event loop with its clock (`Front.now`) virtual; the executor
is the real one (`workers.ivr.handle_event` and the machine) with a scripted provider
client; a fake media worker answers allocations, fires the timers it is given when the
virtual clock reaches them, and can lose or refuse a command. Heartbeats from both
keep them alive while the clock advances in the front's own check period.

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

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.config import parse_config
from pbx.front import IVR_NO_EXECUTOR_S, Front
from pbx.ivr.models import ProviderRequest, ProviderResult
from pbx.sip.message import SipRequest, SipResponse, parse_message
from tests.fake_media_worker import FakeMediaWorker
from tests.test_front_queue import CALLER, caller_invite
from workers.ivr import handle_event

CONFIG = """
[sip]
listen = "127.0.0.1:5060"

[logging]
dir = "{logs}"

[[routes]]
name = "main"
to_user = "*99"
app = "ivr"
app_params = {{ mode = "step", url = "http://provider.test/ivr/step" }}
"""
COLLECT = {"type": "collect_dtmf", "max_digits": 16, "timeout_ms": 30_000}
HANGUP = {"type": "hangup"}
TICK_S = 0.25  # the front's check period (pbx.app.EXPIRY_CHECK_S)

Answer = Callable[[dict[str, Any]], dict[str, Any]]
# A media command's fate: "ok" (delivered), "lost" (accepted, never arrives),
# "refused" (the plane says it could not be sent: EHOSTUNREACH, a full queue).
Fault = Callable[[Any], str]


def collect_then_hangup(body: dict[str, Any]) -> dict[str, Any]:
    return COLLECT if body["event"]["type"] == "session_start" else HANGUP


def delivered(msg: Any) -> str:
    return "ok"


def lose_timers(msg: Any) -> str:
    return "lost" if isinstance(msg, m.MediaTimer) and msg.delay_ms > 0 else "ok"


def refuse_timers(msg: Any) -> str:
    return "refused" if isinstance(msg, m.MediaTimer) else "ok"


class ScriptedClient:
    """The executor's ProviderClient: step requests answered by `answer`; `gate`, when
    set, holds them until it is opened."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.events: list[tuple[str, dict[str, Any]]] = []  # (type, event)
        self.notified: list[tuple[str, dict[str, Any]]] = []  # (kind, body)
        self.gate: asyncio.Event | None = None

    async def step(self, params: Any, body: dict[str, Any]) -> ProviderResult:
        self.events.append((body["event"]["type"], body["event"]))
        if self.gate is not None:
            await self.gate.wait()
        return ProviderResult("ok", body=self.answer(body), status=200)

    def send(self, request: ProviderRequest) -> None:
        self.notified.append((request.kind, request.body))

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


class VirtualFront(Front):
    clock = 1000.0

    def now(self) -> float:
        return self.clock


class Rig:
    def __init__(self, tmp: Path, answer: Answer = collect_then_hangup,
                 fault: Fault = delivered, executor_capacity: int = 10,
                 replies: bool = True) -> None:
        self.settings = parse_config(CONFIG.format(logs=tmp / "logs"))
        self.sip: list[tuple[Any, tuple[str, int]]] = []
        self.media: list[Any] = []  # delivered to the worker
        self.lost: list[Any] = []
        self.refused: list[Any] = []
        self.timers: dict[str, tuple[float, int]] = {}  # media id -> (due, timer id)
        self.fault = fault
        self.client = ScriptedClient(answer)
        self.replies = replies  # False: the executor takes events and never answers
        self.working: dict[str, int] = {}
        self.executor_capacity = executor_capacity
        self.front = VirtualFront(self.settings, self._send_sip, self._send_media,
                                  self._send_ivr, lambda event: None)
        self.worker = FakeMediaWorker(self.front)
        self.heartbeat()

    # fakes -------------------------------------------------------------

    def _send_sip(self, data: bytes, addr: tuple[str, int], reliable: bool = False) -> None:
        self.sip.append((parse_message(data), addr))

    def _send_media(self, worker: bytes, msg: Any) -> bool:
        fate = self.fault(msg)
        if fate == "refused":
            self.refused.append(msg)
            return False
        if fate == "lost":
            self.lost.append(msg)
            return True
        self.media.append(msg)
        loop = asyncio.get_running_loop()
        if isinstance(msg, m.MediaAllocate):
            self.worker.answer_soon(msg)
        elif isinstance(msg, m.MediaTimer):
            if msg.delay_ms > 0:
                self.timers[msg.call_id] = (self.front.clock + msg.delay_ms / 1000,
                                            msg.timer_id)
            else:
                self.timers.pop(msg.call_id, None)
        elif isinstance(msg, m.MediaRelease):
            self.timers.pop(msg.call_id, None)
            loop.call_soon(self.front.on_media_message, b"w",
                           m.MediaReleased(call_id=msg.call_id))
        return True

    def _send_ivr(self, executor: bytes, event: m.IvrEvent) -> bool:
        # Through the wire format, as over ZeroMQ.
        event = m.decode(m.encode(event))
        self.working[event.session_id] = event.seq
        if self.replies:
            asyncio.get_running_loop().create_task(self._execute(event))
        return True

    async def _execute(self, event: m.IvrEvent) -> None:
        reply = await handle_event(event, self.client, lambda: self.front.clock)  # type: ignore[arg-type]
        if self.working.get(event.session_id) == event.seq:
            del self.working[event.session_id]
        self.front.on_ivr_message(b"e", m.decode(m.encode(reply)))

    # the clock -----------------------------------------------------------

    def heartbeat(self) -> None:
        busy = len(self.working) if self.executor_capacity > 1 else self.executor_capacity
        self.front.on_media_message(b"w", self.worker.heartbeat(calls=1))
        self.front.on_ivr_message(b"e", m.IvrHeartbeat(
            executor_id="e", busy=busy, capacity=self.executor_capacity,
            working=dict(self.working)))

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, until: Callable[[], Any] | None = None) -> float:
        """Move the virtual clock on in the front's check period: heartbeats, the
        media worker's due timers, the front's checks. Stops early once `until()`."""
        end = self.front.clock + seconds
        while self.front.clock < end - 1e-9:
            self.front.clock = min(end, self.front.clock + TICK_S)
            for media_id, (due, timer_id) in list(self.timers.items()):
                if due <= self.front.clock:
                    del self.timers[media_id]
                    self.front.on_media_message(b"w", m.MediaEvent(
                        call_id=media_id, event=m.TimerFired(timer_id=timer_id)))
            self.heartbeat()
            self.front.expire_workers()
            await self.settle()
            if until is not None and until():
                break
        return self.front.clock

    # SIP -----------------------------------------------------------------

    def call(self) -> None:
        self.front.message_received(caller_invite(), CALLER)

    async def answered(self) -> None:
        for _ in range(200):
            ok = [r for r, to in self.sip if isinstance(r, SipResponse) and r.status == 200]
            if ok:
                ack = (
                    "ACK sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
                    "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-ack\r\n"
                    "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
                    f"To: {ok[0].headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
                    "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()
                self.front.message_received(ack, CALLER)
                await self.settle()
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"the caller was not answered: {self.sip}")

    def byes(self) -> list[SipRequest]:
        return [r for r, _ in self.sip if isinstance(r, SipRequest) and r.method == "BYE"]

    def trace_errors(self) -> list[str]:
        traces = self.front.traces
        return [str(step.get("error")) for session_id in list(traces.sessions)
                for step in traces.get(session_id) or [] if step.get("error")]


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


# ---------------------------------------------------------------- the finding


def test_healthy_collect_times_out_and_nothing_else_fires(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.call()
        await rig.answered()
        assert rig.client.kinds == ["session_start"]
        at = await rig.advance(60, until=lambda: len(rig.client.kinds) > 1)
        assert rig.client.kinds == ["session_start", "dtmf_timeout"]
        assert 30 <= at - 1000 <= 30 + 2 * TICK_S
        await rig.advance(3600)
        assert rig.client.kinds == ["session_start", "dtmf_timeout"]
        assert not rig.trace_errors() and rig.front.stats["ivr_waits_expired"] == 0

    run(main())


def test_lost_digit_timer_gets_an_error_event_after_its_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, fault=lose_timers)
        rig.call()
        await rig.answered()
        assert rig.client.kinds == ["session_start"]
        assert [t.timer_id for t in rig.lost] == [1]  # the collect's timer never arrives
        started = rig.front.clock
        # At 2554a5d: nothing, ever (the caller hears silence until they hang up).
        at = await rig.advance(120, until=lambda: len(rig.client.kinds) > 1)
        assert rig.client.kinds == ["session_start", "error"], (
            f"no event for {at - started:.0f} s after collect_dtmf: a silent call")
        reason = rig.client.events[-1][1]["reason"]
        assert "collect_dtmf" in reason and "lost" in reason, reason
        # Not before its own deadline (the 30 s timer) plus the front's grace.
        grace_s = rig.settings.sessions.wait_grace_ms / 1000
        assert 30 + grace_s <= at - started <= 30 + grace_s + 2 * TICK_S
        # The provider's answer (hang up) is carried out; the trace keeps the error.
        assert rig.byes()
        assert any("collect_dtmf" in e for e in rig.trace_errors())
        assert rig.front.stats["ivr_waits_expired"] == 1

    run(main())


def test_prompt_whose_end_never_comes_is_bounded_by_max_wait(tmp_path: Path) -> None:
    def answer(body: dict[str, Any]) -> dict[str, Any]:
        start = body["event"]["type"] == "session_start"
        return {"type": "prompt", "file": "sounds/welcome.wav"} if start else HANGUP

    async def main() -> None:
        rig = Rig(tmp_path, answer=answer)  # the fake worker never ends a prompt
        rig.call()
        await rig.answered()
        started = rig.front.clock
        at = await rig.advance(1200, until=lambda: len(rig.client.kinds) > 1)
        assert rig.client.kinds == ["session_start", "error"]
        watch = rig.settings.sessions
        assert at - started >= (watch.max_wait_ms + watch.wait_grace_ms) / 1000
        # The prompt is given up (stopped) before the provider is asked.
        assert any(isinstance(x, m.MediaStop) for x in rig.media)

    run(main())


# ---------------------------------------------------------------- no silent drops


def test_refused_media_command_ends_the_call_with_a_traced_error(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, fault=refuse_timers)
        rig.call()
        await rig.answered()
        assert [t.timer_id for t in rig.refused] == [1]
        # At 2554a5d the refusal was ignored: a session waiting for nothing.
        byes = rig.byes()
        assert byes, "the refused MediaTimer left the call up, silent"
        assert "MediaCommandLost" in (byes[0].headers.get("Reason") or "")
        assert any("timer command lost" in e for e in rig.trace_errors()), rig.trace_errors()
        assert rig.front.stats["ivr_commands_lost"] == 1
        await rig.advance(5)
        assert not rig.front.calls and not rig.front.sessions
        assert "end" in [kind for kind, _ in rig.client.notified]  # the provider hears

    run(main())


def test_command_for_a_leg_without_media_worker_ends_the_call(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.client.gate = asyncio.Event()  # hold the provider's first answer
        rig.call()
        await rig.answered()
        call = next(iter(rig.front.calls.values()))
        assert call.a is not None and call.a.worker is not None
        rig.front._forget_media(call.a)  # the leg lost its port (what worker expiry does)
        rig.client.gate.set()
        await rig.settle()
        assert not any(isinstance(x, m.MediaTimer) for x in rig.media)
        assert rig.byes(), "the TimerCommand was dropped in silence"
        assert any("no media worker" in e for e in rig.trace_errors()), rig.trace_errors()

    run(main())


# ---------------------------------------------------------------- executors


def test_session_no_executor_takes_ends_despite_heartbeats(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, executor_capacity=1)  # always full: busy == capacity
        rig.call()
        await rig.answered()
        assert rig.client.kinds == []  # the session start found no executor
        at = await rig.advance(120, until=lambda: rig.byes())
        assert rig.byes(), "heartbeats of full executors kept the session waiting"
        assert IVR_NO_EXECUTOR_S < at - 1000 <= IVR_NO_EXECUTOR_S + 1
        assert "NoExecutor" in (rig.byes()[0].headers.get("Reason") or "")
        assert any("NoExecutor" in e for e in rig.trace_errors())

    run(main())


def test_event_an_executor_keeps_working_on_is_cut_at_max_event(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, replies=False)  # takes the event, lists it, never answers
        rig.call()
        await rig.answered()
        assert rig.working
        at = await rig.advance(3600, until=lambda: rig.byes())
        assert rig.byes(), "an event listed in every heartbeat was waited for forever"
        max_event_s = rig.settings.sessions.max_event_ms / 1000
        assert max_event_s < at - 1000 <= max_event_s + 1
        assert any("IvrTimeout" in e for e in rig.trace_errors())

    run(main())


def test_session_ending_without_handing_the_call_over_hangs_up(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, replies=False)
        rig.call()
        await rig.answered()
        session = next(iter(rig.front.sessions.values()))
        assert session.in_flight is not None
        # An executor says the session is over, with no hang-up and no transfer.
        rig.front.on_ivr_message(b"e", m.IvrReply(
            session_id=session.session_id, seq=session.in_flight.seq, state={},
            done=True))
        await rig.advance(5)
        assert rig.byes(), "the call was left up with no IVR and nobody else"
        assert any("nobody" in e for e in rig.trace_errors()), rig.trace_errors()

    run(main())
