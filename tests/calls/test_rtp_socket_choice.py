"""pbx.calls.media.looks_natted / MediaPlane.wants_shared: which legs `[media]
rtp_socket = "auto"` keeps off the shared RTP port."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pbx.calls.media import MediaPlane, looks_natted


def sdp_offer(c_ip: str) -> bytes:
    return (f"v=0\r\no=- 1 1 IN IP4 {c_ip}\r\ns=-\r\nc=IN IP4 {c_ip}\r\nt=0 0\r\n"
            "m=audio 4000 RTP/AVP 0\r\n").encode()


def inbound(source: str, c_ip: str | None) -> Any:
    invite = SimpleNamespace(body=sdp_offer(c_ip) if c_ip else b"garbage")
    return SimpleNamespace(outbound=False, invite=invite, source=(source, 5060))


def outbound(ruri: str, addr: tuple[str, int]) -> Any:
    return SimpleNamespace(outbound=True, dialog=SimpleNamespace(remote_target=ruri),
                           addr=addr)


def test_inbound_leg_is_natted_when_its_sdp_is_not_where_its_sip_came_from() -> None:
    assert not looks_natted(inbound("203.0.113.7", "203.0.113.7"))  # a trunk, a public phone
    assert looks_natted(inbound("203.0.113.7", "192.168.1.20"))  # a phone behind NAT
    assert looks_natted(inbound("203.0.113.7", "203.0.113.8"))  # media elsewhere: own port
    assert looks_natted(inbound("203.0.113.7", None))  # unreadable offer: the safe side


def test_outbound_leg_is_natted_when_sent_elsewhere_than_its_contact() -> None:
    assert not looks_natted(outbound("sip:1001@10.0.0.5:5062", ("10.0.0.5", 5062)))
    assert not looks_natted(outbound("sip:gw@10.0.0.9", ("10.0.0.9", 5060)))
    # registered from 198.51.100.4:41234 with a private Contact: reached at the source
    assert looks_natted(outbound("sip:1001@192.168.1.20:5060", ("198.51.100.4", 41234)))


@pytest.mark.parametrize(("mode", "natted", "shared"), [
    ("per_leg", False, False), ("shared", True, True), ("auto", False, True),
    ("auto", True, False),
])
def test_mode_decides(mode: str, natted: bool, shared: bool) -> None:
    plane = MediaPlane.__new__(MediaPlane)
    plane.ctx = SimpleNamespace(settings=SimpleNamespace(media=SimpleNamespace(rtp_socket=mode)))  # type: ignore[assignment]
    leg = inbound("203.0.113.7", "192.168.1.20" if natted else "203.0.113.7")
    assert plane.wants_shared(leg) is shared
