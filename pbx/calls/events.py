"""Call events out of the call layer: the `call` events on the events plane (and the
front log line of an ended call), and IVR step traces into the trace store; and the
SIP Call-IDs on every log line about a call (`SipCallIdLogFilter`)."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import orjson

from pbx import messages as m
from pbx.calls.context import CallContext
from pbx.calls.state import Call, Session
from pbx.logs import admits
from pbx.redact import redact

if TYPE_CHECKING:
    from pbx.calls.table import CallTable

log = logging.getLogger("pbx.calls")
# The loggers of the call layer whose lines name a call by our id first.
CALL_LOGGERS = ("pbx.calls", "pbx.queue")
SIP_SUFFIX = " [sip-call-id %s]"
# An ended call's line, and its template as the similar-lines filter sees it (the call
# is still in the table when it ends: the SIP Call-IDs are appended).
ENDED_LINE = "call %s ended: %s"
ENDED_LINE_KEY = ENDED_LINE + SIP_SUFFIX
# Longer than any call, session or media id of ours (16 hex digits, suffixes).
MAX_ID_CHARS = 64


class SipCallIdLogFilter(logging.Filter):
    """Every log line of the call layer that names a call (an argument that is our call
    id, a session id or a leg's media id) gets the SIP Call-IDs of the call's legs
    appended, `[sip-call-id a=<caller's> b=<bridged party's>]` (or every leg's while
    several ring), so a line matches a packet capture. The template gains a constant
    suffix, so `pbx.logs.SimilarLinesFilter` still counts one template as one. One
    instance per logger, over every live call table of the process (one per front;
    tests build several)."""

    def __init__(self) -> None:
        super().__init__()
        # Weak references in a list, not a WeakSet: the filter runs for every line of
        # the call layer (an ended call's among them) and a WeakSet's iterator costs
        # ~2 us even when empty (issue 9).
        self._tables: list[weakref.ref[CallTable]] = []

    def add_table(self, table: CallTable) -> None:
        self._tables = [ref for ref in self._tables if ref() is not None]
        if not any(ref() is table for ref in self._tables):
            self._tables.append(weakref.ref(table))

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        for arg in args:
            # Our ids are short; a long argument (an ended call's JSON) names no call.
            ids = (self._sip_ids(arg) if isinstance(arg, str) and len(arg) <= MAX_ID_CHARS
                   else None)
            if ids is not None:
                record.msg = f"{record.msg}{SIP_SUFFIX}"
                record.args = (*args, ids)
                break
        return True

    def _sip_ids(self, key: str) -> str | None:
        for ref in self._tables:
            table = ref()
            if table is None:
                continue
            call = table.calls.get(key)
            if call is None:
                session = table.sessions.get(key)
                call = session.call if session is not None else None
            if call is None:
                leg = table.legs_by_media.get(key)
                call = leg.call if leg is not None else None
            if call is not None:
                legs = call.sip_legs()
                if len(call.sip_call_ids) > len(legs):  # members still ringing
                    return " ".join(call.sip_call_ids)
                return " ".join(f"{name}={cid}" for name, cid in legs.items())
        return None


def log_sip_call_ids(table: CallTable) -> None:
    """Put the SIP Call-IDs of `table`'s calls on the call layer's log lines."""
    for name in CALL_LOGGERS:
        logger = logging.getLogger(name)
        found = [f for f in logger.filters if isinstance(f, SipCallIdLogFilter)]
        log_filter = found[0] if found else SipCallIdLogFilter()
        if not found:
            logger.addFilter(log_filter)
        log_filter.add_table(table)


class CallEvents:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx

    def call(self, call: Call, event: str) -> None:
        """A `call` event: started, answered, bridged, queued, ws_bridged, ended ...
        (built only if someone listens, but for the ended call's log line)."""
        listened = self.ctx.listened()
        logged = event == "ended" and admits(log, logging.INFO, ENDED_LINE_KEY)
        if not (listened or logged):
            return
        record: dict[str, Any] = {
            "type": "call", "event": event, "call_id": call.call_id,
            "sip_call_ids": list(call.sip_call_ids), "kind": call.kind,
            "route": call.route.name if call.route else None,
            "caller": call.caller, "callee": call.callee, "started_at": call.started_at,
            "answered_at": call.answered_at,
        }
        if call.queue_name is not None or call.agent is not None:
            record.update(queue=call.queue_name, agent=call.agent,
                          queue_member=call.queue_member)
        if event == "ended":
            record.update(end_reason=call.end_reason, end_code=call.end_code,
                          ended_at=call.ended_at or self.ctx.wall(),
                          transfer_target=call.transfer_target)
            record = redact(record)  # a transfer target URI may carry a password or token
            if logged:
                log.info(ENDED_LINE, call.call_id, orjson.dumps(record).decode())
        if listened:
            self.ctx.publish(record)

    def trace(self, trace: m.StepTrace) -> None:
        # Redacted by the executor already; again here, in case one did not (DESIGN §6).
        # The copy redact makes is the only one: the fields are JSON values already (a
        # decoded frame), so no model_dump first (issue 9).
        data = redact(trace.__dict__)
        # The SIP Call-IDs of the call's legs (a step may come after the call ended).
        call = self.ctx.table.calls.get(trace.call_id)
        if call is not None:
            data["sip_call_ids"] = list(call.sip_call_ids)
        else:
            record = self.ctx.records.recent.get(trace.call_id) or {}
            data["sip_call_ids"] = list(record.get("sip_call_ids") or ())
        self.ctx.traces.add(data)  # bounded store + logs/traces.jsonl
        if self.ctx.listened():
            self.ctx.publish({"type": "ivr_step_trace", **data})

    def front_trace(self, session: Session, error: str, end_reason: str | None) -> None:
        """A step trace the front writes itself (no executor saw what went wrong)."""
        index = session.step_index + 1
        self.trace(m.StepTrace(
            call_id=session.call.call_id, session_id=session.session_id, step_index=index,
            trigger="front", error=error, end_reason=end_reason, at=self.ctx.wall()))
