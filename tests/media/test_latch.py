"""Strict latching (symmetric RTP made safe): the engine answers where the caller's packets
come from, never latches onto a source it cannot send to, and once latched drops every
other source's packets before statistics, DTMF, audio or relay, counting them; the latch
moves only to the signalled address, or to a new SSRC from a new source once the latched
one has been silent. Every rule through the per-packet path and the batch path (numba
kernel and Python twin), on a virtual clock; RTCP follows the same rule on its port."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from media import g711
from media.engine import MediaEngine, Packet
from media.kernels import rtpbatch as K
from media.prompts import PromptCache
from media.rtcp import ReceiveStats, build_report
from media.rtp import build_event, build_header
from pbx.messages import DtmfDigit, MediaEvent, MediaPlay, MediaRemote
from tests.media.test_rtpbatch import Batch

SDP_ADDR = ("198.51.100.7", 50000)  # what the caller's SDP says
PHONE = ("203.0.113.5", 41000)  # where its packets come from (behind a NAT)
STRANGER = ("192.0.2.66", 40000)
PHONE_SSRC, STRANGER_SSRC = 0x1111, 0x6666
RELATCH_S = 2.0
PATHS = ["packet", "kernel", "twin"]

Feed = Callable[[str, bytes, tuple[str, int], float], tuple[list[Packet], list[MediaEvent]]]


def make_engine(path: str, latching: str = "strict") -> MediaEngine:
    engine = MediaEngine(PromptCache("sounds"), latching=latching,  # type: ignore[arg-type]
                         relatch_silence_ms=round(RELATCH_S * 1000),
                         fill_gaps=False)  # fmt: skip  # only the prompt's packets
    engine.kernels = path != "twin"
    engine.add_leg("a", 40000)
    engine.add_leg("b", 40002)
    set_remote(engine, "a", SDP_ADDR)
    engine.set_remote(MediaRemote(call_id="b", remote_ip="127.0.0.1", remote_port=50002,
                                  payload_type=0, codec="PCMU"))  # fmt: skip
    return engine


def set_remote(engine: MediaEngine, call_id: str, addr: tuple[str, int],
               direction: str = "sendrecv") -> None:  # fmt: skip
    engine.set_remote(MediaRemote(call_id=call_id, remote_ip=addr[0], remote_port=addr[1],
                                  payload_type=0, codec="PCMU", dtmf_payload_type=101,
                                  direction=direction))  # type: ignore[arg-type]  # fmt: skip


def feeder(engine: MediaEngine, path: str) -> Feed:
    """One datagram for a leg through the path under test."""

    def feed(call_id: str, data: bytes, src: tuple[str, int], now: float
             ) -> tuple[list[Packet], list[MediaEvent]]:  # fmt: skip
        if path == "packet":
            return engine.receive_rtp(call_id, data, src, now)
        b = Batch([(engine.legs[call_id].row, data, src)])
        packets, events = engine.receive_batch(b.buf, b.lens, b.names, b.rows, b.n, now)
        return engine.relayed() + packets, events  # relayed: sent by the shell right away

    return feed


class Stream:
    """One RTP sender: audio frames and RFC 4733 presses with its own SSRC and sequence."""

    def __init__(self, ssrc: int, seq: int = 100, ts: int = 8000) -> None:
        self.ssrc, self.seq, self.ts = ssrc, seq, ts

    def _next(self, pt: int, payload: bytes, marker: bool = False, ts: int | None = None
              ) -> bytes:  # fmt: skip
        self.seq = (self.seq + 1) & 0xFFFF
        return build_header(pt, self.seq, self.ts if ts is None else ts, self.ssrc,
                            marker) + payload  # fmt: skip

    def audio(self, payload: bytes = bytes([0xFF]) * 160) -> bytes:
        self.ts += 160
        return self._next(0, payload)

    def press(self, digit: int) -> list[bytes]:
        """A 100 ms RFC 4733 event: start (marker), updates, end three times."""
        self.ts += 160
        out = [self._next(101, build_event(digit, False, 10, 160 * k), k == 1)
               for k in range(1, 6)]  # fmt: skip
        out += [self._next(101, build_event(digit, True, 10, 800)) for _ in range(3)]
        return out


def tone_frame(low: int, high: int, k: int) -> bytes:
    t = (np.arange(160) + 160 * k) / 8000.0
    pcm = 6000 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    return bytes(g711.encode(pcm.astype(np.int16), "PCMU"))


def digits(events: list[MediaEvent]) -> list[str]:
    return [e.event.digit for e in events if isinstance(e.event, DtmfDigit)]


# ------------------------------------------------------------ latch and drop


@pytest.mark.parametrize("path", PATHS)
def test_latches_onto_the_first_source(path: str) -> None:
    engine = make_engine(path)
    engine.bridge("a", "b")
    feed = feeder(engine, path)
    feed("a", Stream(1).audio(), ("127.0.0.1", 51000), 100.0)
    assert engine.legs["a"].remote == ("127.0.0.1", 51000)
    # symmetric RTP: what b sends a goes where a's packets come from
    packets, _ = feed("b", Stream(7).audio(), ("127.0.0.1", 50002), 100.02)
    assert [addr for call_id, _, addr in packets if call_id == "a"] == [("127.0.0.1", 51000)]


@pytest.mark.parametrize("path", PATHS)
def test_a_source_port_of_zero_is_not_latched(path: str) -> None:
    """Port 0 cannot be answered (some senders use it: raw-socket replays): before the
    latch such a packet is taken and latches nothing; after it, it is a stranger's."""
    engine = make_engine(path)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    events = []
    for data in Stream(1).press(3):
        events += feed("a", data, ("127.0.0.1", 0), 100.0)[1]
    assert digits(events) == ["3"] and not leg.latched and leg.remote == SDP_ADDR
    feed("a", Stream(2).audio(), PHONE, 100.2)
    assert leg.latched and leg.remote == PHONE
    events = []
    for data in Stream(1).press(4):
        events += feed("a", data, ("127.0.0.1", 0), 100.4)[1]
    assert digits(events) == [] and leg.foreign_dropped == 8 and leg.packets_received == 9


