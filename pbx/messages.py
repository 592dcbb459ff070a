"""Messages on the two ZeroMQ planes, shared by every process.

One pydantic model per message, tagged by `kind`, serialised with orjson.
`PROTOCOL_VERSION` travels in every message (`v`); a peer speaking another
version is refused at decode time with `MessageError`. A new optional field with
a default (e.g. `MediaHeartbeat.rtp_foreign_dropped`) keeps the version: an
older peer's messages still decode, the field taking its default. Anything an
older peer's messages could not satisfy, or a field whose meaning changes,
bumps it. Models forbid unknown fields, so an older receiver refuses a newer
sender's extra fields: the processes of one installation are upgraded together.

Media plane (front ROUTER  <->  media worker DEALER):
    worker -> front : MediaReady, MediaPorts, MediaHeartbeat, MediaAllocated (refusals
                      only), MediaEvent, MediaReleased
    front -> worker : MediaAllocate, MediaRemote, MediaPlay, MediaStop, MediaTimer,
                      MediaBridge, MediaDtmfInfo, MediaRecord, MediaRecordStop,
                      MediaWsBridge, MediaRelease

IVR plane (front ROUTER  <->  executor DEALER):
    executor -> front : IvrReady, IvrHeartbeat, IvrReply
    front -> executor : IvrEvent

An IVR executor keeps no session state: `IvrEvent.state` carries the state the
last reply returned (None on session start) and `IvrReply.state` the new one. The
state is JSON text (`pbx.ivr.state`) that only executors read: the front keeps the
string it got and sends it back as it is, and reads what it needs of the session from
the reply's own fields (`step_index`, `end_reason`).

Trust (DESIGN §6, `pbx.planes`): the front accepts an `IvrReply` only from the
executor its event was sent to, and a media worker declares its RTP address in
`MediaReady` and every `MediaHeartbeat` (`rtp_ip`): the front refuses a worker
whose address is not allowed by its config, and an allocation whose `rtp_ip` is
not its worker's declared address.

RTP ports without a round trip (issue 9): a media worker pre-binds a pool of RTP/RTCP
port pairs and announces its free ones (MediaPorts after MediaReady, again whenever the
pool changed, at most once per tick, and in every MediaHeartbeat). The front hands a
port out of that list itself and answers the INVITE at once; MediaAllocate names the
port (`rtp_port`) and is numbered per worker (`seq`), and every announcement says the
last `seq` the worker handled (`allocate_seq`), so the front can tell an announcement
that predates a hand-out from one that follows it (`pbx.registry.PortPool`).

Fewer messages per call (issue 9, version 4): an inbound leg's offer is known when its
port is handed out, so its MediaAllocate carries the first MediaRemote (`remote`);
MediaRemote alone is for what comes later (re-INVITEs, the ACK's answer to a late
offer, an outbound leg's answer). A worker answers MediaAllocate only to refuse it
(MediaAllocated with `error`): the announcement that follows the allocation
(`allocate_seq` >= its `seq`) confirms it unless its `refused` names that `seq`, and
the front lets any number of legs' confirmations ride on one MediaPorts instead of one
MediaAllocated each.

No session waits in silence (issue 8): each IvrReply says how long the session may now
go without a call event (`wait_ms`); a session that hears nothing for that long plus
the front's grace gets a WaitExpiredInput, and its provider an `error` event.

Versions: 1, the first; 2 (issue 8), `rtp_ip` required in MediaReady and
MediaHeartbeat, `IvrReply.wait_ms` and `WaitExpiredInput` (a version-1 peer is refused);
3 (issue 9), port pools: MediaPorts, `ports` and `allocate_seq` required in
MediaHeartbeat, `rtp_port` and `seq` required in MediaAllocate (a worker of version 2
bound a port per allocation and cannot take part). Still 3 (issue 10, ASR): the
optional `listen_ms` of MediaRecord / RecordCommand, the area "asr" and the end reasons
`speech_end`, `no_speech`, `max_speech` that only a listening recording produces.
4 (issue 9), `MediaAllocate.remote`, and a worker's silence (then its announcement)
confirms an allocation: a version-3 worker would refuse `remote` and a version-3 front
would wait for a MediaAllocated that no longer comes. Still 4: the optional `refused`
of MediaPorts and MediaHeartbeat (the allocations an announcement's `allocate_seq` does
not confirm).
5 (issue 9), the session state travels as JSON text, not as an object (`state` is a
string of at most MAX_IVR_STATE_CHARS characters), and IvrReply says the state's
`step_index` and `end_reason` itself: the front neither parses nor copies the state
(it was ~20 us of the front's work per reply, decoding and re-encoding the ~2 KB
object). A version-4 peer sends an object where a string is wanted.
6 (issue 9), MediaReleased carries the statistics of every leg released in one tick
(`legs`, a list of ReleasedLeg) instead of one leg's: one message a tick instead of
one a call. A version-5 peer sends one leg's fields at the top level.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from pbx.config import IvrAppParams

# Re-exported: every plane message model is reached through this module.
from pbx.ivr_commands import AgentCommand as AgentCommand
from pbx.ivr_commands import CallCommand as CallCommand
from pbx.ivr_commands import HangupCommand as HangupCommand
from pbx.ivr_commands import PlayCommand as PlayCommand
from pbx.ivr_commands import QueueCommand as QueueCommand
from pbx.ivr_commands import RecordArea as RecordArea
from pbx.ivr_commands import RecordCommand as RecordCommand
from pbx.ivr_commands import StopCommand as StopCommand
from pbx.ivr_commands import StopRecordCommand as StopRecordCommand
from pbx.ivr_commands import TimerCommand as TimerCommand
from pbx.ivr_commands import TransferCommand as TransferCommand
from pbx.ivr_commands import WsBridgeCommand as WsBridgeCommand
from pbx.media_events import MAX_RELEASED_LEGS as MAX_RELEASED_LEGS
from pbx.media_events import AudioComplete as AudioComplete
from pbx.media_events import DtmfDigit as DtmfDigit
from pbx.media_events import MediaEventBody as MediaEventBody
from pbx.media_events import MediaFailure as MediaFailure
from pbx.media_events import RecordEnd as RecordEnd
from pbx.media_events import RecordingFinished as RecordingFinished
from pbx.media_events import ReleasedLeg as ReleasedLeg
from pbx.media_events import TimerFired as TimerFired
from pbx.media_events import WsBridgeEnded as WsBridgeEnded

PROTOCOL_VERSION: Literal[6] = 6


class MessageError(Exception):
    """A frame that is not a valid message of this protocol version."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[6] = PROTOCOL_VERSION


