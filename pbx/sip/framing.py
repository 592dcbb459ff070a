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

Every byte is looked at a bounded number of times, however the stream is cut
into segments: the search for the empty line resumes where the last one
stopped (a header section sent one byte per segment is scanned once, not once
per segment), and `Content-Length` is found by one pass over the header lines
(no regular expression that could backtrack over a long run of spaces).
"""

from __future__ import annotations

from dataclasses import dataclass

from pbx.sip.errors import SipError, excerpt

# 64 KB: the largest message a UDP datagram can hold, and our limit on TCP too.
MAX_MESSAGE_BYTES = 65536

# `Content-Length` or its compact form `l` (RFC 3261 §20.14), lower-cased.
_CONTENT_LENGTH_NAMES = (b"content-length", b"l")


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
        # Where the search for CRLFCRLF resumes: the buffer before it holds none.
        self._searched = 0
        # The size of the message whose header section is complete, until its body is.
        self._message_bytes: int | None = None

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
            self._searched = 0
            self._message_bytes = None
            raise

    def _next_event(self) -> FramingEvent | None:
        buf = self._buffer
        if self._message_bytes is None:
            if self._searched == 0:
                while buf[:2] == b"\r\n":
                    if buf[:4] == b"\r\n\r\n":
                        del buf[:4]
                        return Ping()
                    if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                        return None  # may yet become a ping
                    del buf[:2]  # a pong or a stray CRLF between messages
                if not buf:
                    return None
            end = buf.find(b"\r\n\r\n", self._searched)
            if end < 0:
                if len(buf) > self.max_message_bytes:
                    raise FramingError("header section too large", 413, bytes(buf[:4096]))
                # The last 3 bytes may begin a CRLFCRLF that the next segment completes.
                self._searched = max(0, len(buf) - 3)
                return None
            if end + 4 > self.max_message_bytes:
                # the same answer as when the limit is reached before the end arrives
                raise FramingError("header section too large", 413, bytes(buf[:4096]))
            head = bytes(buf[:end])
            size = end + 4 + _content_length(head)
            if size > self.max_message_bytes:
                raise FramingError(f"message of {size} octets is too large", 413, head)
            # Read once: a body arriving in many segments does not re-read the header.
            self._message_bytes = size
        size = self._message_bytes
        if len(buf) < size:
            return None
        data = bytes(buf[:size])
        del buf[:size]
        self._searched = 0
        self._message_bytes = None
        return Message(data)


def _content_length(head: bytes) -> int:
    """The one `Content-Length` of a header section (RFC 3261 §18.3: required on a
    stream); FramingError (400) when it is missing, repeated with another value, or
    not 1-10 ASCII digits. A line scan: each byte of `head` is read a few times."""
    values: set[bytes] = set()
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        # The name starts the line (a continuation line starts with white space).
        if colon and name.rstrip(b" \t").lower() in _CONTENT_LENGTH_NAMES:
            values.add(value.lstrip(b" \t").rstrip(b" \t\r"))
    if not values:
        raise FramingError("missing Content-Length on a stream transport", 400, head)
    if len(values) > 1:
        raise FramingError("conflicting Content-Length values", 400, head)
    text = values.pop()
    if not text.isdigit() or len(text) > 10:  # bytes.isdigit(): ASCII digits only
        raise FramingError(f"bad Content-Length {excerpt(text)}", 400, head)
    return int(text)
