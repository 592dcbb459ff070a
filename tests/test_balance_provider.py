"""The balance example provider (examples/balance_provider.py), run as a subprocess and
driven over HTTP; then a whole call through the IVR executor (workers.ivr.handle_event)
against it, with the real text to speech (espeak-ng) and the provider's own balance API."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pbx.config import IvrAppParams
from pbx.ivr.models import parse_action
from pbx.ivr.provider import ProviderClient
from pbx.messages import (
    AudioComplete,
    CallInfo,
    DtmfDigit,
    HangupCommand,
    IvrEvent,
    IvrReply,
    MediaInput,
    PlayCommand,
    QueueCommand,
    RecordCommand,
    RecordingFinished,
    SessionStartInput,
)
from pbx.settings.speech import TtsSettings
from pbx.tts import TtsEngine
from tests.provider_process import provider_process
from workers.ivr import handle_event

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "balance_provider.py"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with provider_process(SCRIPT) as url:
        yield url


def _request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def _step(base: str, sid: str, event: dict, variables: dict | None = None) -> dict:
    status, node = _request(
        base,
        {"session_id": sid, "caller": "1001", "callee": "*98", "variables": variables or {},
         "event": event},
    )  # fmt: skip
    assert status == 200
    assert node["extra"]["flow"] == "balance" and node["step_id"].startswith("balance.")
    parse_action(node)  # every answer is a valid ActionNode
    return node


def _api(node: dict, account: str) -> tuple[int, dict]:
    """Call the api node's URL the way the executor does (GET, variables as query)."""
    assert node["type"] == "api" and node["method"] == "GET"
    assert node["variables"] == "dtmf_input"
    return _request(node["url"] + "?" + urllib.parse.urlencode({"dtmf_input": account}))


def test_balance_flow_message(base_url: str) -> None:
    sid = "b-message"
    assert _request(base_url + "/start", {"session_id": sid, "caller": "1001"})[0] == 200
    node = _step(base_url, sid, {"type": "session_start"})
    assert node["type"] == "prompt" and "account number" in node["tts_text"]
    assert node["interruptible"] is True
    collect = node["next"]
    assert collect["type"] == "collect_dtmf" and collect["terminator"] == "#"
    assert (collect["min_digits"], collect["max_digits"]) == (4, 10)

    node = _step(base_url, sid, {"type": "dtmf", "digit": "1234"}, {"dtmf_input": "1234"})
    assert node["url"] == base_url.split("/ivr/")[0] + "/api/balance"
    status, body = _api(node, "1234")
    assert (status, body["balance"], body["currency"]) == (200, "123.45", "USD")

    node = _step(base_url, sid, {"type": "api_response", "status": status, "body": body})
    assert node["type"] == "prompt"
    assert node["tts_text"] == ("The balance of account 1 2 3 4 is 123 dollars and 45 cents.")
    menu = node["next"]
    assert menu["type"] == "dtmf_menu" and "press 1" in menu["greeting_text"]
    assert menu["entries"]["1"]["type"] == "torecord" and menu["entries"]["1"]["beep"] is True
    assert menu["entries"]["2"] == {"type": "queue", "target": "support"}

    url = "recordings/b-message/20251128_000000.wav"
    node = _step(base_url, sid, {"type": "recording_complete", "url": url, "duration_secs": 7})
    assert node["type"] == "prompt" and "7 seconds" in node["tts_text"]
    assert node["next"] == {"type": "hangup", "prompt": "sounds/goodbye.wav"}
    assert _request(base_url + "/end", {"session_id": sid, "reason": "Normal"})[0] == 200


def test_unknown_account_three_strikes(base_url: str) -> None:
    sid = "b-unknown"
    _step(base_url, sid, {"type": "session_start"})
    for strike in (1, 2, 3):
        node = _step(base_url, sid, {"type": "dtmf", "digit": "4444"})
        status, body = _api(node, "4444")
        assert status == 404
        node = _step(base_url, sid, {"type": "api_response", "status": status, "body": body})
        if strike < 3:
            assert node["type"] == "prompt" and "could not find account 4 4 4 4" in node["tts_text"]
            assert node["next"]["type"] == "collect_dtmf"
    assert node == {**node, "type": "hangup", "prompt": "sounds/goodbye.wav"}


def test_no_digits_service_down_and_tts_error(base_url: str) -> None:
    sid = "b-other"
    _step(base_url, sid, {"type": "session_start"})
    node = _step(base_url, sid, {"type": "dtmf_timeout"})
    assert node["type"] == "prompt" and node["next"]["type"] == "collect_dtmf"
    _step(base_url, sid, {"type": "dtmf", "digit": "1234"})
    node = _step(base_url, sid, {"type": "api_response", "status": 0, "body": {"error": "x"}})
    assert node["type"] == "prompt" and node["next"] == {"type": "queue", "target": "support"}
    node = _step(base_url, sid, {"type": "error", "reason": "TTS service not available"})
    assert {k: node[k] for k in ("type", "target")} == {"type": "queue", "target": "support"}
    node = _step(base_url, sid, {"type": "dtmf_menu_timeout"})
    assert node["type"] == "prompt" and node["next"]["type"] == "dtmf_menu"


