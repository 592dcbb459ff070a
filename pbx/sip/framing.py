"""SIP message framing on a stream transport (RFC 3261 §18.3, RFC 5626 §3.5.1), sans-IO.

Theory of operation
-------------------
On UDP a datagram is a message. On TCP the bytes of many messages follow each
other and the only frame is the header section's end (the first empty line)
plus the `Content-Length` octets of body after it; without `Content-Length` a
message on a stream cannot be framed, so it is an error (RFC 3261 §18.3:
"MUST be used with stream oriented transports"), answered with 400 and the
connection closed since nothing after it can be framed either.

Like h11's `Connection`, `StreamFramer.receive_data(bytes)` only buffers and
`next_event()` hands back one event at a time, or None when it needs more
bytes:

* `Message(data)`: the bytes of one whole message, for `parse_message`;
* `Ping()`: a CRLFCRLF keep-alive between messages (RFC 5626 §3.5.1); the
  shell answers it with a single CRLF "pong". A lone CRLF (a pong, or stray
  line ends between messages, RFC 3261 §7.5) is skipped silently.

Anything that cannot be framed raises `FramingError` carrying the status it
suggests (400, or 413 when the message is larger than `max_message_bytes`) and
the header bytes received, so the shell can answer a request before it closes
the connection. After an error the framer is dead: every further call raises
the same error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pbx.sip.errors import SipError

# 64 KB: the largest message a UDP datagram can hold, and our limit on TCP too.
MAX_MESSAGE_BYTES = 65536

# `Content-Length` or its compact form `l` at the start of a header line (RFC 3261 §20.14).
_CONTENT_LENGTH_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t\r]*$",
                                re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Message:
    """The bytes of one complete message (header section, empty line, body)."""

    data: bytes


@dataclass(frozen=True)
class Ping:
    """A CRLFCRLF keep-alive: answer with one CRLF (RFC 5626 §3.5.1)."""


FramingEvent = Message | Ping


class FramingError(SipError):
    """The stream cannot be framed any more; `head` is the header section, if any."""

    def __init__(self, message: str, status: int = 400, head: bytes = b"") -> None:
        super().__init__(message, status)
        self.head = head


class StreamFramer:
    """Splits one connection's byte stream into SIP messages."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_event(self) -> FramingEvent | None:
        """The next whole message or keep-alive, or None until more bytes come."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except FramingError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next_event(self) -> FramingEvent | None:
        buf = self._buffer
        while buf[:2] == b"\r\n":
            if buf[:4] == b"\r\n\r\n":
                del buf[:4]
                return Ping()
            if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                return None  # may yet become a ping
            del buf[:2]  # a pong or a stray CRLF between messages
        if not buf:
            return None
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_message_bytes:
                raise FramingError("header section too large", 413, bytes(buf[:4096]))
            return None
        head = bytes(buf[:end])
        body_start = end + 4
        values = _CONTENT_LENGTH_RE.findall(head)
        if not values:
            raise FramingError("missing Content-Length on a stream transport", 400, head)
        if len(set(values)) > 1:
            raise FramingError("conflicting Content-Length values", 400, head)
        text = values[0]
        if not text.isdigit() or len(text) > 10:
            raise FramingError(f"bad Content-Length {text[:20]!r}", 400, head)
        length = int(text)
        if body_start + length > self.max_message_bytes:
            raise FramingError(f"message of {body_start + length} octets is too large",
                               413, head)
        if len(buf) < body_start + length:
            return None
        data = bytes(buf[:body_start + length])
        del buf[:body_start + length]
        return Message(data)
