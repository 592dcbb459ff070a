"""Storage settings: `[logging]`, `[traces]` and `[retention]`: what the PBX writes, in
memory and on disk, and how long and how much of it is kept (DESIGN §6: every store is
bounded). Part of `Settings` (`pbx.config`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pbx.settings.base import Section


class LoggingSettings(Section):
    dir: str = "logs"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # A log message longer than this (UTF-8 bytes) is cut and the cut marked; control
    # characters (CR, LF, ESC...) in messages are escaped, so one record is one line
    # whatever the network sent (no forged log lines).
    max_line_bytes: int = Field(default=2000, ge=200, le=1_000_000)
    # The same for a traceback (kept whole up to this size, then head and tail).
    max_traceback_bytes: int = Field(default=8000, ge=500, le=10_000_000)
    # More lines of one message template than this per second (per process) are
    # counted, not written; the next line written says how many were left out.
    # 0: no limit.
    max_similar_lines_per_s: float = Field(default=10.0, ge=0)
    # logs/calls.jsonl and logs/traces.jsonl: past this size the file becomes
    # `<name>.1` (`.1` becomes `.2`, ...), keeping `jsonl_backups` old files. 0: never
    # rotated (an external tool's job then).
    jsonl_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    jsonl_backups: int = Field(default=5, ge=1, le=1000)
    # The front writes those lines to a buffer and flushes it this long after the first
    # unflushed line (and at shutdown): a write syscall per ~0.1 s, not per line. What
    # a kill -9 can lose (SIGTERM loses nothing). 0: every line flushed at once.
    jsonl_flush_s: float = Field(default=0.1, ge=0, le=5)

    @field_validator("jsonl_max_bytes")
    @classmethod
    def _check_rotation(cls, v: int) -> int:
        if 0 < v < 65536:
            raise ValueError(f"must be 0 (no rotation) or at least 65536, got {v}")
        return v


class TracesSettings(Section):
    """The in-memory store of IVR step traces behind `/api/traces` (docs/protocol.md "Traces").
    Bounded by count and by bytes (a step's size is its JSON line's); what goes is
    counted in /metrics."""

    # Sessions kept; the least recently updated one goes first.
    max_sessions: int = Field(default=1000, ge=1)
    # Steps kept per session; the oldest go first (the last step, with the session's
    # end reason, always stays).
    max_steps: int = Field(default=500, ge=1)
    # All kept steps together; the least recently updated sessions go first.
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=65536)
    # One session's kept steps; its oldest steps go first. A single step larger than
    # this is kept (and logged) as a stub without its request and action. At most
    # `max_bytes` (the default shrinks to it).
    max_session_bytes: int = Field(default=2 * 1024 * 1024, ge=16384)

    @model_validator(mode="after")
    def _session_within_total(self) -> TracesSettings:
        if "max_session_bytes" not in self.model_fields_set:
            self.max_session_bytes = min(self.max_session_bytes, self.max_bytes)
        elif self.max_session_bytes > self.max_bytes:
            raise ValueError(f"max_session_bytes ({self.max_session_bytes}) is larger than "
                             f"max_bytes ({self.max_bytes})")
        return self


class RetentionSettings(Section):
    """What the front deletes from `[media] recordings_dir`, `[media] voicemail_dir` and
    `[tts] cache_dir` (only the files the PBX writes there: WAV files, their JSON
    records, temporary files; never a file written in the last few minutes or a
    recording still in progress). Oldest first; 0 keeps forever / has no limit. The
    front sweeps the directories as its own host sees them."""

    # How often the sweep runs (seconds); 0: never.
    interval_s: float = Field(default=300.0, ge=0)
    recordings_max_age_days: float = Field(default=0.0, ge=0)
    recordings_max_bytes: int = Field(default=0, ge=0)
    voicemail_max_age_days: float = Field(default=0.0, ge=0)
    voicemail_max_bytes: int = Field(default=0, ge=0)
    # The TTS cache is rebuilt on demand, so it is always bounded by size; a file used
    # again counts as new (least recently used goes first).
    tts_cache_max_age_days: float = Field(default=30.0, ge=0)
    tts_cache_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