# ---------------------------------------------------------------- media plane


class MediaReady(_Msg):
    kind: Literal["media_ready"] = "media_ready"
    worker_id: str
    capacity: int
    # The worker's RTP address (`[media] rtp_ip`): every MediaAllocated must carry it.
    rtp_ip: str
    calls: int = 0


# A worker announces at most this many free ports (every even port of 1024-65535).
MAX_ANNOUNCED_PORTS = 32_256
RtpPort = Annotated[int, Field(gt=0, lt=65536)]
# MediaAllocate numbers the worker refused or never received, as inclusive ranges
# (first, last), at most this many (`workers.portpool.RefusedSeqs`).
MAX_REFUSED_RANGES = 256
AllocateSeq = Annotated[int, Field(gt=0)]
SeqRange = tuple[AllocateSeq, AllocateSeq]


class MediaPorts(_Msg):
    """The worker's free pre-bound RTP ports, all of them (RTCP is each port + 1), and
    the `seq` of the last MediaAllocate it handled (0: none yet). Sent after MediaReady
    and whenever the pool changed or an allocation was handled, at most once per tick.

    `refused`: the MediaAllocate numbers up to `allocate_seq` that gave their leg no
    port: those the worker refused, and those that never reached it (a gap in the
    numbers, e.g. lost across a reconnect). Each is repeated for a while after its
    refusal (longer than a message waits in the worker's outbox), so a front that missed
    the MediaAllocated refusal still fails the leg instead of taking `allocate_seq` as
    its confirmation."""

    kind: Literal["media_ports"] = "media_ports"
    ports: list[RtpPort] = Field(max_length=MAX_ANNOUNCED_PORTS)
    allocate_seq: int = Field(ge=0)
    refused: list[SeqRange] = Field(default_factory=list, max_length=MAX_REFUSED_RANGES)
    # The worker's shared RTP port ([media] rtp_socket), None: it has none. The front may
    # give it to any number of legs (MediaAllocate with this port), within the worker's
    # capacity; each leg's packets are told apart by their source address.
    shared_port: RtpPort | None = None


