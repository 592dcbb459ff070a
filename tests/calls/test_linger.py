"""What an ended call leaves behind, on the core's virtual clock: its dialogs linger as
tombstones in the call table (`CallTable.ended_dialogs`: a late BYE gets 200, anything
else 481, a stranger 403, an ACK is absorbed) and its graph (Call, Legs, Dialogs,
Session ...) is unlinked, so reference counting frees it, as soon as no index reaches
it: at once, or when the last late event that still needs it has come (the IVR's reply
in flight, the ACK our BYE waits for, a 2xx retransmission of an outbound leg within
its client transaction's linger). The garbage collector is off while a test checks
that the call is gone: only reference counting frees it."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pbx import messages as m
from pbx.calls.legs import LINGER_S
from pbx.calls.state import Call
from pbx.sip.message import SipRequest, make_response
from tests.calls.rig import (
    CALLER,
    MEMBERS,
    PLAY,
    TRUSTED_CALLER,
    CoreRig,
    caller_invite,
    first_then,
    reply,
)
from tests.calls.test_call_flows import bridged, table_empty

ELSEWHERE = ("198.51.100.66", 5999)


@pytest.fixture(autouse=True)
def no_collector() -> Iterator[None]:
    """Only reference counting frees objects here (pbx.app.tune_gc makes full
    collections rare in the front: what a cycle keeps stays for minutes there)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextmanager
def no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No handler failed (`CallCore._guarded`, a timer, a request) while in the block."""
    with caplog.at_level(logging.INFO):
        yield
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failed, failed


def dialog_request(method: str, cseq: int, to: str, call_id: str, from_: str,
                   source: tuple[str, int], branch: str) -> bytes:
    return (f"{method} sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bK-{branch}\r\n"
            f"Max-Forwards: 70\r\nFrom: {from_}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n").encode()


def callers_request(rig: CoreRig, method: str, cseq: int, source: tuple[str, int] = CALLER
                    ) -> list[int]:
    """The caller's `method` in its dialog with us, from `source`: the statuses it got."""
    ok = [r for r in rig.responses() if r.status == 200 and r.cseq[1] == "INVITE"][0]
    rig.feed(dialog_request(method, cseq, ok.headers.get("To") or "", ok.call_id,
                            "<sip:1001@127.0.0.1:5999>;tag=caller", source,
                            f"late-{method}-{cseq}"), source)
    return [r.status for r in rig.responses(source) if r.cseq == (cseq, method)]


def test_an_ended_call_goes_at_once_and_its_dialog_lingers_as_a_tombstone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    table = rig.core.ctx.table
    with no_errors(caplog):
        ref = weakref.ref(rig.answered())
        rig.caller_request("BYE", 2)
        assert rig.last(2).status == 200
        assert ref() is None  # the session's reply came in the step: nothing needs it
        assert not table.dialogs and list(table.ended_dialogs.values()) == ["127.0.0.1"]
        # The record has the leg's RTP statistics (MediaReleased came after the unlink).
        [record] = rig.records()
        assert record["rtp"]["a"]["packets_sent"] == 10 and record["rtp_complete"]
        assert callers_request(rig, "BYE", 3) == [200]  # a late BYE of theirs
        assert callers_request(rig, "INFO", 4) == [481]  # anything else
        assert callers_request(rig, "BYE", 5, ELSEWHERE) == [403]  # not the peer
        assert rig.core.ctx.stats["in_dialog_foreign"] == 1
        answers = len(rig.sip)
        callers_request(rig, "ACK", 1)  # a late ACK: absorbed, no answer
        assert len(rig.sip) == answers
        rig.advance(LINGER_S - 1)
        assert callers_request(rig, "BYE", 6) == [200]  # still within the linger
        rig.advance(2)
        assert not table.ended_dialogs and not table.ended_order
        assert callers_request(rig, "BYE", 7) == [481]  # the tombstone went
        table_empty(rig)


