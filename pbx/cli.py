"""`pbx`: the operator's command for a running system.

    pbx status                    programs (supervisord), media workers, executors, calls
    pbx calls [--watch [S]]       calls in progress, as a table (refreshed every S seconds)
    pbx trace SESSION|CALL-ID     every step of an IVR session: event, action, timing, error
    pbx events [--follow]         the live events (/ws/events), one JSON object a line
    pbx config check FILE         the start-up validation of FILE (exit 0, or 2 with the
                                  file, key and reason)
    pbx reload                    re-read the config file: apply the dial plan (users,
                                  routes, IVRs, queues, skill groups), name what needs a
                                  restart (exit 0; 2 file refused; 3 some changes need a
                                  restart)

It finds the front's admin listener and token in the config (`[admin]`; `--config`,
else `$PBX_CONFIG`, else `config/pbx.toml`) and supervisord's socket in
`supervisord.conf` (`--supervisord-conf`), each looked up in the current directory,
then in the project root. Exit 1 when the system does not answer, with what to check.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import json
import os
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pbx import planes
from pbx.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, AdminSettings, ConfigError, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HTTP_TIMEOUT_S = 10.0
EXIT_OK, EXIT_DOWN, EXIT_BAD_FILE, EXIT_RESTART_NEEDED = 0, 1, 2, 3


class CliError(Exception):
    """A problem to report in one line, with the exit code."""

    def __init__(self, message: str, code: int = EXIT_DOWN) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- finding things


def find_file(given: str | None, env: str | None, default: str) -> Path:
    """`given`, else `$env`, else `default`; a relative path in the current directory,
    else in the project root (where supervisord runs the programs)."""
    name = given or (os.environ.get(env) if env else None) or default
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path if (PROJECT_ROOT / path).exists() else path


def admin_settings(path: Path) -> AdminSettings:
    """The `[admin]` section of the system's config, read alone: the front still runs
    with what it loaded even while the rest of the file is being edited (or is wrong:
    `pbx reload` is how the front tells why)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return AdminSettings.model_validate(data.get("admin", {}))
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc} (--config)") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path}: invalid TOML: {exc}", EXIT_BAD_FILE) from None
    except ValidationError as exc:
        raise CliError(f"{path}: key admin: {exc.errors()[0]['msg']}", EXIT_BAD_FILE) from None


def supervisor_socket(conf: Path) -> str:
    """The unix socket of `[unix_http_server] file` in supervisord.conf."""
    parser = configparser.RawConfigParser()
    if not parser.read(conf):
        raise CliError(f"cannot read {conf} (--supervisord-conf)")
    try:
        value = parser.get("unix_http_server", "file")
    except (configparser.NoSectionError, configparser.NoOptionError):
        raise CliError(f"{conf}: no [unix_http_server] file (the socket `pbx` asks "
                       "supervisord through)") from None
    value = value.replace("%(here)s", str(conf.resolve().parent))
    return str((conf.resolve().parent / value).resolve())


# ---------------------------------------------------------------- the admin listener


class Admin:
    """The front's admin API (pbx.admin), with the config's token."""

    def __init__(self, config: Path) -> None:
        settings = admin_settings(config)
        self.listen = settings.listen
        self.token = settings.token
        self.config = str(config)
        self.base = f"http://{self.listen}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, path: str, method: str = "GET",
                ok: Sequence[int] = (200,)) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + path, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code in ok:
                return exc.code, json.loads(body)
            if exc.code == 401:
                raise CliError(f"the admin listener at {self.listen} refused the token: "
                               f"check [admin] token in {self.config}") from None
            raise CliError(f"{method} {path}: HTTP {exc.code}: "
                           f"{body.decode(errors='replace').strip()}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"the front's admin listener at {self.listen} ([admin] listen in "
                           f"{self.config}) does not answer ({reason}): is the system "
                           "running? (`make run`, or supervisord -c supervisord.conf)"
                           ) from None

    def get(self, path: str) -> Any:
        return self.request(path)[1]


# ---------------------------------------------------------------- supervisord


def supervisor_processes(conf: Path) -> list[dict[str, Any]]:
    """supervisord's `getAllProcessInfo` over its unix socket (XML-RPC)."""
    from supervisor.xmlrpc import SupervisorTransport

    sock = supervisor_socket(conf)
    if not Path(sock).exists():
        raise CliError(f"supervisord is not running: no socket {sock} ({conf}); start it "
                       f"with `make run` or supervisord -c {conf}")
    proxy = xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{sock}"))
    try:
        processes: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()  # type: ignore[assignment]
        return list(processes)
    except OSError as exc:
        raise CliError(f"supervisord is not running: {sock}: {exc.strerror or exc}") from None


