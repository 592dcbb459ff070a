"""Terminal actions that hand the call on and end this session (`/end` with the
reason): `transfer`, `queue`, `route_to_agent` (a command to the front), and
`jump_ivr`, which starts another configured IVR on the same call.

Phases: none of their own; they end in DONE (or WAIT_PROVIDER of the new IVR).
"""

from __future__ import annotations

from pbx.ivr.models import JumpIvrAction, QueueAction, RouteToAgentAction, TransferAction
from pbx.ivr.phases import Digits, PhaseData
from pbx.ivr.session import MAX_VARIABLES_CHARS, Session, variables_chars
from pbx.ivr.variables import initial_variables
from pbx.messages import AgentCommand, QueueCommand, TransferCommand

# Variables the front sets at the start of every session that describe the call itself
# (pbx.calls.ivr, pbx.calls.queue), so a jump_ivr keeps them.
CALL_FACTS = frozenset({"caller_trust", "transferred_from"})


def transfer(s: Session, action: TransferAction, typeahead: Digits) -> PhaseData:
    s.commands.append(TransferCommand(target=action.target))
    return s.end(f"Transfer({action.target})")


def queue(s: Session, action: QueueAction, typeahead: Digits) -> PhaseData:
    s.commands.append(QueueCommand(target=action.target, return_to_ivr=action.return_to_ivr))
    return s.end(f"Queue({action.target})")


def route_to_agent(s: Session, action: RouteToAgentAction, typeahead: Digits) -> PhaseData:
    s.commands.append(
        AgentCommand(target=action.target, skill_group_id=action.skill_group_id or None,
                     key_id=action.key_id or None, channel_code=action.channel_code or None)
    )
    return s.end(f"Agent({action.target})")


def jump(s: Session, action: JumpIvrAction, typeahead: Digits) -> PhaseData:
    """jump_ivr: end this provider session (`/end` with `Jump(<route_point>)`), then
    start the `[ivrs.<route_point>]` IVR on the same call as if it had just entered:
    `/start`, `session_start`, fresh variables plus `params`.

    Kept across the jump: the call, the front's facts about it (`CALL_FACTS`:
    whether the caller was verified, where it was transferred from; not
    `return_reason`, which told why the previous session started), the play/timer id
    counters (late events of the old session stay stale), the trace step index and
    passthrough fields, and the chained-step count (so IVRs jumping to each other
    cannot loop without bound).
    The jump stays the session's last action until the new IVR answers (the trace of
    a jump taken locally, e.g. from a menu entry, names it)."""
    params = s.ivrs.get(action.route_point)
    if params is None:
        return s.fail(f"jump_ivr: unknown route point {action.route_point!r}")
    if variables_chars(action.params) > MAX_VARIABLES_CHARS:
        return s.fail_oversized()  # before the jump: the session it would leave fails
    s.end(f"Jump({action.route_point})")
    env = s.env
    facts = {k: v for k, v in env.call.variables.items() if k in CALL_FACTS}
    env.call = env.call.model_copy(
        update={"params": params, "route_name": action.route_point, "variables": facts}
    )
    env.variables = {**initial_variables(env.call), **action.params}
    env.record_id = 0
    env.last_record_path = None
    return s.begin()
