"""Step-mode IVR actions end to end (issue 4 "Done when"): sipp calls *99 with its RTP
port on a test socket that sends RFC 4733 digits and a tone, the scripted provider
drives the call, and the test watches the provider's requests, the RTP the caller
gets, the files written and /api/traces. After each test the PBX is idle again."""

from __future__ import annotations

import json
import shutil
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from media import g711
from media.prompts import beep
from pbx.settings.speech import TtsSettings
from pbx.tts import cache_name
from tests.e2e.harness import ROOT, PbxSystem, wait_idle, wait_until
from tests.e2e.ivr_calls import (
    TONE_PCM,
    AioServer,
    call,
    event_type,
    script_of,
)

BEEP_WAV = "sounds/beep.wav"  # 0.25 s


@pytest.fixture(autouse=True)
def _idle(system: PbxSystem) -> Iterator[None]:
    wait_idle(system)
    yield
    system.provider.script = system.provider.default_script
    wait_idle(system)


def wav_info(path: Path) -> tuple[float, np.ndarray]:
    """(length in seconds, int16 samples) of a mono 16-bit WAV."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, (w.getparams(), path)
        frames = w.readframes(w.getnframes())
        return w.getnframes() / w.getframerate(), np.frombuffer(frames, "<i2")


def tone_share(samples: np.ndarray) -> float:
    """The share of 20 ms blocks carrying the test tone (RMS near the tone's)."""
    want = float(np.sqrt(np.mean(TONE_PCM.astype(np.float64) ** 2)))
    blocks = samples[: len(samples) // 160 * 160].reshape(-1, 160).astype(np.float64)
    if not len(blocks):
        return 0.0
    rms = np.sqrt(np.mean(blocks**2, axis=1))
    return float(np.mean(np.abs(rms - want) < 0.2 * want))


# ---------------------------------------------------------------- 1. collect_dtmf


def test_collect_dtmf_terminator_then_timeout(system: PbxSystem, workdir: Path) -> None:
    """`1234#` ends the first collection on the terminator: one dtmf{"1234"}, and
    dtmf_input=1234 on the request after it. A second collection gets 2 of its 4
    digits: dtmf_timeout, with the partial digits in dtmf_input."""
    collect = {"type": "collect_dtmf", "min_digits": 4, "max_digits": 6, "terminator": "#",
               "timeout_ms": 4000, "prompt": BEEP_WAV}

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        kind = event_type(body)
        if kind == "session_start":
            return collect
        if kind == "dtmf":
            return {"type": "prompt", "file": BEEP_WAV}
        if kind == "audio_complete":
            return {**collect, "timeout_ms": 1200, "prompt": None}
        return None  # dtmf_timeout: hang up

    system.provider.script = script_of(steps)
    with call(system, workdir) as caller:
        caller.wait_step("session_start")
        time.sleep(0.5)  # the prompt (0.25 s) is over: digits go to the collection
        caller.send_digits("1234#")
        caller.wait_step("audio_complete")
        caller.send_digits("12")
        caller.wait_ended()

    kinds = [event_type(r.body) for r in caller.steps()]
    assert kinds == ["session_start", "dtmf", "audio_complete", "dtmf_timeout"], kinds
    dtmf, after, timeout = caller.steps()[1:]
    assert dtmf.body["event"] == {"type": "dtmf", "digit": "1234"}
    assert dtmf.body["variables"]["dtmf_input"] == "1234"
    assert after.body["variables"]["dtmf_input"] == "1234"
    assert timeout.body["event"] == {"type": "dtmf_timeout"}
    assert timeout.body["variables"]["dtmf_input"] == "12"
    # The inter-digit timeout (1.2 s) ran from the last digit, not from the first.
    assert timeout.at - after.at >= 1.2 + 0.1


# ---------------------------------------------------------------- 2. input_phone


def test_input_phone_eleven_digits(system: PbxSystem, workdir: Path) -> None:
    number = "13800138000"

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        if event_type(body) == "session_start":
            return {"type": "input_phone", "prompt": BEEP_WAV, "timeout_ms": 4000}
        return None

    system.provider.script = script_of(steps)
    with call(system, workdir) as caller:
        caller.wait_step("session_start")
        time.sleep(0.4)
        caller.send_digits(number, press_ms=60, gap_s=0.06)
        collected = caller.wait_step("phone_collected")
        caller.wait_ended()

    assert collected.body["event"] == {"type": "phone_collected", "number": number}
    assert collected.body["variables"]["phone_number"] == number
    kinds = [event_type(r.body) for r in caller.steps()]
    assert kinds == ["session_start", "phone_collected"], kinds


# ---------------------------------------------------------------- 3. torecord


def test_torecord_until_pound(system: PbxSystem, workdir: Path) -> None:
    """The caller talks ~2 s then presses #: recording_complete{url, duration_secs},
    and the WAV under recordings/<session id>/ is as long as what was recorded."""

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        if event_type(body) == "session_start":
            return {"type": "torecord", "beep": False, "max_duration_secs": 20}
        return None

    system.provider.script = script_of(steps)
    with call(system, workdir) as caller:
        started = caller.wait_step("session_start")
        time.sleep(0.2)
        caller.talk(2.0)
        pound_at = time.monotonic()
        caller.send_digits("#")
        complete = caller.wait_step("recording_complete")
        caller.wait_ended()

    session_id = started.body["session_id"]
    event = complete.body["event"]
    recorded = pound_at - started.at  # the recording starts when the answer comes back
    url = event["url"]
    assert url.startswith(f"recordings/{session_id}/") and url.endswith(".wav"), url
    assert abs(event["duration_secs"] - recorded) <= 1.0, (event, recorded)
    path = system.root / url
    assert path.is_file(), sorted((system.root / "recordings").rglob("*"))
    assert path.parent == system.root / "recordings" / session_id
    length, samples = wav_info(path)
    assert abs(length - recorded) <= 0.5, f"WAV {length:.2f} s, recorded {recorded:.2f} s"
    # The caller's tone is in it: most of the file (it starts ~0.2 s before the talk).
    assert tone_share(samples) >= 0.7, tone_share(samples)
    assert complete.body["variables"]["recording_url"] == url


# ---------------------------------------------------------------- 4. api


def test_api_get_then_post(system: PbxSystem, workdir: Path) -> None:
    """GET sends the named variables in the query, POST as a JSON body; the provider
    gets api_response{status, body} each time, and api_status / api_result after."""
    seen: list[tuple[str, str, dict[str, str], Any]] = []

    async def balance(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, dict(request.query), None))
        return web.json_response({"balance": 100, "query": dict(request.query)})

    async def charge(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.method, request.path, dict(request.query), body))
        return web.json_response({"charged": True, "got": body}, status=201)

    app = web.Application()
    app.router.add_get("/balance", balance)
    app.router.add_post("/charge", charge)
    server = AioServer(app)

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        kind = event_type(body)
        variables = body["variables"]
        if kind == "session_start":
            return {"type": "api", "url": server.url("/balance"), "method": "GET",
                    "variables": "caller,session_id", "timeout": 5}
        if kind == "api_response" and "balance" in body["event"]["body"]:
            return {"type": "api", "url": server.url("/charge"), "method": "POST",
                    "variables": "caller,api_status", "timeout": 5}
        if kind == "api_response":
            return {"type": "prompt", "file": BEEP_WAV}
        if kind == "audio_complete" and variables.get("api_status") == "201":
            return None
        return {"type": "hangup", "step_id": "unexpected"}

    system.provider.script = script_of(steps)
    try:
        with call(system, workdir) as caller:
            session_id = caller.session_id
            caller.wait_ended()
    finally:
        server.close()

    kinds = [event_type(r.body) for r in caller.steps()]
    assert kinds == ["session_start", "api_response", "api_response", "audio_complete"], kinds
    _, got, posted, after = caller.steps()
    caller_number = got.body["caller"]
    assert seen[0] == ("GET", "/balance", {"caller": caller_number, "session_id": session_id},
                       None)
    assert got.body["event"] == {"type": "api_response", "status": 200, "body": {
        "balance": 100, "query": {"caller": caller_number, "session_id": session_id}}}
    assert got.body["variables"]["api_status"] == "200"
    assert json.loads(got.body["variables"]["api_result"])["balance"] == 100

    assert seen[1] == ("POST", "/charge", {}, {"caller": caller_number, "api_status": "200"})
    assert posted.body["event"]["status"] == 201
    assert posted.body["event"]["body"] == {"charged": True, "got": seen[1][3]}
    # The step after the last api call still carries its outcome.
    assert after.body["variables"]["api_status"] == "201"
    assert json.loads(after.body["variables"]["api_result"]) == posted.body["event"]["body"]


