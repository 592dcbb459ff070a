#!/usr/bin/env python3
"""Call-load client for pbx: a small stand-alone SIP UAC over UDP.

    python perf/callload.py -n 50 -r 10 [--target '*99'] [--pbx 127.0.0.1:5060]
        [--local-ip 127.0.0.1] [--digits 9] [--digit-after 2.5] [--hold 5]
        [--rtp-ports 40000-49999] [--json perf/results/callload.json] [--timeout 10]

Places N calls at R calls per second (paced from a fixed origin), all running
concurrently in one asyncio loop. Each call: INVITE with an SDP offer (PCMU,
PCMA, telephone-event/101) on its own RTP port, Timer A retransmission until a
response, ACK to the 200's Contact, RTP counted by payload type, RFC 4733
digits after --digit-after seconds, BYE (Timer E retransmission) after --hold
seconds. A BYE from the PBX is answered with 200 OK and the call counts as
'ended by pbx' (not a failure when RTP was received).

Prints progress once a second and a summary at the end, and writes the same as
JSON. Exit code 0 when no call failed, 1 otherwise.

The SIP code here is deliberately its own (no import from pbx/): this is an
independent client measuring the PBX from the outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a project dependency
    orjson = None

T1 = 0.5  # RFC 3261 timers, seconds
T2 = 4.0
USER_AGENT = "pbx-callload/1.0"
DTMF_EVENTS = {
    **{str(d): d for d in range(10)},
    "*": 10,
    "#": 11,
    "A": 12,
    "B": 13,
    "C": 14,
    "D": 15,
}
SILENCE = {0: b"\xff" * 160, 8: b"\xd5" * 160}  # 20 ms of G.711 silence

# --------------------------------------------------------------------------
# SIP messages: building and parsing (pure functions)
# --------------------------------------------------------------------------

COMPACT = {
    "i": "call-id",
    "v": "via",
    "f": "from",
    "t": "to",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
}


@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]]  # (lower-case long name, value), in order
    body: bytes
    is_request: bool
    method: str = ""  # request method
    uri: str = ""  # request URI
    status: int = 0  # response code
    reason: str = ""

    def get(self, name: str, default: str = "") -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def call_id(self) -> str:
        return self.get("call-id").strip()

    @property
    def cseq(self) -> tuple[int, str]:
        parts = self.get("cseq").split()
        try:
            return int(parts[0]), parts[1].upper()
        except (IndexError, ValueError):
            return 0, ""


def parse_sip(data: bytes) -> SipMessage | None:
    """Parse one SIP datagram; None when it is not a SIP message."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    try:
        text = head.decode("utf-8", "replace")
    except Exception:
        return None
    lines = re.split(r"\r?\n", text)
    if not lines or not lines[0]:
        return None
    first = lines[0].strip()
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded header line
            key, value = headers[-1]
            headers[-1] = (key, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = name.strip().lower()
        headers.append((COMPACT.get(key, key), value.strip()))
    msg = SipMessage(first, headers, body, is_request=not first.startswith("SIP/"))
    length = msg.get("content-length")
    if length.isdigit():
        msg.body = body[: int(length)]
    if msg.is_request:
        parts = first.split()
        if len(parts) != 3 or not parts[2].startswith("SIP/"):
            return None
        msg.method, msg.uri = parts[0].upper(), parts[1]
    else:
        parts = first.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return None
        msg.status = int(parts[1])
        msg.reason = parts[2] if len(parts) > 2 else ""
    return msg


def build_request(
    method: str, uri: str, headers: list[tuple[str, str]], body: bytes = b"", content_type: str = ""
) -> bytes:
    lines = [f"{method} {uri} SIP/2.0"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def build_response(
    req: SipMessage,
    status: int,
    reason: str,
    extra: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    content_type: str = "",
    to_tag: str = "",
) -> bytes:
    lines = [f"SIP/2.0 {status} {reason}"]
    for via in req.get_all("via"):
        lines.append(f"Via: {via}")
    to = req.get("to")
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [
        f"From: {req.get('from')}",
        f"To: {to}",
        f"Call-ID: {req.call_id}",
        f"CSeq: {req.get('cseq')}",
        f"User-Agent: {USER_AGENT}",
    ]
    lines += [f"{k}: {v}" for k, v in (extra or [])]
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_URI_RE = re.compile(r"<([^>]+)>|(sips?:[^;,\s]+)")


def header_uri(value: str) -> str:
    """The URI inside a Contact / Record-Route / To value."""
    m = _URI_RE.search(value)
    if not m:
        return value.strip()
    return m.group(1) or m.group(2)


def uri_address(uri: str, default_port: int = 5060) -> tuple[str, int]:
    """host and port of a SIP URI (maddr/transport ignored, UDP assumed)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split("@", 1)[-1]
    hostport = re.split(r"[;?>]", rest, maxsplit=1)[0]
    if hostport.startswith("["):  # IPv6 literal
        host, _, port = hostport[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = hostport.partition(":")
    return host, int(port) if port.isdigit() else default_port


def header_tag(value: str) -> str:
    m = re.search(r";\s*tag=([^;>\s,]+)", value)
    return m.group(1) if m else ""


def sdp_offer(ip: str, port: int, session_id: int) -> bytes:
    return (
        "v=0\r\n"
        f"o=callload {session_id} {session_id} IN IP4 {ip}\r\n"
        "s=callload\r\n"
        f"c=IN IP4 {ip}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 8 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\n"
        "a=ptime:20\r\n"
        "a=sendrecv\r\n"
    ).encode()


@dataclass
class SdpAnswer:
    ip: str = ""
    port: int = 0
    payloads: list[int] = field(default_factory=list)
    dtmf_pt: int | None = None


def parse_sdp(body: bytes) -> SdpAnswer | None:
    ans = SdpAnswer()
    in_audio = False
    session_ip = media_ip = ""
    for line in body.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("m="):
            parts = line[2:].split()
            in_audio = parts[:1] == ["audio"] and not ans.port
            if in_audio and len(parts) >= 3 and parts[1].split("/")[0].isdigit():
                ans.port = int(parts[1].split("/")[0])
                ans.payloads = [int(p) for p in parts[3:] if p.isdigit()]
        elif line.startswith("c="):
            parts = line[2:].split()
            if len(parts) >= 3:
                if in_audio:
                    media_ip = parts[2].split("/")[0]
                elif not ans.port:
                    session_ip = parts[2].split("/")[0]
        elif in_audio and line.lower().startswith("a=rtpmap:"):
            pt, _, enc = line[9:].partition(" ")
            if enc.lower().startswith("telephone-event/8000") and pt.isdigit():
                ans.dtmf_pt = int(pt)
    ans.ip = media_ip or session_ip
    if not ans.port or not ans.ip:
        return None
    return ans


def rtp_packet(
    pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool = False
) -> bytes:
    return (
        struct.pack(
            "!BBHII",
            0x80,
            (0x80 if marker else 0) | (pt & 0x7F),
            seq & 0xFFFF,
            ts & 0xFFFFFFFF,
            ssrc,
        )
        + payload
    )


def rfc4733_payload(event: int, end: bool, duration: int, volume: int = 10) -> bytes:
    return struct.pack("!BBH", event, (0x80 if end else 0) | (volume & 0x3F), duration)


def new_tag(n: int = 8) -> str:
    return os.urandom(n).hex()


def new_branch() -> str:
    return "z9hG4bK" + os.urandom(8).hex()


# --------------------------------------------------------------------------
# asyncio shells
# --------------------------------------------------------------------------


class SipEndpoint(asyncio.DatagramProtocol):
    """One shared SIP socket; messages demultiplexed to calls by Call-ID."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        if len(data) < 12:  # keep-alive CRLFs
            return
        msg = parse_sip(data)
        if msg is None:
            self.load.stats["sip_unparsed"] += 1
            return
        call = self.load.calls.get(msg.call_id)
        if msg.is_request:
            if call is None:
                if msg.method != "ACK":
                    self.send(build_response(msg, 481, "Call/Transaction Does Not Exist"), addr)
                return
            call.on_request(msg, addr)
        elif call is not None:
            call.on_response(msg)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def error_received(self, exc) -> None:  # type: ignore[override]
        self.load.stats["sip_socket_errors"] += 1


class RtpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, call: Call) -> None:
        self.call = call
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        call = self.call
        if len(data) < 12 or data[0] >> 6 != 2:
            call.rtp_invalid += 1
            return
        call.rtp_packets += 1
        call.rtp_pts[data[1] & 0x7F] += 1
        self.call.load.rtp_total += 1
        if call.first_rtp_at is None:
            call.first_rtp_at = time.perf_counter()
            call.rtp_source = f"{addr[0]}:{addr[1]}"

    def error_received(self, exc) -> None:  # type: ignore[override]
        self.call.rtp_errors += 1


class Call:
    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.index = index
        self.call_id = f"{new_tag(10)}-{index}@callload"
        self.from_tag = new_tag()
        self.to_tag = ""
        self.cseq = 1
        self.invite_branch = new_branch()
        self.invite: bytes = b""
        self.ack: bytes = b""
        self.remote_target = ""
        self.route_set: list[str] = []
        self.to_value = ""
        self.final: asyncio.Future[SipMessage] = load.loop.create_future()
        self.bye_response: asyncio.Future[SipMessage] | None = None
        self.bye_cseq = 0
        self.pbx_bye = asyncio.Event()
        self.provisional = False
        self.rtp: RtpEndpoint | None = None
        self.rtp_port = 0
        self.rtp_packets = 0
        self.rtp_invalid = 0
        self.rtp_errors = 0
        self.rtp_pts: Counter[int] = Counter()
        self.rtp_source = ""
        self.first_rtp_at: float | None = None
        self.answer: SdpAnswer | None = None
        self.seq = random.randrange(1 << 16)
        self.ts_base = random.randrange(1 << 32)
        self.ssrc = random.randrange(1 << 32)
        self.media_t0 = 0.0
        self.in_event = False
        # --mix: this call's digits, drawn from the weighted choices; else --digits
        self.digits = load.pick_digits()
        self.digits_sent = ""
        # results
        self.started_at: float | None = None
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.setup_ms: float | None = None
        self.final_status = 0
        self.invite_sent = 0
        self.bye_sent = 0
        self.outcome = ""  # ok | ended_by_pbx | failed
        self.reason = ""
        self.problems: list[str] = []

    # ---- addressing -------------------------------------------------------
    @property
    def a(self):
        return self.load.args

    def local_contact(self) -> str:
        return f"<sip:callload@{self.a.local_ip}:{self.load.sip_port}>"

    def request_uri(self) -> str:
        host, port = self.load.pbx
        return f"sip:{self.a.target}@{host}:{port}"

    def from_value(self) -> str:
        # Its own address, port included: a From without one, on the PBX's host, would
        # claim the PBX's domain and be challenged like an extension (pbx.policy).
        return f"<sip:{self.a.caller}@{self.a.local_ip}:{self.load.sip_port}>;tag={self.from_tag}"

    def via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {self.a.local_ip}:{self.load.sip_port};branch={branch};rport"

    def send_sip(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        self.load.sip.send(data, addr or self.load.pbx)

    # ---- incoming ----------------------------------------------------------
    def on_response(self, msg: SipMessage) -> None:
        _, method = msg.cseq
        if method == "INVITE":
            if msg.status < 200:
                self.provisional = True
            elif not self.final.done():
                self.final.set_result(msg)
            elif 200 <= msg.status < 300 and self.ack:
                self.send_sip(self.ack, self.in_dialog_destination())  # 200 retransmitted
        elif method == "BYE" and msg.status >= 200:
            if self.bye_response is not None and not self.bye_response.done():
                self.bye_response.set_result(msg)

    def on_request(self, msg: SipMessage, addr) -> None:
        if msg.method == "ACK":
            return
        if msg.method == "BYE":
            self.send_sip(build_response(msg, 200, "OK"), addr)
            self.pbx_bye.set()
            return
        if msg.method == "INVITE":  # re-INVITE: answer with the same offer
            body = sdp_offer(self.a.local_ip, self.rtp_port, self.index + 1)
            self.send_sip(
                build_response(
                    msg, 200, "OK", [("Contact", self.local_contact())], body, "application/sdp"
                ),
                addr,
            )
            return
        self.send_sip(build_response(msg, 200, "OK"), addr)

    # ---- outgoing ----------------------------------------------------------
    def build_invite(self) -> bytes:
        body = sdp_offer(self.a.local_ip, self.rtp_port, self.index + 1)
        return build_request(
            "INVITE",
            self.request_uri(),
            [
                ("Via", self.via(self.invite_branch)),
                ("Max-Forwards", "70"),
                ("From", self.from_value()),
                ("To", f"<{self.request_uri()}>"),
                ("Call-ID", self.call_id),
                ("CSeq", "1 INVITE"),
                ("Contact", self.local_contact()),
                ("User-Agent", USER_AGENT),
                ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO"),
            ],
            body,
            "application/sdp",
        )

    def in_dialog_headers(self, method: str, cseq: int, branch: str) -> list[tuple[str, str]]:
        hdrs = [("Via", self.via(branch)), ("Max-Forwards", "70")]
        hdrs += [("Route", r) for r in self.route_set]
        hdrs += [
            ("From", self.from_value()),
            ("To", self.to_value),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("User-Agent", USER_AGENT),
        ]
        return hdrs

    def in_dialog_destination(self) -> tuple[str, int]:
        if self.route_set:
            first = header_uri(self.route_set[0])
            if ";lr" in first:
                return uri_address(first)
        return uri_address(self.remote_target) if self.remote_target else self.load.pbx

    def send_ack_2xx(self, resp: SipMessage) -> None:
        self.to_value = resp.get("to")
        self.to_tag = header_tag(self.to_value)
        contact = resp.get("contact")
        self.remote_target = header_uri(contact) if contact else self.request_uri()
        self.route_set = list(
            reversed([r.strip() for v in resp.get_all("record-route") for r in v.split(",")])
        )
        self.ack = build_request(
            "ACK", self.remote_target, self.in_dialog_headers("ACK", 1, new_branch())
        )
        self.send_sip(self.ack, self.in_dialog_destination())

    def send_ack_non2xx(self, resp: SipMessage) -> None:
        self.send_sip(
            build_request(
                "ACK",
                self.request_uri(),
                [
                    ("Via", self.via(self.invite_branch)),
                    ("Max-Forwards", "70"),
                    ("From", self.from_value()),
                    ("To", resp.get("to")),
                    ("Call-ID", self.call_id),
                    ("CSeq", "1 ACK"),
                    ("User-Agent", USER_AGENT),
                ],
            )
        )

    def send_cancel(self) -> None:
        self.send_sip(
            build_request(
                "CANCEL",
                self.request_uri(),
                [
                    ("Via", self.via(self.invite_branch)),
                    ("Max-Forwards", "70"),
                    ("From", self.from_value()),
                    ("To", f"<{self.request_uri()}>"),
                    ("Call-ID", self.call_id),
                    ("CSeq", "1 CANCEL"),
                    ("User-Agent", USER_AGENT),
                ],
            )
        )

    # ---- RTP ---------------------------------------------------------------
    async def bind_rtp(self) -> None:
        lo, hi = self.load.rtp_range
        span = (hi - lo) // 2 + 1
        for _ in range(min(span, 200)):
            port = lo + 2 * (self.load.next_rtp % span)
            self.load.next_rtp += 1
            try:
                transport, proto = await self.load.loop.create_datagram_endpoint(
                    lambda: RtpEndpoint(self), local_addr=(self.a.local_ip, port)
                )
            except OSError:
                continue
            self.rtp, self.rtp_port = proto, port
            return
        raise OSError("no free RTP port in range")

    def media_ts(self, now: float) -> int:
        # timestamp on an 8 kHz clock started at answer, in 20 ms steps
        return self.ts_base + int((now - self.media_t0) / 0.02) * 160

    def send_rtp(self, pt: int, ts: int, payload: bytes, marker: bool = False) -> None:
        if self.rtp is None or self.rtp.transport is None or self.answer is None:
            return
        self.rtp.transport.sendto(
            rtp_packet(pt, self.seq, ts, self.ssrc, payload, marker),
            (self.answer.ip, self.answer.port),
        )
        self.seq += 1
        self.load.rtp_sent += 1

    async def send_digits(self) -> None:
        await asyncio.sleep(self.a.digit_after)
        pt = self.answer.dtmf_pt if self.answer and self.answer.dtmf_pt is not None else 101
        for i, digit in enumerate(self.digits):
            if i:
                await asyncio.sleep(self.a.digit_gap)
            event = DTMF_EVENTS[digit.upper()]
            self.in_event = True
            try:
                t0 = time.perf_counter()
                ts = self.media_ts(t0)
                start_packets = max(1, round(self.a.digit_ms / 20))
                for k in range(start_packets):  # start + updates, every 20 ms
                    await _sleep_until(t0 + 0.02 * k)
                    self.send_rtp(
                        pt, ts, rfc4733_payload(event, False, 160 * (k + 1)), marker=(k == 0)
                    )
                duration = 160 * start_packets
                for k in range(3):  # end packet three times, same timestamp
                    await _sleep_until(t0 + 0.02 * (start_packets + k))
                    self.send_rtp(pt, ts, rfc4733_payload(event, True, duration))
            finally:
                self.in_event = False
            self.digits_sent += digit

    async def send_audio(self) -> None:
        """Optional: G.711 silence every 20 ms (paused while an event is sent)."""
        pt = self.answer.payloads[0] if self.answer and self.answer.payloads else 0
        payload = SILENCE.get(pt, SILENCE[0])
        pt = pt if pt in SILENCE else 0
        k = 0
        while True:
            await _sleep_until(self.media_t0 + 0.02 * k)
            if not self.in_event:
                self.send_rtp(pt, self.ts_base + 160 * k, payload)
            k += 1

    # ---- the call ------------------------------------------------------------
    def fail(self, reason: str) -> None:
        self.problems.append(reason)
        if not self.reason:
            self.reason = reason
        self.outcome = "failed"

    async def run(self) -> None:
        load = self.load
        try:
            await self.bind_rtp()
            await self._run()
        except OSError as exc:
            self.fail("no_rtp_port" if self.rtp is None else f"os_error_{exc.errno}")
        except asyncio.CancelledError:
            self.fail("run_deadline")
            raise
        finally:
            self.ended_at = time.perf_counter()
            if self.rtp is not None and self.rtp.transport is not None:
                self.rtp.transport.close()
            if self.outcome == "failed":
                load.failed += 1
            else:
                load.ended += 1

    async def _run(self) -> None:
        load, a = self.load, self.a
        self.invite = self.build_invite()
        self.started_at = time.perf_counter()
        load.started += 1
        # INVITE client transaction: Timer A until a provisional, bounded by --timeout
        deadline = self.started_at + a.timeout
        interval = T1
        next_send = self.started_at
        while not self.final.done():
            now = time.perf_counter()
            if now >= deadline:
                break
            if not self.provisional and now >= next_send:
                self.send_sip(self.invite)
                self.invite_sent += 1
                next_send = now + interval
                interval *= 2  # Timer A doubles (INVITE: no T2 cap)
            wait = min(deadline, next_send if not self.provisional else deadline) - now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.final), max(wait, 0.001))
        if not self.final.done():
            if self.provisional:
                self.send_cancel()
            self.fail("timeout")
            return
        resp = self.final.result()
        self.final_status = resp.status
        if resp.status >= 300:
            self.send_ack_non2xx(resp)
            self.fail(f"status_{resp.status}")
            return
        now = time.perf_counter()
        self.answered_at = now
        self.setup_ms = (now - self.started_at) * 1000.0
        load.answered += 1
        self.send_ack_2xx(resp)
        self.answer = parse_sdp(resp.body)
        if self.answer is None:
            self.problems.append("no_sdp_answer")
        self.media_t0 = now
        tasks = []
        if self.answer is not None and self.digits:
            tasks.append(asyncio.ensure_future(self.send_digits()))
        if self.answer is not None and a.send_audio:
            tasks.append(asyncio.ensure_future(self.send_audio()))
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.pbx_bye.wait(), a.hold)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self.pbx_bye.is_set():
            self.outcome = "ended_by_pbx"
        else:
            await self.hang_up()
        if self.rtp_packets == 0:
            self.fail("no_rtp")
        if not self.outcome:
            self.outcome = "ok"

    async def hang_up(self) -> None:
        """BYE with Timer E retransmission, bounded by Timer F and --timeout."""
        self.cseq += 1
        self.bye_cseq = self.cseq
        self.bye_response = self.load.loop.create_future()
        branch = new_branch()
        bye = build_request(
            "BYE", self.remote_target, self.in_dialog_headers("BYE", self.cseq, branch)
        )
        start = time.perf_counter()
        deadline = start + min(64 * T1, self.a.timeout)
        interval = T1
        while not self.bye_response.done() and not self.pbx_bye.is_set():
            now = time.perf_counter()
            if now >= deadline:
                break
            self.send_sip(bye, self.in_dialog_destination())
            self.bye_sent += 1
            wait = min(interval, deadline - now)
            interval = min(2 * interval, T2)
            pbx_bye = asyncio.ensure_future(self.pbx_bye.wait())
            await asyncio.wait(
                [self.bye_response, pbx_bye], timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            pbx_bye.cancel()
        if self.bye_response.done():
            status = self.bye_response.result().status
            if status >= 300 and not self.pbx_bye.is_set():
                self.fail(f"bye_status_{status}")
        elif self.pbx_bye.is_set():
            self.outcome = "ended_by_pbx"  # crossed BYEs
        else:
            self.fail("bye_timeout")

    def record(self) -> dict:
        return {
            "index": self.index,
            "call_id": self.call_id,
            "outcome": self.outcome or "unfinished",
            "reason": self.reason,
            "problems": self.problems,
            "final_status": self.final_status,
            "setup_ms": _r(self.setup_ms),
            "first_rtp_ms": _r(
                (self.first_rtp_at - self.answered_at) * 1000.0
                if self.first_rtp_at and self.answered_at
                else None
            ),
            "invite_sent": self.invite_sent,
            "bye_sent": self.bye_sent,
            "rtp_port": self.rtp_port,
            "rtp_packets": self.rtp_packets,
            "rtp_payload_types": {str(k): v for k, v in sorted(self.rtp_pts.items())},
            "rtp_source": self.rtp_source,
            "remote_rtp": f"{self.answer.ip}:{self.answer.port}" if self.answer else "",
            "dtmf_pt": self.answer.dtmf_pt if self.answer else None,
            "digits": self.digits,
            "digits_sent": self.digits_sent,
            "duration_s": _r(
                self.ended_at - self.started_at if self.ended_at and self.started_at else None, 3
            ),
        }


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(float(v), nd)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.pbx = _hostport(args.pbx, 5060)
        lo, _, hi = args.rtp_ports.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        lo_i += lo_i % 2
        if hi_i < lo_i:
            raise SystemExit(f"--rtp-ports: empty range {args.rtp_ports}")
        self.rtp_range = (lo_i, hi_i)
        self.next_rtp = 0
        self.calls: dict[str, Call] = {}
        self.call_list: list[Call] = []
        self.sip: SipEndpoint
        self.sip_port = 0
        self.started = self.answered = self.ended = self.failed = 0
        self.rtp_total = self.rtp_sent = 0
        self.stats: Counter[str] = Counter()
        self.call_class: type[Call] = Call  # a subclass may drive other call flows
        self.mix = parse_mix(args.mix) if getattr(args, "mix", "") else []
        self.rng = random.Random(getattr(args, "seed", None))

    def pick_digits(self) -> str:
        """One call's digits: a weighted draw from --mix, else --digits."""
        if not self.mix:
            return self.args.digits
        choices, weights = zip(*self.mix, strict=True)
        return self.rng.choices(choices, weights)[0]

    async def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((self.args.local_ip, self.args.sip_port))
        self.sip_port = sock.getsockname()[1]
        _, self.sip = await self.loop.create_datagram_endpoint(lambda: SipEndpoint(self), sock=sock)

    def progress(self, t0: float) -> str:
        return (
            f"[{time.perf_counter() - t0:6.1f}s] started {self.started}/{self.args.n} "
            f"answered {self.answered} ended {self.ended} failed {self.failed} "
            f"rtp_rx {self.rtp_total} rtp_tx {self.rtp_sent}"
        )

    async def run(self) -> float:
        a = self.args
        await self.open()
        t0 = time.perf_counter()
        print(
            f"callload: {a.n} calls at {a.r}/s to sip:{a.target}@{a.pbx} from "
            f"{a.local_ip}:{self.sip_port}, hold {a.hold}s, "
            f"digits {('mix ' + a.mix) if self.mix else repr(a.digits)} "
            f"after {a.digit_after}s",
            flush=True,
        )

        async def place(i: int) -> None:
            await _sleep_until(t0 + i / a.r)  # paced from a fixed origin
            call = self.call_class(self, i)
            self.calls[call.call_id] = call
            self.call_list.append(call)
            await call.run()

        tasks = [asyncio.ensure_future(place(i)) for i in range(a.n)]

        async def reporter() -> None:
            k = 1
            while True:
                await _sleep_until(t0 + k)
                k += 1
                print(self.progress(t0), flush=True)

        rep = asyncio.ensure_future(reporter())
        # Each call is bounded by its own timers; this bounds the run as a whole.
        limit = a.n / a.r + 2 * a.timeout + a.hold + 64 * T1 + 5
        done, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        for call in self.call_list:
            if not call.outcome:
                call.fail("run_deadline")
        rep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rep
        elapsed = time.perf_counter() - t0
        print(self.progress(t0), flush=True)
        if self.sip.transport is not None:
            self.sip.transport.close()
        return elapsed

    def summary(self, elapsed: float) -> dict:
        a = self.args
        calls = self.call_list
        records = [c.record() for c in sorted(calls, key=lambda c: c.index)]
        n_not_started = a.n - len(calls)
        outcomes = Counter(r["outcome"] for r in records)
        failures = Counter(r["reason"] for r in records if r["outcome"] == "failed")
        if n_not_started:
            failures["not_started"] += n_not_started
        codes = Counter(r["final_status"] for r in records if r["final_status"])
        setup = np.array([r["setup_ms"] for r in records if r["setup_ms"] is not None], float)
        answered = [c for c in calls if c.answered_at is not None]
        rtp = np.array([c.rtp_packets for c in answered], float)
        first_rtp = np.array(
            [r["first_rtp_ms"] for r in records if r["first_rtp_ms"] is not None], float
        )
        pts: Counter[int] = Counter()
        for c in calls:
            pts.update(c.rtp_pts)

        def pct(arr: np.ndarray) -> dict:
            if not arr.size:
                return {"p50": None, "p99": None, "max": None, "mean": None}
            return {
                "p50": _r(np.percentile(arr, 50)),
                "p99": _r(np.percentile(arr, 99)),
                "max": _r(arr.max()),
                "mean": _r(arr.mean()),
            }

        failed = sum(failures.values())
        return {
            "tool": "perf/callload.py",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "calls": a.n,
                "rate": a.r,
                "target": a.target,
                "pbx": a.pbx,
                "local_ip": a.local_ip,
                "digits": a.digits,
                "mix": a.mix,
                "seed": a.seed,
                "digit_after_s": a.digit_after,
                "digit_ms": a.digit_ms,
                "digit_gap_s": a.digit_gap,
                "hold_s": a.hold,
                "timeout_s": a.timeout,
                "rtp_ports": a.rtp_ports,
                "send_audio": a.send_audio,
            },
            "elapsed_s": _r(elapsed, 3),
            "calls": {
                "total": a.n,
                "ok": outcomes.get("ok", 0) + outcomes.get("ended_by_pbx", 0),
                "ended_by_us": outcomes.get("ok", 0),
                "ended_by_pbx": outcomes.get("ended_by_pbx", 0),
                "answered": len(answered),
                "failed": failed,
            },
            "failures": dict(sorted(failures.items())),
            "final_status": {str(k): v for k, v in sorted(codes.items())},
            "setup_latency_ms": pct(setup),
            "first_rtp_after_answer_ms": pct(first_rtp),
            "rtp_per_call": {
                "min": int(rtp.min()) if rtp.size else None,
                "mean": _r(rtp.mean()) if rtp.size else None,
                "max": int(rtp.max()) if rtp.size else None,
                "total_received": int(self.rtp_total),
                "total_sent": int(self.rtp_sent),
                "payload_types": {str(k): v for k, v in sorted(pts.items())},
            },
            "sip": {
                "invite_retransmissions": sum(max(0, c.invite_sent - 1) for c in calls),
                "bye_retransmissions": sum(max(0, c.bye_sent - 1) for c in calls),
                **dict(self.stats),
            },
            "by_digits": by_digits(records) if self.mix else {},
            "per_call": records,
        }


