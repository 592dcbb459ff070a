"""Call authorization: who may create a leg or reach a user (DESIGN §6), pure.

Theory of operation
-------------------
Everything that can make the PBX ring someone goes through `Policy.decide`:
an initial INVITE, a REFER, a provider's `transfer` / `route_to_agent` target
and a queue member. The question is always the same: may this *party* reach
this *destination*?

Parties (`PartyKind`):

* `EXTENSION`: a caller that proved a user's password (digest, RFC 3261 §22).
* `TRUSTED`: a source in `[policy] trusted_networks` (a trunk or an SBC that
  authenticates its own users): may reach what an extension may.
* `PROVIDER`: the route's step-mode IVR, acting for the route's owner.
* `CONFIG`: a destination written in the config (a queue or skill group member).
* `ANONYMOUS`: anyone else (an unknown source, whatever its From says).

Destinations (`Destination`): a route (public or not), one of our users, a SIP
URI outside our users and routes, or nothing.

Rules:

* A public route: anyone. A non-public route or a user: extensions, trusted
  sources, the provider and the config; an anonymous party never.
* A SIP URI elsewhere (toll fraud's door): only through an `[[policy.outbound]]`
  rule whose regex matches the whole URI and whose `callers` name the party's
  kind. None by default.
* Nothing: 404 for a party allowed to know what exists; see below for strangers.

Enumeration (sipvicious `svwar` and friends) works by comparing answers. So an
anonymous INVITE for anything but a public route gets the *same* 407 challenge
whether the user exists or not, as Asterisk's `alwaysauthreject` does; and an
INVITE whose From claims one of our domains is challenged whatever its user is,
so a From user's existence changes nothing either. Once credentials are right,
the answers may differ (404, 403): the caller is one of ours.

The caller ID on an outbound leg is policy too (`presented_caller_id`): an
extension presents itself, a trusted source its From user; an anonymous
caller presents `anonymous_caller_id` unless `pass_untrusted_caller_id` lets a
phone-number-shaped From user through.

No I/O and no clock: the front asks, acts on the answer.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum

from pbx.config import RouteSettings, Settings

# A caller ID we pass on from an unverified From: digits and the dial characters.
_PHONE_NUMBER_RE = re.compile(r"\+?[0-9*#]{1,32}")


class PartyKind(Enum):
    EXTENSION = "extension"
    TRUSTED = "trusted"
    PROVIDER = "provider"
    CONFIG = "config"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Party:
    """Who asks: `user` is the authenticated extension (EXTENSION), the From user as
    given (TRUSTED, ANONYMOUS), or None."""

    kind: PartyKind
    user: str | None = None

    @property
    def is_anonymous(self) -> bool:
        return self.kind is PartyKind.ANONYMOUS


# The route's IVR asking for a transfer or an agent.
PROVIDER = Party(PartyKind.PROVIDER)


class DestinationKind(Enum):
    ROUTE = "route"
    USER = "user"
    URI = "uri"
    NONE = "none"


@dataclass(frozen=True)
class Destination:
    kind: DestinationKind
    name: str = ""  # the user, the route's name, or the URI
    route: RouteSettings | None = None

    @property
    def public_route(self) -> bool:
        return self.route is not None and self.route.public


class Verdict(Enum):
    ALLOW = "allow"
    CHALLENGE = "challenge"  # 407: credentials could change the answer
    DENY = "deny"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    status: int = 200
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


ALLOW = Decision(Verdict.ALLOW)
CHALLENGE = Decision(Verdict.CHALLENGE, 407, "Proxy Authentication Required")


class Policy:
    """The authorization rules of one front, from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        policy = settings.policy
        self.trusted_networks = tuple(ipaddress.ip_network(net, strict=False)
                                      for net in policy.trusted_networks)
        host, port = settings.sip.advertised_host_port
        listen_host, listen_port = settings.sip.host_port
        self.port = port
        self.local_ports = {port, listen_port}
        self.local_hosts = {h.lower().strip("[]") for h in
                            (host, listen_host, settings.sip.realm, *policy.domains)}
        # Our names (not IP literals): a From naming one claims one of our users whatever
        # port it adds, while our IP with another port is another UA on this host.
        self.local_domains = {h for h in self.local_hosts if not _is_ip_literal(h)}
        self.outbound = [(re.compile(rule.match), frozenset(rule.callers))
                         for rule in policy.outbound]

    # ------------------------------------------------------------ who

    def is_trusted_source(self, ip: str) -> bool:
        if not self.trusted_networks:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_networks)

    def is_local(self, host: str, port: int | None) -> bool:
        """A URI host (and port) naming this PBX: our advertised or listen host, the
        realm, or a configured domain; a port other than ours names someone else."""
        return (host.lower().strip("[]") in self.local_hosts
                and (port is None or port in self.local_ports))

    def must_authenticate(self, from_host: str, from_port: int | None,
                          destination: Destination) -> bool:
        """Whether an INVITE without (valid) credentials gets a 407: for anything but a
        public route, and whenever its From claims one of our domains. Neither depends
        on whether a user exists (see the module docstring)."""
        if self.is_local(from_host, from_port):
            return True
        if from_host.lower().strip("[]") in self.local_domains:
            return True
        return not destination.public_route

    # ------------------------------------------------------------ what

    def decide(self, party: Party, destination: Destination) -> Decision:
        """May `party` reach `destination`?"""
        kind, dest = party.kind, destination.kind
        if kind is PartyKind.CONFIG:
            return ALLOW if dest is not DestinationKind.NONE else _not_found()
        if dest is DestinationKind.ROUTE and destination.public_route:
            return ALLOW
        if dest is DestinationKind.URI:
            if self.outbound_allowed(kind, destination.name):
                return ALLOW
            if kind is PartyKind.ANONYMOUS:
                return CHALLENGE
            return Decision(Verdict.DENY, 403, "Forbidden (destination not allowed)")
        if kind is PartyKind.ANONYMOUS:
            return CHALLENGE
        if dest is DestinationKind.NONE:
            return _not_found()
        return ALLOW

    def outbound_allowed(self, kind: PartyKind, uri: str) -> bool:
        """An `[[policy.outbound]]` rule matches the whole URI and lets `kind` use it."""
        return any(kind.value in callers and pattern.fullmatch(uri)
                   for pattern, callers in self.outbound)

    def may_refer(self, party: Party, route: RouteSettings | None) -> bool:
        """RFC 3515 REFER: parties of ours may ask for a transfer; an anonymous one
        only on a route that says `allow_refer` (its target still passes `decide`)."""
        if not party.is_anonymous:
            return True
        return route is not None and route.allow_refer

    # ------------------------------------------------------------ how

    def presented_caller_id(self, party: Party) -> str:
        """The user part we put in an outbound leg's From."""
        if party.kind is PartyKind.EXTENSION and party.user:
            return party.user
        user = party.user or ""
        if party.kind is PartyKind.TRUSTED and _PHONE_NUMBER_RE.fullmatch(user):
            return user
        if (party.kind is PartyKind.ANONYMOUS and self.settings.policy.pass_untrusted_caller_id
                and _PHONE_NUMBER_RE.fullmatch(user)):
            return user
        return self.settings.policy.anonymous_caller_id

    def in_dialog_source_ok(self, dialog_peer_ip: str | None, source_ip: str) -> bool:
        """A request inside a dialog (BYE, re-INVITE, UPDATE, REFER, INFO) must come
        from the address the dialog's peer uses: a stranger who learned the dialog's
        tags cannot hang it up, move its media or press its keys."""
        if self.settings.policy.in_dialog_source == "any" or dialog_peer_ip is None:
            return True
        return dialog_peer_ip == source_ip


def _not_found() -> Decision:
    return Decision(Verdict.DENY, 404, "Not Found")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
