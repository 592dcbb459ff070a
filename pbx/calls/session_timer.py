"""Session timers (RFC 4028) on our dialogs.

A session-refresh request (an INVITE or UPDATE with Session-Expires) gets its 2xx
headers from `negotiate`, which also arms the leg's timer: when we refresh, an UPDATE
without SDP at half the interval (§7.4; a peer that does not allow UPDATE is not
refreshed: we send no re-INVITEs), whose 408, 481 or timeout ends the session with BYE
(§10); when the peer refreshes, the session expires
`SESSION_EXPIRY_MARGIN_S` before the interval ends (§10) and the call ends with BYE.
"""

from __future__ import annotations

import logging

from pbx.calls.context import SUPPORTED, CallContext
from pbx.calls.state import Leg, LegPhase
from pbx.calls.timers import TimerKind
from pbx.sip.dialog import new_request
from pbx.sip.fields import parse_session_expires
from pbx.sip.message import SipRequest, new_tag
from pbx.sip.transaction import TransactionKey

log = logging.getLogger("pbx.calls")

# The smallest session interval we accept (RFC 4028 §4's floor), and how long before the
# session's expiry the side that does not refresh gives up on it (§10).
MIN_SE_S = 90
SESSION_EXPIRY_MARGIN_S = 32


def session_expires(req: SipRequest) -> tuple[int, str | None] | None:
    """(interval, refresher) of the request's Session-Expires; SipError 400 if bad."""
    text = req.headers.get("Session-Expires")
    return None if text is None else parse_session_expires(text)


class SessionTimers:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx

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
        se = session_expires(req)
        if se is None:
            return []
        interval, refresher = se
        supported = any(t.strip().lower() == "timer" for name in ("Supported", "Require")
                        for t in req.headers.get_all(name))
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
        """Our refresh is due (§7.4): an UPDATE without SDP, and the next one armed."""
        if leg.phase is not LegPhase.CONFIRMED or leg.call.ended or not leg.session_interval:
            return
        if leg.peer_allows_update:
            req = new_request(leg.dialog, self.ctx.me, "UPDATE", [
                ("Session-Expires", f"{leg.session_interval};refresher=uac"),
                ("Supported", SUPPORTED)])
            key = self.ctx.send_request(req, leg.addr, leg.reliable)
            # Its failure (408, 481, no answer) ends the session: pbx.calls.outbound.
            self.ctx.table.client_txns[key] = leg
        self._arm(leg)

    def expired(self, leg: Leg) -> bool:
        """No refresh came in the interval (§10): True if the call must end."""
        if leg.phase is LegPhase.CONFIRMED and not leg.call.ended and leg.session_interval:
            log.info("call %s: session timer of %s expired", leg.call.call_id, leg.media_id)
            return True
        return False
