"""Fuzz targets: every parser that reads bytes from the network (or from a TTS service).

Each target takes one input and feeds it to a parser. The parser may accept it or
raise its layer's declared error (`SipError`, `FramingError`, `SdpError`, `RtpError`,
`RtcpError`, `WavError`, `TtsError`); any other exception, or a failed assertion
about what it accepted, is a crash (h11's `fuzz/afl-server.py` idea). What parsed is
also used the way the front uses it, so an accepted input cannot blow up later.

The module imports no fuzzer: `tests.fuzz.run` drives these with atheris, and the
tests can call them directly.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from media.dtmf import EVENT_DIGITS, Rfc4733Detector
from media.rtcp import RtcpError, parse_compound
from media.rtp import RtpError, build_rtp, parse_event, parse_rtp
from media.wav import WavError, parse_wav
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.digest import choose_challenge, parse_auth_params, parse_challenge
from pbx.sip.errors import SdpError, SipError
from pbx.sip.fields import DTMF_DIGITS, parse_dtmf_info, parse_session_expires
from pbx.sip.framing import FramingError, Message, Ping, StreamFramer
from pbx.sip.headers import Headers
from pbx.sip.message import SipRequest, make_response, parse_message, stamp_via
from pbx.sip.sdp import answer_offer, origin_of, parse_answer, parse_sdp, without_origin
from pbx.sip.uri import parse_name_addr, parse_uri
from pbx.sip.via import parse_via
from pbx.tts import TtsError, decode_wav

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SEEDS = Path(__file__).resolve().parent / "seeds"
DICTS = Path(__file__).resolve().parent / "dicts"

# An error text quotes a short excerpt of the input, never all of it (issue 8): ours
# (pbx.sip.errors.excerpt) are at most 83 characters; other code cuts the input at 80
# characters, 480 of repr when each is an escaped byte.
MAX_ERROR_CHARS = 1000


def _short(exc: Exception) -> None:
    assert len(str(exc)) <= MAX_ERROR_CHARS, f"error text of {len(str(exc))} chars"


# ------------------------------------------------------------------ SIP


def _use_request(msg: SipRequest) -> None:
    """What the front does with a request before and while answering it."""
    stamp_via(msg, "192.0.2.7", 5060)
    try:
        parse_uri(msg.uri)
    except SipError as exc:
        _short(exc)
    response = make_response(msg, 400, to_tag="x1")
    assert parse_message(response.serialize()).cseq == msg.cseq
    for text in msg.headers.get_all("Session-Expires"):
        try:
            se = parse_session_expires(text)
            assert se.interval_s >= 0
        except SipError as exc:
            _short(exc)
    try:
        info = parse_dtmf_info(msg.headers.get("Content-Type"), msg.body)
        assert info is None or info.digit in DTMF_DIGITS
    except SipError as exc:
        _short(exc)


def sip(data: bytes) -> None:
    """`parse_message` on one datagram; what parses is used, serialised and parsed again."""
    try:
        msg = parse_message(data)
    except SipError as exc:
        _short(exc)
        return
    # Checked by the parser, so readable without further errors (its contract).
    msg.cseq, msg.call_id, msg.branch, msg.from_tag, msg.to_tag  # noqa: B018
    msg.via  # noqa: B018
    for via in msg.headers.get_all("Via"):
        parse_via(via)
    for name in ("Contact", "Route", "Record-Route", "Refer-To", "P-Asserted-Identity"):
        for value in msg.headers.get_all(name):
            try:
                parse_name_addr(value)
            except SipError as exc:
                _short(exc)
    if isinstance(msg, SipRequest):
        _use_request(msg)
    again = parse_message(msg.serialize())
    assert again.cseq == msg.cseq and again.body == msg.body and again.call_id == msg.call_id


# ------------------------------------------------------------------ TCP framing

# Small, so that the size limits are reached by inputs of a few kilobytes.
FRAMER_MAX_BYTES = 2048


def _frame(chunks: list[bytes]) -> tuple[list[Message | Ping], int | None]:
    """The framer's events for a stream cut into `chunks`, and the error status it
    ended with (None if none)."""
    framer = StreamFramer(FRAMER_MAX_BYTES)
    events: list[Message | Ping] = []
    try:
        for chunk in chunks:
            framer.receive_data(chunk)
            while (ev := framer.next_event()) is not None:
                events.append(ev)
    except FramingError as exc:
        _short(exc)
        assert exc.status in (400, 413)
        # dead after an error: every further call raises it again
        try:
            framer.next_event()
        except FramingError as again:
            assert again is exc
        else:
            raise AssertionError("framer alive after an error") from None
        return events, exc.status
    return events, None


def framing(data: bytes) -> None:
    """`StreamFramer` fed the stream whole and in random segments (cut by a hash of the
    input, so a crash replays): the same messages, the same outcome; each framed
    message then parses or raises SipError."""
    rng = random.Random(zlib.crc32(data))
    chunks: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 1, 2, 3, 4, 7, 16, 64, 500))
        chunks.append(data[pos : pos + size])
        pos += size
    whole, whole_status = _frame([data])
    cut, cut_status = _frame(chunks)
    assert whole == cut, "segmenting changed the framing"
    assert whole_status == cut_status, (whole_status, cut_status)
    consumed = 0
    for ev in whole:
        if isinstance(ev, Message):
            assert ev.data and len(ev.data) <= FRAMER_MAX_BYTES
            consumed += len(ev.data)
            try:
                parse_message(ev.data)
            except SipError as exc:
                _short(exc)
    assert consumed <= len(data)


# ------------------------------------------------------------------ SDP

LOCAL_IP = "192.0.2.1"


def sdp(data: bytes) -> None:
    """The offer/answer entry points the front calls on a received body."""
    try:
        parse_sdp(data)
    except SdpError as exc:
        _short(exc)
    try:
        negotiated, answer = answer_offer(data, LOCAL_IP, 40000, 7, version=8)
    except SdpError as exc:
        _short(exc)
    else:
        assert negotiated.codec in ("PCMU", "PCMA")
        # our own answer is valid SDP that negotiates the same codec
        assert parse_answer(answer).codec == negotiated.codec
        assert origin_of(answer) == (7, 8)
    try:
        parse_answer(data)
    except SdpError as exc:
        _short(exc)
    origin_of(data)
    without_origin(data)


# ------------------------------------------------------------------ digest

DIGEST_NOW = 1_700_000_000.0
DIGEST_SECRET = b"fuzz-secret-0123456789abcdef0123"
DIGEST_REALM = "pbx.example"
DIGEST_USERS = {"alice": "wonderland", "bob": "b\u00f6b"}
_authenticator = DigestAuthenticator(DIGEST_REALM, DIGEST_SECRET)


def digest(data: bytes) -> None:
    """Authorization / WWW-Authenticate parsing, and `verify` of a REGISTER carrying
    the text as its credentials (verify raises nothing: it returns a failure)."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        parse_auth_params(text)
    except SipError as exc:
        _short(exc)
    try:
        parse_challenge(text)
    except SipError as exc:
        _short(exc)
    try:
        choose_challenge(text.split("\n"))
    except SipError as exc:
        _short(exc)
    for header, proxy in (("Authorization", False), ("Proxy-Authorization", True)):
        headers = Headers([(header, value) for value in text.split("\n")])
        request = SipRequest("REGISTER", f"sip:{DIGEST_REALM}", headers, b"")
        result = _authenticator.verify(request, DIGEST_USERS.get, DIGEST_NOW, proxy=proxy)
        assert isinstance(result.ok, bool)


