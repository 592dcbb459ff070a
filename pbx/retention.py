"""Retention of the files the PBX writes: recordings, voicemail, the TTS cache (DESIGN §6
"Bounded storage"; settings in `[retention]`).

`plan()` is the pure part: the files of one directory (path, size, modification time),
a policy and `now` in, the paths to delete out. A file older than `max_age_s` goes; then,
while the directory holds more than `max_bytes`, the oldest files go. Two kinds of files
never go:

* files written in the last `guard_s` seconds (`WRITE_GUARD_S`, ten minutes): a
  recording in progress is written every 200 ms (`media.recorder`), a TTS file is
  written to a temporary name and renamed, and a TTS cache hit touches its file, so a
  file in use always looks recent;
* the `busy` paths: recordings the front knows to be in progress (calls still up whose
  `RecordingFinished` has not come), whatever their times say.

A recording and its JSON record (`<name>.wav` and `<name>.wav.json`, `media.recorder`)
are one unit: they go together, and the unit's time is its newest file's.

`RetentionSweeper` is the thin shell: it walks each directory without following
symlinks (a symlink is neither followed nor deleted; the directory itself is never
deleted, only emptied subdirectories untouched for `guard_s`), considers only the files
the PBX writes there (`.wav`, `.json`, `.tmp` in recordings and voicemail; the cache's
`<hash>.wav` and `.tmp-*` files in the TTS cache, so a cache directory pointed at the
sounds directory by mistake loses no prompt), deletes what the plan says and counts it
for /metrics. The front runs `sweep()` every `[retention] interval_s` in a worker thread
(`pbx.app`), never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pbx.config import Settings

log = logging.getLogger("pbx.retention")

WRITE_GUARD_S = 600.0
DAY_S = 86400.0
# A sweep looks at no more than this many files per directory (memory and time stay
# bounded however many files someone left there); the rest waits for the next sweep.
MAX_SCAN_FILES = 1_000_000
SIDECAR_SUFFIX = ".json"

_TTS_CACHE_NAME_RE = re.compile(r"^(?:[0-9a-f]{32}\.wav|\.tmp-.*\.wav)$")
_RECORDING_SUFFIXES = (".wav", ".json", ".tmp")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the directory, "/"-separated
    size: int
    mtime: float  # seconds since the epoch


@dataclass(frozen=True)
class Policy:
    max_age_s: float = 0.0  # 0: no age limit
    max_bytes: int = 0  # 0: no size limit
    guard_s: float = WRITE_GUARD_S


@dataclass
class Plan:
    delete: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    kept_files: int = 0
    kept_bytes: int = 0
    over_budget: bool = False  # still above max_bytes: what is left is protected


@dataclass
class _Unit:
    paths: list[str]
    size: int
    mtime: float


def unit_key(path: str) -> str:
    """The unit a file belongs to: `<name>.wav.json` goes with `<name>.wav`."""
    return path[: -len(SIDECAR_SUFFIX)] if path.endswith(SIDECAR_SUFFIX) else path


def plan(entries: Iterable[FileEntry], policy: Policy, now: float,
         busy: Iterable[str] = ()) -> Plan:
    """What to delete from one directory (see the module text)."""
    units: dict[str, _Unit] = {}
    for entry in entries:
        key = unit_key(entry.path)
        unit = units.get(key)
        if unit is None:
            units[key] = _Unit([entry.path], entry.size, entry.mtime)
        else:
            unit.paths.append(entry.path)
            unit.size += entry.size
            unit.mtime = max(unit.mtime, entry.mtime)
    busy_keys = {unit_key(p) for p in busy}

    def protected(key: str, unit: _Unit) -> bool:
        # A time in the future (clock steps) counts as recent.
        return key in busy_keys or now - unit.mtime < policy.guard_s

    out = Plan()
    kept: list[tuple[float, str, _Unit]] = []
    for key, unit in units.items():
        if policy.max_age_s > 0 and now - unit.mtime > policy.max_age_s \
                and not protected(key, unit):
            _take(out, unit)
        else:
            kept.append((unit.mtime, key, unit))
    kept.sort(key=lambda item: (item[0], item[1]))
    total = sum(unit.size for _, _, unit in kept)
    if policy.max_bytes > 0 and total > policy.max_bytes:
        remaining: list[tuple[float, str, _Unit]] = []
        for item in kept:
            _, key, unit = item
            if total > policy.max_bytes and not protected(key, unit):
                _take(out, unit)
                total -= unit.size
            else:
                remaining.append(item)
        kept = remaining
        out.over_budget = total > policy.max_bytes
    out.kept_files = sum(len(unit.paths) for _, _, unit in kept)
    out.kept_bytes = total
    return out


def _take(out: Plan, unit: _Unit) -> None:
    out.delete.extend(sorted(unit.paths))
    out.deleted_bytes += unit.size


# ---------------------------------------------------------------- the shell


@dataclass(frozen=True)
class Area:
    """One directory under retention."""

    name: str  # for logs and metrics: recordings, voicemail, tts_cache
    root: Path
    policy: Policy
    accept: Callable[[str], bool]  # file names the PBX writes there

    @property
    def enabled(self) -> bool:
        return self.policy.max_age_s > 0 or self.policy.max_bytes > 0


@dataclass
class AreaResult:
    name: str
    deleted_files: int = 0
    deleted_bytes: int = 0
    kept_files: int = 0
    kept_bytes: int = 0
    over_budget: bool = False
    errors: int = 0
    truncated: bool = False  # more than MAX_SCAN_FILES files


def recording_file(name: str) -> bool:
    return name.endswith(_RECORDING_SUFFIXES)


def tts_cache_file(name: str) -> bool:
    return _TTS_CACHE_NAME_RE.match(name) is not None


def scan(root: Path, accept: Callable[[str], bool], limit: int = MAX_SCAN_FILES
         ) -> tuple[list[FileEntry], list[str], bool]:
    """The accepted regular files under `root` (symlinks neither followed nor listed),
    the subdirectories (relative paths, parents before children), and whether the
    listing stopped at `limit` files."""
    files: list[FileEntry] = []
    dirs: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root / rel if rel else root) as it:
                for entry in it:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(child)
                        stack.append(child)
                    elif entry.is_file(follow_symlinks=False) and accept(entry.name):
                        st = entry.stat(follow_symlinks=False)
                        files.append(FileEntry(child, st.st_size, st.st_mtime))
                        if len(files) >= limit:
                            return files, dirs, True
        except FileNotFoundError:
            continue  # the directory does not exist (yet), or went away meanwhile
    return files, dirs, False


def _inside(root: str, path: str) -> bool:
    return path.startswith(root + os.sep)


def apply(area: Area, to_delete: Iterable[str], dirs: Iterable[str], now: float,
          result: AreaResult) -> None:
    """Delete the planned files (each checked again: still a regular file whose real
    directory is inside the area), then the emptied subdirectories untouched for
    `guard_s`, deepest first."""
    root = os.path.realpath(area.root)
    for rel in to_delete:
        path = os.path.join(root, rel)
        try:
            parent = os.path.realpath(os.path.dirname(path))
            st = os.lstat(path)
            if not (parent == root or _inside(root, parent)) or not stat.S_ISREG(st.st_mode):
                result.errors += 1
                log.warning("retention %s: %s is not a file inside %s any more; kept",
                            area.name, rel, root)
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue  # someone else deleted it
        except OSError as exc:
            result.errors += 1
            log.warning("retention %s: cannot delete %s: %s", area.name, rel, exc)
            continue
        result.deleted_files += 1
        result.deleted_bytes += st.st_size
        log.debug("retention %s: deleted %s (%d bytes)", area.name, rel, st.st_size)
    for rel in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        path = os.path.join(root, rel)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < area.policy.guard_s:
                continue
            os.rmdir(path)  # fails unless empty
        except OSError:
            continue


class RetentionSweeper:
    """The periodic sweep of every enabled area, with counters for /metrics.

    `sweep()` blocks (file system work): the front runs it in a worker thread and hands
    its results to `record()` back on the event loop, which alone touches `stats`."""

    def __init__(self, areas: list[Area], interval_s: float) -> None:
        self.areas = [a for a in areas if a.enabled]
        self.interval_s = interval_s
        self.next_at: float | None = None  # first sweep at the first check
        self.stats: dict[str, int] = {"retention_sweeps": 0, "retention_errors": 0}
        for area in self.areas:
            for what in ("files_deleted", "bytes_deleted", "files", "bytes"):
                self.stats[f"retention_{area.name}_{what}"] = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionSweeper:
        r = settings.retention
        return cls([
            Area("recordings", Path(settings.media.recordings_dir),
                 Policy(r.recordings_max_age_days * DAY_S, r.recordings_max_bytes),
                 recording_file),
            Area("voicemail", Path(settings.media.voicemail_dir),
                 Policy(r.voicemail_max_age_days * DAY_S, r.voicemail_max_bytes),
                 recording_file),
            Area("tts_cache", Path(settings.tts.cache_dir),
                 Policy(r.tts_cache_max_age_days * DAY_S, r.tts_cache_max_bytes),
                 tts_cache_file),
        ], r.interval_s)

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0 and bool(self.areas)

    def due(self, now: float) -> bool:
        """Whether a sweep should start (`now`: the caller's monotonic clock); if so,
        the next one is scheduled `interval_s` later."""
        if not self.enabled or (self.next_at is not None and now < self.next_at):
            return False
        self.next_at = now + self.interval_s
        return True

    def sweep(self, now: float, busy: Iterable[str] = ()) -> list[AreaResult]:
        """One pass over every area (`now`: wall-clock seconds, as file times are;
        `busy`: paths of files being written, absolute or relative to the current
        directory)."""
        busy_real = [os.path.realpath(p) for p in busy]
        results = []
        for area in self.areas:
            result = AreaResult(area.name)
            try:
                root = os.path.realpath(area.root)
                files, dirs, result.truncated = scan(Path(root), area.accept)
                area_busy = [os.path.relpath(p, root) for p in busy_real if _inside(root, p)]
                policy = area.policy
                if result.truncated:  # the total is unknown: only the age rule applies
                    policy = Policy(policy.max_age_s, 0, policy.guard_s)
                p = plan(files, policy, now, area_busy)
                result.kept_files, result.kept_bytes = p.kept_files, p.kept_bytes
                result.over_budget = p.over_budget
                apply(area, p.delete, dirs, now, result)
            except OSError as exc:
                result.errors += 1
                log.warning("retention %s: sweep of %s failed: %s", area.name, area.root, exc)
            results.append(result)
        return results

    def record(self, results: list[AreaResult]) -> None:
        """Count a finished sweep and log what it did (one line, sizes not names)."""
        self.stats["retention_sweeps"] += 1
        done = []
        for r in results:
            s = self.stats
            s[f"retention_{r.name}_files_deleted"] += r.deleted_files
            s[f"retention_{r.name}_bytes_deleted"] += r.deleted_bytes
            s[f"retention_{r.name}_files"] = r.kept_files
            s[f"retention_{r.name}_bytes"] = r.kept_bytes
            s["retention_errors"] += r.errors
            if r.deleted_files:
                done.append(f"{r.name}: {r.deleted_files} files ({r.deleted_bytes} bytes) "
                            f"deleted, {r.kept_files} files ({r.kept_bytes} bytes) kept")
            if r.over_budget:
                log.warning("retention %s: %d bytes kept, above its limit: the rest is in "
                            "use or was written in the last %d s", r.name, r.kept_bytes,
                            WRITE_GUARD_S)
            if r.truncated:
                log.warning("retention %s: more than %d files; the rest waits for the next "
                            "sweep", r.name, MAX_SCAN_FILES)
        if done:
            log.info("retention: %s", "; ".join(done))
