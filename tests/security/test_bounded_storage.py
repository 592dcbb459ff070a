"""Issue 8, "Unbounded growth" (DESIGN §6 "Bounded storage"): the trace store is bounded
by bytes, `calls.jsonl` / `traces.jsonl` rotate, recordings, voicemail and the TTS cache
have retention, and a log line has a bound (and cannot be forged with CR/LF).

Pure parts on their own (the trace store, the retention planner), the shells on real
files in a temporary directory, the logging set-up in a real process, and the front
end to end: a 60 KB malformed datagram against the real front, and the TTS cache swept
by the real front's periodic loop.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pbx.jsonl import JsonLinesLog
from pbx.traces import TraceStore
from tests.e2e.harness import ROOT, PbxSystem, ScriptedProvider, start_system, wait_until

DAY = 86400.0
MB = 1024 * 1024


# ---------------------------------------------------------------- the trace store


def big_step(session: str, index: int, header_bytes: int = 40_000, **extra: Any
             ) -> dict[str, Any]:
    """A step as the executors send them: the ProviderContext repeats every INVITE
    header as a `sip_*` variable, so a caller with big headers makes every step big."""
    headers = {f"sip_X-Pad-{i}": "v" * 400 for i in range(header_bytes // 420)}
    return {"call_id": "call-" + session, "session_id": session, "step_index": index,
            "trigger": "dtmf", "action_type": "prompt", "action": {"type": "prompt"},
            "request": {"variables": headers}, "at": 1000.0 + index, **extra}


def test_trace_store_is_bounded_by_bytes_in_all_and_per_session() -> None:
    written: list[int] = []  # sizes only: the test must not hold the steps itself

    class Sink:
        def write_line(self, line: bytes) -> None:
            written.append(len(line))

    max_bytes, per_session = 1 * MB, 200_000
    store = TraceStore(max_sessions=1000, max_steps=500, writer=Sink(),
                       max_bytes=max_bytes, max_session_bytes=per_session)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for s in range(60):
            for i in range(20):
                store.add(big_step(f"s{s}", i, end_reason="Hangup" if i == 19 else None))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(written) == 60 * 20  # the log gets every step
    step_bytes = written[0] - 1
    assert 30_000 < step_bytes < per_session
    # In all: within max_bytes; what is kept costs about its JSON size in memory.
    assert store.bytes <= max_bytes
    assert store.bytes == sum(len(line) for t in store.sessions.values() for line in t.steps)
    assert held - base < 3 * max_bytes, f"{(held - base) / MB:.1f} MB held"
    stats = store.stats()
    assert stats["trace_bytes"] == store.bytes
    assert stats["trace_sessions_evicted"] == 60 - len(store)
    assert 0 < len(store) < 60
    # Per session: the oldest steps went, the last (with its end reason) stayed.
    for trace in store.sessions.values():
        assert trace.bytes <= per_session
        steps = store.get(trace.session_id)
        assert steps is not None and steps[-1]["step_index"] == 19
        assert steps[-1]["end_reason"] == "Hangup"
        assert trace.dropped == 20 - len(steps) > 0
    # Counted in all, evicted sessions' dropped steps included.
    assert stats["trace_steps_dropped"] >= sum(t.dropped for t in store.sessions.values())
    # The newest session is the last one updated: it is never the one evicted.
    assert store.recent(1)[0]["session_id"] == "s59"


def test_a_step_larger_than_a_session_is_kept_as_a_stub() -> None:
    lines: list[bytes] = []

    class Sink:
        def write_line(self, line: bytes) -> None:
            lines.append(line)

    store = TraceStore(writer=Sink(), max_bytes=MB, max_session_bytes=100_000)
    store.add(big_step("s1", 1, header_bytes=300_000, error="x" * 5000,
                       end_reason="Hangup"))
    (kept,) = store.get("s1") or []
    assert kept["truncated"] is True and kept["bytes"] > 300_000
    assert kept["end_reason"] == "Hangup" and kept["step_index"] == 1
    assert len(kept["error"]) <= 200 and "request" not in kept
    assert store.bytes < 10_000 and store.stats()["trace_steps_truncated"] == 1
    assert json.loads(lines[0]) == kept  # the log and the store agree


def test_trace_settings_reach_the_front(tmp_path: Path) -> None:
    from pbx.config import Settings, parse_config
    from pbx.front import Front

    defaults = Settings().traces
    assert defaults.max_bytes == 64 * MB and defaults.max_sessions == 1000
    settings = parse_config(f'[logging]\ndir = "{tmp_path}"\n[traces]\nmax_bytes = 1_000_000\n'
                            'max_session_bytes = 100_000\nmax_steps = 50\n')
    front = Front(settings, lambda *a, **k: None, lambda *a: True, lambda *a: True,
                  lambda e: None)
    assert (front.traces.max_bytes, front.traces.max_session_bytes,
            front.traces.max_steps) == (1_000_000, 100_000, 50)
    snapshot = front.snapshot()
    for name in ("trace_bytes", "trace_steps_dropped", "trace_sessions_evicted",
                 "trace_steps_truncated", "traces_log_rotations", "calls_log_rotations",
                 "retention_sweeps", "retention_tts_cache_files_deleted"):
        assert name in snapshot, name


# ---------------------------------------------------------------- JSON-lines rotation


def test_json_lines_files_rotate_by_size_and_keep_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "traces.jsonl"
    log = JsonLinesLog(path, max_bytes=70_000, backups=2)

    def line(n: int) -> dict[str, Any]:
        return {"n": n, "pad": "x" * 990}  # 1010 bytes with its newline, for 1000 <= n < 10000

    per_file = 70_000 // 1010  # 69 lines fit in a file
    for i in range(400):
        log.write(line(1000 + i))
    log.close()
    assert log.rotations == 400 // per_file  # 5: the sixth file holds the rest
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["traces.jsonl", "traces.jsonl.1", "traces.jsonl.2"]
    for name in files:
        assert (path.parent / name).stat().st_size <= 70_000
    # The newest lines, in order, across the files; the oldest are gone.
    kept = [json.loads(ln)["n"] for name in reversed(files)
            for ln in (path.parent / name).read_text().splitlines()]
    assert kept == list(range(1400 - len(kept), 1400))
    assert len(kept) == 2 * per_file + 400 % per_file
    # A restart continues the file it finds (its size learnt once) and rotates on time.
    in_last = 400 % per_file
    again = JsonLinesLog(path, max_bytes=70_000, backups=2)
    for i in range(per_file - in_last):
        again.write(line(2000 + i))
    assert again.rotations == 0 and path.stat().st_size == per_file * 1010
    again.write(line(3000))
    again.close()
    assert again.rotations == 1 and path.stat().st_size == 1010
    assert json.loads((path.parent / "traces.jsonl.1").read_text().splitlines()[-1])["n"] \
        == 2000 + per_file - in_last - 1


def test_json_lines_write_path_costs_no_stat_per_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counted(name: str) -> Any:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("stat", "fstat", "lstat"):
        monkeypatch.setattr(os, name, counted(name))
    log = JsonLinesLog(tmp_path / "calls.jsonl", max_bytes=10 * MB, backups=3)
    for i in range(2000):
        log.write({"n": i})
    log.close()
    assert len(calls) <= 3, calls  # opening the file, not writing lines


def test_rotation_settings_and_defaults() -> None:
    from pbx.config import ConfigError, Settings, parse_config

    defaults = Settings().logging
    assert defaults.jsonl_max_bytes == 64 * MB and defaults.jsonl_backups == 5
    assert defaults.max_line_bytes == 2000
    with pytest.raises(ConfigError, match="logging.jsonl_max_bytes"):
        parse_config("[logging]\njsonl_max_bytes = 100\n")
    with pytest.raises(ConfigError, match="logging.jsonl_backups"):
        parse_config("[logging]\njsonl_backups = 0\n")


# ---------------------------------------------------------------- retention: the planner


def test_retention_plan_by_age_then_by_size_oldest_first() -> None:
    from pbx.retention import FileEntry, Policy, plan

    now = 100 * DAY
    entries = [
        FileEntry("a/old.wav", 1000, now - 40 * DAY),
        FileEntry("a/old.wav.json", 50, now - 40 * DAY),  # goes with its recording
        FileEntry("b/mid.wav", 3000, now - 5 * DAY),
        FileEntry("b/newer.wav", 3000, now - 2 * DAY),
        FileEntry("c/recent.wav", 3000, now - 1 * DAY),
    ]
    by_age = plan(entries, Policy(max_age_s=30 * DAY), now)
    assert by_age.delete == ["a/old.wav", "a/old.wav.json"] and by_age.deleted_bytes == 1050
    assert by_age.kept_files == 3 and by_age.kept_bytes == 9000
    both = plan(entries, Policy(max_age_s=30 * DAY, max_bytes=6500), now)
    assert both.delete == ["a/old.wav", "a/old.wav.json", "b/mid.wav"]
    assert both.kept_bytes == 6000 and not both.over_budget
    forever = plan(entries, Policy(), now)
    assert forever.delete == [] and forever.kept_bytes == 10050


def test_retention_never_takes_files_being_written() -> None:
    from pbx.retention import WRITE_GUARD_S, FileEntry, Policy, plan

    now = 100 * DAY
    entries = [
        FileEntry("s1/20260101.wav", 5000, now - 60 * DAY),  # old, but still recording
        FileEntry("s2/20260101.wav", 5000, now - 60 * DAY),
        FileEntry("s3/live.wav", 9000, now - 2.0),  # written two seconds ago
        FileEntry("s4/.tmp-x.wav", 10, now + 3600),  # a clock that stepped back
        FileEntry("s5/recent.wav.json.tmp", 10, now - WRITE_GUARD_S + 1),
    ]
    out = plan(entries, Policy(max_age_s=DAY, max_bytes=1), now, busy=["s1/20260101.wav"])
    assert out.delete == ["s2/20260101.wav"]
    assert out.over_budget and out.kept_bytes == 5000 + 9000 + 20


# ---------------------------------------------------------------- retention: the shell


def make_file(path: Path, size: int, age_s: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)  # sparse: the apparent size is what counts
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_retention_sweep_of_real_directories(tmp_path: Path) -> None:
    from pbx.config import parse_config
    from pbx.retention import RetentionSweeper

    now = time.time()
    rec, vm, tts = tmp_path / "recordings", tmp_path / "voicemail", tmp_path / "sounds" / ".tts"
    outside = tmp_path / "elsewhere"
    victim = make_file(outside / "precious.wav", 100, 90 * DAY, now)
    make_file(outside / "dir" / "also.wav", 100, 90 * DAY, now)
    old_rec = make_file(rec / "sess-1" / "20260101_000000.wav", 4000, 40 * DAY, now)
    old_meta = make_file(rec / "sess-1" / "20260101_000000.wav.json", 100, 40 * DAY, now)
    live = make_file(rec / "sess-2" / "20260301_000000.wav", 4000, 40 * DAY, now)
    recent = make_file(rec / "sess-3" / "20260302_000000.wav", 4000, DAY, now)
    notes = make_file(rec / "sess-1" / "notes.txt", 10, 90 * DAY, now)  # not ours
    (rec / "link.wav").symlink_to(victim)
    (rec / "linkdir").symlink_to(outside / "dir")
    empty = rec / "sess-0"
    empty.mkdir()
    os.utime(empty, (now - 90 * DAY, now - 90 * DAY))
    os.utime(rec / "sess-1", (now - 90 * DAY, now - 90 * DAY))
    vm_old = make_file(vm / "2001" / "a.wav", 300_000, 2 * DAY, now)
    vm_new = make_file(vm / "2001" / "b.wav", 300_000, 1 * DAY, now)
    cache_old = make_file(tts / ("a" * 32 + ".wav"), 5000, 40 * DAY, now)
    cache_lru = make_file(tts / ("b" * 32 + ".wav"), 150 * MB, 3 * DAY, now)
    cache_mru = make_file(tts / ("c" * 32 + ".wav"), 150 * MB, 1 * DAY, now)
    prompt = make_file(tts / "welcome.wav", 100, 400 * DAY, now)  # not a cache file
    orphan = make_file(tts / ".tmp-abc.wav", 100, 2 * DAY, now)

    settings = parse_config(f"""
