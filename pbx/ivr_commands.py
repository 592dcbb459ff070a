"""The commands of an IvrReply (`pbx.messages.IvrReply.commands`): what an IVR executor
asks the front to do for a call (play, stop, timer, hang up, transfer, record, queue,
agent, WebSocket bridge). Reached through `pbx.messages` like every plane message."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RecordArea = Literal["recordings", "voicemail", "asr"]



class PlayCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["play"] = "play"
    play_id: int
    file: str
    interruptible: bool = False


class StopCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["stop"] = "stop"


class TimerCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["timer"] = "timer"
    timer_id: int
    delay_ms: int


class HangupCommand(BaseModel):
    """End the call. `code` is the SIP status for an unanswered (early media) call,
    or goes in the BYE's Reason header after answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["hangup"] = "hangup"
    code: int | None = None
    reason: str = "Normal"


class TransferCommand(BaseModel):
    """Leave the IVR and bridge the caller to `target` (extension, route user or SIP URI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["transfer"] = "transfer"
    target: str


class RecordCommand(BaseModel):
    """Start recording the caller (forwarded as MediaRecord; see there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["record"] = "record"
    record_id: int
    path: str
    area: RecordArea = "recordings"
    max_duration_ms: int = 120_000
    stereo: bool = False
    stop_digits: str = "#"
    beep: bool = False
    metadata: dict[str, Any] | None = None
    listen_ms: int | None = Field(default=None, gt=0)


class StopRecordCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["stop_record"] = "stop_record"


class QueueCommand(BaseModel):
    """Leave the IVR for the `[queues.<target>]` queue. With `return_to_ivr` and nobody
    answering, the front starts the route's IVR again (session_start, variables
    transferred_from=queue, return_reason=no_answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["queue"] = "queue"
    target: str
    return_to_ivr: bool = False


class AgentCommand(BaseModel):
    """Ring the agent's extension, falling back to `[skill_groups.<skill_group_id>]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["route_to_agent"] = "route_to_agent"
    target: str
    skill_group_id: str | None = None
    # The action's contact-centre routing hints, passed on to the agent's INVITE
    # (`X-Key-Id`, `X-Channel-Code`).
    key_id: str | None = None
    channel_code: str | None = None


class WsBridgeCommand(BaseModel):
    """Leave the IVR for a WebSocket audio bridge (forwarded as MediaWsBridge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["voip_bridge"] = "voip_bridge"
    uri: str
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_ms: int = 30_000


CallCommand = Annotated[
    PlayCommand | StopCommand | TimerCommand | HangupCommand | TransferCommand
    | RecordCommand | StopRecordCommand | QueueCommand | AgentCommand | WsBridgeCommand,
    Field(discriminator="type"),
]