def test_an_ivr_reply_still_in_flight_keeps_the_call_until_it_comes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    held: list[m.IvrEvent] = []
    executor = rig.executors[b"e"]
    with no_errors(caplog):
        ref = weakref.ref(rig.answered())
        executor.answer = held.append  # type: ignore[assignment,return-value]
        rig.caller_request("BYE", 2)
        call = ref()
        assert call is not None and call.ended and call.session is not None
        assert call.a is not None  # the reply may still need the call: kept whole
        del call
        assert held and isinstance(held[-1].input, m.CallEndedInput)
        rig.reply(b"e", reply(held[-1], m.TransferCommand(target="2001"), done=True))
        assert ref() is None
        assert not rig.requests("INVITE", MEMBERS["2001"])
        assert callers_request(rig, "BYE", 3) == [200]
        table_empty(rig)


def test_the_farewell_and_a_stuck_executors_late_reply_after_the_unlink(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The front gives up on a session (IvrTimeout): the provider hears `/end` through
    another executor, whose reply, and the stuck one's much later, find no call."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    held: list[m.IvrEvent] = []
    with no_errors(caplog):
        ref = weakref.ref(rig.answered())
        rig.executors[b"e"].answer = held.append  # type: ignore[assignment,return-value]
        rig.add_executor(b"f")
        rig.executors[b"f"].full = True  # the digit goes to e, which never answers
        rig.heartbeat()
        call = ref()
        assert call is not None and call.a is not None
        rig.media_event(call.a.media_id, m.DtmfDigit(digit="1", source="rfc4733"))
        del call
        rig.executors[b"f"].full = False
        rig.advance_until(lambda: rig.requests("BYE", CALLER), 3600)
        assert rig.core.ctx.stats["ivr_farewells"] == 1
        assert any(isinstance(e.input, m.CallEndedInput) for e in rig.executors[b"f"].received)
        assert ref() is None
        for event in held:
            rig.reply(b"e", reply(event, m.HangupCommand(), done=True))
        callers_request(rig, "ACK", 1)
        table_empty(rig)


@pytest.mark.parametrize("then", ["ack", "their_bye", "ack_timeout"])
def test_our_bye_waiting_for_the_ack_keeps_the_leg_until_it_goes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, then: str) -> None:
    """The IVR hangs up before the caller's ACK: the leg (our BYE waits, RFC 3261 §15)
    stays until the ACK, the caller's own BYE or our 2xx's timeout; then the call goes."""
    rig = CoreRig(tmp_path, first_then([m.HangupCommand(code=603, reason="Closed")]))
    table = rig.core.ctx.table
    with no_errors(caplog):
        rig.feed(caller_invite(), CALLER)
        [ref] = [weakref.ref(leg.call) for leg in table.dialogs.values()]
        call = ref()
        assert call is not None and call.ended and call.a is not None
        assert call.a.bye_waiting is not None
        del call
        if then == "ack":
            rig.caller_request("ACK", 1)
        elif then == "their_bye":
            assert callers_request(rig, "BYE", 2) == [200]
        else:
            rig.advance_until(lambda: rig.requests("BYE", CALLER), LINGER_S + 1)
        assert ref() is None and not table.dialogs and len(table.ended_dialogs) == 1
        byes = rig.requests("BYE", CALLER)
        assert len(byes) == (0 if then == "their_bye" else 1)
        for bye in byes:  # the 200 to our BYE, twice (a retransmission)
            rig.feed(make_response(bye, 200), CALLER)
            rig.feed(make_response(bye, 200), CALLER)
        answers = len(rig.sip)
        callers_request(rig, "ACK", 1)  # late or again: absorbed
        assert len(rig.sip) == answers
        table_empty(rig)
        assert len(rig.requests("BYE", CALLER)) == len(byes)


