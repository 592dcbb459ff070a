"""Session timers (RFC 4028) on our dialogs.

A session-refresh request (an INVITE or UPDATE with Session-Expires) gets its 2xx
headers from `negotiate`, which also arms the leg's timer. When the peer refreshes, the
session expires `SESSION_EXPIRY_MARGIN_S` before the interval ends (§10) and the call
ends with BYE. When we refresh, at half the interval (§7.4), we send an UPDATE without
SDP if the peer allows UPDATE, else a re-INVITE with our current SDP unchanged (same o=
version: RFC 3264 §8; trunks, SBCs and older phones do not allow UPDATE). Its answer
(`answered`, routed here by pbx.calls.outbound; the 2xx of a re-INVITE is ACKed there):

* 2xx: the timer as its Session-Expires says (§7.2: the refresher and interval; none
  from a peer that does timers turns them off);
* 408, 481 or no answer: the peer lost the session, which ends with BYE (§10);
* 491 (glare with the peer's re-INVITE): retried after RFC 3261 §14.1's random delay;
* 422: retried once with the Min-SE asked (§7.4);
* anything else: the call goes on, the next refresh as armed (§10 ends only on 408/481).

Our re-INVITE never overlaps one of theirs: theirs while ours is pending gets 491
(pbx.calls.dialogs); and theirs, answered, re-arms (or stops) our timer (`negotiate`),
so ours is not due while theirs awaits its ACK (at most 64*T1, far below half of
`MIN_SE_S`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from pbx.calls.context import ALLOW, SUPPORTED, CallContext
from pbx.calls.state import Leg, LegPhase
from pbx.calls.timers import TimerKind
from pbx.sip.dialog import new_request
from pbx.sip.errors import SipError
from pbx.sip.fields import parse_session_expires
from pbx.sip.grammar import is_digits
from pbx.sip.message import SipRequest, SipResponse, new_tag
from pbx.sip.transaction import T1, TransactionKey

log = logging.getLogger("pbx.calls")

# The smallest session interval we accept (RFC 4028 §4's floor), and how long before the
# session's expiry the side that does not refresh gives up on it (§10).
MIN_SE_S = 90
SESSION_EXPIRY_MARGIN_S = 32
# The largest interval a peer's 2xx or 422 makes us use (a day): a Min-SE of years
# would mean no refresh at all.
MAX_SE_S = 86_400
# How long the 2xx of our re-INVITE keeps matching its leg, for its retransmissions'
# ACKs (RFC 6026: the client transaction's Accepted state lasts 64*T1).
REINVITE_2XX_LINGER_S = 64 * T1


def session_expires(req: SipRequest) -> tuple[int, str | None] | None:
    """(interval, refresher) of the request's Session-Expires; SipError 400 if bad."""
    text = req.headers.get("Session-Expires")
    return None if text is None else parse_session_expires(text)


