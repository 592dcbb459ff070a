"""Registrar: REGISTER processing (RFC 3261 §10.3) and contact lookup, sans-IO.

Theory of operation
-------------------
`handle_register(request, source_addr, now)` takes one REGISTER that the
transaction layer has delivered and returns the final response to send; it
never raises for bad input. The steps follow RFC 3261 §10.3:

1. (Request-URI domain) not checked: the PBX serves whatever domain it is
   reached by.
2. A `Require` header naming any extension → 420 Bad Extension with
   `Unsupported` (we support none for REGISTER).
3. Authentication (`authenticate`, below). No or bad credentials → 401
   with a fresh challenge bound to this request, `stale=true` when the
   password was right but the nonce unusable (expired, issued for another
   Call-ID or To, by another front, or already used with that nonce count:
   a replay); malformed credentials or a digest-uri that is not the
   Request-URI → 400. An unknown username and a wrong password get the *same*
   401 after the same work: the client sees its credentials were refused
   (RFC 3261 §22.2: a 401 to a request that carried credentials) and a
   scanner cannot enumerate extensions. Too many wrong passwords → 403 with
   `Retry-After` without checking the credentials (`pbx.sip.authguard`).
   Users from the config without a password cannot register (they can still
   have a static contact).
4./5. The address-of-record is the To URI's user part. An AOR that is not a
   configured user → 404 (step 5); an authenticated user registering someone
   else's AOR → 403 (step 4). We check 404 first: the RFC's order would make
   404 unreachable (nobody is authorised for a non-existent AOR), and only a
   client holding valid credentials ever sees the difference.
6. Contacts. `*` must be alone and come with `Expires: 0` (else 400) and
   removes every binding. Otherwise each Contact's lifetime is its `expires`
   parameter, else the `Expires` header, else `default_expires`; 0 removes the
   binding, a lifetime below `min_expires` → 423 Interval Too Brief with
   `Min-Expires` (the whole request is refused), above `max_expires` it is
   shortened. Contacts are compared by URI (scheme, user, password, host
   case-insensitively, port and URI parameters, a stricter form of §19.1.4).
7. For a contact already bound with the same Call-ID, the request's CSeq must
   be higher than the stored one, else the whole update is aborted with 500
   (no binding changes). (A replayed REGISTER never gets this far: its nonce
   count was used, and its nonce is bound to its Call-ID, see `pbx.sip.nonces`.)
8. 200 OK listing every current binding of the AOR with its remaining
   lifetime (`;expires=N`). No `Date` header: the registrar has no wall clock.

A request without Contact is a query and gets the same 200.

Each binding keeps the address the REGISTER came from and the Via transport,
so the front can send requests for the binding to that address (a phone
behind NAT cannot be reached at its Contact's private address).

`lookup(user, now)` gives the contacts to try for a user: the static
`contact` from the config first (it always resolves), then the registered
bindings by descending `q`, the most recent registration first among equals.

Bindings expire on the registrar's clock: `get_timer()` is the next expiry,
`expire(now)` (alias `handle_timer`) removes the due ones and returns them;
`lookup` and the 200 never show an expired binding even before `expire` ran.
`now` is the front's clock (monotonic is fine); lockouts run on it too. The
authenticator's nonces carry `auth_now` (default: `now`; the front passes
wall-clock time).

Authentication for other requests
---------------------------------
`authenticate(request, source, now, proxy=...)` is the one entry point for
digest credentials, REGISTER (401) and the front's INVITEs from extensions
(`proxy=True`: 407): lockout check, verification, failure counting, logging
and the counters in `stats` (exported on /metrics). It returns an `AuthOutcome`
whose status, reason and headers are the response to send when not `ok`.
`challenge(request, ...)` is the one place a 401/407 challenge is made.

Which algorithms a challenge offers: the user's own `digest_algorithms`, else
`[sip] digest_algorithms` (SHA-256 then MD5), one challenge each; but a client
whose User-Agent contains one of `[auth] md5_user_agents` (libre: Debian's
baresip refuses a whole 401 naming any algorithm but MD5) gets the MD5 one
alone, where MD5 is in the list. The user is the one the request's credentials
claim, else the To of a REGISTER, else the From; credentials are accepted only
with the algorithms that user is offered (whatever the User-Agent says, so
naming it downgrades nothing). An unknown user is challenged like a user with
the default, so only users given their own algorithms can be told apart by
their challenge.

Logging (logger `pbx.auth`, INFO): every refused REGISTER and every failed
authentication, with the source address and port, the user (repr'd, cut
short), the reason and the client's User-Agent; never the credentials. The
normal first challenge of a request without credentials and a stale nonce are
not failures. `FailureLog` bounds the lines per source IP and in all, so a
scanner cannot flood the log; what it leaves out is counted (`stats`
`auth_failures_unlogged`) and said in the next line written.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from pbx.config import UserSettings
from pbx.ratelimit import RateLimiter
from pbx.sip.auth import AuthFailure, AuthResult, DigestAuthenticator
from pbx.sip.authguard import AuthGuard
from pbx.sip.errors import SipError
from pbx.sip.grammar import format_params
from pbx.sip.message import SipRequest, SipResponse, make_response, new_tag
from pbx.sip.uri import SipUri, parse_name_addr

Addr = tuple[str, int]
ContactKey = tuple[object, ...]

log = logging.getLogger("pbx.auth")

LOCKED_REASON = "Forbidden (too many failed attempts)"
# Digest results that mean someone replayed (or reused) credentials of a real user.
_REPLAY_REASONS = frozenset({AuthFailure.NONCE_REUSED, AuthFailure.NONCE_BOUND_ELSEWHERE})

MAX_DELTA_SECONDS = 2**32 - 1  # RFC 3261 §20.19: larger values are taken as this
# Bindings one address-of-record keeps: every call to it forks a leg per binding (a media
# port each). A REGISTER over it replaces the oldest; one naming more is refused.
MAX_BINDINGS_PER_AOR = 10
# ASCII digits only: `\d` also matches "٣", and int() of thousands of digits raises.
_DIGITS_RE = re.compile(r"[0-9]+")
_Q_RE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


@dataclass(frozen=True)
class Binding:
    """One contact of an address-of-record.

    `uri` is the Contact URI as sent; `params` the Contact header parameters
    other than `expires` (`q`, `+sip.instance`, `reg-id`...). `source` and
    `transport` are where the REGISTER came from (None for a static contact
    from the config, which never expires).
    """

    aor: str
    uri: str
    expires_at: float
    call_id: str = ""
    cseq: int = 0
    source: Addr | None = None
    transport: str | None = None
    q: float = 1.0
    params: dict[str, str | None] = field(default_factory=dict)
    registered_at: float = 0.0
    static: bool = False

    def remaining_s(self, now: float) -> int:
        """Whole seconds left (what a 200 reports in `;expires=`)."""
        if math.isinf(self.expires_at):
            return MAX_DELTA_SECONDS
        return max(0, round(self.expires_at - now))

    def contact_value(self, now: float) -> str:
        """`<uri>;params;expires=N` for the Contact header of a 200 to REGISTER."""
        return f"<{self.uri}>{format_params(self.params)};expires={self.remaining_s(now)}"


def _contact_key(uri: SipUri) -> ContactKey:
    params = tuple(sorted((k, v.lower() if v is not None else None)
                          for k, v in uri.params.items()))
    return (uri.scheme, unquote(uri.user) if uri.user is not None else None, uri.password,
            uri.host.lower(), uri.port, params)


def _delta_seconds(text: str, what: str) -> int:
    text = text.strip()
    if not _DIGITS_RE.fullmatch(text):
        raise SipError(f"bad {what} {text[:40]!r}")
    if len(text) > 10:
        return MAX_DELTA_SECONDS  # more than 2**32-1 anyway (RFC 3261 §20.19)
    return min(int(text), MAX_DELTA_SECONDS)


def _shown(text: str | None) -> str:
    """A username for a log line: repr'd (no control characters) and cut short."""
    if text is None:
        return "-"
    return repr(text[:32]) + ("..." if len(text) > 32 else "")


