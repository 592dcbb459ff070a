#!/usr/bin/env python3
"""The SIP layer's own cost per `*99` call, as the front pays it: no sockets, no call core.

    python perf/bench_sip.py [--calls 5000] [--repeats 5] [--profile] [--json perf/results/...]

One call is the SIP work the front does for a call from sipp's built-in `uac`
scenario (the messages as sipp sends them: Via with branch, Max-Forwards, From
and To with tags, Call-ID, CSeq, Contact, Subject, Content-Type, Content-Length,
an SDP offer), each call with its own Call-ID, tags and branches:

* INVITE: `parse_message`, `stamp_via`, `TransactionLayer.receive`, the headers
  the call core reads (Require, Content-Type, Accept, Session-Expires, the To,
  From and Request-URI parses), `uas_from_invite` and `next_hop`; the 100 Trying
  (`trying`); the SDP answer (`sdp.answer_offer`); the 200 OK with the front's
  headers (Server, Contact, Allow, Supported, the SDP) built by `make_response`,
  sent through `respond` and serialised once more for the 2xx retransmitter;
* ACK: parsed, stamped, received; Call-ID and To tag read (dialog lookup);
* BYE: parsed, stamped, received; CSeq and tags read; its 200 OK sent.

The transaction layer's timers run on a virtual clock (1 ms per call), so
transactions end as in the front and the tables stay at their steady size. CPU
time is `time.process_time()`; the figure is the best of `--repeats` runs of
`--calls` calls (the machine is shared: the best run is the least disturbed).
`--profile` adds the cProfile top 30 by own time (one more run, not counted).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pbx.sip import sdp  # noqa: E402
from pbx.sip.budget import SourceBudget  # noqa: E402
from pbx.sip.dialog import next_hop, uas_from_invite  # noqa: E402
from pbx.sip.message import SipRequest, make_response, parse_message, stamp_via  # noqa: E402
from pbx.sip.transaction import (  # noqa: E402
    RequestReceived,
    SendBytes,
    TransactionLayer,
    TryingDue,
)
from pbx.sip.uri import parse_name_addr, parse_uri  # noqa: E402

CALLER = ("127.0.0.1", 5061)
SERVER = "pbx/0.1"
CONTACT = "<sip:pbx@127.0.0.1:5060>"
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE, REFER"
SUPPORTED = "timer"
SDP_OFFER = (b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n"
             b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
             b"a=rtpmap:0 PCMU/8000\r\n")


def sipp_request(method: str, n: int, cseq: int, branch: str, to_tag: str = "",
                 body: bytes = b"") -> bytes:
    """A request as sipp's `uac` scenario writes it (`-sn uac`, `[service]` = *99)."""
    to = f"*99 <sip:*99@127.0.0.1:5060>{f';tag={to_tag}' if to_tag else ''}"
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"{method} sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-{n}-{branch}\r\n"
        f"From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag00{n}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {n}-4242@127.0.0.1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: sip:sipp@127.0.0.1:5061\r\n"
        f"Max-Forwards: 70\r\n"
        f"Subject: Performance Test\r\n"
        f"{ctype}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Front:
    """The SIP side of the front for one call at a time, on a virtual clock."""

    def __init__(self) -> None:
        # Loopback exempt from the per-source budget, as in perf/pbx-perf.toml.
        self.txl = TransactionLayer(budget=SourceBudget(exempt=frozenset({CALLER[0]})))
        self.now = 1000.0
        self.sent = 0  # bytes put on the wire (kept so nothing is optimised away)

    def receive(self, data: bytes) -> list[Any]:
        msg = parse_message(data)
        assert isinstance(msg, SipRequest)
        stamp_via(msg, CALLER[0], CALLER[1])
        return self.txl.receive(msg, CALLER, self.now, size=len(data))

    def send(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, SendBytes):
                self.sent += len(ev.data)

    def one_call(self, n: int) -> None:
        txl = self.txl
        # INVITE → 100, 200
        events = self.receive(sipp_request("INVITE", n, 1, "0", body=SDP_OFFER))
        ev = events[0]
        assert isinstance(ev, RequestReceived)
        req, key = ev.request, ev.key
        h = req.headers
        h.get_all("Require")
        h.get_all("Proxy-Require")
        (h.get("Content-Type") or "").split(";")[0].strip().lower()
        h.get_all("Accept")
        h.get("Session-Expires")
        assert req.to_tag is None
        to = parse_name_addr(h.get("To") or "")
        frm = parse_name_addr(h.get("From") or "")
        parse_uri(req.uri)
        assert to.uri.user == "*99" and frm.uri.user == "sipp"
        dialog = uas_from_invite(req, f"t{n}", False)
        next_hop(dialog, CALLER)
        for ev in events[1:]:
            if isinstance(ev, TryingDue):
                self.send(txl.trying(ev.key))
        _, answer = sdp.answer_offer(req.body, "127.0.0.1", 20_000, 1_700_000_000)
        ok = make_response(req, 200, to_tag=dialog.local_tag, body=answer, headers=[
            ("Server", SERVER), ("Contact", CONTACT), ("Allow", ALLOW),
            ("Supported", SUPPORTED)])
        self.send(txl.respond(key, ok, self.now))
        self.sent += len(ok.serialize())  # the 2xx retransmitter's copy
        # ACK
        events = self.receive(sipp_request("ACK", n, 1, "5", to_tag=dialog.local_tag))
        ack = events[0].request
        assert (ack.call_id, ack.to_tag) == (dialog.call_id, dialog.local_tag)
        # BYE → 200
        events = self.receive(sipp_request("BYE", n, 2, "7", to_tag=dialog.local_tag))
        ev = events[0]
        bye = ev.request
        assert (bye.call_id, bye.to_tag, bye.from_tag) == (
            dialog.call_id, dialog.local_tag, dialog.remote_tag)
        assert bye.cseq[0] > (dialog.remote_cseq or 0)
        self.send(txl.respond(ev.key, make_response(bye, 200, headers=[("Server", SERVER)]),
                              self.now))
        self.now += 0.001
        deadline = txl.get_timer()
        if deadline is not None and deadline <= self.now:
            self.send(txl.handle_timer(self.now))


def run(calls: int, profiler: cProfile.Profile | None = None) -> float:
    """CPU seconds of `calls` calls (after a warm-up of 200)."""
    front = Front()
    for n in range(200):
        front.one_call(1_000_000 + n)
    started = time.process_time()
    if profiler:
        profiler.enable()
    for n in range(calls):
        front.one_call(n)
    if profiler:
        profiler.disable()
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = [run(args.calls) for _ in range(args.repeats)]
    best = min(runs)
    per_call_us = best / args.calls * 1e6
    result: dict[str, Any] = {
        "calls": args.calls, "repeats": args.repeats,
        "cpu_s_runs": [round(r, 4) for r in runs],
        "us_per_call": round(per_call_us, 1),
        "us_per_call_median": round(sorted(runs)[len(runs) // 2] / args.calls * 1e6, 1),
        "sip_calls_per_core_s": round(1e6 / per_call_us),
    }
    print(f"{args.calls} calls x {args.repeats}: {per_call_us:.1f} µs SIP CPU per call "
          f"(best; median {result['us_per_call_median']:.1f}) = "
          f"{1e6 / per_call_us:.0f} calls/s per core for the SIP layer alone")
    if args.profile:
        profiler = cProfile.Profile()
        run(args.calls, profiler)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    out = args.json or ROOT / "perf" / "results" / f"bench_sip-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
