"""Digest replay (issue 8): a captured `Authorization` / `Proxy-Authorization` must not
authenticate a second request. At 2554a5d nonces were stateless and reusable for 300 s
with no nonce-count tracking: a captured REGISTER replayed with a new Call-ID and the
attacker's Contact got 200 fifty times in fifty and became the newest binding, and a
captured INVITE Proxy-Authorization verified with any To."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbx.config import UserSettings
from pbx.registrar import Registrar
from pbx.sip.auth import AuthFailure, DigestAuthenticator
from pbx.sip.digest import client_authorization
from pbx.sip.message import SipRequest, SipResponse, parse_message
from pbx.sip.uri import parse_name_addr
from tests.e2e.harness import (
    REGISTERING_USERS,
    PbxSystem,
    ScriptedProvider,
    start_system,
    wait_until,
)
from tests.security.digest_client import RawSipClient, build_request, register

REALM = "pbx.test"
SECRET = b"s" * 32
SERVER = ("pbx.test", 5060)
PHONE = ("198.51.100.20", 5062)
ATTACKER = ("203.0.113.66", 40000)
T0 = 1_700_000_000.0
USERS = {"3001": "pw-3001", "3002": "pw-3002"}


def lookup(name: str) -> str | None:
    return USERS.get(name)


def parsed(data: bytes) -> SipRequest:
    msg = parse_message(data)
    assert isinstance(msg, SipRequest)
    return msg


def invite(call_id: str = "inv-1", to_user: str = "2001", cseq: int = 1,
           credentials: str | None = None) -> SipRequest:
    """An INVITE from extension 3001 to `to_user` (Request-URI sip:2001@pbx.test)."""
    return parsed(build_request("INVITE", "3001", server=SERVER, via=PHONE, call_id=call_id,
                                cseq=cseq, contact="<sip:3001@198.51.100.20:5062>",
                                authorization=credentials, header="Proxy-Authorization",
                                request_uri="sip:2001@pbx.test", to_user=to_user))


def reg_request(call_id: str, cseq: int, contact: str, credentials: str | None = None,
                via: tuple[str, int] = PHONE) -> SipRequest:
    return parsed(build_request("REGISTER", "3001", server=SERVER, via=via, call_id=call_id,
                                cseq=cseq, contact=contact, expires=600,
                                authorization=credentials))


def contacts(resp: SipResponse) -> list[str]:
    return [str(parse_name_addr(v).uri) for v in resp.headers.get_all("Contact")]


# --------------------------------------------------------------------------- registrar


def test_replayed_register_with_a_new_call_id_never_hijacks_the_binding() -> None:
    reg = Registrar({u: UserSettings(password=p) for u, p in USERS.items()},
                    DigestAuthenticator(REALM, SECRET))
    phone_contact = "<sip:3001@198.51.100.20:5062>"
    first = reg.handle_register(reg_request("boot-1", 1, phone_contact), PHONE, 0.0,
                                auth_now=T0)
    assert first.status == 401
    credentials = client_authorization(challenge=first.headers.get_all("WWW-Authenticate"),
                                       username="3001", password=USERS["3001"],
                                       method="REGISTER", uri="sip:pbx.test:5060")
    ok = reg.handle_register(reg_request("boot-1", 2, phone_contact, credentials), PHONE,
                             1.0, auth_now=T0 + 1)
    assert ok.status == 200

    # The attacker replays the captured credentials with its own Call-ID and Contact,
    # fifty times, then with the phone's own Call-ID and a higher CSeq.
    evil = "<sip:3001@203.0.113.66:40000>"
    statuses = [reg.handle_register(reg_request(f"evil-{i}", 1, evil, credentials, ATTACKER),
                                    ATTACKER, 2.0 + i, auth_now=T0 + 2 + i).status
                for i in range(50)]
    statuses.append(reg.handle_register(reg_request("boot-1", 99, evil, credentials,
                                                    ATTACKER), ATTACKER, 60.0,
                                        auth_now=T0 + 60).status)
    assert statuses == [401] * 51
    assert [b.uri for b in reg.lookup("3001", 60.0)] == ["sip:3001@198.51.100.20:5062"]
    assert reg.stats["auth_replays"] == 51
    # A replay is not a password guess: the real phone is not locked out by it.
    assert reg.stats["auth_failures"] == 0 and reg.stats["auth_lockouts"] == 0


# --------------------------------------------------------------------------- authenticator


def test_captured_invite_proxy_authorization_is_bound_to_its_call_and_used_once() -> None:
    auth = DigestAuthenticator(REALM, SECRET)
    challenge = auth.challenge(T0, proxy=True, request=invite())
    credentials = client_authorization(challenge=[v for _, v in challenge], username="3001",
                                       password=USERS["3001"], method="INVITE",
                                       uri="sip:2001@pbx.test")
    # Sent first by someone else, for another call or towards another To: refused.
    elsewhere = [invite("other-call", cseq=2, credentials=credentials),
                 invite(to_user="900123", cseq=2, credentials=credentials)]
    for request in elsewhere:
        result = auth.verify(request, lookup, T0 + 1, proxy=True)
        assert result.reason is AuthFailure.NONCE_BOUND_ELSEWHERE, result
        assert result.stale and result.status == 407
    # The real retry passes once; the same credentials again (same nc) do not.
    assert auth.verify(invite(cseq=2, credentials=credentials), lookup, T0 + 1, proxy=True).ok
    again = auth.verify(invite(cseq=3, credentials=credentials), lookup, T0 + 2, proxy=True)
    assert again.reason is AuthFailure.NONCE_REUSED and again.stale
    # Nor once the attacker has the nonce: another Call-ID or To is still another call.
    for request in elsewhere:
        assert not auth.verify(request, lookup, T0 + 3, proxy=True).ok


def test_nonce_count_must_strictly_increase() -> None:
    auth = DigestAuthenticator(REALM, SECRET)
    req = reg_request("boot-1", 1, "<sip:3001@h>")
    challenge = [v for _, v in auth.challenge(T0, request=req)]

    def with_nc(nc: int, cseq: int) -> SipRequest:
        value = client_authorization(challenge=challenge, username="3001",
                                     password=USERS["3001"], method="REGISTER",
                                     uri="sip:pbx.test:5060", nc=nc, cnonce=f"c{nc}")
        return reg_request("boot-1", cseq, "<sip:3001@h>", value)

    outcomes = [(nc, auth.verify(with_nc(nc, cseq), lookup, T0 + cseq).reason)
                for cseq, nc in enumerate([1, 3, 2, 3, 4], start=2)]
    assert outcomes == [(1, None), (3, None), (2, AuthFailure.NONCE_REUSED),
                        (3, AuthFailure.NONCE_REUSED), (4, None)]


def test_credentials_captured_at_one_front_do_not_pass_at_another() -> None:
    """Fronts sharing auth_secret: each accepts only its own nonces (stale=true for the
    others', so a phone failing over retries at once), so one front's replay table is
    enough to stop replays."""
    front_a, front_b = DigestAuthenticator(REALM, SECRET), DigestAuthenticator(REALM, SECRET)
    req = reg_request("boot-1", 1, "<sip:3001@h>")
    value = client_authorization(challenge=[v for _, v in front_a.challenge(T0, request=req)],
                                 username="3001", password=USERS["3001"], method="REGISTER",
                                 uri="sip:pbx.test:5060")
    captured = reg_request("boot-1", 2, "<sip:3001@h>", value)
    assert front_a.verify(captured, lookup, T0 + 1).ok
    at_b = front_b.verify(captured, lookup, T0 + 1)
    assert at_b.reason is AuthFailure.FOREIGN_NONCE and at_b.stale


def test_replay_table_is_bounded_and_eviction_never_reopens_a_nonce() -> None:
    auth = DigestAuthenticator(REALM, SECRET, nonce_table_size=4)
    used: list[SipRequest] = []
    for i in range(10):
        req = reg_request(f"call-{i}", 1, "<sip:3001@h>")
        value = client_authorization(challenge=[v for _, v in auth.challenge(T0 + i,
                                                                             request=req)],
                                     username="3001", password=USERS["3001"],
                                     method="REGISTER", uri="sip:pbx.test:5060")
        request = reg_request(f"call-{i}", 2, "<sip:3001@h>", value)
        assert auth.verify(request, lookup, T0 + i).ok
        used.append(request)
        assert auth.nonces.tracked <= 4
    # Every one of them, evicted or not, is refused the second time.
    for request in used:
        result = auth.verify(request, lookup, T0 + 20)
        assert not result.ok and result.stale, result
    assert auth.nonces.evictions == 6
    # Strangers cannot grow the table: only nonces that authenticated are kept.
    before = auth.nonces.tracked
    for i in range(200):
        req = reg_request(f"x-{i}", 1, "<sip:3001@h>")
        wrong = client_authorization(challenge=[v for _, v in auth.challenge(T0 + 30,
                                                                             request=req)],
                                     username="3001", password=f"guess{i}",
                                     method="REGISTER", uri="sip:pbx.test:5060")
        assert not auth.verify(reg_request(f"x-{i}", 2, "<sip:3001@h>", wrong), lookup,
                               T0 + 30).ok
    assert auth.nonces.tracked == before
    # Entries go once their nonce has expired anyway.
    fresh = reg_request("late", 1, "<sip:3001@h>")
    value = client_authorization(challenge=[v for _, v in auth.challenge(T0 + 1000,
                                                                         request=fresh)],
                                 username="3001", password=USERS["3001"], method="REGISTER",
                                 uri="sip:pbx.test:5060")
    assert auth.verify(reg_request("late", 2, "<sip:3001@h>", value), lookup, T0 + 1000).ok
    assert auth.nonces.tracked == 1


# --------------------------------------------------------------------------- real front


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx-replay"), provider)
    yield s
    s.stop()
    provider.close()


def test_replayed_register_through_the_real_front(system: PbxSystem, tmp_path: Path) -> None:
    server = ("127.0.0.1", system.sip_port)
    user, password = "3001", REGISTERING_USERS["3001"]
    with RawSipClient(server, "127.0.0.1") as phone, \
            RawSipClient(server, "127.0.0.2") as attacker:
        phone_contact = f"<sip:{user}@127.0.0.1:{phone.port}>"
        ok, captured = register(phone, user, password, phone_contact, call_id="phone-boot")
        assert ok.status == 200
        credentials = parsed(captured).headers.get("Authorization")
        assert credentials

        evil_contact = f"<sip:{user}@127.0.0.2:{attacker.port}>"
        statuses = [attacker.send(attacker.request(
            "REGISTER", user, call_id=secrets.token_hex(8), cseq=1, contact=evil_contact,
            expires=3600, authorization=credentials)).status for _ in range(50)]
        # The phone's own Call-ID with a higher CSeq: the nonce count was used.
        statuses.append(attacker.send(attacker.request(
            "REGISTER", user, call_id="phone-boot", cseq=50, contact=evil_contact,
            expires=3600, authorization=credentials)).status)
        assert statuses == [401] * 51, statuses

        # The phone's binding is the only one (a query REGISTER lists them all).
        query, _ = register(phone, user, password, phone_contact, call_id="phone-boot",
                            first_cseq=3)
        assert query.status == 200
        assert contacts(query) == [f"sip:{user}@127.0.0.1:{phone.port}"]
    metrics = wait_until(lambda: (m := system.metrics())["pbx_auth_replays_total"] >= 51 and m, 5,
                         "the replays counted in /metrics")
    assert metrics["pbx_auth_failures_total"] == 0
