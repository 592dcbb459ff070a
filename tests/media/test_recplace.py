"""Recording placement in compiled code (`media.kernels.recplace`): the files a recorded
bridged call writes through the batch path (rx_batch, relay_batch, record_rx/record_tx)
are byte for byte the files of the per-packet path (`receive_rtp`: `Recording.caller`
per received packet, `Recording.heard` per forwarded one — main's placement, kept as
the reference), and the batch path calls neither of them. Virtual clock, no sockets."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media import g711
from media.engine import MediaEngine
from media.kernels import rtpbatch as K
from media.prompts import PromptCache
from media.recorder import BUF_SAMPLES, Recorder, Recording
from media.rtp import RtpPacket, build_event, build_rtp
from pbx.messages import MediaEvent, MediaPlay, MediaRecord, MediaRemote, RecordingFinished
from tests.media.test_rtpbatch import Batch, write_wav

TICK = 0.02
# a: the recorded caller (PCMU, events 101), b: the far end (PCMA, events 96)
PHONES = {"a": ("PCMU", 0, 101), "b": ("PCMA", 8, 96)}


def addr(call_id: str) -> tuple[str, int]:
    return "192.0.2.20", 7100 + ord(call_id)


def tone(k: int, hz: float, law: str, amp: float = 9000.0) -> bytes:
    """Frame k (160 samples) of a tone: speech-like energy for the VAD."""
    t = (np.arange(160) + 160 * k) / 8000.0
    return g711.encode((np.sin(2 * np.pi * hz * t) * amp).astype(np.int16), law).tobytes()


class Sim:
    """a and b bridged, both phones sending each tick; fed per packet ("packet") or in
    receive passes ("kernel", or "twin": the kernels' Python twins)."""

    def __init__(self, tmp: Path, path: str) -> None:
        write_wav(tmp / "p.wav", 0.3)
        self.path = path
        self.rec_dir = tmp / f"rec-{path}"
        self.engine = MediaEngine(PromptCache(tmp), rng=random.Random(3),
                                  recorder=Recorder({"recordings": self.rec_dir,
                                                     "asr": self.rec_dir}))  # fmt: skip
        self.engine.kernels = path != "twin"
        self.k = 0
        self.seq = {c: 1000 * ord(c) for c in PHONES}
        self.ts = {c: 7_000_000 * ord(c) for c in PHONES}
        self.ssrc = {c: 0x5000 + ord(c) for c in PHONES}
        self.events: list[MediaEvent] = []
        self.held: list[tuple[str, bytes]] = []  # a packet delayed to the next pass
        for call_id, (codec, pt, dtmf) in PHONES.items():
            self.engine.add_leg(call_id, 30000 + 2 * len(self.engine), inband_dtmf=False)
            self.engine.set_remote(MediaRemote(
                call_id=call_id, remote_ip="10.0.0.1", remote_port=4000 + ord(call_id),
                payload_type=pt, codec=codec, dtmf_payload_type=dtmf,  # type: ignore[arg-type]
            ))  # fmt: skip
        self.engine.bridge("a", "b")

    @property
    def now(self) -> float:
        return 50.0 + self.k * TICK

    def audio(self, call_id: str, law: str | None = None, hz: float = 440.0,
              amp: float = 9000.0) -> bytes:  # fmt: skip
        codec, pt, _ = PHONES[call_id]
        law = law or codec
        self.seq[call_id] = (self.seq[call_id] + 1) & 0xFFFF
        self.ts[call_id] = (self.ts[call_id] + 160) % (1 << 32)
        return build_rtp(RtpPacket(0 if law == "PCMU" else 8, self.seq[call_id],
                                   self.ts[call_id], self.ssrc[call_id],
                                   tone(self.k, hz, law, amp)))  # fmt: skip

    def press(self, call_id: str, digit: int) -> list[tuple[str, bytes]]:
        pt = PHONES[call_id][2]
        out = []
        for k, (end, dur) in enumerate([(False, 160), (False, 320), (True, 480), (True, 480)]):
            self.seq[call_id] = (self.seq[call_id] + 1) & 0xFFFF
            out.append((call_id, build_rtp(RtpPacket(pt, self.seq[call_id], self.ts[call_id],
                                                     self.ssrc[call_id],
                                                     build_event(digit, end, 10, dur),
                                                     marker=k == 0))))  # fmt: skip
        return out

    def send(self, items: list[tuple[str, bytes]]) -> None:
        engine, now = self.engine, self.now + 0.005
        if self.path == "packet":
            for call_id, data in items:
                _, e = engine.receive_rtp(call_id, data, addr(call_id), now)
                self.events += e
            return
        batch = Batch([(engine.legs[c].row, d, addr(c)) for c, d in items])
        _, e = engine.receive_batch(batch.buf, batch.lens, batch.names, batch.rows, batch.n,
                                    now)  # fmt: skip
        self.events += e

    def tick(self, a: str = "send", a_law: str | None = None, hz: float = 440.0,
             amp: float = 9000.0, extra: list[tuple[str, bytes]] | None = None) -> None:  # fmt: skip
        """One pass then the tick. a: "send", "lose" (sent, never arrives), "hold" (arrives
        after the next one: reordered within the hold window) or "mute" (sends nothing)."""
        items = list(self.held)
        self.held = []
        if a != "mute":
            pkt = self.audio("a", a_law, hz, amp)
            if a == "send":
                items.append(("a", pkt))
            elif a == "hold":
                self.held = [("a", pkt)]
        items.append(("b", self.audio("b", hz=300.0)))
        self.send(items + (extra or []))
        _, e = self.engine.tick(self.now)
        self.events += e
        self.k += 1


def scenario(sim: Sim) -> None:
    """Three recordings of a, bridged to b (PCMA: heard transcoded A-law -> µ-law):
    1. stereo: loss, reordering, a's packets in the other law, an SSRC change that
       re-anchors, a prompt over the bridge (heard from the pump), a stop digit (RFC 4733);
    2. mono, max duration 700 ms, a pause in a's stream;
    3. input_voice listening (speech then silence: speech_end)."""
    e = sim.engine
    for _ in range(3):
        sim.tick()
    e.record(MediaRecord(call_id="a", record_id=1, path="one.wav", stereo=True,
                         stop_digits="#"), sim.now)  # fmt: skip
    for k in range(60):
        if k == 20:
            e.play(MediaPlay(call_id="a", play_id=1, file="p.wav"), sim.now)
        if k == 30:  # a restarts its stream: another SSRC, far away in timestamp
            sim.ssrc["a"] ^= 0xFFFF
            sim.ts["a"] = (sim.ts["a"] + 123_456_789) % (1 << 32)
        sim.tick(a="lose" if k in (5, 6, 41) else "hold" if k in (9, 33) else "send",
                 a_law="PCMA" if 12 <= k < 16 else None)  # fmt: skip
    sim.tick(extra=sim.press("a", 11))  # '#'
    for _ in range(15):
        sim.tick()
    e.record(MediaRecord(call_id="a", record_id=2, path="two.wav", max_duration_ms=700),
             sim.now)  # fmt: skip
    for k in range(50):
        sim.tick(a="mute" if 10 <= k < 14 else "send")
    e.record(MediaRecord(call_id="a", record_id=3, path="three.wav", area="asr",
                         listen_ms=3000), sim.now)  # fmt: skip
    for k in range(150):
        sim.tick(amp=9000.0 if 25 <= k < 60 else 30.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Sim, dict[str, int]]]:
    out = {}
    for path in ("packet", "kernel", "twin"):
        calls = {"caller": 0, "heard": 0}
        saved = Recording.caller, Recording.heard

        def caller(self: Recording, *args: Any, _c: dict[str, int] = calls,
                   _f: Any = saved[0]) -> None:  # fmt: skip
            _c["caller"] += 1
            _f(self, *args)

        def heard(self: Recording, *args: Any, _c: dict[str, int] = calls,
                  _f: Any = saved[1]) -> None:  # fmt: skip
            _c["heard"] += 1
            _f(self, *args)

        Recording.caller, Recording.heard = caller, heard  # type: ignore[method-assign]
        try:
            sim = Sim(tmp_path_factory.mktemp(path), path)
            scenario(sim)
        finally:
            Recording.caller, Recording.heard = saved  # type: ignore[method-assign]
        out[path] = (sim, calls)
    return out


