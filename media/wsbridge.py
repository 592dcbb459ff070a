"""WebSocket audio bridge (MediaWsBridge, `voip_bridge`): the engine's side, sans-IO.

The worker shell owns the WebSocket (aiohttp); the engine keeps, per bridged
leg, a `WsLeg`:

* caller -> socket: the G.711 payloads received from the caller since the last
  tick are decoded once per tick for all bridged legs together (one kernel
  call per law) and queued as one binary frame of PCM16 little-endian 8 kHz per
  leg in `WsBridges.outgoing`, which the shell drains after the tick;
* socket -> caller: binary frames the shell hands to `feed` are G.711-encoded
  for the leg and kept in a small jitter buffer; playout starts once
  `PREFILL_SAMPLES` (60 ms) are buffered and is paced from a fixed origin,
  one `ptime` frame per due slot, sent through the engine's forwarding path
  (the leg's SSRC, sequence and timeline; a prompt playing on the leg wins).
  When the buffer runs dry the last partial frame is padded with silence and
  playout waits for the next prefill (a new talk spurt, marker bit set).
  The buffer is bounded by backpressure, not by dropping: the shell stops
  reading from the socket while `room()` is False, so a peer sending faster
  than real time is slowed by TCP flow control.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from media import g711

SAMPLE_RATE = 8000
PREFILL_SAMPLES = 480  # 60 ms
MAX_BUFFER_SAMPLES = 8000  # 1 s; above this the shell stops reading the socket
# One frame may still bring more (a whole utterance at once): up to 30 s is kept, the
# rest dropped, and the shell refuses frames over MAX_FRAME_BYTES (a server we do not
# control must not fill memory with one message).
HARD_BUFFER_SAMPLES = 30 * SAMPLE_RATE
MAX_FRAME_BYTES = 2 * HARD_BUFFER_SAMPLES  # PCM16
MAX_PENDING_PAYLOADS = 25  # caller packets kept between two ticks (more: dropped)
MAX_BURST_FRAMES = 5
_EPS = 1e-7


class WsLeg:
    __slots__ = ("out", "buf", "buf_codec", "odd", "playing", "origin", "frames_done", "src_ts")

    def __init__(self, codec: str) -> None:
        self.out: list[tuple[str, bytes]] = []  # (codec, payload) from the caller
        self.buf = bytearray()  # G.711 codes in buf_codec, to play to the caller
        self.buf_codec = codec
        self.odd = b""  # a trailing byte of an odd-length frame
        self.playing = False
        self.origin = 0.0
        self.frames_done = 0
        self.src_ts = 0

    def caller(self, payload: bytes, codec: str) -> None:
        """A received audio payload from the caller (G.711 codes in `codec`)."""
        if len(self.out) < MAX_PENDING_PAYLOADS:
            self.out.append((codec, payload))

    def feed(self, data: bytes) -> None:
        """A binary frame from the socket: PCM16 LE 8 kHz, any length."""
        if self.odd:
            data, self.odd = self.odd + data, b""
        if len(data) & 1:
            data, self.odd = data[:-1], data[-1:]
        room = HARD_BUFFER_SAMPLES - len(self.buf)
        if len(data) > 2 * room:
            data = data[: 2 * max(room, 0)]  # past 30 s buffered: dropped
        if data:
            pcm = np.frombuffer(data, dtype="<i2")
            self.buf += g711.encode(pcm, self.buf_codec).tobytes()

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def room(self) -> bool:
        return len(self.buf) < MAX_BUFFER_SAMPLES


class WsBridges:
    """The WebSocket-bridged legs of one engine."""

    def __init__(self) -> None:
        self.legs: dict[str, Any] = {}  # call_id -> engine Leg (with .ws set)
        self.outgoing: list[tuple[str, bytes]] = []

    def __len__(self) -> int:
        return len(self.legs)

    def start(self, leg: Any) -> None:
        leg.ws = WsLeg(leg.codec)
        self.legs[leg.call_id] = leg

    def end(self, leg: Any) -> None:
        leg.ws = None
        self.legs.pop(leg.call_id, None)

    def drain(self) -> list[tuple[str, bytes]]:
        """The (call_id, PCM16 LE bytes) frames for the sockets since the last drain."""
        out, self.outgoing = self.outgoing, []
        return out

    def tick(self, engine: Any, now: float, packets: list[Any]) -> None:
        if not self.legs:
            return
        self._caller_out()
        for leg in self.legs.values():
            self._play(engine, leg, now, packets)

    def _caller_out(self) -> None:
        """Decode every leg's caller audio of this tick, one kernel call per law."""
        by_codec: dict[str, list[tuple[str, int, bytes]]] = {}
        for call_id, leg in self.legs.items():
            ws: WsLeg = leg.ws
            if not ws.out:
                continue
            for codec, payload in ws.out:
                by_codec.setdefault(codec, []).append((call_id, len(payload), payload))
            ws.out = []
        for codec, items in by_codec.items():
            codes = np.frombuffer(b"".join(p for _, _, p in items), dtype=np.uint8)
            pcm = g711.decode(codes, codec).astype("<i2", copy=False).tobytes()
            frames: dict[str, list[bytes]] = {}
            pos = 0
            for call_id, n, _ in items:
                frames.setdefault(call_id, []).append(pcm[2 * pos : 2 * (pos + n)])
                pos += n
            self.outgoing += [(cid, b"".join(parts)) for cid, parts in frames.items()]

    def _play(self, engine: Any, leg: Any, now: float, packets: list[Any]) -> None:
        ws: WsLeg = leg.ws
        spf = leg.samples_per_frame
        if not ws.playing:
            if ws.buffered < PREFILL_SAMPLES:
                return
            ws.playing = True
            ws.origin = now
            ws.frames_done = 0
            leg.fwd_offset = None  # a new talk spurt in the leg's stream
        ptime = leg.ptime_ms / 1000.0
        due = math.floor((now - ws.origin) / ptime + _EPS) + 1
        if due - ws.frames_done > MAX_BURST_FRAMES:
            slip = due - ws.frames_done - MAX_BURST_FRAMES
            ws.origin += slip * ptime
            due -= slip
        silence = g711.SILENCE[leg.codec]
        while ws.frames_done < due:
            if not ws.buf:
                ws.playing = False
                return
            chunk = bytes(ws.buf[:spf])
            del ws.buf[:spf]
            if ws.buf_codec != leg.codec:
                chunk = g711.transcode(
                    np.frombuffer(chunk, dtype=np.uint8), ws.buf_codec, leg.codec
                ).tobytes()
            if len(chunk) < spf:
                chunk += bytes([silence]) * (spf - len(chunk))
            at = ws.origin + ws.frames_done * ptime
            ws.frames_done += 1
            engine.forward_frame(leg, ws.src_ts, chunk, at, packets)
            ws.src_ts = (ws.src_ts + spf) & 0xFFFFFFFF
