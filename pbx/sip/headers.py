"""Header fields: names (compact forms, canonical spelling) and the ordered container.

`Headers` keeps a message's header lines in order, with case-insensitive names;
it splits list-valued headers on commas when asked (`get_all`) and keeps every
other value as the opaque text received. The values the message layer checks
(Via, From/To, CSeq...) have their own parsers (`pbx.sip.via`, `pbx.sip.uri`,
`pbx.sip.message`).
"""

from __future__ import annotations

from collections.abc import Mapping

from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import TOKEN_RE, split_header_values

# RFC 3261 §7.3.3 and the extensions' compact forms.
COMPACT_FORMS: dict[str, str] = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "o": "Event",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "u": "Allow-Events",
}

_CANONICAL_NAMES = [
    "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
    "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
    "Content-Disposition", "Content-Encoding", "Content-Language", "Content-Length",
    "Content-Type", "CSeq", "Date", "Error-Info", "Event", "Expires", "From", "In-Reply-To",
    "Max-Forwards", "Min-Expires", "Min-SE", "MIME-Version", "Organization",
    "P-Asserted-Identity", "P-Preferred-Identity", "Priority", "Privacy",
    "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck", "Reason",
    "Record-Route", "Refer-To", "Referred-By", "Replaces", "Reply-To", "Require",
    "Retry-After", "Route", "RSeq", "Server", "Session-Expires", "Subject",
    "Subscription-State", "Supported", "Timestamp", "To", "Unsupported", "User-Agent", "Via",
    "Warning", "WWW-Authenticate",
]
_CANONICAL: dict[str, str] = {n.lower(): n for n in _CANONICAL_NAMES}
_CANONICAL.update({k: v for k, v in COMPACT_FORMS.items()})

# Headers whose values are comma-separated lists (RFC 3261 §7.3.1), split by get_all().
_LIST_HEADERS = frozenset(
    {"via", "route", "record-route", "contact", "allow", "supported", "require"}
)


# Lower-case name -> lower-case key: compact forms become their full names' keys.
_KEY_OF_LOWER: dict[str, str] = {k: v.lower() for k, v in _CANONICAL.items()}

