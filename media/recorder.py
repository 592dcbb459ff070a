"""Recording call legs to WAV files (MediaRecord), written as the call goes.

Timeline. A recording's sample position p covers wall-clock time
`t0 + p / 8000`, `t0` being the moment it started (the MediaRecord, or the end
of the beep). Audio is placed on that timeline by RTP timestamp: each stream
(the caller's received packets; what the caller hears, i.e. this leg's own
sent prompt frames, forwarded peer audio and WebSocket audio) is anchored at
its first packet to the wall-clock position, and later packets land at
`anchor + (timestamp − anchor timestamp)` (RFC 3550 §5.1: the timestamp runs
with the sampling clock, also across silence). So lost packets and stretches
without RTP (silence suppression, hold) stay silent and the file lasts as long
as the call did; a stream that jumps more than a second away from the wall
clock (new SSRC, a sender restart) is anchored again.

Buffering. Each recording holds `BUF_SAMPLES` G.711 codes per channel (the law
of the leg when it started; packets in the other law are transcoded), in its row
of the recorder's `RecorderTable` (`media.rectable`) with the rest of what placing
a packet needs (`written`, `t0`, the two tracks, open or not). The worker's batch
path places packets there in compiled code (`media.kernels.recplace`: the receive
pass's caller packets, the relayed and pumped frames the leg hears), exactly as
`caller`/`heard` do here for the per-packet path; those two also take the rare
packet that needs a write first (ticks fell behind). Every
tick the samples older than `HOLD_SAMPLES` (room for late packets) are written
about every `FLUSH_SAMPLES` (200 ms): decoded in one call, interleaved,
one `write(2)`; the header sizes are patched about once a second
(`PATCH_SAMPLES`) and at the end (`media.wav.WavWriter`), so a killed worker
leaves a playable file missing at most the last fraction of a second.
The tick visits the recordings in `FLUSH_PHASES` groups, one group per tick
(round robin by start order), so even recordings started on the same tick
write on different ticks, and a tick's cost is a tenth of the recordings.

Ends (RecordingFinished.reason): a digit in `stop_digits` ("dtmf": the file is
cut where the digit began — the RFC 4733 event's start timestamp, or
`DTMF_TRIM_SAMPLES` (100 ms) before the digit was reported, which covers an
in-band tone's detection delay), `max_duration_ms` ("max_duration"),
MediaRecordStop ("stopped"), a write error ("error", after a MediaFailure with
the OS error). A released leg's file is finished the same way without an
event. With `metadata`, `<path>.json` gets the metadata plus `duration_ms`
and `finished_at` (ISO 8601 UTC), written to a temporary name and renamed.

Listening (MediaRecord.listen_ms, `input_voice`): the recording also runs through
the energy VAD (`media.vad`), all listening legs in one kernel call per tick, on the
frames that are HOLD_SAMPLES old (the ones about to be written), before any file is
written that tick. A decision ends the recording on that tick: `speech_end` (cut
200 ms after the last voiced frame), `no_speech`, `max_speech`. Its maximum length is
bounded by `listen_ms + max_speech_ms`.

This module does file I/O (through `WavWriter`) but no sockets and reads no
clock except the injected `wall_clock` used for `finished_at`.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import orjson

from media import g711, vad
from media import rectable as _rt
from media.rectable import RecorderTable
from media.rtp import ts_diff
from media.wav import WavWriter
from pbx.messages import MediaEvent, MediaFailure, MediaRecord, RecordingFinished

SAMPLE_RATE = 8000
FLUSH_SAMPLES = 1600  # write every 200 ms
# Recordings are visited round robin, one group per tick, each every FLUSH_PHASES ticks.
FLUSH_PHASES = 10
MIN_FLUSH_SAMPLES = 800
HOLD_SAMPLES = 480  # keep the newest 60 ms in memory for packets that arrive late
PATCH_SAMPLES = 8000  # patch the header sizes about once a second
BUF_SAMPLES = _rt.BUF_SAMPLES  # per channel: FLUSH + HOLD + a tick, room for early packets
DTMF_TRIM_SAMPLES = 800  # 100 ms
# An RFC 4733 event seen this recently (in samples) is the one a stop digit came from.
_EVENT_FRESH_SAMPLES = 640
# Play id of the recording beep; the engine sends no AudioComplete for it.
BEEP_PLAY_ID = -1

WriterFactory = Callable[[Path, int], WavWriter]


class RecordError(Exception):
    """A recording that cannot start; the text says why (becomes a MediaFailure)."""


def resolve_target(root: str | os.PathLike[str], name: str) -> Path:
    """A recording path relative to its area -> an absolute path inside `root`.

    RecordError for absolute paths, `..`, NUL bytes, an empty name, or a path
    whose existing directories lead out of `root` through a symlink.
    """
    if not name or "\x00" in name:
        raise RecordError(f"invalid recording path {name!r}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise RecordError(f"recording path {name!r} is outside the recordings directory")
    base = Path(root).resolve()
    path = base.joinpath(*pure.parts)
    if not path.resolve().is_relative_to(base) or path.resolve() == base:
        raise RecordError(f"recording path {name!r} is outside the recordings directory")
    return path


def _rec_col(col: int, doc: str) -> property:
    def get(self: Any) -> int:
        return int(self.rec.table.i[self.rec.row, col + self.base])

    def put(self: Any, value: int) -> None:
        self.rec.table.i[self.rec.row, col + self.base] = value

    return property(get, put, doc=doc)


class _Track:
    """Maps one RTP timestamp stream onto recording positions (three columns of the
    recording's row, from `base`: `media.kernels.recplace._place` is the compiled twin)."""

    __slots__ = ("rec", "base")

    def __init__(self, rec: Recording, base: int) -> None:
        self.rec = rec
        self.base = base

    ssrc = _rec_col(0, "the stream's SSRC, -1: none yet")
    ts = _rec_col(1, "the anchor timestamp")
    pos = _rec_col(2, "the anchor's recording position")

    def place(self, ssrc: int, ts: int, wall: int) -> int:
        """Position of a packet with timestamp `ts` that `wall` says starts at `wall`."""
        track = self.rec.table.i[self.rec.row, self.base : self.base + 3]  # ssrc, ts, pos
        if ssrc == track[0]:
            pos = int(track[2]) + ts_diff(ts, int(track[1]))
            if -_rt.REANCHOR_SAMPLES <= pos - wall <= _rt.LEAD_SAMPLES:
                return pos
        track[0], track[1], track[2] = ssrc, ts, wall
        return wall


class Recording:
    """One leg's recording: the buffer, the file and the end conditions. What placing a
    packet needs (the code buffer, `written`, `t0`, the tracks, open or not) lives in the
    recording's row of a `RecorderTable` (the recorder's, or one of its own), which the
    compiled placement (`media.kernels.recplace`) writes too."""

    __slots__ = (
        "record_id",
        "name",
        "path",
        "stop_digits",
        "max_samples",
        "channels",
        "codec",
        "metadata",
        "writer",
        "table",
        "row",
        "_t0",
        "_written",
        "patched",
        "caller_track",
        "heard_track",
        "_stop_reason",
        "event_pos",
        "event_wall",
        "last_wall",
        "error",
        "wake",
        "vad_params",
        "vad_row",
        "vad_pos",
        "cut",
    )

    def __init__(
        self,
        msg: MediaRecord,
        path: Path,
        writer: WavWriter,
        codec: str,
        wake: Callable[[], None] = lambda: None,
        listen: vad.ListenTuning | None = None,
        table: RecorderTable | None = None,
    ) -> None:
        self.record_id = msg.record_id
        self.name = msg.path
        self.path = path
        self.stop_digits = msg.stop_digits.upper()
        max_ms = max(0, msg.max_duration_ms)
        # Listening: the VAD's parameters, its row in the recorder's VadBank (set when
        # the recording starts), and the position analysed up to.
        self.vad_params: np.ndarray | None = None
        self.vad_row: int | None = None
        self.vad_pos = 0
        if msg.listen_ms is not None:
            tuning = listen or vad.ListenTuning()
            self.vad_params = tuning.params(msg.listen_ms)
            max_ms = min(max_ms, msg.listen_ms + tuning.max_speech_ms)
        self.cut: int | None = None  # where a VAD decision ends the file
        self.max_samples = max_ms * SAMPLE_RATE // 1000
        self.channels = 2 if msg.stereo else 1
        self.codec = codec
        self.metadata = msg.metadata
        self.writer = writer
        self.table = table if table is not None else RecorderTable()
        self.row = self.table.add(
            self.channels, int(codec == "PCMA"), self.max_samples, g711.SILENCE[codec]
        )
        self._t0: float | None = None
        self._written = 0
        self.patched = 0
        self.caller_track = _Track(self, _rt.R_CALLER)
        self.heard_track = _Track(self, _rt.R_HEARD)
        self._stop_reason: str | None = None  # "dtmf" once a stop digit came
        self.table.i[self.row, _rt.R_OPEN] = 1
        self.event_pos: int | None = None
        self.event_wall = 0
        self.last_wall = 0
        self.error: OSError | None = None  # a write that failed outside the tick
        self.wake = wake  # asks the recorder to look at this recording on the next tick

    # ---------------------------------------------------------------- the table row

    # t0 and written change in Python only: kept here too, mirrored into the row.

    @property
    def t0(self) -> float | None:
        """Wall-clock time of position 0; None while the beep plays."""
        return self._t0

    @t0.setter
    def t0(self, value: float | None) -> None:
        self._t0 = value
        self.table.f[self.row, _rt.RF_T0] = math.nan if value is None else value

    @property
    def written(self) -> int:
        """Samples per channel already in the file (the buffer starts there)."""
        return self._written

    @written.setter
    def written(self, value: int) -> None:
        self._written = value
        self.table.i[self.row, _rt.R_WRITTEN] = value

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @stop_reason.setter
    def stop_reason(self, value: str | None) -> None:
        self._stop_reason = value
        self.table.i[self.row, _rt.R_OPEN] = value is None

    @property
    def buf(self) -> np.ndarray:
        """The G.711 codes from `written` on, one row per channel (a view of the table)."""
        return self.table.buf[self.row, : self.channels]

    def own_row(self) -> None:
        """Move to a table of its own (the recorder's row goes back to it): for a
        recording that is over but still read (its length, a failure's event)."""
        own = RecorderTable(1)
        row = own.add(self.channels, 0, 0, 0)
        own.i[row], own.f[row], own.buf[row] = (
            self.table.i[self.row],
            self.table.f[self.row],
            self.table.buf[self.row],
        )
        own.i[row, _rt.R_OPEN] = 0
        self.table.remove(self.row)
        self.table, self.row = own, row

    # ---------------------------------------------------------------- timeline

    def wall(self, now: float) -> int:
        """The recording position of time `now` (0 before the start)."""
        t0 = self._t0
        if t0 is None:
            return 0
        return max(0, round((now - t0) * SAMPLE_RATE))

    def _put(self, channel: int, pos: int, payload: bytes, codec: str) -> None:
        n = len(payload)
        end = min(pos + n, self.max_samples)
        start = max(pos, self._written)
        if start >= end:
            return  # too late (already written) or beyond the maximum length
        if end > self._written + BUF_SAMPLES:
            # Ticks fell behind (a stalled worker): write the oldest samples to make room.
            try:
                self._flush(end - BUF_SAMPLES)
            except OSError as exc:  # reported by the next tick
                self.error = exc
                self.stop_reason = "error"
                self.wake()
                return
            start = max(pos, self._written)
        codes = np.frombuffer(payload, dtype=np.uint8)[start - pos : end - pos]
        if codec != self.codec:
            codes = g711.transcode(codes, codec, self.codec)
        w = self._written
        self.table.buf[self.row, channel, start - w : end - w] = codes

    def caller(self, ssrc: int, ts: int, payload: bytes, codec: str, now: float) -> None:
        """A received audio packet (G.711 codes in `codec`) from the caller."""
        if self._t0 is None or self._stop_reason is not None:
            return
        # It arrived at `now`, so it ends about now.
        pos = self.caller_track.place(ssrc, ts, self.wall(now) - len(payload))
        self._put(0, pos, payload, codec)

    def heard(self, ts: int, payload: bytes, codec: str, at: float) -> None:
        """A frame sent to the caller (its outgoing timestamp), starting to play at `at`."""
        if self.channels == 1 or self._t0 is None or self._stop_reason is not None:
            return
        pos = self.heard_track.place(0, ts, self.wall(at))
        self._put(1, pos, payload, codec)

    def event(self, ssrc: int, ts: int, now: float) -> None:
        """An RFC 4733 packet from the caller: remember where its event began."""
        if self.t0 is None or self.stop_reason is not None:
            return
        track = self.caller_track
        wall = self.wall(now)
        if track.ssrc == ssrc:
            self.event_pos = track.pos + ts_diff(ts, track.ts)
        else:
            self.event_pos = wall
        self.event_wall = wall

    def digit(self, digit: str) -> bool:
        """A digit from the caller; True (and the recording closes) if it is a stop digit."""
        if self.stop_reason is None and digit.upper() in self.stop_digits:
            self.stop_reason = "dtmf"
            self.wake()
            return True
        return False

    def dtmf_end(self, now: float) -> int:
        """Where to cut the file for a stop digit reported just before `now`."""
        wall = self.wall(now)
        end = wall - DTMF_TRIM_SAMPLES
        if self.event_pos is not None and wall - self.event_wall <= _EVENT_FRESH_SAMPLES:
            end = min(end, self.event_pos)
        return max(0, end)

    # ---------------------------------------------------------------- file

    def _flush(self, upto: int) -> None:
        """Write samples [written, upto) (silence where nothing arrived)."""
        n = upto - self.written
        if n <= 0:
            return
        take = min(n, BUF_SAMPLES)
        pcm = g711.decode(self.buf[:, :take], self.codec)  # (channels, take) int16
        if take < n:
            pcm = np.concatenate([pcm, np.zeros((self.channels, n - take), np.int16)], axis=1)
        frames = pcm[0] if self.channels == 1 else pcm.T  # interleave L, R
        self.writer.append(np.ascontiguousarray(frames, dtype="<i2").tobytes())
        buf = self.buf
        if take < BUF_SAMPLES:
            buf[:, : BUF_SAMPLES - take] = buf[:, take:]
        buf[:, BUF_SAMPLES - take :] = g711.SILENCE[self.codec]
        self.written = upto

    def pump(self, now: float) -> None:
        """Per-tick work: write what is old enough, patch the header now and then."""
        wall = self.wall(now)
        self.last_wall = wall
        ready = min(wall - HOLD_SAMPLES, self.max_samples)
        if ready - self.written >= MIN_FLUSH_SAMPLES:
            self._flush(ready)
            if self.written - self.patched >= PATCH_SAMPLES:
                self.writer.patch()
                self.patched = self.written

    def finish(self, end: int) -> int:
        """Write up to `end`, cut anything after it, close; the length in samples."""
        end = max(0, min(end, self.max_samples))
        if self.writer.closed:  # finished already
            return min(end, self.written)
        try:
            if end > self.written:
                self._flush(end)
            elif end < self.written:
                self.writer.truncate(end)
                self.written = end
        finally:
            self.writer.close()
        return end


class Recorder:
    """The recordings of one engine. Areas map `MediaRecord.area` to a directory."""

    def __init__(
        self,
        areas: dict[str, str | os.PathLike[str]] | None = None,
        wall_clock: Callable[[], float] = time.time,
        open_writer: WriterFactory | None = None,
        listen: vad.ListenTuning | None = None,
    ) -> None:
        self.areas = {k: Path(v) for k, v in (areas or {}).items()}
        self.listen = listen or vad.ListenTuning()
        self.vad = vad.VadBank()
        self._listening: dict[str, tuple[Any, Recording]] = {}
        self.wall_clock = wall_clock
        self.open_writer: WriterFactory = open_writer or (lambda p, ch: WavWriter(p, ch))
        # The active recordings' placement state (`Recording.row`; legs point at it
        # through the leg table's L_REC), written by `media.kernels.recplace` too.
        self.table = RecorderTable()
        self.active: dict[str, tuple[Any, Recording]] = {}  # call_id -> (leg, recording)
        # Each recording sits in one group; a tick visits one group (FLUSH_PHASES ticks
        # apart) plus the urgent ones: a beep playing, a stop digit, the end near.
        self._groups: list[dict[str, tuple[Any, Recording]]] = [{} for _ in range(FLUSH_PHASES)]
        self._group_of: dict[str, int] = {}
        self._urgent: set[str] = set()
        self._started = 0
        self._ticks = 0

    def __len__(self) -> int:
        return len(self.active)

    def start(self, leg: Any, msg: MediaRecord, now: float) -> list[MediaEvent]:
        """Open the file and attach a Recording to `leg` (armed, if `beep`, until the beep ends)."""
        events: list[MediaEvent] = []
        if leg.rec is not None:
            events += self.stop(leg, now, "stopped")
        root = self.areas.get(msg.area)
        if root is None:
            return [*events, _failure(leg.call_id, f"no directory for {msg.area} recordings")]
        try:
            path = resolve_target(root, msg.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.parent.resolve().is_relative_to(root.resolve()):
                raise RecordError(
                    f"recording path {msg.path!r} is outside the recordings directory"
                )
            writer = self.open_writer(path, 2 if msg.stereo else 1)
        except RecordError as exc:
            return [*events, _failure(leg.call_id, str(exc))]
        except OSError as exc:
            return [
                *events,
                _failure(leg.call_id, f"{msg.path}: cannot write: {exc.strerror or exc}"),
            ]
        call_id = leg.call_id
        urgent = self._urgent
        rec = Recording(msg, path, writer, leg.codec, lambda: urgent.add(call_id), self.listen,
                        self.table)  # fmt: skip
        group = self._started % FLUSH_PHASES
        self._started += 1
        self._groups[group][call_id] = (leg, rec)
        self._group_of[call_id] = group
        urgent.add(call_id)  # looked at on the next tick (a beep, a short maximum)
        if not msg.beep:
            rec.t0 = now
        leg.rec = rec
        self.active[leg.call_id] = (leg, rec)
        if rec.vad_params is not None:
            rec.vad_row = self.vad.take(rec.vad_params)
            self._listening[call_id] = (leg, rec)
        return events

    def stop(self, leg: Any, now: float, reason: str = "stopped") -> list[MediaEvent]:
        """MediaRecordStop (or a new MediaRecord): end the leg's recording with an event."""
        rec: Recording | None = leg.rec
        if rec is None:
            return []
        return self._end(leg, rec, rec.wall(now), reason, emit=True)

    def release(self, leg: Any, now: float | None) -> None:
        """The leg is going away: finish its file, no event."""
        rec: Recording | None = leg.rec
        if rec is not None:
            end = rec.wall(now) if now is not None else rec.last_wall
            self._end(leg, rec, end, "stopped", emit=False)

    def tick(self, now: float) -> list[MediaEvent]:
        """Start recordings whose beep ended, end those due, write what is ready.

        Visits only this tick's group and the urgent recordings, so a tick costs
        about 1/FLUSH_PHASES of the recordings, and writes are spread over the ticks.
        """
        events: list[MediaEvent] = []
        if not self.active:
            return events
        if self._listening:
            self._listen(now)
        self._ticks += 1
        group = self._groups[self._ticks % FLUSH_PHASES]
        urgent = list(self._urgent)
        for cid in urgent:
            if cid in self.active:
                leg, rec = self.active[cid]
                events += self._visit(leg, rec, now, cid in group)
        seen = set(urgent)
        for cid, (leg, rec) in list(group.items()):
            if cid not in seen and cid in group:
                events += self._visit(leg, rec, now, True)
        return events

    def _listen(self, now: float) -> None:
        """The VAD over every listening leg's new whole frames up to HOLD_SAMPLES ago,
        in one kernel call; a decision marks its recording for this tick's visit."""
        legs: list[Recording] = []
        frames: list[np.ndarray] = []
        rows: list[int] = []
        frame = vad.FRAME
        for _leg, rec in self._listening.values():
            if rec.t0 is None or rec.stop_reason is not None or rec.vad_row is None:
                continue
            # Frames an overflowing buffer wrote out unanalysed are skipped.
            written = rec.written
            pos = rec.vad_pos if rec.vad_pos > written else written
            ready = round((now - rec.t0) * SAMPLE_RATE) - HOLD_SAMPLES
            n = min(ready - pos, BUF_SAMPLES - (pos - written)) // frame
            if n <= 0:
                continue
            at = pos - written
            legs.append(rec)
            frames.append(rec.buf[0, at : at + n * frame])
            rows.append(rec.vad_row)
            rec.vad_pos = pos + n * frame
        if not legs:
            return
        ended = self.vad.run(frames, [rec.codec == "PCMA" for rec in legs], rows)
        for i, (reason, cut_frame) in ended.items():
            rec = legs[i]
            rec.stop_reason = reason
            rec.cut = cut_frame * frame
            rec.wake()

    def _visit(self, leg: Any, rec: Recording, now: float, write: bool) -> list[MediaEvent]:
        call_id = leg.call_id
        if rec.t0 is None:
            play = leg.play
            if play is not None and play.play_id == BEEP_PLAY_ID and rec.stop_reason is None:
                return []  # still beeping
            rec.t0 = now
        if rec.error is not None:
            return self._fail(leg, rec, rec.error)
        if rec.stop_reason is not None:
            end = rec.cut if rec.cut is not None else rec.dtmf_end(now)
            return self._end(leg, rec, end, rec.stop_reason, emit=True)
        wall = rec.wall(now)
        if wall >= rec.max_samples:
            return self._end(leg, rec, rec.max_samples, "max_duration", emit=True)
        if write:
            try:
                rec.pump(now)
            except (OSError, ValueError) as exc:
                return self._fail(leg, rec, exc)
        # Close to the maximum length: look every tick so the end is on time.
        if wall + (FLUSH_PHASES + 1) * SAMPLE_RATE // 50 >= rec.max_samples:
            self._urgent.add(call_id)
        else:
            self._urgent.discard(call_id)
        return []

    # ---------------------------------------------------------------- ends

    def _detach(self, leg: Any, rec: Recording) -> None:
        if leg.rec is rec:
            leg.rec = None
        call_id = leg.call_id
        if self.active.get(call_id, (None, None))[1] is rec:
            del self.active[call_id]
            self._groups[self._group_of.pop(call_id)].pop(call_id, None)
            self._urgent.discard(call_id)
        if self._listening.get(call_id, (None, None))[1] is rec:
            del self._listening[call_id]
        if rec.vad_row is not None:
            self.vad.give_back(rec.vad_row)
            rec.vad_row = None
        if rec.table is self.table:
            rec.own_row()

    def _fail(self, leg: Any, rec: Recording, exc: Exception) -> list[MediaEvent]:
        self._detach(leg, rec)
        try:
            rec.writer.close()
        except OSError:
            pass
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return [
            _failure(leg.call_id, f"{rec.name}: write failed: {reason}"),
            MediaEvent(
                call_id=leg.call_id,
                event=RecordingFinished(
                    record_id=rec.record_id,
                    path=rec.name,
                    duration_ms=rec.written * 1000 // SAMPLE_RATE,
                    reason="error",
                ),
            ),
        ]

    def _end(self, leg: Any, rec: Recording, end: int, reason: str, emit: bool) -> list[MediaEvent]:
        try:
            samples = rec.finish(end)
        except (OSError, ValueError) as exc:
            failed = self._fail(leg, rec, exc)
            return failed if emit else []
        speech_ms = self.vad.speech_start_ms(rec.vad_row) if rec.vad_row is not None else None
        self._detach(leg, rec)
        duration_ms = samples * 1000 // SAMPLE_RATE
        events: list[MediaEvent] = []
        if rec.metadata is not None:
            try:
                self._write_metadata(rec, duration_ms)
            except (OSError, TypeError) as exc:
                events.append(_failure(leg.call_id, f"{rec.name}.json: cannot write: {exc}"))
        if emit:
            events.append(
                MediaEvent(
                    call_id=leg.call_id,
                    event=RecordingFinished(
                        record_id=rec.record_id,
                        path=rec.name,
                        duration_ms=duration_ms,
                        reason=reason,  # type: ignore[arg-type]
                        speech_start_ms=speech_ms,
                    ),
                )
            )
        return events

    def _write_metadata(self, rec: Recording, duration_ms: int) -> None:
        finished = datetime.datetime.fromtimestamp(self.wall_clock(), datetime.UTC)
        doc = {
            **(rec.metadata or {}),
            "duration_ms": duration_ms,
            "finished_at": finished.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        final = rec.path.with_name(rec.path.name + ".json")
        tmp = rec.path.with_name(rec.path.name + ".json.tmp")
        tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        os.replace(tmp, final)


def _failure(call_id: str, reason: str) -> MediaEvent:
    return MediaEvent(call_id=call_id, event=MediaFailure(reason=reason))