@pytest.mark.parametrize("path", PATHS)
def test_strangers_packets_are_dropped_unseen_and_counted(path: str) -> None:
    """A caller sits in a menu while a stranger sprays digits (RFC 4733 and in-band tones)
    at its port: no digit, no audio, no statistics, no relay from the stranger; the
    caller's own key still comes through."""
    engine = make_engine(path)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    phone, stranger = Stream(PHONE_SSRC), Stream(STRANGER_SSRC, seq=40000, ts=10**6)
    events: list[MediaEvent] = []
    sent = 0
    now = 100.0
    for k in range(100):  # 2 s: the caller's silence, the stranger's presses and tones
        now = 100.0 + 0.02 * k
        events += feed("a", phone.audio(), PHONE, now)[1]
        events += feed("a", stranger.audio(tone_frame(852, 1336, k)), STRANGER, now)[1]
        sent += 1
        if k % 20 == 0:
            for data in stranger.press(8):
                events += feed("a", data, STRANGER, now)[1]
                sent += 1
        events += engine.tick(now + 0.01)[1]
    assert digits(events) == []
    assert leg.remote == PHONE and leg.packets_received == 100
    assert leg.foreign_dropped == sent and leg.relatched == 0
    stats = leg.rx_stats
    assert stats.ssrc == PHONE_SSRC and stats.received == 100 and stats.lost == 0
    # the caller presses 5: reported once
    for data in phone.press(5):
        events += feed("a", data, PHONE, now + 0.1)[1]
    assert digits(events) == ["5"]
    released = engine.remove_leg("a", now + 1)
    assert released.rtp_foreign_dropped == sent and released.rtp_relatched == 0
    assert released.packets_received == 108
    totals = engine.totals()  # the worker's counts outlive the leg
    assert (totals.rtp_foreign_dropped, totals.rtcp_foreign_dropped) == (sent, 0)
    assert totals.rtp_received == 108


