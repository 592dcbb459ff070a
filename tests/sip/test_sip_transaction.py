"""Transaction layer (RFC 3261 §17) on a virtual clock: no sockets, no sleeps."""

from __future__ import annotations

import time

import pytest

from pbx.sip.budget import SourceBudget
from pbx.sip.errors import SipError
from pbx.sip.message import (
    SipRequest,
    SipResponse,
    make_cancel,
    make_response,
    parse_message,
)
from pbx.sip.retransmit import AckTimeout, Uas2xxRetransmitter
from pbx.sip.transaction import (
    T1,
    T2,
    T4,
    RequestReceived,
    ResponseReceived,
    SendBytes,
    TransactionKey,
    TransactionLayer,
    TransactionTimeout,
    TryingDue,
    TxState,
)

PEER = ("192.0.2.1", 5060)


def request(method: str = "INVITE", branch: str = "z9hG4bK1", cseq: int = 1,
            to_tag: str | None = None, call_id: str = "call-1") -> SipRequest:
    to = "<sip:bob@pbx>" + (f";tag={to_tag}" if to_tag else "")
    cseq_method = method
    data = (
        f"{method} sip:bob@pbx SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch};rport\r\n"
        f"Max-Forwards: 70\r\nTo: {to}\r\nFrom: <sip:alice@a>;tag=ft\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {cseq_method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(data)
    assert isinstance(msg, SipRequest)
    return msg


def reply(req: SipRequest, status: int, to_tag: str | None = "tt") -> SipResponse:
    return make_response(req, status, to_tag=to_tag if status > 100 else None)


def sends(events: list) -> list[SendBytes]:
    return [e for e in events if isinstance(e, SendBytes)]


def run_until(layer: TransactionLayer, end: float) -> list[tuple[float, object]]:
    """Fire every timer up to `end`, returning (time, event) pairs."""
    out: list[tuple[float, object]] = []
    while (t := layer.get_timer()) is not None and t <= end:
        out.extend((t, e) for e in layer.handle_timer(t))
    return out


# ------------------------------------------------------------------ INVITE server


def test_invite_server_sends_trying_and_absorbs_retransmission() -> None:
    layer = TransactionLayer()
    inv = request()
    events = layer.receive(inv, PEER, 0.0)
    rr, due = events
    assert isinstance(rr, RequestReceived) and isinstance(due, TryingDue)
    assert rr.request is inv and rr.key.method == "INVITE" and rr.addr == PEER
    assert layer.receive(request(), PEER, 0.1) == []  # nothing sent yet to re-send
    # the TU handled it without answering: the 100 goes out now
    (trying,) = layer.trying(due.key)
    assert trying.data.startswith(b"SIP/2.0 100 Trying") and trying.addr == PEER
    assert layer.trying(due.key) == []  # once
    # retransmission: absorbed, the 100 re-sent
    again = layer.receive(request(), PEER, 0.3)
    assert [type(e) for e in again] == [SendBytes]
    assert again[0].data == trying.data
    # a 180 replaces the stored provisional
    out = layer.respond(rr.key, reply(inv, 180), 0.4)
    assert out[0].data.startswith(b"SIP/2.0 180 Ringing")
    assert layer.receive(request(), PEER, 0.5)[0].data == out[0].data


@pytest.mark.parametrize("status", [180, 200, 486])
def test_invite_server_answered_at_once_sends_no_trying(status: int) -> None:
    """RFC 3261 §17.2.1: the 100 is only for a TU that has not answered yet."""
    layer = TransactionLayer()
    inv = request()
    rr, due = layer.receive(inv, PEER, 0.0)
    assert isinstance(rr, RequestReceived) and isinstance(due, TryingDue)
    (answer,) = layer.respond(rr.key, reply(inv, status), 0.0)
    assert layer.trying(due.key) == []
    assert answer.data.startswith(b"SIP/2.0 %d" % status)


def test_invite_server_without_auto_trying() -> None:
    layer = TransactionLayer(send_trying=False)
    events = layer.receive(request(), PEER, 0.0)
    assert [type(e) for e in events] == [RequestReceived]
    assert layer.receive(request(), PEER, 0.1) == []


def test_invite_server_non2xx_timer_g_h() -> None:
    layer = TransactionLayer()
    inv = request()
    key = layer.receive(inv, PEER, 0.0)[-1].key
    final = layer.respond(key, reply(inv, 486), 10.0)
    assert final[0].data.startswith(b"SIP/2.0 486")
    assert layer.state_of(key) is TxState.COMPLETED
    assert layer.get_timer() == 10.0 + T1
    fired = run_until(layer, 100.0)
    times = [t for t, e in fired if isinstance(e, SendBytes)]
    # Timer G: T1, 2T1, 4T1, then capped at T2, until Timer H (64*T1) gives up
    assert times == [10.5, 11.5, 13.5, 17.5, 21.5, 25.5, 29.5, 33.5, 37.5, 41.5]
    assert all(e.data == final[0].data for _, e in fired)
    assert layer.get_timer() is None and len(layer) == 0


def test_invite_server_ack_stops_g_then_timer_i() -> None:
    layer = TransactionLayer()
    inv = request()
    key = layer.receive(inv, PEER, 0.0)[-1].key
    final = layer.respond(key, reply(inv, 404), 0.0)
    assert sends(layer.handle_timer(0.5))[0].data == final[0].data
    # a retransmitted INVITE gets the final again
    assert layer.receive(request(), PEER, 0.7)[0].data == final[0].data
    ack = request("ACK", to_tag="tt")
    assert layer.receive(ack, PEER, 1.0) == []  # absorbed, not for the TU
    assert layer.state_of(key) is TxState.CONFIRMED
    assert layer.get_timer() == 1.0 + T4
    assert layer.receive(ack, PEER, 2.0) == []
    assert layer.handle_timer(5.9) == []
    assert len(layer) == 1
    assert layer.handle_timer(6.0) == []
    assert len(layer) == 0 and layer.get_timer() is None


def test_invite_server_2xx_and_ack_goes_to_tu() -> None:
    layer = TransactionLayer()
    inv = request()
    key = layer.receive(inv, PEER, 0.0)[-1].key
    ok = layer.respond(key, reply(inv, 200), 1.0)
    assert ok[0].data.startswith(b"SIP/2.0 200 OK")
    # RFC 6026 Accepted: INVITE retransmissions absorbed (the TU retransmits the 2xx)
    assert layer.receive(request(), PEER, 1.2) == []
    # ACK for the 2xx has its own branch and reaches the TU
    ack = request("ACK", branch="z9hG4bKack", to_tag="tt")
    (ev,) = layer.receive(ack, PEER, 1.3)
    assert isinstance(ev, RequestReceived) and ev.request is ack
    assert ev.key == TransactionKey("z9hG4bKack", "ACK", "192.0.2.1:5060")
    # a late final after the 2xx is ignored
    assert layer.respond(key, reply(inv, 487), 1.4) == []
    assert layer.get_timer() == 1.0 + 64 * T1
    run_until(layer, 100.0)
    assert len(layer) == 0


def test_ack_with_invite_branch_after_2xx_goes_to_tu() -> None:
    layer = TransactionLayer()
    inv = request()
    key = layer.receive(inv, PEER, 0.0)[-1].key
    layer.respond(key, reply(inv, 200), 0.0)
    (ev,) = layer.receive(request("ACK", to_tag="tt"), PEER, 0.1)
    assert isinstance(ev, RequestReceived) and ev.key.method == "ACK"


def test_reliable_invite_server_no_timer_g_and_zero_i() -> None:
    layer = TransactionLayer()
    inv = request()
    key = layer.receive(inv, PEER, 0.0, reliable=True)[-1].key
    layer.respond(key, reply(inv, 486), 0.0)
    assert layer.get_timer() == 64 * T1  # only Timer H
    layer.receive(request("ACK", to_tag="tt"), PEER, 0.1, reliable=True)
    assert layer.get_timer() == 0.1  # Timer I = 0
    layer.handle_timer(0.1)
    assert len(layer) == 0


def test_cancel_is_its_own_transaction() -> None:
    layer = TransactionLayer()
    inv = request()
    inv_key = layer.receive(inv, PEER, 0.0)[-1].key
    cancel = make_cancel(inv)
    (ev,) = layer.receive(cancel, PEER, 1.0)
    assert isinstance(ev, RequestReceived) and ev.key.method == "CANCEL"
    assert ev.key != inv_key
    assert layer.find_invite_server(cancel) == inv_key
    layer.respond(ev.key, reply(cancel, 200), 1.0)
    out = layer.respond(inv_key, reply(inv, 487), 1.0)
    assert out[0].data.startswith(b"SIP/2.0 487")
    other = make_cancel(request(branch="z9hG4bKother"))
    assert layer.find_invite_server(other) is None


# ------------------------------------------------------------------ non-INVITE server


def test_non_invite_server_trying_proceeding_completed_timer_j() -> None:
    layer = TransactionLayer()
    opt = request("OPTIONS")
    events = layer.receive(opt, PEER, 0.0)
    assert [type(e) for e in events] == [RequestReceived]
    key = events[0].key
    assert layer.state_of(key) is TxState.TRYING
    assert layer.receive(request("OPTIONS"), PEER, 0.1) == []  # Trying: absorbed silently
    prov = layer.respond(key, reply(opt, 183), 0.2)
    assert layer.receive(request("OPTIONS"), PEER, 0.3) == prov
    final = layer.respond(key, reply(opt, 200), 0.4)
    assert layer.state_of(key) is TxState.COMPLETED
    assert layer.receive(request("OPTIONS"), PEER, 0.5) == final
    assert layer.get_timer() == pytest.approx(0.4 + 64 * T1)
    assert layer.handle_timer(0.4 + 64 * T1) == []
    assert len(layer) == 0
    # after Timer J the same request is a new transaction
    assert isinstance(layer.receive(request("OPTIONS"), PEER, 40.0)[0], RequestReceived)


def test_respond_unknown_key_is_noop() -> None:
    layer = TransactionLayer()
    assert layer.respond(TransactionKey("z9hG4bKx", "BYE", "h"), reply(request("BYE"), 200),
                         0.0) == []


def test_rfc2543_request_matching() -> None:
    layer = TransactionLayer()
    inv = request(branch="oldstyle")
    key = layer.receive(inv, PEER, 0.0)[-1].key
    layer.trying(key)
    assert layer.receive(request(branch="oldstyle"), PEER, 0.1)[0].data.startswith(
        b"SIP/2.0 100")
    layer.respond(key, reply(inv, 486), 0.2)
    assert layer.receive(request("ACK", branch="oldstyle", to_tag="tt"), PEER, 0.3) == []
    assert layer.state_of(key) is TxState.CONFIRMED


# ------------------------------------------------------------------ INVITE client


def test_invite_client_timer_a_b() -> None:
    layer = TransactionLayer()
    inv = request(branch="z9hG4bKc1")
    key, out = layer.send_request(inv, PEER, 0.0)
    assert key.client and out == [SendBytes(inv.serialize(), PEER)]
    fired = run_until(layer, 100.0)
    resend_times = [t for t, e in fired if isinstance(e, SendBytes)]
    assert resend_times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # A doubles without cap
    assert fired[-1] == (32.0, TransactionTimeout(key))  # Timer B = 64*T1
    assert len(layer) == 0


def test_invite_client_provisional_stops_a_and_b() -> None:
    layer = TransactionLayer()
    inv = request(branch="z9hG4bKc2")
    key, _ = layer.send_request(inv, PEER, 0.0)
    (ev,) = layer.receive(reply(inv, 180), PEER, 0.2)
    assert isinstance(ev, ResponseReceived) and ev.key == key
    assert layer.state_of(key) is TxState.PROCEEDING
    assert layer.get_timer() is None
    assert len(layer.receive(reply(inv, 180), PEER, 0.3)) == 1  # 1xx all go up (§17.1.1.2)


def test_invite_client_abandoned_in_proceeding_ends_an_accepted_one_does_not() -> None:
    """`abandon`: the TU gave up on a final response (64*T1 after its CANCEL, §9.1);
    Proceeding has no timer of its own, so the transaction ends there; after a 2xx
    (Accepted) Timer M still absorbs the retransmissions."""
    layer = TransactionLayer()
    ringing, answered = request(branch="z9hG4bKab1"), request(branch="z9hG4bKab2")
    ringing_key, _ = layer.send_request(ringing, PEER, 0.0)
    answered_key, _ = layer.send_request(answered, PEER, 0.0)
    layer.receive(reply(ringing, 180), PEER, 0.1)
    layer.receive(reply(answered, 200), PEER, 0.1)
    layer.abandon(ringing_key)
    layer.abandon(answered_key)
    assert layer.state_of(ringing_key) is None and len(layer) == 1
    assert layer.state_of(answered_key) is TxState.ACCEPTED


def test_invite_client_non2xx_acks_and_absorbs() -> None:
    layer = TransactionLayer()
    inv = request(branch="z9hG4bKc3")
    key, _ = layer.send_request(inv, PEER, 0.0)
    busy = reply(inv, 486, to_tag="busy")
    events = layer.receive(busy, PEER, 1.0)
    ack_send, resp = events
    assert isinstance(ack_send, SendBytes) and isinstance(resp, ResponseReceived)
    ack = parse_message(ack_send.data)
    assert isinstance(ack, SipRequest) and ack.method == "ACK" and ack.uri == inv.uri
    assert ack.cseq == (1, "ACK") and ack.branch == inv.branch
    assert ack.to_tag == "busy" and ack.from_tag == inv.from_tag and ack.call_id == inv.call_id
    assert ack_send.addr == PEER
    # retransmitted 486: ACK again, nothing for the TU
    assert layer.receive(busy, PEER, 2.0) == [ack_send]
    assert layer.get_timer() == 1.0 + 32.0  # Timer D
    run_until(layer, 40.0)
    assert len(layer) == 0


def test_invite_client_2xx_retransmissions_reach_tu() -> None:
    layer = TransactionLayer()
    inv = request(branch="z9hG4bKc4")
    key, _ = layer.send_request(inv, PEER, 0.0)
    ok = reply(inv, 200)
    assert layer.receive(ok, PEER, 0.1) == [ResponseReceived(ok, key)]
    assert layer.receive(ok, PEER, 0.6) == [ResponseReceived(ok, key)]
    assert layer.receive(reply(inv, 500), PEER, 0.7) == []
    assert layer.get_timer() == pytest.approx(0.1 + 64 * T1)  # Timer M
    run_until(layer, 100.0)
    assert len(layer) == 0
    assert layer.receive(ok, PEER, 100.0) == []  # stray: discarded


def test_reliable_invite_client_no_timer_a() -> None:
    layer = TransactionLayer()
    inv = request(branch="z9hG4bKc5")
    key, _ = layer.send_request(inv, PEER, 0.0, reliable=True)
    assert layer.get_timer() == 64 * T1
    events = layer.receive(reply(inv, 404), PEER, 1.0)
    assert len(events) == 2 and len(layer) == 0  # Timer D = 0


def test_send_request_errors() -> None:
    layer = TransactionLayer()
    with pytest.raises(SipError):
        layer.send_request(request("ACK"), PEER, 0.0)
    layer.send_request(request("BYE", branch="z9hG4bKdup"), PEER, 0.0)
    with pytest.raises(SipError):
        layer.send_request(request("BYE", branch="z9hG4bKdup"), PEER, 0.0)


def test_send_stateless() -> None:
    ack = request("ACK", branch="z9hG4bKa", to_tag="x")
    assert TransactionLayer.send_stateless(ack, PEER) == [SendBytes(ack.serialize(), PEER)]


# ------------------------------------------------------------------ non-INVITE client


def test_non_invite_client_timer_e_f() -> None:
    layer = TransactionLayer()
    bye = request("BYE", branch="z9hG4bKn1")
    key, _ = layer.send_request(bye, PEER, 0.0)
    fired = run_until(layer, 100.0)
    times = [t for t, e in fired if isinstance(e, SendBytes)]
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert fired[-1] == (32.0, TransactionTimeout(key))
    assert len(layer) == 0


def test_non_invite_client_proceeding_retransmits_every_t2_then_k() -> None:
    layer = TransactionLayer()
    bye = request("BYE", branch="z9hG4bKn2")
    key, _ = layer.send_request(bye, PEER, 0.0)
    assert layer.receive(reply(bye, 100), PEER, 0.2) == [ResponseReceived(reply(bye, 100), key)]
    assert sends(layer.handle_timer(0.5))  # E fires, now at T2 intervals
    assert layer.get_timer() == 0.5 + T2
    ok = reply(bye, 200)
    assert layer.receive(ok, PEER, 1.0) == [ResponseReceived(ok, key)]
    assert layer.receive(ok, PEER, 1.1) == []  # absorbed in Completed
    assert layer.get_timer() == 1.0 + T4  # Timer K
    assert layer.handle_timer(6.0) == []
    assert len(layer) == 0


def test_response_without_transaction_dropped() -> None:
    layer = TransactionLayer()
    assert layer.receive(reply(request("BYE", branch="z9hG4bKnone"), 200), PEER, 0.0) == []


# ------------------------------------------------------------------ no leak


def test_thousand_transactions_table_empties() -> None:
    layer = TransactionLayer(budget=SourceBudget(max_transactions=10_000))
    now = 0.0
    for i in range(1000):
        now += 0.01
        kind = i % 4
        if kind == 0:  # INVITE server, rejected and ACKed
            inv = request(branch=f"z9hG4bKs{i}", call_id=f"c{i}")
            key = layer.receive(inv, PEER, now)[-1].key
            layer.respond(key, reply(inv, 486), now)
            layer.receive(request("ACK", branch=f"z9hG4bKs{i}", call_id=f"c{i}", to_tag="tt"),
                          PEER, now)
        elif kind == 1:  # non-INVITE server
            opt = request("OPTIONS", branch=f"z9hG4bKo{i}", call_id=f"c{i}")
            key = layer.receive(opt, PEER, now)[-1].key
            layer.respond(key, reply(opt, 200), now)
        elif kind == 2:  # INVITE client answered
            inv = request(branch=f"z9hG4bKc{i}", call_id=f"c{i}")
            layer.send_request(inv, PEER, now)
            layer.receive(reply(inv, 200), PEER, now)
        else:  # non-INVITE client that never gets an answer
            layer.send_request(request("BYE", branch=f"z9hG4bKb{i}", call_id=f"c{i}"), PEER, now)
    assert len(layer) == 1000
    fired = run_until(layer, now + 100.0)
    assert len(layer) == 0 and layer.get_timer() is None
    assert sum(isinstance(e, TransactionTimeout) for _, e in fired) == 250
    assert layer._heap == []


# ------------------------------------------------------------------ 2xx retransmitter


def test_uas_2xx_retransmitter_schedule_and_timeout() -> None:
    r = Uas2xxRetransmitter()
    r.start("d1", b"200", PEER, 0.0)
    out: list[tuple[float, object]] = []
    while (t := r.get_timer()) is not None:
        out.extend((t, e) for e in r.handle_timer(t))
    times = [t for t, e in out if isinstance(e, SendBytes)]
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert out[-1] == (64 * T1, AckTimeout("d1"))
    assert all(e == SendBytes(b"200", PEER) for _, e in out[:-1])
    assert len(r) == 0


def test_uas_2xx_retransmitter_ack_stops() -> None:
    r = Uas2xxRetransmitter()
    r.start("d1", b"a", PEER, 0.0)
    r.start("d2", b"b", PEER, 0.25)
    assert r.get_timer() == 0.5
    assert r.handle_timer(0.5) == [SendBytes(b"a", PEER)]
    assert r.get_timer() == 0.75
    assert r.ack("d1") is True and r.ack("d1") is False
    assert r.handle_timer(0.75) == [SendBytes(b"b", PEER)]
    assert r.get_timer() == 0.75 + 2 * T1
    assert r.ack("d2") and r.get_timer() is None
    assert min(2 * 2 * 2 * T1, T2) == T2


def test_uas_2xx_retransmitter_restart_replaces_the_pending_2xx() -> None:
    """A re-INVITE's 2xx replaces the dialog's pending one: only the new one is sent."""
    r = Uas2xxRetransmitter()
    r.start("d1", b"old", PEER, 0.0)
    r.start("d1", b"new", PEER, 0.2)
    assert len(r) == 1 and r.get_timer() == 0.7
    assert r.handle_timer(0.7) == [SendBytes(b"new", PEER)]
    assert r.handle_timer(0.2 + 64 * T1) == [AckTimeout("d1")] and r.get_timer() is None


def test_uas_2xx_retransmitter_cost_does_not_grow_with_pending_2xx() -> None:
    """The front asks for the next deadline after every message, and a flood keeps many
    2xx pending (one per call in set-up, from every source): the next deadline and each
    2xx due must not cost a scan of all of them. Costs are compared in the same run."""

    def cost(pending: int) -> float:
        best = float("inf")
        for _ in range(5):
            r = Uas2xxRetransmitter()
            for i in range(pending):
                r.start(f"d{i}", b"200", PEER, i * 1e-6)  # each due on its own
            started = time.perf_counter()
            for _ in range(500):  # fewer than the 2xx due: each time one is
                deadline = r.get_timer()
                assert deadline is not None and len(r.handle_timer(deadline)) == 1
            best = min(best, time.perf_counter() - started)
        return best

    few, many = cost(100), cost(10_000)
    assert many < 10 * few, (few, many)  # a scan would cost ~100 times more


# ------------------------------------------------------------------ reliable transports


def test_reliable_sends_are_marked_for_the_stream() -> None:
    """Everything a transaction on a reliable transport sends goes back on the stream
    (RFC 3261 §18.2.2: responses on the connection the request came on)."""
    layer = TransactionLayer()
    inv = request(branch="z9hG4bKr1")
    events = layer.receive(inv, PEER, 0.0, reliable=True)
    key = events[-1].key
    assert [e.reliable for e in layer.trying(key)] == [True]  # 100 Trying
    assert [e.reliable for e in layer.respond(key, reply(inv, 486), 0.0)] == [True]
    bye = request("BYE", branch="z9hG4bKr2")
    _, out = layer.send_request(bye, PEER, 0.0, reliable=True)
    assert [e.reliable for e in out] == [True]
    assert layer.handle_timer(10.0) == []  # no Timer E retransmission
    inv2 = request(branch="z9hG4bKr3")
    layer.send_request(inv2, PEER, 0.0, reliable=True)
    (ack, _) = layer.receive(reply(inv2, 404), PEER, 0.1)
    assert isinstance(ack, SendBytes) and ack.reliable
    ack2 = request("ACK", branch="z9hG4bKa2", to_tag="x")
    assert TransactionLayer.send_stateless(ack2, PEER, reliable=True)[0].reliable
    # an unreliable transaction's sends are not marked
    unreliable = layer.receive(request(branch="z9hG4bKu"), PEER, 0.0)[-1].key
    assert not layer.trying(unreliable)[0].reliable


# ---------------------------------------------------------------- per-source budgets


def test_a_source_over_its_transaction_budget_gets_a_stateless_503() -> None:
    layer = TransactionLayer(budget=SourceBudget(max_transactions=3, retry_after_s=7))
    for i in range(3):
        events = layer.receive(request("OPTIONS", branch=f"z9hG4bKo{i}"), PEER, 0.0, size=300)
        assert isinstance(events[-1], RequestReceived)
    assert layer.sources.held_by(PEER[0]) == (3, 900)
    events = layer.receive(request("INVITE", branch="z9hG4bKx"), PEER, 0.0, size=300)
    assert len(events) == 1 and isinstance(events[0], SendBytes)
    busy = parse_message(events[0].data)
    assert isinstance(busy, SipResponse) and busy.status == 503
    assert busy.headers.get("Retry-After") == "7"
    assert len(layer) == 3 and layer.sources.refused == 1 and layer.get_timer() is None
    # the overload answer is stateless: a retransmission gets the same, nothing is kept
    assert layer.receive(request("INVITE", branch="z9hG4bKx"), PEER, 0.1, size=300)
    assert len(layer) == 3
    # an ACK keeps no state: it still reaches the TU (it may end a call's set-up)
    assert isinstance(layer.receive(request("ACK", branch="z9hG4bKy"), PEER, 0.1)[-1],
                      RequestReceived)
    # another source is not affected
    other = ("192.0.2.2", 5060)
    assert isinstance(layer.receive(request("OPTIONS", branch="z9hG4bKz"), other, 0.1)[-1],
                      RequestReceived)


def test_a_source_budget_frees_when_its_transactions_end() -> None:
    layer = TransactionLayer(budget=SourceBudget(max_transactions=2))
    keys = []
    for i in range(2):
        opt = request("OPTIONS", branch=f"z9hG4bKo{i}")
        keys.append(layer.receive(opt, PEER, 0.0, size=200)[-1].key)
        layer.respond(keys[-1], reply(opt, 200), 0.0)
    assert layer.sources.held_by(PEER[0])[0] == 2
    run_until(layer, 64 * 0.5 + 1)  # Timer J
    assert layer.sources.held_by(PEER[0]) == (0, 0) and len(layer) == 0
    assert isinstance(layer.receive(request("OPTIONS", branch="z9hG4bKn"), PEER, 40.0)[-1],
                      RequestReceived)


def test_a_source_byte_budget_counts_requests_and_responses() -> None:
    layer = TransactionLayer(budget=SourceBudget(max_transactions=100, max_bytes=10_000))
    opt = request("OPTIONS", branch="z9hG4bKbig")
    key = layer.receive(opt, PEER, 0.0, size=9_000)[-1].key
    layer.respond(key, reply(opt, 200), 0.0)
    held = layer.sources.held_by(PEER[0])
    assert held[0] == 1 and held[1] > 9_000
    events = layer.receive(request("OPTIONS", branch="z9hG4bKmore"), PEER, 0.0, size=2_000)
    assert len(events) == 1 and isinstance(events[0], SendBytes)


def test_exempt_sources_are_not_counted() -> None:
    layer = TransactionLayer(budget=SourceBudget(max_transactions=1, exempt={PEER[0]}))
    for i in range(5):
        assert isinstance(layer.receive(request("OPTIONS", branch=f"z9hG4bKe{i}"), PEER,
                                        0.0)[-1], RequestReceived)
    assert layer.sources.held_by(PEER[0]) == (0, 0)


def test_get_timer_checks_an_unchanged_top_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell asks for the deadline after every input: while no transaction's timers
    change, the heap's top is not checked again (issue 9: that check was half of the
    call core's get_timer); a change is seen at once (a 1xx to our INVITE stops
    Timers A and B, an ACK moves the server transaction from G/H to I)."""
    import pbx.sip.transaction as transaction

    checks: list[object] = []
    for cls in (transaction._ServerTransaction, transaction._ClientTransaction):
        original = cls.next_deadline

        def counted(txn: object, original: object = original) -> float | None:
            checks.append(txn)
            return original(txn)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(cls, "next_deadline", counted)
    layer = TransactionLayer()
    inv = request()
    key = layer.receive(inv, PEER, 0.0)[-1].key
    layer.respond(key, reply(inv, 404), 0.0)
    checks.clear()
    assert [layer.get_timer() for _ in range(50)] == [T1] * 50
    assert len(checks) == 1
    layer.receive(request("ACK", to_tag="tt"), PEER, 0.2)  # G and H stop, I starts
    assert layer.get_timer() == 0.2 + T4
    ours = request("INVITE", branch="z9hG4bKout", call_id="call-2")
    client_key, _ = layer.send_request(ours, PEER, 0.3)
    assert layer.get_timer() == 0.3 + T1  # Timer A
    layer.receive(reply(ours, 180), PEER, 0.4)  # A and B stop; C is the TU's
    assert layer.get_timer() == 0.2 + T4
    assert layer.state_of(client_key) is TxState.PROCEEDING