[media]
recordings_dir = "{rec}"
voicemail_dir = "{vm}"
sounds_dir = "{tmp_path / 'sounds'}"
[tts]
cache_dir = "{tts}"
[retention]
interval_s = 60
recordings_max_age_days = 30
voicemail_max_bytes = 400_000
tts_cache_max_age_days = 30
tts_cache_max_bytes = {200 * MB}
""")
    sweeper = RetentionSweeper.from_settings(settings)
    assert sweeper.due(1000.0) and not sweeper.due(1030.0) and sweeper.due(1060.0)
    results = sweeper.sweep(now, busy=[str(live)])
    sweeper.record(results)

    gone = [old_rec, old_meta, vm_old, cache_old, cache_lru]
    kept = [live, recent, notes, vm_new, cache_mru, prompt, victim,
            outside / "dir" / "also.wav"]
    assert [p for p in gone if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert orphan.exists()  # young enough, and the cache is within its size now
    assert (rec / "link.wav").is_symlink() and (rec / "linkdir").is_symlink()
    assert not empty.exists() and rec.is_dir() and tts.is_dir()
    stats = sweeper.stats
    assert stats["retention_sweeps"] == 1 and stats["retention_errors"] == 0
    assert stats["retention_recordings_files_deleted"] == 2
    assert stats["retention_recordings_bytes_deleted"] == 4100
    assert stats["retention_voicemail_files_deleted"] == 1
    assert stats["retention_voicemail_bytes"] == 300_000
    assert stats["retention_tts_cache_files_deleted"] == 2
    assert stats["retention_tts_cache_bytes_deleted"] == 150 * MB + 5000
    assert stats["retention_tts_cache_bytes"] == 150 * MB + 100


def test_retention_defaults_bound_the_tts_cache_and_keep_recordings() -> None:
    from pbx.config import ConfigError, Settings, parse_config
    from pbx.retention import RetentionSweeper

    r = Settings().retention
    assert r.tts_cache_max_bytes == 256 * MB and r.tts_cache_max_age_days == 30
    assert r.recordings_max_age_days == 0 and r.recordings_max_bytes == 0
    assert r.interval_s > 0
    sweeper = RetentionSweeper.from_settings(Settings())
    assert [a.name for a in sweeper.areas] == ["tts_cache"]
    with pytest.raises(ConfigError, match="retention.tts_cache_max_bytes"):
        parse_config("[retention]\ntts_cache_max_bytes = 0\n")


def test_recordings_in_progress_are_the_live_calls_unfinished_ones() -> None:
    from pbx.app import recordings_in_progress

    front: Any = SimpleNamespace(calls={
        "c1": SimpleNamespace(recordings=[
            {"file": "recordings/s1/a.wav", "reason": None},
            {"file": "recordings/s1/b.wav", "reason": "dtmf"}]),
        "c2": SimpleNamespace(recordings=[{"path": "x.wav", "reason": None}]),
    })
    assert recordings_in_progress(front) == ["recordings/s1/a.wav"]


# ---------------------------------------------------------------- log lines


LOGGING_SCRIPT = r"""
import logging, os, sys
from pbx.config import parse_config
from pbx.logs import setup_logging
setup_logging(parse_config(sys.argv[1]), "front")
log = logging.getLogger("pbx.front")
forged = "\r\n2026-01-01 00:00:00,000 front[1] ERROR pbx.front: FORGED"
log.info("malformed SIP from %s: %s", "192.0.2.1", "bad Via " + forged + "Z" * 60000)
log.info("REFER to %s", "sip:x@y" + forged + "\x1b[2J\u2028FORGED2")
log.warning("header: Proxy-Authorization: Digest response=\"s3cret-digest\"")
try:
    raise ValueError("boom" + forged + "Y" * 50000)
