"""Digest that works with every client out of the box, and failed authentication logged
(issue 11): libre (Debian's baresip 1.0) fails a whole 401 that names any algorithm but
MD5, so a client saying it is baresip gets one MD5 challenge; a user may be given its own
algorithms (SHA-256 only: MD5 refused for it, whatever its User-Agent says); every
refused REGISTER and failed authentication is one INFO line with the source, the user
and the reason, never the credentials, and a flood of them is cut short."""

from __future__ import annotations

import logging

import pytest

from pbx.config import UserSettings
from pbx.registrar import FailureLog, Registrar
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.authguard import AuthGuard
from pbx.sip.digest import client_authorization, parse_challenge
from pbx.sip.message import SipRequest, parse_message

REALM = "pbx.test"
SRC = ("203.0.113.7", 40123)
BARESIP_UA = "baresip v1.0.0 (x86_64/linux)"
LINPHONE_UA = "Linphone Desktop/5.1.65 (belle-sip/5.1.0)"


def make_registrar(failure_log: FailureLog | None = None,
                   guard: AuthGuard | None = None) -> Registrar:
    users = {
        "1001": UserSettings(password="secret1"),
        "1002": UserSettings(password="secret2", digest_algorithms=["SHA-256"]),
    }
    return Registrar(users, DigestAuthenticator(REALM, b"k" * 32), failure_log=failure_log,
                     guard=guard, md5_user_agents=["baresip", "libre"])


