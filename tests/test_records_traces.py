"""Call records (pbx.records), the trace store (pbx.traces) and the JSON-lines writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pbx.jsonl import JsonLinesLog
from pbx.records import CallRecords, outcome
from pbx.traces import TraceStore


class Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, obj: Any) -> None:
        self.lines.append(obj)

    def write_line(self, line: bytes) -> None:  # the trace store's lines come encoded
        self.lines.append(json.loads(line))


def record(call_id: str = "c1") -> dict[str, Any]:
    return {"type": "call", "call_id": call_id, "end_reason": "Hangup"}


def test_record_waits_for_every_leg_statistics() -> None:
    out = Lines()
    records = CallRecords(out, wait_s=1.0)
    records.finish(record(), {"c1-a": "a", "c1-b": "b"}, now=10.0)
    assert records.get_timer() == 11.0
    records.media_released("c1-a", {"packets_sent": 250, "packets_received": 240})
    assert out.lines == []
    records.media_released("c1-b", {"packets_sent": 100, "packets_received": 90,
                                     "jitter_ms": 1.5})
    assert out.lines == [{**record(), "rtp": {
        "a": {"packets_sent": 250, "packets_received": 240},
        "b": {"packets_sent": 100, "packets_received": 90, "jitter_ms": 1.5}},
        "rtp_complete": True}]
    assert records.get_timer() is None
    records.media_released("c1-a", {"packets_sent": 1})  # a duplicate changes nothing
    assert len(out.lines) == 1


def test_record_written_after_the_wait_with_what_arrived() -> None:
    out = Lines()
    records = CallRecords(out, wait_s=1.0)
    records.finish(record("c1"), {"c1-a": "a", "c1-b": "b"}, now=10.0)
    records.finish(record("c2"), {"c2-a": "a"}, now=10.5)
    records.media_released("c1-a", {"packets_sent": 5})
    records.handle_timer(10.99)
    assert out.lines == []
    records.handle_timer(11.0)
    assert [r["call_id"] for r in out.lines] == ["c1"]
    assert out.lines[0]["rtp"] == {"a": {"packets_sent": 5}}
    assert out.lines[0]["rtp_complete"] is False
    assert records.get_timer() == 11.5
    records.media_released("c1-b", {"packets_sent": 1})  # too late: ignored
    assert len(out.lines) == 1
    records.flush_all()
    assert [r["call_id"] for r in out.lines] == ["c1", "c2"]
    assert records.by_media == {} and records.pending == {}


def test_record_without_media_is_written_at_once() -> None:
    out = Lines()
    CallRecords(out).finish(record(), {}, now=0.0)
    assert out.lines[0]["rtp"] == {} and out.lines[0]["rtp_complete"] is True


def test_outcome_words() -> None:
    assert outcome(False, False, "Cancelled") == "cancelled"
    assert outcome(False, False, "Rejected(503)") == "rejected"
    assert outcome(True, False, "MediaWorkerLost") == "failed"
    assert outcome(True, True, "CalleeHangup") == "bridged"
    assert outcome(True, False, "TransferFailed(486)") == "transfer_failed"
    assert outcome(True, False, "QueueNoAnswer") == "no_answer"
    assert outcome(True, False, "Hangup") == "completed"


def step(session: str, index: int, **extra: Any) -> dict[str, Any]:
    return {"session_id": session, "call_id": "call-" + session, "step_index": index,
            "at": 100.0 + index, **extra}


def test_trace_store_bounds_sessions_and_steps() -> None:
    out = Lines()
    store = TraceStore(max_sessions=2, max_steps=3, writer=out)
    for i in range(5):
        store.add(step("s1", i))
    steps = store.get("s1")
    assert steps is not None and [s["step_index"] for s in steps] == [2, 3, 4]
    assert store.recent()[0]["steps"] == 5 and store.recent()[0]["dropped"] == 2
    store.add(step("s2", 0))
    store.add(step("s1", 5, end_reason="Hangup"))  # s1 is the most recent again
    store.add(step("s3", 0, error="boom"))  # evicts s2, the least recently updated
    assert store.get("s2") is None and store.get("s1") is not None
    recent = store.recent()
    assert [r["session_id"] for r in recent] == ["s3", "s1"]
    assert recent[1]["end_reason"] == "Hangup" and recent[0]["errors"] == 1
    assert recent[1]["call_id"] == "call-s1" and recent[1]["first_at"] == 100.0
    assert len(out.lines) == 8  # every step is logged, kept or not


def test_json_lines_log_appends_and_survives_an_unwritable_path(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "calls.jsonl"
    log = JsonLinesLog(path)
    log.write({"a": 1})
    log.write({"b": [1, 2]})
    log.close()
    JsonLinesLog(path).write({"c": None})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"a": 1}, {"b": [1, 2]}, {"c": None}]
    blocked = tmp_path / "file"
    blocked.write_text("")
    bad = JsonLinesLog(blocked / "x.jsonl")  # a file as directory: cannot be created
    bad.write({"x": 1})
    bad.write({"x": 2})
    assert bad.path is None and bad.lines == 0


def test_buffered_json_lines_reach_the_file_on_flush_and_close(tmp_path: Path) -> None:
    """The front's logs: lines wait in the buffer (no write syscall each) until
    `flush()`, and `close()` flushes what is left."""
    path = tmp_path / "logs" / "calls.jsonl"
    log = JsonLinesLog(path, flush_every_line=False)
    log.write({"a": 1})
    assert log.unflushed and path.read_bytes() == b""
    log.flush()
    assert not log.unflushed and path.read_bytes() == b'{"a":1}\n'
    log.write({"b": 2})
    assert path.read_bytes() == b'{"a":1}\n'
    log.close()
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'
