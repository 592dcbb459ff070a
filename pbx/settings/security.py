"""Security settings: `[auth]`, `[policy]` (with `[[policy.outbound]]`), `[limits]` and
`[privacy]`: who may do what, how much one source may hold, and what stays secret
(SECURITY.md lists the defence behind each key). Part of `Settings` (`pbx.config`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pbx.redact import DEFAULT_SECRET_HEADERS
from pbx.settings.base import NetworkList, Section


class OutboundRule(Section):
    """`[[policy.outbound]]`: SIP URIs outside our users and routes that may be called."""

    match: str  # regex, matched against the whole target URI
    # Who may call what matches: extension, trusted (a trusted network), provider (an
    # IVR's transfer / route_to_agent), anonymous (an unknown caller's REFER).
    callers: list[Literal["extension", "trusted", "provider", "anonymous"]] = Field(
        default=["extension", "provider"], min_length=1)

    @field_validator("match")
    @classmethod
    def _check_regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"bad regex {v!r}: {exc}") from exc
        return v


class PolicySettings(Section):
    """`[policy]`: who may create a leg or reach a user (pbx.policy, DESIGN §6)."""

    # Sources (IP networks) whose calls count as authenticated (trunks, an SBC).
    trusted_networks: NetworkList = Field(default_factory=list)
    # Host names that are this PBX besides the realm and the listen/advertised host:
    # an INVITE whose From claims one of them must authenticate.
    domains: list[str] = Field(default_factory=list)
    # Caller ID presented on outbound legs for a caller we could not verify.
    anonymous_caller_id: str = Field(default="anonymous", pattern=r"^[A-Za-z0-9+*#._-]{1,32}$")
    # Pass an unverified caller's From user on when it looks like a phone number.
    pass_untrusted_caller_id: bool = False
    # In-dialog requests only from the IP the dialog's peer uses ("any": no check).
    in_dialog_source: Literal["same_ip", "any"] = "same_ip"
    outbound: list[OutboundRule] = Field(default_factory=list)


class LimitSettings(Section):
    """`[limits]`: what one source IP may hold (DESIGN §6 "budgets"). Sources in
    `[sip] rate_limit_exempt` are exempt."""

    # Inbound calls from one source not yet answered and acknowledged (ACK).
    setup_calls_per_source: int = Field(default=30, ge=1)
    # Inbound calls from one source at once, answered or not: each holds an RTP port
    # pair and an IVR session until it ends, so a source that ACKs is capped too.
    calls_per_source: int = Field(default=100, ge=1)
    # SIP server transactions one source holds (each keeps its request ~32 s).
    transactions_per_source: int = Field(default=512, ge=1)
    # Bytes of those transactions' requests and responses.
    transaction_bytes_per_source: int = Field(default=4_000_000, ge=65536)
    # Open TCP connections from one source.
    tcp_connections_per_source: int = Field(default=32, ge=1)
    # Seconds a client is asked to wait (Retry-After) when a budget is spent.
    retry_after_s: int = Field(default=5, ge=1)


class AuthSettings(Section):
    """`[auth]`: digest replay protection and failed-login backoff (the policy and its
    trade-offs: pbx/sip/nonces.py and pbx/sip/authguard.py)."""

    # A nonce is accepted this long after it was issued, then re-challenged (stale=true).
    nonce_ttl_s: float = Field(default=300.0, gt=0, le=3600)
    # Nonces that authenticated, kept with their last nonce count so that no request is
    # accepted twice; when full the oldest goes and older nonces are re-challenged.
    nonce_table_size: int = Field(default=16384, ge=16, le=1_048_576)
    # Wrong passwords in a row from one source for one username before it backs off.
    max_failures: int = Field(default=5, ge=1)
    # Wrong passwords from one source over all usernames before the source backs off.
    source_max_failures: int = Field(default=20, ge=1)
    # Wrong passwords for one username from sources not known for it (distributed
    # guessing); softer, and sources that authenticated as the user are exempt, so
    # that failing on purpose from elsewhere cannot lock a working phone out.
    user_max_failures: int = Field(default=30, ge=1)
    # First lockout (credentials not checked, 403 + Retry-After); each further failure
    # doubles it, up to backoff_max_s.
    backoff_base_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)
    # A counter with no failure for this long starts again from zero.
    failure_memory_s: float = Field(default=3600.0, gt=0)
    # How long a source that authenticated as a user stays known for that user.
    known_source_s: float = Field(default=86400.0, gt=0)
    # Entries per table (sources, (source, user) pairs, usernames, known sources).
    table_size: int = Field(default=16384, ge=16, le=1_048_576)
    # Clients offered one MD5 challenge instead of one per algorithm: libre (Debian's
    # baresip 1.0) fails a whole 401/407 naming any algorithm but MD5 ("Function not
    # implemented"), though RFC 8760 §2.4 lets a server send several. Matched as
    # case-insensitive substrings of the User-Agent header; only where the user's
    # algorithms include MD5 (no downgrade: it was offered to them anyway).
    md5_user_agents: list[str] = Field(default_factory=lambda: ["baresip", "libre"])
    # Failed registrations and authentications are logged at INFO (source, user,
    # reason; never the credentials): at most this many lines per minute per source
    # IP (bursts of log_failures_burst) and log_failures_max_per_min in all; the lines
    # left out are counted (/metrics) and the next line written says how many.
    log_failures_per_min: float = Field(default=6.0, gt=0)
    log_failures_burst: int = Field(default=10, ge=1)
    log_failures_max_per_min: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _check_backoff(self) -> AuthSettings:
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError("backoff_base_s must not exceed backoff_max_s")
        return self


class PrivacySettings(Section):
    """Secrets stay in the front (DESIGN §6): header names (case-insensitive) whose
    values never become IVR variables and are redacted in traces, events and logs.
    `Authorization` and `Proxy-Authorization` are secret even when not listed."""

    secret_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_SECRET_HEADERS))

    @field_validator("secret_headers")
    @classmethod
    def _check_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9!%*_+`'~.\-]+", name):
                raise ValueError(f"not a header name: {name!r}")
        return v
