"""SIP dialogs (RFC 3261 §12): the state a dialog keeps and the requests built from it.

Pure: no sockets, no clock. A `Dialog` is what one side of a dialog remembers (Call-ID,
tags, the parties' header values, the remote target, the route set, our CSeq); the
functions here build it from the request or response that creates it and build every
request sent in it. The call layer (`pbx.calls`) owns dialogs, one per leg.

* `uas_from_invite` — the dialog an initial INVITE creates on our side (§12.1.1).
* `uac_for_target` — the early dialog of an INVITE we send (§12.1.2 before the 2xx).
* `learn_2xx` — what the 2xx to our INVITE establishes (§12.1.2).
* `in_order` — whether a request of the peer comes in order (§12.2.2).
* `new_request` — a request in the dialog (§12.2.1.1): BYE, UPDATE, NOTIFY, INVITE.
* `ack_2xx` — the ACK for a 2xx (§13.2.2.4), which is a request of the dialog too.
* `next_hop` — where requests in the dialog go (loose routing, §12.2.1.1).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pbx.sip.errors import SipError
from pbx.sip.grammar import memoized
from pbx.sip.headers import Headers
from pbx.sip.message import SipRequest, SipResponse, new_branch
from pbx.sip.uri import parse_name_addr, parse_uri

Addr = tuple[str, int]
USER_AGENT = "pbx/0.1"


@dataclass(frozen=True)
class LocalAddress:
    """How we name ourselves in a dialog: the advertised host and port."""

    host: str
    port: int

    def via(self, reliable: bool) -> str:
        transport = "TCP" if reliable else "UDP"
        return f"SIP/2.0/{transport} {self.host}:{self.port};branch={new_branch()};rport"

    def contact(self, reliable: bool = False) -> str:
        transport = ";transport=tcp" if reliable else ""
        return f"<sip:pbx@{self.host}:{self.port}{transport}>"


@dataclass
class Dialog:
    """One side of a dialog. `local_party`/`remote_party` are the From/To header values
    (ours with our tag); `route_set` is in the order requests carry it."""

    call_id: str
    local_tag: str
    local_party: str = ""
    remote_party: str = ""
    remote_target: str = ""  # the peer's Contact URI
    remote_tag: str | None = None
    local_cseq: int = 0
    remote_cseq: int | None = None  # the peer's last request's CSeq (§12.2.2)
    route_set: list[str] = field(default_factory=list)
    reliable: bool = False  # over TCP: no retransmissions (RFC 3261 §18)

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.local_tag)

    def to_dict(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "local_tag": self.local_tag,
                "local_party": self.local_party, "remote_party": self.remote_party,
                "remote_target": self.remote_target, "remote_tag": self.remote_tag,
                "local_cseq": self.local_cseq, "remote_cseq": self.remote_cseq,
                "route_set": list(self.route_set),
                "reliable": self.reliable}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Dialog:
        return cls(**{**data, "route_set": list(data["route_set"])})


@memoized  # next_hop asks for every dialog; the same few hosts come again and again
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@memoized
def _uri_text(value: str) -> str:
    """The URI of a name-addr value (Contact, From), as text; SipError if malformed."""
    return str(parse_name_addr(value).uri)


def uas_from_invite(req: SipRequest, local_tag: str, reliable: bool) -> Dialog:
    """The dialog an initial INVITE creates on the UAS side (RFC 3261 §12.1.1): the
    route set is the Record-Route list in order; the remote target its Contact (else
    its From URI)."""
    contact = req.headers.get("Contact")
    remote_from = req.headers.get("From") or ""
    return Dialog(
        call_id=req.call_id, local_tag=local_tag,
        local_party=f"{req.headers.get('To') or ''};tag={local_tag}",
        remote_party=remote_from, remote_tag=req.from_tag,
        remote_target=_uri_text(contact or remote_from),
        remote_cseq=req.cseq[0], route_set=req.headers.get_all("Record-Route"),
        reliable=reliable)


def uac_for_target(call_id: str, local_tag: str, local_party: str, target_uri: str,
                   reliable: bool) -> Dialog:
    """The dialog of an INVITE we send to `target_uri`, before any answer."""
    return Dialog(call_id=call_id, local_tag=local_tag,
                  local_party=f"{local_party};tag={local_tag}",
                  remote_party=f"<{target_uri}>", remote_target=target_uri,
                  reliable=reliable)


def learn_2xx(dialog: Dialog, resp: SipResponse) -> None:
    """The dialog state a 2xx to our INVITE establishes (RFC 3261 §12.1.2): the peer's
    tag and To, the UAC route set (Record-Route reversed) and its Contact."""
    dialog.remote_tag = resp.to_tag
    dialog.remote_party = resp.headers.get("To") or dialog.remote_party
    dialog.route_set = list(reversed(resp.headers.get_all("Record-Route")))
    dialog.remote_target = contact_uri(resp, dialog.remote_target)


def contact_uri(msg: SipRequest | SipResponse, default: str) -> str:
    """The message's Contact URI, else `default` (a missing or unreadable Contact)."""
    contact = msg.headers.get("Contact")
    if contact:
        try:
            return _uri_text(contact)
        except SipError:
            pass
    return default