# Upper bounds (ms) of the timing histograms a media worker reports in its heartbeats.
MEDIA_TIMING_BOUNDS_MS = (1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
TIMING_BUCKETS = len(MEDIA_TIMING_BOUNDS_MS) + 1


class MediaHeartbeat(_Msg):
    kind: Literal["media_heartbeat"] = "media_heartbeat"
    worker_id: str
    calls: int
    capacity: int
    rtp_ip: str  # as in MediaReady (a front that restarted learns it from here)
    # As in MediaPorts, so a front that restarted learns the pool from here too.
    ports: list[RtpPort] = Field(max_length=MAX_ANNOUNCED_PORTS)
    allocate_seq: int = Field(ge=0)
    refused: list[SeqRange] = Field(default_factory=list, max_length=MAX_REFUSED_RANGES)
    shared_port: RtpPort | None = None  # as in MediaPorts
    # How late the worker's 20 ms tick ran, worst over the last period.
    tick_late_ms_max: float = 0.0
    # Over the same period: lateness percentiles, how long a tick's work took
    # (p99), and ticks skipped because one ran more than a tick late.
    tick_late_ms_p50: float = 0.0
    tick_late_ms_p99: float = 0.0
    tick_busy_ms_p99: float = 0.0
    ticks: int = 0
    ticks_skipped: int = 0
    # Over the same period: packets dropped because they came from another source than
    # their leg's latched one (strict latching, media.engine), on RTP and RTCP ports.
    rtp_foreign_dropped: int = 0
    rtcp_foreign_dropped: int = 0
    # Over the same period: valid RTP packets read on legs and sent on them (prompts,
    # relayed audio, events), live legs included: the rates while calls go on.
    rtp_packets_received: int = Field(default=0, ge=0)
    rtp_packets_sent: int = Field(default=0, ge=0)
    # Over the same period: key presses dropped past a leg's 20 a second (a flood).
    dtmf_flood_dropped: int = Field(default=0, ge=0)
    # Over the same period, histograms for /metrics (pbx.metrics): counts per bucket of
    # MEDIA_TIMING_BOUNDS_MS (one more for beyond the last) and their sum: how late each
    # tick ran, and how long from a MediaPlay to the prompt's first RTP packet.
    tick_late_buckets: list[int] = Field(default_factory=list, max_length=TIMING_BUCKETS)
    tick_late_sum_ms: float = 0.0
    play_start_buckets: list[int] = Field(default_factory=list, max_length=TIMING_BUCKETS)
    play_start_sum_ms: float = 0.0


class MediaAllocate(_Msg):
    """Give a call leg the pre-bound port `rtp_port`, which the front took from the
    worker's last announcement (a pooled port, or the worker's shared port: the leg
    then shares it). A refusal (not in the pool, worker at capacity) is answered with
    MediaAllocated naming the error; success is not answered: the worker's next
    announcement (`allocate_seq` >= `seq`) confirms it. `seq` numbers the front's
    allocations to this worker (1, 2, ...; after learning a worker, the front goes on
    from its `allocate_seq`). `remote`: the leg's first MediaRemote, when the offer is
    known as the port is handed out (an inbound call), applied once the leg has its port."""

    kind: Literal["media_allocate"] = "media_allocate"
    call_id: str
    rtp_port: RtpPort
    seq: int = Field(gt=0)
    inband_dtmf: bool = True
    remote: MediaRemote | None = None

    @model_validator(mode="after")
    def _remote_of_this_leg(self) -> MediaAllocate:
        if self.remote is not None and self.remote.call_id != self.call_id:
            raise ValueError(f"remote is for leg {self.remote.call_id!r}, "
                             f"not {self.call_id!r}")
        return self


class MediaAllocated(_Msg):
    """A MediaAllocate refused (`error`). A worker of this version sends no other; the
    front still takes one without `error` as an explicit confirmation of that port."""

    kind: Literal["media_allocated"] = "media_allocated"
    call_id: str
    rtp_ip: str = ""
    rtp_port: int = 0
    error: str | None = None


class MediaRemote(_Msg):
    """Where to send RTP and in which format (from the negotiated SDP)."""

    kind: Literal["media_remote"] = "media_remote"
    call_id: str
    remote_ip: str
    remote_port: int
    payload_type: int  # 0 PCMU, 8 PCMA
    codec: Literal["PCMU", "PCMA"]
    dtmf_payload_type: int | None = None
    ptime_ms: int = 20
    # Our side's direction (as `pbx.sip.sdp.Negotiated.direction`, RFC 3264): with
    # recvonly or inactive (the far end put us on hold) the leg sends no RTP; RTCP goes on.
    direction: Literal["sendrecv", "sendonly", "recvonly", "inactive"] = "sendrecv"
    cn_payload_type: int | None = None  # RFC 3389 CN, sent while nothing plays (else silence)


MediaAllocate.model_rebuild()  # `remote` names MediaRemote, defined after it


class MediaPlay(_Msg):
    """Play a prompt (a path inside the sounds directory). Replaces any playing prompt.

    With `interruptible`, a digit stops the prompt at once and the digit's
    MediaEvent carries `stopped_play_id`; no AudioComplete follows. Without it,
    digits are reported and the prompt plays to its end.
    """

    kind: Literal["media_play"] = "media_play"
    call_id: str
    play_id: int
    file: str
    interruptible: bool = False
    loop: bool = False


class MediaStop(_Msg):
    """Stop playback (no AudioComplete for the stopped prompt)."""

    kind: Literal["media_stop"] = "media_stop"
    call_id: str


class MediaTimer(_Msg):
    """Arm a one-shot timer for the call, replacing the call's previous one; delay 0 cancels."""

    kind: Literal["media_timer"] = "media_timer"
    call_id: str
    timer_id: int
    delay_ms: int


class MediaBridge(_Msg):
    """Bridge two legs on this worker: audio (transcoded if codecs differ) and DTMF both ways."""

    kind: Literal["media_bridge"] = "media_bridge"
    call_id: str
    peer_call_id: str


class MediaDtmfInfo(_Msg):
    """A digit the front received as SIP INFO, so the worker reports each key once."""

    kind: Literal["media_dtmf_info"] = "media_dtmf_info"
    call_id: str
    digit: str
    duration_ms: int = 100


class MediaRecord(_Msg):
    """Record the leg to a WAV file (8 kHz, 16-bit), written as it goes so a killed worker
    leaves a playable file. Mono: the caller; stereo: caller left, what the caller hears
    right. `path` is relative to the `area` directory (`[media] recordings_dir` or
    `voicemail_dir`); one that escapes it is refused with a MediaFailure. Ends on a digit
    in `stop_digits` (not recorded), at `max_duration_ms`, on MediaRecordStop, or when the
    leg is released; then a RecordingFinished event (none after a release). With
    `metadata`, a JSON file `<path>.json` holding it plus the duration is written at the
    end (voicemail records). With `beep`, a short tone is played first.

    With `listen_ms` (input_voice, docs/asr.md) the worker listens instead: the energy
    VAD ends the file after the caller spoke and fell silent (`speech_end`), when the
    caller does not start speaking within `listen_ms` (`no_speech`), or when the
    speech runs `[asr] max_speech_ms` (`max_speech`); `area` is then "asr" (the
    worker's `[asr] spool_dir`), and the worker bounds `max_duration_ms` by
    `listen_ms + [asr] max_speech_ms`.
    """

    kind: Literal["media_record"] = "media_record"
    call_id: str
    record_id: int
    path: str
    area: RecordArea = "recordings"
    max_duration_ms: int = 120_000
    stereo: bool = False
    stop_digits: str = "#"
    beep: bool = False
    metadata: dict[str, Any] | None = None
    listen_ms: int | None = Field(default=None, gt=0)


class MediaRecordStop(_Msg):
    kind: Literal["media_record_stop"] = "media_record_stop"
    call_id: str


class MediaWsBridge(_Msg):
    """Bridge the leg's audio to a WebSocket (`voip_bridge`): caller audio goes out as
    binary PCM16 LE 8 kHz frames, frames that come back are played. Either side closing
    ends it with a WsBridgeEnded event; `timeout_ms` bounds the connect."""

    kind: Literal["media_ws_bridge"] = "media_ws_bridge"
    call_id: str
    uri: str
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_ms: int = 30_000


class MediaRelease(_Msg):
    """Stop everything for the leg and free its port; its statistics come in the
    worker's next MediaReleased (within a tick)."""

    kind: Literal["media_release"] = "media_release"
    call_id: str


class MediaEvent(_Msg):
    kind: Literal["media_event"] = "media_event"
    call_id: str
    event: MediaEventBody


class MediaReleased(_Msg):
    """The legs the worker released since its last MediaReleased (sent once per tick:
    one message for every MediaRelease of the tick, not one each)."""

    kind: Literal["media_released"] = "media_released"
    legs: list[ReleasedLeg] = Field(min_length=1, max_length=MAX_RELEASED_LEGS)


# ---------------------------------------------------------------- IVR plane


class CallInfo(BaseModel):
    """What the executor knows of the call when its IVR session starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    call_id: str
    session_id: str
    caller: str
    callee: str
    direction: Literal["inbound", "outbound"] = "inbound"
    route_name: str
    params: IvrAppParams
    # INVITE headers, exposed to the provider as sip_<Header> variables.
    sip_headers: dict[str, str] = Field(default_factory=dict)
    # Variables set before the session starts (e.g. jump_ivr params, queue return).
    variables: dict[str, str] = Field(default_factory=dict)


class SessionStartInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["start"] = "start"
    call: CallInfo


class MediaInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["media"] = "media"
    event: MediaEventBody


class CallEndedInput(BaseModel):
    """The caller hung up (or the call failed) while the IVR ran."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["call_ended"] = "call_ended"
    reason: str = "Hangup"


class WaitExpiredInput(BaseModel):
    """The session heard no call event for longer than its reply's `wait_ms` (or the
    front's `[sessions] max_wait_ms` when the reply gave none) plus the front's grace:
    what it waited for (a timer, a prompt's end, a recording's end) was lost on the
    way. The session gives it up and tells the provider (`error` event)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["wait_expired"] = "wait_expired"
    waited_ms: int


IvrInput = Annotated[
    SessionStartInput | MediaInput | CallEndedInput | WaitExpiredInput,
    Field(discriminator="type"),
]


class StepTrace(BaseModel):
    """One `ivr_step_trace` (docs/protocol.md "Traces")."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    call_id: str
    session_id: str
    step_index: int
    trigger: str
    action_type: str | None = None
    action: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    duration_ms: float = 0.0
    error: str | None = None
    step_id: str | None = None
    step_name: str | None = None
    extra: dict[str, Any] | None = None
    end_reason: str | None = None
    at: float = 0.0  # wall-clock time of the step, seconds since the epoch


class IvrReady(_Msg):
    kind: Literal["ivr_ready"] = "ivr_ready"
    executor_id: str
    capacity: int


class IvrHeartbeat(_Msg):
    kind: Literal["ivr_heartbeat"] = "ivr_heartbeat"
    executor_id: str
    busy: int
    capacity: int
    # The events it is working on (session_id -> seq): the front keeps their deadline
    # alive (an api call may take long) and re-sends an event missing from here.
    working: dict[str, int] = Field(default_factory=dict)


# The longest session state (JSON text, `pbx.ivr.state`) an IvrEvent or IvrReply may
# carry: the front keeps one per session. A state is ~2 KB (the call, the current
# action, ~35 keys); only a provider action of hundreds of KB (or as many variables)
# comes near this bound. A reply over it is refused at decode like any bad frame (the
# executor never sends one: `workers.ivr` ends the session instead).
MAX_IVR_STATE_CHARS = 256 * 1024
IvrStateText = Annotated[str, Field(max_length=MAX_IVR_STATE_CHARS)]


class IvrEvent(_Msg):
    """A call event for the session; `state` is the text of its last reply's state
    (None on SessionStartInput), unchanged."""

    kind: Literal["ivr_event"] = "ivr_event"
    session_id: str
    seq: int
    state: IvrStateText | None = None
    input: IvrInput


class IvrReply(_Msg):
    """The executor's answer to IvrEvent `seq`: commands in order, the new state,
    and `done` when the session has ended (no further events wanted).

    `wait_ms`: the longest the session may now wait for its next call event, on its own
    terms: what is left of the timer it armed (a digit or menu timeout) or of the
    recording it runs. None when the wait has no bound of its own (a prompt playing,
    whose length the executor does not know): the front then applies
    `[sessions] max_wait_ms`. Not used with `done`.

    `state`: the session's new state as JSON text, opaque to the front; `step_index`
    (of the session's last step trace) and `end_reason` (None while it runs) are the two
    things the front needs of it, said by the executor from the state it wrote (0 and
    None when it could not read the state it was sent)."""

    kind: Literal["ivr_reply"] = "ivr_reply"
    session_id: str
    seq: int
    state: IvrStateText
    step_index: int = Field(ge=0)
    end_reason: str | None = None
    commands: list[CallCommand] = Field(default_factory=list)
    traces: list[StepTrace] = Field(default_factory=list)
    done: bool = False
    wait_ms: int | None = Field(default=None, ge=0)


Message = Annotated[
    MediaReady
    | MediaPorts
    | MediaHeartbeat
    | MediaAllocate
    | MediaAllocated
    | MediaRemote
    | MediaPlay
    | MediaStop
    | MediaTimer
    | MediaBridge
    | MediaDtmfInfo
    | MediaRecord
    | MediaRecordStop
    | MediaWsBridge
    | MediaRelease
    | MediaEvent
    | MediaReleased
    | IvrReady
    | IvrHeartbeat
    | IvrEvent
    | IvrReply,
    Field(discriminator="kind"),
]

_adapter: TypeAdapter[Any] = TypeAdapter(Message)


def encode(msg: _Msg) -> bytes:
    # pydantic-core writes the JSON itself: the same bytes as orjson over
    # model_dump(mode="json"), without building the intermediate dicts (2x faster).
    return msg.__pydantic_serializer__.to_json(msg)


def decode(frame: bytes) -> Any:
    """Bytes -> one of the message models; MessageError on anything else."""
    try:
        # One pass of pydantic-core's own JSON parser; only a frame it refuses goes the
        # slow way below, which finds the reason.
        msg = _adapter.validate_json(frame)
        if "v" in msg.model_fields_set:  # the version must be said, not defaulted
            return msg
    except ValidationError:
        pass
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MessageError("not a JSON object")
    if data.get("v") != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {data.get('v')!r}, expected {PROTOCOL_VERSION}")
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        raise MessageError(f"invalid {data.get('kind')!r} message: {exc.errors()[0]}") from None
