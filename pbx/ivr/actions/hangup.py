"""`hangup` and `play_and_hangup`: an optional last prompt, then the hang-up (with
`code`), no provider call; and the CLOSING phase every way out goes through (the
error prompt of spec §8 too, `Session.fail`).

Phase: CLOSING (`Closing`).
"""

from __future__ import annotations

from pbx.ivr.models import HangupAction, PlayAndHangupAction
from pbx.ivr.phases import Closing, Digits, PhaseData
from pbx.ivr.session import Session
from pbx.messages import AudioComplete, MediaFailure


def hangup(s: Session, action: HangupAction, typeahead: Digits) -> PhaseData:
    return s.close(action.prompt, None, "Normal")


def play_and_hangup(s: Session, action: PlayAndHangupAction, typeahead: Digits) -> PhaseData:
    return s.close(action.prompt, action.code, "Normal")


def closing_done(s: Session, data: Closing, ev: AudioComplete | MediaFailure) -> PhaseData:
    """The last prompt ended (or could not be played): hang up."""
    return s.hangup_now(data.hangup_code, data.end_reason)