def test_files_and_events_equal_the_per_packet_placement(
    runs: dict[str, tuple[Sim, dict[str, int]]],
) -> None:
    ref, ref_calls = runs["packet"]
    finished = {e.event.record_id: e.event for e in ref.events
                if isinstance(e.event, RecordingFinished)}  # fmt: skip
    # the scenario did what it says: a stop digit, the maximum, a VAD decision
    assert finished[1].reason == "dtmf" and finished[2].reason == "max_duration"
    assert finished[2].duration_ms == 700 and finished[3].reason == "speech_end"
    assert ref_calls["caller"] > 150 and ref_calls["heard"] > 150
    for path in ("kernel", "twin"):
        sim, calls = runs[path]
        for name in ("one.wav", "two.wav", "three.wav"):
            assert (sim.rec_dir / name).read_bytes() == (ref.rec_dir / name).read_bytes(), (
                path, name)  # fmt: skip
        assert sim.events == ref.events, path
        # the batch path placed every packet in the kernels: no Python call per packet
        assert calls == {"caller": 0, "heard": 0}, path


def test_recorded_bridged_leg_stays_on_the_kernel_path(
    runs: dict[str, tuple[Sim, dict[str, int]]],
) -> None:
    sim, _ = runs["kernel"]
    engine = sim.engine
    engine.record(MediaRecord(call_id="a", record_id=9, path="four.wav"), sim.now)
    a = engine.legs["a"]
    assert a.rec is not None and engine.tab.i[a.row, K.L_FAST] == 1
    assert engine.tab.i[a.row, K.L_REC] == a.rec.row
    engine.record_stop("a", sim.now)
    assert engine.tab.i[a.row, K.L_REC] == -1 and len(engine.recorder.table) == 0


