"""Parsers do linear work (issue 8, "one packet stalls the front for seconds").

Each case is a worst-case input of about 60 KB (what one UDP datagram holds) next to
a normal input of the same size: either the same shape with the trap taken out (as
many header lines but one name, as many media sections but no session-level
direction), or, where the trap is the content itself, a big but ordinary message
(proxies' Vias and Record-Routes, Contacts, vendor headers). The worst case may
cost at most FACTOR times the normal one plus a little slack, both timed in the
same run as the best of several interleaved tries, so a loaded machine slows both
alike.

At 2554a5d, 11,174 distinct header names in 64,997 bytes took 1.4 s to parse and
`Content-Length: 0` + 40,000 spaces + `x` took 6 s to frame: ratios in the
hundreds or thousands. Five cases failed there (distinct names, spaces in Via's
sent-by, the framer's spaces and its re-read header, the SDP session direction);
the others were linear already and guard it. A linear parser stays within a few
times the normal cost (Python's per-character loops over quoted strings are the
dearest, about 3x).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pbx.sip.digest import parse_auth_params
from pbx.sip.errors import SipError
from pbx.sip.framing import StreamFramer
from pbx.sip.message import parse_message
from pbx.sip.sdp import answer_offer
from pbx.sip.uri import parse_name_addr

SIZE = 60_000
FACTOR = 8.0
SLACK_S = 0.005
TRIES = 7
BUDGET_S = 1.5  # per input: a quadratic parse is timed once or twice, not TRIES times


@dataclass(frozen=True)
class Case:
    name: str
    parse: Callable[[bytes], object]
    worst: bytes
    normal: bytes


def _swallow(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """Rejecting the input is as good as accepting it here: only the time counts."""

    def run(data: bytes) -> object:
        try:
            return parse(data)
        except SipError as exc:
            return exc

    return run


def _best_times(case: Case) -> tuple[float, float]:
    """Best of TRIES timings of the worst and the normal input, interleaved."""
    best = [float("inf"), float("inf")]
    spent = [0.0, 0.0]
    for _ in range(TRIES):
        for i, data in enumerate((case.worst, case.normal)):
            if spent[i] > BUDGET_S:
                continue
            start = time.perf_counter()
            case.parse(data)
            elapsed = time.perf_counter() - start
            best[i] = min(best[i], elapsed)
            spent[i] += elapsed
    return best[0], best[1]


def _fill(unit: bytes, room: int) -> bytes:
    return unit * max(1, room // len(unit))


# ------------------------------------------------------------------ SIP messages

_HEAD = (
    b"INVITE sip:bob@pbx.example SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:bob@pbx.example>\r\n"
    b"From: <sip:alice@example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710\r\n"
    b"CSeq: 314159 INVITE\r\n"
)
_ROOM = SIZE - len(_HEAD)
_ORDINARY_LINES = (
    b"Via: SIP/2.0/UDP 10.20.30.40:5060;branch=z9hG4bK-524287-1---77f5a1e2b1;rport\r\n"
    b"Record-Route: <sip:203.0.113.17:5060;lr;ftag=as5f3c2e1a>\r\n"
    b'Contact: "Alice" <sip:alice@198.51.100.1:5060;transport=udp>;expires=3600\r\n'
    b"X-Vendor-Trace: 1c9f0e2a-77b4-4f1e-9d51-2b8e6f0c3a11;hop=3\r\n"
    b"Supported: replaces, timer, 100rel, path\r\n"
)


def _message(lines: bytes) -> bytes:
    return _HEAD + lines + b"Content-Length: 0\r\n\r\n"


def _with(header: bytes, value: bytes) -> bytes:
    """The base message with the value of its `header` line (b"Via: ") replaced."""
    lines = [header + value if line.startswith(header) else line
             for line in _HEAD.split(b"\r\n")]
    return b"\r\n".join(lines) + b"Content-Length: 0\r\n\r\n"


def _ordinary(size: int) -> bytes:
    """A message of about `size` bytes of ordinary header lines."""
    return _message(_fill(_ORDINARY_LINES, size - len(_HEAD) - 21))


def _names(count: int) -> list[bytes]:
    """`count` distinct short header names, none a known or compact one."""
    alphabet = b"abcdefghjknopqrwyz"
    out: list[bytes] = []
    width = 1
    while len(out) < count:
        width += 1
        for i in range(len(alphabet) ** width):
            name = bytearray(b"Q")
            for _ in range(width):
                i, r = divmod(i, len(alphabet))
                name.append(alphabet[r])
            out.append(bytes(name))
            if len(out) == count:
                break
    return out


def _parse_contacts(data: bytes) -> object:
    msg = parse_message(data)
    return [parse_name_addr(v) for v in msg.headers.get_all("Contact")]


def distinct_names() -> Case:
    """1.4 s at 2554a5d (11,174 names in 64,997 bytes): each new name searched all the
    earlier lines. Normal: as many lines, all of one name."""
    names = _names(_ROOM // 7)
    return Case("many distinct header names", _swallow(parse_message),
                _message(b"".join(n + b":\r\n" for n in names)),
                _message(b"".join(b"Q:" + b"a" * (len(n) - 1) + b"\r\n" for n in names)))


def folded_header() -> Case:
    """Each continuation line copied the whole line so far. Normal: as many lines,
    each its own header."""
    return Case("a header folded over thousands of lines", _swallow(parse_message),
                _message(b"Subject: a\r\n" + _fill(b" b\r\n", _ROOM)),
                _message(_fill(b"S:b\r\n", _ROOM)))


def many_contacts() -> Case:
    """Quoted display names holding commas, split and parsed. Normal: as many
    Contacts, unquoted."""
    return Case("many quoted Contacts", _swallow(_parse_contacts),
                _message(b"Contact: " + _fill(b'"a,b" <sip:x@y>,', _ROOM) + b"\r\n"),
                _message(b"Contact: " + _fill(b"<sip:x@yyyyyy>,", _ROOM) + b"\r\n"))


def many_vias() -> Case:
    """Thousands of Vias in one header line. Normal: about as many, four a line."""
    return Case("many comma-separated Vias", _swallow(parse_message),
                _with(b"Via: ", b"SIP/2.0/UDP h;branch=z9hG4bK1" + _fill(b",SIP/2.0/UDP h", _ROOM)),
                _message(_fill(b"Via: " + b",".join([b"SIP/2.0/UDP h"] * 4) + b"\r\n", _ROOM)))


def _ordinary_case(name: str, worst: bytes, parse: Callable[[bytes], object] = parse_message
                   ) -> Case:
    return Case(name, _swallow(parse), worst, _ordinary(len(worst)))


def _spaces(header: bytes, before: bytes, after: bytes) -> Case:
    """A long run of spaces inside a value."""
    where = f"before {after.decode().split(';')[0]} in {header.decode().rstrip(': ')}"
    return _ordinary_case(f"a long run of spaces {where}",
                          _with(header, before + b" " * _ROOM + after))


SIP_CASES: list[Callable[[], Case]] = [
    distinct_names, folded_header, many_contacts, many_vias,
    lambda: _ordinary_case("a display name of escaped quotes",
                           _with(b"From: ", b'"' + _fill(b'\\"', _ROOM) + b'" <sip:a@b>;tag=1')),
    lambda: _ordinary_case("an unterminated display name",
                           _with(b"From: ", b'"' + _fill(b"a\\", _ROOM) + b" <sip:a@b>;tag=1")),
    lambda: _ordinary_case("many quoted parameters",
                           _with(b"To: ", b"<sip:bob@pbx.example>" + _fill(b';p="\\";,\\""', _ROOM))),
    lambda: _ordinary_case("many Via parameters",
                           _with(b"Via: ", b"SIP/2.0/UDP h;branch=z9hG4bK1" + _fill(b";rport", _ROOM))),
    lambda: _ordinary_case("many URI parameters",
                           _with(b"From: ", b"<sip:a@b" + _fill(b";lr", _ROOM) + b">;tag=1")),
    # 7.4 s at 2554a5d: sent-by's `\s*:\s*` substitution rescanned the run from each space
    lambda: _spaces(b"Via: ", b"SIP/2.0/UDP h", b"x;branch=z9hG4bK1"),
    lambda: _spaces(b"Via: ", b"SIP/2.0/UDP h", b":5060;branch=z9hG4bK1"),
    lambda: _spaces(b"CSeq: ", b"1", b"INVITE"),
    lambda: _spaces(b"From: ", b"Alice", b"<sip:a@b>;tag=1"),
    lambda: _spaces(b"Max-Forwards: ", b"7", b"0"),
]


# ------------------------------------------------------------------ TCP framing


def _frame(segment: int) -> Callable[[bytes], object]:
    """Frame `data` fed `segment` bytes at a time, as the TCP shell does."""

    def run(data: bytes) -> object:
        framer = StreamFramer()
        out = []
        for i in range(0, len(data), segment):
            framer.receive_data(data[i : i + segment])
            while (ev := framer.next_event()) is not None:
                out.append(ev)
        return out

    return run


def _body_message(size: int) -> bytes:
    """A message of `size` bytes, nearly all body: the normal input for segmenting."""
    body = size - len(_HEAD) - 24
    return _HEAD + b"Content-Length: %d\r\n\r\n" % body + b"v" * body


def framer_spaces() -> Case:
    """6 s at 2554a5d: the `(.*?)[ \\t\\r]*$` Content-Length regex backtracked."""
    worst = _with(b"CSeq: ", b"1 INVITE").replace(
        b"Content-Length: 0", b"Content-Length: 0" + b" " * 40_000 + b"x")
    return Case("Content-Length + 40,000 spaces on a stream", _swallow(_frame(1 << 16)),
                worst, _ordinary(len(worst)))


def framer_header_segments() -> Case:
    """0.9 s at 2554a5d: each segment rescanned the whole buffer for the empty line."""
    worst = _message(_fill(b"X-Pad: v\r\n", _ROOM))
    return Case("a 60 KB header section sent 2 bytes per segment", _swallow(_frame(2)),
                worst, _body_message(len(worst)))


def framer_body_segments() -> Case:
    """6.7 s at 2554a5d: while the body came, each segment re-read the 30 KB header."""
    worst = (_HEAD + _fill(b"X-Pad: v\r\n", _ROOM // 2)
             + b"Content-Length: %d\r\n\r\n" % (_ROOM // 2) + b"v" * (_ROOM // 2))
    return Case("a 30 KB header section and its body sent 2 bytes per segment",
                _swallow(_frame(2)), worst, _body_message(len(worst)))


FRAMER_CASES: list[Callable[[], Case]] = [
    framer_spaces, framer_header_segments, framer_body_segments,
]


# ------------------------------------------------------------------ SDP, digest

_SDP_HEAD = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
# A big ordinary offer: media sections with their ICE candidates.
_ORDINARY_MEDIA = (
    b"m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\n"
    b"a=candidate:1 1 UDP 2130706431 192.0.2.1 4000 typ host\r\n"
    b"a=candidate:2 1 UDP 1694498815 198.51.100.7 61000 typ srflx raddr 192.0.2.1 rport 4000\r\n"
)


def _answer(data: bytes) -> object:
    return answer_offer(data, "192.0.2.9", 4000, 1)


def sdp_session_direction() -> Case:
    """A session-level direction was applied to each medium by searching the list of
    media with their own: O(media²). Normal: the same without the session direction."""
    media = _fill(b"m=a 0 b\r\na=sendrecv\r\n", SIZE)
    return Case("SDP with thousands of media after a session direction", _swallow(_answer),
                _SDP_HEAD + b"a=sendonly\r\n" + media, _SDP_HEAD + b"a=x-sendonly\r\n" + media)


def _sdp_case(name: str, worst: bytes) -> Case:
    normal = _SDP_HEAD + _fill(_ORDINARY_MEDIA, len(worst) - len(_SDP_HEAD))
    return Case(name, _swallow(_answer), worst, normal)


_FORMATS = b" ".join(b"%d" % (i % 128) for i in range(SIZE // 8))


def _authorization(data: bytes) -> object:
    return parse_auth_params(data.decode())


def auth_params() -> Case:
    worst = ("Digest " + "".join(f"p{i}=b," for i in range(SIZE // 12))
             + 'realm="' + '\\"' * (SIZE // 4) + '"').encode()
    normal = ("Digest " + "".join(f'p{i}="{"n" * 40}",' for i in range(len(worst) // 48))
              ).encode()
    return Case("Authorization with many parameters and escapes", _swallow(_authorization),
                worst, normal)


OTHER_CASES: list[Callable[[], Case]] = [
    sdp_session_direction,
    lambda: _sdp_case("SDP with thousands of formats and rtpmaps",
                      _SDP_HEAD + b"m=audio 4000 RTP/AVP " + _FORMATS + b"\r\n"
                      + _fill(b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n",
                              SIZE // 2)),
    lambda: _sdp_case("SDP with long runs of spaces",
                      _SDP_HEAD + b"m=audio" + b" " * SIZE + b"4000 RTP/AVP 0\r\n"),
    auth_params,
]


ALL_CASES = SIP_CASES + FRAMER_CASES + OTHER_CASES


def _case_id(make: Callable[[], Case]) -> str:
    return "-".join(make().name.replace(":", "").replace(",", "").split())


@pytest.mark.parametrize("make", ALL_CASES, ids=[_case_id(make) for make in ALL_CASES])
def test_worst_case_costs_a_small_multiple_of_a_normal_input(
        make: Callable[[], Case]) -> None:
    case = make()
    assert abs(len(case.worst) - len(case.normal)) <= len(case.worst) // 5, case.name
    # Parse each once first: imports, regex compilation and caches are not timed.
    case.parse(case.normal)
    case.parse(case.worst)
    worst_s, normal_s = _best_times(case)
    assert worst_s <= FACTOR * normal_s + SLACK_S, (
        f"{case.name}: {len(case.worst)} bytes took {worst_s * 1000:.1f} ms, "
        f"a normal input of {len(case.normal)} bytes {normal_s * 1000:.1f} ms "
        f"(allowed: {FACTOR} x + {SLACK_S * 1000:.0f} ms)")
