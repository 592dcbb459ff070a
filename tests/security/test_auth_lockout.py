"""Failed-authentication backoff (issue 8). At 2554a5d nothing counted failures: 2,000
wrong passwords got 2,000 fresh 401s, each a free guess. Now (pbx.sip.authguard):
per-(source, user), per-source and per-user counters with exponential backoff; while
locked out the credentials are not checked and the answer (403 + Retry-After) does not
depend on the password or on whether the user exists."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pbx.config import ConfigError, UserSettings, parse_config
from pbx.registrar import Registrar
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.authguard import AuthGuard, Lockout, source_key
from pbx.sip.digest import client_authorization
from pbx.sip.message import SipRequest, SipResponse
from tests.e2e.harness import (
    REGISTERING_USERS,
    PbxSystem,
    ScriptedProvider,
    start_system,
    wait_until,
)
from tests.security.digest_client import RawSipClient, answer, register_request

REALM = "pbx.test"
SERVER = ("pbx.test", 5060)
URI = "sip:pbx.test:5060"
T0 = 1_700_000_000.0


# --------------------------------------------------------------------------- AuthGuard


def test_pair_backs_off_exponentially_up_to_the_cap() -> None:
    guard = AuthGuard(max_failures=3, backoff_base_s=2, backoff_max_s=20)
    now = 0.0
    for _ in range(2):
        assert guard.record_failure("203.0.113.9", "3001", now) == []
        assert guard.check("203.0.113.9", "3001", now) is None
    locks = []
    for _ in range(6):
        started = guard.record_failure("203.0.113.9", "3001", now)
        assert [lock.scope for lock in started] == ["source+user"]
        lock = guard.check("203.0.113.9", "3001", now)
        assert lock is not None and lock.until == started[0].until
        locks.append(lock.until - now)
        assert guard.check("203.0.113.9", "3001", lock.until - 0.01) is not None
        now = lock.until  # one more guess is possible once the lock ends
        assert guard.check("203.0.113.9", "3001", now) is None
    assert locks == [2, 4, 8, 16, 20, 20]
    # Another user from the same source and the same user from elsewhere are free.
    assert guard.check("203.0.113.9", "3002", 0.0) is None
    assert guard.check("198.51.100.1", "3001", 0.0) is None


def test_failures_are_forgotten_after_failure_memory_and_success_clears_the_pair() -> None:
    guard = AuthGuard(max_failures=3, failure_memory_s=100)
    for t in (0.0, 1.0):
        guard.record_failure("203.0.113.9", "3001", t)
    assert guard.record_failure("203.0.113.9", "3001", 200.0) == []  # counted from zero
    guard.record_failure("203.0.113.9", "3001", 201.0)
    guard.record_success("203.0.113.9", "3001", 202.0)
    assert guard.record_failure("203.0.113.9", "3001", 203.0) == []
    assert guard.record_failure("203.0.113.9", "3001", 204.0) == []


def test_source_sweeping_usernames_is_locked_for_all_of_them() -> None:
    guard = AuthGuard(max_failures=5, source_max_failures=10)
    started: list[Lockout] = []
    for i in range(10):
        started += guard.record_failure("203.0.113.9", f"{1000 + i}", 0.0)
    assert [lock.scope for lock in started] == ["source"]
    lock = guard.check("203.0.113.9", "never-tried", 1.0)
    assert lock is not None and lock.scope == "source"
    assert guard.check("203.0.113.10", "never-tried", 1.0) is None


def test_distributed_guessing_locks_the_user_but_not_its_known_phone() -> None:
    """The denial-of-service side: strangers failing for 3001 from everywhere lock 3001
    for sources that never authenticated as it, while the phone that did (its source is
    known for 3001) keeps registering."""
    guard = AuthGuard(max_failures=5, user_max_failures=20)
    guard.record_success("198.51.100.20", "3001", 0.0)  # the phone
    for i in range(20):
        guard.record_failure(f"203.0.113.{i}", "3001", 1.0)
    lock = guard.check("203.0.113.99", "3001", 2.0)
    assert lock is not None and lock.scope == "user"
    assert guard.check("198.51.100.20", "3001", 2.0) is None
    # The phone's own wrong password still locks its pair (a broken phone backs off).
    for _ in range(5):
        guard.record_failure("198.51.100.20", "3001", 3.0)
    lock = guard.check("198.51.100.20", "3001", 3.0)
    assert lock is not None and lock.scope == "source+user"


def test_unknown_usernames_are_locked_like_known_ones() -> None:
    guard = AuthGuard(max_failures=2)
    for name in ("3001", "no-such-user"):
        guard.record_failure("203.0.113.9", name, 0.0)
        guard.record_failure("203.0.113.9", name, 0.0)
        assert guard.check("203.0.113.9", name, 0.5) is not None


def test_ipv6_sources_count_per_64_and_tables_stay_bounded() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::7")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    guard = AuthGuard(table_size=100)
    for i in range(5000):
        guard.record_failure(f"10.{i // 256 % 256}.{i % 256}.1", f"user-{i}", float(i))
        guard.record_success(f"10.{i // 256 % 256}.{i % 256}.2", f"user-{i}", float(i))
    assert guard.entries() <= 4 * 100
    # A username the size of a datagram is keyed by a hash, not held whole.
    guard.record_failure("203.0.113.9", "x" * 60_000, 0.0)
    assert guard.check("203.0.113.9", "x" * 60_000, 0.0) is None


def test_auth_settings_are_validated() -> None:
    settings = parse_config("[auth]\nmax_failures = 3\nbackoff_base_s = 1\n")
    assert settings.auth.max_failures == 3 and settings.auth.backoff_max_s == 900
    with pytest.raises(ConfigError, match="auth"):
        parse_config("[auth]\nbackoff_base_s = 10\nbackoff_max_s = 5\n")
    with pytest.raises(ConfigError, match="auth.max_failures"):
        parse_config("[auth]\nmax_failures = 0\n")


# --------------------------------------------------------------------------- registrar


def make_registrar(**guard: Any) -> Registrar:
    users = {"3001": UserSettings(password="pw-3001"), "3002": UserSettings(password="pw-3002")}
    return Registrar(users, DigestAuthenticator(REALM, b"k" * 32),
                     guard=AuthGuard(**guard))


def request(user: str, call_id: str, cseq: int, credentials: str | None = None,
            via: tuple[str, int] = ("203.0.113.9", 5060)) -> SipRequest:
    return register_request(user, server=SERVER, via=via, call_id=call_id, cseq=cseq,
                            contact=f"<sip:{user}@{via[0]}:{via[1]}>", credentials=credentials)


def guess(reg: Registrar, user: str, password: str, now: float, *, call_id: str,
          cseq: int, source: tuple[str, int] = ("203.0.113.9", 5060),
          challenge: SipResponse | None = None) -> tuple[SipResponse, SipResponse]:
    """One cracker step: a challenge (fetched unless given), then the guess. Returns
    (the guess's response, the last 401 seen, to take the next nonce from)."""
    if challenge is None or challenge.status != 401:
        challenge = reg.handle_register(request(user, call_id, cseq, via=source), source, now,
                                        auth_now=T0 + now)
        assert challenge.status == 401
        cseq += 1
    credentials = answer(challenge, user, password, uri=URI)
    resp = reg.handle_register(request(user, call_id, cseq, credentials, via=source), source,
                               now, auth_now=T0 + now)
    return resp, resp if resp.status == 401 else challenge


def test_two_thousand_wrong_guesses_do_not_get_two_thousand_401s() -> None:
    reg = make_registrar()
    statuses: list[int] = []
    last: SipResponse | None = None
    for i in range(2000):  # as fast as a cracker goes: 2,000 in 20 s
        resp, last = guess(reg, "3001", f"guess-{i}", i * 0.01, call_id="crack",
                           cseq=2 * i + 1, challenge=last)
        statuses.append(resp.status)
    assert statuses.count(401) <= 10, statuses.count(401)
    assert statuses.count(403) >= 1990
    refused = resp
    assert refused.reason == "Forbidden (too many failed attempts)"
    assert int(refused.headers.get("Retry-After") or 0) >= 1
    assert reg.stats["auth_lockouts"] >= 1
    assert reg.stats["auth_locked_refusals"] == statuses.count(403)


def test_while_locked_out_credentials_are_not_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg = make_registrar(max_failures=3)
    looked_up: list[str] = []
    password_of = reg.password_of

    def spy(name: str) -> str | None:
        looked_up.append(name)
        return password_of(name)

    monkeypatch.setattr(reg, "password_of", spy)
    for i in range(3):
        guess(reg, "3001", f"wrong-{i}", 1.0, call_id="c", cseq=10 * i + 1)
    looked_up.clear()
    right, _ = guess(reg, "3001", "pw-3001", 1.5, call_id="c", cseq=100)
    assert right.status == 403 and looked_up == []  # the right password proves nothing
    assert reg.lookup("3001", 1.5) == []
    # Once the lock has run out the right password works (and clears the counter).
    after, _ = guess(reg, "3001", "pw-3001", 10.0, call_id="c", cseq=200)
    assert after.status == 200


def test_locked_out_answers_do_not_reveal_whether_the_user_exists() -> None:
    def run(user: str) -> list[tuple[int, str, str | None]]:
        reg = make_registrar(max_failures=3)
        out = []
        for i in range(6):
            resp, _ = guess(reg, user, f"wrong-{i}", 1.0, call_id="c", cseq=10 * i + 1)
            out.append((resp.status, resp.reason, resp.headers.get("Retry-After")))
        return out

    assert run("3001") == run("no-such-user")
    assert [s for s, _, _ in run("3001")] == [401, 401, 401, 403, 403, 403]


def test_a_stranger_cannot_lock_out_a_working_phone() -> None:
    reg = make_registrar(max_failures=3, source_max_failures=5, user_max_failures=10)
    phone = ("198.51.100.20", 5062)
    ok, _ = guess(reg, "3001", "pw-3001", 0.0, call_id="phone", cseq=1, source=phone)
    assert ok.status == 200
    for n in range(12):  # twelve attackers, a few wrong guesses each
        for i in range(3):
            guess(reg, "3001", f"x{i}", 1.0, call_id=f"evil-{n}", cseq=10 * i + 1,
                  source=(f"203.0.113.{n}", 5060))
    stranger, _ = guess(reg, "3001", "pw-3001", 2.0, call_id="new", cseq=1,
                        source=("192.0.2.50", 5060))
    assert stranger.status == 403  # the user is locked for sources not known for it
    refresh, _ = guess(reg, "3001", "pw-3001", 2.0, call_id="phone", cseq=100, source=phone)
    assert refresh.status == 200


def test_failures_and_lockouts_are_logged_with_the_source_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = make_registrar(max_failures=2)
    caplog.set_level(logging.INFO, logger="pbx.auth")
    huge = "h" * 20_000
    for i in range(2):
        guess(reg, huge, f"wrong-{i}", 1.0, call_id="c", cseq=10 * i + 1,
              source=("203.0.113.77", 5060))
    lines = [r.getMessage() for r in caplog.records if r.name == "pbx.auth"]
    assert any("failure" in line and "203.0.113.77" in line for line in lines)
    assert any("lockout" in line and "203.0.113.77" in line for line in lines)
    assert all(len(line) < 300 for line in lines)


# --------------------------------------------------------------------------- real front


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    # The cracker's source (127.0.0.3) is exempt from the rate limit and the per-source
    # budgets, so every guess gets an answer: the lockout alone is what stops them.
    s = start_system(tmp_path_factory.mktemp("pbx-lockout"), provider,
                     sip_extra='rate_limit_exempt = ["127.0.0.3/32"]')
    yield s
    s.stop()
    provider.close()


def test_lockout_through_the_real_front_and_in_metrics(system: PbxSystem,
                                                       tmp_path: Path) -> None:
    server = ("127.0.0.1", system.sip_port)
    uri = f"sip:127.0.0.1:{system.sip_port}"
    statuses: list[int] = []
    with RawSipClient(server, "127.0.0.3") as cracker:
        call_id = secrets.token_hex(8)
        challenge = cracker.send(cracker.request("REGISTER", "3001", call_id=call_id, cseq=1,
                                                 contact="<sip:3001@127.0.0.3:9>"))
        assert challenge.status == 401
        for i in range(2000):
            credentials = answer(challenge, "3001", f"guess-{i}", uri=uri)
            resp = cracker.send(cracker.request(
                "REGISTER", "3001", call_id=call_id, cseq=i + 2,
                contact="<sip:3001@127.0.0.3:9>", authorization=credentials))
            statuses.append(resp.status)
            if resp.status == 401:
                challenge = resp
        # The right password, now: refused unchecked like the wrong ones.
        right = cracker.send(cracker.request(
            "REGISTER", "3001", call_id=call_id, cseq=3000, contact="<sip:3001@127.0.0.3:9>",
            authorization=answer(challenge, "3001", REGISTERING_USERS["3001"], uri=uri,
                                 nc=2)))
    assert right.status == 403
    assert statuses.count(401) <= 10, statuses.count(401)
    assert statuses.count(403) >= 1990
    metrics = wait_until(lambda: (m := system.metrics())["pbx_auth_lockouts_total"] >= 1 and m, 5,
                         "the lockout in /metrics")
    assert metrics["pbx_auth_locked_refusals_total"] >= 1991
    assert metrics["pbx_auth_failures_total"] == statuses.count(401)
    # The phone registering 3001 from its own address is not locked out by this.
    with RawSipClient(server, "127.0.0.1") as phone:
        first = phone.send(phone.request("REGISTER", "3001", call_id="phone", cseq=1,
                                         contact=f"<sip:3001@127.0.0.1:{phone.port}>"))
        ok = phone.send(phone.request(
            "REGISTER", "3001", call_id="phone", cseq=2,
            contact=f"<sip:3001@127.0.0.1:{phone.port}>",
            authorization=client_authorization(
                challenge=first.headers.get_all("WWW-Authenticate"), username="3001",
                password=REGISTERING_USERS["3001"], method="REGISTER", uri=uri)))
    assert ok.status == 200
    assert "auth lockout" in system.log("front")
