"""The front's shell around `pbx.queues`: queue and route_to_agent calls.

`QueueWait` decides whom to ring and when; this module carries its actions out with
the front's B2BUA machinery. A `Ring` becomes an outbound leg (`Front._out_leg` +
`Front._call_out`, on the caller's media worker so the bridge stays local) kept in
`call.ringing`; a `Cancel` CANCELs it (or, if it answers anyway, the front's late-2xx
path BYEs it); `GiveUp` restarts the route's IVR (`return_to_ivr`) or hangs up. While
the caller waits, the queue's hold music loops on the caller's leg. The first member
to answer becomes `call.b` and the front bridges it as it bridges a transfer (the
MediaStop before the MediaBridge ends the hold music).

One `call_at` per waiting call follows `QueueWait.get_timer()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pbx import messages as m
from pbx.config import QueueSettings
from pbx.policy import PROVIDER
from pbx.queues import Cancel, GiveUp, QueueAction, QueueBook, QueueWait, Ring, WaitState

if TYPE_CHECKING:
    from pbx.front import Call, Front, Leg

log = logging.getLogger("pbx.queue")

# Play id of the hold music: far above the IVR's own ids, so no IVR event matches it.
HOLD_PLAY_ID = 1 << 30
# Keep a dropped leg's dialog this long so its late responses still match (Timer B/F).
DIALOG_LINGER_S = 32.0
RETURN_VARIABLES = {"transferred_from": "queue", "return_reason": "no_answer"}


@dataclass
class QueueRun:
    kind: Literal["queue", "agent"]
    name: str
    wait: QueueWait
    return_to_ivr: bool
    timer: asyncio.TimerHandle | None = None
    legs_made: int = 0


class QueueCalls:
    def __init__(self, front: Front) -> None:
        self.front = front
        self.books: dict[tuple[str, str], QueueBook] = {}

    def _book(self, kind: str, name: str, settings: QueueSettings) -> QueueBook:
        key = (kind, name)
        book = self.books.get(key)
        if book is None:
            book = self.books[key] = QueueBook(settings.members)
        return book

    # ---------------------------------------------------------------- commands

    def start_queue(self, call: Call, command: m.QueueCommand) -> None:
        settings = self.front.settings.queues.get(command.target)
        call.queue_name = command.target
        if settings is None:
            log.warning("call %s: no [queues.%s] section; hanging up", call.call_id,
                        command.target)
            self.front._hangup_call(call, f"UnknownQueue({command.target})", 404)
            return
        book = self._book("queue", command.target, settings)
        self._run(call, QueueRun("queue", command.target,
                                 QueueWait(settings, book, self.front.now()),
                                 command.return_to_ivr), settings)

    def start_agent(self, call: Call, command: m.AgentCommand) -> None:
        """The agent's extension; with a known skill group, its members after the agent's
        turn (`member_ring_ms`), else a plain transfer to the agent."""
        target = self.front._authorized_target(call, PROVIDER, command.target)
        if target is None:
            return
        call.agent = target
        group_id = command.skill_group_id
        group = self.front.settings.skill_groups.get(group_id) if group_id else None
        if group is None or group_id is None:
            if group_id:
                log.warning("call %s: no [skill_groups.%s] section; agent %s only",
                            call.call_id, group_id, target)
            self.front._transfer(call, target)
            return
        call.queue_name = group_id
        book = self._book("skill_group", group_id, group)
        wait = QueueWait(group, book, self.front.now(), first=target)
        self._run(call, QueueRun("agent", group_id, wait, return_to_ivr=False), group)

    def _run(self, call: Call, run: QueueRun, settings: QueueSettings) -> None:
        a = call.a
        if a is None or a.state == "terminated":
            return
        if call.queue_run is not None or (call.b is not None and call.b.state != "terminated"):
            log.warning("call %s: already transferring or queued; %s %s ignored",
                        call.call_id, run.kind, run.name)
            return
        call.queue_run = run
        if a.worker is not None:
            self.front.send_media(a.worker, m.MediaPlay(
                call_id=a.media_id, play_id=HOLD_PLAY_ID, file=settings.hold_music, loop=True))
        self.front._publish_call(call, "queued")
        self._do(call, run, run.wait.start(self.front.now()))

    # ---------------------------------------------------------------- actions

    def _do(self, call: Call, run: QueueRun, actions: list[QueueAction]) -> None:
        work: deque[QueueAction] = deque(actions)
        while work:
            action = work.popleft()
            if isinstance(action, Ring):
                if not self._ring(call, run, action.member):
                    work.extend(run.wait.member_failed(action.member, self.front.now()))
            elif isinstance(action, Cancel):
                for leg in [lg for lg in call.ringing if lg.member == action.member]:
                    self._drop(call, leg)
            elif isinstance(action, GiveUp):
                self._give_up(call, run)
                return
        self._arm(call, run)

    def _ring(self, call: Call, run: QueueRun, member: str) -> bool:
        front = self.front
        resolved = front._resolve_target(member)
        if resolved is None:
            log.info("call %s: %s %s member %r not found", call.call_id, run.kind, run.name,
                     member)
            return False
        run.legs_made += 1
        leg = front._out_leg(call, member, resolved, f"{call.call_id}-q{run.legs_made}")
        leg.member = member
        call.ringing.append(leg)
        front._spawn(front._call_out(call, leg), call)
        return True

    def _drop(self, call: Call, leg: Leg) -> None:
        """Give up on a ringing member leg (CANCEL; a late 2xx gets a BYE)."""
        front = self.front
        if leg in call.ringing:
            call.ringing.remove(leg)
        if leg.ring_timer is not None:
            leg.ring_timer.cancel()
            leg.ring_timer = None
        if leg.state == "early":
            front._cancel_outbound(leg)
        leg.state = "terminated"
        front._release_media(leg)
        front.loop.call_later(DIALOG_LINGER_S, front.dialogs.pop, leg.dialog_key, None)

    def _give_up(self, call: Call, run: QueueRun) -> None:
        self._disarm(run)
        call.queue_run = None
        a = call.a
        log.info("call %s: nobody answered in %s %s", call.call_id, run.kind, run.name)
        if a is not None and a.worker is not None:
            self.front.send_media(a.worker, m.MediaStop(call_id=a.media_id))
        if run.return_to_ivr:
            self.front._publish_call(call, "queue_returned")
            self.front._restart_session(call, dict(RETURN_VARIABLES))
        else:
            reason = "QueueNoAnswer" if run.kind == "queue" else "AgentNoAnswer"
            self.front._hangup_call(call, reason, None)

    def _arm(self, call: Call, run: QueueRun) -> None:
        self._disarm(run)
        deadline = run.wait.get_timer()
        if deadline is not None and call.queue_run is run:
            run.timer = self.front.loop.call_at(deadline, self._on_timer, call, run)

    @staticmethod
    def _disarm(run: QueueRun) -> None:
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None

    def _on_timer(self, call: Call, run: QueueRun) -> None:
        run.timer = None
        if call.queue_run is not run or call.ended:
            return
        self._do(call, run, run.wait.handle_timer(self.front.now()))

    # ---------------------------------------------------------------- front events

    def member_failed(self, leg: Leg, status: int) -> None:
        """A member leg ended without an answer (error response, timeout, no media)."""
        call = leg.call
        if leg in call.ringing:
            call.ringing.remove(leg)
            self.front.loop.call_later(DIALOG_LINGER_S, self.front.dialogs.pop, leg.dialog_key, None)
        run = call.queue_run
        if run is None or call.ended or leg.member is None:
            return
        log.info("call %s: %s %s member %s failed with %d", call.call_id, run.kind, run.name,
                 leg.member, status)
        self._do(call, run, run.wait.member_failed(leg.member, self.front.now()))

    def member_answered(self, leg: Leg) -> bool:
        """A member answered: True if it wins (it becomes `call.b`, the others are
        cancelled); False if the wait is already over (the front BYEs it)."""
        call = leg.call
        run = call.queue_run
        if (run is None or leg.member is None or leg not in call.ringing
                or run.wait.state is not WaitState.RINGING):
            return False
        call.ringing.remove(leg)
        actions = run.wait.member_answered(leg.member, self.front.now())
        call.b = leg
        call.queue_member = leg.member
        if run.kind == "queue":
            call.transfer_target = leg.member
        self._disarm(run)
        self._do(call, run, actions)
        return True

    def call_ended(self, call: Call) -> None:
        """The call is over (the front has already ended every leg)."""
        run = call.queue_run
        if run is None:
            return
        self._disarm(run)
        if run.wait.state is WaitState.RINGING:
            run.wait.abandon()
        elif run.wait.state is WaitState.ANSWERED and run.wait.answered_by is not None:
            run.wait.book.released(run.wait.answered_by, self.front.now())
        call.queue_run = None