@pytest.mark.parametrize("path", PATHS)
def test_strangers_audio_is_not_relayed_to_the_peer(path: str) -> None:
    engine = make_engine(path)
    engine.bridge("a", "b")
    feed = feeder(engine, path)
    phone, stranger = Stream(PHONE_SSRC), Stream(STRANGER_SSRC)
    relayed = feed("a", phone.audio(bytes([0x11]) * 160), PHONE, 100.0)[0]
    assert [(c, d[12:]) for c, d, _ in relayed] == [("b", bytes([0x11]) * 160)]
    for k in range(10):
        assert feed("a", stranger.audio(bytes([0x22]) * 160), STRANGER, 100.02 + k * 0.02)[0] == []
        assert feed("a", stranger.press(1)[0], STRANGER, 100.02 + k * 0.02)[0] == []
    assert engine.legs["a"].foreign_dropped == 20


@pytest.mark.parametrize("path", PATHS)
def test_no_relatch_while_the_latched_source_is_alive(path: str) -> None:
    engine = make_engine(path)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    phone = Stream(PHONE_SSRC)
    for k in range(500):  # 10 s: a new SSRC from a new port every packet, never silence
        now = 100.0 + 0.02 * k
        feed("a", phone.audio(), PHONE, now)
        feed("a", Stream(STRANGER_SSRC + k).audio(), (STRANGER[0], STRANGER[1] + k % 7), now)
    assert leg.remote == PHONE and leg.relatched == 0 and leg.foreign_dropped == 500


# ------------------------------------------------------------ the latch moves


@pytest.mark.parametrize("path", PATHS)
def test_relatch_after_silence_with_a_new_ssrc(path: str) -> None:
    """The stream moved without signalling (a media failover): the new source takes the
    latch once the latched one has been silent RELATCH_S, with another SSRC."""
    engine = make_engine(path)
    engine.play(MediaPlay(call_id="a", play_id=1, file="menu.wav", loop=True), 99.0)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    feed("a", Stream(PHONE_SSRC).audio(), PHONE, 100.0)  # then silence
    moved = Stream(0x2222)
    moved_addr = ("203.0.113.9", 52000)
    events = []
    for data in moved.press(1):  # too soon: dropped
        events += feed("a", data, moved_addr, 100.0 + RELATCH_S - 0.1)[1]
    assert digits(events) == [] and leg.remote == PHONE and leg.foreign_dropped == 8
    for data in moved.press(2):
        events += feed("a", data, moved_addr, 100.0 + RELATCH_S + 0.01)[1]
    assert digits(events) == ["2"] and leg.remote == moved_addr and leg.relatched == 1
    # the prompt follows the latch (symmetric RTP), RTCP too (RTP port + 1)
    assert {addr for _, _, addr in engine.tick(100.0 + RELATCH_S + 0.02)[0]} == {moved_addr}
    assert leg.rtcp_remote == (moved_addr[0], moved_addr[1] + 1)
    # and the old source is a stranger now
    feed("a", Stream(PHONE_SSRC).audio(), PHONE, 100.0 + RELATCH_S + 0.04)
    assert leg.remote == moved_addr and leg.foreign_dropped == 9
    assert engine.remove_leg("a", 110.0).rtp_relatched == 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("latching", ["strict", "loose"])
def test_same_ssrc_after_silence_relatches_only_when_loose(path: str, latching: str) -> None:
    """A NAT binding that changed under a running stream: same SSRC, new port."""
    engine = make_engine(path, latching)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    phone = Stream(PHONE_SSRC)
    feed("a", phone.audio(), PHONE, 100.0)
    rebound = (PHONE[0], PHONE[1] + 1)
    feed("a", phone.audio(), rebound, 100.0 + RELATCH_S + 0.5)
    if latching == "loose":
        assert leg.remote == rebound and leg.relatched == 1 and leg.packets_received == 2
    else:
        assert leg.remote == PHONE and leg.foreign_dropped == 1 and leg.packets_received == 1


