"""Random walks through the step-mode machine: random provider answers (every action
type, nested `next`/entries, broken ones), random media events (current and stale
ids), hang-ups, lost waits, restarts and aborts, on a virtual clock.

`walk(module, rng)` drives any module with the machine's entry points (`start`,
`handle`, `provider_result`, `api_result`, `tts_result`, `asr_result`, `abort`) and reports every
call as a `Move`: what went in and what came out. Deterministic for a seeded `rng`,
so a test can assert what a fixed set of walks reaches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from pbx.config import IvrAppParams
from pbx.ivr.requests import ApiResult, AsrResult, ProviderResult, TtsResult
from pbx.messages import (
    AudioComplete,
    CallEndedInput,
    CallInfo,
    DtmfDigit,
    MediaFailure,
    MediaInput,
    PlayCommand,
    RecordCommand,
    RecordingFinished,
    SessionStartInput,
    TimerCommand,
    TimerFired,
    WaitExpiredInput,
    WsBridgeEnded,
)

URL = "http://provider.test/ivr/step"
OTHER_URL = "http://other.test/ivr/step"
IVRS = {"other": IvrAppParams(url=OTHER_URL, ivr_id="other")}
DIGITS = "0123#*"


def make_call() -> CallInfo:
    return CallInfo(
        call_id="call-w",
        session_id="sess-w",
        caller="1001",
        callee="*99",
        route_name="step_ivr",
        params=IvrAppParams(url=URL, ivr_id="main"),
        sip_headers={"X-Customer": "gold"},
    )


# ---------------------------------------------------------------- random actions


def _prompt_file(rng: random.Random) -> dict[str, Any]:
    kind = rng.random()
    if kind < 0.6:
        return {"file": rng.choice(["sounds/a.wav", "sounds/$caller$.wav"])}
    if kind < 0.9:
        return {"tts_text": "hello $caller$", "tts_voice": rng.choice([None, "v1"])}
    return {}


def random_action(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """One ActionNode as JSON; mostly valid, sometimes not (the machine must say so)."""
    deeper = depth < 2

    def nested() -> dict[str, Any] | None:
        return random_action(rng, depth + 1) if deeper and rng.random() < 0.5 else None

    kind = rng.choice(
        [
            "prompt", "prompt", "dtmf_menu", "dtmf_menu", "collect_dtmf", "collect_dtmf",
            "input_phone", "api", "api", "torecord", "torecord", "voicemail", "transfer", "queue",
            "route_to_agent", "voip_bridge", "hangup", "play_and_hangup", "jump_ivr",
            "input_voice", "broken", "menu_with_notices", "menu_with_notices",
        ]
    )
    action: dict[str, Any]
    if kind == "prompt":
        action = {"type": "prompt", "interruptible": rng.random() < 0.5, **_prompt_file(rng)}
    elif kind == "dtmf_menu":
        action = {"type": "dtmf_menu", "timeout_ms": rng.choice([0, 3000]),
                  "max_retries": rng.choice([0, 1, 3])}
        greeting = rng.random()
        if greeting < 0.5:
            action["greeting"] = "sounds/menu.wav"
        elif greeting < 0.8:
            action["greeting_text"] = "press one"
        if rng.random() < 0.9:
            action["entries"] = {
                d: (random_action(rng, depth + 1) if deeper else {"type": "hangup"})
                for d in rng.sample("0123", rng.randint(1, 3))
            }
        for name in ("timeout_action", "invalid_action"):
            if rng.random() < 0.6:
                action[name] = (
                    {"type": "prompt", "interruptible": rng.random() < 0.5, **_prompt_file(rng)}
                    if rng.random() < 0.7
                    else random_action(rng, depth + 1) if deeper else {"type": "hangup"}
                )
    elif kind == "menu_with_notices":
        # A menu that plays its invalid/timeout actions as notices, its entries anything.
        notice = {"type": "prompt", "file": "sounds/notice.wav",
                  "interruptible": rng.random() < 0.5}
        action = {"type": "dtmf_menu", "max_retries": 3,
                  "invalid_action": notice, "timeout_action": notice,
                  "entries": {d: random_action(rng, depth + 1) for d in rng.sample("0123", 2)}}
        if rng.random() < 0.6:
            action["greeting"] = "sounds/menu.wav"
    elif kind in ("collect_dtmf", "input_phone"):
        action = {"type": kind, "min_digits": rng.choice([0, 1, 2]),
                  "max_digits": rng.choice([1, 1, 2, 3]), "timeout_ms": rng.choice([0, 4000])}
        if rng.random() < 0.6:
            action["terminator"] = rng.choice(["#", None])
        if rng.random() < 0.6:
            action["prompt"] = "sounds/enter.wav"
    elif kind == "api":
        action = {"type": "api", "url": "http://api.test/$caller$",
                  "method": rng.choice(["GET", "post", " "]),
                  "variables": rng.choice(["caller,dtmf_input", "nope", None, {"x": 1}]),
                  "get_dynamic_tree": rng.random() < 0.4}
    elif kind == "torecord":
        action = {"type": "torecord", "beep": rng.random() < 0.5,
                  "max_duration_secs": rng.choice([None, 0, 5, 99999])}
        if rng.random() < 0.5:
            action["prompt"] = "sounds/speak.wav"
    elif kind == "voicemail":
        action = {"type": "voicemail", "target": rng.choice(["2001", "../x"])}
        if rng.random() < 0.3:
            action["greeting"] = "sounds/vm.wav"
    elif kind in ("transfer", "queue", "route_to_agent"):
        action = {"type": kind, "target": "2001"}
    elif kind == "voip_bridge":
        action = {"type": "voip_bridge", "create_room_uri": "ws://room.test",
                  "timeout_ms": rng.choice([0, 1000])}
    elif kind == "hangup":
        action = {"type": "hangup"}
        if rng.random() < 0.5:
            action["prompt"] = "sounds/bye.wav"
    elif kind == "play_and_hangup":
        action = {"type": "play_and_hangup", "code": rng.choice([None, 486])}
        if rng.random() < 0.7:
            action["prompt"] = "sounds/bye.wav"
    elif kind == "jump_ivr":
        action = {"type": "jump_ivr", "route_point": rng.choice(["other", "missing"]),
                  "params": {"from": "$caller$"}}
    elif kind == "input_voice":
        action = {"type": "input_voice", "scene": "s"}
    else:
        action = rng.choice([{"type": "menu"}, {"type": "nope"}, {"type": "transfer"}, {}])
    if kind not in ("broken", "api") and rng.random() < 0.2:
        action["variables"] = {"v": rng.choice(["1", "$dtmf_input$"])}
    if rng.random() < 0.2:
        action["step_id"] = f"s{depth}"
        action["extra"] = {"n": depth}
    if kind in ("prompt", "collect_dtmf", "input_phone", "api", "torecord"):
        follow = nested()
        if follow is not None:
            action["next"] = follow
    return action


def random_provider_result(rng: random.Random) -> ProviderResult:
    roll = rng.random()
    if roll < 0.06:
        return ProviderResult("fallback", reason="HTTP 503")
    if roll < 0.1:
        return ProviderResult("invalid", reason="not JSON")
    if roll < 0.13:
        return ProviderResult("ok", body=["not", "an", "object"], status=200)
    return ProviderResult("ok", body=random_action(rng), status=200)


def random_api_result(rng: random.Random) -> ApiResult:
    roll = rng.random()
    if roll < 0.2:
        return ApiResult(0, {"error": "connect failed"})
    if roll < 0.3:
        return ApiResult(500, "oops")
    if roll < 0.65:
        return ApiResult(200, random_action(rng))
    return ApiResult(200, {"balance": "1.00"})


def random_tts_result(rng: random.Random) -> TtsResult:
    if rng.random() < 0.25:
        return TtsResult(error="TTS service not available")
    return TtsResult(file=".tts/x.wav", source="walk")


def random_asr_result(rng: random.Random) -> AsrResult:
    roll = rng.random()
    if roll < 0.25:
        return AsrResult(error="ASR service not available")
    if roll < 0.4:
        return AsrResult(source="none")
    return AsrResult(text="yes", confidence=0.8, source="walk")


# One action beginning in each phase...
FIRST_PHASES: list[dict[str, Any]] = [
    {"type": "prompt", "file": "sounds/a.wav"},
    {"type": "prompt", "tts_text": "hello"},
    {"type": "dtmf_menu", "greeting": "sounds/menu.wav", "entries": {"1": {"type": "hangup"}}},
    {"type": "dtmf_menu", "entries": {"1": {"type": "hangup"}}},
    {"type": "dtmf_menu", "entries": {"1": {"type": "hangup"}},
     "invalid_action": {"type": "prompt", "file": "sounds/invalid.wav"}},
    {"type": "collect_dtmf", "prompt": "sounds/enter.wav", "max_digits": 1},
    {"type": "collect_dtmf", "max_digits": 1},
    {"type": "api", "url": "http://api.test/"},
    {"type": "torecord", "prompt": "sounds/speak.wav"},
    {"type": "torecord"},
    {"type": "voicemail", "target": "2001"},
    {"type": "hangup", "prompt": "sounds/bye.wav"},
    {"type": "transfer", "target": "2001"},
    {"type": "input_voice", "scene": "s"},
]


def _containers(leaf: dict[str, Any]) -> list[dict[str, Any]]:
    """...and the actions whose phases hand over to it."""
    return [
        leaf,
        {"type": "prompt", "file": "sounds/p.wav", "interruptible": True, "next": leaf},
        {"type": "prompt", "file": "sounds/p.wav", "next": leaf},
        *(
            {"type": "dtmf_menu", "greeting": "sounds/menu.wav", "entries": {"1": leaf, "2": leaf},
             "invalid_action": notice, "timeout_action": notice}
            for notice in (
                {"type": "prompt", "file": "sounds/notice.wav"},
                {"type": "prompt", "file": "sounds/notice.wav", "interruptible": True},
            )
        ),
        {"type": "dtmf_menu", "entries": {"1": leaf}, "timeout_action": leaf},
        {"type": "collect_dtmf", "prompt": "sounds/enter.wav", "min_digits": 1, "max_digits": 1,
         "next": leaf},
        {"type": "collect_dtmf", "min_digits": 1, "max_digits": 2, "next": leaf},
        {"type": "torecord", "next": leaf},
        {"type": "api", "url": "http://api.test/", "next": leaf},
    ]


# Provider answers that take a session through every pair of phases an action and what
# follows it can make (a walk's first answer; see `walk(first_answer=...)`).
STRUCTURED_ANSWERS: list[dict[str, Any]] = [
    action for leaf in FIRST_PHASES for action in _containers(leaf)
]


# ---------------------------------------------------------------- the walk


@dataclass
class Move:
    """One entry-point call: its name, the state and the input it was given, what it
    returned (or the exception it raised)."""

    entry: str
    state_in: dict[str, Any] | None
    payload: Any
    now: float
    step: Any = None
    error: Exception | None = None


@dataclass
class _Ids:
    """The latest ids the machine issued, read from its commands (for current events)."""

    play: int = 0
    timer: int = 0
    record: int = 0
    record_path: str = "x.wav"

    def learn(self, commands: list[Any]) -> None:
        for c in commands:
            if isinstance(c, PlayCommand):
                self.play = c.play_id
            elif isinstance(c, TimerCommand) and c.delay_ms > 0:
                self.timer = c.timer_id
            elif isinstance(c, RecordCommand):
                self.record, self.record_path = c.record_id, c.path


def _random_input(rng: random.Random, ids: _Ids, call: CallInfo, answer_awaited: bool) -> Any:
    def some(current: int) -> int:
        return current if rng.random() < 0.85 else rng.choice([current - 1, current + 1, 0])

    roll = rng.random()
    if answer_awaited:
        roll = rng.choice([roll, 0.85, 0.9, 0.95])  # wait expired, call ended, abort
    if roll < 0.36:
        stopped = rng.choice([None, None, ids.play, ids.play - 1])
        return MediaInput(event=DtmfDigit(digit=rng.choice(DIGITS), stopped_play_id=stopped))
    if roll < 0.58:
        return MediaInput(event=AudioComplete(play_id=some(ids.play)))
    if roll < 0.71:
        return MediaInput(event=TimerFired(timer_id=some(ids.timer)))
    if roll < 0.76:
        play_id = rng.choice([None, ids.play, ids.play + 5])
        return MediaInput(event=MediaFailure(reason="no such file", play_id=play_id))
    if roll < 0.83:
        return MediaInput(
            event=RecordingFinished(
                record_id=some(ids.record), path=ids.record_path,
                duration_ms=rng.choice([0, 1400, 9000]),
                reason=rng.choice(["dtmf", "max_duration", "error", "speech_end", "no_speech"]),
            )
        )
    if roll < 0.84:
        return MediaInput(event=WsBridgeEnded(reason="closed by peer"))
    if roll < 0.89:
        return WaitExpiredInput(waited_ms=rng.choice([1, 60000]))
    if roll < 0.92:
        return CallEndedInput(reason=rng.choice(["Hangup", "Cancel"]))
    if roll < 0.93:
        return SessionStartInput(call=call)
    if roll < 0.96:
        return "abort"
    return MediaInput(event=DtmfDigit(digit=rng.choice("12")))  # a menu entry, mostly


def walk(
    machine: Any,
    rng: random.Random,
    *,
    max_moves: int = 40,
    first_answer: dict[str, Any] | None = None,
) -> list[Move]:
    """One session from start until done (or `max_moves` calls); the state crosses a
    JSON round trip between calls, as it does over ZeroMQ. `first_answer` is the
    provider's answer to `session_start` (else a random one)."""
    call = make_call()
    now = 1000.0
    moves: list[Move] = []
    ids = _Ids()

    def record(move: Move, previous: dict[str, Any] | None) -> dict[str, Any] | None:
        moves.append(move)
        if move.step is None:
            return previous  # refused: the session goes on from the state it had
        ids.learn(move.step.commands)
        state: dict[str, Any] = orjson.loads(orjson.dumps(move.step.state))
        return state

    if rng.random() < 0.01:
        # The executor failed before the session started.
        first = Move("abort", None, call, now, machine.abort(None, call, "internal error", now))
    else:
        first = Move("start", None, call, now, machine.start(call, now))
    state = record(first, None)
    step = first.step
    while len(moves) < max_moves and state is not None:
        now += rng.choice([0.04, 0.5, 3.0])
        request = step.pending_request
        if step.done and rng.random() < 0.7:
            break
        if request is not None and rng.random() < 0.9:
            if request.kind == "tts":
                move = _call(machine, "tts_result", state, random_tts_result(rng), now)
            elif request.kind == "asr":
                move = _call(machine, "asr_result", state, random_asr_result(rng), now)
            elif request.kind == "api":
                move = _call(machine, "api_result", state, random_api_result(rng), now)
            else:
                answer = random_provider_result(rng)
                if first_answer is not None:
                    answer, first_answer = ProviderResult("ok", first_answer, status=200), None
                move = _call(machine, "provider_result", state, answer, now)
        elif request is not None and rng.random() < 0.3:
            # An answer of the wrong kind (a bug in the shell): refused.
            entry, payload = rng.choice([
                ("tts_result", TtsResult(file="x.wav")),
                ("asr_result", AsrResult(text="no")),
                ("api_result", ApiResult(200, {})),
                ("provider_result", ProviderResult("ok", body={"type": "hangup"})),
            ])
            move = _call(machine, entry, state, payload, now)
        else:
            # A call event; while an answer is awaited, mostly what the front may send
            # then (the caller hanging up, its watchdog) and the shell's abort.
            inp = _random_input(rng, ids, call, answer_awaited=request is not None)
            if inp == "abort":
                move = Move("abort", state, call, now)
                move.step = machine.abort(state, call, "internal error: walk", now)
            else:
                move = _call(machine, "handle", state, inp, now)
        state = record(move, state)
        if move.step is not None:
            step = move.step
    return moves


def _call(machine: Any, entry: str, state: dict[str, Any], payload: Any, now: float) -> Move:
    move = Move(entry, state, payload, now)
    try:
        move.step = getattr(machine, entry)(state, payload, now, ivrs=IVRS)
    except Exception as exc:  # the machine refusing an input is part of the walk
        move.error = exc
    return move