# ---------------------------------------------------------------- 5. jump_ivr


def test_jump_ivr_to_second_ivr_with_params(system: PbxSystem, workdir: Path) -> None:
    def steps(path: str, body: Any) -> dict[str, Any] | None:
        if path == "/ivr/step" and event_type(body) == "session_start":
            return {"type": "jump_ivr", "route_point": "second",
                    "params": {"lang": "fr", "origin": "$caller$-main"}}
        if path == "/second" and event_type(body) == "session_start":
            return {"type": "prompt", "file": BEEP_WAV}
        return None

    system.provider.script = script_of(steps)
    with call(system, workdir) as caller:
        caller.wait_step("audio_complete", path="/second")
        caller.wait_ended()
        wait_until(lambda: [r for r in caller.requests() if r.path == "/second/end"], 5,
                   "/second/end")

    paths = [r.path for r in caller.requests()]
    order = ["/ivr/step/start", "/ivr/step", "/ivr/step/end", "/second/start", "/second",
             "/second", "/second/end"]
    # Notifications are fire-and-forget: only the steps' order is certain.
    assert sorted(paths) == sorted(order), paths
    assert [r.path for r in caller.steps("/ivr/step") + caller.steps("/second")] == [
        p for p in paths if p in ("/ivr/step", "/second")]
    by_path = {r.path: r for r in caller.requests()}
    assert by_path["/ivr/step/end"].body["reason"] == "Jump(second)"
    start2 = by_path["/second/start"].body
    assert start2["ivr_id"] == "ivr-second"
    first_step = caller.steps("/second")[0].body
    assert first_step["event"] == {"type": "session_start"}
    assert first_step["ivr_id"] == "ivr-second"
    variables = first_step["variables"]
    assert variables["lang"] == "fr"
    # Params are substituted from the first IVR's variables when the jump executes.
    assert variables["origin"] == f"{first_step['caller']}-main"
    assert variables["session_id"] == first_step["session_id"]
    assert by_path["/second/end"].body["reason"] == "Normal"


