"""SDP (RFC 4566) parsing and the offer/answer model (RFC 3264) for G.711 audio.

We speak PCMU and PCMA at 8 kHz plus RFC 4733 telephone-event and RFC 3389 comfort
noise (CN, payload type 13: offered by us, answered only when offered; the media worker
sends it while nothing plays, else G.711 silence). The answer
carries one audio stream; every other m-line of the offer is refused with
port 0 so the answer has as many m-lines as the offer (RFC 3264 §6).

`Negotiated.direction` is always from our side: "sendonly" means we send and
the peer does not.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

from pbx.sip.errors import SdpError, excerpt
from pbx.sip.grammar import is_digits

# RFC 3551 table 4: static payload types that need no rtpmap.
STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int]] = {
    0: ("PCMU", 8000),
    3: ("GSM", 8000),
    4: ("G723", 8000),
    8: ("PCMA", 8000),
    9: ("G722", 8000),
    13: ("CN", 8000),
    18: ("G729", 8000),
}
CODEC_PAYLOAD_TYPES: dict[str, int] = {"PCMU": 0, "PCMA": 8}
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
# RFC 3264 §6.1: the answer's direction for each offered one.
ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
DEFAULT_PTIME_MS = 20
CN_PAYLOAD_TYPE = 13  # RFC 3389 §5 (static, RFC 3551 table 4)

_LINE_KINDS = frozenset("abcdefghijklmnopqrstuvwxyz")  # RFC 4566 §5: <type>=<value>
# a=ptime (RFC 4566 §6): milliseconds; some senders write a fraction ("20.0").
_PTIME_RE = re.compile(r"([0-9]{1,6})(?:\.[0-9]{0,6})?")


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[int] = field(default_factory=list)
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    ptime: int | None = None
    direction: str = "sendrecv"
    connection: str | None = None
    format_tokens: list[str] = field(default_factory=list)  # the m= formats as written

    def encoding(self, pt: int) -> tuple[str, int] | None:
        """(encoding name, clock rate) of a payload type, falling back to the static table."""
        if pt in self.rtpmap:
            return self.rtpmap[pt]
        return STATIC_PAYLOAD_TYPES.get(pt)

    def payload_type_of(self, name: str, clock_rate: int = 8000) -> int | None:
        """The first payload type in m= order whose encoding is `name`/`clock_rate`."""
        for pt in self.formats:
            enc = self.encoding(pt)
            if enc is not None and enc[0].upper() == name.upper() and enc[1] == clock_rate:
                return pt
        return None


@dataclass
class SessionDescription:
    origin: str | None = None
    session_name: str | None = None
    connection: str | None = None
    direction: str = "sendrecv"
    media: list[MediaDescription] = field(default_factory=list)


@dataclass(frozen=True)
class Negotiated:
    codec: str
    payload_type: int
    dtmf_payload_type: int | None
    ptime_ms: int
    remote_ip: str
    remote_port: int
    direction: str
    cn_payload_type: int | None = None  # RFC 3389 comfort noise, when both sides have it


def _connection_address(value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad c= line {excerpt(value)}")
    return parts[2].split("/")[0]


def _int(text: str, what: str, low: int = 0, high: int = 2**31) -> int:
    if len(text) > 10 or not is_digits(text):
        raise SdpError(f"bad {what} {excerpt(text)}")
    value = int(text)
    if not low <= value <= high:
        raise SdpError(f"{what} {value} out of range")
    return value


def _media_line(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 3:
        raise SdpError(f"bad m= line {excerpt(value)}")
    port = _int(parts[1].split("/")[0], "media port", 0, 65535)
    tokens = parts[3:]
    formats = [int(t) for t in tokens if len(t) <= 3 and is_digits(t) and int(t) <= 127]
    return MediaDescription(parts[0], port, parts[2], formats, format_tokens=tokens)


def _attribute(md: MediaDescription, value: str) -> bool:
    """Apply one media-level a= line; True when it was a direction attribute."""
    name, _, arg = value.partition(":")
    if name == "rtpmap":
        pt_text, _, enc = arg.partition(" ")
        pt = _int(pt_text.strip(), "rtpmap payload type", 0, 127)
        enc_parts = enc.strip().split("/")
        if len(enc_parts) < 2 or not enc_parts[0]:
            raise SdpError(f"bad rtpmap {excerpt(value)}")
        md.rtpmap[pt] = (enc_parts[0], _int(enc_parts[1], "clock rate", 1))
    elif name == "fmtp":
        pt_text, _, params = arg.partition(" ")
        if len(pt_text) <= 3 and is_digits(pt_text):
            md.fmtp[int(pt_text)] = params.strip()
    elif name == "ptime":
        m = _PTIME_RE.fullmatch(arg.strip())
        if m is None:
            raise SdpError(f"bad ptime {excerpt(value)}")
        md.ptime = max(1, min(int(m.group(1)), 1000))
    elif name in DIRECTIONS:
        md.direction = name
        return True
    return False


def parse_sdp(body: bytes) -> SessionDescription:
    """Parse an SDP body; SdpError (488) on anything that is not SDP."""
    if not isinstance(body, bytes | bytearray):
        raise SdpError("SDP body must be bytes")
    text = bytes(body).decode("utf-8", "replace")
    # (strip() also takes the CR of a CRLF; a lone CR inside a line stays, as before)
    lines = [stripped for ln in text.split("\n") if (stripped := ln.strip())]
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP must start with v=0")
    sd = SessionDescription()
    session_direction: str | None = None
    current: MediaDescription | None = None
    explicit: set[int] = set()  # id() of the media with their own direction attribute
    for line in lines[1:]:
        kind = line[0]
        if line[1:2] != "=" or kind not in _LINE_KINDS:
            raise SdpError(f"bad SDP line {excerpt(line)}")
        value = line[2:]
        if kind == "m":
            current = _media_line(value)
            sd.media.append(current)
        elif kind == "c":
            if current is None:
                sd.connection = _connection_address(value)
            else:
                current.connection = _connection_address(value)
        elif kind == "o" and current is None:
            sd.origin = value
        elif kind == "s" and current is None:
            sd.session_name = value
        elif kind == "a":
            if current is not None:
                if _attribute(current, value):
                    explicit.add(id(current))
            elif value in DIRECTIONS:
                session_direction = value
    if session_direction is not None:
        sd.direction = session_direction
        for md in sd.media:
            # a media-level direction attribute overrides the session-level one (RFC 4566 §6)
            if id(md) not in explicit:
                md.direction = session_direction
    return sd


def _audio_stream(sd: SessionDescription) -> MediaDescription:
    for md in sd.media:
        if md.media == "audio" and md.port != 0 and md.proto.upper() in ("RTP/AVP", "RTP/AVPF"):
            return md
    raise SdpError("no usable audio stream", 488)


def _pick_codec(md: MediaDescription, supported: tuple[str, ...]) -> tuple[str, int]:
    wanted = {s.upper() for s in supported}
    for pt in md.formats:
        enc = md.encoding(pt)
        if enc is not None and enc[1] == 8000 and enc[0].upper() in wanted:
            return enc[0].upper(), pt
    raise SdpError("no common codec", 488)


def _address_line(ip: str) -> str:
    return f"IN {'IP6' if ':' in ip else 'IP4'} {ip}"


def _sdp_head(local_ip: str, session_id: int, version: int) -> list[str]:
    return [
        "v=0",
        f"o=pbx {session_id} {version} {_address_line(local_ip)}",
        "s=pbx",
        f"c={_address_line(local_ip)}",
        "t=0 0",
    ]


def _audio_lines(
    port: int,
    proto: str,
    codec: str,
    pt: int,
    dtmf_pt: int | None,
    ptime_ms: int,
    direction: str,
    cn_pt: int | None = None,
) -> list[str]:
    fmts = " ".join(str(x) for x in (pt, dtmf_pt, cn_pt) if x is not None)
    lines = [f"m=audio {port} {proto} {fmts}", f"a=rtpmap:{pt} {codec}/8000"]
    if dtmf_pt is not None:
        lines.append(f"a=rtpmap:{dtmf_pt} telephone-event/8000")
        lines.append(f"a=fmtp:{dtmf_pt} 0-16")
    if cn_pt is not None:
        lines.append(f"a=rtpmap:{cn_pt} CN/8000")
    lines.append(f"a=ptime:{ptime_ms}")
    lines.append(f"a={direction}")
    return lines


def _remote_ip(sd: SessionDescription, md: MediaDescription) -> str:
    ip = md.connection or sd.connection
    if not ip:
        raise SdpError("no connection address for the audio stream", 488)
    # Media goes straight to this address: only an IP literal is usable (no DNS on the
    # media path, and a bad value must be refused here, not fail every packet later).
    if not (_is_ip_literal(ip) if len(ip) <= 64 else _is_ip_literal.__wrapped__(ip)):
        raise SdpError(f"connection address {excerpt(ip)} is not an IP address", 488)
    if _not_unicast(ip):  # RTP there reaches everybody on it, not the caller
        raise SdpError(f"connection address {excerpt(ip)} is not a unicast address", 488)
    return ip


@functools.lru_cache(maxsize=1024)
def _not_unicast(ip: str) -> bool:
    """Multicast or the broadcast address (0.0.0.0 and :: stay: RFC 2543 hold)."""
    return ipaddress.ip_address(ip).is_multicast or ip == "255.255.255.255"


# A few addresses come again and again; remembered for short texts only (bounded memory).
@functools.lru_cache(maxsize=1024)
def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def answer_offer(
    offer: bytes,
    local_ip: str,
    local_port: int,
    session_id: int,
    supported: tuple[str, ...] = ("PCMU", "PCMA"),
    version: int | None = None,
) -> tuple[Negotiated, bytes]:
    """Answer an SDP offer (RFC 3264 §6): first offered codec we support, plus
    telephone-event with the offerer's payload type when offered. `version` is the
    o= version (RFC 3264 §8: one more than our previous SDP's in a dialog's new answer);
    it defaults to the session id."""
    sd = parse_sdp(offer)
    audio = _audio_stream(sd)
    codec, pt = _pick_codec(audio, supported)
    dtmf_pt = audio.payload_type_of("telephone-event")
    cn_pt = audio.payload_type_of("CN")  # RFC 3389 §5: answered only when offered
    ptime_ms = audio.ptime or DEFAULT_PTIME_MS
    direction = ANSWER_DIRECTION[audio.direction]
    negotiated = Negotiated(
        codec, pt, dtmf_pt, ptime_ms, _remote_ip(sd, audio), audio.port, direction, cn_pt
    )
    lines = _sdp_head(local_ip, session_id, session_id if version is None else version)
    for md in sd.media:
        if md is audio:
            lines += _audio_lines(
                local_port, audio.proto, codec, pt, dtmf_pt, ptime_ms, direction, cn_pt
            )
        else:
            # refuse every other stream, keeping the m-line count (RFC 3264 §6)
            fmts = " ".join(md.format_tokens) or "0"
            lines.append(f"m={md.media} 0 {md.proto} {fmts}")
    return negotiated, ("\r\n".join(lines) + "\r\n").encode()


def make_offer(
    local_ip: str,
    local_port: int,
    session_id: int,
    codecs: tuple[str, ...] = ("PCMU", "PCMA"),
    dtmf_payload_type: int = 101,
    ptime_ms: int = 20,
) -> bytes:
    pts = []
    for codec in codecs:
        if codec.upper() not in CODEC_PAYLOAD_TYPES:
            raise SdpError(f"unsupported codec {codec!r}", 500)
        pts.append(CODEC_PAYLOAD_TYPES[codec.upper()])
    lines = _sdp_head(local_ip, session_id, session_id)
    fmts = pts + [dtmf_payload_type, CN_PAYLOAD_TYPE]
    lines.append(f"m=audio {local_port} RTP/AVP {' '.join(map(str, fmts))}")
    for codec, pt in zip(codecs, pts, strict=True):
        lines.append(f"a=rtpmap:{pt} {codec.upper()}/8000")
    lines.append(f"a=rtpmap:{dtmf_payload_type} telephone-event/8000")
    lines.append(f"a=fmtp:{dtmf_payload_type} 0-16")
    lines.append(f"a=rtpmap:{CN_PAYLOAD_TYPE} CN/8000")
    lines.append(f"a=ptime:{ptime_ms}")
    lines.append("a=sendrecv")
    return ("\r\n".join(lines) + "\r\n").encode()


def parse_answer(
    answer: bytes, supported: tuple[str, ...] = ("PCMU", "PCMA")
) -> Negotiated:
    """Read the answer to our offer: the first codec in it that we support."""
    sd = parse_sdp(answer)
    audio = _audio_stream(sd)
    codec, pt = _pick_codec(audio, supported)
    return Negotiated(
        codec,
        pt,
        audio.payload_type_of("telephone-event"),
        audio.ptime or DEFAULT_PTIME_MS,
        _remote_ip(sd, audio),
        audio.port,
        ANSWER_DIRECTION[audio.direction],  # their sendonly is our recvonly
        audio.payload_type_of("CN"),
    )


def origin_of(body: bytes) -> tuple[int, int] | None:
    """(session id, version) of an SDP's o= line, or None when it has none usable."""
    try:
        origin = parse_sdp(body).origin
    except SdpError:
        return None
    parts = (origin or "").split()
    if len(parts) < 3 or not all(len(p) <= 20 and is_digits(p) for p in parts[1:3]):
        return None
    return int(parts[1]), int(parts[2])


def without_origin(body: bytes) -> bytes:
    """The SDP without its o= line: two of ours compare equal when only it differs."""
    return b"\r\n".join(ln for ln in body.split(b"\r\n") if not ln.startswith(b"o="))
