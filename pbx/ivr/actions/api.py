"""`api` (docs/actions.md): an HTTP call the shell makes for the session (`pbx.ivr.provider`
`ProviderClient.api`), its outcome in `api_status` / `api_result`; then `next`, the
returned dynamic tree (`get_dynamic_tree`), or an `api_response` to the provider.

Phase: WAIT_API (`AwaitingApi`).
"""

from __future__ import annotations

from typing import Any

import orjson

from pbx.ivr.models import ActionError, ApiAction, ApiResponseEvent, action_json, parse_action
from pbx.ivr.phases import AwaitingApi, Digits, PendingRequest, PhaseData
from pbx.ivr.requests import ApiResult, ProviderRequest
from pbx.ivr.session import Session

NEXT_WITH_TREE = ("api: `next` is not followed with get_dynamic_tree: the returned "
                  "tree is the continuation (give it its own `next`)")
# The `api` timeout in seconds when the action says 0 (as when it says nothing).
API_DEFAULT_TIMEOUT_S = 10
# Methods whose `api` variables go in the query string; the others send a JSON body.
QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def run(s: Session, action: ApiAction, typeahead: Digits) -> PhaseData:
    """Ask the shell for the HTTP call; its outcome comes back to `result`."""
    if not s.chain_step():
        return s.too_many_steps()
    method = action.method.strip().upper() or "GET"
    names = action.variables.split(",") if isinstance(action.variables, str) else []
    # Choice: names of variables that are not set are left out.
    values = {
        name: s.env.variables[name]
        for name in (n.strip() for n in names)
        if name and name in s.env.variables
    }
    query = values if method in QUERY_METHODS else None
    body = {} if query is not None else values
    described: dict[str, Any] = {"method": method, "url": action.url}
    # Headers are not traced (they tend to carry credentials).
    described["query" if query is not None else "body"] = values
    s.requests.append(
        ProviderRequest(
            "api",
            action.url,
            body,
            s.env.call.params,
            method=method,
            headers=dict(action.headers),
            query=query,
            # Choice: `timeout: 0` (the document types it u64) means the default.
            timeout_s=float(action.timeout or API_DEFAULT_TIMEOUT_S),
        )
    )
    return AwaitingApi(pending=PendingRequest(trigger="api", request=described, sent_at=s.now))


# An api answer kept in the variables (api_result): well under the session's own bound.
MAX_API_RESULT_CHARS = 32 * 1024


def result_text(body: Any) -> str:
    """`api_result`: a text body as it came, JSON as JSON text, nothing as "" (a text
    body used to arrive JSON-encoded, `"\"plain text\""`; rustpbx does the same)."""
    if body is None:
        return ""
    if isinstance(body, str):
        return body
    return orjson.dumps(body).decode()


def storable(outcome: ApiResult) -> tuple[ApiResult, str]:
    """The outcome and its `api_result` text, or an error outcome in their place when the
    body cannot be kept in the session's variables: nested deeper than JSON text can be
    written (255 levels), or longer than MAX_API_RESULT_CHARS."""
    try:
        text = result_text(outcome.body)
    except TypeError:  # orjson's recursion limit
        error = "answer nested too deep (over 255 levels)"
    else:
        if len(text) <= MAX_API_RESULT_CHARS:
            return outcome, text
        error = f"answer larger than {MAX_API_RESULT_CHARS} characters"
    failed = ApiResult(0, {"error": error})
    return failed, result_text(failed.body)


def result(s: Session, data: AwaitingApi, outcome: ApiResult) -> PhaseData:
    node = s.env.node
    assert isinstance(node, ApiAction)
    outcome, text = storable(outcome)
    s.env.variables["api_status"] = str(outcome.status)
    s.env.variables["api_result"] = text
    trace: dict[str, Any] = {
        "trigger": "api_response",
        "request": data.pending.request,
        "duration_ms": max(0.0, (s.now - data.pending.sent_at) * 1000.0),
        "action": action_json(node),
        "action_type": node.type,
    }
    s.provider_trace = trace
    if node.get_dynamic_tree:
        # The body is the next action (docs/decisions.md "api"); `next` of the api node is not
        # followed, the tree carries its own: said in the step's trace.
        if node.next is not None:
            s.errors.append(NEXT_WITH_TREE)
        body = outcome.body
        trace["action"] = body if isinstance(body, dict) else None
        if not 200 <= outcome.status < 300:
            error = body.get("error") if isinstance(body, dict) else None
            return s.fail(f"api: dynamic tree not fetched: {error or f'HTTP {outcome.status}'}")
        try:
            action = parse_action(body)
        except ActionError as exc:
            if isinstance(body, dict) and isinstance(body.get("type"), str):
                trace["action_type"] = body["type"]
            return s.fail(f"api: dynamic tree: {exc.reason}")
        trace["action_type"] = action.type
        return s.take(action, ())
    if node.next is not None:
        # docs/decisions.md "next": followed without a provider call; `api_status` and
        # `api_result` tell it how the call went.
        return s.execute(node.next, ())
    return s.ask(ApiResponseEvent(status=outcome.status, body=outcome.body))
