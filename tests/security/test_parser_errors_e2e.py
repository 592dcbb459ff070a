"""Malformed numbers and one-packet stalls against the running system (real sockets,
supervisord, the harness of tests/e2e): 400 where 2554a5d answered 500 with a
traceback, and the front goes on answering calls."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import pytest

from pbx.sip.headers import canonical_name
from pbx.sip.message import SipResponse, parse_message
from tests.e2e.harness import PbxSystem, RtpEndpoint, ScriptedProvider, start_system
from tests.e2e.test_transport_hostile import (
    assert_clean_log,
    exchange_tcp,
    exchange_udp,
    hold_script,
)
from tests.e2e.uac import Uac

SUPERSCRIPT_TWO = "\u00b2"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    provider.script = hold_script
    s = start_system(tmp_path_factory.mktemp("pbx"), provider)
    try:
        yield s
    finally:
        s.stop()
        provider.close()


def _invite(system: PbxSystem, extra: str, transport: str = "UDP") -> bytes:
    sdp = (b"v=0\r\no=uac 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 40000 RTP/AVP 0\r\n")
    return (
        f"INVITE sip:*99@127.0.0.1:{system.sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK{secrets.token_hex(6)}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:uac@127.0.0.1:5999>;tag=1\r\n"
        f"To: <sip:*99@127.0.0.1>\r\nCall-ID: {secrets.token_hex(8)}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:uac@127.0.0.1:5999>\r\n{extra}"
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n"
    ).encode() + sdp


def test_superscript_numbers_get_400_and_the_front_goes_on(system: PbxSystem) -> None:
    bad = f"Session-Expires: {SUPERSCRIPT_TWO}\r\nSupported: timer\r\n"
    udp = exchange_udp(system, _invite(system, bad))
    assert [r.status for r in udp if r.status >= 200] == [400], [r.status for r in udp]
    tcp, _ = exchange_tcp(system, _invite(system, bad, "TCP"))
    assert [r.status for r in tcp if r.status >= 200] == [400], [r.status for r in tcp]

    # In a call: INFO with a Duration of "²" still delivers its digit (200), and the
    # call carries on to a normal hang-up.
    rtp = RtpEndpoint()
    uac = Uac(system.sip_port, rtp.port)
    try:
        assert uac.call() == 200
        assert uac.final is not None
        body = f"Signal=5\r\nDuration={SUPERSCRIPT_TWO}\r\n".encode()
        info = uac._request("INFO", 2, to_tag=uac.final.to_tag).replace(
            b"Content-Length: 0\r\n\r\n",
            b"Content-Type: application/dtmf-relay\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))
        uac._send(info)
        status = _final_for(uac, "INFO", 3.0)
        assert status == 200
        assert uac.hangup() == 200
    finally:
        uac.close()
        rtp.close()
    assert_clean_log(system)


def _final_for(uac: Uac, method: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = uac._recv(left)
        if isinstance(msg, SipResponse) and msg.cseq[1] == method and msg.status >= 200:
            return msg.status
    return 0


def test_one_packet_stalls_are_gone(system: PbxSystem) -> None:
    """The published worst cases, sent to the front: 40,000 spaces after Content-Length
    on TCP get 400 and the connection closed; an OPTIONS with 11,000 distinct header
    names is answered, and so is the one sent right behind it."""
    spaces = _options(5999, "spaces").replace(b"Content-Length: 0",
                                              b"Content-Length: 0" + b" " * 40_000 + b"x")
    replies, closed = exchange_tcp(system, spaces, until_closed=True)
    assert [r.status for r in replies] == [400] and closed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        many = _options(port, "many-names", b"".join(n + b":\r\n" for n in _names(11_000)))
        assert len(many) < 65_000
        s.sendto(many, ("127.0.0.1", system.sip_port))
        s.sendto(_options(port, "right-behind"), ("127.0.0.1", system.sip_port))
        s.settimeout(5.0)
        answered = {}
        while len(answered) < 2:
            reply = parse_message(s.recvfrom(65535)[0])
            assert isinstance(reply, SipResponse)
            answered[reply.call_id] = reply.status
        assert answered == {"many-names": 200, "right-behind": 200}
    assert_clean_log(system)


def _names(count: int) -> list[bytes]:
    """`count` header names, distinct without regard to case and as short as can be,
    none a known one or a compact form (`to`, `via`; RFC 3261 §7.3.3: `l`)."""
    alphabet = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz0123456789-.!%*_+`'~"]
    names = alphabet + [a + b for a in alphabet for b in alphabet]
    names += [a + b + c for a in alphabet for b in alphabet for c in alphabet]
    return [n for n in names if canonical_name(n.decode()) == n.decode()][:count]


def _options(port: int, call_id: str, extra: bytes = b"") -> bytes:
    return (
        f"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:uac@127.0.0.1>;tag=2\r\nTo: <sip:pbx@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n").encode() + extra \
        + b"Content-Length: 0\r\n\r\n"
