"""The one error type of the SIP layer (STYLE §5).

`SipError.status` is the response the error suggests: 400 for a malformed
message, 505 for an unknown SIP version, 488 for an SDP offer we cannot answer.
The front catches it at one boundary and answers (requests) or drops (responses).
"""

from __future__ import annotations

# How much of the offending input an error text quotes: enough to recognise it in a
# log line, never the whole of a 64 KB datagram (the front logs and echoes these texts).
EXCERPT_CHARS = 40


def excerpt(text: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """`repr` of the start of `text`, `...` marking a cut: at most `limit` characters
    of the input, and at most 2 x `limit` of output however many of them need escapes
    (a surrogate-escaped byte is 6 characters of repr)."""
    shown = repr(text[:limit])
    cut = len(text) > limit
    if len(shown) > 2 * limit:
        shown, cut = shown[: 2 * limit], True
    return shown + "..." if cut else shown


class SipError(Exception):
    """A SIP protocol error; `status` is the response code it suggests."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status})"


class SdpError(SipError):
    """An SDP body that cannot be parsed or answered (RFC 3264: 488 Not Acceptable Here)."""

    def __init__(self, message: str, status: int = 488) -> None:
        super().__init__(message, status)
