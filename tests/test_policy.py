"""The authorization policy (pbx.policy), pure: parties, destinations, decisions."""

from __future__ import annotations

import pytest

from pbx.config import parse_config
from pbx.policy import (
    PROVIDER,
    Destination,
    DestinationKind,
    Party,
    PartyKind,
    Policy,
    Verdict,
)

BASE = """
[sip]
listen = "192.0.2.10:5060"
realm = "pbx.example.net"

[[routes]]
name = "ivr"
to_user = "*99"
app = "ivr"
app_params = { url = "http://127.0.0.1:8080/ivr" }

[[routes]]
name = "staff"
to_user = "*77"
public = false
app = "ivr"
app_params = { url = "http://127.0.0.1:8080/ivr" }
"""


def policy(extra: str = "") -> Policy:
    return Policy(parse_config(BASE + extra))


def route(p: Policy, name: str) -> Destination:
    r = next(r for r in p.settings.routes if r.name == name)
    return Destination(DestinationKind.ROUTE, name, r)


ANON = Party(PartyKind.ANONYMOUS, "1001")
EXT = Party(PartyKind.EXTENSION, "2001")
TRUSTED = Party(PartyKind.TRUSTED, "+15551230000")
CONFIG = Party(PartyKind.CONFIG)
USER = Destination(DestinationKind.USER, "2001")
NOBODY = Destination(DestinationKind.NONE, "9999")
TOLL = Destination(DestinationKind.URI, "sip:+15551234567@203.0.113.9")


def test_an_unknown_caller_reaches_public_routes_only_and_is_challenged_otherwise() -> None:
    p = policy()
    assert p.decide(ANON, route(p, "ivr")).allowed
    # the same answer whether the user exists or not: nothing to enumerate
    for dest in (route(p, "staff"), USER, NOBODY, TOLL):
        decision = p.decide(ANON, dest)
        assert decision.verdict is Verdict.CHALLENGE and decision.status == 407, dest


@pytest.mark.parametrize("party", [EXT, TRUSTED, PROVIDER])
def test_our_parties_reach_users_and_every_route(party: Party) -> None:
    p = policy()
    for dest in (route(p, "ivr"), route(p, "staff"), USER):
        assert p.decide(party, dest).allowed, (party, dest)
    assert p.decide(party, NOBODY).status == 404


@pytest.mark.parametrize("party", [ANON, EXT, TRUSTED, PROVIDER])
def test_no_sip_uri_elsewhere_without_an_outbound_rule(party: Party) -> None:
    assert not policy().decide(party, TOLL).allowed


def test_an_outbound_rule_names_the_uris_and_who_may_use_them() -> None:
    p = policy("""
[[policy.outbound]]
match = '^sip:\\+1[0-9]{10}@203\\.0\\.113\\.9$'
callers = ["extension"]
""")
    assert p.decide(EXT, TOLL).allowed
    assert not p.decide(PROVIDER, TOLL).allowed  # not in callers
    assert not p.decide(EXT, Destination(DestinationKind.URI,
                                         "sip:+15551234567@203.0.113.9.evil.com")).allowed
    assert p.decide(ANON, TOLL).verdict is Verdict.CHALLENGE


def test_config_targets_need_only_exist() -> None:
    p = policy()
    assert p.decide(CONFIG, USER).allowed and p.decide(CONFIG, TOLL).allowed
    assert p.decide(CONFIG, NOBODY).status == 404


def test_authentication_is_asked_independently_of_the_user() -> None:
    p = policy()
    # a public route from a foreign From: no challenge, whoever the From user is
    assert not p.must_authenticate("198.51.100.7", None, route(p, "ivr"))
    # a From claiming our domain (realm, listen host) is challenged even on a public route
    assert p.must_authenticate("pbx.example.net", None, route(p, "ivr"))
    assert p.must_authenticate("192.0.2.10", 5060, route(p, "ivr"))
    assert not p.must_authenticate("192.0.2.10", 5061, route(p, "ivr"))  # another endpoint
    # ... but our domain name with any port still claims one of our users
    assert p.must_authenticate("pbx.example.net", 5099, route(p, "ivr"))
    assert p.must_authenticate("PBX.example.net", 5061, route(p, "ivr"))
    # anything but a public route: always
    for dest in (route(p, "staff"), USER, NOBODY):
        assert p.must_authenticate("198.51.100.7", None, dest)


def test_refer_needs_one_of_our_parties_or_a_route_that_allows_it() -> None:
    p = policy()
    assert p.may_refer(EXT, None) and p.may_refer(TRUSTED, None)
    assert not p.may_refer(ANON, route(p, "ivr").route)
    q = policy().settings.routes[0].model_copy(update={"allow_refer": True})
    assert p.may_refer(ANON, q)


def test_trusted_networks() -> None:
    p = policy('\n[policy]\ntrusted_networks = ["203.0.113.0/24"]\n')
    assert p.is_trusted_source("203.0.113.9")
    assert not p.is_trusted_source("203.0.114.1")
    assert not p.is_trusted_source("not an address")


def test_caller_id_is_policy_not_an_unverified_from() -> None:
    p = policy()
    assert p.presented_caller_id(EXT) == "2001"
    assert p.presented_caller_id(TRUSTED) == "+15551230000"
    assert p.presented_caller_id(Party(PartyKind.ANONYMOUS, "+15550001111")) == "anonymous"
    assert p.presented_caller_id(Party(PartyKind.TRUSTED, "x>;tag=1")) == "anonymous"
    loose = policy('\n[policy]\npass_untrusted_caller_id = true\n'
                   'anonymous_caller_id = "unknown"\n')
    assert loose.presented_caller_id(Party(PartyKind.ANONYMOUS, "+15550001111")) == "+15550001111"
    assert loose.presented_caller_id(Party(PartyKind.ANONYMOUS, "<evil>")) == "unknown"


def test_in_dialog_requests_come_from_the_peer() -> None:
    p = policy()
    assert p.in_dialog_source_ok("198.51.100.7", "198.51.100.7")
    assert not p.in_dialog_source_ok("198.51.100.7", "203.0.113.66")
    assert p.in_dialog_source_ok(None, "203.0.113.66")  # peer unknown: nothing to compare
    assert policy('\n[policy]\nin_dialog_source = "any"\n').in_dialog_source_ok(
        "198.51.100.7", "203.0.113.66")
