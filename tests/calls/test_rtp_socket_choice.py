"""pbx.calls.media.looks_natted / MediaPlane.wants_shared: which legs `[media]
rtp_socket = "auto"` keeps off the shared RTP port."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pbx.calls.media import MediaPlane, looks_natted
from pbx.policy import PartyKind


def sdp_offer(c_ip: str) -> bytes:
    return (f"v=0\r\no=- 1 1 IN IP4 {c_ip}\r\ns=-\r\nc=IN IP4 {c_ip}\r\nt=0 0\r\n"
            "m=audio 4000 RTP/AVP 0\r\n").encode()


def inbound(source: str, c_ip: str | None, party: PartyKind = PartyKind.ANONYMOUS) -> Any:
    invite = SimpleNamespace(body=sdp_offer(c_ip) if c_ip else b"garbage")
    call = SimpleNamespace(party=SimpleNamespace(kind=party))
    return SimpleNamespace(outbound=False, invite=invite, source=(source, 5060), call=call)


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


@pytest.mark.parametrize(("mode", "natted", "party", "shared"), [
    ("per_leg", False, PartyKind.TRUSTED, False),
    ("shared", True, PartyKind.TRUSTED, True),  # an SBC's media address is its own affair
    ("shared", True, PartyKind.EXTENSION, True),
    # an anonymous caller naming another address could claim someone else's packets
    ("shared", True, PartyKind.ANONYMOUS, False),
    ("shared", False, PartyKind.ANONYMOUS, True),
    ("auto", False, PartyKind.ANONYMOUS, True),
    ("auto", True, PartyKind.TRUSTED, False),
])
def test_mode_decides(mode: str, natted: bool, party: PartyKind, shared: bool) -> None:
    plane = MediaPlane.__new__(MediaPlane)
    plane.ctx = SimpleNamespace(settings=SimpleNamespace(media=SimpleNamespace(rtp_socket=mode)))  # type: ignore[assignment]
    leg = inbound("203.0.113.7", "192.168.1.20" if natted else "203.0.113.7", party)
    assert plane.wants_shared(leg) is shared
