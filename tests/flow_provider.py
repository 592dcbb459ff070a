"""A provider that answers from a table: the provider side of the guide's flows.

    python tests/flow_provider.py PORT [FLOWS_DIR]        # FLOWS_DIR: docs/flows

Each flow of the guide is a pbx-sim scenario, `docs/flows/<flow>.yaml`; what the
provider answers in it is in `docs/flows/<flow>.answers.yaml`, one table (event ->
ActionNode) per kind of call, named by the call's `app_params.ivr_id`,
`<flow>.<table>`:

    session_start: {type: prompt, file: sounds/welcome.wav}   # the answer to this event
    "dtmf:1": {type: transfer, target: "2001"}                # this event with this digit
    dtmf_menu_timeout:                                         # a list: the 1st, 2nd...
      - {type: prompt, file: sounds/timeout.wav}               # time this event comes,
      - {type: hangup}                                         # the last one from then on

The most specific key wins: `<type>:<digit>` (or `:<number>`, `:<status>`), then
`<type>`. An event the table does not name gets HTTP 404, which the PBX answers with
the route's fallback and pbx-sim reports as a provider failure: a flow that does not
go the way the guide says fails its test. `GET/POST /echo` answers with the query
string and JSON body it got, for the `api` flows.

Serves `POST /ivr/step`, its `/start`, `/end`, `/dtmf-match` notifications (answered
`{"status": "ok"}`), and `/echo`. `{self}` in a table is this provider's own
`http://host:port`. Tables are read on every request, so a flow can be edited while
the provider runs.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

FLOWS = web.AppKey("flows", Path)
SEEN = web.AppKey("seen", Counter)


def answer(table: dict[str, Any], event: dict[str, Any], seen: Counter[str],
           session_id: str) -> dict[str, Any] | None:
    """The table's answer to `event` (None: the table has none)."""
    kind = str(event.get("type"))
    detail = next((event[k] for k in ("digit", "number", "status") if k in event), None)
    keys = ([f"{kind}:{detail}"] if detail is not None else []) + [kind]
    for key in keys:
        if key in table:
            entry = table[key]
            if isinstance(entry, list):
                seen[f"{session_id} {key}"] += 1
                return dict(entry[min(seen[f"{session_id} {key}"], len(entry)) - 1])
            return dict(entry)
    return None


async def step(request: web.Request) -> web.Response:
    context = await request.json()
    flow, _, name = str(context.get("ivr_id") or "").partition(".")
    path = request.app[FLOWS] / f"{flow}.answers.yaml"
    if not flow or "/" in flow or not path.is_file():
        return web.json_response({"error": f"no answers file for {flow!r}"}, status=404)
    text = path.read_text(encoding="utf-8").replace("{self}", f"http://{request.host}")
    table = (yaml.safe_load(text) or {}).get(name)
    if not isinstance(table, dict):
        return web.json_response({"error": f"{path.name}: no table {name!r}"}, status=404)
    event = context.get("event") or {}
    action = answer(table, event, request.app[SEEN], str(context.get("session_id")))
    if action is None:
        return web.json_response({"error": f"{flow}: no answer for {event}"}, status=404)
    return web.json_response(action)


async def notification(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def echo(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else None
    return web.json_response({"method": request.method, "query": dict(request.query),
                              "body": body})


def app(flows: Path) -> web.Application:
    application = web.Application()
    application[FLOWS] = flows
    application[SEEN] = Counter()
    application.router.add_post("/ivr/step", step)
    application.router.add_post("/ivr/step/{notification:start|end|dtmf-match}", notification)
    application.router.add_route("*", "/echo", echo)
    return application


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    flows_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "docs" / "flows"
    web.run_app(app(flows_dir), host="127.0.0.1", port=int(sys.argv[1]), print=None)
