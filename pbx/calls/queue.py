"""Queue and route_to_agent calls: `pbx.queues` decides, this module carries it out.

`QueueWait` decides whom to ring and when; this module turns its actions into legs
through `CallOps`, the few things a queue may ask of the rest of the call layer. A
`Ring` becomes an outbound leg per binding of the member (its phones ring in
parallel, pbx.calls.outbound) on the caller's media worker (the bridge stays local)
kept in `call.ringing`; the member fails when the last of them does, and the first to
answer cancels the others. A `Cancel` gives them up (a 2xx that still comes gets ACK +
BYE); `GiveUp` restarts the route's IVR (`return_to_ivr`) or hangs up. While the caller
waits, the queue's hold music loops on the caller's leg. The first member to answer
becomes `call.b` and is bridged as a transfer is (the MediaStop before the MediaBridge
ends the hold music).

The wait's next deadline is the call layer's timer `(QUEUE, call id)`.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

from pbx import messages as m
from pbx.calls.context import CallContext
from pbx.calls.state import Call, CallPhase, Leg, LegPhase, QueueRun, advance_call
from pbx.calls.timers import TimerKind
from pbx.config import QueueSettings, Settings
from pbx.queues import Cancel, GiveUp, QueueAction, QueueBook, QueueWait, Ring, WaitState

log = logging.getLogger("pbx.queue")

# Play id of the hold music: far above the IVR's own ids, so no IVR event matches it.
HOLD_PLAY_ID = 1 << 30
RETURN_VARIABLES = {"transferred_from": "queue", "return_reason": "no_answer"}
# route_to_agent's routing hints and the headers they ride in to the agent (rustpbx
# gives them to its contact-centre engine; here the agent's phone or CTI reads them).
AGENT_HINT_HEADERS = (("key_id", "X-Key-Id"), ("channel_code", "X-Channel-Code"))
AGENT_HINT_MAX_CHARS = 256


def agent_headers(call: Call, command: m.AgentCommand) -> list[tuple[str, str]]:
    """The hints the provider gave, as SIP headers. A value with a control character
    (CR, LF: header injection) or too long is not sent, and logged."""
    headers = []
    for field_name, header in AGENT_HINT_HEADERS:
        value = getattr(command, field_name)
        if not value:
            continue
        if len(value) > AGENT_HINT_MAX_CHARS or any(
                ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            log.warning("call %s: route_to_agent %s not sent (control characters or "
                        "longer than %d)", call.call_id, field_name, AGENT_HINT_MAX_CHARS)
            continue
        headers.append((header, value))
    return headers


class CallOps(Protocol):
    """What a queue asks of the call layer."""

    def ring(self, call: Call, member: str, media_id: str) -> list[Leg]:
        """Outbound legs ringing `member`, one per binding (none: it cannot be reached);
        `media_id` is the leg's, or the prefix of theirs."""

    def give_up_leg(self, leg: Leg) -> None:
        """Stop ringing the leg (CANCEL; it is over)."""

    def authorize(self, call: Call, target: str) -> str | None:
        """The provider's agent target as policy allows it (None: refused, call ended)."""

    def transfer(self, call: Call, target: str) -> None: ...

    def hangup(self, call: Call, reason: str, code: int | None) -> None: ...

    def restart_ivr(self, call: Call, variables: dict[str, str]) -> None: ...

    def publish(self, call: Call, event: str) -> None: ...


