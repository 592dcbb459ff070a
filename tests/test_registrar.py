"""Registrar (pbx.registrar): REGISTER flow with digest auth on a virtual clock."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pbx.config import UserSettings
from pbx.registrar import Registrar
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.digest import client_authorization, parse_challenge
from pbx.sip.message import SipRequest, SipResponse, parse_message
from pbx.sip.uri import parse_name_addr

REALM = "pbx.test"
SRC = ("203.0.113.7", 40123)


def make_registrar(**kw: Any) -> Registrar:
    users = {
        "1001": UserSettings(password="secret1"),
        "1002": UserSettings(password="secret2"),
        "1003": UserSettings(password="secret3", contact="sip:1003@10.0.0.3:5062"),
        "2001": UserSettings(contact="sip:2001@10.0.0.9:5060"),  # static only, no password
    }
    return Registrar(users, DigestAuthenticator(REALM, b"k" * 32), **kw)


class Phone:
    """A UA sending REGISTERs with one Call-ID and increasing CSeq (RFC 3261 §10.2)."""

    def __init__(self, user: str, password: str, call_id: str = "reg-1@phone",
                 aor: str | None = None) -> None:
        self.user, self.password, self.call_id = user, password, call_id
        self.aor = aor or user
        self.cseq = 0
        self.challenge: str | None = None
        # A real UA reuses a nonce with the next nonce count (RFC 7616 §3.4).
        self._counted_challenge: str | None = None
        self.nc = 0

    def request(self, contacts: list[str] | None = None, expires: int | None = None,
                *, auth: bool = True, extra: str = "", cseq: int | None = None) -> SipRequest:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        lines = [
            f"REGISTER sip:{REALM} SIP/2.0",
            "Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK" + f"{cseq}x{self.call_id}",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{REALM}>;tag=ft",
            f"To: <sip:{self.aor}@{REALM}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} REGISTER",
        ]
        lines += [f"Contact: {c}" for c in contacts or []]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if auth and self.challenge is not None:
            if self.challenge != self._counted_challenge:
                self._counted_challenge, self.nc = self.challenge, 0
            self.nc += 1
            value = client_authorization(challenge=self.challenge, username=self.user,
                                         password=self.password, method="REGISTER",
                                         uri=f"sip:{REALM}", cnonce="cn", nc=self.nc)
            lines.append(f"Authorization: {value}")
        if extra:
            lines.append(extra)
        msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
        assert isinstance(msg, SipRequest)
        return msg

    def register(self, reg: Registrar, now: float, contacts: list[str] | None = None,
                 expires: int | None = None, **kw: object) -> SipResponse:
        """Send with the cached challenge; on 401 take the new challenge and retry once."""
        resp = reg.handle_register(self.request(contacts, expires, **kw), SRC, now)  # type: ignore[arg-type]
        if resp.status == 401:
            self.challenge = resp.headers.get("WWW-Authenticate")
            resp = reg.handle_register(self.request(contacts, expires, **kw), SRC, now)  # type: ignore[arg-type]
        return resp


def contacts_of(resp: SipResponse) -> dict[str, int]:
    out = {}
    for value in resp.headers.get_all("Contact"):
        addr = parse_name_addr(value)
        out[str(addr.uri)] = int(addr.params["expires"] or -1)
    return out


# --------------------------------------------------------------------------- auth flow


def test_401_then_authenticated_register_then_200_with_contact() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    first = reg.handle_register(phone.request(["<sip:1001@192.168.1.20:5060>"]), SRC, 0.0)
    assert first.status == 401
    challenges = first.headers.get_all("WWW-Authenticate")
    assert [parse_challenge(c).algorithm for c in challenges] == ["SHA-256", "MD5"]
    assert first.to_tag is not None
    assert reg.lookup("1001", 0.0) == []

    phone.challenge = challenges[0]
    ok = reg.handle_register(phone.request(["<sip:1001@192.168.1.20:5060>"]), SRC, 1.0)
    assert ok.status == 200
    assert contacts_of(ok) == {"sip:1001@192.168.1.20:5060": 3600}
    [binding] = reg.lookup("1001", 1.0)
    assert binding.uri == "sip:1001@192.168.1.20:5060"
    assert binding.source == SRC and binding.transport == "UDP"
    assert binding.expires_at == 3601.0 and not binding.static


def test_refresh_reuses_the_nonce_with_the_next_nonce_count() -> None:
    """A phone may keep its nonce for refreshes (same Call-ID, nc + 1): no new 401."""
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    assert phone.register(reg, 0.0, ["<sip:1001@h>"], 600).status == 200
    for t in (60.0, 120.0):
        resp = reg.handle_register(phone.request(["<sip:1001@h>"], 600), SRC, t)
        assert resp.status == 200, resp.status
    assert phone.nc == 3
    # The same nonce count again is a replay: a fresh challenge with stale=true.
    again = reg.handle_register(phone.request(["<sip:1001@h>"], 600), SRC, 130.0)
    phone.nc -= 2
    replay = reg.handle_register(phone.request(["<sip:1001@h>"], 600), SRC, 140.0)
    assert again.status == 200 and replay.status == 401
    assert parse_challenge(replay.headers.get("WWW-Authenticate") or "").stale
    assert reg.stats["auth_replays"] == 1 and reg.stats["auth_ok"] == 4


def test_md5_challenge_works_too() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    first = reg.handle_register(phone.request(["<sip:1001@h>"]), SRC, 0.0)
    phone.challenge = first.headers.get_all("WWW-Authenticate")[1]
    assert reg.handle_register(phone.request(["<sip:1001@h>"]), SRC, 0.0).status == 200


def test_wrong_password_gets_a_fresh_401_not_403() -> None:
    reg = make_registrar()
    phone = Phone("1001", "wrong")
    resp = phone.register(reg, 0.0, ["<sip:1001@h>"])
    assert resp.status == 401
    assert not parse_challenge(resp.headers.get("WWW-Authenticate") or "").stale
    assert reg.lookup("1001", 0.0) == []


def test_unknown_user_gets_401_like_a_wrong_password() -> None:
    reg = make_registrar()
    assert Phone("9999", "x").register(reg, 0.0, ["<sip:9999@h>"]).status == 401
    # A configured user without a password cannot register either.
    assert Phone("2001", "").register(reg, 0.0, ["<sip:2001@h>"]).status == 401


def test_registering_someone_else_is_forbidden_and_unknown_aor_is_404() -> None:
    reg = make_registrar()
    assert Phone("1001", "secret1", aor="1002").register(reg, 0.0, ["<sip:x@h>"]).status == 403
    assert Phone("1001", "secret1", aor="7777").register(reg, 0.0, ["<sip:x@h>"]).status == 404
    assert reg.lookup("1002", 0.0) == []


def test_stale_nonce_gets_401_stale_true_and_the_retry_succeeds() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    assert phone.register(reg, 0.0, ["<sip:1001@h>"], 600).status == 200
    # The cached challenge is now older than the nonce lifetime (300 s).
    stale = reg.handle_register(phone.request(["<sip:1001@h>"], 600), SRC, 400.0)
    assert stale.status == 401
    assert parse_challenge(stale.headers.get("WWW-Authenticate") or "").stale
    phone.challenge = stale.headers.get("WWW-Authenticate")
    ok = reg.handle_register(phone.request(["<sip:1001@h>"], 600), SRC, 400.0)
    assert ok.status == 200 and contacts_of(ok) == {"sip:1001@h": 600}


def test_auth_clock_is_separate_from_the_binding_clock() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    wall = 1_700_000_000.0
    first = reg.handle_register(phone.request(["<sip:1001@h>"]), SRC, 5.0, auth_now=wall)
    phone.challenge = first.headers.get("WWW-Authenticate")
    ok = reg.handle_register(phone.request(["<sip:1001@h>"]), SRC, 6.0, auth_now=wall + 1)
    assert ok.status == 200
    assert reg.get_timer() == 3606.0


def test_malformed_credentials_400() -> None:
    reg = make_registrar()
    req = Phone("1001", "secret1").request(
        ["<sip:1001@h>"], extra='Authorization: Digest username="1001", realm="unterminated')
    assert reg.handle_register(req, SRC, 0.0).status == 400


def test_require_unsupported_extension_420() -> None:
    reg = make_registrar()
    resp = reg.handle_register(Phone("1001", "s").request(extra="Require: gruu"), SRC, 0.0)
    assert resp.status == 420 and resp.headers.get("Unsupported") == "gruu"


# --------------------------------------------------------------------------- bindings


def test_several_contacts_per_aor_and_per_contact_expires() -> None:
    reg = make_registrar()
    desk = Phone("1001", "secret1", call_id="desk")
    soft = Phone("1001", "secret1", call_id="soft")
    assert desk.register(reg, 0.0, ["<sip:1001@10.1.1.1>;expires=120",
                                     "<sip:1001@10.1.1.2>"], 300).status == 200
    resp = soft.register(reg, 10.0, ["<sip:1001@10.1.1.3>;q=0.5"], 900)
    assert resp.status == 200
    assert contacts_of(resp) == {"sip:1001@10.1.1.1": 110, "sip:1001@10.1.1.2": 290,
                                 "sip:1001@10.1.1.3": 900}
    # Equal q and registration time: the order of the request.
    assert [b.uri for b in reg.lookup("1001", 10.0)] == [
        "sip:1001@10.1.1.1", "sip:1001@10.1.1.2", "sip:1001@10.1.1.3"]


def test_an_aor_keeps_at_most_max_bindings_the_newest() -> None:
    """Every call to an AOR forks a leg (a media port) per binding: one user registering
    600 contacts made each call to it take every port of a worker. The newest
    MAX_BINDINGS_PER_AOR stay; a REGISTER naming more than that is refused."""
    from pbx.registrar import MAX_BINDINGS_PER_AOR

    reg = make_registrar()
    phone = Phone("1001", "secret1")
    for k in range(MAX_BINDINGS_PER_AOR + 5):
        assert phone.register(reg, float(k), [f"<sip:1001@10.1.2.{k}>"], 600).status == 200
    kept = {b.uri for b in reg.lookup("1001", 20.0)}
    assert kept == {f"sip:1001@10.1.2.{k}" for k in range(5, MAX_BINDINGS_PER_AOR + 5)}
    too_many = [f"<sip:1001@10.1.3.{k}>" for k in range(MAX_BINDINGS_PER_AOR + 1)]
    resp = phone.register(reg, 21.0, too_many, 600)
    assert resp.status == 403 and len(reg.lookup("1001", 21.0)) == MAX_BINDINGS_PER_AOR


def test_expires_capped_at_max_and_default_when_absent() -> None:
    reg = make_registrar(max_expires=1800, default_expires=1200)
    phone = Phone("1001", "secret1")
    assert contacts_of(phone.register(reg, 0.0, ["<sip:1001@a>"])) == {"sip:1001@a": 1200}
    assert contacts_of(phone.register(reg, 0.0, ["<sip:1001@a>"], 100000)) == {
        "sip:1001@a": 1800}


def test_refresh_keeps_one_binding_and_moves_its_expiry() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    phone.register(reg, 0.0, ["<sip:1001@a:5060>"], 120)
    resp = phone.register(reg, 100.0, ["<sip:1001@A:5060>"], 120)  # host compared case-blind
    assert contacts_of(resp) == {"sip:1001@A:5060": 120}
    assert len(reg.lookup("1001", 100.0)) == 1
    assert reg.get_timer() == 220.0
    assert reg.expire(150.0) == []


def test_remove_one_contact_with_expires_zero() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    phone.register(reg, 0.0, ["<sip:1001@a>", "<sip:1001@b>"], 600)
    resp = phone.register(reg, 1.0, ["<sip:1001@a>;expires=0"])
    assert resp.status == 200 and contacts_of(resp) == {"sip:1001@b": 599}
    resp = phone.register(reg, 2.0, ["<sip:1001@b>"], 0)
    assert resp.status == 200 and resp.headers.get("Contact") is None
    assert reg.lookup("1001", 2.0) == [] and reg.aors() == []
    assert reg.get_timer() is None


def test_remove_all_with_star() -> None:
    reg = make_registrar()
    Phone("1001", "secret1", call_id="x").register(reg, 0.0, ["<sip:1001@a>"], 600)
    phone = Phone("1001", "secret1", call_id="y")
    phone.register(reg, 0.0, ["<sip:1001@b>"], 600)
    assert len(reg.lookup("1001", 0.0)) == 2
    resp = phone.register(reg, 5.0, ["*"], 0)
    assert resp.status == 200 and resp.headers.get("Contact") is None
    assert reg.lookup("1001", 5.0) == []


@pytest.mark.parametrize(("contacts", "expires"), [
    (["*"], None),
    (["*"], 60),
    (["*", "<sip:1001@a>"], 0),
])
def test_star_needs_expires_zero_and_no_other_contact(contacts: list[str],
                                                      expires: int | None) -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    phone.register(reg, 0.0, ["<sip:1001@a>"], 600)
    assert phone.register(reg, 1.0, contacts, expires).status == 400
    assert len(reg.lookup("1001", 1.0)) == 1


def test_interval_too_brief_423_changes_nothing() -> None:
    reg = make_registrar(min_expires=60)
    phone = Phone("1001", "secret1")
    resp = phone.register(reg, 0.0, ["<sip:1001@a>", "<sip:1001@b>;expires=30"], 600)
    assert resp.status == 423 and resp.headers.get("Min-Expires") == "60"
    assert reg.lookup("1001", 0.0) == []
    assert phone.register(reg, 0.0, ["<sip:1001@a>"], 59).status == 423
    assert phone.register(reg, 0.0, ["<sip:1001@a>"], 60).status == 200


def test_query_without_contact_lists_bindings() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    phone.register(reg, 0.0, ["<sip:1001@a>;+sip.instance=\"<urn:uuid:1>\";reg-id=1"], 600)
    resp = phone.register(reg, 100.0)
    assert resp.status == 200
    [value] = resp.headers.get_all("Contact")
    addr = parse_name_addr(value)
    assert addr.params == {"+sip.instance": '"<urn:uuid:1>"', "reg-id": "1", "expires": "500"}


@pytest.mark.parametrize("contact", ["<tel:+15551234>", "<sip:1001@a>;expires=soon",
                                     "<sip:1001@a>;q=2"])
def test_bad_contacts_400(contact: str) -> None:
    reg = make_registrar()
    assert Phone("1001", "secret1").register(reg, 0.0, [contact], 600).status == 400


def test_bad_expires_header_400() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    assert phone.register(reg, 0.0, ["<sip:1001@a>"], extra="Expires: -1").status == 400


# --------------------------------------------------------------------------- ordering (step 7)


def test_out_of_order_cseq_on_the_same_call_id_is_refused() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    assert phone.register(reg, 0.0, ["<sip:1001@a>"], 600).status == 200
    stored_cseq = phone.cseq
    # A replay of the same request (same Call-ID, same CSeq) changes nothing.
    replay = phone.register(reg, 10.0, ["<sip:1001@a>"], 0, cseq=stored_cseq)
    assert replay.status == 500
    assert len(reg.lookup("1001", 10.0)) == 1
    # So does an older one, and a '*' removal with an old CSeq.
    assert phone.register(reg, 10.0, ["*"], 0, cseq=stored_cseq - 1).status == 500
    assert len(reg.lookup("1001", 10.0)) == 1
    # A higher CSeq goes through; a new Call-ID (phone rebooted) may start low again.
    assert phone.register(reg, 10.0, ["<sip:1001@a>"], 300).status == 200
    rebooted = Phone("1001", "secret1", call_id="after-reboot")
    assert rebooted.register(reg, 20.0, ["<sip:1001@a>"], 300).status == 200
    assert reg.lookup("1001", 20.0)[0].call_id == "after-reboot"


def test_cseq_check_is_atomic_over_all_contacts() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    phone.register(reg, 0.0, ["<sip:1001@a>"], 600)
    cseq = phone.cseq
    resp = phone.register(reg, 1.0, ["<sip:1001@new>", "<sip:1001@a>"], 600, cseq=cseq)
    assert resp.status == 500
    assert [b.uri for b in reg.lookup("1001", 1.0)] == ["sip:1001@a"]


# --------------------------------------------------------------------------- expiry and lookup


def test_bindings_expire_on_the_virtual_clock() -> None:
    reg = make_registrar()
    Phone("1001", "secret1", call_id="a").register(reg, 0.0, ["<sip:1001@a>"], 60)
    Phone("1001", "secret1", call_id="b").register(reg, 0.0, ["<sip:1001@b>"], 120)
    Phone("1002", "secret2").register(reg, 30.0, ["<sip:1002@c>"], 60)
    assert reg.get_timer() == 60.0
    assert reg.expire(59.9) == []
    # lookup never shows an expired binding, even before expire() runs.
    assert [b.uri for b in reg.lookup("1001", 60.0)] == ["sip:1001@b"]
    assert [b.uri for b in reg.expire(60.0)] == ["sip:1001@a"]
    assert reg.get_timer() == 90.0
    assert [b.uri for b in reg.handle_timer(1000.0)] == ["sip:1002@c", "sip:1001@b"]
    assert reg.get_timer() is None and reg.aors() == []
    assert reg.lookup("1001", 1000.0) == []


def test_expired_binding_is_not_reported_in_a_later_200() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    phone.register(reg, 0.0, ["<sip:1001@a>"], 60)
    resp = phone.register(reg, 61.0, ["<sip:1001@b>"], 60)
    assert contacts_of(resp) == {"sip:1001@b": 60}
    assert [b.uri for b in reg.expire(61.0)] == []  # dropped with the update already


def test_lookup_static_contact_first_then_registered() -> None:
    reg = make_registrar()
    [static] = reg.lookup("2001", 0.0)
    assert static.static and static.uri == "sip:2001@10.0.0.9:5060"
    assert static.source is None and math.isinf(static.expires_at)
    Phone("1003", "secret3").register(reg, 0.0, ["<sip:1003@192.168.1.30>"], 600)
    assert [(b.uri, b.static) for b in reg.lookup("1003", 1.0)] == [
        ("sip:1003@10.0.0.3:5062", True), ("sip:1003@192.168.1.30", False)]
    # The static contact is not a registration: not listed in the 200, never expires.
    assert contacts_of(Phone("1003", "secret3").register(reg, 1.0)) == {
        "sip:1003@192.168.1.30": 599}
    assert [b.uri for b in reg.lookup("1003", 10_000.0)] == ["sip:1003@10.0.0.3:5062"]
    assert reg.lookup("nobody", 0.0) == []


def test_lookup_orders_by_q_then_most_recent() -> None:
    reg = make_registrar()
    Phone("1001", "secret1", call_id="1").register(reg, 0.0, ["<sip:1001@old>"], 600)
    Phone("1001", "secret1", call_id="2").register(reg, 5.0, ["<sip:1001@new>"], 600)
    Phone("1001", "secret1", call_id="3").register(reg, 9.0, ["<sip:1001@low>;q=0.1"], 600)
    Phone("1001", "secret1", call_id="4").register(reg, 1.0, ["<sip:1001@top>;q=1.0"], 600)
    assert [b.uri for b in reg.lookup("1001", 10.0)] == [
        "sip:1001@new", "sip:1001@top", "sip:1001@old", "sip:1001@low"]


def test_source_address_kept_per_binding() -> None:
    reg = make_registrar()
    phone = Phone("1001", "secret1")
    first = reg.handle_register(phone.request(["<sip:1001@192.168.1.20>"]), SRC, 0.0)
    phone.challenge = first.headers.get("WWW-Authenticate")
    nat = ("198.51.100.1", 61000)
    reg.handle_register(phone.request(["<sip:1001@192.168.1.20>"]), nat, 0.0)
    assert reg.lookup("1001", 0.0)[0].source == nat


def test_not_register_405() -> None:
    reg = make_registrar()
    req = Phone("1001", "s").request()
    req = SipRequest("OPTIONS", req.uri, req.headers)
    req.headers.set("CSeq", "1 OPTIONS")
    assert reg.handle_register(req, SRC, 0.0).status == 405