# ---------------------------------------------------------------- 6. voicemail


def test_voicemail_greeting_beep_message_and_record(system: PbxSystem, workdir: Path) -> None:
    def steps(path: str, body: Any) -> dict[str, Any] | None:
        if event_type(body) == "session_start":
            return {"type": "voicemail", "target": "1001", "greeting": BEEP_WAV}
        return None

    system.provider.script = script_of(steps)
    mailbox = system.root / "voicemail" / "1001"
    before = set(mailbox.glob("*.wav")) if mailbox.exists() else set()
    with call(system, workdir) as caller:
        session_id = caller.session_id
        rtp = caller.rtp
        # Greeting (0.25 s) and beep (0.25 s) reach the caller, then silence.
        wait_until(lambda: len(rtp.audio(0)) >= 22, 10, "greeting and beep RTP")
        wait_until(lambda: time.monotonic() - rtp.audio(0)[-1].at > 0.3, 5,
                   "the beep to end")
        greeting_and_beep = rtp.audio(0)
        beep_end = greeting_and_beep[-1].at
        talk_start = time.monotonic()
        caller.talk(1.5)
        pound_at = time.monotonic()
        caller.send_digits("#")
        caller.wait_ended()

    heard = b"".join(p.payload for p in greeting_and_beep)
    beep_codes = bytes(beep("PCMU"))
    assert beep_codes[160:-160] in heard, "the recording beep was not played"
    assert len(greeting_and_beep) <= 30, len(greeting_and_beep)
    # After the message: goodbye.wav (2.5 s) before the PBX's BYE.
    after = [p for p in rtp.audio(0) if p.at > pound_at]
    assert len(after) >= 100, f"{len(after)} packets of goodbye"

    wavs = wait_until(lambda: set(mailbox.glob("*.wav")) - before, 5, "the voicemail WAV")
    assert len(wavs) == 1, wavs
    wav = wavs.pop()
    assert wav.name.endswith(f"_{session_id}.wav"), wav.name
    record_path = wav.with_name(wav.name + ".json")
    record = wait_until(lambda: record_path.exists() and json.loads(record_path.read_text()),
                        5, "the voicemail's JSON record")
    assert record["target"] == "1001" and record["session_id"] == session_id
    assert record["caller"] == "1002"  # uac_wait_bye.xml's From
    recorded = pound_at - beep_end
    assert abs(record["duration_ms"] / 1000 - recorded) <= 0.5, (record, recorded)
    length, samples = wav_info(wav)
    assert abs(length - record["duration_ms"] / 1000) <= 0.05, (length, record)
    talked = (pound_at - talk_start) / length
    assert tone_share(samples) >= 0.8 * talked, (tone_share(samples), talked)
    steps_seen = [event_type(r.body) for r in caller.steps()]
    assert steps_seen == ["session_start"], steps_seen
    end = wait_until(lambda: [r for r in caller.requests() if r.path == "/ivr/step/end"], 5,
                     "/end")
    assert end[0].body["reason"] == "Voicemail(1001)"


