"""The `/debug` trace viewer: one self-contained HTML page (no external assets: it
works offline, and pbx/admin.py serves it under a CSP that forbids any).

Three panes: the calls in progress (from `/api/calls`, then kept live by the `call`
events of `/ws/events`: a row appears on `started`, changes state on answered/bridged/
queued and goes on `ended`), the recent IVR sessions (`/api/traces`, live from
`ivr_step_trace` events), and the selected session's step timeline
(`/api/traces/{session_id}`, live too): for each step the event sent to the provider,
the action it returned, how long the step took (a bar scaled to the session's slowest
step) and any error, with the raw request and action one click away.

With `[admin] token` set, the page asks for the token on a 401 and keeps it in the tab's
sessionStorage; it sends it as `Authorization: Bearer` and, for the WebSocket, as the
`pbx.token.<base64url>` subprotocol, never in a URL (so never in a proxy's access log or
the browser's history). A link may carry it as `#token=...` (a fragment is never sent to
the server): the page takes it and removes it from the address bar.
"""

DEBUG_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<title>pbx debug</title>
<style>
* { box-sizing: border-box; }
body { font: 13px/1.4 system-ui, sans-serif; margin: 0; display: grid; height: 100vh;
       grid-template-columns: minmax(340px, 38%) 1fr; grid-template-rows: auto 1fr 130px;
       color: #222; }
header { grid-column: 1 / 3; padding: 6px 10px; background: #223; color: #eee;
         display: flex; gap: 1em; align-items: center; }
header b { font-size: 14px; }
#status { color: #9c9; }
#status.down { color: #f99; }
#tokenform { margin-left: auto; display: none; }
#tokenform.shown { display: block; }
#left { display: grid; grid-template-rows: auto auto 1fr; overflow: hidden;
        border-right: 1px solid #ccc; }
h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: #556;
     margin: 0; padding: 6px 8px; background: #eef0f4; border-bottom: 1px solid #ddd; }
h2 span { font-weight: normal; text-transform: none; }
#callsbox { max-height: 40vh; overflow: auto; }
#sessions { overflow: auto; }
#sessions div { padding: 4px 8px; border-bottom: 1px solid #eee; cursor: pointer; }
#sessions div:hover, #sessions div.sel { background: #eef; }
#sessions div.haserr b::after { content: " ⚠"; color: #b00; }
#sessions small { color: #777; display: block; }
#timeline { overflow: auto; padding: 0 8px 8px; }
#log { grid-column: 1 / 3; overflow: auto; border-top: 1px solid #ccc; padding: 4px 8px;
       font-family: monospace; font-size: 12px; background: #fafafa; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 3px 6px; border-bottom: 1px solid #eee; }
th { font-weight: 600; color: #556; }
#calls tr { cursor: pointer; }
#calls tr:hover { background: #eef; }
.state { border-radius: 3px; padding: 0 4px; font-size: 11px; background: #ddd; }
.state-answered, .state-ivr { background: #cfe8cf; }
.state-bridged { background: #cde; }
.state-queued { background: #fec; }
.empty td { color: #888; font-style: italic; }
tr.error td { background: #fff0f0; }
td.err { color: #b00; font-weight: 600; }
td.ms, td.at { white-space: nowrap; }
.bar { height: 4px; background: #69c; margin-top: 2px; min-width: 1px; }
tr.error .bar { background: #c66; }
details pre { margin: 0; white-space: pre-wrap; word-break: break-all; max-height: 14em;
              overflow: auto; font-size: 11px; }
small.sub { color: #777; display: block; }
code { font-size: 12px; }
</style>
</head>
<body>
<header><b>pbx debug</b> <span id="status">connecting…</span>
<form id="tokenform" autocomplete="off">admin token
  <input id="token" type="password" size="24"> <button>use</button></form></header>
<div id="left">
  <h2>Live calls <span id="callcount"></span></h2>
  <div id="callsbox"><table><thead><tr><th>call</th><th>from → to</th><th>route</th>
    <th>state</th><th>time</th></tr></thead><tbody id="calls"></tbody></table></div>
  <div id="sessions"><h2>IVR sessions</h2></div>
</div>
<div id="timeline"><p>Pick a session (or a live call in IVR) to see its steps.</p></div>
<div id="log"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const clock = (t) => t ? new Date(t * 1000).toLocaleTimeString([], {hour12: false}) : "";
const secs = (s) => s < 60 ? s.toFixed(0) + " s" :
  Math.floor(s / 60) + ":" + String(Math.floor(s % 60)).padStart(2, "0");

// ---------------------------------------------------------------- the token
// Never in a URL: a #token=... fragment (not sent to servers) is taken and removed.
let token = sessionStorage.getItem("pbx-admin-token");
if (location.hash.startsWith("#token=")) {
  token = decodeURIComponent(location.hash.slice(7));
  sessionStorage.setItem("pbx-admin-token", token);
  history.replaceState(null, "", location.pathname);
}
const b64url = (s) => btoa(String.fromCharCode(...new TextEncoder().encode(s)))
  .replace(/[+]/g, "-").replace(/[/]/g, "_").replace(/=+$/, "");

function needToken() {
  $("tokenform").className = "shown";
  setStatus("admin token required", true);
}
$("tokenform").onsubmit = (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem("pbx-admin-token", token);
  $("tokenform").className = "";
  reconnect();
};

async function api(path) {
  const res = await fetch(path, {headers: token ? {"Authorization": "Bearer " + token} : {},
                                 cache: "no-store", referrerPolicy: "no-referrer"});
  if (res.status === 401) { needToken(); throw new Error("token required"); }
  if (!res.ok) throw new Error(path + ": HTTP " + res.status);
  return res.json();
}

function setStatus(text, down) {
  $("status").textContent = text;
  $("status").className = down ? "down" : "";
}

// ---------------------------------------------------------------- live calls
const calls = new Map();      // call_id -> {caller, callee, route, started_at, state, ...}
const ended = new Set();      // ended while a snapshot was on its way
const STATE_OF = {started: "ringing", answered: "answered", bridged: "bridged",
                  ws_bridged: "bridged", queued: "queued"};

function callState(c) {
  if (c.bridged_to) return "bridged";
  if (c.queue) return "queued";
  if (c.ivr) return "ivr";
  return c.answered_at ? "answered" : "ringing";
}

function renderCalls() {
  const rows = [];
  const now = Date.now() / 1000;
  for (const [id, c] of calls) {
    rows.push("<tr data-call-id='" + esc(id) + "' data-session-id='" + esc(c.session_id) +
      "'><td><code>" + esc(id) + "</code>" +
      (c.sip_call_id ? "<small class='sub'>" + esc(c.sip_call_id) + "</small>" : "") +
      "</td><td>" + esc(c.caller) + " → " + esc(c.callee) + "</td><td>" + esc(c.route) +
      "</td><td><span class='state state-" + esc(c.state) + "'>" + esc(c.state) +
      "</span></td><td>" + (c.started_at ? secs(Math.max(0, now - c.started_at)) : "") +
      "</td></tr>");
  }
  $("calls").innerHTML = rows.length ? rows.join("") :
    "<tr class='empty'><td colspan='5'>no calls in progress</td></tr>";
  $("callcount").textContent = "(" + calls.size + ")";
}
$("calls").onclick = (e) => {
  const row = e.target.closest("tr[data-call-id]");
  if (row && row.dataset.sessionId) showSession(row.dataset.sessionId);
};

async function loadCalls() {
  const list = await api("/api/calls");
  calls.clear();
  for (const c of list) {
    if (!ended.has(c.call_id)) calls.set(c.call_id, {...c, state: callState(c)});
  }
  renderCalls();
}

function onCallEvent(ev) {
  if (ev.event === "ended") {
    calls.delete(ev.call_id);
    ended.add(ev.call_id);
    if (ended.size > 2000) ended.delete(ended.values().next().value);
  } else {
    const c = calls.get(ev.call_id) || {call_id: ev.call_id, state: "ringing"};
    for (const k of ["caller", "callee", "route", "started_at", "answered_at",
                     "sip_call_id", "queue", "agent"]) {
      if (ev[k] !== undefined) c[k] = ev[k];
    }
    if (STATE_OF[ev.event]) c.state = STATE_OF[ev.event];
    calls.set(ev.call_id, c);
  }
  renderCalls();
}

// ---------------------------------------------------------------- sessions
let current = null;
let currentSteps = [];

function addSession(s, top) {
  let el = document.getElementById("s-" + s.session_id);
  if (!el) {
    el = document.createElement("div");
    el.id = "s-" + s.session_id;
    el.dataset.sessionId = s.session_id;
    el.onclick = () => showSession(s.session_id);
  }
  el.innerHTML = "<b>" + esc(s.session_id) + "</b><small>call " + esc(s.call_id) + " · " +
    clock(s.last_at) + " · " + esc(s.steps ?? "") + (s.steps === 1 ? " step · " : " steps · ") + esc(s.last_action ?? "") +
    (s.end_reason ? " · " + esc(s.end_reason) : "") + "</small>";
  el.classList.toggle("sel", s.session_id === current);
  if (s.errors) el.classList.add("haserr");
  if (top) $("sessions").children[0].after(el); else $("sessions").append(el);
}

async function loadSessions() {
  const list = await api("/api/traces?limit=200");
  for (const el of [...$("sessions").querySelectorAll("div")]) el.remove();
  for (const s of list) addSession(s, false);
}

async function showSession(id) {
  current = id;
  for (const el of $("sessions").querySelectorAll("div")) {
    el.classList.toggle("sel", el.dataset.sessionId === id);
  }
  let steps = [];
  try { steps = await api("/api/traces/" + encodeURIComponent(id)); } catch (e) { }
  if (current !== id) return;
  currentSteps = [];
  $("timeline").innerHTML = "<h3>session <code>" + esc(id) + "</code> <small id='tlcall'>" +
    "</small></h3><table><thead><tr><th>#</th><th>time</th><th>event sent</th>" +
    "<th>action returned</th><th>step</th><th>took</th><th>error / end</th>" +
    "<th>detail</th></tr></thead><tbody id='steps' data-session-id='" + esc(id) +
    "'></tbody></table>";
  for (const s of steps) addStep(s);
}

function eventText(s) {
  const ev = (s.request && s.request.event) || {};
  const more = Object.entries(ev).filter(([k]) => k !== "type")
    .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ");
  return "<b>" + esc(ev.type || s.trigger) + "</b>" +
    (ev.type && ev.type !== s.trigger ? "<small class='sub'>" + esc(s.trigger) + "</small>" : "") +
    (more ? "<small class='sub'>" + esc(more) + "</small>" : "");
}

function actionText(s) {
  const a = s.action || {};
  const what = a.file || a.text || a.target || a.url || "";
  return "<b>" + esc(s.action_type || "—") + "</b>" +
    (what ? "<small class='sub'>" + esc(String(what).slice(0, 80)) + "</small>" : "");
}

function addStep(s) {
  currentSteps.push(s);
  $("tlcall").textContent = "call " + (s.call_id || "");
  const first = currentSteps[0].at || 0;
  const row = document.createElement("tr");
  row.dataset.stepIndex = s.step_index;
  if (s.error) row.className = "error";
  const detail = {request: s.request, action: s.action, extra: s.extra};
  row.innerHTML = "<td>" + esc(s.step_index) + "</td><td class='at'>" + clock(s.at) +
    "<small class='sub'>+" + ((s.at || first) - first).toFixed(2) + " s</small></td><td>" +
    eventText(s) + "</td><td class='action'>" + actionText(s) + "</td><td>" +
    esc(s.step_id) + (s.step_name ? "<small class='sub'>" + esc(s.step_name) + "</small>" : "") +
    "</td><td class='ms'>" + esc((s.duration_ms ?? 0).toFixed(1)) + " ms<div class='bar'>" +
    "</div></td><td class='err'>" + esc(s.error) +
    (s.end_reason ? "<small class='sub'>end: " + esc(s.end_reason) + "</small>" : "") +
    "</td><td><details><summary>json</summary><pre>" +
    esc(JSON.stringify(detail, null, 1)) + "</pre></details></td>";
  $("steps").append(row);
  // Bars scaled to the slowest step of the session.
  const slowest = Math.max(1, ...currentSteps.map((x) => x.duration_ms || 0));
  $("steps").querySelectorAll("tr").forEach((tr, i) => {
    tr.querySelector(".bar").style.width =
      (100 * (currentSteps[i].duration_ms || 0) / slowest).toFixed(1) + "%";
  });
}

// ---------------------------------------------------------------- the event log
function logLine(text, err) {
  const line = document.createElement("div");
  line.textContent = clock(Date.now() / 1000) + " " + text;
  if (err) line.style.color = "#b00";
  $("log").prepend(line);
  while ($("log").children.length > 300) $("log").lastChild.remove();
}

// ---------------------------------------------------------------- the WebSocket
let ws = null;
let retry = null;

function onEvent(ev) {
  if (ev.type === "ivr_step_trace") {
    addSession({session_id: ev.session_id, call_id: ev.call_id, last_at: ev.at,
                last_action: ev.action_type, end_reason: ev.end_reason,
                steps: ev.step_index, errors: ev.error ? 1 : 0}, true);
    const c = calls.get(ev.call_id);
    if (c) {
      c.session_id = ev.session_id;
      if (c.state === "answered" || c.state === "ringing") c.state = "ivr";
      renderCalls();
    }
    if (ev.session_id === current && $("steps")) addStep(ev);
    logLine("step " + ev.session_id + " #" + ev.step_index + " " + ev.trigger + " → " +
            (ev.action_type || "") + (ev.error ? " ERROR " + ev.error : ""), !!ev.error);
  } else if (ev.type === "call") {
    onCallEvent(ev);
    logLine("call " + ev.call_id + " " + ev.event +
            (ev.end_reason ? " " + ev.end_reason : ""));
  }
}

function connect() {
  clearTimeout(retry);
  const proto = location.protocol === "https:" ? "wss://" : "ws://";
  const protocols = ["pbx.events"];
  if (token) protocols.push("pbx.token." + b64url(token));
  ws = new WebSocket(proto + location.host + "/ws/events", protocols);
  ws.onopen = () => {
    setStatus("live");
    // After the socket is up, so no event falls between the snapshot and the stream.
    loadCalls().catch((e) => logLine(String(e), true));
    loadSessions().then(() => current && showSession(current))
      .catch((e) => logLine(String(e), true));
  };
  ws.onclose = () => {
    if ($("tokenform").className === "shown") return;
    setStatus("disconnected, retrying…", true);
    retry = setTimeout(reconnect, 2000);
  };
  ws.onmessage = (msg) => onEvent(JSON.parse(msg.data));
}

// A WebSocket refused with 401 only says "closed": ask /api/calls why first.
function reconnect() {
  if (ws) { ws.onclose = null; ws.close(); }
  api("/api/calls").then(connect, (e) => {
    logLine(String(e), true);
    if ($("tokenform").className !== "shown") retry = setTimeout(reconnect, 2000);
  });
}

setInterval(renderCalls, 1000);
renderCalls();
reconnect();
</script>
</body>
</html>
"""
