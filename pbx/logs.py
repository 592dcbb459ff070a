"""One logging set-up for every process: stderr, which supervisord captures to `logs/`.

Every byte from the network is hostile, and some of it reaches log messages (a
malformed datagram in a parse error, a header in a warning). So every record goes
through `BoundedFormatter`, whatever logged it:

* the message is cut to `[logging] max_line_bytes` (UTF-8) with the cut marked
  (`…[cut: 61234 bytes]`), a traceback to `max_traceback_bytes` (its head and tail)
  and each of its lines to `max_line_bytes`;
* control characters (CR, LF, TAB, ESC, C1, U+2028/9) in the message are escaped
  (`\\r`, `\\n`, `\\x1b`...), so a record is one line and a CR/LF in a SIP header cannot
  forge a log line; traceback lines are prefixed with `| ` for the same reason;
* secret header values, URL passwords and credential query parameters are replaced
  (`pbx.redact.scrub_text`).

And `SimilarLinesFilter` keeps a flood of one message (a scanner sending garbage)
from pushing everything else out of the rotated log files: past
`max_similar_lines_per_s` lines of one template per second, lines are counted, not
written, and the next one written says how many were left out.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

from pbx import redact
from pbx.config import Settings

CUT_MARK = "…[cut: {} bytes]"
TRACEBACK_PREFIX = "| "
# Keys (templates) remembered by the filter; past this, it starts afresh.
MAX_TEMPLATES = 10_000

_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_LINE_RE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # but LF
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape: one printable line."""
    return _CONTROL_RE.sub(_escape_char, text) if _CONTROL_RE.search(text) else text


def _cut_bytes(text: str, max_bytes: int, original_bytes: int) -> str:
    """`text` cut to `max_bytes` UTF-8 bytes, the mark included."""
    mark = CUT_MARK.format(original_bytes)
    keep = max(0, max_bytes - len(mark.encode()))
    return text.encode("utf-8", "backslashreplace")[:keep].decode("utf-8", "ignore") + mark


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "backslashreplace"))


def bound_message(text: str, max_bytes: int) -> str:
    """A log message made safe: scrubbed of secrets, one line, at most `max_bytes`."""
    # Work on a prefix only: a character is at least one byte, so `max_bytes` characters
    # are enough, and a 60 KB message costs no more than a 2 KB one.
    head = text[:max_bytes]
    out = escape_controls(redact.scrub_text(head))
    cut = len(head) < len(text)
    if not cut and (len(out) * 4 <= max_bytes or _utf8_len(out) <= max_bytes):
        return out
    return _cut_bytes(out, max_bytes, _utf8_len(text))


def bound_block(text: str, max_bytes: int, max_line_bytes: int) -> str:
    """A traceback made safe: scrubbed, control characters but LF escaped, every line
    prefixed with `TRACEBACK_PREFIX` and at most `max_line_bytes`, the whole at most
    `max_bytes` (its head and tail kept)."""
    whole = max_bytes * 3 // 4  # the rest is room for the prefixes and escapes
    if len(text) > whole and _utf8_len(text) > whole:
        head, tail = max_bytes // 8, max_bytes * 5 // 8
        text = f"{text[:head]}\n{CUT_MARK.format(_utf8_len(text))}\n{text[-tail:]}"
    text = redact.scrub_text(text)
    if _CONTROL_LINE_RE.search(text):
        text = _CONTROL_LINE_RE.sub(_escape_char, text)
    line_max = max_line_bytes - len(TRACEBACK_PREFIX)
    out = "\n".join(
        TRACEBACK_PREFIX + (line if len(line) * 4 <= line_max or _utf8_len(line) <= line_max
                            else _cut_bytes(line, line_max, _utf8_len(line)))
        for line in text.split("\n"))
    if len(out) * 4 <= max_bytes or _utf8_len(out) <= max_bytes:
        return out
    return _cut_bytes(out, max_bytes, _utf8_len(out))


