"""The `pbx-sim` console script (docs/simulator.md).

    pbx-sim http://localhost:8080/ivr/step --press 1 --wait 2s --press 9 --hangup
    pbx-sim --scenario tests/fixtures/sim/reference.yaml [http://...]

Exit codes: 0 every call met its expectations and the provider kept the protocol;
1 an expectation failed; 2 the command line, scenario or config is unusable;
3 no expectation failed, but the provider broke the protocol (an answer outside the
JSON Schema, an HTTP error or timeout that ran the fallback, an answer that is not
JSON, an action the PBX could not run; slow answers too with --fail-on-slow);
4 the simulator or the PBX failed internally (a bug: please report it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from pbx.config import ConfigError, IvrAppParams, load_config
from pbx.sim import expect, runner
from pbx.sim.scenario import (
    Call,
    Options,
    Scenario,
    ScenarioError,
    app_params,
    load,
    options_for,
    parse,
    parse_duration,
)

EXIT_OK = 0
EXIT_EXPECTATION = 1
EXIT_USAGE = 2
EXIT_PROTOCOL = 3
EXIT_INTERNAL = 4


class _ScriptStep(argparse.Action):
    """--press/--wait/--hangup keep their command-line order in `script`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        script = list(getattr(namespace, "script", None) or [])
        key = self.dest
        script.append({key: values if isinstance(values, str) else True})
        namespace.script = script


def _pair(text: str, sep: str, what: str) -> tuple[str, str]:
    if sep not in text:
        raise ScenarioError(f"{what}: expected NAME{sep}VALUE, got {text!r}")
    name, value = text.split(sep, 1)
    return name.strip(), value.strip()