def test_stalled_ticks_left_to_python_then_back_to_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packet that does not fit (no tick for longer than the buffer) is placed by
    `Recording.caller`/`heard`, which write first; the same file as the per-packet path."""
    left: list[str] = []
    caller, heard = Recording.caller, Recording.heard
    monkeypatch.setattr(Recording, "caller", lambda s, *a: (left.append("c"), caller(s, *a)))
    monkeypatch.setattr(Recording, "heard", lambda s, *a: (left.append("h"), heard(s, *a)))
    files = []
    for path in ("packet", "kernel"):
        left.clear()
        (tmp_path / path).mkdir()
        sim = Sim(tmp_path / path, path)
        sim.engine.record(MediaRecord(call_id="a", record_id=1, path="s.wav", stereo=True),
                          sim.now)  # fmt: skip
        for _ in range(10):
            sim.tick()
        for _ in range(BUF_SAMPLES // 160 + 8):  # passes but no tick
            sim.send([("a", sim.audio("a")), ("b", sim.audio("b", hz=300.0))])
            sim.k += 1
        for _ in range(10):
            sim.tick()
        sim.engine.remove_leg("a", sim.now)
        files.append((sim.rec_dir / "s.wav").read_bytes())
    assert files[0] == files[1] and len(files[0]) > 44 + 4 * 8000
    # the kernel left to Python only packets that did not fit: at most one per stalled
    # pass (the first to overflow writes room for the rest of the pass)
    assert 0 < len(left) <= BUF_SAMPLES // 160 + 8
