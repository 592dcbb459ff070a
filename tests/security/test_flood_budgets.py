"""An INVITE flood that does ACK (issue 8, item 6): the set-up budget ends at the ACK,
so without a cap on the calls a source holds, one source that acknowledges each 200
keeps every call it makes, each with an RTP port pair and an IVR session, until the
IVR ends it (no RTP timeout ends an established call): it exhausts ports and executors
at half its message rate. `[limits] calls_per_source` caps the calls one source holds,
answered or not. (The flood without ACK, through real sockets, is
tests/security/test_invite_flood.py; set-up budgets are test_setup_budget.py.)"""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.sip.message import SipResponse
from tests.calls.rig import PLAY, CoreRig, first_then
from tests.security.test_setup_budget import invite

FLOODER = ("198.51.100.9", 5060)
CALLER = ("203.0.113.30", 5060)
LIMITS = "\n[limits]\nsetup_calls_per_source = 3\ncalls_per_source = 5\n"


def ack(source: tuple[str, int], n: int, ok: SipResponse) -> bytes:
    host, port = source
    return (
        "ACK sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-ack-{n}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{n}@{host}:{port}>;tag=f{n}\r\n"
        f"To: {ok.headers.get('To')}\r\nCall-ID: flood-{n}@{host}\r\n"
        "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()


def finals(rig: CoreRig, source: tuple[str, int]) -> list[SipResponse]:
    return [r for r in rig.responses(source) if r.status >= 200 and r.cseq[1] == "INVITE"]


def bye(source: tuple[str, int], n: int, ok: SipResponse) -> bytes:
    host, port = source
    return (
        "BYE sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-bye-{n}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{n}@{host}:{port}>;tag=f{n}\r\n"
        f"To: {ok.headers.get('To')}\r\nCall-ID: flood-{n}@{host}\r\n"
        "CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n").encode()


def test_a_source_that_acks_holds_at_most_its_calls_budget(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY), LIMITS)
    table = rig.core.ctx.table
    answered: dict[int, SipResponse] = {}
    for n in range(12):
        rig.feed(invite(FLOODER, n), FLOODER)
        final = [r for r in finals(rig, FLOODER) if r.call_id == f"flood-{n}@{FLOODER[0]}"]
        assert final
        if final[0].status == 200:  # acknowledged at once: no longer in set-up
            answered[n] = final[0]
            rig.feed(ack(FLOODER, n, final[0]), FLOODER)
    statuses = [r.status for r in finals(rig, FLOODER)]
    assert statuses.count(200) == 5 and statuses.count(503) == 7, statuses
    busy = [r for r in finals(rig, FLOODER) if r.status == 503]
    assert {r.reason for r in busy} == {"Too Many Calls From This Source"}
    assert all(r.headers.get("Retry-After") == "5" for r in busy)
    assert len(table.calls) == 5 and len(table.sessions) == 5
    assert len(rig.of(m.MediaAllocate)) == 5  # no port spent on the refused ones
    assert rig.core.ctx.stats["calls_budget_refused"] == 7
    assert table.setup_by_source == {}  # all acknowledged
    # Another source is answered as usual.
    rig.feed(invite(CALLER, 100), CALLER)
    assert finals(rig, CALLER)[0].status == 200
    # A call that ends gives its budget back: the flooder may make one more.
    n, ok = next(iter(answered.items()))
    rig.feed(bye(FLOODER, n, ok), FLOODER)
    assert len(table.calls) == 5  # 4 of the flooder's + CALLER's
    assert table.calls_by_source == {FLOODER[0]: 4, CALLER[0]: 1}
    rig.feed(invite(FLOODER, 50), FLOODER)
    final = [r for r in finals(rig, FLOODER) if r.call_id == f"flood-50@{FLOODER[0]}"]
    assert final and final[0].status == 200


def test_calls_the_ivr_ends_give_their_budget_back(tmp_path: Path) -> None:
    """The IVR hangs up at once, before any ACK: each call's set-up and calls budgets
    come back with its end, so the source is never locked out."""
    rig = CoreRig(tmp_path, first_then([m.HangupCommand()]), LIMITS)
    table = rig.core.ctx.table
    for n in range(8):  # more than either budget, one after the other
        rig.feed(invite(FLOODER, n), FLOODER)
        assert len(finals(rig, FLOODER)) == n + 1
        assert not table.calls
    assert [r.status for r in finals(rig, FLOODER)] == [200] * 8
    assert table.calls_by_source == {} and table.setup_by_source == {}