def _json_value(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if what.startswith("--app-param"):
            return text  # a bare word: a string
        raise ScenarioError(f"{what}: not JSON: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pbx-sim",
        description="Drive a step-mode IVR provider through scripted calls: the real IVR "
        "state machine, a virtual clock, no SIP.",
        epilog="Exit codes: 0 ok, 1 an expectation failed, 2 bad usage, 3 the provider "
        "broke the protocol, 4 internal error. See docs/simulator.md.",
    )
    p.add_argument("url", nargs="?", help="the provider's step URL (POST {url})")
    p.add_argument("--scenario", "-s", metavar="FILE", help="a YAML scenario (calls, expectations)")
    g = p.add_argument_group("the caller's script (in order; without a scenario)")
    g.add_argument("--press", action=_ScriptStep, metavar="KEYS", help="press keys, e.g. 1 or 123#")
    g.add_argument("--wait", action=_ScriptStep, metavar="TIME",
                   help="wait: 2s, 500ms, or idle (until nothing plays)")
    g.add_argument("--hangup", action=_ScriptStep, nargs=0, help="hang up")
    c = p.add_argument_group("the call")
    c.add_argument("--caller", help="calling number (default 1001)")
    c.add_argument("--callee", help="called number (default 2000)")
    c.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a session variable set before the session starts")
    c.add_argument("--sip-header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="an INVITE header (the provider sees it as sip_<NAME>)")
    r = p.add_argument_group("the route's app_params")
    r.add_argument("--config", metavar="FILE", help="a pbx.toml: its [ivrs] and --route")
    r.add_argument("--route", metavar="NAME", help="take app_params from this [[routes]] entry")
    r.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a header sent on every provider call")
    r.add_argument("--retries", type=int, metavar="N", help="retry.max_retries")
    r.add_argument("--timeout-ms", type=int, metavar="MS", help="retry.timeout_ms")
    r.add_argument("--fallback", metavar="JSON", help="retry.fallback (an ActionNode)")
    r.add_argument("--app-param", action="append", default=[], metavar="KEY=JSON",
                   help="any other app_params key (e.g. ivr_id=proj_42, compat=rustpbx)")
    o = p.add_argument_group("simulation")
    o.add_argument("--sounds", metavar="DIR", help="where prompts are (default sounds)")
    o.add_argument("--prompt-ms", type=int, help="length of a prompt not found (default 2000)")
    o.add_argument("--slow-ms", type=int, help="flag answers slower than this (default 500)")
    o.add_argument("--fail-on-slow", action="store_true", help="a slow answer fails the run (3)")
    o.add_argument("--no-tts", action="store_true",
                   help="no text to speech: tts_text gets the provider an error event")
    o.add_argument("--max-call", metavar="TIME", help="hang up after this virtual time (600s)")
    o.add_argument("--verbose", "-v", action="store_true", help="show whole request bodies")
    e = p.add_argument_group("expectations (without a scenario)")
    e.add_argument("--expect-end-reason", metavar="REASON", help='e.g. "Transfer(2001)"')
    e.add_argument("--expect-event", action="append", default=[], metavar="JSON")
    e.add_argument("--expect-action", action="append", default=[], metavar="JSON")
    e.add_argument("--expect-error", action="append", default=[], metavar="TEXT",
                   help="the PBX records an error containing TEXT (it then fails nothing)")
    return p


def _options(args: argparse.Namespace, base: Options) -> Options:
    updates: dict[str, Any] = {}
    if args.sounds:
        updates["sounds_dir"] = args.sounds
    if args.prompt_ms is not None:
        updates["prompt_ms"] = args.prompt_ms
    if args.slow_ms is not None:
        updates["slow_ms"] = args.slow_ms
    if args.fail_on_slow:
        updates["fail_on_slow"] = True
    if args.no_tts:
        updates["tts"] = False
    if args.max_call:
        updates["max_call_s"] = parse_duration(args.max_call)
    return Options.model_validate({**base.model_dump(), **updates})


def _command_line_call(args: argparse.Namespace) -> dict[str, Any]:
    expect: list[dict[str, Any]] = []
    if args.expect_end_reason:
        expect.append({"end_reason": args.expect_end_reason})
    expect += [{"event": _json_value(x, "--expect-event")} for x in args.expect_event]
    expect += [{"action": _json_value(x, "--expect-action")} for x in args.expect_action]
    expect += [{"error": x} for x in args.expect_error]
    return {"name": "command line", "steps": getattr(args, "script", None) or [],
            "expect": expect}


def make_scenario(args: argparse.Namespace) -> tuple[Scenario, dict[str, IvrAppParams]]:
    """The scenario to run (file or command line, command-line options on top) and the
    `[ivrs]` table for jump_ivr."""
    ivrs: dict[str, IvrAppParams] = {}
    route_params: dict[str, Any] = {}
    if args.config:
        try:
            settings = load_config(args.config)
        except ConfigError as exc:
            raise ScenarioError(str(exc)) from None
        ivrs = dict(settings.ivrs)
        if args.route:
            routes = {r.name: r for r in settings.routes}
            if args.route not in routes:
                raise ScenarioError(f"--route {args.route!r}: no such route in {args.config} "
                                    f"(routes: {', '.join(routes) or 'none'})")
            route_params = routes[args.route].app_params.model_dump(mode="json")
    elif args.route:
        raise ScenarioError("--route needs --config")
    if args.scenario:
        if getattr(args, "script", None):
            raise ScenarioError("--press/--wait/--hangup go in the scenario's steps, "
                                "not with --scenario")
        scenario = load(args.scenario)
    else:
        scenario = parse({"calls": [_command_line_call(args)]}, "the command line")
    params: dict[str, Any] = {**route_params, **(scenario.app_params or {})}
    headers = dict(params.get("headers") or {})
    for h in args.header:
        name, value = _pair(h, ":", "--header")
        headers[name] = value
    if headers:
        params["headers"] = headers
    retry = dict(params.get("retry") or {})
    if args.retries is not None:
        retry["max_retries"] = args.retries
    if args.timeout_ms is not None:
        retry["timeout_ms"] = args.timeout_ms
    if args.fallback:
        retry["fallback"] = _json_value(args.fallback, "--fallback")
    if retry:
        params["retry"] = retry
    for item in args.app_param:
        key, value = _pair(item, "=", "--app-param")
        params[key] = _json_value(value, f"--app-param {key}")
    variables = dict(scenario.variables or {})
    for item in args.var:
        name, value = _pair(item, "=", "--var")
        variables[name] = value
    sip_headers = dict(scenario.sip_headers or {})
    for item in args.sip_header:
        name, value = _pair(item, ":", "--sip-header")
        sip_headers[name] = value
    updates: dict[str, Any] = {
        "app_params": params or None,
        "variables": variables or None,
        "sip_headers": sip_headers or None,
        "options": _options(args, scenario.options),
    }
    if args.url:
        updates["provider"] = args.url
    if args.caller:
        updates["caller"] = args.caller
    if args.callee:
        updates["callee"] = args.callee
    scenario = scenario.model_copy(update=updates)
    for name, raw in scenario.ivrs.items():
        try:
            ivrs[name] = IvrAppParams.model_validate(raw)
        except ValueError as exc:
            raise ScenarioError(f"ivrs.{name}: {exc}") from None
    return scenario, ivrs


def _merged_call(scenario: Scenario, call: Call) -> Call:
    """A call with the scenario's defaults where it sets nothing of its own."""
    updates: dict[str, Any] = {}
    for key in ("caller", "callee", "direction"):
        if getattr(call, key) is None:
            updates[key] = getattr(scenario, key)
    for key in ("variables", "sip_headers"):
        updates[key] = {**(getattr(scenario, key) or {}), **(getattr(call, key) or {})}
    updates["app_params"] = {**(scenario.app_params or {}), **(call.app_params or {})}
    return call.model_copy(update=updates)


async def run(scenario: Scenario, ivrs: dict[str, IvrAppParams], verbose: bool = False,
              out: runner.Out = print) -> int:
    """Run every call of the scenario; the exit code."""
    outcomes: list[tuple[Call, runner.Outcome, Options]] = []
    for raw_call in scenario.calls:
        call = _merged_call(scenario, raw_call)
        params = app_params(scenario, raw_call)
        options = options_for(scenario, raw_call)
        sim = runner.SimCall(call, params, options, out, ivrs=ivrs, verbose=verbose)
        outcome = await sim.run()
        expect.check(call, outcome, out, options)
        outcomes.append((call, outcome, options))
        out("")
    return summarize(outcomes, out)


def summarize(outcomes: list[tuple[Call, runner.Outcome, Options]], out: runner.Out) -> int:
    failed = internal = protocol = 0
    for call, o, options in outcomes:
        problems = o.problems(options)
        verdict = ("INTERNAL ERROR" if o.internal else "FAILED" if o.failed_expectations
                   else "PROTOCOL PROBLEMS" if problems else "ok")
        out(f"{call.name}: {verdict}")
        for line in o.internal:
            out(f"  internal: {line}")
        for line in o.failed_expectations:
            out(f"  expectation not met: {line}")
        for line in problems:
            out(f"  {line}")
        if o.slow and not options.fail_on_slow:
            out(f"  {len(o.slow)} slow answer(s) (warning; --fail-on-slow makes them fail)")
        internal += bool(o.internal)
        failed += bool(o.failed_expectations)
        protocol += bool(problems)
    if internal:
        return EXIT_INTERNAL
    if failed:
        return EXIT_EXPECTATION
    return EXIT_PROTOCOL if protocol else EXIT_OK


async def amain(argv: Sequence[str] | None = None, out: runner.Out = print) -> int:
    """`main` inside a running event loop (tests run providers in the same loop)."""
    args = build_parser().parse_args(argv)
    try:
        scenario, ivrs = make_scenario(args)
        for call in scenario.calls:
            app_params(scenario, call)  # a bad URL or app_params stops here, not mid-run
    except ScenarioError as exc:
        print(f"pbx-sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return await run(scenario, ivrs, args.verbose, out)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return asyncio.run(amain(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
