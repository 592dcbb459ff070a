"""The step-mode IVR session state machine (sans-IO): its entry points.

Theory of operation
-------------------
One IVR session is a state (`pbx.ivr.state`, JSON text) that travels with every
`IvrEvent` and comes back in every `IvrReply`; nothing is kept between calls.
The entry points take the state (its text, or the same object as a dict), one input and the current time `now`
(wall-clock seconds; tests pass a virtual clock) and return a `Step`:

    start(call, now)                    SessionStartInput   -> Step
    handle(state, input, now)           MediaInput / CallEndedInput (and a restart)
    provider_result(state, result, now) the answer to the Step's `step` request
    api_result(state, result, now)      the answer to the Step's `api` request
    tts_result(state, result, now)      the answer to the Step's `tts` request
    asr_result(state, result, now)      the answer to the Step's `asr` request
    abort(state, call, reason, now)     the shell's last resort after an internal error

`handle`, `provider_result`, `api_result`, `tts_result` and `asr_result` also take `ivrs`, the configured
`[ivrs.<route_point>]` table a `jump_ivr` action looks its target up in (data passed
in like the clock, so the machine stays pure).

A `Step` holds the new state, call commands for the media worker / front (in order),
HTTP requests for the shell, traces, and two flags. When `waiting_for_provider` is
set the last request is a `step`, `api`, `tts` or `asr` request: the shell performs it
(`step` under the retry policy in `pbx.ivr.provider`, `tts` with `pbx.tts`, `asr` with
`pbx.asr`) and feeds the `ProviderResult` to `provider_result` (the `ApiResult` to
`api_result`, the `TtsResult` to `tts_result`, the `AsrResult` to `asr_result`), and so on until the machine waits for a call event
again; then the shell replies. The other requests
(`start`, `end`, `dtmf_match`) are fire-and-forget notifications. The result entry
points take the last Step itself in place of its state too: they go on from the
session it holds in memory, and the state is written only for the reply (issue 9).

Where things are
----------------
    pbx/ivr/machine.py      these entry points; stale events are filtered here
    pbx/ivr/phases.py       the phases, each phase's data, the transition table
    pbx/ivr/state.py        the state: its format and its mapping to memory
    pbx/ivr/session.py      the session core: outputs, execute, fail, the one `enter`
    pbx/ivr/handlers.py     the tables: action type -> executor, (phase, input) ->
                            handler; the provider's answer, hang-up, lost waits
    pbx/ivr/variables.py    `$name$` substitution, pre-defined variables
    pbx/ivr/actions/        one module per action family:
        prompt.py           prompt (file or TTS), TTS results, playback failures
        menu.py             dtmf_menu
        collect.py          collect_dtmf, input_phone
        api.py              api (HTTP call, dynamic tree)
        record.py           torecord, voicemail
        hangup.py           hangup, play_and_hangup, the closing prompt
        handoff.py          transfer, queue, route_to_agent, jump_ivr
        voice.py            voip_bridge, input_voice

An input goes: entry point -> `INPUTS[(phase, kind)]` (an input a phase does not
list raises `IvrStateError`) -> the handler, which gets the current phase's data and
returns the next phase's -> `Session.enter`, which checks the step against
`TRANSITIONS` (`IllegalTransition` names both phases) -> `Session.finish`.

Media events that belong to a prompt, timer or recording that is no longer the
current one (another play_id / timer_id / record_id than the phase awaits) are
stale and ignored before the table is consulted, and so is `ws_bridge_ended`
(voip_bridge is terminal: the front handles its end); inputs after the session is
done are ignored.

No silent waits (issue 8): every Step says in `wait_ms` how long the session may now
wait for its next call event on its own terms (what is left of the timer it armed or
the recording it runs; None while a prompt plays, whose length it does not know). The
front holds the session to it and, when nothing came, feeds a `WaitExpiredInput`: the
session gives up what it waited for and asks the provider with an `error` event.

The protocol decisions followed here are the provider guide's (docs/decisions.md,
which states every rule where the upstream document is silent); a comment where a
choice is made says so.
"""

from __future__ import annotations

from typing import Any

from pbx.ivr.actions.prompt import TTS_UNAVAILABLE
from pbx.ivr.actions.record import (
    RECORD_END_SLACK_S,
    RECORD_FAILURE_GRACE_MS,
    VOICEMAIL_GOODBYE,
    VOICEMAIL_GREETING,
    VOICEMAIL_MAX_SECS,
)
from pbx.ivr.handlers import EXECUTORS, INPUTS
from pbx.ivr.phases import IllegalTransition, InputKind, IvrStateError, Phase
from pbx.ivr.requests import ApiResult, AsrResult, ProviderResult, TtsResult
from pbx.ivr.session import ERROR_PROMPT, MAX_CHAINED_STEPS, Ivrs, Session, Step
from pbx.ivr.state import load
from pbx.messages import (
    AudioComplete,
    CallEndedInput,
    CallInfo,
    DtmfDigit,
    HangupCommand,
    MediaFailure,
    MediaInput,
    RecordingFinished,
    SessionStartInput,
    TimerFired,
    WaitExpiredInput,
    WsBridgeEnded,
)

# An entry point's session: its state's JSON text (as it travels) or dict, or the Step
# that left it (which goes on from its memory without reading a state: `Step.resume`).
State = str | dict[str, Any] | Step

