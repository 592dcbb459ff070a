"""An INVITE flood that does ACK (issue 8, item 6): the set-up budget ends at the ACK,
so without a cap on the calls a source holds, one source that acknowledges each 200
keeps every call it makes, each with an RTP port pair and an IVR session, until the
IVR ends it (no RTP timeout ends an established call): it exhausts ports and executors
at half its message rate. `[limits] calls_per_source` caps the calls one source holds,
answered or not. (The flood without ACK, through real sockets, is
tests/security/test_invite_flood.py; set-up budgets are test_setup_budget.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pbx import messages as m
from pbx.sip.message import SipResponse
from tests.security.test_setup_budget import PLAY, invite
from tests.test_front_queue import Rig, first_then, until

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


def finals(rig: Rig, source: tuple[str, int]) -> list[SipResponse]:
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
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY), LIMITS)
        answered: dict[int, SipResponse] = {}
        for n in range(12):
            rig.front.message_received(invite(FLOODER, n), FLOODER)
            final = await until(lambda n=n: [r for r in finals(rig, FLOODER)
                                             if r.call_id == f"flood-{n}@{FLOODER[0]}"])
            if final[0].status == 200:  # acknowledged at once: no longer in set-up
                answered[n] = final[0]
                rig.front.message_received(ack(FLOODER, n, final[0]), FLOODER)
        statuses = [r.status for r in finals(rig, FLOODER)]
        assert statuses.count(200) == 5 and statuses.count(503) == 7, statuses
        busy = [r for r in finals(rig, FLOODER) if r.status == 503]
        assert {r.reason for r in busy} == {"Too Many Calls From This Source"}
        assert all(r.headers.get("Retry-After") == "5" for r in busy)
        assert len(rig.front.calls) == 5 and len(rig.front.sessions) == 5
        assert len(rig.of(m.MediaAllocate)) == 5  # no port spent on the refused ones
        assert rig.front.stats["calls_budget_refused"] == 7
        assert rig.front.setup_by_source == {}  # all acknowledged
        # Another source is answered as usual.
        rig.front.message_received(invite(CALLER, 100), CALLER)
        await until(lambda: finals(rig, CALLER))
        assert finals(rig, CALLER)[0].status == 200
        # A call that ends gives its budget back: the flooder may make one more.
        n, ok = next(iter(answered.items()))
        rig.front.message_received(bye(FLOODER, n, ok), FLOODER)
        await until(lambda: len(rig.front.calls) == 5)  # 4 of the flooder's + CALLER's
        assert rig.front.calls_by_source == {FLOODER[0]: 4, CALLER[0]: 1}
        rig.front.message_received(invite(FLOODER, 50), FLOODER)
        final = await until(lambda: [r for r in finals(rig, FLOODER)
                                     if r.call_id == f"flood-50@{FLOODER[0]}"])
        assert final[0].status == 200

    asyncio.run(main())


def test_calls_the_ivr_ends_give_their_budget_back(tmp_path: Path) -> None:
    """The IVR hangs up at once, before any ACK: each call's set-up and calls budgets
    come back with its end, so the source is never locked out."""
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.HangupCommand()]), LIMITS)
        for n in range(8):  # more than either budget, one after the other
            rig.front.message_received(invite(FLOODER, n), FLOODER)
            await until(lambda n=n: len(finals(rig, FLOODER)) == n + 1)
            await until(lambda: not rig.front.calls)
        assert [r.status for r in finals(rig, FLOODER)] == [200] * 8
        assert rig.front.calls_by_source == {} and rig.front.setup_by_source == {}

    asyncio.run(main())
