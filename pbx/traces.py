"""IVR step traces (docs/protocol.md "Traces"): a bounded in-memory store plus a JSON-lines log.

Every `ivr_step_trace` the executors return is appended to `<[logging] dir>/traces.jsonl`
(rotated by size, `pbx.jsonl`) and kept in memory for `/api/traces` and the `/debug`
page, as its JSON line: a step is serialised once, its size is its line's length, and
what is kept costs its bytes (a dict of the same step would cost several times more).

Every dimension is bounded (`[traces]`):

* `max_sessions` sessions and `max_bytes` bytes in all: the least recently updated
  sessions go first (`sessions_evicted`);
* `max_steps` steps and `max_session_bytes` bytes per session: the oldest steps go
  first, so the last step, with its end reason, is always there (`dropped` per
  session, `steps_dropped` in all);
* a single step larger than `max_session_bytes` is replaced, in memory and in the log,
  by a stub of its summary fields with `truncated: true` and its size in `bytes`
  (`steps_truncated`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

MAX_SESSIONS = 1000
MAX_STEPS_PER_SESSION = 500
MAX_BYTES = 64 * 1024 * 1024
MAX_SESSION_BYTES = 2 * 1024 * 1024
# The fields a truncated step keeps, each string cut to STUB_TEXT_CHARS.
STUB_FIELDS = ("call_id", "sip_call_ids", "session_id", "step_index", "trigger", "action_type",
               "duration_ms", "error", "step_id", "step_name", "end_reason", "at")
STUB_TEXT_CHARS = 200


class LineSink(Protocol):
    def write_line(self, line: bytes) -> None: ...


def _stub(step: dict[str, Any], size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in STUB_FIELDS:
        value = step.get(key)
        out[key] = value[:STUB_TEXT_CHARS] if isinstance(value, str) else value
    out["truncated"] = True
    out["bytes"] = size
    return out


@dataclass
class SessionTrace:
    session_id: str
    call_id: str
    sip_call_ids: list[str] = field(default_factory=list)  # the call's legs' Call-IDs
    steps: deque[bytes] = field(default_factory=deque)  # JSON, one step each
    bytes: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    dropped: int = 0
    errors: int = 0
    end_reason: str | None = None
    last_action: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "call_id": self.call_id,
            "sip_call_ids": self.sip_call_ids,
            "steps": len(self.steps) + self.dropped, "dropped": self.dropped,
            "errors": self.errors, "first_at": self.first_at, "last_at": self.last_at,
            "last_action": self.last_action, "end_reason": self.end_reason,
            "bytes": self.bytes,
        }


class TraceStore:
    def __init__(self, max_sessions: int = MAX_SESSIONS,
                 max_steps: int = MAX_STEPS_PER_SESSION,
                 writer: LineSink | None = None, *,
                 max_bytes: int = MAX_BYTES,
                 max_session_bytes: int = MAX_SESSION_BYTES) -> None:
        self.max_sessions = max_sessions
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self.max_session_bytes = min(max_session_bytes, max_bytes)
        self.writer = writer
        self.sessions: OrderedDict[str, SessionTrace] = OrderedDict()
        self.bytes = 0
        self.steps_dropped = 0
        self.sessions_evicted = 0
        self.steps_truncated = 0

    def add(self, step: dict[str, Any]) -> None:
        """One step (a `StepTrace` as JSON)."""
        try:
            line = orjson.dumps(step, default=str)
        except TypeError:  # an integer beyond 64 bits from a provider's `extra`...
            line = orjson.dumps(_stub(step, 0) | {"error": "trace not serialisable"},
                                default=str)
        if len(line) > self.max_session_bytes:
            step = _stub(step, len(line))
            line = orjson.dumps(step, default=str)
            self.steps_truncated += 1
        if self.writer is not None:
            self.writer.write_line(line + b"\n")
        session_id = str(step.get("session_id", ""))
        trace = self.sessions.get(session_id)
        at = float(step.get("at") or 0.0)
        if trace is None:
            trace = SessionTrace(session_id, str(step.get("call_id", "")), first_at=at)
            self.sessions[session_id] = trace
        else:
            self.sessions.move_to_end(session_id)
        sip_call_ids = step.get("sip_call_ids")
        if isinstance(sip_call_ids, list) and len(sip_call_ids) > len(trace.sip_call_ids):
            trace.sip_call_ids = [str(x) for x in sip_call_ids]  # a leg was added since
        trace.steps.append(line)
        trace.bytes += len(line)
        self.bytes += len(line)
        trace.last_at = at
        action_type = step.get("action_type")
        trace.last_action = action_type if isinstance(action_type, str) else None
        if step.get("error"):
            trace.errors += 1
        if step.get("end_reason"):
            trace.end_reason = str(step["end_reason"])
        # The newest step always stays: it fits on its own (see the stub above).
        while len(trace.steps) > 1 and (len(trace.steps) > self.max_steps
                                        or trace.bytes > self.max_session_bytes):
            old = trace.steps.popleft()
            trace.bytes -= len(old)
            self.bytes -= len(old)
            trace.dropped += 1
            self.steps_dropped += 1
        # The session just updated is the last in order, so it is never the one evicted.
        while len(self.sessions) > 1 and (len(self.sessions) > self.max_sessions
                                          or self.bytes > self.max_bytes):
            _, evicted = self.sessions.popitem(last=False)
            self.bytes -= evicted.bytes
            self.sessions_evicted += 1

    def get(self, session_id: str) -> list[dict[str, Any]] | None:
        trace = self.sessions.get(session_id)
        return [orjson.loads(line) for line in trace.steps] if trace is not None else None

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """Summaries of the most recently updated sessions, newest first."""
        out: list[dict[str, Any]] = []
        for trace in reversed(self.sessions.values()):
            if len(out) >= limit:
                break
            out.append(trace.summary())
        return out

    def stats(self) -> dict[str, int]:
        """For /metrics."""
        return {"trace_bytes": self.bytes, "trace_steps_dropped": self.steps_dropped,
                "trace_sessions_evicted": self.sessions_evicted,
                "trace_steps_truncated": self.steps_truncated}

    def __len__(self) -> int:
        return len(self.sessions)
