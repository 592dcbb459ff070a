"""An append-only JSON-lines file (`logs/calls.jsonl`, `logs/traces.jsonl`).

Opened on the first write (its directory created), one line per object, flushed at
once so a crash loses nothing already written and `tail -f` sees lines as they come.
A file that cannot be written costs one warning and disables that log, never a call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger("pbx.jsonl")


class JsonLinesLog:
    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[bytes] | None = None
        self.lines = 0

    def write(self, obj: Any) -> None:
        if self.path is None:
            return
        try:
            line = orjson.dumps(obj, default=str) + b"\n"
        except TypeError as exc:
            log.warning("%s: line not written: %s", self.path, exc)
            return
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("ab")
            self._file.write(line)
            self._file.flush()
            self.lines += 1
        except OSError as exc:
            log.warning("cannot write %s (%s): this log is off until restart", self.path, exc)
            self.close()
            self.path = None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
