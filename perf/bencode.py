"""Bencode, as rtpengine's ng control protocol speaks it (BitTorrent BEP 3 encoding).

    encode({"command": "ping"}) == b"d7:command4:pinge"
    decode(b"d6:result4:ponge") == {"result": b"pong"}

Values: int, bytes (str is encoded as UTF-8 on the way out; strings come back as
bytes, since bencode has no text type), list, dict (keys sorted as raw bytes on
the way out, as BEP 3 requires). `decode` reads the bytes of a datagram from
another process: it does linear work, bounds the nesting depth, and raises
BencodeError for anything that is not exactly one well-formed value.
"""

from __future__ import annotations

from typing import TypeAlias

Value: TypeAlias = "int | bytes | list[Value] | dict[bytes, Value]"
Encodable: TypeAlias = (
    "int | bytes | str | list[Encodable] | tuple[Encodable, ...] | dict[bytes | str, Encodable]"
)

MAX_DEPTH = 32
_DIGITS = b"0123456789"


class BencodeError(ValueError):
    """The input is not one well-formed bencoded value (or a value cannot be encoded)."""


def encode(value: Encodable) -> bytes:
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _encode(value: Encodable, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BencodeError(f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, bool):  # a bool is an int in Python, but not a bencode value
        raise BencodeError("cannot encode a bool")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes | str):
        raw = value.encode() if isinstance(value, str) else value
        out.append(b"%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, list | tuple):
        out.append(b"l")
        for item in value:
            _encode(item, out, depth + 1)
        out.append(b"e")
    elif isinstance(value, dict):
        items = [(k.encode() if isinstance(k, str) else k, v) for k, v in value.items()]
        for k, _ in items:
            if not isinstance(k, bytes):
                raise BencodeError(f"dictionary key {k!r} is not a string")
        items.sort(key=lambda kv: kv[0])
        for (a, _), (b, _) in zip(items, items[1:], strict=False):
            if a == b:
                raise BencodeError(f"duplicate dictionary key {a!r}")
        out.append(b"d")
        for k, v in items:
            out.append(b"%d:" % len(k))
            out.append(k)
            _encode(v, out, depth + 1)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot encode {type(value).__name__}")


def decode(data: bytes) -> Value:
    """The one value in `data`; BencodeError if it is malformed or followed by anything."""
    value, end = _decode(data, 0, 0)
    if end != len(data):
        raise BencodeError(f"trailing data at offset {end}")
    return value


def _decode(data: bytes, pos: int, depth: int) -> tuple[Value, int]:
    if depth > MAX_DEPTH:
        raise BencodeError(f"nesting deeper than {MAX_DEPTH} at offset {pos}")
    if pos >= len(data):
        raise BencodeError(f"truncated at offset {pos}")
    head = data[pos : pos + 1]
    if head == b"i":
        end = data.find(b"e", pos + 1)
        if end < 0:
            raise BencodeError(f"unterminated integer at offset {pos}")
        return _integer(data[pos + 1 : end], pos), end + 1
    if head in (b"l", b"d"):
        pos += 1
        items: list[Value] = []
        while True:
            if pos >= len(data):
                raise BencodeError("unterminated list or dictionary")
            if data[pos : pos + 1] == b"e":
                pos += 1
                break
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        if head == b"l":
            return items, pos
        if len(items) % 2:
            raise BencodeError("dictionary key without a value")
        out: dict[bytes, Value] = {}
        for k, v in zip(items[0::2], items[1::2], strict=True):
            if not isinstance(k, bytes):
                raise BencodeError(f"dictionary key {k!r} is not a string")
            if k in out:
                raise BencodeError(f"duplicate dictionary key {k!r}")
            out[k] = v
        return out, pos
    if head in _DIGITS_BYTES:
        colon = data.find(b":", pos, pos + 12)
        if colon < 0:
            raise BencodeError(f"string length without ':' at offset {pos}")
        digits = data[pos:colon]
        if not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0"):
            raise BencodeError(f"bad string length {digits!r} at offset {pos}")
        n = int(digits)
        start = colon + 1
        if start + n > len(data):
            raise BencodeError(f"string of {n} bytes truncated at offset {pos}")
        return data[start : start + n], start + n
    raise BencodeError(f"unexpected byte {head!r} at offset {pos}")


_DIGITS_BYTES = {bytes([c]) for c in _DIGITS}


def _integer(digits: bytes, pos: int) -> int:
    body = digits[1:] if digits[:1] == b"-" else digits
    # BEP 3: no leading zeros, no "-0", at least one digit; bounded so int() stays cheap.
    if (not body.isdigit() or len(body) > 20 or (len(body) > 1 and body[:1] == b"0")
            or digits == b"-0"):  # fmt: skip
        raise BencodeError(f"bad integer {digits!r} at offset {pos}")
    return int(digits)
