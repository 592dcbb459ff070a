"""pbx.messages: every message kind survives encode/decode; bad frames raise MessageError."""

from __future__ import annotations

import typing

import orjson
import pytest

from pbx import messages as m
from pbx.config import IvrAppParams

PARAMS = IvrAppParams(url="http://127.0.0.1:8080/ivr/step", headers={"X-Key": "k"})
CALL = m.CallInfo(
    call_id="c1",
    session_id="s1",
    caller="1001",
    callee="*99",
    route_name="step_ivr",
    params=PARAMS,
    sip_headers={"User-Agent": "phone"},
    variables={"transferred_from": "queue"},
)
TRACE = m.StepTrace(
    call_id="c1",
    session_id="s1",
    step_index=0,
    trigger="session_start",
    action_type="play",
    action={"type": "play", "prompt": "sounds/welcome.wav"},
    duration_ms=12.5,
    extra={"k": [1, 2]},
    at=1700000000.0,
)

SAMPLES: list[m._Msg] = [
    m.MediaReady(worker_id="w1", capacity=100, rtp_ip="127.0.0.1", calls=2),
    m.MediaPorts(ports=[20000, 20002, 24680], allocate_seq=7),
    m.MediaPorts(ports=[], allocate_seq=0),
    m.MediaHeartbeat(worker_id="w1", calls=3, capacity=100, rtp_ip="127.0.0.1",
                     ports=[20004], allocate_seq=9, tick_late_ms_max=1.5),
    m.MediaAllocate(call_id="c1", rtp_port=20000, seq=8, inband_dtmf=False),
    m.MediaAllocated(call_id="c1", rtp_ip="127.0.0.1", rtp_port=20000),
    m.MediaAllocated(call_id="c1", error="no ports"),
    m.MediaRemote(
        call_id="c1",
        remote_ip="10.0.0.1",
        remote_port=4000,
        payload_type=8,
        codec="PCMA",
        dtmf_payload_type=101,
    ),
    m.MediaRemote(call_id="c1", remote_ip="10.0.0.1", remote_port=4000, payload_type=0,
                  codec="PCMU", direction="recvonly"),
    m.MediaPlay(call_id="c1", play_id=7, file="sounds/a.wav", interruptible=True, loop=True),
    m.MediaStop(call_id="c1"),
    m.MediaTimer(call_id="c1", timer_id=3, delay_ms=5000),
    m.MediaBridge(call_id="c1", peer_call_id="c2"),
    m.MediaDtmfInfo(call_id="c1", digit="5", duration_ms=160),
    m.MediaRecord(call_id="c1", record_id=2, path="s1/20261127_120000.wav", stereo=True,
                  beep=True, metadata={"caller": "1001"}),
    m.MediaRecordStop(call_id="c1"),
    m.MediaWsBridge(call_id="c1", uri="ws://127.0.0.1:9/room", headers={"X-A": "1"}),
    m.MediaRelease(call_id="c1"),
    m.MediaEvent(call_id="c1", event=m.RecordingFinished(
        record_id=2, path="s1/20261127_120000.wav", duration_ms=3000, reason="dtmf")),
    m.MediaEvent(call_id="c1", event=m.WsBridgeEnded(reason="closed by peer")),
    m.MediaEvent(call_id="c1", event=m.AudioComplete(play_id=7)),
    m.MediaEvent(call_id="c1", event=m.DtmfDigit(digit="#", source="inband", stopped_play_id=7)),
    m.MediaEvent(call_id="c1", event=m.TimerFired(timer_id=3)),
    m.MediaEvent(call_id="c1", event=m.MediaFailure(reason="file not found", play_id=7)),
    m.MediaReleased(legs=[m.ReleasedLeg(call_id="c1", packets_sent=10, packets_received=9),
                          m.ReleasedLeg(call_id="c2", remote_jitter_ms=1.5)]),
    m.IvrReady(executor_id="e1", capacity=50),
    m.IvrHeartbeat(executor_id="e1", busy=1, capacity=50),
    m.IvrEvent(session_id="s1", seq=0, input=m.SessionStartInput(call=CALL)),
    m.IvrEvent(
        session_id="s1",
        seq=1,
        state='{"step":1,"vars":{"a":"b"}}',
        input=m.MediaInput(event=m.DtmfDigit(digit="1")),
    ),
    m.IvrEvent(session_id="s1", seq=2, state="{}", input=m.CallEndedInput(reason="Bye")),
    m.IvrEvent(session_id="s1", seq=3, state="{}", input=m.WaitExpiredInput(waited_ms=35000)),
    m.IvrReply(session_id="s1", seq=3, state='{"step":3}', step_index=3, wait_ms=30000),
    m.IvrReply(
        session_id="s1",
        seq=1,
        state='{"step":2}',
        step_index=2,
        end_reason="Transfer(2001)",
        commands=[
            m.PlayCommand(play_id=1, file="sounds/a.wav", interruptible=True),
            m.StopCommand(),
            m.TimerCommand(timer_id=1, delay_ms=3000),
            m.TransferCommand(target="2001"),
            m.HangupCommand(code=486, reason="Busy"),
            m.RecordCommand(record_id=1, path="s1/x.wav", area="voicemail"),
            m.StopRecordCommand(),
            m.QueueCommand(target="support", return_to_ivr=True),
            m.AgentCommand(target="9200", skill_group_id="sales"),
            m.WsBridgeCommand(uri="ws://127.0.0.1:9/room", timeout_ms=1000),
        ],
        traces=[TRACE],
        done=True,
    ),
]


