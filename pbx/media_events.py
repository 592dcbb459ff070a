"""The events a media worker reports on a call leg (`pbx.messages.MediaEvent.event`): a
prompt played out, a key pressed, a timer fired, a media failure, a recording finished,
a WebSocket bridge ended. Reached through `pbx.messages` like every plane message."""

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
