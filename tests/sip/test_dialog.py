"""Dialog building (RFC 3261 §12): the dialog a request or response creates, the
requests built from it, and where they go."""

from __future__ import annotations

from pbx.sip.dialog import (
    Dialog,
    LocalAddress,
    ack_2xx,
    forked,
    learn_2xx,
    new_request,
    next_hop,
    uac_for_target,
    uas_from_invite,
)
from pbx.sip.message import SipRequest, make_response, parse_message

ME = LocalAddress("10.0.0.1", 5060)


def invite(extra: str = "") -> SipRequest:
    msg = parse_message((
        "INVITE sip:*99@10.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bK-1\r\n"
        "Record-Route: <sip:p1.example;lr>\r\nRecord-Route: <sip:p2.example;lr>\r\n"
        "From: \"Al\" <sip:1001@10.0.0.9>;tag=aa\r\nTo: <sip:*99@10.0.0.1>\r\n"
        f"Call-ID: cid-1\r\nCSeq: 7 INVITE\r\n{extra}Content-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, SipRequest)
    return msg


def test_uas_dialog_from_an_invite() -> None:
    d = uas_from_invite(invite("Contact: <sip:1001@10.0.0.9:5070>\r\n"), "bb", False)
    assert d.key == ("cid-1", "bb")
    assert d.local_party == "<sip:*99@10.0.0.1>;tag=bb"
    assert d.remote_party == '"Al" <sip:1001@10.0.0.9>;tag=aa' and d.remote_tag == "aa"
    assert d.remote_target == "sip:1001@10.0.0.9:5070"
    assert d.route_set == ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]  # in order (UAS)


def test_uas_dialog_without_contact_targets_the_from_uri() -> None:
    assert uas_from_invite(invite(), "bb", False).remote_target == "sip:1001@10.0.0.9"


def test_requests_in_the_dialog_count_cseq_and_carry_the_route_set() -> None:
    d = uas_from_invite(invite("Contact: <sip:1001@10.0.0.9:5070>\r\n"), "bb", True)
    bye = new_request(d, ME, "BYE", [("Reason", "SIP;cause=200")])
    update = new_request(d, ME, "UPDATE", body=b"v=0\r\n")
    assert bye.cseq == (1, "BYE") and update.cseq == (2, "UPDATE")
    assert bye.uri == "sip:1001@10.0.0.9:5070"
    assert bye.headers.get("From") == d.local_party and bye.headers.get("To") == d.remote_party
    assert bye.headers.get_all("Route") == d.route_set
    assert (bye.headers.get("Via") or "").startswith("SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bK")
    assert bye.headers.get("Contact") == "<sip:pbx@10.0.0.1:5060;transport=tcp>"
    assert update.headers.get("Content-Type") == "application/sdp"


def test_a_2xx_makes_the_uac_dialog_with_the_route_set_reversed() -> None:
    d = uac_for_target("cid-2", "cc", "<sip:1001@10.0.0.1>", "sip:2001@10.0.0.5", False)
    req = new_request(d, ME, "INVITE")
    ok = make_response(req, 200, to_tag="dd", headers=[
        ("Record-Route", "<sip:p1.example;lr>"), ("Record-Route", "<sip:p2.example;lr>"),
        ("Contact", "<sip:2001@10.0.0.6:5080>")])
    learn_2xx(d, ok)
    assert d.remote_tag == "dd" and d.remote_target == "sip:2001@10.0.0.6:5080"
    assert d.route_set == ["<sip:p2.example;lr>", "<sip:p1.example;lr>"]
    ack = ack_2xx(d, ME, req.cseq[0])
    assert ack.cseq == (1, "ACK") and ack.uri == "sip:2001@10.0.0.6:5080"
    assert ack.headers.get("To") == ok.headers.get("To")
    assert next_hop(d, ("0.0.0.0", 0)) == ("0.0.0.0", 0)  # p2.example: a name, no DNS here


def test_a_second_fork_gets_a_dialog_of_its_own() -> None:
    d = uac_for_target("cid-2", "cc", "<sip:1001@10.0.0.1>", "sip:2001@10.0.0.5", False)
    req = new_request(d, ME, "INVITE")
    learn_2xx(d, make_response(req, 200, to_tag="dd"))
    other = forked(d, make_response(req, 200, to_tag="ee", headers=[
        ("Contact", "<sip:2001@10.0.0.7>")]))
    assert other.remote_tag == "ee" and other.remote_target == "sip:2001@10.0.0.7"
    assert d.remote_tag == "dd" and other.key == d.key


def test_next_hop_is_the_first_route_else_the_target() -> None:
    d = Dialog(call_id="c", local_tag="t", remote_target="sip:2001@10.0.0.6:5080")
    assert next_hop(d, ("9.9.9.9", 1)) == ("10.0.0.6", 5080)
    d.route_set = ["<sip:10.0.0.2;lr>"]
    assert next_hop(d, ("9.9.9.9", 1)) == ("10.0.0.2", 5060)
    d.route_set = ["<not a uri"]
    assert next_hop(d, ("9.9.9.9", 1)) == ("9.9.9.9", 1)


def test_a_dialog_survives_its_dict_form() -> None:
    d = uas_from_invite(invite("Contact: <sip:1001@10.0.0.9:5070>\r\n"), "bb", True)
    new_request(d, ME, "BYE")
    assert Dialog.from_dict(d.to_dict()) == d