@pytest.mark.parametrize("path", PATHS)
def test_the_signalled_address_takes_the_latch_back(path: str) -> None:
    """A stranger's packet got in before the phone's first (which comes from where its SDP
    says): the phone takes the latch at once, and the stranger is out."""
    engine = make_engine(path)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    stranger = Stream(STRANGER_SSRC)
    feed("a", stranger.audio(), STRANGER, 100.0)
    assert leg.remote == STRANGER
    events = []
    phone = Stream(PHONE_SSRC)
    for data in phone.press(6):
        events += feed("a", data, SDP_ADDR, 100.02)[1]
    assert digits(events) == ["6"] and leg.remote == SDP_ADDR and leg.relatched == 1
    for k in range(200):  # however long the stranger keeps at it, while the phone talks
        now = 100.04 + k * 0.02
        feed("a", phone.audio(), SDP_ADDR, now)
        feed("a", stranger.audio(), STRANGER, now)
    assert leg.remote == SDP_ADDR and leg.foreign_dropped == 200


@pytest.mark.parametrize("path", PATHS)
def test_a_new_sdp_address_resets_the_latch_a_repeated_one_does_not(path: str) -> None:
    engine = make_engine(path)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    feed("a", Stream(PHONE_SSRC).audio(), PHONE, 100.0)
    # a re-INVITE with the same address after a long silence: the latch stays, and the
    # silence counts again from the next foreign packet
    set_remote(engine, "a", SDP_ADDR)
    assert leg.latched and leg.remote == PHONE
    assert math.isnan(engine.tab.f[leg.row, K.F_LATCH_SEEN])
    feed("a", Stream(STRANGER_SSRC).audio(), STRANGER, 130.0)
    assert leg.remote == PHONE and leg.foreign_dropped == 1
    feed("a", Stream(STRANGER_SSRC + 1).audio(), STRANGER, 130.0 + RELATCH_S + 0.01)
    assert leg.remote == STRANGER and leg.relatched == 1
    # a new address (the far end moved its media): the next packet, wherever from, latches
    new_sdp = ("198.51.100.8", 50010)
    set_remote(engine, "a", new_sdp)
    assert not leg.latched and leg.remote == new_sdp
    feed("a", Stream(0x3333).audio(), ("203.0.113.77", 40010), 131.0)
    assert leg.latched and leg.remote == ("203.0.113.77", 40010) and leg.relatched == 1


@pytest.mark.parametrize("path", PATHS)
def test_no_relatch_while_the_far_end_is_not_sending(path: str) -> None:
    """We are sendonly or inactive (the far end put the call on hold with recvonly or
    inactive): its silence is expected, so a stranger cannot take the latch then."""
    engine = make_engine(path)
    feed = feeder(engine, path)
    leg = engine.legs["a"]
    feed("a", Stream(PHONE_SSRC).audio(), PHONE, 100.0)
    set_remote(engine, "a", SDP_ADDR, direction="inactive")
    for k in range(10):
        feed("a", Stream(STRANGER_SSRC + k).audio(), STRANGER, 110.0 + 10 * k)
    assert leg.remote == PHONE and leg.foreign_dropped == 10
    set_remote(engine, "a", SDP_ADDR, direction="sendonly")
    feed("a", Stream(STRANGER_SSRC).audio(), STRANGER, 300.0)
    assert leg.remote == PHONE and leg.foreign_dropped == 11
    # resumed: the silence counts from the resume
    set_remote(engine, "a", SDP_ADDR)
    feed("a", Stream(STRANGER_SSRC).audio(), STRANGER, 400.0)
    feed("a", Stream(STRANGER_SSRC).audio(), STRANGER, 400.0 + RELATCH_S - 0.1)
    assert leg.remote == PHONE and leg.foreign_dropped == 13


# ------------------------------------------------------------ RTCP


def rtcp(ssrc: int, about: int | None = None, lost: int = 0) -> bytes:
    """An RR from `ssrc`; with `about`, a report block on that SSRC saying `lost`."""
    stats = None
    if about is not None:
        stats = ReceiveStats()
        stats.update(1, about, 0.0)
        stats.update(2 + lost, about, 0.0)
    return build_report(ssrc, "x", 0.0, 0.0, stats, None)


