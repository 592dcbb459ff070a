"""RFC 4733 digit detector: one report per key press whatever the packet pattern."""

from __future__ import annotations

from media.dtmf import EVENT_TIMEOUT_S, Rfc4733Detector, event_digit
from media.rtp import TelephoneEvent


def start(event: int, duration: int = 160) -> TelephoneEvent:
    return TelephoneEvent(event=event, end=False, volume=10, duration=duration)


def end(event: int, duration: int = 800) -> TelephoneEvent:
    return TelephoneEvent(event=event, end=True, volume=10, duration=duration)


def feed_all(det: Rfc4733Detector, packets: list[tuple[int, TelephoneEvent]]) -> list[str]:
    out: list[str] = []
    for ts, ev in packets:
        out += det.feed(ts, ev, 0.0)
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
    assert det.feed(1000, start(1), 0.0) == []
    assert det.feed(1000, end(1), 0.0) == ["1"]
    assert det.feed(1000, end(1), 0.0) == []
    assert det.feed(1000, start(1), 0.0) == []  # a late start packet of the same event


def test_end_only_and_start_only() -> None:
    det = Rfc4733Detector()
    assert det.feed(500, end(11), 0.0) == ["#"]  # start packets all lost
    assert det.feed(500, end(11), 0.0) == []
    # start packets only (end packets lost): reported when the next event starts
    assert det.feed(2000, start(10), 0.0) == []
    assert det.feed(2000, start(10), 0.0) == []
    assert det.feed(4000, start(12), 0.0) == ["*"]
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
    assert det.feed(3000, start(4), 0.0) == []
    assert det.feed(1000, start(9), 0.0) == ["9"]  # older, surely over: reported, once
    assert det.feed(1000, end(9), 0.0) == []
    assert det.feed(3000, end(4), 0.0) == ["4"]


def test_timestamp_wrap() -> None:
    det = Rfc4733Detector()
    top = 2**32 - 160
    assert det.feed(top, start(1), 0.0) == []
    assert det.feed(480, start(2), 0.0) == ["1"]  # 480 is newer than 2**32-160 modulo 2**32
    assert det.feed(top, end(1), 0.0) == []


def test_non_dtmf_events_are_not_digits() -> None:
    det = Rfc4733Detector()
    assert feed_all(det, press(100, 16)) == []  # flash
    assert feed_all(det, press(900, 0)) == ["0"]


def test_an_event_whose_end_packets_are_lost_is_reported_by_the_clock() -> None:
    """No end packet and nothing after it (the last key of an entry): reported once
    EVENT_TIMEOUT_S passes without a packet of it, with the newest packet's time and
    duration; the end packets turning up later change nothing."""
    det = Rfc4733Detector()
    for k, d in enumerate((160, 320, 480, 640)):
        assert det.feed(8000, start(11, d), 1.0 + 0.02 * k) == []
    assert det.pending
    assert det.expire(1.06 + EVENT_TIMEOUT_S - 0.01) is None  # refreshed at 1.06: not yet
    expired = det.expire(1.06 + EVENT_TIMEOUT_S)
    assert expired is not None and (expired.digit, expired.duration) == ("#", 640)
    assert expired.seen == 1.06 and not det.pending
    assert det.expire(5.0) is None
    assert feed_all(det, [(8000, start(11, 800)), (8000, end(11))]) == []  # late: the same press
    assert feed_all(det, press(16000, 11)) == ["#"]  # the next press of the key


def test_refreshes_keep_a_held_key_open() -> None:
    det = Rfc4733Detector()
    now = 0.0
    for k in range(100):  # held 2 s, a refresh every 20 ms
        now = 0.02 * k
        assert det.feed(500, start(5, 160 * (k + 1)), now) == []
        assert det.expire(now) is None
    assert det.feed(500, end(5, 16000), now + 0.02) == ["5"]
    assert det.expire(now + 10.0) is None


def test_a_non_digit_event_expires_silently() -> None:
    det = Rfc4733Detector()
    det.feed(100, start(16), 0.0)  # flash
    assert det.expire(1.0) is None and not det.pending
