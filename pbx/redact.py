"""Secrets stay in the front (DESIGN §6): which header names carry credentials, and
copies of headers, traces, events and log text with those values replaced.

Who uses what:

* the front drops SIP headers for which `is_secret_header(name)` is true before they
  become `sip_<Header>` IVR variables, so they are never POSTed to a provider;
* the IVR machine (`pbx.ivr.session`, where `StepTrace`s are built) and the front
  (`pbx.calls.events.CallEvents.trace`, before the trace store, `logs/traces.jsonl`,
  `/ws/events` and the PUB socket) pass traces through `redact()`; the second pass is defence in depth
  against an executor that did not;
* `pbx.logs` runs every log line through `scrub_text()`.

`redact()` keeps names and replaces values with `REDACTED`, so a trace still shows
which headers an action sent:

* every value of a `headers` mapping (an `api` or `voip_bridge` action's, a route's
  `app_params.headers`): provider and action headers are credentials more often than
  not, whatever their names;
* any key that names a secret header, or a `sip_` variable named after one
  (`sip_Proxy-Authorization`), wherever it appears;
* the password of a URL's userinfo (`https://user:pw@host`, `sip:user:pw@host`) and
  query parameters that carry credentials (`?access_token=`, `?api_key=`...) in values
  under URL-like keys (`url`, `create_room_uri`, `target`...), and all of these in
  free-text `error` / `reason` values (`scrub_text`).

The list of secret header names is process-wide: `configure(names)` once at start
(`pbx.logs.setup_logging` does it from `[privacy] secret_headers`); until then
`DEFAULT_SECRET_HEADERS`. `Authorization` and `Proxy-Authorization` are always in it.
Names compare case-insensitively (RFC 3261 §7.3.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[redacted]"

# Always secret, whatever the configuration says (RFC 3261 §22: digest credentials).
ALWAYS_SECRET_HEADERS = ("Authorization", "Proxy-Authorization")

# What a carrier's provider and API traffic carries credentials in: HTTP and SIP
# authentication (RFC 7235, RFC 3261 §22), cookies (RFC 6265), the usual API-key and
# token headers, and cloud vendors' session tokens.
DEFAULT_SECRET_HEADERS = (
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "Set-Cookie",
    "X-Api-Key",
    "Api-Key",
    "X-Auth-Token",
    "X-Access-Token",
    "X-Session-Token",
    "X-Csrf-Token",
    "X-Amz-Security-Token",
    "X-Goog-Api-Key",
)

# Query parameters (and SIP URI headers, RFC 3261 §19.1.1) that carry credentials.
SECRET_QUERY_PARAMS = (
    "access_token", "refresh_token", "id_token", "token", "auth", "auth_token",
    "api_key", "apikey", "key", "secret", "client_secret", "password", "passwd", "pwd",
    "sig", "signature", "x-amz-signature", "x-amz-security-token", "x-goog-signature",
)

# Keys whose string values are URLs or SIP URIs worth scrubbing.
_URL_KEYS = frozenset({"target", "transfer_target", "ws_bridge", "refer_to"})
# Keys whose string values are free text (an error may quote a URL or a header).
_TEXT_KEYS = frozenset({"error", "reason"})

# Nesting deeper than this is not walked: the value is replaced as a whole (traces and
# events are shallow; a pathological provider answer must not cost a RecursionError).
MAX_DEPTH = 64

_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!%*_+`'~.\-]+$")  # RFC 3261 §25.1 token

_secret: frozenset[str] = frozenset()
_scrub_re: re.Pattern[str] = re.compile(r"(?!)")

# What `redact` does with the value under a key, by key name (cached: key names repeat;
# emptied by `configure`).
_PLAIN, _SECRET, _HEADERS, _URL, _TEXT = range(5)
_MAX_CACHED_KEYS = 4096
_key_kinds: dict[str, int] = {}
_SCALARS = frozenset({int, float, bool})


def _names_pattern(names: Iterable[str]) -> str:
    # Longest first, so `Proxy-Authorization` wins over `Authorization`.
    return "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))


_QUERY_RE = re.compile(
    r"([?&;](?:" + _names_pattern(SECRET_QUERY_PARAMS) + r")=)[^&#;\s\"'<>]*", re.IGNORECASE)
_USERINFO_RE = re.compile(
    r"((?:\b[A-Za-z][A-Za-z0-9+.\-]*://|\bsips?:)[^\s:@/?#\"'<>]*):[^\s@/?#\"'<>]*@")


def configure(names: Iterable[str]) -> None:
    """Make `names` (plus `ALWAYS_SECRET_HEADERS`) the process's secret header names."""
    global _secret, _scrub_re
    all_names = {n.strip() for n in (*ALWAYS_SECRET_HEADERS, *names) if n.strip()}
    for name in all_names:
        if not _HEADER_NAME_RE.match(name):
            raise ValueError(f"not a header name: {name!r}")
    _secret = frozenset(n.lower() for n in all_names)
    _key_kinds.clear()
    # `Name: value` (a SIP/HTTP header line) or `'name': 'value'` / `"name": "value"` /
    # `name=value` (reprs, JSON, query strings); `sip_` variables too. An unquoted value
    # runs to the end of the line: over-redacting a log line is harmless.
    _scrub_re = re.compile(
        r"(?<![A-Za-z0-9_\-])((?:sip_)?(?:" + _names_pattern(all_names) + r"))"
        r"([\"']?[ \t]*[:=][ \t]*)"
        r"(\"(?:[^\"\\\r\n]|\\.)*\"?|'(?:[^'\\\r\n]|\\.)*'?|[^\r\n]*)",
        re.IGNORECASE,
    )


