"""Digest authentication (pbx.sip.auth): RFC test vectors, parsing, challenges, verify."""

from __future__ import annotations

import hashlib

import pytest

from pbx.sip.auth import AuthFailure, DigestAuthenticator
from pbx.sip.digest import (
    DigestChallenge,
    choose_challenge,
    client_authorization,
    digest_response,
    parse_auth_params,
    parse_challenge,
)
from pbx.sip.errors import SipError
from pbx.sip.grammar import quote_string
from pbx.sip.headers import Headers
from pbx.sip.message import SipRequest
from pbx.sip.nonces import Nonces

REALM = "pbx.example.com"
SECRET = b"0123456789abcdef-test-secret"
USERS = {"1001": "secret1", 'we"ird\\': "pw"}
T0 = 1_700_000_000.0  # a wall-clock-like virtual time


def lookup(name: str) -> str | None:
    return USERS.get(name)


def make_request(uri: str = "sip:pbx.example.com", method: str = "REGISTER",
                 authorization: list[str] | None = None, header: str = "Authorization",
                 body: bytes = b"") -> SipRequest:
    h = Headers([
        ("Via", "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK1"),
        ("From", "<sip:1001@pbx.example.com>;tag=a"),
        ("To", "<sip:1001@pbx.example.com>"),
        ("Call-ID", "c1"),
        ("CSeq", f"1 {method}"),
    ])
    for value in authorization or []:
        h.add(header, value)
    return SipRequest(method, uri, h, body)


def answer(auth: DigestAuthenticator, now: float, *, username: str = "1001",
           password: str = "secret1", algorithm_index: int = 0,
           uri: str = "sip:pbx.example.com", method: str = "REGISTER",
           challenged: SipRequest | None = None, **kw: object) -> str:
    """Credentials answering a challenge to `challenged` (default: the request that
    make_request builds, so the nonce is bound to its Call-ID and To)."""
    challenged = challenged or make_request(method=method)
    challenge = auth.challenge(now, request=challenged)[algorithm_index][1]
    return client_authorization(challenge=challenge, username=username, password=password,
                                method=method, uri=uri, **kw)  # type: ignore[arg-type]


@pytest.fixture
def auth() -> DigestAuthenticator:
    return DigestAuthenticator(REALM, SECRET, nonce_ttl_s=300)


# --------------------------------------------------------------------------- test vectors


