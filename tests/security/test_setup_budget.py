"""An INVITE flood without ACK from one source (issue 8): today ~160 INVITEs/s held every
RTP port and started an IVR session each. Per-source budgets bound what one source
holds; everyone else is still answered. (The flood through real sockets, from a network
namespace, is tests/security/test_invite_flood.py.)"""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.sip.message import SipResponse
from tests.calls.rig import PLAY, SDP, CoreRig, first_then

FLOODER = ("198.51.100.7", 5060)
CALLER = ("203.0.113.20", 5060)


def invite(source: tuple[str, int], n: int) -> bytes:
    host, port = source
    return (
        "INVITE sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-flood-{n}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{n}@{host}:{port}>;tag=f{n}\r\n"
        f"To: <sip:*99@127.0.0.1:5060>\r\nCall-ID: flood-{n}@{host}\r\n"
        f"CSeq: 1 INVITE\r\nContact: <sip:{n}@{host}:{port}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP


def finals(rig: CoreRig, source: tuple[str, int]) -> list[SipResponse]:
    return [r for r in rig.responses(source) if r.status >= 200]


def test_one_source_holds_at_most_its_set_up_budget(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY), "\n[limits]\nsetup_calls_per_source = 5\n")
    for n in range(12):  # never ACKed
        rig.feed(invite(FLOODER, n), FLOODER)
    assert len(finals(rig, FLOODER)) == 12
    statuses = [r.status for r in finals(rig, FLOODER)]
    assert statuses.count(200) == 5 and statuses.count(503) == 7, statuses
    busy = [r for r in finals(rig, FLOODER) if r.status == 503][0]
    assert busy.headers.get("Retry-After") == "5"
    table = rig.core.ctx.table
    assert len(table.calls) == 5 and len(table.sessions) == 5
    assert len(rig.of(m.MediaAllocate)) == 5  # no RTP port spent on the refused ones
    # another source is answered as usual
    rig.feed(invite(CALLER, 100), CALLER)
    assert finals(rig, CALLER)[0].status == 200
    assert rig.core.ctx.stats["setup_budget_refused"] == 7


def test_an_acknowledged_call_gives_its_budget_back(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY), "\n[limits]\nsetup_calls_per_source = 1\n")
    rig.call()  # from tests.calls.rig.CALLER (127.0.0.1)
    assert [r for r in rig.responses(("127.0.0.1", 5999)) if r.status == 200]
    assert rig.core.ctx.table.setup_by_source == {"127.0.0.1": 1}
    rig.caller_request("ACK", 1)
    assert rig.core.ctx.table.setup_by_source == {}


def test_an_invite_refused_for_its_contact_spends_no_budget(tmp_path: Path) -> None:
    """An INVITE whose Contact cannot make a dialog is answered 400 and makes no call: it
    must not keep a unit of its source's budget (30 of them locked the source out for
    good, and over UDP the source can be anyone's address)."""
    rig = CoreRig(tmp_path, first_then(PLAY), "\n[limits]\nsetup_calls_per_source = 5\n")
    for n in range(12):
        bad = invite(FLOODER, n).replace(f"Contact: <sip:{n}@".encode(), b"Contact: <sip:@x>;")
        rig.feed(bad, FLOODER)
    assert [r.status for r in finals(rig, FLOODER)] == [400] * 12
    table = rig.core.ctx.table
    assert table.setup_by_source == {} and not table.calls
    rig.feed(invite(FLOODER, 100), FLOODER)  # the source's own next call is answered
    assert finals(rig, FLOODER)[-1].status == 200
