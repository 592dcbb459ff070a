"""How a call ends: every leg closed the way its phase asks, every resource given back.

`hangup` ends every leg of the call (BYE where confirmed, CANCEL where ringing out, a
final response where an inbound INVITE is unanswered) and then `end` releases what the
call held: budgets, timers, ports, dialogs (after a linger), the record. Parts of the
call layer that must hear of the end register hooks: `before_hangup` (a REFER's final
NOTIFY) and `on_ended` (the IVR session, the queue wait); `on_leg_left` hears of one leg
leaving a call that goes on (a queue's agent who transferred its caller is free).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pbx.calls.context import CallContext
from pbx.calls.events import CallEvents
from pbx.calls.legs import LegSignaling
from pbx.calls.media import MediaPlane
from pbx.calls.session_timer import SessionTimers
from pbx.calls.state import Call, CallPhase, Leg, LegPhase, advance_call, advance_leg
from pbx.calls.timers import TimerKind
from pbx.records import call_record

log = logging.getLogger("pbx.calls")

CallHook = Callable[[Call, str, "int | None"], None]


class Teardown:
    def __init__(self, ctx: CallContext, legs: LegSignaling, media: MediaPlane,
                 session_timers: SessionTimers, events: CallEvents) -> None:
        self.ctx = ctx
        self.legs = legs
        self.media = media
        self.session_timers = session_timers
        self.events = events
        self.before_hangup: list[CallHook] = []
        self.on_ended: list[Callable[[Call], None]] = []
        self.on_leg_left: list[Callable[[Leg], None]] = []

    def hangup(self, call: Call, reason: str, code: int | None,
               except_leg: Leg | None = None) -> None:
        """End every leg of the call, then the call."""
        if call.ended:
            return
        for hook in self.before_hangup:
            hook(call, reason, code)
        for leg in call.legs():
            if leg is except_leg:
                continue
            if leg.phase is LegPhase.CONFIRMED:
                self.legs.send_bye(leg, code if leg is call.a else None, reason)
            elif leg.outbound and leg.phase in (LegPhase.EARLY, LegPhase.PENDING):
                self.legs.give_up(leg)
            elif leg.phase is LegPhase.EARLY and leg.invite_key is not None:
                final = code if code is not None and 300 <= code <= 699 else 480
                self.legs.reject(leg, final)
        self.end(call, reason, code)

    def end(self, call: Call, reason: str, code: int | None) -> None:
        """The call is over (its legs are already closed): give back what it held."""
        if call.ended:
            return
        ctx = self.ctx
        advance_call(call, CallPhase.ENDED)
        ctx.timers.cancel(TimerKind.RING, call.call_id)
        call.end_reason, call.end_code = reason, code
        ctx.metrics.call_ended(reason)
        call.ended_at = ctx.wall()
        # Legs whose RTP statistics (MediaReleased) the call record waits for.
        stats_legs = {leg.media_id: name for name, leg in (("a", call.a), ("b", call.b))
                      if leg is not None and leg.media.worker is not None}
        for leg in call.legs():
            self.release_leg(leg)
        for hook in self.on_ended:
            hook(call)
        ctx.table.remove_call(call)
        self.events.call(call, "ended")
        ctx.records.finish(call_record(call), stats_legs, ctx.now)
        ctx.table.release_call(call)

    def leg_over(self, leg: Leg, reason: str, code: int | None) -> None:
        """One leg's dialog is over on our side (its 2xx never ACKed, its session
        expired): the call ends, unless the leg is a referrer detached from its bridge,
        whose peer's transfer goes on without it; that leg alone gets its BYE."""
        if leg in leg.call.detached:
            self.legs.send_bye(leg, code, reason)
            self.drop_leg(leg)
            return
        self.hangup(leg.call, reason, code)

    def release_leg(self, leg: Leg) -> None:
        """Give back what one leg holds: budgets, timers, 2xx retransmission, its port;
        its dialog lingers."""
        ctx = self.ctx
        ctx.table.end_source_call(leg)
        self.session_timers.stop(leg)
        self.legs.linger_client_txn(leg.refresh_key)  # a refresh that may never be answered
        if leg.bye_waiting is None:  # else our 2xx goes on until its ACK (§15)
            ctx.retransmitter.ack(leg.dialog_key)
        self.media.release(leg)
        self.legs.linger(leg)

    def drop_leg(self, leg: Leg) -> None:
        """One leg leaves a call that goes on (a referrer after its NOTIFY)."""
        if leg.phase is not LegPhase.TERMINATED:
            advance_leg(leg, LegPhase.TERMINATED)
        self.release_leg(leg)
        if leg in leg.call.detached:
            leg.call.detached.remove(leg)
        for hook in self.on_leg_left:
            hook(leg)

    def shutdown(self) -> None:
        """On SIGTERM: end every call properly so phones are not left in dead calls."""
        for call in list(self.ctx.table.calls.values()):
            try:
                self.hangup(call, "Shutdown", 503)
            except Exception:
                log.exception("call %s: could not end it at shutdown", call.call_id)
