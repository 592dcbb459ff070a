"""Header values and small bodies the front reads beyond the message grammar.

Pure parsers of network text, like `pbx.sip.message`: each returns a value or
raises `SipError` with the response it suggests, whatever the input, and quotes
at most an excerpt of it. Numbers are ASCII digits only (RFC 5234 DIGIT):
`str.isdigit()` also accepts "²", which `int()` then refuses with a ValueError.

* `parse_session_expires`: the `Session-Expires` header of a session-refresh
  request (RFC 4028 §4): delta-seconds and the `refresher` parameter.
* `parse_dtmf_info`: the key press carried by an INFO request, in the
  `application/dtmf-relay` body (`Signal=5` / `Duration=160` lines, the de
  facto format of Cisco and most SIP phones) or the `application/dtmf` one (the
  digit alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import is_digits, parse_number

# The Content-Types an INFO key press may come in, for a 415's Accept header.
DTMF_INFO_TYPES = ("application/dtmf-relay", "application/dtmf")
DTMF_DIGITS = frozenset("0123456789*#ABCD")
DEFAULT_DTMF_DURATION_MS = 100
# A press longer than this is someone holding the key down, or a lie; either way it is
# clamped, so one INFO cannot claim a press that hides the digit's other sources for hours.
MAX_DTMF_DURATION_MS = 10_000


class SessionExpires(NamedTuple):
    """RFC 4028 §4: `Session-Expires: 1800;refresher=uac`."""

    interval_s: int
    refresher: str | None  # "uac", "uas", another value as written (lower-cased), or None


def parse_session_expires(text: str) -> SessionExpires:
    """The interval (delta-seconds: 1-10 ASCII digits) and refresher of a
    Session-Expires value; SipError (400) when the interval is not a number. Other
    parameters are ignored (RFC 4028 §4: generic-param)."""
    value, *params = [p.strip() for p in text.split(";")]
    if len(value) > 10 or not is_digits(value):
        raise SipError(f"bad Session-Expires {excerpt(text)}", 400)
    refresher = None
    for param in params:
        name, _, arg = param.partition("=")
        if name.strip().lower() == "refresher":
            refresher = arg.strip().lower()
    return SessionExpires(int(value), refresher)


@dataclass(frozen=True)
class DtmfInfo:
    """One key press received in an INFO request."""

    digit: str  # one of DTMF_DIGITS
    duration_ms: int


def parse_dtmf_info(content_type: str | None, body: bytes) -> DtmfInfo | None:
    """The key press of an INFO body; None when `content_type` is not a DTMF one (the
    caller answers 415), SipError (400 "Bad DTMF Digit") when the digit is missing or
    not a DTMF key. A Duration that is not a number is ignored (the default applies)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    text = body.decode("utf-8", "replace")
    digit = ""
    duration_ms = DEFAULT_DTMF_DURATION_MS
    if ctype == "application/dtmf-relay":
        for line in text.splitlines():
            name, _, value = line.partition("=")
            name = name.strip().lower()
            if name == "signal":
                digit = value.strip().upper()
            elif name == "duration":
                try:
                    duration_ms = min(parse_number(value.strip(), "Duration"),
                                      MAX_DTMF_DURATION_MS)
                except SipError:
                    pass  # as before: a bad Duration does not lose the digit
    elif ctype == "application/dtmf":
        digit = text.strip().upper()
    else:
        return None
    if digit not in DTMF_DIGITS:
        raise SipError("Bad DTMF Digit", 400)
    return DtmfInfo(digit, duration_ms)