def parse_mix(text: str) -> list[tuple[str, float]]:
    """`"9:50,1:25,2:25"` -> [("9", 50.0), ("1", 25.0), ("2", 25.0)]: each call's digits
    (a digit string, '' for none) drawn with these weights."""
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        digits, sep, weight = item.strip().rpartition(":")
        if not sep:
            raise ValueError(f"--mix: {item!r} is not DIGITS:WEIGHT")
        bad = [d for d in digits if d.upper() not in DTMF_EVENTS]
        if bad:
            raise ValueError(f"--mix: not DTMF digits: {''.join(bad)}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--mix: weight {weight!r} is not a number") from None
        if w < 0:
            raise ValueError(f"--mix: negative weight {weight!r}")
        out.append((digits, w))
    if not out or sum(w for _, w in out) <= 0:
        raise ValueError("--mix: no choice with a positive weight")
    return out


def by_digits(records: list[dict]) -> dict:
    """Outcomes per --mix choice: calls, ok, ended_by_pbx, failed (by reason)."""
    out: dict[str, dict] = {}
    for r in records:
        entry = out.setdefault(
            r["digits"], {"calls": 0, "ok": 0, "ended_by_pbx": 0, "failed": 0, "failures": {}}
        )
        entry["calls"] += 1
        if r["outcome"] == "failed":
            entry["failed"] += 1
            entry["failures"][r["reason"]] = entry["failures"].get(r["reason"], 0) + 1
        else:
            entry["ok"] += 1
            if r["outcome"] == "ended_by_pbx":
                entry["ended_by_pbx"] += 1
    return dict(sorted(out.items()))


