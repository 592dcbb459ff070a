"""An append-only JSON-lines file (`logs/calls.jsonl`, `logs/traces.jsonl`), rotated by size.

Opened on the first write (its directory created), one line per object. By default
each line is flushed at once; with `flush_every_line=False` (the front's, `[logging]
jsonl_flush_s` > 0) lines stay in the file's buffer until `flush()`, which the owner
calls on a short timer and at shutdown (`close()` flushes too): a write syscall per
line was 3 per call in the front. A buffer fuller than `io.DEFAULT_BUFFER_SIZE` is
written at once whatever the timer.
A file that cannot be written costs one warning and disables that log, never a call.

Rotation (`[logging] jsonl_max_bytes`, `jsonl_backups`): when a line would take the
file past `max_bytes`, `<name>.<backups-1>` becomes `<name>.<backups>` (the oldest is
overwritten), ..., `<name>` becomes `<name>.1`, and a new `<name>` is started; so the
files never hold more than about `(backups + 1) * max_bytes`. A single line larger than
`max_bytes` gets a file of its own. The size is learnt once when the file is opened and
then counted, so a write costs no `stat`. The front is the only writer of its files.

`logging.handlers.RotatingFileHandler` does the same renaming but is a logging handler:
it takes `LogRecord`s, formats each one twice (once to decide on a rollover), and writes
text; these files are bytes from orjson, written by a single owner, so the few lines of
renaming live here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger("pbx.jsonl")


def encode_line(obj: Any) -> bytes | None:
    """`obj` as one JSON line (newline included); None (and a warning) if it cannot be."""
    try:
        return orjson.dumps(obj, default=str) + b"\n"
    except TypeError as exc:
        log.warning("JSON line not written: %s", exc)
        return None


class JsonLinesLog:
    def __init__(self, path: Path | str | None, max_bytes: int = 0, backups: int = 1,
                 flush_every_line: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.flush_every_line = flush_every_line
        self.unflushed = False  # lines written to the buffer since the last flush
        self.max_bytes = max_bytes  # 0: never rotated
        self.backups = max(1, backups)
        self._file: IO[bytes] | None = None
        self._size = 0
        self.lines = 0
        self.rotations = 0

    def write(self, obj: Any) -> None:
        line = encode_line(obj)
        if line is not None:
            self.write_line(line)

    def write_line(self, line: bytes) -> None:
        """One line, already encoded (ending with a newline)."""
        if self.path is None:
            return
        try:
            if self._file is None:
                self._open()
            if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            assert self._file is not None
            self._file.write(line)
            if self.flush_every_line:
                self._file.flush()
            else:
                self.unflushed = True
            self._size += len(line)
            self.lines += 1
        except OSError as exc:
            log.warning("cannot write %s (%s): this log is off until restart", self.path, exc)
            self.close()
            self.path = None

    def flush(self) -> None:
        """What the buffer holds, to the file."""
        self.unflushed = False
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as exc:
            log.warning("cannot write %s (%s): this log is off until restart", self.path, exc)
            self.close()
            self.path = None

    def _open(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._size = os.fstat(self._file.fileno()).st_size  # once per open, not per line

    def _rotate(self) -> None:
        assert self.path is not None
        self.close()
        name = str(self.path)
        for index in range(self.backups - 1, 0, -1):
            older = f"{name}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{name}.{index + 1}")
        os.replace(name, f"{name}.1")
        self._file = self.path.open("ab")
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        self.unflushed = False
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
