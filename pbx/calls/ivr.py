"""The IVR broker: a call's sessions, their events to executors, their replies applied.

One event in flight per session (DESIGN §1): call events queue up behind it. An event
goes to the least busy live executor; one whose plane refuses it is not asked again
for that event; with none available the session waits for an executor's heartbeat.
The liveness check (`check`) makes sure no session waits in silence: an unanswered
event is re-sent once to another executor, then the call ends (IvrTimeout), as it does
when no executor takes it for IVR_NO_EXECUTOR_S; a session waiting for a call event
past its own bound hears a WaitExpiredInput.

A reply's commands are applied in order (`apply`): media commands reach the caller's
worker or the call ends with a traced error (MediaCommandLost); transfers, queues and
agents hand the call on; a session that ends without handing the call to anyone ends
the call.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.calls.context import CallContext, ToIvr, reason_phrase
from pbx.calls.events import CallEvents
from pbx.calls.media import MediaPlane
from pbx.calls.outbound import Outbound
from pbx.calls.queue import QueueCalls
from pbx.calls.state import Call, CallPhase, Leg, Session, advance_call
from pbx.calls.targets import Targets
from pbx.calls.teardown import Teardown
from pbx.policy import PROVIDER
from pbx.redact import is_secret_header
from pbx.sip.message import SipRequest

log = logging.getLogger("pbx.calls")

# How long an IVR event may stay unanswered beyond the provider's own retry budget
# before it is re-sent once to another executor, and then the call is given up.
IVR_REPLY_MARGIN_S = 15.0
# How long a session may wait for any executor at all.
IVR_NO_EXECUTOR_S = 10.0
# Phases in which the call belongs to the IVR (else it was handed over).
IVR_PHASES = frozenset({CallPhase.SETUP, CallPhase.IVR})
# End reasons of a hand-over that did not work (the call's end reason starts with one).
HANDOVER_FAILURES = ("TransferFailed", "UnknownQueue", "QueueNoAnswer", "AgentNoAnswer",
                     "WsBridgeFailed")


def ivr_event(session_id: str, seq: int, state: str | None, item: Any) -> m.IvrEvent:
    """An event for the executor. Validated but for `state`, which goes in as it is:
    it is the text of the executor's last reply (its length checked then; a str cannot
    change). `model_construct` walks every field in Python (4.7 us); this is 3.2 us
    (timeit, perf/README.md), twice a call. `state=None` is given so that the field
    counts as set, as it did with `model_construct`."""
    event = m.IvrEvent(session_id=session_id, seq=seq, state=None, input=item)
    event.__dict__["state"] = state
    return event


class IvrBroker:
    def __init__(self, ctx: CallContext, media: MediaPlane, teardown: Teardown,
                 outbound: Outbound, queue: QueueCalls, targets: Targets,
                 events: CallEvents) -> None:
        self.ctx = ctx
        self.media = media
        self.teardown = teardown
        self.outbound = outbound
        self.queue = queue
        self.targets = targets
        self.events = events
        teardown.before_hangup.append(self._handover_failed)

    # ---------------------------------------------------------------- sessions

    def start(self, call: Call, req: SipRequest) -> None:
        """The route's IVR takes the call (its INVITE's headers become `sip_*` variables;
        no secret header does: credentials stay in the front, DESIGN §6)."""
        route = call.route
        assert route is not None
        headers = {name: value for name, value in req.headers.items()
                   if name not in ("Via", "Content-Length") and not is_secret_header(name)}
        info = m.CallInfo(
            call_id=call.call_id, session_id=call.call_id, caller=call.caller,
            callee=call.callee, route_name=route.name, params=route.app_params,
            sip_headers=headers, variables=self._call_variables(call),
        )
        advance_call(call, CallPhase.IVR)
        self._open(call, info)

    @staticmethod
    def _call_variables(call: Call) -> dict[str, str]:
        """Variables every session of the call starts with: `caller_trust` tells the
        provider whether `caller` was verified (extension: digest; trusted: a trusted
        network; anonymous: an unverified From)."""
        return {"caller_trust": call.party.kind.value}

    def _open(self, call: Call, info: m.CallInfo) -> None:
        session = Session(session_id=info.session_id, call=call, info=info)
        call.session = session
        call.session_ids.append(info.session_id)
        self.ctx.table.sessions[info.session_id] = session
        self.input(session, m.SessionStartInput(call=info))

    def restart(self, call: Call, variables: dict[str, str]) -> None:
        """Start the route's IVR again on the call (back from a queue): a new session
        (`<call id>-<n>`) with the first one's call info and these variables."""
        old = call.session
        if call.ended or old is None:
            return
        if not old.done:  # cannot happen after a queue command; never run two sessions
            log.warning("call %s: session %s still running; not restarting", call.call_id,
                        old.session_id)
            return
        session_id = f"{call.call_id}-{len(call.session_ids) + 1}"
        info = old.info.model_copy(update={
            "session_id": session_id,
            "variables": {**self._call_variables(call), **variables}})
        advance_call(call, CallPhase.IVR)
        self._open(call, info)

    def input(self, session: Session, item: Any) -> None:
        session.queue.append(item)
        self._dispatch(session)

    def call_ended(self, call: Call) -> None:
        session = call.session
        if session is not None and not session.done:
            self.input(session, m.CallEndedInput(reason="Hangup"))

    # ---------------------------------------------------------------- events out

    def _dispatch(self, session: Session, resend: bool = False,
                  exclude: frozenset[bytes] = frozenset()) -> None:
        """Send the session's next event, one in flight at a time (DESIGN §1)."""
        ctx = self.ctx
        now = ctx.now
        if session.in_flight is None:
            if not session.queue:
                return
            session.seq += 1
            session.attempts = 0
            session.dispatched_at = now
            session.wait_started = session.wait_deadline = None  # an event came
            session.refused = set()
            session.in_flight = ivr_event(session.session_id, session.seq, session.state,
                                          session.queue.popleft())
        elif not resend:
            return
        executor = ctx.executors.choose(now, exclude | session.refused)
        if executor is None:
            if session.unplaced_since is None:
                session.unplaced_since = now
            if session.waiting_since is None:
                session.waiting_since = now
                ctx.table.waiting_sessions.append(session)
            return
        session.executor = executor
        session.sent_at = now
        session.attempts += 1
        session.waiting_since = None
        session.unplaced_since = None
        ctx.out.append(ToIvr(executor, session.in_flight))

    def send_failed(self, executor: bytes, event: m.IvrEvent) -> None:
        """The plane refused an event (the executor's queue is full, or it is gone): the
        others are tried for it."""
        session = self.ctx.table.sessions.get(event.session_id)
        if (session is None or session.in_flight is None or session.executor != executor
                or session.in_flight.seq != event.seq):
            return
        self.ctx.executors.release(executor)
        session.executor = None
        session.refused.add(executor)
        self._dispatch(session, resend=True)

    def executor_lost(self, identity: bytes) -> None:
        for session in list(self.ctx.table.sessions.values()):
            if session.executor == identity and session.in_flight is not None:
                session.executor = None
                self._dispatch(session, resend=True, exclude=frozenset({identity}))

    def _refresh_in_flight(self, identity: bytes, working: dict[str, int]) -> None:
        """An executor's heartbeat lists what it works on: those events stay alive however
        long they take; one it should have but does not list was lost on the way."""
        ctx = self.ctx
        grace_s = 2 * ctx.settings.ivr.heartbeat_ms / 1000 + 1.0
        for session in list(ctx.table.sessions.values()):
            if session.executor != identity or session.in_flight is None:
                continue
            if working.get(session.session_id) == session.in_flight.seq:
                session.sent_at = ctx.now
            elif ctx.now - session.sent_at > grace_s:
                log.warning("session %s: event %d lost on the way to %r; re-sending",
                            session.session_id, session.in_flight.seq, identity)
                ctx.executors.release(identity)
                session.executor = None
                self._dispatch(session, resend=True)

    def _reply_deadline_s(self, session: Session) -> float:
        retry = session.info.params.retry
        budget = (retry.max_retries + 1) * (retry.timeout_ms / 1000 + 0.1)
        return budget + IVR_REPLY_MARGIN_S

    def check(self) -> None:
        """No session waits in silence (see the module text)."""
        ctx = self.ctx
        now = ctx.now
        for identity in ctx.executors.expire(now):
            log.warning("IVR executor %r stopped heartbeating: re-sending its events",
                        identity)
            ctx.stats["ivr_executors_lost"] += 1
            self.executor_lost(identity)
        watch = ctx.settings.sessions
        for session in list(ctx.table.sessions.values()):
            if session.done:
                continue
            in_flight = session.in_flight
            if in_flight is None:
                if (not session.queue and session.wait_deadline is not None
                        and now >= session.wait_deadline):
                    self._wait_expired(session)
                continue
            if now - session.dispatched_at > watch.max_event_ms / 1000:
                log.warning("session %s: event %d still unanswered after %.0f s; ending "
                            "the call", session.session_id, in_flight.seq,
                            now - session.dispatched_at)
                if session.executor is not None:
                    ctx.executors.release(session.executor)
                self._abandon(session, "IvrTimeout", f"event {in_flight.seq} unanswered "
                              f"for {now - session.dispatched_at:.0f} s")
                continue
            if session.executor is None:
                if session.unplaced_since is not None and (
                        now - session.unplaced_since > IVR_NO_EXECUTOR_S):
                    log.warning("session %s: no IVR executor available; ending the call",
                                session.session_id)
                    self._abandon(session, "NoExecutor", f"no IVR executor took event "
                                  f"{in_flight.seq} for {now - session.unplaced_since:.0f} s")
                continue
            if now - session.sent_at < self._reply_deadline_s(session):
                continue
            stuck = session.executor
            ctx.executors.release(stuck)
            if session.attempts < 2:
                log.warning("session %s: no reply from %r; re-sending", session.session_id,
                            stuck)
                session.executor = None
                self._dispatch(session, resend=True, exclude=frozenset({stuck}))
            else:
                log.warning("session %s: no reply after %d attempts; ending the call",
                            session.session_id, session.attempts)
                self._abandon(session, "IvrTimeout", f"no reply to event {in_flight.seq} "
                              f"after {session.attempts} attempts")

    def _wait_expired(self, session: Session) -> None:
        """The session heard no call event by its deadline: what it waited for was lost
        (a media command or its event). It is told, and tells its provider."""
        now = self.ctx.now
        started = session.wait_started if session.wait_started is not None else now
        waited_ms = max(0, round((now - started) * 1000))
        log.warning("session %s: no call event for %d ms (its own bound: %s): telling "
                    "the session", session.session_id, waited_ms,
                    "none" if session.wait_ms is None else f"{session.wait_ms} ms")
        self.ctx.stats["ivr_waits_expired"] += 1
        session.wait_started = session.wait_deadline = None
        self.input(session, m.WaitExpiredInput(waited_ms=waited_ms))

    def _abandon(self, session: Session, reason: str, detail: str = "") -> None:
        """Give up on the session: the call ends with `reason`, and the trace says why;
        unless the call has left the IVR already (`closing`: a REFER took it, and only
        the session's goodbye was left to deliver), which it is not the session's to end."""
        self.events.front_trace(session, f"{reason}: {detail}" if detail else reason, reason)
        stuck = session.executor
        self._close(session)
        self._farewell(session, reason, stuck)
        if not session.closing:
            self.teardown.hangup(session.call, reason, 500)

    def _farewell(self, session: Session, reason: str, stuck: bytes | None) -> None:
        """Best effort, so the provider hears `/end` (`reason`) for a session the front
        gave up on: the call's end, on the session's last state, to another executor if
        one has room. Its reply finds no session and is dropped; the executor's next
        heartbeat corrects the load counted for it. Nothing to send when no step was
        ever answered (no state) or no other executor is there."""
        ctx = self.ctx
        if not session.state:
            return
        executor = ctx.executors.choose(ctx.now, frozenset({stuck}) if stuck else frozenset())
        if executor is None:
            return
        ctx.stats["ivr_farewells"] += 1
        ctx.out.append(ToIvr(executor, ivr_event(session.session_id, session.seq + 1,
                                                 session.state,
                                                 m.CallEndedInput(reason=reason))))

    def _close(self, session: Session) -> None:
        session.done = True
        session.in_flight = None
        session.executor = None
        session.queue.clear()
        self.ctx.table.sessions.pop(session.session_id, None)
        self.ctx.table.release_call(session.call)

    # ---------------------------------------------------------------- executors' messages

    def on_message(self, identity: bytes, msg: Any) -> None:
        ctx = self.ctx
        if isinstance(msg, m.IvrReady | m.IvrHeartbeat):
            load = 0 if isinstance(msg, m.IvrReady) else msg.busy
            if ctx.executors.ready(identity, msg.capacity, load, ctx.now):
                log.info("IVR executor %s joined", msg.executor_id)
            if isinstance(msg, m.IvrHeartbeat):
                self._refresh_in_flight(identity, msg.working)
            # Take the queue as it is: sessions that still find no room queue up again.
            waiting, ctx.table.waiting_sessions = ctx.table.waiting_sessions, deque()
            for session in waiting:
                session.waiting_since = None
                session.refused = set()
                if not session.done:
                    self._dispatch(session, resend=True)
            return
        if not ctx.executors.seen(identity, ctx.now):
            return
        if isinstance(msg, m.IvrReply):
            self._on_reply(identity, msg)

    def _on_reply(self, identity: bytes, reply: m.IvrReply) -> None:
        ctx = self.ctx
        session = ctx.table.sessions.get(reply.session_id)
        if session is None or session.in_flight is None:
            return  # a late answer from an executor we gave up on
        if identity != session.executor:
            # Only the executor the event went to may steer the call (DESIGN §6).
            ctx.stats["ivr_replies_rejected"] += 1
            log.warning("session %.64s: reply seq %d from %.64r, but the event went to "
                        "%.64r: ignored", session.session_id, reply.seq, identity,
                        session.executor)
            return
        if reply.seq != session.in_flight.seq:
            return  # an answer to an event already answered
        ctx.executors.release(identity)
        session.in_flight = None
        session.executor = None
        session.state = reply.state  # the text as it came: only executors read it
        session.step_index = reply.step_index
        session.end_reason = reply.end_reason
        for trace in reply.traces:
            if ctx.metrics.step_trace(session.info.route_name, trace, session.digit_at):
                session.digit_at = None
            self.events.trace(trace)
        call = session.call
        if session.closing and reply.commands:
            # The call left the IVR (a REFER) and the session was told: what it still
            # asked for is obsolete, not lost.
            log.debug("session %s: %d command(s) after the call left the IVR ignored",
                      session.session_id, len(reply.commands))
        for command in reply.commands if not session.closing else ():
            self.apply(call, command)
        if reply.done or (call.ended and not session.queue):
            self._close(session)
            if not call.ended and not session.closing and call.phase in IVR_PHASES:
                # The session ended without hanging up or handing the call to anyone
                # (a transfer, queue, agent or WebSocket): nothing would ever end it.
                self.events.front_trace(session, "the session ended and left the call to "
                                        "nobody", "IvrEndedWithoutHandover")
                self.teardown.hangup(call, "IvrEndedWithoutHandover", 500)
            return
        if session.in_flight is None and not call.ended:
            # Now it waits for a call event: for as long as the reply says, or at most
            # `[sessions] max_wait_ms` when it gives no bound of its own (issue 8).
            watch = ctx.settings.sessions
            bound_ms = reply.wait_ms if reply.wait_ms is not None else watch.max_wait_ms
            session.wait_ms = reply.wait_ms
            session.wait_started = ctx.now
            session.wait_deadline = ctx.now + (bound_ms + watch.wait_grace_ms) / 1000
        self._dispatch(session)

    # ---------------------------------------------------------------- commands

    def apply(self, call: Call, command: Any) -> None:
        """One command of an executor's reply. A media command either reaches the
        caller's media worker or the call ends with a traced error (issue 8: a command
        dropped in silence leaves a session waiting for an event that never comes)."""
        a = call.a
        if call.ended or a is None:
            return  # the call is over: nothing left to command
        if call.phase not in IVR_PHASES:
            # An earlier command of the reply handed the call over (transfer, queue,
            # agent, WebSocket): the rest is not the IVR's to do.
            log.warning("call %s: %s after the call left the IVR (%s): ignored",
                        call.call_id, command.type, call.phase.value)
            return
        if isinstance(command, m.PlayCommand):
            self._to_media(call, a, command, m.MediaPlay(
                call_id=a.media_id, play_id=command.play_id, file=command.file,
                interruptible=command.interruptible))
        elif isinstance(command, m.StopCommand):
            self._to_media(call, a, command, m.MediaStop(call_id=a.media_id))
        elif isinstance(command, m.TimerCommand):
            self._to_media(call, a, command, m.MediaTimer(
                call_id=a.media_id, timer_id=command.timer_id, delay_ms=command.delay_ms))
        elif isinstance(command, m.HangupCommand):
            self.teardown.hangup(call, command.reason, command.code)
        elif isinstance(command, m.TransferCommand):
            target = self.targets.authorize(call, PROVIDER, command.target)
            if target is None:
                self.refused_target(call, command.target)
            else:
                self.outbound.transfer(call, target)
        elif isinstance(command, m.RecordCommand):
            if self._to_media(call, a, command, m.MediaRecord(
                    call_id=a.media_id, **command.model_dump(exclude={"type"}))):
                media = self.ctx.settings.media
                area_dir = {"recordings": media.recordings_dir, "voicemail": media.voicemail_dir,
                            "asr": self.ctx.settings.asr.spool_dir}[command.area]
                # Completed by the RecordingFinished event; one the call's end cut short
                # keeps reason null (the file is there, written as it went).
                call.recordings.append({
                    "record_id": command.record_id, "path": command.path,
                    "area": command.area, "file": str(Path(area_dir) / command.path),
                    "duration_ms": None, "reason": None})
        elif isinstance(command, m.StopRecordCommand):
            self._to_media(call, a, command, m.MediaRecordStop(call_id=a.media_id))
        elif isinstance(command, m.WsBridgeCommand):
            self._ws_bridge(call, a, command)
        elif isinstance(command, m.QueueCommand):
            self.queue.start_queue(call, command)
        elif isinstance(command, m.AgentCommand):
            self.queue.start_agent(call, command)

    def _handover_failed(self, call: Call, reason: str, code: int | None) -> None:
        """A terminal action (transfer, queue, agent, WebSocket bridge) failed after the
        session ended, and after its provider heard `/end` name it (`Transfer(2001)`):
        the session's traces say so, with the call's end reason (which the call record
        carries too), so that trace subscribers and the debug page see the outcome."""
        session = call.session
        if session is None or not reason.startswith(HANDOVER_FAILURES):
            return
        ended = session.end_reason
        self.events.front_trace(session, f"{ended or 'the hand-over'} failed: {reason}",
                                reason)

    def refused_target(self, call: Call, target: str) -> None:
        """A transfer target the policy refused: the call ends (403)."""
        self.teardown.hangup(call, f"TransferFailed({reason_phrase(target, 80)})", 403)

    def _ws_bridge(self, call: Call, a: Leg, command: m.WsBridgeCommand) -> None:
        """The IVR ends here; the bridge's end (WsBridgeEnded) ends the call."""
        call.ws_bridge = command.uri
        if a.media.worker is None:
            self.teardown.hangup(call, "WsBridgeFailed(media)", 503)
            return
        advance_call(call, CallPhase.WS_BRIDGED)
        if self._to_media(call, a, command, m.MediaStop(call_id=a.media_id)) and (
                self._to_media(call, a, command, m.MediaWsBridge(
                    call_id=a.media_id, uri=command.uri, headers=command.headers,
                    timeout_ms=command.timeout_ms))):
            self.events.call(call, "ws_bridged")

    def _to_media(self, call: Call, leg: Leg, command: Any, msg: Any) -> bool:
        """Hand a session's command to the leg's media worker; with none, the call ends
        with a traced error (the plane refusing it comes back as `command_lost`)."""
        if self.media.command(leg, msg, command.type):
            return True
        self.command_lost(call, command.type, "the caller's leg has no media worker")
        return False

    def command_lost(self, call: Call, command_type: str, why: str) -> None:
        if call.ended:
            return
        log.warning("call %s: %s command lost (%s); ending the call", call.call_id,
                    command_type, why)
        self.ctx.stats["ivr_commands_lost"] += 1
        if call.session is not None:
            self.events.front_trace(call.session, f"{command_type} command lost: {why}",
                                    "MediaCommandLost")
        self.teardown.hangup(call, "MediaCommandLost", 503)

    def media_event(self, call: Call, event: Any) -> None:
        """A media event of the caller's leg: to the IVR session while it runs; a
        recording's end goes in the call record; the WebSocket bridge's end, once the
        IVR has handed the call to it, ends the call."""
        if isinstance(event, m.RecordingFinished):
            for rec in call.recordings:
                if rec["record_id"] == event.record_id and rec["path"] == event.path:
                    rec.update(duration_ms=event.duration_ms, reason=event.reason)
                    break
            else:
                call.recordings.append({"record_id": event.record_id, "path": event.path,
                                        "duration_ms": event.duration_ms,
                                        "reason": event.reason})
        session = call.session
        if session is not None and not session.done:
            if isinstance(event, m.DtmfDigit):
                session.digit_at = self.ctx.wall()  # for the DTMF -> provider latency
            self.input(session, m.MediaInput(event=event))
        elif isinstance(event, m.WsBridgeEnded) and call.ws_bridge is not None:
            log.info("call %s: WebSocket bridge ended: %s", call.call_id, event.reason)
            self.teardown.hangup(call, "WsBridgeEnded", None)
