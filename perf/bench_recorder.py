"""Recording cost in the media engine: CPU per recorded call, tick time, memory per leg.

    python perf/bench_recorder.py [--calls 1000] [--seconds 10] [--stereo] [--listen]
                                  [--bridged] [--out result.json]

Runs the sans-IO engine on a virtual clock (no sockets): every call receives one
20 ms PCMU packet per tick from its caller and is recorded to a WAV file in a
temporary directory (so the page cache, not the disk, is measured — as in a
worker whose disk keeps up). Reports the tick time with and without recording,
the slowest tick, the cost of one batched write, and the memory a recording
adds to a leg (tracemalloc, numpy buffers included). With `--listen` every recording
listens as `input_voice` does (`MediaRecord.listen_ms`): the VAD kernel runs over all
of them each tick (the caller's tone is speech, so none ends within 10 s).
With `--batch` every tick's packets arrive in one receive pass (`receive_batch`:
rx_batch, the recording placement), as in a worker, instead of one `receive_rtp` each;
`--bridged` (implies `--batch`) bridges the legs in pairs (relay_batch too):
`rtp_receive_us_per_packet_*` is then the engine's cost per relayed packet.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from media import g711, vad
from media.engine import MediaEngine
from media.kernels import rtpbatch
from media.prompts import PromptCache
from media.recorder import Recorder, Recording
from media.rtp import RtpPacket, build_rtp
from pbx.messages import MediaRecord, MediaRemote

TICK = 0.020


def setup(calls: int, root: Path, bridged: bool = False) -> tuple[MediaEngine, list[bytes]]:
    engine = MediaEngine(
        PromptCache(root), random.Random(1),
        recorder=Recorder({"recordings": root / "rec", "asr": root / "rec"}),
    )
    t = np.arange(160) / 8000.0
    payload = g711.encode((np.sin(2 * np.pi * 1000 * t) * 8000).astype(np.int16), "PCMU")
    pkts = []
    for i in range(calls):
        cid = f"c{i}"
        engine.add_leg(cid, 20000 + 2 * i)
        engine.set_remote(
            MediaRemote(
                call_id=cid, remote_ip="127.0.0.1", remote_port=40000, payload_type=0, codec="PCMU"
            )
        )
        pkts.append(build_rtp(RtpPacket(0, 0, 0, 7, payload.tobytes())))
    if bridged:
        ids = list(engine.legs)
        for a, b in zip(ids[0::2], ids[1::2], strict=False):
            engine.bridge(a, b)
    return engine, pkts


def receive_pass(engine: MediaEngine, pkts: list[bytes], k: int, now: float) -> None:
    """Every leg's packet of tick k in one receive pass, as the worker's socket loop
    leaves them (buffer, lengths, sockaddr_in, rows)."""
    n = len(pkts)
    buf = np.zeros((n, 2048), dtype=np.uint8)
    lens = np.zeros(n, dtype=np.int64)
    names = np.zeros((n, 16), dtype=np.uint8)
    names[:, 0] = 2  # AF_INET, little-endian
    names[:, 2:4] = (40000 >> 8, 40000 & 0xFF)
    names[:, 4:8] = (127, 0, 0, 1)
    rows = np.array([leg.row for leg in engine.legs.values()], dtype=np.int64)
    for i, p in enumerate(pkts):
        buf[i, : len(p)] = np.frombuffer(p, dtype=np.uint8)
        lens[i] = len(p)
    buf[:, 2] = (k >> 8) & 0xFF
    buf[:, 3] = k & 0xFF
    ts = (160 * k) & 0xFFFFFFFF
    buf[:, 4:8] = np.frombuffer(ts.to_bytes(4, "big"), dtype=np.uint8)
    engine.receive_batch(buf, lens, names, rows, n, now)


def run(
    engine: MediaEngine, pkts: list[bytes], seconds: float, k0: int, batch: bool = False
) -> tuple[list[float], list[float], list[float]]:
    """Per tick: engine.tick time, the recorder's share of it, the RTP receive time."""
    ticks: list[float] = []
    rec_ticks: list[float] = []
    rx: list[float] = []
    recorder = engine.recorder
    orig_tick = recorder.tick

    def timed_tick(now: float) -> list:  # type: ignore[type-arg]
        t0 = time.perf_counter()
        out = orig_tick(now)
        rec_ticks.append(time.perf_counter() - t0)
        return out

    recorder.tick = timed_tick  # type: ignore[method-assign]
    addr = ("127.0.0.1", 40000)
    n = int(seconds / TICK)
    ids = list(engine.legs)
    for k in range(k0, k0 + n):
        now = k * TICK
        t_rx = time.perf_counter()
        if batch:
            receive_pass(engine, pkts, k, now - 0.001)
        for i, cid in enumerate([] if batch else ids):
            # one packet per call per tick, with advancing seq/timestamp
            p = bytearray(pkts[i])
            p[2:4] = (k & 0xFFFF).to_bytes(2, "big")
            p[4:8] = ((160 * k) & 0xFFFFFFFF).to_bytes(4, "big")
            engine.receive_rtp(cid, bytes(p), addr, now - 0.001)
        t0 = time.perf_counter()
        rx.append(t0 - t_rx)
        engine.tick(now)
        ticks.append(time.perf_counter() - t0)
    del recorder.tick
    return ticks, rec_ticks, rx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--stereo", action="store_true")
    ap.add_argument("--listen", action="store_true")
    ap.add_argument("--bridged", action="store_true")
    ap.add_argument("--batch", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.batch = args.batch or args.bridged
    g711.warm()
    vad.warm()
    rtpbatch.warm()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engine, pkts = setup(args.calls, root, args.bridged)
        print(f"{args.calls} calls, {args.seconds} s, {'stereo' if args.stereo else 'mono'}"
              f"{', listening' if args.listen else ''}")
        base, _, base_rx = run(engine, pkts, 2.0, 1, args.batch)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        k0 = len(base) + 1
        for i, cid in enumerate(engine.legs):
            engine.record(
                MediaRecord(call_id=cid, record_id=i, path=f"r/{cid}.wav", stereo=args.stereo,
                            listen_ms=600_000 if args.listen else None,
                            area="asr" if args.listen else "recordings"),
                k0 * TICK,
            )
        per_leg = (tracemalloc.get_traced_memory()[0] - before) / args.calls
        tracemalloc.stop()
        # time the batched writes themselves
        flush_times: list[float] = []
        orig = Recording._flush

        def timed(self: Recording, upto: int) -> None:
            t0 = time.perf_counter()
            orig(self, upto)
            flush_times.append(time.perf_counter() - t0)

        Recording._flush = timed  # type: ignore[method-assign]
        rec, rec_ticks, rec_rx = run(engine, pkts, args.seconds, k0, args.batch)
        Recording._flush = orig  # type: ignore[method-assign]
        t0 = time.perf_counter()
        for cid in list(engine.legs):
            engine.remove_leg(cid, (k0 + len(rec)) * TICK)
        finish = time.perf_counter() - t0
        written = sum(p.stat().st_size for p in (root / "rec" / "r").iterdir())
    ms = 1000.0
    result = {
        "calls": args.calls,
        "stereo": args.stereo,
        "bridged": args.bridged,
        "batch": args.batch,
        "tick_ms_mean_without_recording": float(np.mean(base)) * ms,
        "tick_ms_mean_recording": float(np.mean(rec)) * ms,
        "tick_ms_p99_recording": float(np.percentile(rec, 99)) * ms,
        "tick_ms_max_recording": float(np.max(rec)) * ms,
        "recorder_tick_ms_mean": float(np.mean(rec_ticks)) * ms,
        "recorder_tick_ms_p99": float(np.percentile(rec_ticks, 99)) * ms,
        "recorder_tick_ms_max": float(np.max(rec_ticks)) * ms,
        "rtp_receive_us_per_packet_without": float(np.mean(base_rx)) / args.calls * 1e6,
        "rtp_receive_us_per_packet_recording": float(np.mean(rec_rx)) / args.calls * 1e6,
        # recorder tick + the extra receive cost, per call per second of audio
        "recording_cpu_us_per_call_per_second": (
            float(np.mean(rec_ticks)) + float(np.mean(rec_rx)) - float(np.mean(base_rx))
        )
        / TICK
        / args.calls
        * 1e6,
        "flush_us_mean": float(np.mean(flush_times)) * 1e6,
        "flush_us_p99": float(np.percentile(flush_times, 99)) * 1e6,
        "flushes": len(flush_times),
        "finish_us_per_recording": finish / args.calls * 1e6,
        "memory_bytes_per_recording_leg": per_leg,
        "bytes_written": written,
    }
    for key, value in result.items():
        print(f"  {key:42s} {value:,.2f}" if isinstance(value, float) else f"  {key:42s} {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
