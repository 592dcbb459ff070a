"""Call events out of the call layer: the `call` events on the events plane (and the
front log line of an ended call), and IVR step traces into the trace store."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from pbx import messages as m
from pbx.calls.context import CallContext
from pbx.calls.state import Call, Session
from pbx.redact import redact

log = logging.getLogger("pbx.calls")


class CallEvents:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx

    def call(self, call: Call, event: str) -> None:
        """A `call` event: started, answered, bridged, queued, ws_bridged, ended ..."""
        record: dict[str, Any] = {
            "type": "call", "event": event, "call_id": call.call_id,
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
            log.info("call %s ended: %s", call.call_id, orjson.dumps(record).decode())
        self.ctx.publish(record)

    def trace(self, trace: m.StepTrace) -> None:
        # Redacted by the executor already; again here, in case one did not (DESIGN §6).
        data = redact(trace.model_dump(mode="json"))
        self.ctx.traces.add(data)  # bounded store + logs/traces.jsonl
        self.ctx.publish({"type": "ivr_step_trace", **data})

    def front_trace(self, session: Session, error: str, end_reason: str | None) -> None:
        """A step trace the front writes itself (no executor saw what went wrong)."""
        index = int((session.state or {}).get("step_index", 0)) + 1
        self.trace(m.StepTrace(
            call_id=session.call.call_id, session_id=session.session_id, step_index=index,
            trigger="front", error=error, end_reason=end_reason, at=self.ctx.wall()))