def test_rtcp_follows_the_same_rule() -> None:
    engine = make_engine("packet")
    leg = engine.legs["a"]
    phone_rtcp = (PHONE[0], PHONE[1] + 1)
    # Before any RTP, a NATed phone's RTCP (not from its SDP address) latches nothing...
    engine.receive_rtcp("a", rtcp(PHONE_SSRC, leg.ssrc, lost=0), phone_rtcp, 99.0)
    assert not leg.rtcp_latched and leg.rtcp_foreign == 1
    # ...and once its RTP has latched, its RTCP (the same IP) does.
    engine.receive_rtp("a", Stream(PHONE_SSRC).audio(), PHONE, 99.5)
    assert leg.remote == PHONE
    engine.receive_rtcp("a", rtcp(PHONE_SSRC, leg.ssrc, lost=0), phone_rtcp, 100.0)
    assert leg.rtcp_latched and leg.rtcp_remote == phone_rtcp and leg.rtcp_received == 1
    # a stranger's report (it would say we lose everything): dropped, counted
    engine.receive_rtcp("a", rtcp(STRANGER_SSRC, leg.ssrc, lost=500), STRANGER, 101.0)
    assert leg.rtcp_received == 1 and leg.rtcp_foreign == 2
    assert leg.remote_report is not None and leg.remote_report.cumulative_lost == 0
    # nor after any silence: only the RTP peer's IP may latch RTCP
    engine.receive_rtcp("a", rtcp(STRANGER_SSRC), STRANGER, 130.0)
    assert leg.rtcp_remote == phone_rtcp and leg.rtcp_foreign == 3
    # another port of the phone's IP, with a new SSRC, after RTCP_SILENCE_S (25 s): yes
    phone_other = (PHONE[0], PHONE[1] + 7)
    engine.receive_rtcp("a", rtcp(PHONE_SSRC), phone_other, 131.0)  # the latched SSRC: no
    assert leg.rtcp_remote == phone_rtcp and leg.rtcp_foreign == 4
    engine.receive_rtcp("a", rtcp(STRANGER_SSRC), phone_other, 131.0)
    assert leg.rtcp_remote == phone_other and leg.rtcp_received == 2
    # the signalled RTCP address (SDP port + 1) takes it back at once
    sdp_rtcp = (SDP_ADDR[0], SDP_ADDR[1] + 1)
    engine.receive_rtcp("a", rtcp(PHONE_SSRC), sdp_rtcp, 131.5)
    engine.receive_rtcp("a", rtcp(STRANGER_SSRC), STRANGER, 132.0)
    assert leg.rtcp_remote == sdp_rtcp and leg.rtcp_foreign == 5
    released = engine.remove_leg("a", 140.0)
    assert released.rtcp_foreign_dropped == 5 and released.rtcp_received == 3
    totals = engine.totals()
    assert (totals.rtp_foreign_dropped, totals.rtcp_foreign_dropped) == (0, 5)


def test_engine_takes_the_config() -> None:
    from pbx.config import ConfigError, parse_config

    for bad, key in (('latching = "off"', "rtp.latching"),
                     ("relatch_silence_ms = 0", "rtp.relatch_silence_ms")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            parse_config(f"[rtp]\n{bad}\n", "pbx.toml")

    settings = parse_config('[rtp]\nlatching = "loose"\nrelatch_silence_ms = 800\n')
    engine = MediaEngine(PromptCache("sounds"), latching=settings.rtp.latching,
                         relatch_silence_ms=settings.rtp.relatch_silence_ms)  # fmt: skip
    assert engine.relatch_any_ssrc and engine.relatch_s == 0.8
    default = parse_config("").rtp
    assert (default.latching, default.relatch_silence_ms) == ("strict", 5000)
    engine = MediaEngine(PromptCache("sounds"))
    assert not engine.relatch_any_ssrc and engine.relatch_s == default.relatch_silence_ms / 1000
