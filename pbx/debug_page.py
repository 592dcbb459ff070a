"""The `/debug` trace viewer: one self-contained HTML page (no external assets).

It lists recent IVR sessions from `/api/traces`, shows a session's steps from
`/api/traces/{session_id}`, and follows `/ws/events` live: new steps appear in the
open session, new sessions at the top of the list, call events in the event log.
"""

DEBUG_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pbx debug</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 0; display: grid;
       grid-template-columns: 330px 1fr; grid-template-rows: auto 1fr 160px; height: 100vh; }
header { grid-column: 1 / 3; padding: 6px 10px; background: #223; color: #eee; }
header span { margin-left: 1em; color: #9c9; }
#sessions { overflow: auto; border-right: 1px solid #ccc; }
#sessions div { padding: 4px 8px; border-bottom: 1px solid #eee; cursor: pointer; }
#sessions div:hover, #sessions div.sel { background: #eef; }
#sessions small { color: #777; display: block; }
#steps { overflow: auto; padding: 0 8px; }
#log { grid-column: 1 / 3; overflow: auto; border-top: 1px solid #ccc; padding: 4px 8px;
       font-family: monospace; font-size: 12px; background: #fafafa; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 3px 6px; border-bottom: 1px solid #eee; }
td.err { color: #b00; }
pre { margin: 0; white-space: pre-wrap; word-break: break-all; max-height: 12em; overflow: auto; }
</style>
</head>
<body>
<header>pbx debug — IVR step traces <span id="status">connecting…</span></header>
<div id="sessions"></div>
<div id="steps"><p>Pick a session.</p></div>
<div id="log"></div>
<script>
"use strict";
let current = null;
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"]/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const time = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "";

// With `[admin] token` set, the page is opened as /debug?token=...; it passes it on.
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => token ?
  path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path;

async function loadSessions() {
  const res = await fetch(withToken("/api/traces?limit=200"));
  const list = await res.json();
  $("sessions").innerHTML = "";
  for (const s of list) addSession(s, false);
}

function addSession(s, top) {
  let el = document.getElementById("s-" + s.session_id);
  if (!el) {
    el = document.createElement("div");
    el.id = "s-" + s.session_id;
    el.onclick = () => showSession(s.session_id);
  }
  el.innerHTML = "<b>" + esc(s.session_id) + "</b><small>" + time(s.last_at) + " · " +
    esc(s.steps ?? "") + " steps · " + esc(s.last_action ?? "") +
    (s.end_reason ? " · " + esc(s.end_reason) : "") + "</small>";
  if (s.session_id === current) el.className = "sel";
  const box = $("sessions");
  if (top) box.prepend(el); else box.append(el);
}

async function showSession(id) {
  current = id;
  for (const el of $("sessions").children) el.className = el.id === "s-" + id ? "sel" : "";
  const res = await fetch(withToken("/api/traces/" + encodeURIComponent(id)));
  const steps = res.ok ? await res.json() : [];
  $("steps").innerHTML = "<h3>" + esc(id) + "</h3><table><thead><tr><th>#</th><th>time</th>" +
    "<th>trigger</th><th>action</th><th>step</th><th>ms</th><th>error / end</th>" +
    "<th>detail</th></tr></thead><tbody id='rows'></tbody></table>";
  for (const s of steps) addStep(s);
}

function addStep(s) {
  const row = document.createElement("tr");
  const detail = {action: s.action, request: s.request, extra: s.extra};
  row.innerHTML = "<td>" + esc(s.step_index) + "</td><td>" + time(s.at) + "</td><td>" +
    esc(s.trigger) + "</td><td>" + esc(s.action_type) + "</td><td>" + esc(s.step_id) +
    (s.step_name ? "<br><small>" + esc(s.step_name) + "</small>" : "") + "</td><td>" +
    esc((s.duration_ms ?? 0).toFixed(1)) + "</td><td class='err'>" + esc(s.error) +
    (s.end_reason ? " " + esc(s.end_reason) : "") + "</td><td><pre>" +
    esc(JSON.stringify(detail, null, 1)) + "</pre></td>";
  $("rows").append(row);
}

function logLine(text) {
  const line = document.createElement("div");
  line.textContent = new Date().toLocaleTimeString() + " " + text;
  $("log").prepend(line);
  while ($("log").children.length > 300) $("log").lastChild.remove();
}

function connect() {
  const proto = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(proto + location.host + withToken("/ws/events"));
  ws.onopen = () => { $("status").textContent = "live"; };
  ws.onclose = () => { $("status").textContent = "disconnected, retrying…";
                       setTimeout(connect, 2000); };
  ws.onmessage = (msg) => {
    const ev = JSON.parse(msg.data);
    if (ev.type === "ivr_step_trace") {
      addSession({session_id: ev.session_id, last_at: ev.at, last_action: ev.action_type,
                  end_reason: ev.end_reason, steps: ev.step_index + 1}, true);
      if (ev.session_id === current && $("rows")) addStep(ev);
      logLine("step " + ev.session_id + " #" + ev.step_index + " " + (ev.action_type || ev.trigger));
    } else {
      logLine(ev.type + " " + (ev.event || "") + " " + (ev.call_id || "") +
              (ev.end_reason ? " " + ev.end_reason : ""));
    }
  };
}

loadSessions().then(connect, connect);
</script>
</body>
</html>
"""