# ---------------------------------------------------------------- 7. voip_bridge


def test_voip_bridge_echo_then_server_closes(system: PbxSystem, workdir: Path) -> None:
    """The caller's audio goes to a WebSocket as PCM16 and the echo comes back to the
    caller as RTP; when the server closes, the PBX ends the call with BYE."""
    frames: list[bytes] = []
    handshake: dict[str, str] = {}

    async def room(request: web.Request) -> web.WebSocketResponse:
        handshake.update(request.headers)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                frames.append(msg.data)
                await ws.send_bytes(msg.data)
                if sum(len(f) for f in frames) >= 2 * 8000 * 2:  # 2 s of audio
                    break
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/room", room)
    server = AioServer(app)

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        if event_type(body) == "session_start":
            return {"type": "voip_bridge", "create_room_uri": server.url("/room", "ws"),
                    "headers": {"X-Room": "$caller$-room"}, "timeout_ms": 3000}
        return None

    system.provider.script = script_of(steps)
    payload = bytes([0x3C]) * 160
    try:
        with call(system, workdir) as caller:
            wait_until(lambda: handshake, 10, "the WebSocket connection")
            sent_at = time.monotonic()
            caller.talk(3.0, payload)  # the server closes after 2 s of it
            caller.wait_ended()
    finally:
        server.close()

    assert handshake.get("X-Room") == "1002-room", handshake
    pcm = np.frombuffer(b"".join(frames), "<i2")
    expected = int(g711.decode(np.frombuffer(payload[:1], np.uint8), "PCMU")[0])
    assert len(pcm) >= 2 * 8000 and np.all(pcm == expected), np.unique(pcm)[:10]
    echoed = [p for p in caller.rtp.audio(0) if p.at >= sent_at and p.payload == payload]
    assert len(echoed) >= 75, f"only {len(echoed)} of ~100 packets came back"
    end = wait_until(lambda: [r for r in caller.requests() if r.path == "/ivr/step/end"], 5,
                     "/end")
    assert end[0].body["reason"] == "VoipBridge"


# ---------------------------------------------------------------- 8. tts_text