def signal_executors(conf: Path) -> list[str]:
    """SIGHUP to every running IVR executor supervisord runs (program `ivr`): they take
    the new `[ivrs.*]` for their next jump. The names signalled."""
    from supervisor.xmlrpc import SupervisorTransport

    sock = supervisor_socket(conf)
    proxy = xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{sock}"))
    names = []
    processes: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()  # type: ignore[assignment]
    for info in processes:
        if info["group"] == "ivr" and info["statename"] == "RUNNING":
            proxy.supervisor.signalProcess(f"{info['group']}:{info['name']}", "HUP")
            names.append(info["name"])
    return names


# ---------------------------------------------------------------- formatting


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def clock(at: float | None) -> str:
    if not at:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def call_state(call: dict[str, Any]) -> str:
    if call.get("bridged_to"):
        return f"bridged {call['bridged_to']}"
    if call.get("queue"):
        return f"queue {call['queue']}"
    if call.get("ivr"):
        return "ivr"
    return "answered" if call.get("answered_at") else "setting up"


def sip_call_ids(item: dict[str, Any]) -> list[str]:
    """The SIP Call-IDs of a call's legs (the caller's first) in an /api record."""
    ids = list(item.get("sip_call_ids") or [])
    return ids or ([item["sip_call_id"]] if item.get("sip_call_id") else [])


def calls_table(calls: list[dict[str, Any]], now: float) -> str:
    rows = [[c["call_id"], (sip_call_ids(c) or ["-"])[0], str(c.get("caller")),
             str(c.get("callee")), str(c.get("route") or "-"), call_state(c),
             duration(now - c["started_at"]), str(c.get("session_id") or "-")]
            for c in sorted(calls, key=lambda c: c["started_at"])]
    return table(["CALL", "SIP CALL-ID", "FROM", "TO", "ROUTE", "STATE", "AGE", "SESSION"],
                 rows) + f"\n{len(calls)} call(s)"


# ---------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace) -> int:
    code = EXIT_OK
    conf = find_file(args.supervisord_conf, None, "supervisord.conf")
    try:
        processes = supervisor_processes(conf)
        print(f"programs (supervisord, {conf}):")
        rows = []
        for p in processes:
            name = p["name"] if p["group"] == p["name"] else f"{p['group']}:{p['name']}"
            rows.append([f"  {name}", p["statename"], p["description"]])
            code = code if p["statename"] == "RUNNING" else EXIT_DOWN
        print(table(["  PROGRAM", "STATE", "DETAIL"], rows))
    except CliError as exc:
        print(f"programs: {exc}")
        code = EXIT_DOWN
    admin = Admin(find_file(args.config, CONFIG_ENV, DEFAULT_CONFIG_PATH))
    try:
        status = admin.get("/api/status")
    except CliError as exc:
        print(f"front: {exc}")
        return EXIT_DOWN
    now = time.time()
    reloaded = (f"reloaded {duration(now - status['reloaded_at'])} ago"
                if status.get("reloaded_at") else "not reloaded")
    print(f"\nfront ({admin.listen}): config {status['config']}, up "
          f"{duration(now - status['started_at'])}, {reloaded}")
    media = status["media_workers"]
    print(f"\nmedia workers ({len(media)}):")
    if media:
        print(table(["  WORKER", "RTP ADDRESS", "CALLS", "CAPACITY", "PORTS FREE", "HEARTBEAT"],
                    [[f"  {w['id']}", w["address"] or "-", str(w["load"]), str(w["capacity"]),
                      str(w["ports_free"]), f"{w['heartbeat_age_s']:.1f}s ago"]
                     for w in media]))
    else:
        print("  none has joined the front (starting, or see logs/media-*.log)")
    executors = status["executors"]
    print(f"\nIVR executors ({len(executors)}):")
    if executors:
        print(table(["  EXECUTOR", "SESSIONS", "CAPACITY", "HEARTBEAT"],
                    [[f"  {e['id']}", str(e["load"]), str(e["capacity"]),
                      f"{e['heartbeat_age_s']:.1f}s ago"] for e in executors]))
    else:
        print("  none has joined the front (starting, or see logs/ivr-*.log)")
    print(f"\ncalls: {status['calls']} (IVR sessions: {status['sessions']})")
    if not media or not executors:
        code = EXIT_DOWN
    return code


