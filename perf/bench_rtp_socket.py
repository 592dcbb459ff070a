"""The worker's RTP socket layer, per-leg ports against one shared port: CPU per packet.

    .venv/bin/python perf/bench_rtp_socket.py [-n 1000] [--periods 300] [--rounds 2]

N legs, each with a phone (a UDP socket of its own, its SDP address). Every 20 ms
period each phone sends the worker one 172-byte RTP packet (untimed: the phones' side
is a compiled sendto loop), the worker reads them all (`RtpSockets.recv`, timed) and
sends each leg one packet back (`RtpSockets.send`, timed), which the phones drain
(untimed). Per-leg: every leg its own socket (epoll + recvfrom, sendto loop); shared:
every leg on one socket (recvmmsg + the source-address demux, sendmmsg). The modes
alternate, `--rounds` times each, CPU as `time.thread_time` (user + system of the
worker's thread; on loopback a send also pays the receiving socket's queueing).
Writes JSON to perf/results/ (`--json`).

Each line also gives what the two costs come to for an IVR call, 50 packets each way a
second: (receive + send) × 50 as % of a core, the floor under `bench_media.py`'s figure.

`--sink IP` sends the worker's packets to IP instead of the phones: an address on a
veth whose far end has no address drops them there (the send cost without the
receiving sockets', but with the far end's IP input). As root, in network namespaces of
its own:

    ip netns add rtpb && ip netns add rtpb2 && ip -n rtpb link set lo up
    ip -n rtpb link add v0 type veth peer name v1 && ip -n rtpb link set v1 netns rtpb2
    ip -n rtpb addr add 10.99.0.1/24 dev v0 && ip -n rtpb link set v0 up
    ip -n rtpb2 link set v1 up
    ip -n rtpb neigh add 10.99.0.2 lladdr <v1's MAC> dev v0 nud permanent
    ip netns exec rtpb .venv/bin/python perf/bench_rtp_socket.py --local 10.99.0.1 \
        --sink 10.99.0.2

To stop the packets where a NIC's driver would take them (UDP/IP send path and the
device queue only, nothing received anywhere), give v0 a queue that holds none:

    ip netns exec rtpb tc qdisc add dev v0 root pfifo limit 0
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from media.kernels.rtpbatch import L_SDP_IP, L_SDP_PORT  # noqa: E402
from media.legtable import LegTable  # noqa: E402
from workers import rtpio  # noqa: E402
from workers.rtpio import RtpSockets  # noqa: E402

PKT = 172


def udp(ip: str, buf: int = 1 << 16) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf)
    s.bind((ip, 0))
    s.setblocking(False)
    return s


def run(mode: str, n: int, periods: int, local: str, sink: str | None) -> dict[str, float]:
    """`local`: the address every socket binds (the phones' and the worker's); the
    worker's packets go to `sink` if given, else to the phones."""
    here = int.from_bytes(socket.inet_aton(local), "big")
    there = int.from_bytes(socket.inet_aton(sink), "big") if sink else here
    legs = LegTable(capacity=n)
    worker = RtpSockets(batch=1024, legs=legs)
    phones = RtpSockets(batch=1024)
    rows = [legs.add() for _ in range(n)]
    phone_socks = [udp(local) for _ in range(n)]
    for k, s in enumerate(phone_socks):
        phones.add(f"p{k}", s, k)
    phone_ports = np.array([s.getsockname()[1] for s in phone_socks], dtype=np.int64)
    if mode == "shared":
        shared = udp(local)
        worker.set_shared(shared)
        for k, row in enumerate(rows):
            legs.i[row, L_SDP_IP] = here
            legs.i[row, L_SDP_PORT] = phone_ports[k]
            worker.add_shared(f"c{k}", row)
        dest = np.full(n, shared.getsockname()[1], dtype=np.int64)
    else:
        own = [udp(local) for _ in range(n)]
        for k, (row, s) in enumerate(zip(rows, own, strict=True)):
            worker.add(f"c{k}", s, row)
        dest = np.array([s.getsockname()[1] for s in own], dtype=np.int64)
    data = np.zeros((n, PKT), dtype=np.uint8)
    data[:, 0] = 0x80
    lens = np.full(n, PKT, dtype=np.int64)
    ips = np.full(n, here, dtype=np.int64)
    out_ips = np.full(n, there, dtype=np.int64)
    phone_rows = np.arange(n, dtype=np.int64)
    worker_rows = np.array(rows, dtype=np.int64)
    t_recv = t_send = 0.0
    got = foreign = 0
    try:
        for period in range(periods + 5):
            phones.send(data, lens, phone_rows, ips, dest, n)
            t0 = time.thread_time()
            read = 0
            while True:
                m = worker.recv()
                read += m
                foreign += int((worker.rows[:m] < 0).sum())
                if m < worker.buf.shape[0]:
                    break
            t1 = time.thread_time()
            unsent = worker.send(data, lens, worker_rows, out_ips, phone_ports, n).size
            t2 = time.thread_time()
            assert unsent == 0, f"{unsent} packets not sent"
            while phones.recv() == phones.buf.shape[0]:
                pass
            if period >= 5:  # the first periods warm the caches
                t_recv += t1 - t0
                t_send += t2 - t1
                got += read
    finally:
        worker.close()
        phones.close()
    sent = n * periods
    return {"recv_us_per_packet": round(t_recv / max(1, got) * 1e6, 3),
            "send_us_per_packet": round(t_send / sent * 1e6, 3),
            "received": got, "expected": sent, "foreign": foreign}


def ivr_call_pct(res: dict[str, float]) -> float:
    """% of a core an IVR call's packets cost at these per-packet figures: 50 a second
    each way (20 ms ptime)."""
    return round((res["recv_us_per_packet"] + res["send_us_per_packet"]) * 50 / 1e6 * 100, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--periods", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--local", default="127.0.0.1", help="the address every socket binds")
    ap.add_argument("--sink", default=None, help="send the worker's packets here (IPv4)")
    args = ap.parse_args()
    rtpio.warm()
    results = []
    for r in range(args.rounds):
        for mode in ("per_leg", "shared"):
            res = {"mode": mode, "round": r + 1, **run(mode, args.n, args.periods, args.local, args.sink)}
            res["ivr_call_pct"] = ivr_call_pct(res)
            results.append(res)
            print(f"{mode:8s} round {r + 1}: receive {res['recv_us_per_packet']:5.2f} µs, "
                  f"send {res['send_us_per_packet']:5.2f} µs per packet "
                  f"({res['received']}/{res['expected']} read, {res['foreign']} foreign); "
                  f"{res['ivr_call_pct']:.4f} % of a core per IVR call",
                  flush=True)  # fmt: skip
    out = Path(args.json or ROOT / "perf" / "results"
               / f"bench_rtp_socket-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tool": "bench_rtp_socket", "config": vars(args),
                               "results": results}, indent=2))  # fmt: skip
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