def test_a_2xx_retransmission_of_an_ended_transfer_is_acked_until_the_client_linger(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The callee's 200 may be retransmitted after the call ended (our ACK lost): each
    gets its ACK (RFC 3261 §13.2.2.4) while the INVITE's client transaction lingers,
    which keeps the call; then the call goes, and the callee's dialog is a tombstone."""
    with no_errors(caplog):
        rig, call = bridged(tmp_path)
        callee = MEMBERS["2001"]
        [invite] = rig.requests("INVITE", callee)
        assert call.b is not None
        ok = make_response(invite, 200, to_tag="t1", body=b"", headers=[
            ("Contact", f"<sip:2001@{callee[0]}:{callee[1]}>")])
        ref = weakref.ref(call)
        del call
        rig.advance(5)
        rig.caller_request("BYE", 2)
        assert len(rig.requests("BYE", callee)) == 1
        assert ref() is not None  # the INVITE's client transaction still lingers
        acks = len(rig.requests("ACK", callee))
        rig.feed(ok, callee)
        assert len(rig.requests("ACK", callee)) == acks + 1
        assert len(rig.requests("BYE", callee)) == 1  # no second BYE
        rig.advance(LINGER_S - 3)  # the client linger is over, the dialog's is not
        assert ref() is None
        table = rig.core.ctx.table
        assert not table.dialogs and len(table.ended_dialogs) == 2
        their_bye = dialog_request("BYE", 9, invite.headers.get("From") or "",
                                   invite.call_id, "<sip:2001@127.0.0.1>;tag=t1", callee,
                                   "callee-bye")
        rig.feed(their_bye, callee)
        assert [r.status for r in rig.responses(callee) if r.cseq == (9, "BYE")] == [200]
        rig.feed(their_bye.replace(b"callee-bye", b"forged-bye"), ELSEWHERE)
        assert [r.status for r in rig.responses(ELSEWHERE)] == [403]
        rig.feed(ok, callee)  # later still: the transaction layer's, no TU left
        table_empty(rig)


def test_a_queue_callers_hangup_while_members_ring_leaves_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The caller leaves while the queue's members ring: CANCELs; one member's 200
    crosses it (ACK + BYE, and its retransmission the ACK only), the other's 487."""
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    with no_errors(caplog):
        ref = weakref.ref(rig.call())
        rig.caller_request("ACK", 1)
        invites = {to: msg for msg, to in rig.sip
                   if isinstance(msg, SipRequest) and msg.method == "INVITE"}
        for to, invite in invites.items():
            rig.feed(make_response(invite, 180, to_tag=f"t{to[1]}"), to)
        rig.caller_request("BYE", 2)
        (first, first_invite), (second, second_invite) = sorted(invites.items())
        assert rig.requests("CANCEL", first) and rig.requests("CANCEL", second)
        rig.advance(1)
        rig.answer(first_invite, first, f"t{first[1]}")
        rig.answer(first_invite, first, f"t{first[1]}")  # retransmitted
        assert len(rig.requests("ACK", first)) == 2 and len(rig.requests("BYE", first)) == 1
        rig.feed(make_response(second_invite, 487, to_tag=f"t{second[1]}"), second)
        assert not rig.core.queue.books[("queue", "sales")].busy
        table_empty(rig)
        assert ref() is None


def test_every_index_and_the_graph_are_gone_after_a_forked_call_is_cancelled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A direct call to a user with two contacts, cancelled by the caller: the
    branches' CANCELs; nothing of the call is left after the lingers."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    with no_errors(caplog):
        call: Call | None = rig.call(caller_invite("").replace(b"*99", b"2001"))
        ref = weakref.ref(call)
        del call
        [invite] = rig.requests("INVITE", MEMBERS["2001"])
        rig.feed(make_response(invite, 180, to_tag="t1"), MEMBERS["2001"])
        rig.cancel_call()
        assert rig.requests("CANCEL", MEMBERS["2001"])
        rig.feed(make_response(invite, 487, to_tag="t1"), MEMBERS["2001"])
        table_empty(rig)
        assert ref() is None