def test_tts_text_prompt_with_espeak(system: PbxSystem, workdir: Path) -> None:
    """A short sentence synthesised by espeak-ng (no `[tts] url` configured) and played:
    the caller gets more than 0.5 s of non-silent RTP, the trace has no error."""
    assert shutil.which("espeak-ng"), "espeak-ng is not installed"
    text = "Your balance is one hundred."
    # Not from an earlier run's cache: this call synthesises it.
    cached = ROOT / TtsSettings().cache_dir / cache_name(text, TtsSettings().voice)
    cached.unlink(missing_ok=True)

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        if event_type(body) == "session_start":
            return {"type": "prompt", "tts_text": text, "step_id": "tts-1"}
        return None

    system.provider.script = script_of(steps)
    with call(system, workdir) as caller:
        session_id = caller.session_id
        done = caller.wait_step("audio_complete")
        caller.wait_ended()

    audio = [p for p in caller.rtp.audio(0) if p.at <= done.at]
    assert len(audio) >= 25, f"{len(audio)} packets: less than 0.5 s of speech"
    assert audio[-1].at - audio[0].at >= 0.5
    pcm = g711.decode(np.frombuffer(b"".join(p.payload for p in audio), np.uint8), "PCMU")
    assert np.abs(pcm.astype(np.int32)).max() > 1000, "the speech is silent"
    assert done.body["event"] == {"type": "audio_complete", "interrupted": False}
    assert cached.is_file() and cached.read_bytes()[:4] == b"RIFF", cached
    traces = wait_until(lambda: system.admin(f"/api/traces/{session_id}"), 5, "traces")
    tts_step = [t for t in traces if t.get("step_id") == "tts-1"]
    assert tts_step and tts_step[0]["action_type"] == "prompt", traces
    assert all(t.get("error") is None for t in traces), traces


# ---------------------------------------------------------------- 10. traces


def test_traces_of_a_multi_step_call(system: PbxSystem, workdir: Path) -> None:
    """Every step in /api/traces/{session_id} has step_id, step_name and the latest
    `extra`, echoed in the steps after it until the provider replaces it."""

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        n = len([r for r in system.provider.for_session(body["session_id"])
                 if r.path == "/ivr/step"])
        if n == 1:
            return {"type": "prompt", "file": BEEP_WAV, "step_id": "s1",
                    "step_name": "first", "extra": {"flow": "t10", "n": 1}}
        if n == 2:
            return {"type": "prompt", "file": BEEP_WAV, "step_id": "s2",
                    "step_name": "second"}
        if n == 3:
            return {"type": "prompt", "file": BEEP_WAV, "step_id": "s3",
                    "step_name": "third", "extra": {"flow": "t10", "n": 3}}
        return {"type": "hangup", "step_id": "s4", "step_name": "bye"}

    system.provider.script = script_of(steps)
    with call(system, workdir) as caller:
        session_id = caller.session_id
        caller.wait_ended()

    def finished() -> list[dict[str, Any]] | None:
        got: list[dict[str, Any]] = system.admin(f"/api/traces/{session_id}")
        return got if got and any(t.get("end_reason") for t in got) else None

    traces = wait_until(finished, 5, "the traces with the end")
    assert [t["step_index"] for t in traces] == list(range(1, len(traces) + 1))
    by_id = {t["step_id"]: t for t in traces}
    assert list(by_id) == ["s1", "s2", "s3", "s4"], [t["step_id"] for t in traces]
    assert [by_id[s]["step_name"] for s in by_id] == ["first", "second", "third", "bye"]
    assert by_id["s1"]["extra"] == {"flow": "t10", "n": 1}
    assert by_id["s2"]["extra"] == {"flow": "t10", "n": 1}  # echoed: not replaced
    assert by_id["s3"]["extra"] == {"flow": "t10", "n": 3}
    assert by_id["s4"]["extra"] == {"flow": "t10", "n": 3}
    assert [t["trigger"] for t in traces] == ["session_start"] + ["audio_complete"] * 3
    assert [t["action_type"] for t in traces] == ["prompt"] * 3 + ["hangup"]
    assert traces[-1]["end_reason"] == "Normal"
    assert all(t["error"] is None for t in traces), traces
    # Each trace carries the request and the answer the provider gave to it.
    assert traces[1]["action"]["step_id"] == "s2"
    assert traces[1]["request"]["event"] == {"type": "audio_complete", "interrupted": False}
