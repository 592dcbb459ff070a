"""Symmetric RTP: the engine answers where the caller's packets come from, but never
latches onto a source it cannot send to."""

from __future__ import annotations

from media.engine import MediaEngine
from media.prompts import PromptCache
from media.rtp import build_header
from pbx.messages import MediaRemote

SDP_ADDR = ("127.0.0.1", 50000)


def engine_with_bridge() -> MediaEngine:
    engine = MediaEngine(PromptCache("sounds"))
    engine.add_leg("a", 40000)
    engine.add_leg("b", 40002)
    engine.set_remote(MediaRemote(call_id="a", remote_ip=SDP_ADDR[0], remote_port=SDP_ADDR[1],
                                  payload_type=0, codec="PCMU", dtmf_payload_type=101))
    engine.set_remote(MediaRemote(call_id="b", remote_ip="127.0.0.1", remote_port=50002,
                                  payload_type=0, codec="PCMU"))
    engine.bridge("a", "b")
    return engine


def forwarded_to_a(engine: MediaEngine, now: float) -> list[tuple[str, int]]:
    packets, _ = engine.receive_rtp("b", build_header(0, 5, 9000, 7, False) + bytes(160),
                                    ("127.0.0.1", 50002), now)
    return [addr for call_id, _, addr in packets if call_id == "a"]


def test_latches_onto_the_first_source() -> None:
    engine = engine_with_bridge()
    engine.receive_rtp("a", build_header(0, 1, 1000, 1, False) + bytes(160),
                       ("127.0.0.1", 51000), 100.0)
    assert forwarded_to_a(engine, 100.02) == [("127.0.0.1", 51000)]


def test_a_source_port_of_zero_is_not_latched() -> None:
    engine = engine_with_bridge()
    engine.receive_rtp("a", build_header(101, 1, 1000, 1, True) + bytes([1, 0x80, 0, 160]),
                       ("127.0.0.1", 0), 100.0)
    assert forwarded_to_a(engine, 100.02) == [SDP_ADDR]
    # A usable source afterwards is latched as usual.
    engine.receive_rtp("a", build_header(0, 2, 1160, 1, False) + bytes(160),
                       ("127.0.0.1", 51000), 100.04)
    assert forwarded_to_a(engine, 100.06) == [("127.0.0.1", 51000)]