def forked(dialog: Dialog, resp: SipResponse) -> Dialog:
    """The dialog a 2xx from another fork than the one we kept would establish (to be
    ACKed and ended at once, RFC 3261 §13.2.2.4)."""
    return Dialog(call_id=dialog.call_id, local_tag=dialog.local_tag,
                  local_party=dialog.local_party,
                  remote_party=resp.headers.get("To") or dialog.remote_party,
                  remote_tag=resp.to_tag,
                  remote_target=contact_uri(resp, dialog.remote_target),
                  local_cseq=dialog.local_cseq + 100, route_set=list(dialog.route_set),
                  reliable=dialog.reliable)


def in_order(dialog: Dialog, req: SipRequest) -> bool:
    """RFC 3261 §12.2.2: a request of the peer whose CSeq is below its last one in the
    dialog is out of order (to be refused with 500); else its CSeq is the last now."""
    cseq = req.cseq[0]
    if dialog.remote_cseq is not None and cseq < dialog.remote_cseq:
        return False
    dialog.remote_cseq = cseq
    return True


def new_request(dialog: Dialog, me: LocalAddress, method: str,
                extra: list[tuple[str, str]] | None = None, body: bytes = b"",
                content_type: str | None = None) -> SipRequest:
    """A request in the dialog (RFC 3261 §12.2.1.1), with the next CSeq."""
    dialog.local_cseq += 1
    h = _base_headers(dialog, me, dialog.remote_party, f"{dialog.local_cseq} {method}")
    h.add("Contact", me.contact(dialog.reliable))
    h.add("User-Agent", USER_AGENT)
    for name, value in extra or []:
        h.add(name, value)
    if body:
        h.add("Content-Type", content_type or "application/sdp")
    return SipRequest(method, dialog.remote_target, h, body)


def ack_2xx(dialog: Dialog, me: LocalAddress, invite_cseq: int) -> SipRequest:
    """The ACK for a 2xx to our INVITE (RFC 3261 §13.2.2.4): a new transaction in the
    dialog, with the INVITE's CSeq number."""
    h = _base_headers(dialog, me, dialog.remote_party, f"{invite_cseq} ACK")
    return SipRequest("ACK", dialog.remote_target, h)


def _base_headers(dialog: Dialog, me: LocalAddress, to: str, cseq: str) -> Headers:
    h = Headers()
    h.add("Via", me.via(dialog.reliable))
    h.add("Max-Forwards", "70")
    h.add("From", dialog.local_party)
    h.add("To", to)
    h.add("Call-ID", dialog.call_id)
    h.add("CSeq", cseq)
    for route in dialog.route_set:
        h.add("Route", route)
    return h


def next_hop(dialog: Dialog, fallback: Addr) -> Addr:
    """Where in-dialog requests go: the first Route, else the remote target (RFC 3261
    §12.2.1.1, loose routing). A target we cannot send to directly (a host name: no
    DNS on this path) falls back to where the peer's packets came from."""
    target = dialog.remote_target
    if dialog.route_set:
        try:
            target = str(parse_name_addr(dialog.route_set[0]).uri)
        except SipError:
            return fallback
    try:
        uri = parse_uri(target)
    except SipError:
        return fallback
    host = uri.host.strip("[]")
    return (host, uri.port or 5060) if is_ip(host) else fallback