class QueueCalls:
    def __init__(self, ctx: CallContext, ops: CallOps) -> None:
        self.ctx = ctx
        self.ops = ops
        self.books: dict[tuple[str, str], QueueBook] = {}

    def _book(self, kind: str, name: str, settings: QueueSettings) -> QueueBook:
        key = (kind, name)
        book = self.books.get(key)
        if book is None:
            book = self.books[key] = QueueBook(settings.members)
        return book

    def reload(self, settings: Settings) -> None:
        """A new dial plan: each queue's book rings its new members from the next round
        on (waits in progress keep their own timeout, strategy and hold music); the
        book of a queue that is gone stays with the waits that hold it."""
        for (kind, name), book in list(self.books.items()):
            section = settings.queues if kind == "queue" else settings.skill_groups
            queue = section.get(name)
            if queue is None:
                del self.books[(kind, name)]
            else:
                book.set_members(queue.members)

    def settings_of(self, kind: str, name: str) -> QueueSettings:
        settings = self.ctx.settings
        return settings.queues[name] if kind == "queue" else settings.skill_groups[name]

    def wait_from_dict(self, kind: str, name: str, data: dict[str, Any]) -> QueueWait:
        """A queue wait back from its dict (pbx.calls.state.call_from_dict)."""
        settings = self.settings_of(kind, name)
        book = self._book("queue" if kind == "queue" else "skill_group", name, settings)
        return QueueWait.from_dict(data, settings, book)

    # ---------------------------------------------------------------- commands

    def start_queue(self, call: Call, command: m.QueueCommand) -> None:
        settings = self.ctx.settings.queues.get(command.target)
        call.queue_name = command.target
        if settings is None:
            log.warning("call %s: no [queues.%s] section; hanging up", call.call_id,
                        command.target)
            self.ops.hangup(call, f"UnknownQueue({command.target})", 404)
            return
        book = self._book("queue", command.target, settings)
        self._run(call, QueueRun("queue", command.target,
                                 QueueWait(settings, book, self.ctx.now),
                                 command.return_to_ivr), settings)

    def start_agent(self, call: Call, command: m.AgentCommand) -> None:
        """The agent's extension; with a known skill group, its members after the agent's
        turn (`member_ring_ms`), else a plain transfer to the agent."""
        target = self.ops.authorize(call, command.target)
        if target is None:
            return
        call.agent = target
        call.agent_headers = agent_headers(call, command)
        group_id = command.skill_group_id
        group = self.ctx.settings.skill_groups.get(group_id) if group_id else None
        if group is None or group_id is None:
            if group_id:
                log.warning("call %s: no [skill_groups.%s] section; agent %s only",
                            call.call_id, group_id, target)
            self.ops.transfer(call, target)
            return
        call.queue_name = group_id
        book = self._book("skill_group", group_id, group)
        wait = QueueWait(group, book, self.ctx.now, first=target)
        self._run(call, QueueRun("agent", group_id, wait, return_to_ivr=False), group)

    def _run(self, call: Call, run: QueueRun, settings: QueueSettings) -> None:
        a = call.a
        if a is None or a.phase is LegPhase.TERMINATED:
            return
        if call.phase is not CallPhase.IVR:
            log.warning("call %s: already %s; %s %s ignored", call.call_id,
                        call.phase.value, run.kind, run.name)
            return
        advance_call(call, CallPhase.QUEUED)
        call.queue_run = run
        if a.media.worker is not None:
            self.ctx.to_media(a.media.worker, m.MediaPlay(
                call_id=a.media_id, play_id=HOLD_PLAY_ID, file=settings.hold_music, loop=True))
        self.ops.publish(call, "queued")
        self._do(call, run, run.wait.start(self.ctx.now))

    # ---------------------------------------------------------------- actions

    def _do(self, call: Call, run: QueueRun, actions: list[QueueAction]) -> None:
        work: deque[QueueAction] = deque(actions)
        while work:
            action = work.popleft()
            if isinstance(action, Ring):
                if not self._ring(call, run, action.member):
                    work.extend(run.wait.member_failed(action.member, self.ctx.now))
            elif isinstance(action, Cancel):
                for leg in [lg for lg in call.ringing if lg.member == action.member]:
                    self._drop(call, leg)
            elif isinstance(action, GiveUp):
                self._give_up(call, run)
                return
        self._arm(call, run)

    def _ring(self, call: Call, run: QueueRun, member: str) -> bool:
        legs = self.ops.ring(call, member, f"{call.call_id}-q{run.legs_made + 1}")
        if not legs:
            log.info("call %s: %s %s member %r not found", call.call_id, run.kind, run.name,
                     member)
            return False
        run.legs_made += 1
        return True

    def _drop(self, call: Call, leg: Leg) -> None:
        """Give up on a ringing member leg (CANCEL; a late 2xx gets a BYE)."""
        if leg in call.ringing:
            call.ringing.remove(leg)
        self.ops.give_up_leg(leg)

    def _give_up(self, call: Call, run: QueueRun) -> None:
        self.ctx.timers.cancel(TimerKind.QUEUE, call.call_id)
        call.queue_run = None
        a = call.a
        log.info("call %s: nobody answered in %s %s", call.call_id, run.kind, run.name)
        if a is not None and a.media.worker is not None:
            self.ctx.to_media(a.media.worker, m.MediaStop(call_id=a.media_id))
        if run.return_to_ivr:
            self.ops.publish(call, "queue_returned")
            self.ops.restart_ivr(call, dict(RETURN_VARIABLES))
        else:
            reason = "QueueNoAnswer" if run.kind == "queue" else "AgentNoAnswer"
            self.ops.hangup(call, reason, None)

    def _arm(self, call: Call, run: QueueRun) -> None:
        deadline = run.wait.get_timer()
        if deadline is not None and call.queue_run is run:
            self.ctx.timers.set(TimerKind.QUEUE, call.call_id, deadline)
        else:
            self.ctx.timers.cancel(TimerKind.QUEUE, call.call_id)

    def on_timer(self, call_id: str) -> None:
        call = self.ctx.table.calls.get(call_id)
        if call is None or call.ended or call.queue_run is None:
            return
        run = call.queue_run
        self._do(call, run, run.wait.handle_timer(self.ctx.now))

    # ---------------------------------------------------------------- leg events

    def member_failed(self, leg: Leg, status: int) -> None:
        """A member leg ended without an answer (error response, timeout, no media)."""
        call = leg.call
        if leg in call.ringing:
            call.ringing.remove(leg)
        run = call.queue_run
        if run is None or call.ended or leg.member is None:
            return
        if any(other.member == leg.member for other in call.ringing):
            return  # another phone of the member still rings
        log.info("call %s: %s %s member %s failed with %d", call.call_id, run.kind, run.name,
                 leg.member, status)
        self._do(call, run, run.wait.member_failed(leg.member, self.ctx.now))

    def member_answered(self, leg: Leg) -> bool:
        """A member answered: True if it wins (it becomes `call.b`, the others are
        cancelled); False if the wait is already over (the caller BYEs it)."""
        call = leg.call
        run = call.queue_run
        if (run is None or leg.member is None or leg not in call.ringing
                or run.wait.state is not WaitState.RINGING):
            return False
        call.ringing.remove(leg)
        for other in [lg for lg in call.ringing if lg.member == leg.member]:
            self._drop(call, other)  # the member's other phones stop ringing
        actions = run.wait.member_answered(leg.member, self.ctx.now)
        call.b = leg
        call.queue_member = leg.member
        if run.kind == "queue":
            call.transfer_target = leg.member
        self.ctx.timers.cancel(TimerKind.QUEUE, call.call_id)
        self._do(call, run, actions)
        return True

    def leg_left(self, leg: Leg) -> None:
        """A leg left a call that goes on: when it is the member who answered (an agent
        who transferred its caller elsewhere), the member is free for the queue's next
        caller now, not when the transferred call ends; the wait is over."""
        call = leg.call
        run = call.queue_run
        if run is None or leg.member is None or run.wait.answered_by != leg.member:
            return
        self.ctx.timers.cancel(TimerKind.QUEUE, call.call_id)
        run.wait.book.released(leg.member, self.ctx.now)
        call.queue_run = None

    def call_ended(self, call: Call) -> None:
        """The call is over (every leg is already ended)."""
        run = call.queue_run
        if run is None:
            return
        self.ctx.timers.cancel(TimerKind.QUEUE, call.call_id)
        if run.wait.state is WaitState.RINGING:
            run.wait.abandon()
        elif run.wait.state is WaitState.ANSWERED and run.wait.answered_by is not None:
            run.wait.book.released(run.wait.answered_by, self.ctx.now)
        call.queue_run = None