except ValueError:
    log.exception("handler failed")
for i in range(500):
    log.info("flood from %s", i)
log.error("after the flood")
# What the process's lines never show is not collected (pbx.logs.setup_logging).
record = log.makeRecord("pbx.front", logging.INFO, "script", 1, "x", (), None)
print(os.getpid(), record.process, record.thread, record.processName)
"""


def test_log_lines_are_bounded_escaped_and_scrubbed_in_a_real_process() -> None:
    config = '[logging]\nlevel = "INFO"\n'  # the defaults: lines 2,000 B, tracebacks 8,000 B
    out = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, config], cwd=ROOT,
                         capture_output=True, timeout=60, env={**os.environ,
                         "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.decode("utf-8").split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    records = [ln for ln in lines if not ln.startswith("| ")]
    traceback = [ln for ln in lines if ln.startswith("| ")]
    # Every record: time, process name and pid, level, logger, message; a record's
    # thread and process fields are not collected (no line shows them).
    pid, process, thread, process_name = out.stdout.decode().split()
    assert (process, thread, process_name) == ("None", "None", "None")
    line_re = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} front\[" + pid
                         + r"\] (INFO|WARNING|ERROR) pbx\.front: \S")
    assert all(line_re.match(ln) for ln in records), records[:5]
    # One record, one line: the forged CR/LF lines never start a line of their own.
    assert not [ln for ln in lines if "FORGED" in ln and ln.startswith("2026-01-01")]
    assert all(" front[" in ln for ln in records), records[:5]
    malformed = next(ln for ln in records if "malformed SIP" in ln)
    assert "\\r\\n2026-01-01" in malformed and "…[cut: " in malformed
    assert len(malformed.encode()) <= 2000 + 100
    refer = next(ln for ln in records if "REFER to" in ln)
    assert "\\x1b[2J\\u2028FORGED2" in refer
    # Secrets in a message are scrubbed.
    assert "s3cret" not in out.stderr.decode()
    # The traceback: bounded (head and tail), every line marked as a continuation.
    assert traceback and traceback[0] == "| Traceback (most recent call last):"
    assert sum(len(ln.encode()) + 1 for ln in traceback) <= 8000 + 200
    assert any(ln.startswith("| ValueError: boom") for ln in traceback)
    # A flood of one message: a burst, then the rest counted, not written.
    flood = [ln for ln in records if "flood from" in ln]
    assert 10 <= len(flood) < 100, len(flood)
    after = next(ln for ln in records if "after the flood" in ln)
    assert "similar lines not written" not in after  # another template
    assert max(len(ln.encode()) for ln in lines) <= 2100


# ---------------------------------------------------------------- the real front


CACHE_DIR = ROOT / "sounds" / f".tts-retention-test-{os.getpid()}"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    """A system whose TTS cache holds, before it starts, an expired file, two large
    ones over the default size bound, a young one, and files that are not the cache's."""
    now = time.time()
    CACHE_DIR.mkdir(parents=True, exist_ok=False)
    make_file(CACHE_DIR / ("0" * 32 + ".wav"), 50_000, 45 * DAY, now)  # expired
    make_file(CACHE_DIR / ("1" * 32 + ".wav"), 200 * MB, 3 * DAY, now)  # LRU over 256 MB
    make_file(CACHE_DIR / ("2" * 32 + ".wav"), 200 * MB, 2 * DAY, now)
    make_file(CACHE_DIR / ("3" * 32 + ".wav"), 50_000, 60.0, now)  # in use a minute ago
    make_file(CACHE_DIR / "operator-notes.txt", 10, 400 * DAY, now)
    provider = ScriptedProvider()
    try:
        s = start_system(tmp_path_factory.mktemp("pbx-bounded"), provider,
                         extra_config=f'[tts]\ncache_dir = "{CACHE_DIR}"\n')
        try:
            yield s
        finally:
            s.stop()
    finally:
        provider.close()
        for p in CACHE_DIR.iterdir():
            p.unlink()
        CACHE_DIR.rmdir()


