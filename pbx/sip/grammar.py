"""The lexical rules every SIP header parser shares (RFC 3261 §25.1), sans-IO.

token, ASCII digits, quoted-string, comma-separated lists and `;name=value`
parameters: the small pieces `headers`, `uri`, `via`, `message`, `digest`,
`fields` and `sdp` build their parsers from. Like them, each function returns a
value or raises `SipError` (400) with an excerpt of the input, and does linear
work however hostile the text (no backtracking pattern, no rescans).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TypeVar

from pbx.sip.errors import SipError, excerpt

T = TypeVar("T")
# The same header values come again and again (a dialog's From/To/Contact in every
# request, each Via checked, stamped and matched): their parses are remembered, for
# short values only, so the memory a stranger can fill is bounded (~1,024 x 256 B).
PARSE_CACHE_SIZE = 1024
PARSE_CACHE_MAX_LEN = 256

TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
TOKEN_RE = re.compile(TOKEN)
# Numbers are ASCII digits only: `\d` and str.isdigit() also take "²" or "٣" (RFC 3261 §25.1:
# DIGIT is %x30-39), which int() then rejects or reads as another number. At most 10 of them
# (ports, Max-Forwards, Content-Length), so int() stays cheap.
DIGITS_RE = re.compile(r"[0-9]{1,10}")
# The fast paths for the common forms of a value (one pattern, then a plain split) are
# taken by short values only: a long one that fails the pattern at its end would pay
# for the match and then for the general parser.
FAST_PATH_MAX_LEN = 512
# `;name=value;flag...` with tokens only: each part ends at a character the next cannot
# hold (`;`, `=`), so the match is linear.
_SIMPLE_PARAMS_RE = re.compile(r"(?:;" + TOKEN + r"(?:=" + TOKEN + r")?)+")


def memoized(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Remember a pure parser's results for short inputs (errors are not remembered:
    they raise again). The values are shared between callers: the parsed types are
    frozen, and their dicts are never to be changed in place (copy them first)."""
    remembered = functools.lru_cache(maxsize=PARSE_CACHE_SIZE)(parse)

    @functools.wraps(parse)
    def parse_short(text: str) -> T:
        if type(text) is str and len(text) <= PARSE_CACHE_MAX_LEN:
            return remembered(text)
        return parse(text)

    return parse_short


def is_digits(text: str) -> bool:
    """True for a non-empty run of ASCII digits (RFC 5234 DIGIT); str.isdigit() alone
    also accepts "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_number(text: str, what: str, max_digits: int = 10) -> int:
    """A header's unsigned decimal (delta-seconds, a port...): ASCII digits only, at most
    `max_digits` of them (so int() stays cheap and in range); SipError (400) otherwise."""
    if len(text) > max_digits or not is_digits(text):
        raise SipError(f"bad {what} {excerpt(text)}")
    return int(text)


def split_header_values(value: str) -> list[str]:
    """Split a comma-separated header value, respecting quoted strings and `<...>`."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value and "<" not in value:
        return [v.strip() for v in value.split(",")]
    parts, _ = _split_outside(value, ",", angles=True)
    return [part.strip() for part in parts]


def _split_params(text: str) -> list[str]:
    """Split `;a=1;b="x;y"` on semicolons outside quoted strings."""
    if '"' not in text:
        return text.split(";")
    parts, unterminated = _split_outside(text, ";", angles=False)
    if unterminated:
        raise SipError(f"unterminated quoted string in parameters {excerpt(text)}")
    return parts


def _split_outside(text: str, sep: str, *, angles: bool) -> tuple[list[str], bool]:
    """Split on `sep` outside quoted strings (and, with `angles`, outside `<...>`), in
    one pass; also whether a quoted string was left open at the end."""
    parts: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif angles and ch == "<":
            in_angle = True
        elif angles and ch == ">":
            in_angle = False
        elif ch == sep and not in_angle:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts, in_quotes


def parse_params(text: str) -> dict[str, str | None]:
    """Parse header parameters `;name=value;flag` (LWS allowed around `;` and `=`).

    The text must be empty or start with `;`. Names are lower-cased; an empty
    parameter (`;;`) is malformed.
    """
    params: dict[str, str | None] = {}
    if len(text) <= FAST_PATH_MAX_LEN and _SIMPLE_PARAMS_RE.fullmatch(text):
        # The common form (tokens only, no LWS, no quotes), checked whole by one match.
        for part in text[1:].split(";"):
            name, eq, value = part.partition("=")
            params[name.lower()] = value if eq else None
        return params
    text = text.strip()
    if not text:
        return params
    if not text.startswith(";"):
        raise SipError(f"unexpected text before parameters: {excerpt(text)}")
    for part in _split_params(text[1:]):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not name or not TOKEN_RE.fullmatch(name):
            raise SipError(f"bad parameter {excerpt(part)}")
        if eq:
            value = value.strip()
            if not value:
                raise SipError(f"empty value for parameter {excerpt(name)}")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def format_params(params: dict[str, str | None]) -> str:
    """`;name=value;flag` again, the inverse of `parse_params`."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def parse_quoted(text: str, start: int) -> tuple[str, int]:
    """Parse the quoted string starting at text[start] == '"'; return (content, end index)."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                break
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise SipError(f"unterminated quoted string in {excerpt(text)}")


def quote_string(text: str) -> str:
    """A quoted-string with `\\` and `"` escaped (RFC 3261 §25.1)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