def _kinds_in_union() -> set[str]:
    union = typing.get_args(m.Message)[0]
    return {cls.model_fields["kind"].default for cls in typing.get_args(union)}


def test_samples_cover_every_kind() -> None:
    assert {s.kind for s in SAMPLES} == _kinds_in_union()  # type: ignore[attr-defined]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: s.kind)  # type: ignore[attr-defined]
def test_round_trip(msg: m._Msg) -> None:
    frame = m.encode(msg)
    assert isinstance(frame, bytes)
    back = m.decode(frame)
    assert type(back) is type(msg)
    assert back == msg
    assert m.encode(back) == frame


def test_version_travels_in_every_frame() -> None:
    for msg in SAMPLES:
        assert orjson.loads(m.encode(msg))["v"] == m.PROTOCOL_VERSION


def _frame(**changes: object) -> bytes:
    data = orjson.loads(m.encode(m.MediaStop(call_id="c1")))
    data.update(changes)
    return orjson.dumps(data)


# 1: the version before issue 8 (`rtp_ip`, `IvrReply.wait_ms`, `WaitExpiredInput`);
# 2: before issue 9 (port pools: MediaPorts, MediaAllocate.rtp_port); 3: before
# MediaAllocate.remote and confirmations by announcement; 4: before the session state
# travelled as text; 5: before MediaReleased named a tick's legs.
@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 7, "6", None])
def test_wrong_version(version: object) -> None:
    with pytest.raises(m.MessageError, match="protocol version"):
        m.decode(_frame(v=version))


def test_missing_version() -> None:
    with pytest.raises(m.MessageError, match="protocol version"):
        m.decode(orjson.dumps({"kind": "media_stop", "call_id": "c1"}))


@pytest.mark.parametrize("frame", [b"", b"not json", b"{", b"\xff\xfe", b'{"v":2,'])
def test_not_json(frame: bytes) -> None:
    with pytest.raises(m.MessageError, match="not JSON"):
        m.decode(frame)


@pytest.mark.parametrize("frame", [b"[]", b"1", b'"media_stop"', b"null"])
def test_not_an_object(frame: bytes) -> None:
    with pytest.raises(m.MessageError):
        m.decode(frame)


def test_unknown_kind() -> None:
    with pytest.raises(m.MessageError):
        m.decode(_frame(kind="media_explode"))


def test_missing_kind() -> None:
    with pytest.raises(m.MessageError):
        m.decode(orjson.dumps({"v": m.PROTOCOL_VERSION, "call_id": "c1"}))


def test_missing_field() -> None:
    data = orjson.loads(m.encode(m.MediaStop(call_id="c1")))
    del data["call_id"]
    with pytest.raises(m.MessageError, match="media_stop"):
        m.decode(orjson.dumps(data))


def test_missing_nested_field() -> None:
    data = orjson.loads(m.encode(m.MediaEvent(call_id="c1", event=m.TimerFired(timer_id=1))))
    del data["event"]["timer_id"]
    with pytest.raises(m.MessageError):
        m.decode(orjson.dumps(data))


def test_unknown_extra_field_refused() -> None:
    with pytest.raises(m.MessageError):
        m.decode(_frame(surprise=True))


def test_wrong_field_type() -> None:
    frame = orjson.dumps({"v": m.PROTOCOL_VERSION, "kind": "media_timer", "call_id": "c1",
                          "timer_id": "x", "delay_ms": 1})
    with pytest.raises(m.MessageError):
        m.decode(frame)


def test_unknown_command_in_reply() -> None:
    data = orjson.loads(m.encode(m.IvrReply(session_id="s", seq=0, state="{}", step_index=0)))
    data["commands"] = [{"type": "dance"}]
    with pytest.raises(m.MessageError):
        m.decode(orjson.dumps(data))