def print_summary(s: dict) -> None:
    c, lat, rtp = s["calls"], s["setup_latency_ms"], s["rtp_per_call"]
    print("\n== callload summary ==")
    print(
        f"calls     : {c['total']} total, {c['ok']} ok "
        f"({c['ended_by_us']} ended by us, {c['ended_by_pbx']} ended by pbx), "
        f"{c['failed']} failed, in {s['elapsed_s']} s"
    )
    if s["failures"]:
        print("failures  : " + ", ".join(f"{k}={v}" for k, v in s["failures"].items()))
    if s["final_status"]:
        print("final SIP : " + ", ".join(f"{k}={v}" for k, v in s["final_status"].items()))
    print(f"set-up ms : p50 {lat['p50']}  p99 {lat['p99']}  max {lat['max']}")
    fr = s["first_rtp_after_answer_ms"]
    print(f"1st RTP ms: p50 {fr['p50']}  p99 {fr['p99']}  max {fr['max']} (after 200 OK)")
    print(
        f"RTP/call  : min {rtp['min']}  mean {rtp['mean']}  max {rtp['max']}  "
        f"(rx {rtp['total_received']}, tx {rtp['total_sent']}, "
        f"payload types {rtp['payload_types']})"
    )
    for digits, e in s.get("by_digits", {}).items():
        fails = ", ".join(f"{k}={v}" for k, v in e["failures"].items())
        print(
            f"mix {digits or '-':>5}: {e['calls']} calls, {e['ok']} ok "
            f"({e['ended_by_pbx']} ended by pbx), {e['failed']} failed"
            + (f" ({fails})" if fails else "")
        )
    sip = s["sip"]
    print(
        f"SIP       : INVITE retransmissions {sip['invite_retransmissions']}, "
        f"BYE retransmissions {sip['bye_retransmissions']}"
    )