def _uri_user(header: str | None) -> str | None:
    """The user part of a From/To header's URI (None if absent or unparsable)."""
    try:
        user = parse_name_addr(header or "").uri.user
    except SipError:
        return None
    return unquote(user) if user is not None else None


class FailureLog:
    """INFO lines for failed registrations and authentications, bounded: a token
    bucket per source IP (`per_min` lines a minute, bursts of `burst`) and one for all
    sources (`max_per_min`), both from `pbx.ratelimit`. Lines left out are counted in
    `unlogged` and the next line written says how many were."""

    def __init__(self, per_min: float = 6.0, burst: int = 10,
                 max_per_min: float = 120.0, max_sources: int = 16384) -> None:
        self._per_source = RateLimiter(per_min / 60, burst, max_sources=max_sources)
        self._overall = RateLimiter(max_per_min / 60, max(burst, max_per_min / 6),
                                    max_sources=1)
        self.unlogged = 0
        self._since_written = 0

    def write(self, ip: str, now: float, text: str, *args: object) -> bool:
        """Log `text % args` unless `ip` or everyone is over budget; True if written."""
        if not (self._per_source.allow(ip, now) and self._overall.allow("*", now)):
            self.unlogged += 1
            self._since_written += 1
            return False
        if self._since_written:
            text += " [%d auth failure lines not written before this one]"
            args = (*args, self._since_written)
            self._since_written = 0
        log.info(text, *args)
        return True


