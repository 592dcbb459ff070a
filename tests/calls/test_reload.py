"""Hot reload of the dial plan (pbx.reload) on the core's virtual clock: a call in
progress keeps the route (and IVR parameters) and queue settings it started with,
new calls and later decisions take the new plan; other sections need a restart."""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.reload import plan_reload
from pbx.sip.message import make_response
from tests.calls.rig import CoreRig, caller_invite, first_then, rig_settings

OLD_URL = "http://127.0.0.1:1/ivr"
NEW_URL = "http://127.0.0.1:2/new-ivr"
SALES_TIMEOUT_S = 0.6  # [queues.sales] timeout_ms in the rig's config


def session_starts(rig: CoreRig) -> dict[str, m.CallInfo]:
    """Each session's start: session id -> the call info its IVR got."""
    return {e.session_id: e.input.call for e in rig.ivr
            if isinstance(e.input, m.SessionStartInput)}


def second_caller_invite() -> bytes:
    return caller_invite(branch="7").replace(b"caller-call@", b"second-call@")


def test_a_call_in_progress_keeps_its_route_new_calls_take_the_new_one(tmp_path: Path) -> None:
    # Every call's IVR sends it to a queue nobody answers and takes it back after
    # the queue's timeout: the returning session starts from the call's route again.
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales", return_to_ivr=True)]))
    first = rig.answered()
    new = rig_settings(tmp_path, replace={OLD_URL: NEW_URL})
    plan = plan_reload(rig.core.ctx.settings, new)
    assert plan.changed == ["routes"] and plan.restart_needed == []
    assert plan.settings is not None
    rig.core.reload(plan.settings)

    rig.feed(second_caller_invite(), ("127.0.0.1", 5999))
    second = [c for c in rig.core.ctx.table.calls.values() if c is not first][0]
    rig.advance(SALES_TIMEOUT_S + 0.05)  # both queues give up: both IVRs start again

    starts = session_starts(rig)
    assert starts[first.call_id].params.url == OLD_URL
    assert starts[f"{first.call_id}-2"].params.url == OLD_URL  # the route it started with
    assert starts[second.call_id].params.url == NEW_URL
    assert starts[f"{second.call_id}-2"].params.url == NEW_URL
    assert first.route is not None and first.route.app_params.url == OLD_URL


def test_a_call_to_a_route_that_is_gone_gets_404_after_the_reload(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([]), extra='\n[policy]\ntrusted_networks = ["127.0.0.1/32"]\n')
    first = rig.answered()
    new = rig_settings(tmp_path, extra='\n[policy]\ntrusted_networks = ["127.0.0.1/32"]\n',
                       replace={'to_user = "*99"': 'to_user = "*77"'})
    plan = plan_reload(rig.core.ctx.settings, new)
    assert plan.settings is not None
    rig.core.reload(plan.settings)
    rig.feed(second_caller_invite(), ("127.0.0.1", 5999))
    assert 404 in rig.statuses()
    assert not first.ended  # the call in progress goes on


LONG_QUEUE = """
[queues.long]
members = ["2001", "2002", "2003"]
strategy = "round_robin"
timeout_ms = 10000
member_ring_ms = 200
"""


def test_a_queue_rings_its_new_members_from_the_next_round(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="long")]), extra=LONG_QUEUE)
    rig.answered()
    first = rig.requests("INVITE")
    assert first[0].uri.startswith("sip:2001@")
    new = rig_settings(tmp_path, extra=LONG_QUEUE.replace('"2001", "2002", "2003"',
                                                          '"2001", "2003"'))
    plan = plan_reload(rig.core.ctx.settings, new)
    assert plan.changed == ["queues"] and plan.settings is not None
    rig.core.reload(plan.settings)
    rig.feed(make_response(first[0], 486, to_tag="x"), ("127.0.0.1", 6001))
    # The round in progress was planned before the reload: 2002, then 2003; after the
    # pause between rounds (2 s) the next round rings the members the queue has now.
    rig.advance(0.2 + 0.2 + 2.0 + 0.2 + 0.2 + 0.1)
    rung: list[tuple[str, str | None]] = []
    for invite in rig.requests("INVITE"):  # each leg once (not its retransmissions)
        leg = (invite.uri.split("@")[0], invite.headers.get("Call-ID"))
        if leg not in rung:
            rung.append(leg)
    assert [user for user, _ in rung] == ["sip:2001", "sip:2002", "sip:2003",
                                          "sip:2001", "sip:2003"]


def test_users_change_with_a_reload(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    registrar = rig.core.ctx.registrar
    assert registrar.password_of("4001") is None
    new = rig_settings(tmp_path, extra='\n[users.4001]\npassword = "pw-4001-long"\n')
    plan = plan_reload(rig.core.ctx.settings, new)
    assert plan.changed == ["users"] and plan.settings is not None
    rig.core.reload(plan.settings)
    assert registrar.password_of("4001") == "pw-4001-long"


def test_other_sections_need_a_restart_and_keep_their_running_values(tmp_path: Path) -> None:
    running = rig_settings(tmp_path)
    new = rig_settings(tmp_path, replace={'listen = "127.0.0.1:5060"': 'listen = "127.0.0.1:5062"',
                                          OLD_URL: NEW_URL},
                       extra="\n[media]\ncapacity = 7\n")
    plan = plan_reload(running, new)
    assert plan.changed == ["routes"]
    assert plan.restart_needed == ["sip.listen", "media.capacity"]
    assert plan.settings is not None
    assert plan.settings.sip.listen == "127.0.0.1:5060"
    assert plan.settings.media.capacity == running.media.capacity
    assert plan.settings.routes[0].app_params.url == NEW_URL
    assert "needs a restart" in plan.summary() and "sip.listen" in plan.summary()