# ------------------------------------------------------------------ RTP, RTCP, RFC 4733


def rtp(data: bytes) -> None:
    """RTP header parsing; what parses builds back to the same packet."""
    try:
        packet = parse_rtp(data)
    except RtpError as exc:
        _short(exc)
        return
    assert parse_rtp(build_rtp(packet)) == packet


def rtcp(data: bytes) -> None:
    try:
        for report in parse_compound(data):
            assert all(0 <= b.fraction_lost <= 255 for b in report.blocks)
    except RtcpError as exc:
        _short(exc)


def rfc4733(data: bytes) -> None:
    """A stream of telephone-event packets: records of a 4-byte RTP timestamp, a length
    byte and that many payload bytes, through `parse_event` and the detector."""
    detector = Rfc4733Detector()
    pos = 0
    packets = digits = 0
    while pos + 5 <= len(data):
        timestamp = int.from_bytes(data[pos : pos + 4], "big")
        size = data[pos + 4] % 8
        payload = data[pos + 5 : pos + 5 + size]
        pos += 5 + size
        try:
            event = parse_event(payload)
        except RtpError as exc:
            _short(exc)
            continue
        packets += 1
        now = packets * 0.1  # packets 100 ms apart: a pending event may expire between two
        expired = detector.expire(now)
        out = detector.feed(timestamp, event, now)
        if expired is not None:
            out.append(expired.digit)
        assert all(d in EVENT_DIGITS for d in out)
        digits += len(out)
    # a packet can end at most itself and one event left pending before it
    assert digits <= 2 * packets


# ------------------------------------------------------------------ WAV


def wav(data: bytes) -> None:
    """Both WAV readers: prompts (`media.wav.parse_wav`) and TTS output (`decode_wav`)."""
    try:
        audio = parse_wav(data)
    except WavError as exc:
        _short(exc)
    else:
        assert audio.samples.shape == (audio.frames, audio.channels)
    try:
        samples, rate = decode_wav(data)
    except TtsError as exc:
        _short(exc)
    else:
        assert samples.ndim == 1 and 1000 <= rate <= 384_000


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: tuple[Path, ...]  # seed corpus directories, read-only
    max_len: int = 4096  # libFuzzer's -max_len for the target
    dictionary: Path | None = None  # libFuzzer's -dict: tokens worth inserting


_SIP_SEEDS = (FIXTURES / "rfc4475", SEEDS / "sip")
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sip", sip, _SIP_SEEDS, 8192, DICTS / "sip.dict"),
        Target("framing", framing, _SIP_SEEDS, 8192, DICTS / "sip.dict"),
        Target("sdp", sdp, (SEEDS / "sdp",), 4096, DICTS / "sdp.dict"),
        Target("digest", digest, (SEEDS / "digest",), 4096, DICTS / "digest.dict"),
        Target("rtp", rtp, (SEEDS / "rtp",)),
        Target("rtcp", rtcp, (SEEDS / "rtcp",)),
        Target("rfc4733", rfc4733, (SEEDS / "rfc4733",)),
        Target("wav", wav, (SEEDS / "wav",)),
    )
}
