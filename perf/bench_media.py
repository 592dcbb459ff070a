"""One media worker under N concurrent IVR calls: CPU, memory, tick lateness, prompt timing.

    .venv/bin/python perf/bench_media.py                       # 100, 250, 500, 1000 calls
    .venv/bin/python perf/bench_media.py -n 1000 --measure 30 --json perf/results/x.json

No SIP and no front: the script is the front (a ZeroMQ ROUTER, like
`tests/media/test_media_worker.py`) and every phone at once; the pieces it shares with
`perf/bench_relay.py` (worker start-up, the ROUTER, leg allocation, generator sockets,
/proc readings) are in `perf/benchlib.py`. For each N it
starts a fresh `workers.media` process, allocates N legs, points each leg's
MediaRemote at one of its UDP sockets (one per 256 legs), and has every leg
play a looping prompt (non-interruptible) with in-band detection on. Every
20 ms the generator sends each leg one G.711 frame (low-level noise, or a
100 ms DTMF tone when the leg presses a key) with `sendmmsg`, and every leg
presses a key every `--press-every` seconds: the tone in-band *and* RFC 4733
events for the same press (start, updates, end ×3), as phones do — so each
press must be reported exactly once. Received prompt packets are drained with
`recvmmsg` and timed by the kernel (SO_TIMESTAMPNS).

After `--warmup` seconds, over `--measure` seconds:

* CPU per call: the worker's utime+stime from /proc/<pid>/stat, % of one core / N;
* memory per call: (RSS with the calls − RSS once ready) / N;
* tick lateness: the worst `tick_late_ms_max` of the worker's heartbeats (and
  its percentiles when the heartbeat carries them);
* the callers' view of the prompt: per leg, |arrival interval − 20 ms| (p50,
  p99, max), packets later than 20 ms against the leg's fixed-origin schedule,
  and packets lost (sequence gaps) — with the machine's UDP receive-buffer
  drops over the window (`udp_rcvbuf_errors`: a starved generator's own drops
  show up there);
* digits: presses sent, DtmfDigit events received (by source), duplicates, missed.

`--phases P` (default 20) spreads the phones over P evenly spaced instants of each 20 ms
tick, every leg at a fixed random one, as unsynchronised phones send: the worker reads
a trickle, not one burst a tick. `--phases 1` sends every leg at the tick's start
(before 2026-12-07 the only way): a burst the worker reads in one batch, cheaper per
packet than real traffic, which flattered its CPU figure (perf/README.md, "Phones not
in step").

`--loss PCT` drops that share of the phones' audio packets at random (never sent; their
sequence numbers and timestamps go on, as after a lossy network), RFC 4733 events
untouched: each press must still be reported exactly once, a lost packet inside a
tone included (`media.kernels.goertzel`, "Lost audio is not a pause").

`--rtp-socket shared` runs the worker with every leg on its shared RTP port
(`[media] rtp_socket`): the legs are then told apart by their source address, so
every simulated phone needs a socket of its own. `--gen-sockets per_leg` (the
default with `shared`) gives each leg one (`benchlib.PhoneSockets`): the generator sends with one compiled
`sendto` loop over them (`workers.rtpio.RtpSockets`, as a worker does) and reads
the ready ones through epoll with `recvmmsg` and kernel timestamps, also compiled;
compare modes with the same `--gen-sockets` so the generator costs the same.

Prints a table next to the DESIGN §4 targets and writes JSON
(default perf/results/bench_media-<ts>.json).

`--churn RATE` measures the control plane instead: short calls, started at RATE per
second for `--measure` seconds (after `--warmup`), each MediaAllocate (a port the worker
announced, with the caller's address: `remote`) and MediaPlay of a `--churn-prompt-ms`
prompt (100 ms, as a `*99` test call), MediaRelease at its AudioComplete: four control
messages a call plus the worker's MediaPorts (one per tick, confirming that tick's
allocations), its MediaReleased (one per tick, for that tick's releases) and heartbeats. Reported: the worker's CPU
per call (ms), calls completed, set-up (MediaAllocate to the announcement that
confirms it) percentiles as seen by this script. The prompt's packets go to a socket nobody reads.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media import g711  # noqa: E402
from pbx.messages import (  # noqa: E402
    AudioComplete,
    DtmfDigit,
    MediaAllocate,
    MediaAllocated,
    MediaEvent,
    MediaHeartbeat,
    MediaPlay,
    MediaPorts,
    MediaRelease,
    MediaReleased,
    MediaRemote,
    ReleasedLeg,
)
from perf.benchlib import (  # noqa: E402
    PhoneSockets,
    Received,
    allocate_legs,
    generator_socket,
    log,
    pct,
    positive_int,
    proc_cpu_s,
    proc_rss_kb,
    rfc4733_events,
    rtp_rows,
    start_media_worker,
    udp_rcvbuf_errors,
)
from workers.udpbatch import RecvBatch, SendBatch, ip_to_u32  # noqa: E402

TICK_S = 0.020
SPF = 160  # samples per 20 ms frame
PKT = 12 + SPF
LEGS_PER_SOCKET = 256
DTMF_PT = 101
PRESS_TICKS = 5  # 100 ms of tone
TARGETS = {
    "cpu_pct_per_call": 0.05,
    "ipd_p99_ms": 5.0,
    "late_pct": 0.1,
    "lost": 0,
    "kb_per_call": 64.0,
}
DTMF_FREQS = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209),
    "5": (770, 1336), "6": (770, 1477), "7": (852, 1209), "8": (852, 1336),
    "9": (852, 1477), "0": (941, 1336),
}  # fmt: skip
DIGITS = "1234567890"
FAULTS_KEPT = 50  # legs whose presses and reports differ, described in the JSON
EVENT_CODE = {d: (10 if d == "*" else 11 if d == "#" else int(d)) for d in DIGITS}


def write_prompt(path: Path, seconds: float) -> None:
    t = np.arange(int(8000 * seconds)) / 8000.0
    x = 6000 * np.sin(2 * np.pi * 300 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(x.astype("<i2").tobytes())


def press_faults(presses: np.ndarray, heard: list[list[str]], phase: np.ndarray,
                 press_period: int) -> list[dict[str, Any]]:
    """The legs whose reports differ from their presses: the first press that went wrong
    (missing, reported twice, or another digit) and when it began (seconds from the
    run's first tick, warm-up included: press k of leg l at tick phase[l] + k *
    press_period), with what was pressed and heard, so a missed press can be placed."""
    faults: list[dict[str, Any]] = []
    for leg in range(presses.size):
        expected = [DIGITS[k % len(DIGITS)] for k in range(int(presses[leg]))]
        got = [h.split("/")[0] for h in heard[leg]]
        if got == expected:
            continue
        k = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                 min(len(expected), len(got)))  # fmt: skip
        faults.append({
            "leg": leg, "press": k, "at_s": round((int(phase[leg]) + k * press_period) * TICK_S, 2),
            "pressed": "".join(expected), "heard": heard[leg],
        })  # fmt: skip
    return faults


def tone_frames() -> np.ndarray:
    """uint8[10 digits, PRESS_TICKS, 160] µ-law frames of each digit's tone (-7 dBm0 per tone)."""
    n = PRESS_TICKS * SPF
    t = np.arange(n) / 8000.0
    amp = 22651 * 10 ** (-7 / 20)
    out = np.zeros((len(DIGITS), PRESS_TICKS, SPF), dtype=np.uint8)
    for i, d in enumerate(DIGITS):
        lo, hi = DTMF_FREQS[d]
        x = amp * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t))
        out[i] = g711.encode(x.astype(np.int16), "PCMU").reshape(PRESS_TICKS, SPF)
    return out


