"""Transfer targets: what a target names, whether the asking party may dial it, and
where it is reached.

One policy for every way a call is sent somewhere (DESIGN §6): a REFER, a provider's
transfer or agent command, a queue member. `classify` turns a target (an extension, or
a SIP URI ours or elsewhere) into a policy destination; `resolve_all` finds every
place an extension (each binding: its static contact and its registrations) or a URI
is reached, `resolve` the first."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pbx.calls.context import CallContext, reason_phrase
from pbx.calls.state import Call
from pbx.policy import Destination, DestinationKind, Party
from pbx.sip.errors import SipError
from pbx.sip.uri import parse_uri

log = logging.getLogger("pbx.calls")

Addr = tuple[str, int]


def wants_tcp(uri_text: str) -> bool:
    """A SIP URI that asks for TCP (`;transport=tcp`, RFC 3261 §19.1.1)."""
    try:
        return (parse_uri(uri_text).params.get("transport") or "").lower() == "tcp"
    except SipError:
        return False


def with_tcp(uri_text: str) -> str:
    """The URI with `;transport=tcp` (before any `?headers`)."""
    base, sep, headers = uri_text.partition("?")
    return f"{base};transport=tcp{sep}{headers}"


class Targets:
    def __init__(self, ctx: CallContext, is_connected: Callable[[Addr], bool]) -> None:
        self.ctx = ctx
        # Whether a TCP connection to the address is open (a phone's registration flow).
        self.is_connected = is_connected

    def classify(self, target: str) -> Destination:
        """A transfer target as a policy destination; a URI naming this PBX is the
        extension of its user part."""
        user = target
        if target.lower().startswith(("sip:", "sips:")):
            try:
                uri = parse_uri(target)
            except SipError:
                return Destination(DestinationKind.NONE, target)
            if not self.ctx.policy.is_local(uri.host, uri.port):
                return Destination(DestinationKind.URI, target)
            user = uri.user or ""
        if user and self.ctx.registrar.lookup(user, self.ctx.now):
            return Destination(DestinationKind.USER, user)
        return Destination(DestinationKind.NONE, user)

    def authorize(self, call: Call, party: Party, target: str) -> str | None:
        """The target to dial for a transfer `party` asks for (a URI naming us becomes
        the extension), or None when the policy refuses it (the caller then ends the
        call with `TransferFailed(<target>)` and 403). A target nobody answers to is
        left to the dialling to find out (404, or a skill group's next member)."""
        destination = self.classify(target)
        decision = self.ctx.policy.decide(party, destination)
        if decision.allowed or decision.status == 404:
            return destination.name
        self.ctx.stats["transfers_refused"] += 1
        log.info("call %s: transfer to %r refused for a %s party", call.call_id,
                 reason_phrase(target, 80), party.kind.value)
        return None

    def resolve(self, target: str) -> tuple[str, str, int] | None:
        """Where to reach `target` once: its first binding (`resolve_all`), else None."""
        every = self.resolve_all(target)
        return every[0] if every else None

    def resolve_all(self, target: str) -> list[tuple[str, str, int]]:
        """Every place `target` is reached, as (Request-URI, host, port): an extension's
        bindings (its static contact, then its registered contacts by q, most recent
        first; pbx.registrar.lookup), else a SIP URI itself. One per address: a static
        contact and a registration of the same phone ring it once. A phone registered
        over UDP is reached where its REGISTER came from (it may be behind NAT); over
        TCP, on its registration connection while that is open (RFC 5626 §5.3 flow
        reuse), else at its Contact with `;transport=tcp`."""
        places: list[tuple[str, Addr | None]] = []
        for binding in self.ctx.registrar.lookup(target, self.ctx.now):
            uri_text, source = binding.uri, binding.source
            if (binding.transport or "").upper() == "TCP":
                if not wants_tcp(uri_text):
                    uri_text = with_tcp(uri_text)
                if source is not None and not self.is_connected(source):
                    source = None
            places.append((uri_text, source))
        if not places and target.startswith(("sip:", "sips:")):
            places.append((target, None))
        out: list[tuple[str, str, int]] = []
        seen: set[Addr] = set()
        for uri_text, source in places:
            if source is None:
                try:
                    uri = parse_uri(uri_text)
                except SipError:
                    continue
                source = (uri.host.strip("[]"), uri.port or 5060)
            if source not in seen:
                seen.add(source)
                out.append((uri_text, source[0], source[1]))
        return out
