"""IVR step traces (DESIGN §3 "Traces"): a bounded in-memory store plus a JSON-lines log.

Every `ivr_step_trace` the executors return is appended to `<[logging] dir>/traces.jsonl`
and kept in memory for `/api/traces` and the `/debug` page. Both dimensions are
bounded: at most `max_sessions` sessions (the least recently updated one goes first)
and `max_steps` steps per session (the oldest steps go first, so the last step, with
its end reason, is always there; `dropped` counts what went).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from pbx.records import LineWriter

MAX_SESSIONS = 1000
MAX_STEPS_PER_SESSION = 500


@dataclass
class SessionTrace:
    session_id: str
    call_id: str
    steps: deque[dict[str, Any]]
    first_at: float = 0.0
    last_at: float = 0.0
    dropped: int = 0
    errors: int = 0
    end_reason: str | None = None

    def summary(self) -> dict[str, Any]:
        last = self.steps[-1] if self.steps else {}
        return {
            "session_id": self.session_id, "call_id": self.call_id,
            "steps": len(self.steps) + self.dropped, "dropped": self.dropped,
            "errors": self.errors, "first_at": self.first_at, "last_at": self.last_at,
            "last_action": last.get("action_type"), "end_reason": self.end_reason,
        }


class TraceStore:
    def __init__(self, max_sessions: int = MAX_SESSIONS,
                 max_steps: int = MAX_STEPS_PER_SESSION,
                 writer: LineWriter | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_steps = max_steps
        self.writer = writer
        self.sessions: OrderedDict[str, SessionTrace] = OrderedDict()

    def add(self, step: dict[str, Any]) -> None:
        """One step (a `StepTrace` as JSON)."""
        session_id = str(step.get("session_id", ""))
        trace = self.sessions.get(session_id)
        at = float(step.get("at") or 0.0)
        if trace is None:
            trace = SessionTrace(session_id, str(step.get("call_id", "")),
                                 deque(maxlen=self.max_steps), first_at=at)
            self.sessions[session_id] = trace
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        else:
            self.sessions.move_to_end(session_id)
        if len(trace.steps) == self.max_steps:
            trace.dropped += 1
        trace.steps.append(step)
        trace.last_at = at
        if step.get("error"):
            trace.errors += 1
        if step.get("end_reason"):
            trace.end_reason = step["end_reason"]
        if self.writer is not None:
            self.writer.write(step)

    def get(self, session_id: str) -> list[dict[str, Any]] | None:
        trace = self.sessions.get(session_id)
        return list(trace.steps) if trace is not None else None

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """Summaries of the most recently updated sessions, newest first."""
        out: list[dict[str, Any]] = []
        for trace in reversed(self.sessions.values()):
            if len(out) >= limit:
                break
            out.append(trace.summary())
        return out

    def __len__(self) -> int:
        return len(self.sessions)