def cmd_calls(args: argparse.Namespace) -> int:
    admin = Admin(find_file(args.config, CONFIG_ENV, DEFAULT_CONFIG_PATH))
    if args.watch is None:
        print(calls_table(admin.get("/api/calls"), time.time()))
        return EXIT_OK
    shown = 0
    with contextlib.suppress(KeyboardInterrupt):
        while args.count is None or shown < args.count:
            text = calls_table(admin.get("/api/calls"), time.time())
            if sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(f"{time.strftime('%H:%M:%S')}  (every {args.watch:g} s, Ctrl-C stops)\n"
                  f"{text}\n", flush=True)
            shown += 1
            if args.count is None or shown < args.count:
                time.sleep(args.watch)
    return EXIT_OK


def _sessions_of(admin: Admin, wanted: str) -> list[str]:
    """The IVR sessions `wanted` names: a session id, or a call's id or the SIP
    Call-ID of one of its legs, among the kept traces and the calls (in progress, or
    recently finished where the front keeps them)."""
    calls = admin.get("/api/calls?" + urllib.parse.urlencode({"sip_call_id": wanted}))
    call_ids = {wanted} | {c["call_id"] for c in calls
                           if wanted == c.get("call_id") or wanted in sip_call_ids(c)}
    found = {c["session_id"] for c in calls
             if c["call_id"] in call_ids and c.get("session_id")}
    for summary in admin.get("/api/traces?limit=1000"):
        if (summary.get("session_id") == wanted or summary.get("call_id") in call_ids
                or wanted in sip_call_ids(summary)):
            found.add(summary["session_id"])
    return sorted(found)


def _event_text(step: dict[str, Any]) -> str:
    """What the step sent the provider: its event and the fields that matter."""
    request = step.get("request")
    if request is None:  # a step the executor took without asking the provider
        return f"{step['trigger']} (local)"
    event = request.get("event") if isinstance(request, dict) else None
    if isinstance(event, dict):
        detail = {k: v for k, v in event.items() if k != "type" and v not in (None, "", {})}
        return f"{event.get('type', step['trigger'])}" + (
            f" {json.dumps(detail, separators=(',', ':'))}" if detail else "")
    return str(step["trigger"])


def cmd_trace(args: argparse.Namespace) -> int:
    admin = Admin(find_file(args.config, CONFIG_ENV, DEFAULT_CONFIG_PATH))
    sessions = _sessions_of(admin, args.id)
    if not sessions:
        print(f"pbx: no IVR session or call {args.id!r} among the kept traces "
              "(`pbx calls` lists calls in progress, /api/traces the recent sessions)",
              file=sys.stderr)
        return EXIT_DOWN
    for session_id in sessions:
        steps = admin.get(f"/api/traces/{urllib.parse.quote(session_id, safe='')}")
        if args.json:
            print(json.dumps(steps, indent=2))
            continue
        call_id = steps[0]["call_id"] if steps else "?"
        print(f"session {session_id} (call {call_id}), {len(steps)} step(s)")
        rows = []
        for step in steps:
            action = step.get("action_type") or "-"
            chained = (step.get("action") or {}).get("next")
            if isinstance(chained, dict) and chained.get("type"):
                action += f" > {chained['type']}"  # a prompt's `next`
            if step.get("end_reason"):
                action += f" (end: {step['end_reason']})"
            rows.append([str(step["step_index"]), clock(step.get("at")), _event_text(step),
                         action, f"{step.get('duration_ms', 0):.1f} ms",
                         step.get("error") or ""])
        print(table(["STEP", "AT", "EVENT SENT", "ACTION RETURNED", "TOOK", "ERROR"], rows))
        print()
    return EXIT_OK