def test_balance_api_directly(base_url: str) -> None:
    root = base_url.split("/ivr/")[0]
    assert _request(root + "/api/balance?dtmf_input=98765")[1]["balance_cents"] == 104_210
    assert _request(root + "/api/balance?account=5555")[1]["balance"] == "0.00"
    assert _request(root + "/api/balance")[0] == 400
    assert _request(root + "/health")[1]["status"] == "ok"


# ---------------------------------------------------------------- a whole call


def test_whole_call_through_the_executor(base_url: str, tmp_path: Path) -> None:
    """session_start → TTS prompt (interrupted) → collect 1234# → api → TTS balance →
    TTS menu → 1 → torecord → recording_complete → TTS thanks → goodbye → hang-up."""
    assert shutil.which("espeak-ng"), "espeak-ng is not installed (make tools)"
    sounds = tmp_path / "sounds"
    tts = TtsEngine(TtsSettings(cache_dir=str(sounds / ".tts")), sounds, espeak=True)
    call = CallInfo(
        call_id="c-balance", session_id="s-balance", caller="1001", callee="*98",
        route_name="balance", params=IvrAppParams(url=base_url),
    )  # fmt: skip
    now = 1_764_288_000.0
    seq = 0
    state: str | None = None

    def played(reply: IvrReply) -> PlayCommand:
        plays = [c for c in reply.commands if isinstance(c, PlayCommand)]
        assert plays, reply.commands
        assert (sounds / plays[-1].file).is_file() or plays[-1].file.startswith("sounds/")
        return plays[-1]

    async def main() -> None:
        nonlocal seq, state, now

        async with ProviderClient() as client:

            async def send(inp: Any) -> IvrReply:
                nonlocal seq, state, now
                seq += 1
                now += 1.0
                event = IvrEvent(session_id="s-balance", seq=seq, state=state, input=inp)
                reply = await handle_event(event, client, lambda: now, None, tts)
                state = reply.state
                return reply

            async def media(ev: Any) -> IvrReply:
                return await send(MediaInput(event=ev))

            reply = await send(SessionStartInput(call=call))
            welcome = played(reply)
            assert welcome.file.startswith(".tts/") and welcome.interruptible
            reply = await media(DtmfDigit(digit="1", stopped_play_id=welcome.play_id))
            assert [c.type for c in reply.commands] == ["timer"]
            for d in "234":
                await media(DtmfDigit(digit=d))
            reply = await media(DtmfDigit(digit="#"))
            # collect → provider → api (/api/balance) → provider → TTS → play
            balance = played(reply)
            assert balance.file.startswith(".tts/") and balance.interruptible
            with wave.open(str(sounds / balance.file), "rb") as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
                assert w.getnframes() > 8000 * 2  # a sentence, not a blip
            assert state is not None
            variables = json.loads(state)["variables"]
            assert variables["api_status"] == "200"
            assert json.loads(variables["api_result"])["balance"] == "123.45"

            reply = await media(AudioComplete(play_id=balance.play_id))
            menu = played(reply)  # greeting_text, synthesised
            assert menu.file.startswith(".tts/") and menu.interruptible
            reply = await media(DtmfDigit(digit="1", stopped_play_id=menu.play_id))
            prompt = played(reply)
            assert prompt.file == "sounds/voicemail_greeting.wav"
            reply = await media(AudioComplete(play_id=prompt.play_id))
            (rec,) = reply.commands
            assert isinstance(rec, RecordCommand)
            assert rec.area == "recordings" and rec.beep and rec.max_duration_ms == 60_000
            assert rec.path.startswith("s-balance/2025112") and rec.path.endswith(".wav")

            reply = await media(
                RecordingFinished(
                    record_id=rec.record_id, path=rec.path, duration_ms=6_400, reason="dtmf"
                )
            )
            thanks = played(reply)
            assert thanks.file.startswith(".tts/")
            reply = await media(AudioComplete(play_id=thanks.play_id))
            goodbye = played(reply)
            assert goodbye.file == "sounds/goodbye.wav"
            reply = await media(AudioComplete(play_id=goodbye.play_id))
            assert reply.commands == [HangupCommand(reason="Normal")] and reply.done

            # Same number again, this time to an agent: the TTS files are reused.
            before = sorted(p.name for p in (sounds / ".tts").iterdir())
            state = None
            reply = await send(SessionStartInput(call=call))
            await media(DtmfDigit(digit="1", stopped_play_id=played(reply).play_id))
            for d in "234#":
                reply = await media(DtmfDigit(digit=d))
            balance = played(reply)
            # A key during the balance goes to the chained menu: 2 → the support queue.
            reply = await media(DtmfDigit(digit="2", stopped_play_id=balance.play_id))
            assert reply.commands == [QueueCommand(target="support")] and reply.done
            assert sorted(p.name for p in (sounds / ".tts").iterdir()) == before

    asyncio.run(asyncio.wait_for(main(), 60))
