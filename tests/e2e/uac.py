"""A minimal scripted caller over UDP or TCP for end-to-end tests that need to see each
call's outcome on its own (sipp mixes many calls in one log): INVITE with an SDP
offer pointing at a test RTP port, ACK, wait for (and answer) the PBX's BYE, or BYE."""

from __future__ import annotations

import secrets
import socket
import time

from pbx.sip.framing import Message, StreamFramer
from pbx.sip.message import SipRequest, SipResponse, make_ack, make_response, parse_message


class Uac:
    def __init__(self, sip_port: int, rtp_port: int, service: str = "*99",
                 tcp: bool = False, rtp_ip: str = "127.0.0.1") -> None:
        self.server = ("127.0.0.1", sip_port)
        self.tcp = tcp
        kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        if tcp:
            self.sock.connect(self.server)
        self.port = self.sock.getsockname()[1]
        self.framer = StreamFramer()
        self.rtp_port = rtp_port
        self.rtp_ip = rtp_ip  # the offer's c= address
        self.service = service
        self.call_id = secrets.token_hex(8)
        self.tag = secrets.token_hex(4)
        self.invite: SipRequest | None = None
        self.final: SipResponse | None = None
        self.bye_at: float | None = None
        self.received: list[SipRequest | SipResponse] = []

    def close(self) -> None:
        self.sock.close()

    def _send(self, data: bytes) -> None:
        if self.tcp:
            self.sock.sendall(data)
        else:
            self.sock.sendto(data, self.server)

    def _recv(self, timeout: float) -> SipRequest | SipResponse | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            if not self.tcp:
                return parse_message(self.sock.recvfrom(65535)[0])
            while True:
                event = self.framer.next_event()
                if isinstance(event, Message):
                    return parse_message(event.data)
                if event is None:
                    chunk = self.sock.recv(65535)
                    if not chunk:
                        return None
                    self.framer.receive_data(chunk)
        except (TimeoutError, OSError):
            return None

    def _request(self, method: str, cseq: int, to_tag: str | None = None,
                 body: bytes = b"", branch: str | None = None) -> bytes:
        transport = "TCP" if self.tcp else "UDP"
        to = f"<sip:{self.service}@127.0.0.1:{self.server[1]}>"
        if to_tag:
            to += f";tag={to_tag}"
        lines = [
            f"{method} sip:{self.service}@127.0.0.1:{self.server[1]} SIP/2.0",
            f"Via: SIP/2.0/{transport} 127.0.0.1:{self.port};branch="
            f"{branch or 'z9hG4bK' + secrets.token_hex(6)};rport",
            f"From: <sip:uac@127.0.0.1:{self.port}>;tag={self.tag}",
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:uac@127.0.0.1:{self.port}>",
            "Max-Forwards: 70",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def call(self, timeout: float = 5.0, telephone_event: bool = True) -> int:
        """INVITE and wait for the final response (ACKed); its status, 0 on timeout.
        Without `telephone_event` the offer is PCMU alone (digits only in-band)."""
        te = "a=rtpmap:101 telephone-event/8000\r\n" if telephone_event else ""
        sdp = (f"v=0\r\no=uac 1 1 IN IP4 {self.rtp_ip}\r\ns=-\r\nc=IN IP4 {self.rtp_ip}\r\n"
               "t=0 0\r\n"
               f"m=audio {self.rtp_port} RTP/AVP 0{' 101' if telephone_event else ''}\r\n"
               f"a=rtpmap:0 PCMU/8000\r\n{te}").encode()
        data = self._request("INVITE", 1, body=sdp)
        invite = parse_message(data)
        assert isinstance(invite, SipRequest)
        self.invite = invite
        self._send(data)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._recv(left)
            if msg is None:
                continue
            self.received.append(msg)
            if isinstance(msg, SipResponse) and msg.cseq[1] == "INVITE" and msg.status >= 200:
                self.final = msg
                if msg.status < 300:
                    self._send(self._request("ACK", 1, to_tag=msg.to_tag))
                else:
                    self._send(make_ack(invite, msg).serialize())
                return msg.status
        return 0

    @property
    def answer_rtp_port(self) -> int:
        assert self.final is not None
        for line in self.final.body.decode().splitlines():
            if line.startswith("m=audio "):
                return int(line.split()[1])
        raise AssertionError("no m=audio in the answer")

    def wait_bye(self, timeout: float) -> float | None:
        """Wait for the PBX's BYE and answer 200; the time it came, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._recv(left)
            if msg is None:
                continue
            self.received.append(msg)
            if isinstance(msg, SipRequest) and msg.method == "BYE":
                self.bye_at = time.monotonic()
                self._send(make_response(msg, 200).serialize())
                return self.bye_at
        return None

    def hangup(self, timeout: float = 3.0) -> int:
        """BYE and wait for its final response; the status, 0 on timeout."""
        assert self.final is not None
        self._send(self._request("BYE", 2, to_tag=self.final.to_tag))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._recv(left)
            if isinstance(msg, SipResponse) and msg.cseq[1] == "BYE" and msg.status >= 200:
                return msg.status
        return 0