def test_rfc2617_section_3_5_vector() -> None:
    assert digest_response(
        algorithm="MD5", username="Mufasa", realm="testrealm@host.com",
        password="Circle Of Life", method="GET", uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", qop="auth", nc="00000001",
        cnonce="0a4f113b",
    ) == "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_rfc7616_section_3_9_1_vectors(algorithm: str, expected: str) -> None:
    assert digest_response(
        algorithm=algorithm, username="Mufasa", realm="http-auth@example.org",
        password="Circle of Life", method="GET", uri="/dir/index.html",
        nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", qop="auth", nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    ) == expected


def test_rfc2069_form_without_qop() -> None:
    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    ha1 = md5("Mufasa:testrealm@host.com:Circle Of Life")
    ha2 = md5("GET:/dir/index.html")
    assert digest_response(
        algorithm="MD5", username="Mufasa", realm="testrealm@host.com",
        password="Circle Of Life", method="GET", uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
    ) == md5(f"{ha1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:{ha2}")


def test_sess_and_auth_int_forms() -> None:
    def sha(s: str | bytes) -> str:
        return hashlib.sha256(s if isinstance(s, bytes) else s.encode()).hexdigest()

    ha1 = sha(f"{sha('u:r:p')}:n:c")
    ha2 = sha(f"INVITE:sip:x@y:{sha(b'body')}")
    assert digest_response(
        algorithm="SHA-256-sess", username="u", realm="r", password="p", method="INVITE",
        uri="sip:x@y", nonce="n", qop="auth-int", nc="00000001", cnonce="c", body=b"body",
    ) == sha(f"{ha1}:n:00000001:c:auth-int:{ha2}")


# --------------------------------------------------------------------------- parsing


def test_parse_auth_params_quoted_strings_escapes_and_commas() -> None:
    scheme, p = parse_auth_params(
        'Digest username="a\\"b\\\\c", realm="x, y", nonce=abc ,, uri="sip:a@b;x=1",'
        ' qop=auth , NC=00000001,response="ff"'
    )
    assert scheme == "digest"
    assert p == {"username": 'a"b\\c', "realm": "x, y", "nonce": "abc",
                 "uri": "sip:a@b;x=1", "qop": "auth", "nc": "00000001", "response": "ff"}


@pytest.mark.parametrize("value", [
    "",
    "Digest realm",
    'Digest realm="unterminated',
    "Digest realm=a realm=b",
    "Digest realm=a, realm=b",
    'Digest realm="a"x',
    "Digest realm=,",
    "=x",
])
def test_parse_auth_params_rejects_malformed(value: str) -> None:
    with pytest.raises(SipError):
        parse_auth_params(value)


def test_quote_string_round_trips() -> None:
    text = 'he said "hi" \\o/'
    _, p = parse_auth_params(f"Digest username={quote_string(text)}")
    assert p["username"] == text


# --------------------------------------------------------------------------- challenges


def test_challenge_one_header_per_algorithm_sha256_first(auth: DigestAuthenticator) -> None:
    headers = auth.challenge(T0)
    assert [name for name, _ in headers] == ["WWW-Authenticate", "WWW-Authenticate"]
    first, second = (parse_challenge(v) for _, v in headers)
    assert (first.algorithm, second.algorithm) == ("SHA-256", "MD5")
    assert first.realm == REALM and first.qop == ("auth",) and not first.stale
    assert first.nonce != second.nonce
    assert auth.nonces.age_s(first.nonce, T0 + 10) == pytest.approx(10)


def test_challenge_proxy_stale_and_algorithm_choice(auth: DigestAuthenticator) -> None:
    headers = auth.challenge(T0, stale=True, algorithms=("MD5",), proxy=True)
    assert len(headers) == 1
    name, value = headers[0]
    assert name == "Proxy-Authenticate"
    ch = parse_challenge(value)
    assert ch.stale and ch.algorithm == "MD5"


def test_choose_challenge_skips_unknown_algorithms() -> None:
    ch = choose_challenge([
        'Basic realm="x"',
        'Digest realm="r", nonce="n1", algorithm=SHA-512-256',
        'Digest realm="r", nonce="n2", algorithm=MD5',
    ])
    assert ch.nonce == "n2"
    with pytest.raises(SipError):
        choose_challenge(['Digest realm="r", nonce="n", algorithm=SHA-512-256'])


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("index", [0, 1])
def test_verify_accepts_sha256_and_md5(auth: DigestAuthenticator, index: int) -> None:
    req = make_request(authorization=[answer(auth, T0, algorithm_index=index)])
    result = auth.verify(req, lookup, T0 + 1)
    assert result.ok and result.username == "1001" and result.status == 200


def test_verify_refuses_rfc2069_credentials_without_qop(auth: DigestAuthenticator) -> None:
    # RFC 2069 responses carry no nc/cnonce, so they cannot be protected against replay.
    req = make_request()
    nonce = auth.nonces.make(T0, req)
    response = digest_response(algorithm="MD5", username="1001", realm=REALM,
                               password="secret1", method="REGISTER",
                               uri="sip:pbx.example.com", nonce=nonce)
    value = (f'Digest username="1001", realm="{REALM}", nonce="{nonce}", '
             f'uri="sip:pbx.example.com", response="{response.upper()}"')
    result = auth.verify(make_request(authorization=[value]), lookup, T0)
    assert result.reason is AuthFailure.QOP_REQUIRED
    assert result.status == 401 and not result.stale and not result.is_guess


def test_verify_auth_int_and_sess(auth: DigestAuthenticator) -> None:
    nonce = auth.nonces.make(T0, make_request(uri="sip:2001@pbx", method="INVITE"))
    response = digest_response(algorithm="SHA-256-sess", username="1001", realm=REALM,
                               password="secret1", method="INVITE", uri="sip:2001@pbx",
                               nonce=nonce, qop="auth-int", nc="00000002", cnonce="cn",
                               body=b"v=0\r\n")
    value = (f'Digest username="1001", realm="{REALM}", nonce="{nonce}", uri="sip:2001@pbx", '
             f'response="{response}", algorithm=SHA-256-sess, qop=auth-int, nc=00000002, '
             f'cnonce="cn"')
    req = make_request(uri="sip:2001@pbx", method="INVITE", authorization=[value],
                       body=b"v=0\r\n")
    assert auth.verify(req, lookup, T0).ok


def test_verify_username_with_escapes(auth: DigestAuthenticator) -> None:
    value = answer(auth, T0, username='we"ird\\', password="pw")
    result = auth.verify(make_request(authorization=[value]), lookup, T0)
    assert result.ok and result.username == 'we"ird\\'


def test_verify_missing_credentials(auth: DigestAuthenticator) -> None:
    result = auth.verify(make_request(), lookup, T0)
    assert not result.ok and result.reason is AuthFailure.MISSING_CREDENTIALS
    assert result.status == 401 and not result.stale


def test_verify_unknown_user_and_wrong_password_look_alike(auth: DigestAuthenticator) -> None:
    unknown = auth.verify(make_request(authorization=[answer(auth, T0, username="9999")]),
                          lookup, T0)
    wrong = auth.verify(make_request(authorization=[answer(auth, T0, password="nope")]),
                        lookup, T0)
    assert unknown.reason is AuthFailure.UNKNOWN_USER
    assert wrong.reason is AuthFailure.WRONG_RESPONSE and wrong.username == "1001"
    assert unknown.status == wrong.status == 401


def test_verify_stale_nonce_only_with_a_right_digest(auth: DigestAuthenticator) -> None:
    good = make_request(authorization=[answer(auth, T0)])
    assert auth.verify(good, lookup, T0 + 300).ok
    stale = auth.verify(good, lookup, T0 + 301)
    assert stale.reason is AuthFailure.STALE_NONCE and stale.stale and stale.status == 401
    bad = make_request(authorization=[answer(auth, T0, password="nope")])
    assert auth.verify(bad, lookup, T0 + 301).reason is AuthFailure.WRONG_RESPONSE


def test_verify_nonce_from_the_future_or_forged(auth: DigestAuthenticator) -> None:
    future = make_request(authorization=[answer(auth, T0 + 60)])
    assert auth.verify(future, lookup, T0).reason is AuthFailure.BAD_NONCE
    value = answer(auth, T0)
    nonce = parse_auth_params(value)[1]["nonce"]
    issued, instance, salt, binding, mac = nonce.split(".")
    for forged_nonce in (f"{int(issued, 16) + 1000:x}.{instance}.{salt}.{binding}.{mac}",
                         f"{issued}.{instance}.{salt}.x.{mac}",  # unbinding it
                         "not-a-nonce"):
        forged = value.replace(nonce, forged_nonce)
        assert auth.verify(make_request(authorization=[forged]), lookup, T0).reason \
            is AuthFailure.BAD_NONCE


def test_nonce_of_another_instance_with_the_same_secret_is_stale(
        auth: DigestAuthenticator) -> None:
    """Fronts sharing the secret recognise each other's nonces but accept only their own
    (their replay tables are separate): a right digest gets stale=true, one round trip."""
    req = make_request(authorization=[answer(auth, T0)])
    other = DigestAuthenticator(REALM, SECRET).verify(req, lookup, T0 + 5)
    assert other.reason is AuthFailure.FOREIGN_NONCE and other.stale and other.status == 401
    wrong = make_request(authorization=[answer(auth, T0, password="nope")])
    assert DigestAuthenticator(REALM, SECRET).verify(wrong, lookup, T0 + 5).reason \
        is AuthFailure.WRONG_RESPONSE
    unrelated = DigestAuthenticator(REALM, b"another secret").verify(req, lookup, T0 + 5)
    assert unrelated.reason is AuthFailure.BAD_NONCE and not unrelated.stale
    assert auth.verify(req, lookup, T0 + 5).ok


def test_verify_realm_mismatch_and_choice_among_several_headers(
        auth: DigestAuthenticator) -> None:
    foreign = DigestAuthenticator("other.example.com", SECRET)
    theirs = answer(foreign, T0)
    result = auth.verify(make_request(authorization=[theirs]), lookup, T0)
    assert result.reason is AuthFailure.REALM_MISMATCH and result.status == 401
    both = make_request(authorization=[theirs, answer(auth, T0)])
    assert auth.verify(both, lookup, T0).ok


def test_verify_uri_must_match_request_uri(auth: DigestAuthenticator) -> None:
    value = answer(auth, T0, uri="sip:elsewhere.example.com")
    result = auth.verify(make_request(authorization=[value]), lookup, T0)
    assert result.reason is AuthFailure.BAD_URI and result.status == 400
    # Same resource written differently (host case, parameters) is accepted.
    value = answer(auth, T0, uri="sip:PBX.example.com;transport=udp")
    assert auth.verify(make_request(authorization=[value]), lookup, T0).ok


def test_verify_algorithm_policy() -> None:
    sha_only = DigestAuthenticator(REALM, SECRET, algorithms=("SHA-256",))
    assert len(sha_only.challenge(T0)) == 1
    md5 = client_authorization(
        challenge=DigestChallenge(REALM, sha_only.nonces.make(T0), "MD5", ("auth",)),
        username="1001", password="secret1", method="REGISTER", uri="sip:pbx.example.com")
    result = sha_only.verify(make_request(authorization=[md5]), lookup, T0)
    assert result.reason is AuthFailure.UNSUPPORTED_ALGORITHM and result.status == 401
    with pytest.raises(ValueError):
        DigestAuthenticator(REALM, SECRET, algorithms=("SHA-512",))


@pytest.mark.parametrize("mutate", [
    lambda v: v.replace("nc=00000001", "nc=1"),
    lambda v: v.replace(", cnonce=", ", xcnonce="),
    lambda v: v.replace("qop=auth", "qop=auth-conf"),
    lambda v: v.replace("username=", "xusername="),
    lambda v: v + ', realm="dup"',
    lambda v: v + ", userhash=true",
])
def test_verify_malformed_credentials(auth: DigestAuthenticator, mutate: object) -> None:
    value = mutate(answer(auth, T0, cnonce="abc"))  # type: ignore[operator]
    result = auth.verify(make_request(authorization=[value]), lookup, T0)
    assert not result.ok
    # A duplicated realm makes the header unparsable; the others are missing or bad fields.
    assert result.reason is AuthFailure.MALFORMED and result.status == 400


def test_verify_as_proxy(auth: DigestAuthenticator) -> None:
    value = answer(auth, T0)
    req = make_request(authorization=[value], header="Proxy-Authorization")
    assert auth.verify(req, lookup, T0, proxy=True).ok
    missing = auth.verify(req, lookup, T0)  # no Authorization header
    assert missing.reason is AuthFailure.MISSING_CREDENTIALS
    wrong = auth.verify(make_request(authorization=[answer(auth, T0, password="x")],
                                     header="Proxy-Authorization"), lookup, T0, proxy=True)
    assert wrong.status == 407


def test_verify_username_star(auth: DigestAuthenticator) -> None:
    ch = parse_challenge(auth.challenge(T0, request=make_request())[0][1])
    response = digest_response(algorithm="SHA-256", username="1001", realm=REALM,
                               password="secret1", method="REGISTER",
                               uri="sip:pbx.example.com", nonce=ch.nonce, qop="auth",
                               nc="00000001", cnonce="c")
    value = (f"Digest username*=UTF-8''%31%30%30%31, realm=\"{REALM}\", nonce=\"{ch.nonce}\", "
             f'uri="sip:pbx.example.com", response="{response}", algorithm=SHA-256, '
             f'qop=auth, nc=00000001, cnonce="c"')
    result = auth.verify(make_request(authorization=[value]), lookup, T0)
    assert result.ok and result.username == "1001"


def test_nonces_bound_to_request_and_instance_used_once_per_count() -> None:
    nonces = Nonces(REALM, SECRET, ttl_s=300, table_size=2)
    req = make_request()
    issued = nonces.check(nonces.make(T0, req), T0 + 1)
    assert issued is not None and issued.age_s == pytest.approx(1)
    assert nonces.is_ours(issued) and nonces.is_bound_to(issued, req)
    other = make_request()
    other.headers.set("Call-ID", "c2")
    assert not nonces.is_bound_to(issued, other)
    unbound = nonces.check(nonces.make(T0), T0)
    assert unbound is not None and nonces.is_bound_to(unbound, other)
    assert not Nonces(REALM, SECRET).is_ours(issued)  # same secret, another instance
    assert Nonces(REALM, b"another secret").check(nonces.make(T0), T0) is None
    assert nonces.check(nonces.make(T0 + 60), T0) is None  # from the future
    assert not nonces.is_stale(issued) and nonces.last_count(issued) is None
    nonces.record_use(issued, 3, T0 + 1)
    assert nonces.last_count(issued) == 3 and nonces.tracked == 1
    older = nonces.check(nonces.make(T0 - 400, req), T0)
    assert older is not None and nonces.is_stale(older)  # past ttl_s
    for _ in range(2):  # the table holds 2: the first entry goes, with every older nonce
        fresh = nonces.check(nonces.make(T0 + 2, req), T0 + 2)
        assert fresh is not None
        nonces.record_use(fresh, 1, T0 + 2)
    assert nonces.evictions == 1 and nonces.tracked == 2 and nonces.is_stale(issued)


# --------------------------------------------------------------------------- client helper


def test_client_authorization_fields_and_opaque() -> None:
    value = client_authorization(
        challenge=['Digest realm="r", nonce="n", algorithm=SHA-256, qop="auth,auth-int", '
                   'opaque="o,1"', 'Digest realm="r", nonce="m", algorithm=MD5'],
        username="u", password="p", method="INVITE", uri="sip:x@y", cnonce="cn", nc=3)
    scheme, p = parse_auth_params(value)
    assert scheme == "digest"
    assert p["algorithm"] == "SHA-256" and p["nonce"] == "n" and p["opaque"] == "o,1"
    assert p["qop"] == "auth" and p["nc"] == "00000003" and p["cnonce"] == "cn"
    assert p["response"] == digest_response(
        algorithm="SHA-256", username="u", realm="r", password="p", method="INVITE",
        uri="sip:x@y", nonce="n", qop="auth", nc="00000003", cnonce="cn")


def test_client_authorization_without_qop() -> None:
    value = client_authorization(challenge='Digest realm="r", nonce="n"', username="u",
                                 password="p", method="REGISTER", uri="sip:r")
    p = parse_auth_params(value)[1]
    assert "qop" not in p and "cnonce" not in p and p["algorithm"] == "MD5"