class SessionTimers:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        # Ends a leg whose peer lost the session (pbx.calls.teardown `leg_over`, wired
        # by pbx.calls.core: the teardown needs us first).
        self.end_leg: Callable[[Leg, str, int | None], None] = lambda leg, reason, code: None

    def refused_too_small(self, req: SipRequest, key: TransactionKey) -> bool:
        """RFC 4028 §8.1: 422 with our Min-SE for an interval below it."""
        se = session_expires(req)
        if se is None or se[0] >= MIN_SE_S:
            return False
        self.ctx.respond(key, req, 422, "Session Interval Too Small",
                         to_tag=None if req.to_tag else new_tag(),
                         headers=[("Min-SE", str(MIN_SE_S))])
        return True

    def negotiate(self, leg: Leg, req: SipRequest) -> list[tuple[str, str]]:
        """The 2xx's session-timer headers for a session-refresh request (§9), and the
        leg's timer re-armed: without Session-Expires there is none; with it, the
        refresher is as requested (else the UAC), or us when the UAC does not support
        the extension."""
        self.stop(leg)
        allow = [a.strip().upper() for a in req.headers.get_all("Allow")]
        leg.peer_allows_update = "UPDATE" in allow
        supported = any(t.strip().lower() == "timer" for name in ("Supported", "Require")
                        for t in req.headers.get_all(name))
        leg.peer_supports_timer = supported
        se = session_expires(req)
        if se is None:
            return []
        interval, refresher = se
        if not supported:
            refresher = "uas"
        elif refresher not in ("uac", "uas"):
            refresher = "uac"
        headers = [("Session-Expires", f"{interval};refresher={refresher}")]
        if supported:
            headers.append(("Require", "timer"))
        leg.session_interval, leg.we_refresh = interval, refresher == "uas"
        self._arm(leg)
        return headers

    def _arm(self, leg: Leg) -> None:
        interval, now = leg.session_interval, self.ctx.now
        if leg.we_refresh:
            self.ctx.timers.set(TimerKind.SESSION_REFRESH, leg.dialog_key, now + interval / 2)
        else:
            wait = interval - min(SESSION_EXPIRY_MARGIN_S, interval / 3)
            self.ctx.timers.set(TimerKind.SESSION_EXPIRY, leg.dialog_key, now + wait)

    def stop(self, leg: Leg) -> None:
        leg.session_interval = 0
        self.ctx.timers.cancel(TimerKind.SESSION_REFRESH, leg.dialog_key)
        self.ctx.timers.cancel(TimerKind.SESSION_EXPIRY, leg.dialog_key)

    def refresh(self, leg: Leg) -> None:
        """Our refresh is due (§7.4): an UPDATE without SDP if the peer allows UPDATE,
        else a re-INVITE with our SDP; the next one armed."""
        if leg.phase is not LegPhase.CONFIRMED or leg.call.ended or not leg.session_interval:
            return
        if leg.refresh_key is not None:
            # Our last refresh got no final answer in half an interval (a re-INVITE
            # stuck after a 1xx has no Timer B): the session is as good as expired.
            log.info("call %s: session refresh of %s unanswered", leg.call.call_id,
                     leg.media_id)
            self.lost(leg)
            return
        self._send(leg, MIN_SE_S)
        self._arm(leg)

    def _send(self, leg: Leg, min_se: int) -> None:
        headers = [("Session-Expires", f"{leg.session_interval};refresher=uac"),
                   ("Min-SE", str(min_se)), ("Supported", SUPPORTED)]
        if leg.peer_allows_update:
            req = new_request(leg.dialog, self.ctx.me, "UPDATE", headers)
        elif leg.media.answer_sdp:
            # Our current SDP: the session does not change (RFC 3264 §8, same o= version).
            req = new_request(leg.dialog, self.ctx.me, "INVITE",
                              [*headers, ("Allow", ALLOW)], body=leg.media.answer_sdp)
        else:
            log.info("call %s: no SDP of ours on %s to refresh its session with",
                     leg.call.call_id, leg.media_id)
            return
        key = self.ctx.send_request(req, leg.addr, leg.reliable)
        leg.refresh_key = key
        # Its answer or timeout comes back through pbx.calls.outbound.
        self.ctx.table.client_txns[key] = leg

    def answered(self, leg: Leg, resp: SipResponse, key: TransactionKey) -> None:
        """A response to our session refresh (`key`; its 2xx ACKed by the caller)."""
        if resp.status < 200:
            return
        ctx = self.ctx
        if resp.status < 300 and key.method == "INVITE":
            # Its retransmissions keep coming until our ACK arrives: each is ACKed.
            ctx.timers.set(TimerKind.CLIENT_TXN_LINGER, key, ctx.now + REINVITE_2XX_LINGER_S)
        else:
            ctx.table.client_txns.pop(key, None)
        if key != leg.refresh_key:
            return  # a retransmitted 2xx
        leg.refresh_key = None
        retried, leg.refresh_retried = leg.refresh_retried, False
        if leg.phase is not LegPhase.CONFIRMED or leg.call.ended:
            return
        status = resp.status
        if status < 300:
            self._learn(leg, resp)
        elif status in (408, 481):
            self.lost(leg)
        elif status == 491:
            self._retry_after_glare(leg)
        elif status == 422 and not retried and self._retry_with_min_se(leg, resp):
            return
        else:
            # §10 ends the session only on 408/481: the next refresh comes as armed.
            log.info("call %s: session refresh of %s answered %d; the call goes on",
                     leg.call.call_id, leg.media_id, status)

    def timed_out(self, leg: Leg, key: TransactionKey) -> None:
        """Our session refresh got no answer (Timer B or F): the session is lost."""
        if key == leg.refresh_key:
            leg.refresh_key = None
        self.lost(leg)

    def lost(self, leg: Leg) -> None:
        """The peer has lost the session: it ends with a BYE (RFC 4028 §10, RFC 3261
        §12.2.1.2)."""
        if leg.phase is LegPhase.CONFIRMED and not leg.call.ended:
            log.info("call %s: session refresh of %s failed", leg.call.call_id, leg.media_id)
            self.end_leg(leg, "SessionExpired", 408)

    def _learn(self, leg: Leg, resp: SipResponse) -> None:
        """The timer as the 2xx to our refresh says (§7.2; we were its UAC)."""
        text = resp.headers.get("Session-Expires")
        if text is None:
            if leg.peer_supports_timer:
                # A peer that does timers answered without one: there is no session
                # expiration now, and no refresh is needed (§7.2).
                log.info("call %s: %s turned the session timer off", leg.call.call_id,
                         leg.media_id)
                self.stop(leg)
            # A peer without the extension never says; we refresh for it (§9).
            return
        try:
            interval, refresher = parse_session_expires(text)
        except SipError as exc:
            log.info("call %s: %s; the timer stays as it was", leg.call.call_id, exc)
            return
        self.stop(leg)
        leg.session_interval = min(max(interval, MIN_SE_S), MAX_SE_S)
        leg.we_refresh = refresher != "uas"
        self._arm(leg)

    def _retry_after_glare(self, leg: Leg) -> None:
        """491: the refresh again after RFC 3261 §14.1's delay, in 10 ms steps: 2.1-4 s
        if we chose the dialog's Call-ID (our outbound legs), else 0-2 s."""
        delay = (210 + secrets.randbelow(191) if leg.outbound else secrets.randbelow(201)) / 100
        self.ctx.timers.set(TimerKind.SESSION_REFRESH, leg.dialog_key, self.ctx.now + delay)

    def _retry_with_min_se(self, leg: Leg, resp: SipResponse) -> bool:
        """422 (§7.4): the refresh once more at once, with the Min-SE asked for; False
        when the 422 names none we can use."""
        text = (resp.headers.get("Min-SE") or "").split(";")[0].strip()
        if not is_digits(text) or len(text) > 10:
            return False
        min_se = min(max(int(text), MIN_SE_S), MAX_SE_S)
        leg.session_interval = max(leg.session_interval, min_se)
        self._send(leg, min_se)
        leg.refresh_retried = True
        self._arm(leg)
        return True

    def expired(self, leg: Leg) -> bool:
        """No refresh came in the interval (§10): True if the call must end."""
        if leg.phase is LegPhase.CONFIRMED and not leg.call.ended and leg.session_interval:
            log.info("call %s: session timer of %s expired", leg.call.call_id, leg.media_id)
            return True
        return False