def test_front_sweeps_the_tts_cache_with_the_default_retention(system: PbxSystem) -> None:
    def cache() -> set[str]:
        return {p.name for p in CACHE_DIR.iterdir()}

    wait_until(lambda: "0" * 32 + ".wav" not in cache() and "1" * 32 + ".wav" not in cache(),
               20, "the front's first retention sweep")
    assert cache() == {"2" * 32 + ".wav", "3" * 32 + ".wav", "operator-notes.txt"}
    metrics = wait_until(lambda: (m := system.metrics()).get(
        "pbx_retention_sweeps_total", 0) >= 1 and m, 10, "the sweep counted in /metrics")
    assert metrics["pbx_retention_tts_cache_files_deleted_total"] == 2
    assert metrics["pbx_retention_tts_cache_bytes_deleted_total"] == 200 * MB + 50_000
    assert metrics["pbx_retention_tts_cache_bytes"] == 200 * MB + 50_000
    assert "retention: tts_cache: 2 files" in system.log("front")


def test_a_60_kb_malformed_datagram_makes_one_bounded_log_line(system: PbxSystem) -> None:
    # A Via no parser can read, 60 KB long: the parse error quotes it.
    datagram = (b"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\nVia: " + b"Z" * 60_000
                + b"\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:pbx@127.0.0.1>\r\nCall-ID: big-1"
                + b"\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    assert len(datagram) > 60_000
    mark = len(system.log("front"))
    before = system.metrics()["pbx_sip_malformed_total"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(datagram, ("127.0.0.1", system.sip_port))
    wait_until(lambda: system.metrics()["pbx_sip_malformed_total"] > before, 10,
               "the front counting the malformed datagram")
    line = wait_until(lambda: [ln for ln in system.log("front")[mark:].splitlines()
                               if "malformed SIP" in ln], 5, "the malformed SIP log line")[0]
    # Bounded twice over: the parser's error quotes an excerpt (pbx.sip.errors.excerpt)
    # and the log formatter cuts any line beyond [logging] max_line_bytes.
    assert "Z" * 200 not in line, line[:300]
    assert len(line.encode()) <= 2000 + 150, len(line.encode())
    assert max(len(ln.encode()) for ln in system.log("front").splitlines()) <= 2000 + 150
