"""Voice actions: `voip_bridge` (the call's audio to a WebSocket room; terminal, the
front handles the bridge's end) and `input_voice` (speech recognition: none here
yet, so the provider gets `error`, DESIGN §3 "ASR").

Phases: none of their own (DONE; WAIT_PROVIDER).
"""

from __future__ import annotations

from pbx.ivr.models import ErrorEvent, InputVoiceAction, VoipBridgeAction
from pbx.ivr.phases import Digits, PhaseData
from pbx.ivr.session import Session
from pbx.messages import WsBridgeCommand

ASR_UNAVAILABLE = "ASR service not available"
BRIDGE_TIMEOUT_MS = 30_000


def voip_bridge(s: Session, action: VoipBridgeAction, typeahead: Digits) -> PhaseData:
    # Choice: a timeout that is not positive means the default.
    timeout_ms = action.timeout_ms if action.timeout_ms > 0 else BRIDGE_TIMEOUT_MS
    s.commands.append(
        WsBridgeCommand(
            uri=action.create_room_uri, headers=dict(action.headers), timeout_ms=timeout_ms
        )
    )
    return s.end("VoipBridge")


def input_voice(s: Session, action: InputVoiceAction, typeahead: Digits) -> PhaseData:
    return s.ask(ErrorEvent(reason=ASR_UNAVAILABLE))