class BoundedFormatter(logging.Formatter):
    def __init__(self, fmt: str, max_line_bytes: int = 2000,
                 max_traceback_bytes: int = 8000) -> None:
        super().__init__(fmt)
        self.max_line_bytes = max_line_bytes
        self.max_traceback_bytes = max_traceback_bytes

    def format(self, record: logging.LogRecord) -> str:
        record.message = bound_message(record.getMessage(), self.max_line_bytes)
        suppressed = getattr(record, "similar_suppressed", 0)
        if suppressed:
            record.message += f" [{suppressed} similar lines not written]"
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + bound_block(record.exc_text, self.max_traceback_bytes,
                                       self.max_line_bytes)
        if record.stack_info:
            line += "\n" + bound_block(self.formatStack(record.stack_info),
                                       self.max_traceback_bytes, self.max_line_bytes)
        return line


class SimilarLinesFilter(logging.Filter):
    """A token bucket per message template (logger, level, format string): `rate`
    lines per second, bursts of `burst`; the time is the record's own."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        super().__init__()
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 5 * rate)
        self.buckets: dict[tuple[str, int, str], list[float]] = {}  # [tokens, at, left out]
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        left_out = self._pass((record.name, record.levelno, str(record.msg)[:200]),
                              record.created, take=True)
        if left_out is None:
            return False
        if left_out:
            record.similar_suppressed = left_out
        return True

    def admits(self, name: str, level: int, template: str, now: float) -> bool:
        """`admits()` below: counted as left out when refused, nothing taken else."""
        return self._pass((name, level, template[:200]), now, take=False) is not None

    def _pass(self, key: tuple[str, int, str], now: float, take: bool) -> int | None:
        """None: the line is left out (and counted). Else the lines left out since the
        last one written, which a taken line reports (and the count starts again)."""
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_TEMPLATES:
                self.buckets.clear()
            bucket = self.buckets[key] = [self.burst, now, 0.0]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[0] = tokens
        bucket[1] = now
        if tokens < 1.0:
            bucket[2] += 1
            self.suppressed += 1
            return None
        if not take:
            return 0
        bucket[0] = tokens - 1.0
        left_out = int(bucket[2])
        bucket[2] = 0.0
        return left_out


# The filter of the process's handler (`setup_logging`), which `admits` asks.
_similar_lines: SimilarLinesFilter | None = None


def admits(logger: logging.Logger, level: int, template: str) -> bool:
    """Whether a line of `template` at `level` would be written now: the level is
    enabled and the template is within its similar-lines budget. For a line that costs
    to build and is mostly left out under load (the front's ended-call line: ~4 % of its
    CPU at 400 calls/s, issue 9). A refused line is counted as left out, as if it had
    been logged (the next written one says so); an admitted one takes from the budget
    only when it is logged. `template` is the format string as the handler's filter sees
    it (after the logger's own filters, which may extend it)."""
    if not logger.isEnabledFor(level):
        return False
    similar = _similar_lines
    return similar is None or similar.admits(logger.name, level, template, time.time())


def setup_logging(settings: Settings, process: str) -> None:
    """The process's logging, and its secret header names (`pbx.redact.configure`)."""
    redact.configure(settings.privacy.secret_headers)
    # numba logs its compiler passes at DEBUG: never useful here, and very long.
    logging.getLogger("numba").setLevel(logging.WARNING)
    # No line shows a record's thread or process (the format names the pid once, here):
    # not collecting them saves a getpid() syscall (no vDSO on our VMs) and two lookups
    # per record, ~2 us of each line the front logs or filters out (issue 9; the logging
    # HOWTO's "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Nor where a line was logged from: without a source file, `Logger._log` skips
    # `findCaller`'s walk up the stack (the HOWTO's "Optimization"), ~1.4 % of the
    # front's CPU at 400 calls/s, where every call logs its end (issue 9).
    logging._srcfile = None  # type: ignore[attr-defined]
    cfg = settings.logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(BoundedFormatter(
        f"%(asctime)s {process}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        cfg.max_line_bytes, cfg.max_traceback_bytes))
    similar = None
    if cfg.max_similar_lines_per_s > 0:
        similar = SimilarLinesFilter(cfg.max_similar_lines_per_s)
        handler.addFilter(similar)
    logging.basicConfig(level=getattr(logging, cfg.level), handlers=[handler])
    if handler in logging.getLogger().handlers:  # (basicConfig keeps handlers set before)
        global _similar_lines
        _similar_lines = similar
