"""RFC 4733 digit detector: one report per key press whatever the packet pattern."""

from __future__ import annotations

from media.dtmf import Rfc4733Detector, event_digit
from media.rtp import TelephoneEvent


def start(event: int, duration: int = 160) -> TelephoneEvent:
    return TelephoneEvent(event=event, end=False, volume=10, duration=duration)


def end(event: int, duration: int = 800) -> TelephoneEvent:
    return TelephoneEvent(event=event, end=True, volume=10, duration=duration)


def feed_all(det: Rfc4733Detector, packets: list[tuple[int, TelephoneEvent]]) -> list[str]:
    out: list[str] = []
    for ts, ev in packets:
        out += det.feed(ts, ev)
    return out


def press(ts: int, event: int) -> list[tuple[int, TelephoneEvent]]:
    """A typical sender: start packets every 20 ms, then the end packet three times."""
    return [(ts, start(event, d)) for d in (160, 320, 480)] + [(ts, end(event))] * 3


def test_digit_mapping() -> None:
    assert "".join(event_digit(e) or "?" for e in range(17)) == "0123456789*#ABCD?"


def test_one_report_for_a_press_with_triple_end() -> None:
    det = Rfc4733Detector()
    assert feed_all(det, press(1000, 5)) == ["5"]


def test_reported_at_first_end_packet() -> None:
    det = Rfc4733Detector()
    assert det.feed(1000, start(1)) == []
    assert det.feed(1000, end(1)) == ["1"]
    assert det.feed(1000, end(1)) == []
    assert det.feed(1000, start(1)) == []  # a late start packet of the same event


def test_end_only_and_start_only() -> None:
    det = Rfc4733Detector()
    assert det.feed(500, end(11)) == ["#"]  # start packets all lost
    assert det.feed(500, end(11)) == []
    # start packets only (end packets lost): reported when the next event starts
    assert det.feed(2000, start(10)) == []
    assert det.feed(2000, start(10)) == []
    assert det.feed(4000, start(12)) == ["*"]
    assert feed_all(det, [(4000, end(12))] * 3) == ["A"]


def test_second_press_of_same_key_reported_again() -> None:
    det = Rfc4733Detector()
    assert feed_all(det, press(1000, 7) + press(3000, 7) + press(5000, 7)) == ["7", "7", "7"]


def test_reordering() -> None:
    det = Rfc4733Detector()
    # end arrives before the start packets, then repeated ends interleaved with the next press
    packets = [
        (1000, end(2)),
        (1000, start(2)),
        (1000, start(2, 320)),
        (3000, start(3)),
        (1000, end(2)),
        (3000, end(3)),
        (1000, end(2)),
        (3000, end(3)),
    ]
    assert feed_all(det, packets) == ["2", "3"]


def test_late_start_of_an_older_unreported_event() -> None:
    det = Rfc4733Detector()
    assert det.feed(3000, start(4)) == []
    assert det.feed(1000, start(9)) == ["9"]  # older, surely over: reported, once
    assert det.feed(1000, end(9)) == []
    assert det.feed(3000, end(4)) == ["4"]


def test_timestamp_wrap() -> None:
    det = Rfc4733Detector()
    top = 2**32 - 160
    assert det.feed(top, start(1)) == []
    assert det.feed(480, start(2)) == ["1"]  # 480 is newer than 2**32-160 modulo 2**32
    assert det.feed(top, end(1)) == []


def test_non_dtmf_events_are_not_digits() -> None:
    det = Rfc4733Detector()
    assert feed_all(det, press(100, 16)) == []  # flash
    assert feed_all(det, press(900, 0)) == ["0"]