configure(DEFAULT_SECRET_HEADERS)


def secret_headers() -> frozenset[str]:
    """The secret header names in force, lower-cased."""
    return _secret


def is_secret_header(name: str) -> bool:
    """Whether a header of this name carries credentials (case-insensitive): such a
    header never becomes an IVR variable and its value never leaves the front."""
    return name.strip().lower() in _secret


def is_secret_variable(name: str) -> bool:
    """A session variable holding a secret header (`sip_Authorization`), or named
    like one."""
    lowered = name.strip().lower()
    return lowered in _secret or (lowered.startswith("sip_") and lowered[4:] in _secret)


def redact_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a header mapping with every value replaced by `REDACTED` (names kept):
    for provider and action headers, where any value may be a credential."""
    return {str(name): REDACTED for name in headers}


def redact_url(url: str) -> str:
    """`url` without the password of its userinfo and without the values of query
    parameters that carry credentials."""
    if "@" in url:
        url = _USERINFO_RE.sub(r"\1:" + REDACTED + "@", url)
    if "=" in url:
        url = _QUERY_RE.sub(r"\1" + REDACTED, url)
    return url


def _key_kind(name: str) -> int:
    kind = _key_kinds.get(name)
    if kind is None:
        lowered = name.lower()
        kind = (_SECRET if is_secret_variable(name) else
                _HEADERS if lowered == "headers" else
                _URL if lowered.endswith(("url", "uri")) or lowered in _URL_KEYS else
                _TEXT if lowered in _TEXT_KEYS else _PLAIN)
        if len(_key_kinds) >= _MAX_CACHED_KEYS:
            _key_kinds.clear()
        _key_kinds[name] = kind
    return kind


def redact(obj: Any, _depth: int = 0) -> Any:
    """A copy of a JSON-like value (a trace, an event, an action) with its secrets
    replaced (see the module text). The input is never modified."""
    if _depth > MAX_DEPTH:
        return REDACTED
    # Exact-class tests first: traces and events are dicts, lists and str, and an ABC's
    # isinstance costs several times more (every step trace passes here, issue 9).
    cls = obj.__class__
    if cls is dict or (cls is not str and cls is not list and isinstance(obj, Mapping)):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            value_cls = value.__class__
            if value is None or value_cls in _SCALARS:
                out[key] = value  # no credential is a number
                continue
            kind = _key_kinds.get(key) if key.__class__ is str else None
            if kind is None:
                kind = _key_kind(key if isinstance(key, str) else str(key))
            if kind == _PLAIN and value_cls is str:
                out[key] = value
            elif kind == _SECRET:
                out[key] = REDACTED
            elif isinstance(value, str):
                out[key] = (redact_url(value) if kind == _URL else
                            scrub_text(value) if kind == _TEXT else value)
            elif kind == _HEADERS and isinstance(value, Mapping):
                out[key] = redact_headers(value)
            else:
                out[key] = redact(value, _depth + 1)
        return out
    if cls is list or cls is tuple or isinstance(obj, list | tuple):
        depth = _depth + 1
        if depth > MAX_DEPTH:
            return [REDACTED] * len(obj)
        return [item if item.__class__ is str or item is None or item.__class__ in _SCALARS
                else redact(item, depth) for item in obj]
    return obj


def scrub_text(text: str) -> str:
    """Free text (a log message, a traceback) with secret header values, URL passwords
    and credential query parameters replaced by `REDACTED`."""
    text = _scrub_re.sub(_scrub_match, text)
    if "@" in text:
        text = _USERINFO_RE.sub(r"\1:" + REDACTED + "@", text)
    if "=" in text:
        text = _QUERY_RE.sub(r"\1" + REDACTED, text)
    return text


def _scrub_match(m: re.Match[str]) -> str:
    value = m.group(3)
    quote = value[:1] if value[:1] in ("'", '"') else ""
    return f"{m.group(1)}{m.group(2)}{quote}{REDACTED}{quote}"