# A state as an executor might write it: not in orjson's canonical form (spaces, escapes,
# non-ASCII), so only a copy of the very text equals it.
ODD_STATE = r'{"v": 1, "phase":"prompt",  "variables":{"name":"Zo\u00e9 \"Z\"","x":"☃"}}'


def _reply_frame(state: object, **fields: object) -> bytes:
    data = orjson.loads(m.encode(m.IvrReply(session_id="s", seq=1, state="{}", step_index=0)))
    data.update(state=state, **fields)
    return orjson.dumps(data)


def test_ivr_state_travels_as_text_unchanged() -> None:
    # Protocol 5: the state is a string the front keeps and sends back as it is.
    reply = m.decode(m.encode(m.IvrReply(session_id="s", seq=1, state=ODD_STATE,
                                         step_index=3, end_reason="Transfer(2001)")))
    assert (reply.state, reply.step_index, reply.end_reason) == (
        ODD_STATE, 3, "Transfer(2001)")
    event = m.decode(m.encode(m.IvrEvent(session_id="s", seq=2, state=reply.state,
                                         input=m.CallEndedInput())))
    assert event.state == ODD_STATE


def test_ivr_reply_says_its_step_index() -> None:
    assert m.decode(_reply_frame("{}", step_index=7)).step_index == 7
    for bad in ({"step_index": -1}, {"step_index": "x"}):
        with pytest.raises(m.MessageError, match="ivr_reply"):
            m.decode(_reply_frame("{}", **bad))
    data = orjson.loads(_reply_frame("{}"))
    del data["step_index"]
    with pytest.raises(m.MessageError, match="ivr_reply"):
        m.decode(orjson.dumps(data))


@pytest.mark.parametrize("state", [{"step_index": 1}, ["{}"], 1, None])
def test_ivr_reply_state_that_is_not_text_refused(state: object) -> None:
    # A version-4 peer's state object (or anything else) is refused at decode.
    with pytest.raises(m.MessageError, match="ivr_reply"):
        m.decode(_reply_frame(state))


def test_ivr_state_over_the_bound_refused_at_decode() -> None:
    longest = "x" * m.MAX_IVR_STATE_CHARS
    assert m.decode(_reply_frame(longest)).state == longest
    with pytest.raises(m.MessageError, match="ivr_reply"):
        m.decode(_reply_frame(longest + "x"))
    event = orjson.loads(m.encode(m.IvrEvent(session_id="s", seq=2, state="{}",
                                             input=m.CallEndedInput())))
    with pytest.raises(m.MessageError, match="ivr_event"):
        m.decode(orjson.dumps({**event, "state": longest + "x"}))


def test_messages_are_frozen() -> None:
    msg = m.MediaStop(call_id="c1")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        msg.call_id = "c2"  # type: ignore[misc]


@pytest.mark.parametrize("fields", [
    {"ports": [0], "allocate_seq": 0},
    {"ports": [65536], "allocate_seq": 0},
    {"ports": [20000], "allocate_seq": -1},
    {"ports": [20000]},
    {"ports": list(range(1024, 1024 + 2 * (m.MAX_ANNOUNCED_PORTS + 1), 2)), "allocate_seq": 0},
])
def test_port_announcement_bounds(fields: dict[str, object]) -> None:
    """Ports are 1-65535, at most MAX_ANNOUNCED_PORTS of them; the seq is required."""
    frame = orjson.dumps({"v": m.PROTOCOL_VERSION, "kind": "media_ports", **fields})
    with pytest.raises(m.MessageError, match="media_ports"):
        m.decode(frame)


@pytest.mark.parametrize("fields", [{"seq": 1}, {"rtp_port": 20000},
                                    {"rtp_port": 20000, "seq": 0}])
def test_allocate_names_its_port_and_seq(fields: dict[str, object]) -> None:
    frame = orjson.dumps({"v": m.PROTOCOL_VERSION, "kind": "media_allocate", "call_id": "c1",
                          **fields})
    with pytest.raises(m.MessageError, match="media_allocate"):
        m.decode(frame)


@pytest.mark.parametrize("fields", [
    {"legs": []},
    {"legs": [{"call_id": f"c{n}"} for n in range(m.MAX_RELEASED_LEGS + 1)]},
    {"call_id": "c1", "packets_sent": 1},  # a version-5 worker's one leg
    {"legs": [{"call_id": "c1", "secret": 1}]},
])
def test_released_legs_bounds(fields: dict[str, object]) -> None:
    """MediaReleased names 1 to MAX_RELEASED_LEGS legs, each a ReleasedLeg."""
    frame = orjson.dumps({"v": m.PROTOCOL_VERSION, "kind": "media_released", **fields})
    with pytest.raises(m.MessageError, match="media_released"):
        m.decode(frame)
