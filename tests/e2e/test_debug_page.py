"""The /debug trace viewer in a real browser (issue 11, item 6): Debian's headless
Chromium opens the page of a real system that has `[admin] token` set, sipp calls `*99`
while it is open, and the test reads what the page shows: a live call row that appears
and goes, a session's timeline with each step's event, action and timing as
/api/traces has them, and a provider's HTTP 500 as an error row. The token reaches the
page through a URL fragment and never appears in a URL the browser requested nor in
the system's logs. The screenshot in docs/img/debug-page.png comes from this test
(written there when PBX_DEBUG_SCREENSHOT names the file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    Sipp,
    free_port,
    start_sipp,
    start_system,
    wait_until,
)
from tests.e2e.webdriver import Browser

TOKEN = "debug-page-token-5f3a9c"
OK: Reply = (200, b'{"status":"ok"}', 0.0)
NOTIFY_SUFFIXES = ("/start", "/end", "/dtmf-match")


def action(body: dict[str, Any]) -> Reply:
    return 200, json.dumps(body).encode(), 0.0


def three_steps(path: str, body: Any) -> Reply:
    """session_start → welcome prompt → goodbye prompt → hang up."""
    if path.endswith(NOTIFY_SUFFIXES):
        return OK
    index = (body.get("variables") or {}).get("dp_step", "0")
    if (body.get("event") or {}).get("type") == "session_start":
        return action({"type": "prompt", "file": "sounds/welcome.wav", "step_id": "dp-welcome",
                       "step_name": "welcome", "variables": {"dp_step": "1"}})
    if index == "1":
        return action({"type": "prompt", "file": "sounds/goodbye.wav", "step_id": "dp-bye",
                       "step_name": "goodbye", "variables": {"dp_step": "2"}})
    return action({"type": "hangup", "step_id": "dp-end", "step_name": "end"})


def failing_second_step(path: str, body: Any) -> Reply:
    """session_start → a beep; then the provider answers HTTP 500 (retried, then the
    PBX's error prompt and hang-up)."""
    if path.endswith(NOTIFY_SUFFIXES):
        return OK
    if (body.get("event") or {}).get("type") == "session_start":
        return action({"type": "prompt", "file": "sounds/beep.wav", "step_id": "dp-beep",
                       "step_name": "beep"})
    return 500, b"provider exploded", 0.0


@pytest.fixture(scope="module")
def token_system(tmp_path_factory: pytest.TempPathFactory, provider: ScriptedProvider
                 ) -> Iterator[PbxSystem]:
    s = start_system(tmp_path_factory.mktemp("pbx-debug"), provider, admin_token=TOKEN)
    yield s
    s.stop()


def call_star99(system: PbxSystem, workdir: Path) -> tuple[Sipp, RtpEndpoint]:
    rtp = RtpEndpoint()
    caller = start_sipp("caller", [
        "-sf", str(SCENARIOS / "uac_wait_bye.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(rtp.port),
        "-m", "1", "-l", "1",
    ], workdir)
    return caller, rtp


LIVE_ROWS = """return [...document.querySelectorAll('#calls tr[data-call-id]')].map(
  (tr) => ({call_id: tr.dataset.callId, session_id: tr.dataset.sessionId,
            cells: [...tr.cells].map((td) => td.innerText)}));"""

TIMELINE = """return [...document.querySelectorAll('#steps tr')].map((tr) => ({
  index: Number(tr.dataset.stepIndex), error_row: tr.classList.contains('error'),
  cells: [...tr.cells].map((td) => td.innerText)}));"""


def live_call_seen(browser: Browser, caller: Sipp) -> dict[str, Any]:
    """The page's live row for the call sipp makes (while sipp still runs)."""
    rows = browser.wait_for(LIVE_ROWS.replace("return ", "const r = ", 1)
                            + " return r.length ? r : null;", 15, "a live call row")
    assert caller.proc.poll() is None, "the row must show while the call is up"
    assert len(rows) == 1, rows
    return dict(rows[0])


def open_session(browser: Browser, session_id: str, steps: int) -> list[dict[str, Any]]:
    browser.click(f'#sessions div[data-session-id="{session_id}"]')
    return list(browser.wait_for(
        "if (document.getElementById('steps')?.dataset.sessionId !== arguments[0]) "
        "return null; " + TIMELINE.replace("return ", "const r = ", 1)
        + f" return r.length >= {steps} ? r : null;",
        10, f"{steps} timeline rows of {session_id}", session_id))


def test_debug_page_shows_live_calls_timelines_and_errors(
        token_system: PbxSystem, tmp_path: Path) -> None:
    system = token_system
    base = f"http://127.0.0.1:{system.admin_port}"
    with Browser(tmp_path / "browser") as browser:
        # The token in a fragment: the page keeps it in sessionStorage and drops it.
        browser.get(f"{base}/debug#token={TOKEN}")
        browser.wait_for("return document.getElementById('status').textContent === 'live'",
                         15, "the page's WebSocket to be live")
        assert TOKEN not in browser.run("return location.href")
        assert browser.run("return document.querySelectorAll('#calls tr[data-call-id]').length") == 0

        # 1. A call: its row appears while it is up and goes when it ends.
        system.provider.script = three_steps
        caller, rtp = call_star99(system, tmp_path / "call1")
        try:
            row = live_call_seen(browser, caller)
            assert row["cells"][1] == "1002 → *99", row
            assert row["cells"][2] == "main", row
            # It enters the IVR: the first step trace names its session on the row.
            row = browser.wait_for(
                "const tr = document.querySelector('#calls tr[data-call-id]');"
                "return tr && tr.dataset.sessionId && tr.innerText.includes('ivr') ? "
                "{session_id: tr.dataset.sessionId, call_id: tr.dataset.callId} : null;",
                10, "the live row in state ivr with its session")
            assert caller.wait(30) == 0, caller.logs()
        finally:
            caller.stop()
            rtp.close()
        browser.wait_for("return document.querySelectorAll('#calls tr[data-call-id]').length === 0",
                         10, "the ended call's row to go")
        session_id, call_id = row["session_id"], row["call_id"]

        # 2. Its timeline: the steps /api/traces has, with event, action and timing.
        steps = system.admin(f"/api/traces/{session_id}")
        assert len(steps) == 3 and all(s["call_id"] == call_id for s in steps), steps
        timeline = open_session(browser, session_id, len(steps))
        assert [t["index"] for t in timeline] == [s["step_index"] for s in steps]
        for shown, step in zip(timeline, steps, strict=True):
            _, _, event, action_cell, step_cell, took, error, _ = shown["cells"]
            assert event.splitlines()[0] == (step["request"] or {}).get("event", {}).get(
                "type", step["trigger"]), (shown, step)
            assert action_cell.splitlines()[0] == step["action_type"], (shown, step)
            assert step_cell.splitlines()[0] == step["step_id"], (shown, step)
            assert took == f"{step['duration_ms']:.1f} ms", (shown, step)
            assert not shown["error_row"] and not step["error"]
        assert [t["cells"][4].splitlines()[0] for t in timeline] == \
            ["dp-welcome", "dp-bye", "dp-end"]
        assert "sounds/welcome.wav" in timeline[0]["cells"][3]

        # 3. A provider error: a red row with the error the trace has.
        system.provider.script = failing_second_step
        caller, rtp = call_star99(system, tmp_path / "call2")
        try:
            failing = live_call_seen(browser, caller)
            assert caller.wait(30) == 0, caller.logs()
        finally:
            caller.stop()
            rtp.close()
        browser.wait_for("return document.querySelectorAll('#calls tr[data-call-id]').length === 0",
                         10, "the failed call's row to go")
        failed = [s for s in system.admin("/api/traces") if s["call_id"] == failing["call_id"]]
        assert len(failed) == 1, failed
        failed_id = failed[0]["session_id"]
        steps = system.admin(f"/api/traces/{failed_id}")
        errors = [s for s in steps if s.get("error")]
        assert errors and "HTTP 500" in " ".join(s["error"] for s in errors), steps
        assert browser.run("return document.querySelector("
                           f"'#sessions div[data-session-id=\"{failed_id}\"]').className"
                           ).count("haserr") == 1
        timeline = open_session(browser, failed_id, len(steps))
        shown_errors = [t for t in timeline if t["error_row"]]
        assert [t["index"] for t in shown_errors] == [s["step_index"] for s in errors]
        for shown, step in zip(shown_errors, errors, strict=True):
            assert step["error"] in shown["cells"][6], (shown, step)

        # 4. A screenshot with a call up and the failed session's timeline open.
        system.provider.script = three_steps
        caller, rtp = call_star99(system, tmp_path / "call3")
        try:
            live_call_seen(browser, caller)
            browser.wait_for("return document.querySelector('#calls tr[data-call-id]')"
                             "?.innerText.includes('ivr')", 10, "the third call in the IVR")
            shot = browser.screenshot()
            assert caller.wait(30) == 0, caller.logs()
        finally:
            caller.stop()
            rtp.close()
        assert shot.startswith(b"\x89PNG")
        (tmp_path / "debug-page.png").write_bytes(shot)
        if os.environ.get("PBX_DEBUG_SCREENSHOT"):
            Path(os.environ["PBX_DEBUG_SCREENSHOT"]).write_bytes(shot)

        # The token never went into a URL the page requested (the navigation's own entry
        # keeps the fragment, which a browser never sends).
        urls = browser.run(
            "return performance.getEntriesByType('resource').map((e) => e.name)")
        assert any("/api/traces" in u for u in urls) and any("/ws/events" in u or
                                                             "/api/calls" in u for u in urls)
        assert not [u for u in urls if TOKEN in u], urls
        assert TOKEN not in browser.run("return location.href")

        # 5. Without a token the page asks for one; a wrong one is refused, the right
        # one (typed into the form) brings it live.
        browser.run("sessionStorage.clear(); location.reload();")
        browser.wait_for("return document.getElementById('status').textContent"
                         " === 'admin token required'", 15, "the page to ask for the token")
        assert browser.run("return document.getElementById('tokenform').className") == "shown"
        refusals = ("return [...document.getElementById('log').children]"
                    ".filter((d) => d.textContent.includes('token required')).length")
        refused_before = browser.run(refusals)
        browser.type("#token", "not-the-token-000000\ue007")
        browser.wait_for(refusals + " > arguments[0]", 15, "the wrong token refused",
                         refused_before)
        assert browser.run("return document.getElementById('tokenform').className") == "shown"
        assert browser.run("return document.getElementById('status').textContent") != "live"
        browser.type("#token", TOKEN + "\ue007")
        browser.wait_for("return document.getElementById('status').textContent === 'live'",
                         15, "the page live with the typed token")
        # The session list is fetched once live (its own request): wait for it.
        browser.wait_for("return document.getElementById('sessions')"
                         f".querySelector('[data-session-id=\"{failed_id}\"]') !== null",
                         15, "the sessions listed again with the typed token")
        urls = browser.run(
            "return performance.getEntriesByType('resource').map((e) => e.name)")
        assert not [u for u in urls if TOKEN in u], urls

    # ... nor into the system's logs.
    wait_until(lambda: (system.root / "logs").exists(), 1, "logs")
    for log in (system.root / "logs").glob("*"):
        if log.is_file():
            assert TOKEN not in log.read_text(errors="replace"), log
