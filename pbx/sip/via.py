"""The Via header value (RFC 3261 §20.42, §18.2.1; RFC 3581 rport), sans-IO.

`parse_via` reads one Via value (`SIP/2.0/UDP host:port;branch=...`) into a
frozen `Via` whose `str()` serialises it again; `SipError` (400) on anything
malformed. The branch identifies a transaction (`pbx.sip.transaction`), the
sent-by and `received`/`rport` say where responses go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import (
    FAST_PATH_MAX_LEN,
    TOKEN,
    format_params,
    is_digits,
    memoized,
    parse_params,
)
from pbx.sip.uri import parse_hostport

_VIA_PROTO_RE = re.compile(
    r"\s*(" + TOKEN + r")\s*/\s*(" + TOKEN + r")\s*/\s*(" + TOKEN + r")\s+(.*)", re.DOTALL
)

# The common form, `SIP/2.0/UDP host[:port];name=value;flag...` with token-only params,
# in one match: each part ends at a character the next cannot hold (no backtracking,
# linear). Anything else (LWS, IPv6, quoted values, odd case) takes the general parser.
_VIA_SIMPLE_RE = re.compile(
    r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9_\-.]+)(?::([0-9]{1,5}))?"
    r"((?:;" + TOKEN + r"(?:=" + TOKEN + r")?)*)"
)


@dataclass(frozen=True)
class Via:
    """One Via value (RFC 3261 §20.42). `host` keeps IPv6 brackets."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str:
        return self.params.get("branch") or ""

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The rport value filled in by a server (RFC 3581), None if absent or empty."""
        value = self.params.get("rport")
        if value is None or len(value) > 5 or not is_digits(value):
            return None
        return int(value)

    @property
    def wants_rport(self) -> bool:
        """True when the client asked for rport (RFC 3581 §3)."""
        return "rport" in self.params

    @property
    def sent_by(self) -> str:
        host = self.host.lower()
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"SIP/2.0/{self.transport} {hostport}{format_params(self.params)}"


@memoized
def parse_via(value: str) -> Via:
    if not isinstance(value, str):
        raise SipError("Via must be text")
    simple = _VIA_SIMPLE_RE.fullmatch(value) if len(value) <= FAST_PATH_MAX_LEN else None
    if simple is not None:
        transport, host, port_text, param_text = simple.groups()
        port = None if port_text is None else int(port_text)
        if port is None or port <= 65535:
            params: dict[str, str | None] = {}
            if param_text:
                # Checked by the pattern: each part is `token` or `token=token`.
                for part in param_text[1:].split(";"):
                    name, eq, arg = part.partition("=")
                    params[name.lower()] = arg if eq else None
            return Via(transport.upper(), host, port, params)
    m = _VIA_PROTO_RE.fullmatch(value)
    if not m:
        raise SipError(f"bad Via {excerpt(value)}")
    name, version, transport, rest = m.groups()
    if name.upper() != "SIP" or version != "2.0":
        raise SipError(f"bad Via protocol {excerpt(name + '/' + version)}")
    sent_by, semi, param_text = rest.partition(";")
    # sent-by = host [ COLON port ], and COLON allows LWS around it. (Split, not a
    # `\s*:\s*` substitution: that rescans a long run of spaces from each of its
    # positions, quadratic in the run.)
    sent_by = ":".join(part.strip() for part in sent_by.split(":")).strip()
    if not sent_by:
        raise SipError(f"missing sent-by in Via {excerpt(value)}")
    host, port = parse_hostport(sent_by, "Via")
    params = parse_params(semi + param_text)  # (the same dict as the fast path's)
    return Via(transport.upper(), host, port, params)