def register(user: str, *, user_agent: str | None = None, authorization: str | None = None,
             aor: str | None = None, cseq: int = 1, call_id: str = "c1") -> SipRequest:
    lines = [f"REGISTER sip:{REALM} SIP/2.0",
             f"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-{call_id}-{cseq}",
             "Max-Forwards: 70", f"From: <sip:{user}@{REALM}>;tag=ft",
             f"To: <sip:{aor or user}@{REALM}>", f"Call-ID: {call_id}",
             f"CSeq: {cseq} REGISTER", f"Contact: <sip:{user}@192.168.1.20:5060>"]
    if user_agent is not None:
        lines.append(f"User-Agent: {user_agent}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(msg, SipRequest)
    return msg


def algorithms(reg: Registrar, request: SipRequest) -> list[str | None]:
    resp = reg.handle_register(request, SRC, 0.0)
    assert resp.status == 401
    return [parse_challenge(v).algorithm for v in resp.headers.get_all("WWW-Authenticate")]


def answer(reg: Registrar, user: str, password: str, *, pick: str, user_agent: str | None = None,
           cseq: int = 2) -> int:
    """A REGISTER answering the `pick` challenge of a first 401; the final status."""
    first = reg.handle_register(register(user, user_agent=user_agent), SRC, 0.0)
    challenge = next(v for v in first.headers.get_all("WWW-Authenticate")
                     if parse_challenge(v).algorithm == pick)
    value = client_authorization(challenge=challenge, username=user, password=password,
                                 method="REGISTER", uri=f"sip:{REALM}", cnonce="cn", nc=1)
    request = register(user, user_agent=user_agent, authorization=value, cseq=cseq)
    return reg.handle_register(request, SRC, 1.0).status


# --------------------------------------------------------------------------- challenges


def test_baresip_gets_one_md5_challenge_and_registers_with_it() -> None:
    reg = make_registrar()
    assert algorithms(reg, register("1001", user_agent=BARESIP_UA)) == ["MD5"]
    assert algorithms(reg, register("1001", user_agent="LIBRE sip stack")) == ["MD5"]
    assert answer(reg, "1001", "secret1", pick="MD5", user_agent=BARESIP_UA) == 200


def test_other_clients_get_sha256_first_then_md5() -> None:
    reg = make_registrar()
    for ua in (LINPHONE_UA, "PJSUA v2.15 Linux-6.1/x86_64/glibc-2.36", None):
        assert algorithms(reg, register("1001", user_agent=ua)) == ["SHA-256", "MD5"]
    assert answer(reg, "1001", "secret1", pick="SHA-256", user_agent=LINPHONE_UA) == 200


def test_a_user_with_sha256_only_is_never_offered_or_accepted_md5() -> None:
    reg = make_registrar()
    # Its User-Agent does not downgrade it: the user's own list is what is offered.
    assert algorithms(reg, register("1002", user_agent=BARESIP_UA)) == ["SHA-256"]
    assert answer(reg, "1002", "secret2", pick="SHA-256") == 200
    # MD5 credentials computed on a nonce of ours: refused (a fresh SHA-256 challenge).
    first = reg.handle_register(register("1002", call_id="c2"), SRC, 0.0)
    nonce = parse_challenge(first.headers.get("WWW-Authenticate") or "").nonce
    md5_challenge = f'Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'
    value = client_authorization(challenge=md5_challenge, username="1002",
                                 password="secret2", method="REGISTER", uri=f"sip:{REALM}",
                                 cnonce="cn", nc=1)
    resp = reg.handle_register(register("1002", authorization=value, cseq=2, call_id="c2"),
                               SRC, 1.0)
    assert resp.status == 401
    assert [parse_challenge(v).algorithm
            for v in resp.headers.get_all("WWW-Authenticate")] == ["SHA-256"]
    assert reg.bindings("1002", 1.0)[0].call_id == "c1"  # only the SHA-256 registration


def test_an_unknown_user_is_challenged_like_a_default_user() -> None:
    reg = make_registrar()
    assert (algorithms(reg, register("9999", user_agent=LINPHONE_UA))
            == algorithms(reg, register("1001", user_agent=LINPHONE_UA)))


# --------------------------------------------------------------------------- logging


def test_a_wrong_password_is_logged_with_source_user_and_reason_not_credentials(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = make_registrar()
    with caplog.at_level(logging.INFO, logger="pbx.auth"):
        first = reg.handle_register(register("1001", user_agent=BARESIP_UA), SRC, 0.0)
        assert not caplog.records  # the first challenge is not a failure
        challenge = first.headers.get("WWW-Authenticate") or ""
        value = client_authorization(challenge=challenge, username="1001", password="nope",
                                     method="REGISTER", uri=f"sip:{REALM}", cnonce="cn", nc=1)
        resp = reg.handle_register(register("1001", user_agent=BARESIP_UA,
                                            authorization=value, cseq=2), SRC, 1.0)
    assert resp.status == 401
    [record] = caplog.records
    line = record.getMessage()
    assert record.levelno == logging.INFO
    assert "203.0.113.7:40123" in line and "'1001'" in line and "wrong response" in line
    assert "baresip" in line
    response = value.split('response="')[1].split('"')[0]
    nonce = parse_challenge(challenge).nonce
    assert response not in line and nonce not in line


@pytest.mark.parametrize(("aor", "expected"), [("1002", "403"), ("7777", "404")])
def test_a_refused_registration_is_logged(caplog: pytest.LogCaptureFixture, aor: str,
                                          expected: str) -> None:
    """Right credentials of 1001 for someone else's AOR (403) or one that does not exist
    (404)."""
    reg = make_registrar()
    first = reg.handle_register(register("1001", aor=aor), SRC, 0.0)
    challenge = next(v for v in first.headers.get_all("WWW-Authenticate")
                     if parse_challenge(v).algorithm == "SHA-256")
    value = client_authorization(challenge=challenge, username="1001", password="secret1",
                                 method="REGISTER", uri=f"sip:{REALM}", cnonce="cn", nc=1)
    with caplog.at_level(logging.INFO, logger="pbx.auth"):
        resp = reg.handle_register(register("1001", aor=aor, authorization=value, cseq=2),
                                   SRC, 1.0)
    assert str(resp.status) == expected
    [record] = caplog.records
    assert "registration refused" in record.getMessage()
    assert f"'{aor}'" in record.getMessage() and expected in record.getMessage()


def test_credentials_with_an_algorithm_not_offered_are_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = make_registrar()
    value = ('Digest username="1001", realm="pbx.test", nonce="n", uri="sip:pbx.test", '
             'response="00", algorithm=SHA-512-256, qop=auth, nc=00000001, cnonce="c"')
    with caplog.at_level(logging.INFO, logger="pbx.auth"):
        resp = reg.handle_register(register("1001", authorization=value), SRC, 0.0)
    assert resp.status == 401
    assert any("not accepted" in r.getMessage() and "'1001'" in r.getMessage()
               for r in caplog.records)


def test_a_scanner_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """One source guessing passwords: its burst is logged, then a few lines a minute,
    the next written line saying how many were left out."""
    log = FailureLog(per_min=6, burst=10, max_per_min=120)
    no_lockout = AuthGuard(max_failures=10**6, source_max_failures=10**6,
                           user_max_failures=10**6)
    reg = make_registrar(log, no_lockout)
    first = reg.handle_register(register("1001"), SRC, 0.0)
    challenge = first.headers.get("WWW-Authenticate") or ""
    with caplog.at_level(logging.INFO, logger="pbx.auth"):
        for i in range(500):  # 500 guesses in 5 s
            value = client_authorization(challenge=challenge, username="1001",
                                         password=f"guess{i}", method="REGISTER",
                                         uri=f"sip:{REALM}", cnonce="cn", nc=i + 1)
            reg.handle_register(register("1001", authorization=value, cseq=i + 2),
                                SRC, i / 100)
        written = len(caplog.records)
        assert written <= 11  # the burst, and the trickle of those 5 seconds
        assert reg.stats["auth_failures_unlogged"] == 500 - written
        assert reg.stats["auth_failures"] == 500
        # A minute later the source may be heard again, and the line says what was cut.
        value = client_authorization(challenge=challenge, username="1001", password="x",
                                     method="REGISTER", uri=f"sip:{REALM}", cnonce="cn",
                                     nc=1000)
        reg.handle_register(register("1001", authorization=value, cseq=1000), SRC, 65.0)
    assert len(caplog.records) == written + 1
    assert f"{500 - written} auth failure lines not written" in caplog.records[-1].getMessage()


def test_many_sources_are_bounded_in_all() -> None:
    log = FailureLog(per_min=6, burst=10, max_per_min=120)
    written = sum(log.write(f"198.51.100.{i % 250}", i / 1000, "failure %d", i)
                  for i in range(5000))  # 5000 lines from 250 sources in 5 s
    assert written <= 20 + 10  # the overall burst and 5 s at 2 a second
    assert log.unlogged == 5000 - written
