"""The call core on a virtual clock: timers fire when `now` says, not when a loop does.

Each test drives `pbx.calls.CallCore` through `CoreRig` (SIP bytes in, commands out,
`advance(seconds)` for time); nothing sleeps and nothing patches a private timer.
"""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.calls.core import LIVENESS_CHECK_S
from pbx.calls.legs import LINGER_S
from pbx.calls.media import MEDIA_ALLOCATE_TIMEOUT_S
from pbx.calls.session_timer import SESSION_EXPIRY_MARGIN_S
from pbx.calls.state import CallPhase, LegPhase
from pbx.sip.message import SipRequest, make_response
from tests.calls.rig import (
    CALLER,
    MEMBERS,
    PLAY,
    TRUSTED_CALLER,
    CoreRig,
    caller_invite,
    first_then,
)
from tests.calls.test_call_flows import table_empty


def test_an_ivr_call_is_answered_within_the_invite(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.call()
    assert rig.statuses()[-1] == 200
    assert call.phase is CallPhase.IVR and call.a is not None
    assert call.a.phase is LegPhase.CONFIRMED
    assert any(isinstance(x, m.MediaPlay) for x in rig.media)


def test_session_expires_when_the_peer_does_not_refresh(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.call(caller_invite("Session-Expires: 90;refresher=uac\r\nSupported: timer\r\n"))
    ok = rig.responses()[-1]
    assert ok.status == 200 and ok.headers.get("Session-Expires") == "90;refresher=uac"
    rig.caller_request("ACK", 1)
    expiry = 90 - min(SESSION_EXPIRY_MARGIN_S, 90 / 3)  # RFC 4028 §10
    rig.advance(expiry - 1)
    assert not rig.requests("BYE", CALLER)
    rig.advance(1)
    byes = rig.requests("BYE", CALLER)
    assert len(byes) == 1 and "cause=408" in (byes[0].headers.get("Reason") or "")


def test_a_refresh_rearms_the_session_timer(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.call(caller_invite("Session-Expires: 90;refresher=uac\r\nSupported: timer\r\n"))
    rig.caller_request("ACK", 1)
    rig.advance(50)
    rig.caller_request("UPDATE", 2, "Session-Expires: 120\r\nSupported: timer\r\n")
    assert rig.responses()[-1].headers.get("Session-Expires") == "120;refresher=uac"
    rig.advance(120 - min(SESSION_EXPIRY_MARGIN_S, 120 / 3) - 1)
    assert not rig.requests("BYE", CALLER)
    rig.advance(2)
    assert rig.requests("BYE", CALLER)


def test_we_refresh_with_update_at_half_the_interval(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    # No `Supported: timer`: we are the refresher (RFC 4028 §9).
    rig.call(caller_invite("Session-Expires: 100\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n"))
    assert rig.responses()[-1].headers.get("Session-Expires") == "100;refresher=uas"
    rig.caller_request("ACK", 1)
    def refreshes() -> set[int]:  # UDP retransmissions of one UPDATE share its CSeq
        return {r.cseq[0] for r in rig.requests("UPDATE", CALLER)}

    rig.advance(49)
    assert not refreshes()
    rig.advance(1)
    assert len(refreshes()) == 1
    rig.feed(make_response(rig.requests("UPDATE", CALLER)[-1], 200), CALLER)
    rig.advance(50)
    assert len(refreshes()) == 2
    assert rig.core.ctx.table.calls  # answered refreshes keep the call up


def test_ring_timeout_cancels_the_callee_and_ends_the_transfer(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]))
    call = rig.call()
    rig.caller_request("ACK", 1)
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1", ring_only=True)
    assert call.phase is CallPhase.TRANSFERRING
    ring_s = rig.settings.sip.ring_timeout_ms / 1000
    rig.advance(ring_s - 0.01)
    assert not rig.requests("CANCEL", MEMBERS["2001"])
    rig.advance(0.02)
    assert rig.requests("CANCEL", MEMBERS["2001"])
    assert call.phase is CallPhase.ENDED and call.end_reason == "TransferFailed(408)"
    assert rig.requests("BYE", CALLER)


def test_an_unconfirmed_port_ends_the_call_on_the_virtual_clock(tmp_path: Path) -> None:
    """The 200 goes out at once with a port from the worker's pool; a worker that never
    confirms it ends the call (503) at MEDIA_ALLOCATE_TIMEOUT_S."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.auto_allocate = False
    call = rig.call()
    assert rig.statuses() == [200] and call.phase is CallPhase.IVR
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    rig.advance(MEDIA_ALLOCATE_TIMEOUT_S - 0.01)
    assert not rig.requests("BYE", CALLER)
    rig.advance(0.02)
    bye = rig.requests("BYE", CALLER)
    assert bye and "cause=503" in (bye[0].headers.get("Reason") or "")
    assert call.ended and call.end_reason == "MediaAllocationFailed"
    assert rig.core.ctx.stats["media_allocations_failed"] == 1
    assert not rig.core.ctx.table.legs_by_media  # the port was released


def test_the_port_is_confirmed_by_the_announcement_that_covers_it(tmp_path: Path) -> None:
    """A worker answers a successful MediaAllocate with nothing: an announcement sent
    before it handled the allocation (its `allocate_seq` below the allocation's `seq`)
    confirms nothing, the next one does, and the call's deadline goes."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.auto_allocate = False
    call = rig.call()
    rig.caller_request("ACK", 1)
    (allocate,) = rig.of(m.MediaAllocate)
    pool = list(rig.worker.pool)
    rig.core.media_message(b"w", m.MediaPorts(ports=pool, allocate_seq=allocate.seq - 1),
                           rig.now)
    assert rig.core.ctx.media_workers.pool(b"w").unconfirmed  # type: ignore[union-attr]
    rig.core.media_message(b"w", m.MediaPorts(ports=pool[1:], allocate_seq=allocate.seq),
                           rig.now)
    assert not rig.core.ctx.media_workers.pool(b"w").unconfirmed  # type: ignore[union-attr]
    rig.advance(MEDIA_ALLOCATE_TIMEOUT_S + 1)
    assert not call.ended and not rig.requests("BYE", CALLER)


def test_a_finished_dialog_lingers_then_answers_481(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.call()
    rig.caller_request("ACK", 1)
    rig.caller_request("BYE", 2)
    assert rig.responses()[-1].status == 200
    rig.advance(LINGER_S - 1)
    rig.caller_request("BYE", 3)
    assert rig.responses()[-1].status == 200  # a retransmitted BYE still matches
    rig.advance(2)
    rig.caller_request("BYE", 4)
    assert rig.responses()[-1].status == 481


def test_the_liveness_check_runs_on_the_core_timer(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.call()
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    rig.advance(10)
    assert rig.core.ctx.table.calls  # heartbeats keep the worker alive
    rig.alive = False
    # The worker stops heartbeating: its call ends at the first check past its expiry.
    rig.advance(rig.settings.media.expiry_ms / 1000 + LIVENESS_CHECK_S)
    assert rig.requests("BYE", CALLER)
    assert not rig.core.ctx.table.calls


def test_caller_cancel_reaches_the_ringing_callee(tmp_path: Path) -> None:
    """A direct call to 2001 that the caller CANCELs while 2001 rings: 2001 gets a CANCEL
    too (before, its phone rang on: the call ended without its outbound leg)."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite("").replace(b"*99", b"2001"))
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1", ring_only=True)
    assert call.phase is CallPhase.TRANSFERRING
    rig.cancel_call()
    assert 487 in rig.statuses()
    cancels = rig.requests("CANCEL", MEMBERS["2001"])
    assert len(cancels) == 1 and cancels[0].uri == invite.uri
    assert call.ended


def test_a_bridged_call_ends_both_legs_on_bye(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]))
    call = rig.call()
    rig.caller_request("ACK", 1)
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1")
    assert call.phase is CallPhase.BRIDGED and call.b is not None
    assert rig.requests("ACK", MEMBERS["2001"])
    assert any(isinstance(x, m.MediaBridge) for x in rig.media)
    rig.caller_request("BYE", 2)
    bye = rig.requests("BYE", MEMBERS["2001"])
    assert len(bye) == 1 and call.ended and call.b.phase is LegPhase.TERMINATED


def test_a_second_fork_answer_gets_ack_and_bye(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]))
    rig.call()
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1")
    rig.answer(invite, MEMBERS["2001"], "t2")  # another fork
    acks = [r for r in rig.requests("ACK", MEMBERS["2001"])]
    byes = [r for r in rig.requests("BYE", MEMBERS["2001"])]
    assert {SipRequest.to_tag.fget(a) for a in acks} == {"t1", "t2"}  # type: ignore[attr-defined]
    assert len(byes) == 1 and byes[0].to_tag == "t2"


def test_an_ended_call_is_freed_by_refcounting_once_its_dialogs_stop_lingering(
        tmp_path: Path) -> None:
    """No full collection needed (pbx.app.tune_gc makes them rare): the legs and the
    session let go of the call when its last dialog stops lingering."""
    import gc
    import weakref

    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]))
    call = rig.call()
    rig.caller_request("ACK", 1)
    rig.answer(rig.requests("INVITE", MEMBERS["2001"])[0], MEMBERS["2001"], "t1")
    rig.caller_request("BYE", 2)
    assert call.ended and call.a is not None
    gone = weakref.ref(call)
    del call
    gc.disable()
    try:
        rig.advance(LINGER_S - 1)
        assert gone() is not None  # its dialogs still match retransmissions
        rig.advance(LINGER_S + 2)
        assert gone() is None
    finally:
        gc.enable()


def test_a_callee_silent_after_its_180_leaves_no_transaction(tmp_path: Path) -> None:
    """2001 rings (180) and drops off the network: the caller's CANCEL is passed on and
    never answered, nor is the INVITE. RFC 3261 §9.1: 64*T1 after our CANCEL the INVITE's
    client transaction is given up; nothing of the call stays."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite("").replace(b"*99", b"2001"))
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1", ring_only=True)
    rig.cancel_call()
    assert call.ended and rig.requests("CANCEL", MEMBERS["2001"])
    table_empty(rig)
