"""Digest errors and oracles (issue 8). At 2554a5d a non-ASCII `response` for a known
user raised TypeError (a 500) while an unknown user got 401 (user enumeration),
`username*=` with bad percent-encoding raised UnicodeError, unknown users cost no digest
(a timing difference), qop-less RFC 2069 responses were accepted and MD5 was offered
first."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pbx.sip.auth as auth_module  # verify() looks digest_response up here
from pbx.config import Settings, UserSettings, load_config
from pbx.registrar import Registrar
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.digest import client_authorization, digest_response, parse_auth_params, parse_challenge
from pbx.sip.errors import SipError
from pbx.sip.grammar import quote_string
from pbx.sip.headers import Headers
from pbx.sip.message import SipRequest, SipResponse, parse_message
from tests.e2e.harness import (
    REGISTERING_USERS,
    ROOT,
    PbxSystem,
    ScriptedProvider,
    start_system,
)
from tests.security.digest_client import RawSipClient, build_request, register_request

REALM = "pbx.test"
SERVER = ("pbx.test", 5060)
PHONE = ("198.51.100.20", 5062)
URI = "sip:pbx.test:5060"
T0 = 1_700_000_000.0
USERS = {"3001": UserSettings(password="pw-3001"), "2001": UserSettings(contact="sip:x@y")}

HOSTILE_VALUES = {
    "non-ascii": "é€😀ü",
    "nul": "ab\x00cd",
    "huge": "9" * 60_000,
    "raw-byte": "\udcff\udcfe",  # bytes that are not UTF-8, as the parser keeps them
    "empty": "",
    "quotes": '\\"x\\"',
}
PARAMETERS = ("username", "realm", "nonce", "uri", "response", "algorithm", "qop", "nc",
              "cnonce", "opaque", "userhash", "username*")


def make_registrar() -> Registrar:
    return Registrar(USERS, DigestAuthenticator(REALM, b"k" * 32))


def phone_register(credentials: str | None = None, *, user: str = "3001",
                     call_id: str = "c-1", cseq: int = 1) -> SipRequest:
    return register_request(user, server=SERVER, via=PHONE, call_id=call_id, cseq=cseq,
                            contact=f"<sip:{user}@198.51.100.20:5062>", credentials=credentials)


def with_header(request: SipRequest, value: str) -> SipRequest:
    """`request` with its Authorization replaced by `value`, built without the parser
    (so that NUL and raw bytes reach the authenticator as they are)."""
    headers = Headers([(n, v) for n, v in request.headers.items() if n != "Authorization"])
    headers.add("Authorization", value)
    return SipRequest(request.method, request.uri, headers, request.body)


def challenge_for(reg: Registrar, user: str = "3001") -> SipResponse:
    first = reg.handle_register(phone_register(user=user), PHONE, 0.0, auth_now=T0)
    assert first.status == 401
    return first


def right_params(first: SipResponse, user: str = "3001", password: str = "pw-3001"
                 ) -> dict[str, str]:
    value = client_authorization(challenge=first.headers.get_all("WWW-Authenticate"),
                                 username=user, password=password, method="REGISTER",
                                 uri=URI)
    return parse_auth_params(value)[1]


def header_of(params: dict[str, str]) -> str:
    return "Digest " + ", ".join(f"{k}={quote_string(v)}" for k, v in params.items())


def shape(resp: SipResponse) -> tuple[Any, ...]:
    """What a client can see of a refusal, minus the random parts (nonces, tags)."""
    challenges = [parse_challenge(v) for v in resp.headers.get_all("WWW-Authenticate")]
    return (resp.status, resp.reason, sorted({n for n, _ in resp.headers.items()}),
            [(c.algorithm, c.qop, c.stale, c.opaque) for c in challenges])


# --------------------------------------------------------------------------- garbage in


@pytest.mark.parametrize("value", HOSTILE_VALUES.values(), ids=list(HOSTILE_VALUES))
@pytest.mark.parametrize("name", PARAMETERS)
def test_hostile_value_in_any_parameter_gets_400_or_401(name: str, value: str) -> None:
    reg = make_registrar()
    params = right_params(challenge_for(reg))
    if name == "username*":
        del params["username"]
    params[name] = value
    request = with_header(phone_register(cseq=2), header_of(params))
    resp = reg.handle_register(request, PHONE, 1.0, auth_now=T0 + 1)
    # opaque is not ours to check and userhash is only refused when "true".
    allowed = {400, 401} | ({200} if name in ("opaque", "userhash") else set())
    assert resp.status in allowed, (name, value[:20], resp.status)
    # The same through the real parser, where it lets the bytes through.
    try:
        parsed = parse_message(build_request(
            "REGISTER", "3001", server=SERVER, via=PHONE, call_id="c-1", cseq=3,
            contact="<sip:3001@198.51.100.20:5062>", authorization=header_of(params)))
    except SipError:
        return  # refused by the parser: the front answers 400
    assert isinstance(parsed, SipRequest)
    assert make_registrar().handle_register(parsed, PHONE, 1.0, auth_now=T0 + 1).status \
        in allowed | {401}


def test_non_ascii_response_is_a_wrong_password_for_known_and_unknown_users() -> None:
    shapes = []
    for user in ("3001", "9999"):
        reg = make_registrar()
        params = right_params(challenge_for(reg, user), user)
        params["response"] = "é" * 64
        resp = reg.handle_register(with_header(phone_register(user=user, cseq=2),
                                               header_of(params)), PHONE, 1.0, auth_now=T0)
        assert resp.status == 401
        shapes.append(shape(resp))
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("ext_value", [
    "UTF-8''%ff%fe",         # not UTF-8
    "UTF-8''%e2%82",         # truncated sequence
    "UTF-8''%zz",            # not percent-encoding
    "UTF-8''30%",            # dangling %
    "idna''xn--a%2e",        # a codec that raised UnicodeError at 2554a5d
    "utf-16''%ff",
    "rot13''%61",
    "''3001",                # no charset
    "UTF-8'3001",            # one quote
    "UTF-8''",               # empty name
    "UTF-8''" + "%41" * 20_000 + "%ff",
])
def test_bad_username_star_gets_400(ext_value: str) -> None:
    reg = make_registrar()
    params = right_params(challenge_for(reg))
    del params["username"]
    params["username*"] = ext_value
    resp = reg.handle_register(with_header(phone_register(cseq=2), header_of(params)),
                               PHONE, 1.0, auth_now=T0)
    assert resp.status == 400, resp.status


def test_username_star_and_username_together_get_400() -> None:
    reg = make_registrar()
    params = right_params(challenge_for(reg))
    params["username*"] = "UTF-8''3001"
    resp = reg.handle_register(with_header(phone_register(cseq=2), header_of(params)),
                               PHONE, 1.0, auth_now=T0)
    assert resp.status == 400


def test_good_username_star_still_works() -> None:
    reg = make_registrar()
    params = right_params(challenge_for(reg))
    del params["username"]
    params["username*"] = "UTF-8''%33%30%30%31"
    resp = reg.handle_register(with_header(phone_register(cseq=2), header_of(params)),
                               PHONE, 1.0, auth_now=T0)
    assert resp.status == 200


# --------------------------------------------------------------------------- no oracle


def test_unknown_user_and_wrong_password_look_and_cost_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    digests: list[str] = []
    original: Callable[..., str] = auth_module.digest_response

    def counting(**kw: Any) -> str:
        digests.append(kw["username"])
        return original(**kw)

    monkeypatch.setattr(auth_module, "digest_response", counting)
    shapes, checked = [], []
    for user in ("3001", "9999", "2001"):  # known; unknown; known without a password
        reg = make_registrar()
        params = right_params(challenge_for(reg, user), user, password="wrong")
        digests.clear()
        resp = reg.handle_register(phone_register(header_of(params), user=user, cseq=2),
                                   PHONE, 1.0, auth_now=T0)
        shapes.append(shape(resp))
        checked.append(list(digests))
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0][0] == 401
    assert checked == [["3001"], ["9999"], ["2001"]]  # one digest computed for each


# --------------------------------------------------------------------------- qop, SHA-256


def test_qop_less_rfc2069_credentials_get_a_fresh_challenge() -> None:
    reg = make_registrar()
    first = challenge_for(reg)
    nonce = parse_challenge(first.headers.get_all("WWW-Authenticate")[0]).nonce
    response = digest_response(algorithm="SHA-256", username="3001", realm=REALM,
                               password="pw-3001", method="REGISTER", uri=URI, nonce=nonce)
    value = (f'Digest username="3001", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
             f'response="{response}", algorithm=SHA-256')
    resp = reg.handle_register(phone_register(value, cseq=2), PHONE, 1.0, auth_now=T0)
    assert resp.status == 401
    challenges = [parse_challenge(v) for v in resp.headers.get_all("WWW-Authenticate")]
    assert challenges and all(c.qop == ("auth",) and not c.stale for c in challenges)
    assert reg.lookup("3001", 1.0) == []


def test_sha256_is_offered_first_by_default() -> None:
    assert Settings().sip.digest_algorithms == ["SHA-256", "MD5"]
    shipped = load_config(str(ROOT / "config" / "pbx.toml"))
    assert shipped.sip.digest_algorithms[0] == "SHA-256"
    reg = Registrar(USERS, DigestAuthenticator(
        REALM, b"k" * 32, algorithms=tuple(Settings().sip.digest_algorithms)))
    algorithms = [parse_challenge(v).algorithm
                  for v in challenge_for(reg).headers.get_all("WWW-Authenticate")]
    assert algorithms == ["SHA-256", "MD5"]


# --------------------------------------------------------------------------- real front


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    # The config's own default algorithms (SHA-256 first), not the harness's sipp ones.
    s = start_system(tmp_path_factory.mktemp("pbx-digest-errors"), provider,
                     digest_algorithms=None)
    yield s
    s.stop()
    provider.close()


def test_real_front_offers_sha256_first_and_answers_garbage_without_500(
        system: PbxSystem, tmp_path: Path) -> None:
    server = ("127.0.0.1", system.sip_port)
    uri = f"sip:127.0.0.1:{system.sip_port}"
    shapes = []
    with RawSipClient(server, "127.0.0.4") as client:
        for user in ("3001", "9999"):
            first = client.send(client.request("REGISTER", user, call_id=f"c-{user}", cseq=1,
                                               contact=f"<sip:{user}@127.0.0.4:1>"))
            challenges = [parse_challenge(v) for v in first.headers.get_all("WWW-Authenticate")]
            assert [c.algorithm for c in challenges] == ["SHA-256", "MD5"]
            params = parse_auth_params(client_authorization(
                challenge=first.headers.get_all("WWW-Authenticate"), username=user,
                password=REGISTERING_USERS.get(user, "x"), method="REGISTER", uri=uri))[1]
            params["response"] = "é" * 64
            resp = client.send(client.request("REGISTER", user, call_id=f"c-{user}", cseq=2,
                                              contact=f"<sip:{user}@127.0.0.4:1>",
                                              authorization=header_of(params)))
            assert resp.status == 401, resp.status
            shapes.append((resp.status, resp.reason, sorted({n for n, _ in resp.headers.items()}),
                           len(resp.headers.get_all("WWW-Authenticate"))))
    assert shapes[0] == shapes[1]
