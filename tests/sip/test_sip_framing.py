"""Stream framing: every input fed whole, byte by byte and with trailing data (h11's
`test_io.py` method), keep-alives, and the errors that close a connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx.sip.framing import FramingError, Message, Ping, StreamFramer
from pbx.sip.message import SipRequest, parse_message

# The RFC 4475 torture messages, vendored with their README and licence.
CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "rfc4475"

OPTIONS = (
    b"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK-1\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:pbx@127.0.0.1>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)
BODY = b"v=0\r\n\r\n\r\nbody with an empty line\r\n"
INFO = (
    b"INFO sip:pbx@127.0.0.1 SIP/2.0\r\n"
    b"v: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK-2\r\n"
    b"f: <sip:a@127.0.0.1>;tag=1\r\nt: <sip:pbx@127.0.0.1>\r\n"
    b"i: c2\r\nCSeq: 2 INFO\r\nl:   " + str(len(BODY)).encode() + b"  \r\n\r\n" + BODY
)


def feed(chunks: list[bytes], framer: StreamFramer | None = None) -> list[object]:
    framer = framer or StreamFramer()
    events: list[object] = []
    for chunk in chunks:
        framer.receive_data(chunk)
        while (ev := framer.next_event()) is not None:
            events.append(ev)
    return events


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


SPLITS = [whole, bytewise]


@pytest.mark.parametrize("split", SPLITS)
def test_two_messages_back_to_back(split: object) -> None:
    events = feed(split(OPTIONS + INFO))  # type: ignore[operator]
    assert events == [Message(OPTIONS), Message(INFO)]
    info = parse_message(events[1].data)  # type: ignore[attr-defined]
    assert isinstance(info, SipRequest) and info.body == BODY


@pytest.mark.parametrize("split", SPLITS)
def test_trailing_partial_message_waits(split: object) -> None:
    framer = StreamFramer()
    events = feed(split(OPTIONS + INFO[:-5]), framer)  # type: ignore[operator]
    assert events == [Message(OPTIONS)]
    assert framer.buffered == len(INFO) - 5
    assert feed([INFO[-5:]], framer) == [Message(INFO)]
    assert framer.buffered == 0


@pytest.mark.parametrize("split", SPLITS)
def test_keepalives(split: object) -> None:
    # ping, a pong (lone CRLF) before a message, a ping after it
    events = feed(split(b"\r\n\r\n" + b"\r\n" + OPTIONS + b"\r\n\r\n"))  # type: ignore[operator]
    assert events == [Ping(), Message(OPTIONS), Ping()]


def test_lone_crlf_waits_for_more() -> None:
    framer = StreamFramer()
    assert feed([b"\r\n"], framer) == []
    assert feed([b"\r\n"], framer) == [Ping()]


def test_missing_content_length_is_400() -> None:
    data = OPTIONS.replace(b"Content-Length: 0\r\n", b"")
    framer = StreamFramer()
    framer.receive_data(data)
    with pytest.raises(FramingError) as err:
        framer.next_event()
    assert err.value.status == 400
    assert err.value.head.startswith(b"OPTIONS sip:")
    # dead afterwards: nothing more can be framed on this connection
    with pytest.raises(FramingError):
        framer.receive_data(OPTIONS)
    with pytest.raises(FramingError):
        framer.next_event()


@pytest.mark.parametrize("value", [b"-999", b"abc", b"12345678901", b""])
def test_bad_content_length_is_400(value: bytes) -> None:
    data = OPTIONS.replace(b"Content-Length: 0", b"Content-Length: " + value)
    with pytest.raises(FramingError) as err:
        feed([data])
    assert err.value.status == 400


def test_conflicting_content_lengths_are_400() -> None:
    data = OPTIONS.replace(b"Content-Length: 0\r\n", b"Content-Length: 0\r\nl: 5\r\n")
    with pytest.raises(FramingError) as err:
        feed([data])
    assert err.value.status == 400


def test_too_large_body_is_413_before_it_arrives() -> None:
    data = OPTIONS.replace(b"Content-Length: 0", b"Content-Length: 70000")
    with pytest.raises(FramingError) as err:
        feed([data])
    assert err.value.status == 413


def test_endless_header_section_is_413() -> None:
    framer = StreamFramer(max_message_bytes=1000)
    framer.receive_data(b"OPTIONS sip:x SIP/2.0\r\n")
    with pytest.raises(FramingError) as err:
        for _ in range(100):
            framer.receive_data(b"X-Junk: " + b"a" * 50 + b"\r\n")
            framer.next_event()
    assert err.value.status == 413


def test_limit_is_inclusive() -> None:
    framer = StreamFramer(max_message_bytes=len(OPTIONS))
    assert feed([OPTIONS], framer) == [Message(OPTIONS)]


@pytest.mark.parametrize("name", ["clerr.dat", "ncl.dat", "mcl01.dat", "inv2543.dat"])
def test_unframeable_torture_messages_close_the_stream(name: str) -> None:
    """RFC 4475 §3.1.2.2, §3.1.2.3, §3.3.9, §3.4.1: on a stream these cannot be framed
    (clerr: waits for 9999 octets that never come; the others are errors)."""
    framer = StreamFramer()
    framer.receive_data((CORPUS / name).read_bytes())
    if name == "clerr.dat":
        assert framer.next_event() is None
        return
    with pytest.raises(FramingError):
        framer.next_event()


def test_torture_messages_with_content_length_frame_whole_and_bytewise() -> None:
    for path in sorted(CORPUS.glob("*.dat")):
        data = path.read_bytes()
        if path.name in ("clerr.dat", "ncl.dat", "mcl01.dat", "inv2543.dat", "dblreq.dat",
                         "test.dat", "bigcode.dat", "baddn.dat", "insuf.dat"):
            continue
        for chunks in (whole(data), bytewise(data)):
            try:
                events = feed(chunks)
            except FramingError as exc:
                pytest.fail(f"{path.name}: {exc}")
            assert len(events) == 1 and isinstance(events[0], Message), path.name