async def _follow(admin: Admin, query: dict[str, str], count: int | None,
                  seconds: float | None) -> int:
    from aiohttp import ClientError, ClientSession, WSMsgType

    url = f"ws://{admin.listen}/ws/events"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    seen = 0
    deadline = None if seconds is None else asyncio.get_running_loop().time() + seconds
    try:
        async with ClientSession() as session, session.ws_connect(
                url, headers=admin._headers(), heartbeat=20) as ws:
            while count is None or seen < count:
                timeout = (None if deadline is None
                           else deadline - asyncio.get_running_loop().time())
                if timeout is not None and timeout <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(ws.receive(), timeout)
                except TimeoutError:
                    break
                if msg.type != WSMsgType.TEXT:
                    break
                print(msg.data, flush=True)
                seen += 1
    except (ClientError, OSError) as exc:
        raise CliError(f"the front's admin listener at {admin.listen} ([admin] listen in "
                       f"{admin.config}) does not answer ({exc}): is the system running? "
                       "(`make run`, or supervisord -c supervisord.conf)") from None
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    admin = Admin(find_file(args.config, CONFIG_ENV, DEFAULT_CONFIG_PATH))
    query = {k: v for k, v in (("session_id", args.session), ("call_id", args.call),
                               ("type", args.type)) if v}
    seconds = None if args.follow else args.seconds
    try:
        return asyncio.run(_follow(admin, query, args.count, seconds))
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_config(args.file)
        planes.check_keys(settings, "front" if args.role == "front" else "client")
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_BAD_FILE
    print(f"{args.file}: OK ({len(settings.users)} users, {len(settings.routes)} routes, "
          f"{len(settings.ivrs)} IVRs, {len(settings.queues)} queues, "
          f"{len(settings.skill_groups)} skill groups)")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        admin = Admin(find_file(args.config, CONFIG_ENV, DEFAULT_CONFIG_PATH))
    except CliError as exc:
        if exc.code != EXIT_BAD_FILE:
            raise
        print(f"reload refused, the running settings are kept: {exc}", file=sys.stderr)
        return EXIT_BAD_FILE
    _, report = admin.request("/api/reload", "POST", ok=(200, 422))
    if not report["ok"]:
        print(f"reload refused, the running settings are kept: {report['error']}",
              file=sys.stderr)
        return EXIT_BAD_FILE
    changed = report["changed"]
    print(f"{report['file']}: " + (f"reloaded {', '.join(changed)}" if changed
                                   else "dial plan unchanged"))
    conf = find_file(args.supervisord_conf, None, "supervisord.conf")
    try:
        executors = signal_executors(conf)
        print(f"IVR executors told to reload: {len(executors)}")
    except (CliError, OSError, xmlrpc.client.Fault) as exc:
        print(f"IVR executors not told ([ivrs.*] changes reach them at their restart, "
              f"or with SIGHUP): {exc}")
    if report["restart_needed"]:
        print("needs a restart (still running with the old values): "
              + ", ".join(report["restart_needed"]))
        return EXIT_RESTART_NEEDED
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pbx", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"the system's config (default ${CONFIG_ENV}, "
                   f"else {DEFAULT_CONFIG_PATH})")
    p.add_argument("--supervisord-conf", help="supervisord's config (default "
                   "supervisord.conf)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="programs, workers, executors, calls").set_defaults(
        run=cmd_status)
    calls = sub.add_parser("calls", help="calls in progress")
    calls.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                       help="refresh every SECONDS (default 1) until Ctrl-C")
    calls.add_argument("--count", type=int, help="with --watch: stop after COUNT tables")
    calls.set_defaults(run=cmd_calls)
    trace = sub.add_parser("trace", help="the steps of an IVR session")
    trace.add_argument("id", metavar="SESSION|CALL-ID")
    trace.add_argument("--json", action="store_true", help="the steps as JSON")
    trace.set_defaults(run=cmd_trace)
    events = sub.add_parser("events", help="live events, one JSON object a line")
    events.add_argument("--follow", "-f", action="store_true",
                        help="until Ctrl-C (else for --seconds)")
    events.add_argument("--seconds", type=float, default=5.0)
    events.add_argument("--count", type=int, help="stop after COUNT events")
    events.add_argument("--session", help="only this session's events")
    events.add_argument("--call", help="only this call's events")
    events.add_argument("--type", choices=["ivr_step_trace", "call"])
    events.set_defaults(run=cmd_events)
    config = sub.add_parser("config", help="configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate FILE as the programs do at start")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--role", choices=["front", "worker"], default="front",
                       help="whose CURVE keys to check (a worker host's file: worker)")
    check.set_defaults(run=cmd_config_check)
    sub.add_parser("reload", help="apply the config file's dial plan").set_defaults(
        run=cmd_reload)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except CliError as exc:
        print(f"pbx: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # `pbx calls | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
