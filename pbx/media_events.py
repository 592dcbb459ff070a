"""The events a media worker reports on a call leg (`pbx.messages.MediaEvent.event`): a
prompt played out, a key pressed, a timer fired, a media failure, a recording finished,
a WebSocket bridge ended; and a released leg's statistics (`pbx.messages.MediaReleased`).
Reached through `pbx.messages` like every plane message."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

RecordEnd = Literal[
    "dtmf", "max_duration", "stopped", "error", "speech_end", "no_speech", "max_speech"
]


class AudioComplete(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["audio_complete"] = "audio_complete"
    play_id: int


class DtmfDigit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["dtmf"] = "dtmf"
    digit: str
    source: Literal["rfc4733", "info", "inband"] = "rfc4733"
    # Set when this digit stopped an interruptible prompt.
    stopped_play_id: int | None = None


class TimerFired(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["timer"] = "timer"
    timer_id: int


class MediaFailure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["media_error"] = "media_error"
    reason: str
    play_id: int | None = None


class RecordingFinished(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["recording_finished"] = "recording_finished"
    record_id: int
    path: str  # as given in MediaRecord
    duration_ms: int
    reason: RecordEnd  # the last three only when listening (MediaRecord.listen_ms)
    # Listening: where in the file the speech began (None: nobody spoke, or a plain
    # recording), so the recogniser is not sent the wait before it.
    speech_start_ms: int | None = Field(default=None, ge=0)


class WsBridgeEnded(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ws_bridge_ended"] = "ws_bridge_ended"
    reason: str  # "closed by peer", "connect failed: ...", "timeout"


MediaEventBody = Annotated[
    AudioComplete | DtmfDigit | TimerFired | MediaFailure | RecordingFinished
    | WsBridgeEnded,
    Field(discriminator="type"),
]


# The most legs one MediaReleased names: a worker releasing more in one tick (all its
# calls at once) sends several.
MAX_RELEASED_LEGS = 500


class ReleasedLeg(BaseModel):
    """A released leg's RTP statistics (one item of MediaReleased)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    call_id: str
    packets_sent: int = 0
    packets_received: int = 0
    # RFC 3550 receive statistics of the leg's source (A.3 cumulative lost,
    # A.8 interarrival jitter) and audio packets that came too late to be used.
    packets_lost: int = 0
    jitter_ms: float = 0.0
    packets_late: int = 0
    # What the far end reported about our stream in its last RTCP report block.
    remote_packets_lost: int | None = None
    remote_jitter_ms: float | None = None
    rtcp_sent: int = 0
    rtcp_received: int = 0
    # Strict latching: packets from other sources than the latched one, dropped (RTP,
    # RTCP), and times the RTP latch moved to another source without signalling.
    rtp_foreign_dropped: int = 0
    rtcp_foreign_dropped: int = 0
    rtp_relatched: int = 0