def _hostport(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host:
        return value, default_port
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SIP call-load client for pbx (UDP, RTP, RFC 4733)")
    p.add_argument("-n", type=int, default=50, help="number of calls (default 50)")
    p.add_argument("-r", type=float, default=10.0, help="calls started per second (default 10)")
    p.add_argument("--target", default="*99", help="user part of the request URI (default *99)")
    p.add_argument("--caller", default="callload", help="user part of From")
    p.add_argument("--pbx", default="127.0.0.1:5060", help="PBX SIP address host:port")
    p.add_argument("--local-ip", default="127.0.0.1", help="local address for SIP and RTP")
    p.add_argument("--sip-port", type=int, default=0, help="local SIP port (default: any)")
    p.add_argument("--digits", default="9", help="RFC 4733 digits to send ('' for none)")
    p.add_argument(
        "--mix",
        default="",
        help="each call's digits drawn from weighted choices, e.g. '9:50,1:25,2:25' "
        "(overrides --digits)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for --mix")
    p.add_argument("--digit-after", type=float, default=2.5, help="seconds after answer")
    p.add_argument("--digit-ms", type=int, default=100, help="event length before the end packets")
    p.add_argument("--digit-gap", type=float, default=0.2, help="seconds between digits")
    p.add_argument("--hold", type=float, default=5.0, help="seconds after answer before BYE")
    p.add_argument("--send-audio", action="store_true", help="also send G.711 silence every 20 ms")
    p.add_argument("--rtp-ports", default="40000-49999", help="local RTP port range")
    p.add_argument(
        "--json", default="", help="result file (default perf/results/callload-<ts>.json)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for a final response (and bound for BYE)",
    )
    args = p.parse_args(argv)
    if args.n < 1 or args.r <= 0:
        p.error("-n must be >= 1 and -r > 0")
    bad = [d for d in args.digits if d.upper() not in DTMF_EVENTS]
    if bad:
        p.error(f"--digits: not DTMF digits: {''.join(bad)}")
    if args.mix:
        try:
            parse_mix(args.mix)
        except ValueError as exc:
            p.error(str(exc))
    return args


def write_json(summary: dict, path_arg: str) -> Path:
    if path_arg:
        path = Path(path_arg)
    else:
        path = (
            Path(__file__).resolve().parent
            / "results"
            / (f"callload-{time.strftime('%Y%m%d-%H%M%S')}.json")
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if orjson is not None:
        path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    else:
        path.write_text(json.dumps(summary, indent=2))
    return path


async def amain(args: argparse.Namespace) -> dict:
    load = Load(args)
    elapsed = await load.run()
    return load.summary(elapsed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop  # optional, faster loop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        summary = runner(amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_summary(summary)
    path = write_json(summary, args.json)
    print(f"results   : {path}")
    return 0 if summary["calls"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
