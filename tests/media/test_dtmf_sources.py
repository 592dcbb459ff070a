"""One key press, one report: RFC 4733, SIP INFO and in-band mixes, on a virtual clock.

`media.dtmfpress` alone, then through the engine (RTP packets and INFO in, ticks
at k * 20 ms, events out).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from media import g711
from media.dtmfpress import PressDedupe
from media.engine import MediaEngine
from media.prompts import PromptCache
from media.rtp import RtpPacket, build_event, build_rtp
from pbx.messages import DtmfDigit, MediaDtmfInfo, MediaEvent, MediaRemote
from tests.media.test_rtpbatch import Batch

PHONE = ("127.0.0.1", 40000)


# ------------------------------------------------------------ the window alone


def test_same_press_from_three_sources_is_one() -> None:
    d = PressDedupe()
    assert d.report("5", "inband", 1.00, 1.035)  # in-band first (~95 ms after the tone began)
    assert not d.report("5", "rfc4733", 1.00, 1.10)  # RFC 4733 end: overlaps
    assert not d.report("5", "info", 1.12, 1.22)  # INFO a little later, within 150 ms


def test_rfc4733_first_then_inband_then_info() -> None:
    d = PressDedupe()
    assert d.report("1", "rfc4733", 0.0, 0.04)  # short press, end packet first
    assert not d.report("1", "inband", 0.005, 0.1)
    assert not d.report("1", "info", -0.05, 0.05)


def test_long_press_rfc4733_end_long_after_inband() -> None:
    d = PressDedupe()
    assert d.report("#", "inband", 2.0, 2.04)
    assert not d.report("#", "rfc4733", 2.0, 4.0)  # held 2 s: overlapping, one press


def test_same_source_is_never_merged() -> None:
    d = PressDedupe()
    assert d.report("2", "rfc4733", 0.0, 0.1)
    assert d.report("2", "rfc4733", 0.15, 0.25)  # new RFC 4733 timestamp: a new press
    assert d.report("2", "info", 5.0, 5.1)
    assert d.report("2", "info", 5.05, 5.15)  # two INFOs: two presses


def test_quick_repeats_with_two_sources_stay_two_presses() -> None:
    d = PressDedupe()
    # press 1: [0, 0.1], press 2: [0.2, 0.3], each seen in-band and as RFC 4733
    assert d.report("7", "inband", 0.0, 0.035)
    assert not d.report("7", "rfc4733", 0.0, 0.1)
    assert d.report("7", "inband", 0.2, 0.235)  # in-band already had press 1: new
    assert not d.report("7", "rfc4733", 0.2, 0.3)


def test_different_digits_and_far_apart_presses_are_separate() -> None:
    d = PressDedupe()
    assert d.report("1", "inband", 0.0, 0.05)
    assert d.report("2", "rfc4733", 0.0, 0.1)  # another digit
    assert d.report("1", "rfc4733", 0.5, 0.6)  # same digit, other source, 450 ms later
    assert d.report("3", "info", 1.0, 1.1)
    assert d.report("3", "rfc4733", 1.3, 1.35)  # INFO window is 150 ms


def test_missed_source_does_not_swallow_the_next_press() -> None:
    d = PressDedupe()
    assert d.report("4", "rfc4733", 0.0, 0.08)  # in-band missed this one (quiet tone)
    # next press 200 ms later: in-band sees it, its interval is 120 ms after press 1's end
    assert d.report("4", "inband", 0.2, 0.235)


def test_memory_is_bounded() -> None:
    d = PressDedupe()
    for i in range(100):
        assert d.report("9", "info", float(i), i + 0.1)
    assert len(d._presses) <= 8


# ------------------------------------------------------------ through the engine

TICK = 0.020


def tone_frames(digit: tuple[int, int], frames: int, level: float = 9000.0) -> list[bytes]:
    t = np.arange(160 * frames) / 8000.0
    x = level * (np.sin(2 * np.pi * digit[0] * t) + np.sin(2 * np.pi * digit[1] * t))
    codes = g711.encode(x.astype(np.int16), "PCMU")
    return [codes[160 * k : 160 * (k + 1)].tobytes() for k in range(frames)]


class Phone:
    """Sends a 20 ms audio stream and RFC 4733 events to one leg; ticks the engine."""

    def __init__(self, engine: MediaEngine, call_id: str = "a") -> None:
        self.engine = engine
        self.call_id = call_id
        self.k = 0
        self.seq = 1000
        self.ts = 50_000
        self.events: list[tuple[float, DtmfDigit]] = []
        self.held: list[bytes] | None = None  # while the worker stalls: sent, not yet read

    @property
    def now(self) -> float:
        return self.k * TICK

    def _send(self, pt: int, ts: int, payload: bytes, marker: bool = False) -> None:
        data = build_rtp(RtpPacket(pt, self.seq, ts, 0x1234, payload, marker=marker))
        self.seq = (self.seq + 1) & 0xFFFF
        if self.held is not None:
            self.held.append(data)
            return
        _, events = self.engine.receive_rtp(self.call_id, data, PHONE, self.now + 0.003)
        self._collect(events)

    def stall(self, periods: int, audio: list[bytes], event: tuple[int, int, int]) -> None:
        """The worker stalls for `periods` (no read, no tick) while the phone sends
        `audio[i]` and, for the first `event[2]` periods, the RFC 4733 event (code, start
        ts) ending in the last of them; then it reads them all in one batch and ticks."""
        self.held = []
        code, start_ts, event_periods = event
        for i in range(periods):
            self._send(0, self.ts, audio[i])
            if i < event_periods:
                end = i == event_periods - 1
                for _ in range(3 if end else 1):
                    self._send(101, start_ts, build_event(code, end, 10, self.ts + 160 - start_ts))
            self.ts += 160
            self.k += 1
        row = self.engine.legs[self.call_id].row
        batch = Batch([(row, data, PHONE) for data in self.held])
        self.held = None
        _, events = self.engine.receive_batch(batch.buf, batch.lens, batch.names, batch.rows,
                                              batch.n, self.now + 0.003)  # fmt: skip
        self._collect(events)
        self._collect(self.engine.tick(self.now)[1])

    def _collect(self, events: list[MediaEvent]) -> None:
        for ev in events:
            if isinstance(ev.event, DtmfDigit):
                self.events.append((self.now, ev.event))

    def step(
        self, audio: bytes | None = None, event: tuple[int, int, bool] | None = None
    ) -> None:
        """One 20 ms period: an audio frame (None: lost), an RFC 4733 packet
        (digit code, start ts, end — the end packet goes three times), then the tick."""
        if audio is not None:
            self._send(0, self.ts, audio)
        if event is not None:
            code, start_ts, end = event
            duration = self.ts + 160 - start_ts
            for _ in range(3 if end else 1):
                self._send(
                    101, start_ts, build_event(code, end, 10, duration), marker=start_ts == self.ts
                )
        self.ts += 160
        self.k += 1
        _, events = self.engine.tick(self.now)
        self._collect(events)

    def info(self, digit: str) -> None:
        self._collect(
            self.engine.dtmf_info(MediaDtmfInfo(call_id=self.call_id, digit=digit), self.now)
        )

    def press(
        self, digit_code: int, freqs: tuple[int, int], frames: int, rfc4733: bool, inband: bool
    ) -> None:
        tone = tone_frames(freqs, frames)
        silence = bytes([0xFF]) * 160
        start = self.ts
        for i in range(frames):
            self.step(
                tone[i] if inband else silence,
                (digit_code, start, i == frames - 1) if rfc4733 else None,
            )

    def quiet(self, frames: int) -> None:
        for _ in range(frames):
            self.step(bytes([0xFF]) * 160)


@pytest.fixture
def phone(tmp_path: Path) -> Phone:
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    engine.add_leg("a", 30000, inband_dtmf=True)
    engine.set_remote(
        MediaRemote(
            call_id="a",
            remote_ip=PHONE[0],
            remote_port=PHONE[1],
            payload_type=0,
            codec="PCMU",
            dtmf_payload_type=101,
        )
    )
    return phone_for(engine)


def phone_for(engine: MediaEngine) -> Phone:
    p = Phone(engine)
    p.quiet(5)
    return p


FIVE = (5, (770, 1336))


@pytest.mark.parametrize(
    ("rfc4733", "inband", "frames", "source"),
    [
        (True, False, 5, "rfc4733"),
        (False, True, 5, "inband"),
        (True, True, 5, "rfc4733"),  # the 100 ms end packet beats the playout delay
        (True, True, 2, "rfc4733"),  # 40 ms: the end packet comes first
        (True, True, 50, "inband"),  # held 1 s: in-band long before the end packet
    ],
)
def test_engine_one_report_per_press(
    phone: Phone, rfc4733: bool, inband: bool, frames: int, source: str
) -> None:
    phone.press(*FIVE, frames, rfc4733, inband)
    phone.quiet(20)
    assert [(e.digit, e.source) for _, e in phone.events] == [("5", source)]


@pytest.mark.parametrize("kernels", [True, False])
def test_engine_end_packet_read_late_after_inband_is_one_press(
    phone: Phone, kernels: bool
) -> None:
    """In-band hears a 200 ms press first; then the worker stalls for 200 ms and reads the
    rest of the tone, the RFC 4733 end packets and what came after in one batch. The
    event's interval comes from its RTP timestamp, as in-band's does, not from when the
    end packet was read (that made it a second press: bench_media under load)."""
    phone.engine.kernels = kernels
    tone = tone_frames(FIVE[1], 10)
    start = phone.ts
    for i in range(8):
        phone.step(tone[i], (FIVE[0], start, False))
    assert [(e.digit, e.source) for _, e in phone.events] == [("5", "inband")]
    phone.stall(10, tone[8:] + [bytes([0xFF]) * 160] * 8, (FIVE[0], start, 2))
    phone.quiet(20)
    assert [(e.digit, e.source) for _, e in phone.events] == [("5", "inband")]


def test_engine_info_with_rfc4733_and_inband(phone: Phone) -> None:
    phone.press(*FIVE, 5, True, True)
    phone.info("5")  # the INFO of the same press, just after its end
    phone.quiet(20)
    assert [e.digit for _, e in phone.events] == ["5"]
    phone.info("5")  # 400 ms later: a new press
    assert [e.digit for _, e in phone.events] == ["5", "5"]


def test_engine_info_first_then_rfc4733(phone: Phone) -> None:
    phone.info("5")
    phone.press(*FIVE, 5, True, False)
    phone.quiet(10)
    assert [(e.digit, e.source) for _, e in phone.events] == [("5", "info")]


def test_engine_two_quick_presses_both_sources(phone: Phone) -> None:
    phone.press(*FIVE, 5, True, True)
    phone.quiet(4)  # 80 ms gap
    phone.press(*FIVE, 5, True, True)
    phone.quiet(20)
    assert [e.digit for _, e in phone.events] == ["5", "5"]


def test_engine_digit_sequence_mixed_sources(phone: Phone) -> None:
    keys = [(1, (697, 1209)), (2, (697, 1336)), (3, (697, 1477))]
    for code, freqs in keys:
        phone.press(code, freqs, 6, True, True)
        phone.quiet(6)
    phone.quiet(10)
    assert "".join(e.digit for _, e in phone.events) == "123"


def test_engine_inband_with_lost_and_reordered_packets(phone: Phone) -> None:
    """A 3-packet reorder window and a lost packet between tone frames: still one digit."""
    tone = tone_frames((852, 1477), 8)  # '9'
    start = phone.ts
    sent = []
    for i in range(8):
        sent.append((phone.seq + i, start + 160 * i, tone[i]))
    order = [0, 2, 1, 3, 5, 4, 7]  # 6 lost, pairs swapped
    for j in order:
        seq, ts, payload = sent[j]
        data = build_rtp(RtpPacket(0, seq, ts, 0x1234, payload))
        phone.engine.receive_rtp("a", data, PHONE, phone.now + 0.003)
        phone.k += 1
        phone.ts += 160
        phone._collect(phone.engine.tick(phone.now)[1])
    phone.seq += 8
    phone.quiet(15)
    assert [(e.digit, e.source) for _, e in phone.events] == [("9", "inband")]


def lossy_press(phone: Phone, frames: int, lost: set[int], rfc4733: bool) -> None:
    """A '9' held for `frames` packets, the packets in `lost` never arriving; the
    RFC 4733 events of the press too when `rfc4733`."""
    tone = tone_frames((852, 1477), frames)
    start = phone.ts
    for i in range(frames):
        if i not in lost:
            data = build_rtp(RtpPacket(0, phone.seq, phone.ts, 0x1234, tone[i]))
            phone._collect(phone.engine.receive_rtp("a", data, PHONE, phone.now + 0.003)[1])
        phone.seq = (phone.seq + 1) & 0xFFFF  # a lost packet took its sequence number
        if rfc4733:
            end = i == frames - 1
            for _ in range(3 if end else 1):
                event = build_event(9, end, 10, phone.ts + 160 - start)
                phone._send(101, start, event, marker=i == 0)
        phone.ts += 160
        phone.k += 1
        phone._collect(phone.engine.tick(phone.now)[1])


@pytest.mark.parametrize("lost", [{2}, {3}, {4}, {5}, {3, 4}, {2, 3, 4}])
@pytest.mark.parametrize("rfc4733", [False, True])
def test_engine_lost_packets_inside_a_tone_are_one_press(
    phone: Phone, lost: set[int], rfc4733: bool
) -> None:
    """A lost packet is not a pause: the tone around it is one digit, heard once (before
    the hold over gaps, each of these gave two in-band reports; with RFC 4733 alongside,
    a duplicate the press dedupe cannot merge)."""
    lossy_press(phone, 8, lost, rfc4733)
    phone.quiet(15)
    # held 160 ms: in-band reports before RFC 4733's end packet comes
    assert [(e.digit, e.source) for _, e in phone.events] == [("9", "inband")]


def silent(phone: Phone, ticks: int, paused: bool = False) -> None:
    """`ticks` periods in which no packet comes: lost (their sequence numbers skipped),
    or, `paused`, not sent (the timestamp moves on, the sequence number does not)."""
    for _ in range(ticks):
        phone.ts += 160
        if not paused:
            phone.seq = (phone.seq + 1) & 0xFFFF
        phone.k += 1
        phone._collect(phone.engine.tick(phone.now)[1])


@pytest.mark.parametrize("lost_ticks", [1, 2])
def test_engine_short_key_right_after_lost_audio_is_heard(phone: Phone, lost_ticks: int) -> None:
    """'5', 20-40 ms of lost packets, then a 40 ms '9': the hold over the gap must not let
    the '5' swallow the '9' (another digit after held hops ends the current one)."""
    phone.press(*FIVE, 5, False, True)
    silent(phone, lost_ticks)
    phone.press(9, (852, 1477), 2, False, True)
    phone.quiet(15)
    assert [e.digit for _, e in phone.events] == ["5", "9"]


@pytest.mark.parametrize("paused_ticks", [1, 2, 3])
def test_engine_same_key_after_an_unsent_pause_is_two_presses(
    phone: Phone, paused_ticks: int
) -> None:
    """The phone sends nothing for 20-60 ms between two presses of one key (silence
    suppression): its sequence numbers go on without a skip, so the pause is heard
    silence, not loss to hold over, and the two presses stay two."""
    phone.press(*FIVE, 5, False, True)
    silent(phone, paused_ticks, paused=True)
    phone.press(*FIVE, 5, False, True)
    phone.quiet(15)
    assert [e.digit for _, e in phone.events] == ["5", "5"]


def test_engine_same_key_after_a_silent_gap_is_two_presses(phone: Phone) -> None:
    """The hold over gaps is bounded: a stream that stops between two presses of one key
    (silence suppression) still ends the first, so the second is reported."""
    phone.press(*FIVE, 5, False, True)
    silent(phone, 6)  # 120 ms with no packet at all
    phone.press(*FIVE, 5, False, True)
    phone.quiet(15)
    assert [(e.digit, e.source) for _, e in phone.events] == [("5", "inband"), ("5", "inband")]


@pytest.mark.parametrize("inband", [False, True])
def test_engine_rfc4733_press_with_every_end_packet_lost(phone: Phone, inband: bool) -> None:
    """The last key of an entry, its three end packets lost and nothing after it: the
    tick reports it once its refreshes stop (media.dtmf.EVENT_TIMEOUT_S), and once only
    when the tone was in the audio too."""
    tone = tone_frames((770, 1336), 5)
    start = phone.ts
    for i in range(5):
        phone.step(tone[i] if inband else bytes([0xFF]) * 160, None)
        event = build_event(5, False, 10, phone.ts - start)
        phone._send(101, start, event, marker=i == 0)  # refreshes only, no end
    ended_at = phone.now
    phone.quiet(30)
    assert [(e.digit, e.source) for _, e in phone.events] == [
        ("5", "inband" if inband else "rfc4733")
    ]
    reported_at = phone.events[0][0]
    if not inband:  # by the clock: 250 ms after the last refresh, to the next tick
        assert 0.25 <= reported_at - ended_at <= 0.25 + TICK + 1e-9
    assert not phone.engine._events_open


def test_engine_open_event_forgotten_with_its_leg(phone: Phone) -> None:
    phone._send(101, phone.ts, build_event(1, False, 10, 160), marker=True)
    assert "a" in phone.engine._events_open
    phone.engine.remove_leg("a")
    assert not phone.engine._events_open
    phone.engine.tick(phone.now + 1.0)  # nothing left to expire, nothing raised


def test_engine_inband_at_ptime_30(tmp_path: Path) -> None:
    """30 ms packets (sipp's g711a.pcap), PCMA: the ring re-times them onto the 20 ms tick."""
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    engine.add_leg("a", 30000, inband_dtmf=True)
    engine.set_remote(
        MediaRemote(
            call_id="a", remote_ip=PHONE[0], remote_port=PHONE[1], payload_type=8,
            codec="PCMA", dtmf_payload_type=None, ptime_ms=30,
        )  # fmt: skip
    )
    t = np.arange(240 * 20) / 8000.0
    x = 9000 * (np.sin(2 * np.pi * 941 * t) + np.sin(2 * np.pi * 1633 * t))  # 'D'
    x[: 240 * 5] = 0
    x[240 * 10 :] = 0
    codes = g711.encode(x.astype(np.int16), "PCMA")
    events = []
    now, seq, ts, sent = 0.0, 1, 0, 0
    for k in range(60):  # 1.2 s of 20 ms ticks; a packet every 30 ms
        now = k * TICK
        while sent < 20 and sent * 0.030 <= now:
            payload = codes[240 * sent : 240 * (sent + 1)].tobytes()
            data = build_rtp(RtpPacket(8, seq + sent, ts + 240 * sent, 9, payload))
            events += engine.receive_rtp("a", data, PHONE, now)[1]
            sent += 1
        events += engine.tick(now)[1]
    digits = [e.event for e in events if isinstance(e.event, DtmfDigit)]
    assert [(d.digit, d.source) for d in digits] == [("D", "inband")]


def test_engine_inband_off_detects_nothing(tmp_path: Path) -> None:
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    engine.add_leg("a", 30000, inband_dtmf=False)
    p = phone_for(engine)
    p.press(*FIVE, 6, False, True)
    p.quiet(10)
    assert p.events == []
    assert engine.rx.capacity >= 0 and len(engine.inband) == 0


def test_engine_releases_slots(phone: Phone) -> None:
    engine = phone.engine
    assert len(engine.inband) == 1
    released = engine.remove_leg("a")
    assert len(engine.inband) == 0 and released.packets_received > 0
    engine.add_leg("b", 30002, inband_dtmf=True)  # the slots are reused
    assert len(engine.inband) == 1


def test_event_interval_from_the_timestamp_or_else_the_arrival(phone: Phone) -> None:
    """`_event_interval`: mapped through the newest audio packet when that agrees with the
    end packet's arrival, else (another timestamp base) the arrival itself."""
    engine, leg = phone.engine, phone.engine.legs["a"]
    newest_end, read_at = phone.ts, phone.now + 0.003 - TICK  # the last frame ended here
    # An event that ended with that frame, its end packet read 150 ms late:
    start, end = engine._event_interval(leg, newest_end - 800, 800, read_at + 0.15)
    assert (round(start, 6), round(end, 6)) == (round(read_at - 0.1, 6), round(read_at, 6))
    # Events on a timestamp base of their own: dated by the end packet's arrival.
    start, end = engine._event_interval(leg, newest_end + 10_000_000, 800, read_at + 0.15)
    assert (round(start, 6), round(end, 6)) == (round(read_at + 0.05, 6), round(read_at + 0.15, 6))


def test_a_flood_of_forged_presses_is_cut_at_the_rate_of_a_keypad() -> None:
    """1,000 RFC 4733 'presses' a second (each end packet with a new timestamp) would be
    1,000 messages to the front and provider requests: at most MAX_PRESSES_PER_S a second
    are reported, the rest counted; real presses go on after the flood."""
    from media.dtmfpress import MAX_PRESSES_PER_S

    d = PressDedupe()
    reported = sum(d.report(str(k % 10), "rfc4733", k / 1000, k / 1000 + 0.001)
                   for k in range(1000))
    assert reported == MAX_PRESSES_PER_S and d.flood_dropped == 1000 - MAX_PRESSES_PER_S
    assert d.report("5", "rfc4733", 1.5, 1.6)  # a press after that second: reported


def test_an_engine_leg_reports_a_digit_flood_at_a_keypads_rate(phone: Phone) -> None:
    from media.dtmfpress import MAX_PRESSES_PER_S

    for k in range(200):  # 200 ended events within one 20 ms period, each its own press
        phone._send(101, phone.ts + k, build_event(k % 10, True, 10, 160))
    assert len(phone.events) == MAX_PRESSES_PER_S
    assert phone.engine.totals().presses_dropped == 200 - MAX_PRESSES_PER_S  # heartbeats