@dataclass(frozen=True)
class AuthOutcome:
    """What `Registrar.authenticate` decided.

    `ok`: the credentials are right for `username`. Otherwise `status`,
    `reason` (None: the default phrase) and `headers` are the response to send:
    400 (malformed credentials), 401/407 with a challenge (none, wrong, stale or
    replayed), or 403 + Retry-After (locked out: not checked). `result` is the
    authenticator's verdict (None when locked out).
    """

    ok: bool
    username: str | None = None
    status: int = 200
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    result: AuthResult | None = None


@dataclass(frozen=True)
class _Update:
    key: ContactKey
    uri: str
    expires_s: int
    q: float
    params: dict[str, str | None]


class _Abort(Exception):
    """Stops REGISTER processing with a response (internal to handle_register)."""

    def __init__(self, status: int, reason: str | None = None,
                 headers: list[tuple[str, str]] | None = None, logged: bool = False) -> None:
        super().__init__(reason or str(status))
        self.status = status
        self.reason = reason
        self.headers = headers
        self.logged = logged


class Registrar:
    """Bindings of address-of-records to contacts; see the module docstring."""

    def __init__(
        self,
        users: Mapping[str, UserSettings],
        authenticator: DigestAuthenticator,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        guard: AuthGuard | None = None,
        failure_log: FailureLog | None = None,
        md5_user_agents: Iterable[str] = (),
    ) -> None:
        if not 0 < min_expires <= max_expires:
            raise ValueError("need 0 < min_expires <= max_expires")
        self.users = users
        self.authenticator = authenticator
        self.guard = guard if guard is not None else AuthGuard()
        self.failure_log = failure_log if failure_log is not None else FailureLog()
        self.md5_user_agents = tuple(ua.lower() for ua in md5_user_agents if ua)
        self._counters = {"auth_ok": 0, "auth_failures": 0, "auth_lockouts": 0,
                          "auth_locked_refusals": 0, "auth_replays": 0, "auth_stale": 0}
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = min(max(default_expires, min_expires), max_expires)
        self._bindings: dict[str, dict[ContactKey, Binding]] = {}
        # (expires_at, seq, aor, key); entries whose binding changed are skipped lazily.
        self._heap: list[tuple[float, int, str, ContactKey]] = []
        self._seq = 0

    # ------------------------------------------------------------ authentication

    def password_of(self, username: str) -> str | None:
        user = self.users.get(username)
        return user.password if user is not None else None

    def algorithms_for(self, username: str | None) -> tuple[str, ...]:
        """The digest algorithms `username` is challenged with and may answer with: its
        own `digest_algorithms`, else the realm's (an unknown user: the realm's)."""
        user = self.users.get(username) if username is not None else None
        if user is not None and user.digest_algorithms:
            return tuple(user.digest_algorithms)
        return self.authenticator.algorithms

    def _challenged_user(self, request: SipRequest, proxy: bool) -> str | None:
        """Whom a challenge to `request` is for: the user its credentials claim, else
        the To of a REGISTER, else the From."""
        claimed = self.authenticator.claimed_username(request, proxy=proxy)
        if claimed is not None:
            return claimed
        header = "To" if request.method == "REGISTER" else "From"
        return _uri_user(request.headers.get(header))

    def challenge(self, request: SipRequest, now: float, *, stale: bool = False,
                  proxy: bool = False) -> list[tuple[str, str]]:
        """The WWW-Authenticate (401) or Proxy-Authenticate (407) headers for
        `request`: one challenge per algorithm its user is offered (`algorithms_for`).
        `now` is the nonces' clock (`auth_now`)."""
        algorithms = self.algorithms_for(self._challenged_user(request, proxy))
        user_agent = (request.headers.get("User-Agent") or "").lower()
        if ("MD5" in algorithms and len(algorithms) > 1 and user_agent
                and any(name in user_agent for name in self.md5_user_agents)):
            algorithms = ("MD5",)  # a client that fails on any other challenge
        return self.authenticator.challenge(now, stale=stale, algorithms=algorithms,
                                            proxy=proxy, request=request)

    @property
    def stats(self) -> dict[str, int]:
        """Authentication counters and table sizes (for /metrics)."""
        return {**self._counters,
                "auth_failures_unlogged": self.failure_log.unlogged,
                "auth_nonces_tracked": self.authenticator.nonces.tracked,
                "auth_guard_entries": self.guard.entries()}

    def log_failure(self, request: SipRequest, source: Addr, now: float, what: str,
                     user: str | None, reason: str) -> None:
        """One bounded INFO line about a refused request (see `FailureLog`)."""
        self.failure_log.write(
            source[0], now, "%s: %s user %s from %s:%d: %s (UA %s)", what, request.method,
            _shown(user), source[0], source[1], reason,
            _shown(request.headers.get("User-Agent")))

    def authenticate(
        self,
        request: SipRequest,
        source: Addr,
        now: float,
        *,
        auth_now: float | None = None,
        proxy: bool = False,
    ) -> AuthOutcome:
        """Check the digest credentials of `request` (sent from `source`) as a registrar
        (`Authorization`, 401) or as a proxy (`Proxy-Authorization`, 407), with lockout;
        see the module docstring. `now` runs the lockouts, `auth_now` the nonces."""
        auth_now = now if auth_now is None else auth_now
        ip = source[0]
        claimed = self.authenticator.claimed_username(request, proxy=proxy)
        if claimed is not None:
            lock = self.guard.check(ip, claimed, now)
            if lock is not None:
                self._counters["auth_locked_refusals"] += 1
                self.log_failure(request, source, now, "auth refused", claimed,
                                  f"locked out for {lock.retry_after_s(now)} s (not checked)")
                return AuthOutcome(False, claimed, 403, LOCKED_REASON,
                                   [("Retry-After", str(lock.retry_after_s(now)))])
        result = self.authenticator.verify(request, self.password_of, auth_now, proxy=proxy,
                                           algorithms_of=self.algorithms_for)
        if result.ok:
            self._counters["auth_ok"] += 1
            self.guard.record_success(ip, result.username or "", now)
            return AuthOutcome(True, result.username, result=result)
        if result.is_guess and result.username is not None:
            self._counters["auth_failures"] += 1
            self.log_failure(request, source, now, "auth failure", result.username,
                              result.detail)
            for lock in self.guard.record_failure(ip, result.username, now):
                self._counters["auth_lockouts"] += 1
                self.log_failure(request, source, now, "auth lockout", result.username,
                                  f"{lock.scope} locked for {lock.retry_after_s(now)} s")
        elif result.reason in _REPLAY_REASONS:
            self._counters["auth_replays"] += 1
            self.log_failure(request, source, now, "auth replay refused", result.username,
                              result.detail)
        elif result.stale:
            self._counters["auth_stale"] += 1  # a nonce that aged: normal, re-challenged
        elif result.reason is not AuthFailure.MISSING_CREDENTIALS:
            # Credentials we cannot use (wrong algorithm or realm, no qop, a nonce not
            # ours, malformed): the client will not get in this way either. A parse
            # error's detail quotes the header: only the reason, never the credentials.
            self.log_failure(request, source, now, "auth failure", result.username,
                              result.reason.value if result.reason is AuthFailure.MALFORMED
                              else result.detail)
        if result.status == 400:
            return AuthOutcome(False, result.username, 400,
                               f"Bad Request ({result.reason.value if result.reason else ''})",
                               result=result)
        challenge = self.challenge(request, auth_now, stale=result.stale, proxy=proxy)
        return AuthOutcome(False, result.username, result.status, None, challenge, result)

    # ------------------------------------------------------------ REGISTER

    def handle_register(
        self,
        request: SipRequest,
        source_addr: Addr,
        now: float,
        *,
        auth_now: float | None = None,
    ) -> SipResponse:
        """The final response to a REGISTER (RFC 3261 §10.3); bindings updated on 200."""
        to_tag = new_tag()
        try:
            headers = self._register(request, source_addr, now,
                                     now if auth_now is None else auth_now)
        except _Abort as abort:
            if not abort.logged:
                self.log_failure(request, source_addr, now, "registration refused",
                                  _uri_user(request.headers.get("To")),
                                  f"{abort.status} {abort.reason or ''}".rstrip())
            return make_response(request, abort.status, abort.reason, to_tag=to_tag,
                                 headers=abort.headers)
        except SipError as exc:
            self.log_failure(request, source_addr, now, "registration refused",
                              _uri_user(request.headers.get("To")),
                              f"{exc.status} {exc.message}")
            return make_response(request, exc.status, None, to_tag=to_tag)
        return make_response(request, 200, to_tag=to_tag, headers=headers)

    def _register(self, request: SipRequest, source_addr: Addr, now: float,
                  auth_now: float) -> list[tuple[str, str]]:
        if request.method != "REGISTER":
            raise _Abort(405, headers=[("Allow", "REGISTER")])
        # Step 2: no extension is supported for REGISTER.
        required = [t for t in request.headers.get_all("Require") if t]
        if required:
            raise _Abort(420, headers=[("Unsupported", ", ".join(required))])

        # Step 3: authenticate.
        auth = self.authenticate(request, source_addr, now, auth_now=auth_now)
        if not auth.ok:  # `authenticate` logged what is a failure
            raise _Abort(auth.status, auth.reason, headers=auth.headers, logged=True)

        # Steps 5 and 4: the AOR must exist and belong to the authenticated user.
        to = parse_name_addr(request.headers.get("To") or "")
        aor = unquote(to.uri.user) if to.uri.user is not None else None
        if aor is None or aor not in self.users:
            raise _Abort(404)
        if aor != auth.username:
            raise _Abort(403, "Forbidden (not your address-of-record)")

        # Step 6: the requested changes, all validated before anything is applied.
        call_id, cseq = request.call_id, request.cseq[0]
        expires_header = request.headers.get("Expires")
        header_expires = (_delta_seconds(expires_header, "Expires")
                          if expires_header is not None else None)
        contacts = request.headers.get_all("Contact")
        stored = {k: b for k, b in self._bindings.get(aor, {}).items() if b.expires_at > now}
        staged = dict(stored)

        if any(c.strip() == "*" for c in contacts):
            if len(contacts) != 1 or header_expires != 0:
                raise _Abort(400, "Bad Request (Contact * needs Expires: 0 and no other Contact)")
            for b in stored.values():
                self._check_order(b, call_id, cseq)
            staged.clear()
        else:
            if len(contacts) > MAX_BINDINGS_PER_AOR:
                raise _Abort(403, f"Forbidden (at most {MAX_BINDINGS_PER_AOR} contacts)")
            updates = [self._parse_contact(c, header_expires) for c in contacts]
            if any(0 < u.expires_s < self.min_expires for u in updates):
                raise _Abort(423, headers=[("Min-Expires", str(self.min_expires))])
            # Step 7: Call-ID/CSeq ordering, against the bindings before this request.
            for u in updates:
                if u.key in stored:
                    self._check_order(stored[u.key], call_id, cseq)
            via = request.via
            for u in updates:
                if u.expires_s == 0:
                    staged.pop(u.key, None)
                    continue
                staged[u.key] = Binding(
                    aor=aor, uri=u.uri, expires_at=now + min(u.expires_s, self.max_expires),
                    call_id=call_id, cseq=cseq, source=source_addr, transport=via.transport,
                    q=u.q, params=u.params, registered_at=now,
                )

        if len(staged) > MAX_BINDINGS_PER_AOR:  # the oldest go (the phone moved, say)
            keep = sorted(staged, key=lambda k: staged[k].registered_at)[-MAX_BINDINGS_PER_AOR:]
            staged = {k: staged[k] for k in keep}
        # Apply.
        if staged:
            self._bindings[aor] = staged
        else:
            self._bindings.pop(aor, None)
        for key, b in staged.items():
            if stored.get(key) is not b:
                self._push(b.expires_at, aor, key)
        # Step 8: every current binding.
        return [("Contact", b.contact_value(now)) for b in self._ordered(staged.values())]

    @staticmethod
    def _check_order(binding: Binding, call_id: str, cseq: int) -> None:
        if binding.call_id == call_id and cseq <= binding.cseq:
            raise _Abort(500, "Server Internal Error (out-of-order REGISTER)")

    def _parse_contact(self, value: str, header_expires: int | None) -> _Update:
        addr = parse_name_addr(value)
        if not addr.uri.is_sip:
            raise SipError(f"Contact {value[:60]!r} is not a SIP URI")
        params = dict(addr.params)
        expires_param = params.pop("expires", None)
        if expires_param is not None:
            expires_s = _delta_seconds(expires_param, "Contact expires")
        elif header_expires is not None:
            expires_s = header_expires
        else:
            expires_s = self.default_expires
        q = 1.0
        q_text = params.get("q")
        if q_text is not None:
            if not _Q_RE.fullmatch(q_text):
                raise SipError(f"bad q value {q_text!r}")
            q = float(q_text)
        return _Update(_contact_key(addr.uri), str(addr.uri), expires_s, q, params)

    # ------------------------------------------------------------ lookup

    @staticmethod
    def _ordered(bindings: Iterable[Binding]) -> list[Binding]:
        return sorted(bindings, key=lambda b: (-b.q, -b.registered_at))

    def bindings(self, aor: str, now: float) -> list[Binding]:
        """The registered (not static) live bindings of `aor`, best first."""
        live = [b for b in self._bindings.get(aor, {}).values() if b.expires_at > now]
        return self._ordered(live)

    def lookup(self, user: str, now: float) -> list[Binding]:
        """Where to reach `user`: the static contact from the config first, then the
        registered bindings by descending q, most recent first. [] if unknown."""
        settings = self.users.get(user)
        if settings is None:
            return []
        out: list[Binding] = []
        if settings.contact:
            out.append(Binding(aor=user, uri=settings.contact, expires_at=math.inf,
                               static=True))
        out.extend(self.bindings(user, now))
        return out

    def aors(self) -> list[str]:
        """AORs holding at least one registered binding (some may be due to expire)."""
        return list(self._bindings)

    # ------------------------------------------------------------ timers

    def _push(self, expires_at: float, aor: str, key: ContactKey) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (expires_at, self._seq, aor, key))

    def _is_current(self, expires_at: float, aor: str, key: ContactKey) -> bool:
        b = self._bindings.get(aor, {}).get(key)
        return b is not None and b.expires_at == expires_at

    def get_timer(self) -> float | None:
        """When the next binding expires, or None."""
        heap = self._heap
        while heap:
            expires_at, _, aor, key = heap[0]
            if self._is_current(expires_at, aor, key):
                return expires_at
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> list[Binding]:
        """Remove the bindings whose lifetime has run out; return them."""
        removed: list[Binding] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires_at, _, aor, key = heapq.heappop(heap)
            if not self._is_current(expires_at, aor, key):
                continue
            bindings = self._bindings[aor]
            removed.append(bindings.pop(key))
            if not bindings:
                del self._bindings[aor]
        return removed

    handle_timer = expire