# A known name as it is usually written (canonical, lower-case, Title-Case, upper-case;
# compact forms in either case) -> (lower-case key, canonical spelling): one dict lookup
# of the name as received, no lower() nor second lookup, for nearly every header line.
# Only names that are tokens (RFC 3261 §25.1) are keys, so a hit needs no further check.
NAME_INFO: dict[str, tuple[str, str]] = {}
for _lower, _cname in _CANONICAL.items():
    for _spelling in (_lower, _cname, _lower.title(), _lower.upper()):
        NAME_INFO.setdefault(_spelling, (_cname.lower(), _cname))


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name; compact forms become full names."""
    info = NAME_INFO.get(name)
    if info is not None:
        return info[1]
    return _CANONICAL.get(name.lower(), name)


def name_info(name: str) -> tuple[str, str]:
    """(lower-case key, canonical spelling) of a header name; an unknown name keeps its
    spelling."""
    info = NAME_INFO.get(name)
    if info is not None:
        return info
    cname = _CANONICAL.get(name.lower(), name)
    return cname.lower(), cname


def _key(name: str) -> str:
    """The lower-case key of a header name (`canonical_name(name).lower()`, one lookup)."""
    info = NAME_INFO.get(name)
    if info is not None:
        return info[0]
    lower = name.lower()
    return _KEY_OF_LOWER.get(lower, lower)


class Headers:
    """Ordered header fields with case-insensitive names.

    Compact forms are stored under their full names; names are kept in
    canonical spelling (`Call-ID`, `CSeq`, `WWW-Authenticate`), unknown ones as
    first written.

    Linear in the message however many distinct names it carries: `add` is O(1)
    (the spelling of a name already seen is looked up in `_spelling`, not searched
    for), `in` and `count` are O(1), `get` O(1) once a name's first value is known
    (`_first`, filled by `add` and by the first `get` after a change that may have
    moved it), `get_all` one pass that absent names skip. `_spelling` and `_count`
    hold exactly the keys present in `_items`; `_first` a subset of them.
    """

    __slots__ = ("_items", "_spelling", "_count", "_first")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        # (lower-case key, spelling, value), in order
        self._items: list[tuple[str, str, str]] = []
        self._spelling: dict[str, str] = {}  # lower-case key -> its spelling
        self._count: dict[str, int] = {}  # lower-case key -> number of lines
        self._first: dict[str, str] = {}  # lower-case key -> its first value (a cache)
        if items:
            for name, value in items:
                self.add(name, value)

    @classmethod
    def parse_lines(cls, lines: list[str]) -> Headers:
        """The header fields of `name: value` lines with no continuation lines among
        them (the caller unfolds those first), in one pass; SipError on a line that is
        empty, has no colon or whose name is not a token (RFC 3261 §7.3.1). A name as
        usually written is resolved by one dict lookup (`NAME_INFO`, whose keys are
        all tokens); any other is stripped, checked and resolved."""
        h = cls()
        items, count, spelling, first = h._items, h._count, h._spelling, h._first
        for line in lines:
            name, colon, value = line.partition(":")
            info = NAME_INFO.get(name)
            if info is None:
                if not line:
                    raise SipError("empty line inside the header section")
                name = name.strip(" \t")
                if not colon or not TOKEN_RE.fullmatch(name):
                    raise SipError(f"bad header line {excerpt(line)}")
                info = name_info(name)
            elif not colon:
                raise SipError(f"bad header line {excerpt(line)}")
            key = info[0]
            value = value.strip(" \t")
            n = count.get(key, 0)
            if n:
                items.append((key, spelling[key], value))
            else:
                spelling[key] = info[1]
                first[key] = value
                items.append((key, info[1], value))
            count[key] = n + 1
        return h

    @property
    def key_counts(self) -> Mapping[str, int]:
        """Lower-case key -> number of lines (compact forms under their full names'
        keys); read-only use."""
        return self._count

    def get(self, name: str) -> str | None:
        """The first value of `name`, or None."""
        info = NAME_INFO.get(name)
        if info is not None:
            key = info[0]
        else:
            lower = name.lower()
            key = _KEY_OF_LOWER.get(lower, lower)
        value = self._first.get(key)
        if value is not None or key not in self._count:
            return value
        for k, _, v in self._items:
            if k == key:
                self._first[key] = v
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of `name`; list-valued headers are also split on commas."""
        key = _key(name)
        if key not in self._count:
            return []
        values = [v for k, _, v in self._items if k == key]
        if key in _LIST_HEADERS:
            out: list[str] = []
            for v in values:
                out.extend(split_header_values(v))
            return out
        return values

    def lines(self, name: str) -> list[str]:
        """The value of each `name` line, in order, not split on commas."""
        key = _key(name)
        if key not in self._count:
            return []
        return [v for k, _, v in self._items if k == key]

    def count(self, name: str) -> int:
        """How many header lines carry `name`."""
        return self._count.get(_key(name), 0)

    def _entry(self, name: str, value: str) -> tuple[str, str, str]:
        """Canonical spelling, or for an unknown name the spelling first seen."""
        cname = canonical_name(name)
        key = cname.lower()
        return key, self._spelling.get(key, cname), value

    def _counted(self, entry: tuple[str, str, str]) -> tuple[str, str, str]:
        key = entry[0]
        self._count[key] = self._count.get(key, 0) + 1
        self._spelling.setdefault(key, entry[1])
        return entry

    def add(self, name: str, value: str) -> None:
        # `_entry` and `_counted` inlined: the parser calls this for every header line.
        info = NAME_INFO.get(name)
        if info is not None:
            key, cname = info
        else:
            cname = _CANONICAL.get(name.lower(), name)
            key = cname.lower()
        count = self._count.get(key, 0)
        if count:
            self._items.append((key, self._spelling[key], value))
        else:
            self._spelling[key] = cname
            self._first[key] = value
            self._items.append((key, cname, value))
        self._count[key] = count + 1

    def insert(self, index: int, name: str, value: str) -> None:
        """Insert a header line at position `index` (0 → before all others)."""
        entry = self._counted(self._entry(name, value))
        self._first.pop(entry[0], None)  # it may now come first
        self._items.insert(index, entry)

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name` by one, at the position of the first."""
        entry = self._entry(name, value)
        key = entry[0]
        self._first[key] = value
        if key not in self._count:
            self._items.append(self._counted(entry))
            return
        first = next(i for i, it in enumerate(self._items) if it[0] == key)
        self._items[first] = entry
        self._items[first + 1 :] = [it for it in self._items[first + 1 :] if it[0] != key]
        self._count[key] = 1

    def set_first(self, name: str, value: str) -> None:
        """Replace the value of the first `name` line in place, keeping its spelling and
        every other line (the top Via, RFC 3261 §18.2.1); nothing if there is none."""
        key = _key(name)
        if key not in self._count:
            return
        for i, (k, spelling, _) in enumerate(self._items):
            if k == key:
                self._items[i] = (k, spelling, value)
                self._first[key] = value
                return

    def remove(self, name: str) -> None:
        key = _key(name)
        if self._count.pop(key, None) is not None:
            del self._spelling[key]
            self._first.pop(key, None)
            self._items = [it for it in self._items if it[0] != key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return _key(name) in self._count

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"

    def items(self) -> list[tuple[str, str]]:
        return [(n, v) for _, n, v in self._items]

    def copy(self) -> Headers:
        h = Headers()
        h._items = list(self._items)
        h._spelling = dict(self._spelling)
        h._count = dict(self._count)
        h._first = dict(self._first)
        return h