def noise_frames(count: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(0, 200, size=(count, SPF)).astype(np.int16)
    return np.asarray(g711.encode(x, "PCMU"))


def run_one(n_calls: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(n_calls)
    tmp = Path(tempfile.mkdtemp(prefix="bench_media-"))
    sounds = tmp / "sounds"
    sounds.mkdir()
    write_prompt(sounds / "loop.wav", 3.0)
    shared = args.rtp_socket == "shared"
    gen_per_leg = (args.gen_sockets or ("per_leg" if shared else "grouped")) == "per_leg"
    if shared and not gen_per_leg:
        raise SystemExit("--rtp-socket shared needs --gen-sockets per_leg (a source per leg)")
    worker = start_media_worker(tmp, args.rtp_ports, max(2000, n_calls), sounds=sounds,
                                rtp_socket=args.rtp_socket)  # fmt: skip
    front = worker.front
    pid = worker.proc.pid
    socks: list[socket.socket] = []
    phones: PhoneSockets | None = None
    errors: list[str] = []
    heartbeats: list[MediaHeartbeat] = []
    try:
        rss0 = worker.rss_ready_kb
        log(f"N={n_calls}: worker {pid} ready, RSS {rss0} kB; allocating legs")

        # ---- generator sockets: one per 256 legs, or one per leg
        n_socks = 0 if gen_per_leg else (n_calls + LEGS_PER_SOCKET - 1) // LEGS_PER_SOCKET
        if gen_per_leg:
            phones = PhoneSockets(n_calls)
        socks.extend(generator_socket() for _ in range(n_socks))
        leg_sock = np.arange(n_calls) // LEGS_PER_SOCKET
        call_ids = [f"bench-{i}" for i in range(n_calls)]
        index = {c: i for i, c in enumerate(call_ids)}
        worker_port = allocate_legs(front, call_ids, inband_dtmf=True, shared=shared)
        port_to_leg = np.full(65536, -1, dtype=np.int64)
        port_to_leg[worker_port] = np.arange(n_calls)

        for i, c in enumerate(call_ids):
            front.send(
                MediaRemote(
                    call_id=c,
                    remote_ip="127.0.0.1",
                    remote_port=(int(phones.ports[i]) if phones is not None
                                 else socks[leg_sock[i]].getsockname()[1]),
                    payload_type=0,
                    codec="PCMU",
                    dtmf_payload_type=DTMF_PT,
                    ptime_ms=20,
                )
            )
            front.send(MediaPlay(call_id=c, play_id=1, file="loop.wav", loop=True))

        # ---- send buffers: every leg's audio packet (rows fixed per leg), events separate
        all_legs = np.arange(n_calls, dtype=np.int64)
        ssrc = 0x10000 + all_legs
        all_tx, all_lens = rtp_rows(n_calls, PKT, ssrc)
        ev_tx, ev_lens = rtp_rows(4 * n_calls, 16)
        # Each leg's send instant inside the tick (see --phases): phones' 20 ms clocks
        # are not in step, so with P phases the legs send at P evenly spaced instants.
        leg_phase = rng.permutation(n_calls) % args.phases
        phase_legs = [np.nonzero(leg_phase == p)[0] for p in range(args.phases)]
        # grouped sockets: a sendmmsg batch for each socket's legs of each phase
        chunks = [(p, k, legs) for p in range(args.phases) for k in range(n_socks)
                  for legs in [np.nonzero((leg_sock == k) & (leg_phase == p))[0]] if legs.size]
        audio_tx: list[SendBatch] = []
        event_tx: list[SendBatch] = []
        for _, _, legs in chunks:
            tx = SendBatch(vlen=legs.size, size=PKT)
            tx.set_addresses(np.full(legs.size, ip_to_u32("127.0.0.1")), worker_port[legs])
            tx.lengths[:] = PKT
            audio_tx.append(tx)
            event_tx.append(SendBatch(vlen=4 * legs.size, size=16))
        rx = RecvBatch(vlen=512, size=256, timestamps=True)
        seq = rng.integers(0, 65536, n_calls).astype(np.int64)
        ts = rng.integers(0, 1 << 32, n_calls).astype(np.int64)
        tones = tone_frames()
        noise = noise_frames(64, rng)
        press_period = max(1, round(args.press_every / TICK_S))
        phase = (np.arange(n_calls) * 7919) % press_period
        press_start_ts = np.zeros(n_calls, dtype=np.int64)
        press_digit = np.zeros(n_calls, dtype=np.int64)
        presses = np.zeros(n_calls, dtype=np.int64)  # every press of the run, warm-up included
        codes = np.array([EVENT_CODE[DIGITS[i]] for i in range(10)])

        total_ticks = round((args.warmup + args.measure) / TICK_S)
        warm_ticks = round(args.warmup / TICK_S)
        rec = Received(cap=int(n_calls * (args.measure / TICK_S) * 1.2) + 1024, head=4)
        digits_got = np.zeros(n_calls, dtype=np.int64)
        by_source: dict[str, int] = {}
        reports: list[list[str]] = [[] for _ in range(n_calls)]  # per leg: "digit/source"

        def note_digit(call_id: str, event: DtmfDigit) -> None:
            leg = index[call_id]
            digits_got[leg] += 1
            by_source[event.source] = by_source.get(event.source, 0) + 1
            reports[leg].append(f"{event.digit}/{event.source}")
        sent_packets = 0
        withheld = 0  # audio packets --loss kept from leaving
        cpu0 = cpu1 = 0.0
        drops0 = 0
        rss1 = 0
        gen_cpu0 = 0.0
        t_meas0 = 0.0
        measuring = False
        fds = [s.fileno() for s in socks] if phones is None else [phones.fileno()]
        zmq_fd = int(front.sock.getsockopt(zmq.FD))

        def drain(deadline: float) -> None:
            """Read prompt packets and the worker's messages until `deadline`."""
            drained = False  # a generator behind schedule still reads once per tick
            while True:
                timeout = deadline - time.monotonic()
                if timeout <= 0 and drained:
                    break
                drained = True
                r, _, _ = select.select(fds + [zmq_fd], [], [], max(0.0, timeout))
                for fd in r:
                    if fd == zmq_fd:
                        continue
                    if phones is not None:
                        phones.recv(rec, measuring)
                        continue
                    while (n := rx.recv(fd)) > 0:
                        if measuring:
                            rec.add(rx, n, port_to_leg[rx.ports[:n]])
                while int(front.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    msg = front.recv(0)
                    if isinstance(msg, MediaEvent) and isinstance(msg.event, DtmfDigit):
                        note_digit(msg.call_id, msg.event)
                    elif isinstance(msg, MediaHeartbeat):
                        heartbeats.append(msg)

        origin = time.monotonic() + 0.05
        last_progress = time.monotonic()
        log(f"N={n_calls}: legs playing; warm-up {args.warmup} s, measuring {args.measure} s")
        for tick in range(total_ticks):
            if tick == warm_ticks:
                measuring = True
                cpu0 = proc_cpu_s(pid)
                drops0 = udp_rcvbuf_errors()
                gen_cpu0 = time.process_time()
                t_meas0 = time.monotonic()
                heartbeats.clear()
            # ---- send this tick's audio (and RFC 4733 events) for every leg
            k_in_press = (tick - phase) % press_period
            pressing = (k_in_press < PRESS_TICKS) & (tick - k_in_press >= 0)  # begun in this run
            starting = k_in_press == 0
            if tick >= total_ticks - 2 * PRESS_TICKS:  # no press left unfinished at the end
                pressing &= ~((tick - k_in_press) >= total_ticks - 2 * PRESS_TICKS)
                starting[:] = False
            press_start_ts[starting] = ts[starting]
            press_digit[starting] = presses[starting] % len(DIGITS)
            presses[starting] += 1
            all_tx[:, 2:4].view(">u2")[:, 0] = seq & 0xFFFF
            all_tx[:, 4:8].view(">u4")[:, 0] = ts & 0xFFFFFFFF
            payload = noise[(tick + all_legs) % noise.shape[0]]
            if pressing.any():
                payload[pressing] = tones[press_digit[pressing], k_in_press[pressing]]
            all_tx[:, 12:PKT] = payload
            # --loss: the legs whose audio packet this tick never leaves the phone
            heard = rng.random(n_calls) >= args.loss / 100.0 if args.loss > 0 else None
            if heard is not None:
                withheld += n_calls - int(heard.sum())
            # RFC 4733: one packet per tick while pressed, the end packet three times
            pl_legs = np.nonzero(pressing)[0] if not args.no_rfc4733 else all_legs[:0]
            e_legs = rfc4733_events(ev_tx, pl_legs, k_in_press, seq, press_start_ts,
                                    codes[press_digit], ssrc, DTMF_PT, PRESS_TICKS, SPF)  # fmt: skip
            for p in range(args.phases):
                if p:
                    drain(origin + (tick + p / args.phases) * TICK_S)
                if phones is not None:
                    sending = phase_legs[p]
                    if heard is not None:
                        sending = sending[heard[sending]]
                    sent_packets += phones.send(all_tx[sending], all_lens[sending], sending,
                                                worker_port[sending], sending.size)  # fmt: skip
                    ev_rows = np.nonzero(leg_phase[e_legs] == p)[0]
                    sent_packets += phones.send(ev_tx[ev_rows], ev_lens[ev_rows], e_legs[ev_rows],
                                                worker_port[e_legs[ev_rows]], ev_rows.size)  # fmt: skip
                    continue
                for ci, (cp, k, legs) in enumerate(chunks):
                    if cp != p:
                        continue
                    tx = audio_tx[ci]
                    sending = legs
                    if heard is not None:  # the addresses set up front are for every leg
                        sending = legs[heard[legs]]
                        tx.set_addresses(np.full(sending.size, ip_to_u32("127.0.0.1")),
                                         worker_port[sending])  # fmt: skip
                    tx.data[: sending.size] = all_tx[sending]
                    sent_packets += tx.send(fds[k], sending.size)
                    ev_rows = np.nonzero((leg_sock[e_legs] == k) & (leg_phase[e_legs] == p))[0]
                    if ev_rows.size:
                        etx = event_tx[ci]
                        etx.set_addresses(np.full(ev_rows.size, ip_to_u32("127.0.0.1")),
                                          worker_port[e_legs[ev_rows]])  # fmt: skip
                        etx.data[: ev_rows.size] = ev_tx[ev_rows]
                        etx.lengths[: ev_rows.size] = 16
                        sent_packets += etx.send(fds[k], ev_rows.size)
            np.add.at(seq, e_legs, 1)
            seq += 1
            seq &= 0xFFFF
            ts += SPF
            drain(origin + (tick + 1) * TICK_S)
            if time.monotonic() - last_progress >= 1.0:
                last_progress = time.monotonic()
                log(f"N={n_calls}: t={tick * TICK_S:5.1f} s, {rec.n} prompt packets recorded")
        cpu1 = proc_cpu_s(pid)
        drops = udp_rcvbuf_errors() - drops0
        t_meas = time.monotonic() - t_meas0
        gen_cpu = time.process_time() - gen_cpu0
        rss1 = proc_rss_kb(pid)

        # ---- release, collecting the worker's per-leg statistics
        for c in call_ids:
            front.send(MediaRelease(call_id=c))
        released: list[ReleasedLeg] = []
        deadline_r = time.monotonic() + 20.0
        while len(released) < n_calls and time.monotonic() < deadline_r:
            msg = front.recv(1.0)
            if isinstance(msg, MediaReleased):
                released.extend(msg.legs)
            elif isinstance(msg, MediaEvent) and isinstance(msg.event, DtmfDigit):
                # reports of the last presses of the window arrive just after it
                note_digit(msg.call_id, msg.event)
    finally:
        errors = worker.stop()
        for s in socks:
            s.close()
        if phones is not None:
            phones.close()

    # ---- the callers' view
    leg = rec.leg[: rec.n]
    sq = rec.seq()
    tt = rec.t_ns[: rec.n]
    order = np.lexsort((tt, leg))
    leg, sq, tt = leg[order], sq[order], tt[order]
    same = leg[1:] == leg[:-1]
    dseq = (sq[1:] - sq[:-1]) & 0xFFFF
    dt_ms = (tt[1:] - tt[:-1]) / 1e6
    consecutive = same & (dseq == 1)
    ipd_dev = np.abs(dt_ms[consecutive] - TICK_S * 1000)
    # packet index along each leg's stream (seq unwrapped), lateness vs the leg's best offset
    step = np.where(same, dseq, 0)
    starts = np.concatenate([[True], ~same])
    idx = np.cumsum(np.concatenate([[0], step]))
    first_idx = np.maximum.accumulate(np.where(starts, idx, 0))
    k_in_leg = idx - first_idx
    offset_ms = tt / 1e6 - k_in_leg * TICK_S * 1000
    leg_ids, leg_start = np.unique(leg, return_index=True)
    best = np.minimum.reduceat(offset_ms, leg_start) if leg.size else np.zeros(0)
    late_ms = offset_ms - np.repeat(best, np.diff(np.append(leg_start, leg.size)))
    expected = 0
    if leg.size:
        last_k = np.maximum.reduceat(k_in_leg, leg_start)
        expected = int((last_k + 1).sum())
    lost = expected - int(leg.size)
    cpu_pct = 100.0 * (cpu1 - cpu0) / t_meas
    hb_late = [h.tick_late_ms_max for h in heartbeats]
    hb_p99 = [h.tick_late_ms_p99 for h in heartbeats if h.ticks]
    hb_busy = [h.tick_busy_ms_p99 for h in heartbeats if h.ticks]
    presses_total = int(presses.sum())
    got_total = int(digits_got.sum())
    result = {
        "calls": n_calls,
        "rtp_socket": args.rtp_socket,
        "gen_sockets": "per_leg" if gen_per_leg else "grouped",
        "phases": args.phases,
        "measure_s": round(t_meas, 2),
        "worker_cpu_pct_core": round(cpu_pct, 2),
        "cpu_pct_per_call": round(cpu_pct / n_calls, 4),
        "rss_ready_kb": rss0,
        "rss_loaded_kb": rss1,
        "kb_per_call": round((rss1 - rss0) / n_calls, 1),
        "tick_late_ms_max": round(max(hb_late), 3) if hb_late else None,
        # worst per-heartbeat p99 (0 when the worker does not report percentiles)
        "tick_late_ms_p99": round(max(hb_p99), 3) if hb_p99 else None,
        "tick_busy_ms_p99": round(max(hb_busy), 3) if hb_busy else None,
        "ticks_skipped": sum(h.ticks_skipped for h in heartbeats),
        "heartbeats": [h.model_dump() for h in heartbeats[-3:]],
        "prompt_packets": int(leg.size),
        "legs_heard": int(leg_ids.size),
        "ipd_dev_ms": {
            "p50": round(pct(ipd_dev, 50), 3),
            "p99": round(pct(ipd_dev, 99), 3),
            "max": round(float(ipd_dev.max()) if ipd_dev.size else 0.0, 3),
        },
        "late_ms": {"p99": round(pct(late_ms, 99), 3), "max": round(pct(late_ms, 100), 3)},
        "late_gt_20ms": int((late_ms > 20).sum()),
        "late_pct": round(100.0 * float((late_ms > 20).sum()) / max(1, leg.size), 4),
        "lost": lost,
        "udp_rcvbuf_errors": drops,
        "generator_cpu_pct_core": round(100.0 * gen_cpu / t_meas, 1),
        "generator_packets_sent": sent_packets,
        "audio_packets_withheld": withheld,
        "digits": {
            "presses": presses_total,
            "reported": got_total,
            "by_source": by_source,
            "legs_with_duplicates": int((digits_got > presses).sum()),
            "legs_with_missing": int((digits_got < presses).sum()),
            "faults": press_faults(presses, reports, phase, press_period)[:FAULTS_KEPT],
        },
        "released": {
            "legs": len(released),
            "packets_received": int(sum(r.packets_received for r in released)),
            "packets_sent": int(sum(r.packets_sent for r in released)),
            "packets_lost": int(sum(r.packets_lost for r in released)),
            "packets_late": int(sum(r.packets_late for r in released)),
            "jitter_ms_max": max((r.jitter_ms for r in released), default=0.0),
            "rtcp_sent": int(sum(r.rtcp_sent for r in released)),
        },
        "worker_errors": errors[:10],
    }
    for fault in result["digits"]["faults"][:5]:
        log(f"N={n_calls}: leg {fault['leg']} press {fault['press']} (at {fault['at_s']} s): "
            f"pressed {fault['pressed']}, heard {' '.join(fault['heard'])}")
    return result


def run_churn(rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Short calls at `rate` per second (module text): the worker's CPU per call."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_media-churn-"))
    sounds = tmp / "sounds"
    sounds.mkdir()
    write_prompt(sounds / "short.wav", args.churn_prompt_ms / 1000.0)
    worker = start_media_worker(tmp, args.rtp_ports, 2000, sounds=sounds)
    front = worker.front
    pid = worker.proc.pid
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink_port = sink.getsockname()[1]
    free: list[int] = []
    in_use: dict[str, int] = {}  # call id -> its port, from MediaAllocate to MediaReleased
    asked: dict[int, float] = {}  # MediaAllocate.seq -> when it went out (unconfirmed)
    setup_ms: list[float] = []
    errors: list[str] = []
    started = completed = no_port = seq = 0
    cpu0 = t0 = 0.0
    measuring = False
    try:
        period = 1.0 / rate
        begin = time.monotonic()
        warm_end = begin + args.warmup
        end = warm_end + args.measure
        next_start = begin
        log(f"churn {rate}/s: worker {pid}; warm-up {args.warmup} s, measuring {args.measure} s")
        while True:
            now = time.monotonic()
            if not measuring and now >= warm_end:
                measuring = True
                cpu0, t0, completed = proc_cpu_s(pid), now, 0
                setup_ms.clear()
            if now >= end:
                break
            while next_start <= now:
                next_start += period
                if not free:
                    no_port += 1
                    continue
                seq += 1
                call_id = f"churn-{seq}"
                port = free.pop()
                in_use[call_id] = port
                asked[seq] = time.monotonic()
                # As the front does for an inbound call: the caller's address rides in
                # the allocation; the prompt (the IVR's first command) right behind it.
                front.send(MediaAllocate(
                    call_id=call_id, rtp_port=port, seq=seq, inband_dtmf=False,
                    remote=MediaRemote(call_id=call_id, remote_ip="127.0.0.1",
                                       remote_port=sink_port, payload_type=0, codec="PCMU",
                                       dtmf_payload_type=DTMF_PT, ptime_ms=20)))
                front.send(MediaPlay(call_id=call_id, play_id=1, file="short.wav"))
                started += 1
            msg = front.recv(max(0.001, min(next_start, end) - time.monotonic()))
            while msg is not None:
                if isinstance(msg, MediaPorts | MediaHeartbeat):
                    used = set(in_use.values())
                    free = [p for p in msg.ports if p not in used]
                    # It confirms the allocations up to its `allocate_seq`.
                    t_now = time.monotonic()
                    for done in [k for k in asked if k <= msg.allocate_seq]:
                        setup_ms.append((t_now - asked.pop(done)) * 1000.0)
                elif isinstance(msg, MediaAllocated):  # a refusal
                    errors.append(msg.error or "?")
                    in_use.pop(msg.call_id, None)
                    asked.pop(int(msg.call_id.rpartition("-")[2]), None)
                elif isinstance(msg, MediaEvent) and isinstance(msg.event, AudioComplete):
                    front.send(MediaRelease(call_id=msg.call_id))
                elif isinstance(msg, MediaReleased):
                    for leg in msg.legs:
                        in_use.pop(leg.call_id, None)
                        completed += 1
                msg = front.recv(0.0)
        cpu1 = proc_cpu_s(pid)
        t_meas = time.monotonic() - t0
    finally:
        worker_errors = worker.stop()
        sink.close()
    cpu_ms = 1000.0 * (cpu1 - cpu0)
    setup = np.array(setup_ms) if setup_ms else np.zeros(1)
    return {
        "churn_rate": rate,
        "prompt_ms": args.churn_prompt_ms,
        "measure_s": round(t_meas, 2),
        "calls_started": started,
        "calls_completed_measured": completed,
        "no_free_port": no_port,
        "allocation_errors": errors[:10],
        "worker_cpu_pct_core": round(100.0 * (cpu1 - cpu0) / t_meas, 2),
        "worker_cpu_ms_per_call": round(cpu_ms / max(1, completed), 4),
        "setup_ms": {"p50": round(pct(setup, 50), 3), "p99": round(pct(setup, 99), 3)},
        "worker_errors": worker_errors[:10],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    hdr = (
        f"{'calls':>6} {'CPU %core':>9} {'%/call':>7} {'KB/call':>8} {'tick late p99/max':>17} "
        f"{'IPD p99':>8} {'late>20':>8} {'lost':>6} {'digits sent/rep':>16} {'gen CPU':>8}"
    )
    print(hdr)
    for r in results:
        d = r["digits"]
        print(
            f"{r['calls']:>6} {r['worker_cpu_pct_core']:>9.1f} {r['cpu_pct_per_call']:>7.4f} "
            f"{r['kb_per_call']:>8.1f} {r['tick_late_ms_p99'] or 0:>7.2f}/"
            f"{r['tick_late_ms_max'] or 0:<7.2f}ms "
            f"{r['ipd_dev_ms']['p99']:>6.2f}ms {r['late_pct']:>7.3f}% {r['lost']:>6} "
            f"{d['presses']:>7}/{d['reported']:<8} {r['generator_cpu_pct_core']:>7.1f}%"
        )
    t = TARGETS
    print(
        f"{'target':>6} {'':>9} {t['cpu_pct_per_call']:>7.4f} {t['kb_per_call']:>8.1f} "
        f"{'':>17} {t['ipd_p99_ms']:>6.2f}ms {t['late_pct']:>7.3f}% {t['lost']:>6}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, nargs="*", default=[100, 250, 500, 1000], help="call counts")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--measure", type=float, default=20.0)
    ap.add_argument("--phases", type=positive_int, default=20,
                    help="send instants per 20 ms the phones are spread over (1: all at once)")
    ap.add_argument("--press-every", type=float, default=5.0, help="seconds between key presses")
    ap.add_argument("--rtp-ports", default="20000-29999")
    ap.add_argument("--no-rfc4733", action="store_true", help="presses in-band only")
    ap.add_argument("--loss", type=float, default=0.0, metavar="PCT",
                    help="%% of the phones' audio packets never sent (RFC 4733 untouched)")
    ap.add_argument("--rtp-socket", choices=["per_leg", "shared"], default="per_leg",
                    help="the worker's [media] rtp_socket")
    ap.add_argument("--gen-sockets", choices=["grouped", "per_leg"], default=None,
                    help="the phones' sockets: one per 256 legs (default with per_leg) or "
                         "one per leg (needed with shared)")
    ap.add_argument("--churn", type=float, nargs="*", default=None, metavar="RATE",
                    help="short calls at RATE calls/s instead of -n long ones (module text)")
    ap.add_argument("--churn-prompt-ms", type=int, default=100)
    ap.add_argument("--label", default="", help="free text stored in the JSON")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    for rate in args.churn or []:
        r = run_churn(rate, args)
        results.append(r)
        log(f"churn {rate}/s: {r['calls_completed_measured']} calls, worker "
            f"{r['worker_cpu_pct_core']}% of a core = {r['worker_cpu_ms_per_call']} ms/call, "
            f"set-up p50/p99 {r['setup_ms']}, no port {r['no_free_port']}, "
            f"errors {r['allocation_errors']} {r['worker_errors']}")
    for n in args.n if args.churn is None else []:
        r = run_one(n, args)
        results.append(r)
        log(
            f"N={n}: worker {r['worker_cpu_pct_core']}% of a core = "
            f"{r['cpu_pct_per_call']}%/call, {r['kb_per_call']} KB/call, "
            f"IPD p99 {r['ipd_dev_ms']['p99']} ms, late {r['late_pct']}%, lost {r['lost']}, "
            f"digits {r['digits']}"
        )
    if args.churn is None:
        print()
        print_table(results)
    out = Path(
        args.json or ROOT / "perf" / "results" / f"bench_media-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "tool": "bench_media",
                "label": args.label,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "config": vars(args),
                "targets": TARGETS,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
