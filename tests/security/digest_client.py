"""A raw-socket SIP client for the digest security tests: builds REGISTERs (and other
requests) byte by byte, sends them over UDP from a chosen loopback address, and waits
for the final response. It speaks through real sockets to the real front (harness) so
the tests see exactly what a phone, a replaying attacker or a cracker would."""

from __future__ import annotations

import secrets
import socket
import time
from typing import Any

from pbx.sip.digest import client_authorization
from pbx.sip.message import SipRequest, SipResponse, parse_message


class RawSipClient:
    """One UDP socket bound to `bind_ip` (any 127.x.y.z is a separate source to the
    front), talking to the front at `server`."""

    def __init__(self, server: tuple[str, int], bind_ip: str = "127.0.0.1") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind_ip, 0))
        self.ip, self.port = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, user: str, **kw: Any) -> bytes:
        """`build_request` from this socket's address to the front."""
        return build_request(method, user, server=self.server, via=(self.ip, self.port), **kw)

    def send(self, data: bytes, timeout_s: float = 3.0) -> SipResponse:
        """Send `data` and return the final response (retransmitted every 0.5 s like
        RFC 3261 Timer E while none came; AssertionError if none within timeout_s)."""
        deadline = time.monotonic() + timeout_s
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(f"no final response within {timeout_s} s")
            if now >= next_send:
                self.sock.sendto(data, self.server)
                next_send = now + 0.5
            self.sock.settimeout(max(0.01, min(next_send, deadline) - now))
            try:
                raw, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            msg = parse_message(raw)
            if isinstance(msg, SipResponse) and msg.status >= 200:
                return msg
            if isinstance(msg, SipResponse):
                next_send = deadline  # provisional: the server has it, stop resending


def build_request(method: str, user: str, *, server: tuple[str, int], via: tuple[str, int],
                  call_id: str, cseq: int, contact: str | None = None,
                  expires: int | None = None, authorization: str | None = None,
                  header: str = "Authorization", request_uri: str | None = None,
                  to_user: str | None = None) -> bytes:
    """A request from `user` (From) to `to_user` (To, default: `user`), Request-URI
    `sip:<server>` unless given, with a fresh Via branch."""
    host = f"{server[0]}:{server[1]}"
    lines = [
        f"{method} {request_uri or 'sip:' + host} SIP/2.0",
        f"Via: SIP/2.0/UDP {via[0]}:{via[1]};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{server[0]}>;tag={secrets.token_hex(4)}",
        f"To: <sip:{to_user or user}@{server[0]}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
    ]
    if contact is not None:
        lines.append(f"Contact: {contact}")
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if authorization is not None:
        lines.append(f"{header}: {authorization}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def register_request(user: str, *, server: tuple[str, int], via: tuple[str, int],
                     call_id: str, cseq: int, contact: str,
                     credentials: str | None = None) -> SipRequest:
    """A REGISTER of `user` (Expires 600) as the registrar will parse it."""
    msg = parse_message(build_request("REGISTER", user, server=server, via=via,
                                      call_id=call_id, cseq=cseq, contact=contact,
                                      expires=600, authorization=credentials))
    assert isinstance(msg, SipRequest)
    return msg


def answer(challenge_response: SipResponse, user: str, password: str, *,
           method: str = "REGISTER", uri: str, nc: int = 1, proxy: bool = False) -> str:
    """Credentials for the first usable challenge of a 401/407 (RFC 8760 §2.4)."""
    name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
    return client_authorization(challenge=challenge_response.headers.get_all(name),
                                username=user, password=password, method=method, uri=uri,
                                nc=nc)


def register(client: RawSipClient, user: str, password: str, contact: str, *,
             call_id: str, first_cseq: int = 1, expires: int = 600
             ) -> tuple[SipResponse, bytes]:
    """The RFC 3261 §10.2 dance: REGISTER, 401, REGISTER with credentials. Returns the
    final response and the authenticated request as sent (what an attacker captures)."""
    uri = f"sip:{client.server[0]}:{client.server[1]}"
    first = client.send(client.request("REGISTER", user, call_id=call_id, cseq=first_cseq,
                                       contact=contact, expires=expires))
    assert first.status == 401, first.status
    authorization = answer(first, user, password, uri=uri)
    data = client.request("REGISTER", user, call_id=call_id, cseq=first_cseq + 1,
                          contact=contact, expires=expires, authorization=authorization)
    return client.send(data), data
