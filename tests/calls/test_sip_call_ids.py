"""SIP Call-IDs in every record, trace, event and log line of a call, the lookup by one
(`/api/calls?sip_call_id=`), and direct calls recorded as direct calls, not transfers
(issue 11)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from pbx import messages as m
from pbx.admin import _wanted, admin_app
from pbx.records import CallRecords
from pbx.sip.message import make_response
from tests.calls.rig import (
    MEMBERS,
    PLAY,
    TRUSTED_CALLER,
    CoreRig,
    caller_invite,
    first_then,
)

CALLER_CALL_ID = "caller-call@127.0.0.1"


def direct_invite(user: str = "2001") -> bytes:
    """CALLER (a trusted source) dials the user straight: no route, no IVR."""
    return caller_invite().replace(b"sip:*99@", f"sip:{user}@".encode())


def ended(rig: CoreRig) -> dict[str, Any]:
    return [e for e in rig.events if e.get("type") == "call" and e["event"] == "ended"][-1]


def test_a_direct_call_that_fails_is_not_a_transfer(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    with caplog.at_level(logging.INFO, logger="pbx.calls"):
        call = rig.call(direct_invite())
        invite = rig.requests("INVITE", MEMBERS["2001"])[0]
        rig.feed(make_response(invite, 486, to_tag="busy"), MEMBERS["2001"])
        rig.advance(3)
    assert call.ended and call.end_reason == "CalleeFailed(486)"
    [record] = rig.records()
    assert record["kind"] == "direct" and record["route"] is None
    assert record["transfer_target"] is None and record["callee"] == "2001"
    assert record["end_reason"] == "CalleeFailed(486)" and record["outcome"] == "rejected"
    event = ended(rig)
    assert event["kind"] == "direct" and event["transfer_target"] is None
    lines = [r.getMessage() for r in caplog.records]
    assert any("direct call to 2001 failed with 486" in line for line in lines), lines
    assert not any("transfer to" in line or "TransferFailed" in line for line in lines), lines


def test_a_direct_call_record_carries_both_legs_call_ids(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(direct_invite())
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1")
    rig.caller_request("ACK", 1)
    assert call.sip_legs() == {"a": CALLER_CALL_ID, "b": invite.call_id}
    assert rig.core.ctx.table.find_sip_call_id(invite.call_id) is call
    rig.caller_request("BYE", 2)
    rig.advance(3)
    [record] = rig.records()
    assert record["kind"] == "direct" and record["outcome"] == "bridged"
    assert record["transfer_target"] is None
    assert record["sip_call_id"] == CALLER_CALL_ID
    assert record["sip_call_ids"] == [CALLER_CALL_ID, invite.call_id]
    assert all(e["sip_call_ids"][0] == CALLER_CALL_ID for e in rig.events
               if e.get("type") == "call")
    # Over, it is found among the recent records by either leg; no longer live.
    assert rig.core.ctx.table.find_sip_call_id(CALLER_CALL_ID) is None
    records = rig.core.ctx.records
    assert records.find_sip_call_id(invite.call_id) == record
    assert records.find_sip_call_id(CALLER_CALL_ID) == record


def test_an_ivr_transfer_is_still_a_transfer(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]))
    rig.answered()
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.feed(make_response(invite, 486, to_tag="busy"), MEMBERS["2001"])
    rig.advance(3)
    [record] = rig.records()
    assert record["kind"] == "ivr" and record["transfer_target"] == "2001"
    assert record["end_reason"] == "TransferFailed(486)"
    assert record["sip_call_ids"] == [CALLER_CALL_ID, invite.call_id]


def test_traces_and_log_lines_name_the_legs_call_ids(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.answered()
    session = call.session
    assert session is not None
    # A step trace as an executor returns it (it knows our call id only).
    rig.core.events.trace(m.StepTrace(call_id=call.call_id, session_id=session.session_id,
                                      step_index=2, trigger="event", at=2.0))
    rig.pump()
    steps = rig.core.ctx.traces.get(session.session_id) or []
    assert steps and all(s["sip_call_ids"] == [CALLER_CALL_ID] for s in steps)
    summary = rig.core.ctx.traces.recent(1)[0]
    assert summary["sip_call_ids"] == [CALLER_CALL_ID]
    published = [e for e in rig.events if e.get("type") == "ivr_step_trace"]
    assert published and published[-1]["sip_call_ids"] == [CALLER_CALL_ID]
    with caplog.at_level(logging.INFO, logger="pbx.calls"):
        # A line naming the call by our id, one by its session id.
        logging.getLogger("pbx.calls").info("call %s: something", call.call_id)
        logging.getLogger("pbx.calls").info("session %s: something", session.session_id)
        logging.getLogger("pbx.calls").info("unrelated %s", "x")
        media_id = call.a.media_id if call.a is not None else ""
        logging.getLogger("pbx.calls").warning("worker %r: port %d for %s", "w", 1, media_id)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"call {call.call_id}: something [sip-call-id a={CALLER_CALL_ID}]"
    assert lines[1].endswith(f"[sip-call-id a={CALLER_CALL_ID}]")
    assert lines[2] == "unrelated x"
    assert lines[3].endswith(f"for {media_id} [sip-call-id a={CALLER_CALL_ID}]")
    # The template stays one template (the flood filter keys on it).
    assert caplog.records[0].msg == "call %s: something [sip-call-id %s]"


def test_recent_records_are_bounded_and_indexed(tmp_path: Path) -> None:
    written: list[dict[str, Any]] = []
    records = CallRecords(SimpleNamespace(write=written.append), recent=2)
    for n in range(3):
        records.finish({"call_id": f"c{n}", "sip_call_ids": [f"sip{n}", f"out{n}"]}, {},
                       now=0.0)
    assert len(written) == 3 and list(records.recent) == ["c1", "c2"]
    assert records.find_sip_call_id("sip0") is None and "out0" not in records.by_sip_call_id
    assert records.find_sip_call_id("out2") == written[2]
    assert len(records.by_sip_call_id) == 4


def test_api_calls_finds_a_call_by_either_legs_call_id(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(direct_invite())
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1")
    ctx = rig.core.ctx
    # The admin shell over the rig's core (what it reads of a Front).
    front = SimpleNamespace(listeners=[], settings=rig.settings, calls=ctx.table.calls,
                            core=rig.core, records=ctx.records,
                            add_listener=lambda listener, active=None: None)

    async def get(server: TestServer, query: str) -> Any:
        async with ClientSession() as http, http.get(
                f"http://127.0.0.1:{server.port}/api/calls{query}") as r:
            assert r.status == 200
            return await r.json()

    async def main() -> None:
        server = TestServer(admin_app(front), host="127.0.0.1")  # type: ignore[arg-type]
        await server.start_server()
        try:
            [live] = await get(server, "")
            assert live["sip_legs"] == {"a": CALLER_CALL_ID, "b": invite.call_id}
            assert live["kind"] == "direct" and live["bridged_to"] == "2001"
            for cid in (CALLER_CALL_ID, invite.call_id):
                [found] = await get(server, f"?sip_call_id={cid}")
                assert found["call_id"] == call.call_id and found["live"] is True
            assert await get(server, "?sip_call_id=nobody@x") == []
            rig.caller_request("ACK", 1)
            rig.caller_request("BYE", 2)
            rig.advance(3)
            [done] = await get(server, f"?sip_call_id={invite.call_id}")
            assert done["live"] is False and done["call_id"] == call.call_id
            assert done["outcome"] == "bridged" and "rtp" in done
        finally:
            await server.close()

    asyncio.run(main())


def test_live_events_filter_by_any_legs_call_id() -> None:
    event = {"type": "call", "call_id": "c1", "sip_call_ids": ["a@x", "b@y"]}
    assert _wanted(event, {"sip_call_id": "b@y"}) and _wanted(event, {"sip_call_id": "a@x"})
    assert not _wanted(event, {"sip_call_id": "c@z"})
    assert _wanted(event, {"sip_call_id": "a@x", "type": "call"})
    assert not _wanted({"type": "call"}, {"sip_call_id": "a@x"})