__all__ = [
    "ERROR_PROMPT",
    "MAX_CHAINED_STEPS",
    "RECORD_END_SLACK_S",
    "RECORD_FAILURE_GRACE_MS",
    "TTS_UNAVAILABLE",
    "VOICEMAIL_GOODBYE",
    "VOICEMAIL_GREETING",
    "VOICEMAIL_MAX_SECS",
    "IllegalTransition",
    "Ivrs",
    "IvrStateError",
    "Step",
    "abort",
    "api_result",
    "asr_result",
    "handle",
    "provider_result",
    "start",
    "tts_result",
]


def _load(state: State, now: float, trigger: str, ivrs: Ivrs | None = None) -> Session:
    envelope, data = state.resume() if isinstance(state, Step) else load(state)
    return Session(envelope, data, now, trigger, EXECUTORS, ivrs)


def start(call: CallInfo, now: float) -> Step:
    """Session start: `/start` notification, then the `session_start` step request."""
    session = Session.new(call, now, "session_start", EXECUTORS)
    session.enter(session.begin(), "start")
    return session.finish()


def handle(
    state: str | dict[str, Any],
    inp: SessionStartInput | MediaInput | CallEndedInput | WaitExpiredInput,
    now: float,
    ivrs: Ivrs | None = None,
) -> Step:
    """A call event: a media event (digit, prompt end, timer, media failure) or hang-up."""
    if isinstance(inp, SessionStartInput):
        # A new session on the same call (e.g. back from a queue): start afresh.
        return start(inp.call, now)
    session = _load(state, now, _input_name(inp), ivrs)
    data = session.data
    assert data is not None
    if data.phase is Phase.DONE:
        return session.finish()  # events after the end are ignored
    session.env.chained_steps = 0
    if isinstance(inp, CallEndedInput):
        return _dispatch(session, InputKind.CALL_ENDED, inp)
    if isinstance(inp, WaitExpiredInput):
        return _dispatch(session, InputKind.WAIT_EXPIRED, inp)
    ev = inp.event
    if isinstance(ev, DtmfDigit):
        return _dispatch(session, InputKind.DIGIT, ev)
    if isinstance(ev, AudioComplete):
        if ev.play_id != data.active_play:
            return session.finish()  # stale: a stopped or replaced prompt
        return _dispatch(session, InputKind.AUDIO_COMPLETE, ev)
    if isinstance(ev, TimerFired):
        if ev.timer_id != data.active_timer:
            return session.finish()  # stale: a cancelled or replaced timer
        return _dispatch(session, InputKind.TIMER, ev)
    if isinstance(ev, MediaFailure):
        if ev.play_id is not None:
            if ev.play_id != data.active_play:
                return session.finish()  # about a prompt we no longer wait for
        elif data.active_play is None and data.active_record is None:
            return session.finish()  # about nothing we still wait for
        return _dispatch(session, InputKind.MEDIA_FAILURE, ev)
    if isinstance(ev, RecordingFinished):
        if ev.record_id != data.active_record:
            return session.finish()  # stale: a stopped recording
        return _dispatch(session, InputKind.RECORDING_FINISHED, ev)
    if isinstance(ev, WsBridgeEnded):
        return session.finish()  # voip_bridge is terminal: the front handles its end
    raise IvrStateError(f"unknown media event {ev!r}")


def provider_result(
    state: State, result: ProviderResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The answer (after the retry policy) to the step request the last Step asked for
    (`state`: that Step, or its state dict)."""
    return _dispatch(_load(state, now, "provider", ivrs), InputKind.PROVIDER_RESULT, result)


def api_result(
    state: State, result: ApiResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The outcome of the `api` request the last Step asked for."""
    return _dispatch(_load(state, now, "api", ivrs), InputKind.API_RESULT, result)


def tts_result(
    state: State, result: TtsResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The outcome of the `tts` request the last Step asked for."""
    return _dispatch(_load(state, now, "tts", ivrs), InputKind.TTS_RESULT, result)


def asr_result(
    state: State, result: AsrResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The outcome of the `asr` request the last Step asked for."""
    return _dispatch(_load(state, now, "asr", ivrs), InputKind.ASR_RESULT, result)


def abort(
    state: str | dict[str, Any] | None, call: CallInfo | None, reason: str, now: float
) -> Step:
    """The shell's last resort after an unexpected error: error prompt, then hang-up.

    Falls back to a bare HangupCommand when the state itself is unusable.
    """
    try:
        if state is not None:
            session = _load(state, now, "internal_error")
        elif call is not None:
            session = Session.new(call, now, "internal_error", EXECUTORS)
        else:
            raise ValueError("no state and no call")
    except Exception:
        hangup = HangupCommand(reason=f"Error({reason})")
        # The state as it was given: nothing here can read it.
        return Step(dumped=state or "{}", commands=[hangup], done=True)
    data = session.data
    if data is not None and data.phase is Phase.DONE:
        return session.finish()
    # Whatever the phase, even CLOSING: release what it holds, play the error prompt.
    session.errors.append(reason)
    if data is not None:
        session.cancel_timer(data.active_timer)
        session.stop_record(data.active_record)
    session.enter(session.close(ERROR_PROMPT, None, f"Error({reason})"), "abort")
    return session.finish()


def _dispatch(session: Session, kind: InputKind, payload: Any) -> Step:
    data = session.data
    assert data is not None
    if data.phase is Phase.DONE:
        return session.finish()
    handler = INPUTS.get((data.phase, kind))
    if handler is None:
        raise IvrStateError(f"input {kind.value!r} not allowed in phase {data.phase.value!r}")
    session.enter(handler(session, data, payload), kind.value)
    return session.finish()


def _input_name(inp: MediaInput | CallEndedInput | WaitExpiredInput) -> str:
    return inp.event.type if isinstance(inp, MediaInput) else inp.type
