"""A pizza order line: a step-mode IVR provider written from the provider guide (docs/).

    .venv/bin/python examples/pizza_provider.py [port]      # default 8090

Serves, on 127.0.0.1:

* ``POST /ivr/step``             a step: ProviderContext in, ActionNode out
* ``POST /ivr/step/start``       session created (SessionContext)
* ``POST /ivr/step/end``         session removed ({"reason", "session_id"})
* ``POST /ivr/step/dtmf-match``  a menu entry matched locally (logged)
* ``GET  /api/price``            the price service the IVR's ``api`` action calls:
  ``?dtmf_input=<quantity>`` -> ``{"quantity", "unit_price_cents", "total_cents", "total_text"}``,
  400 for a missing or out-of-range quantity.

The flow:

1. a TTS welcome (interruptible) chained into the main ``dtmf_menu``:
   1 = order, 2 = opening hours (TTS, then the menu again), 0 = the operator;
2. order: a TTS question chained into ``collect_dtmf`` (1-2 digits, ``#`` ends);
   the price service refuses 0 and more than 20;
3. ``api`` GET /api/price with ``variables: "dtmf_input"`` -> ``api_response``;
4. the total read back by TTS, chained into a confirmation ``dtmf_menu``:
   1 = confirm, 2 = cancel; each plays a TTS sentence, then the provider hangs up
   with ``sounds/goodbye.wav``.

Wrong keys and silence (``dtmf_menu_invalid`` / ``dtmf_menu_timeout``), no digits
(``dtmf_timeout``), a bad quantity: a notice and the same question again; the third
miss in a row ends the call politely. An ``error`` event (e.g. no text to speech on
the PBX): the caller goes to the operator. State per session, keyed by ``session_id``,
created on ``/start`` or on the first step for an unknown session, dropped on ``/end``
(and swept after an hour for sessions whose ``/end`` never came).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("pizza")

UNIT_PRICE_CENTS = 950  # one pizza, 9.50
MAX_QUANTITY = 20
MAX_MISSES = 3
SESSION_TTL_S = 3600
OPERATOR = "operator"
HOURS_TEXT = ("We are open Monday to Friday from 11 a.m. to 10 p.m., "
              "and Saturday and Sunday from noon to 11 p.m.")

GOODBYE: dict[str, Any] = {"type": "hangup", "prompt": "sounds/goodbye.wav"}
TO_OPERATOR: dict[str, Any] = {"type": "transfer", "target": OPERATOR}


def main_menu() -> dict[str, Any]:
    return {
        "type": "dtmf_menu",
        "greeting_text": "To order pizza, press 1. For our opening hours, press 2. "
                         "To speak to the operator, press 0.",
        "timeout_ms": 5000,
        "entries": {
            "1": ask_quantity("How many pizzas would you like?"),
            # Played, then `audio_complete` with the variable menu=hours: menu again.
            # Not interruptible: a key pressed during it is kept (type-ahead) for the menu.
            "2": {"type": "prompt", "tts_text": HOURS_TEXT, "interruptible": False,
                  "variables": {"menu": "hours"}},
            "0": dict(TO_OPERATOR),
        },
    }


def ask_quantity(question: str) -> dict[str, Any]:
    return {
        "type": "prompt",
        "tts_text": f"{question} Enter a number from 1 to {MAX_QUANTITY}, "
                    "then press the pound key.",
        "interruptible": True,
        "variables": {"menu": "order"},
        # A quantity has 1 or 2 digits, but max_digits is 3: with 2, the `#` after "20"
        # would come after the collection ended, be kept as type-ahead and stop the
        # total's read-back (docs/decisions.md, Collect 7). The service refuses > 20.
        "next": {"type": "collect_dtmf", "min_digits": 1, "max_digits": 3,
                 "terminator": "#", "timeout_ms": 6000},
    }


def confirm_menu(total_text: str, quantity: int) -> dict[str, Any]:
    return {
        "type": "dtmf_menu",
        "greeting_text": "To confirm your order, press 1. To cancel it, press 2.",
        "timeout_ms": 6000,
        "entries": {
            "1": {"type": "prompt", "variables": {"order": "confirmed"},
                  "tts_text": f"Thank you. Your order of {quantity} "
                              f"{'pizza' if quantity == 1 else 'pizzas'} is confirmed. "
                              "It will be ready in 30 minutes."},
            "2": {"type": "prompt", "variables": {"order": "cancelled"},
                  "tts_text": "Your order is cancelled."},
        },
    }


def say_money(cents: int) -> str:
    units, rest = divmod(cents, 100)
    text = f"{units} {'euro' if units == 1 else 'euros'}"
    if rest:
        text += f" and {rest} cents"
    return text


def price(query: Any) -> tuple[int, dict[str, Any]]:
    """The price service: (status, JSON body). Query: `dtmf_input` (the `api` action
    sends the session variables it names) or `quantity`."""
    raw = (query.get("dtmf_input") or query.get("quantity") or "").strip()
    if not raw.isdigit():
        return 400, {"error": "quantity missing"}
    quantity = int(raw)
    if not 1 <= quantity <= MAX_QUANTITY:
        return 400, {"error": "quantity out of range", "quantity": quantity}
    total = quantity * UNIT_PRICE_CENTS
    return 200, {"quantity": quantity, "unit_price_cents": UNIT_PRICE_CENTS,
                 "total_cents": total, "total_text": say_money(total)}


@dataclass
class Session:
    session_id: str
    caller: str = ""
    phase: str = "main"        # main | quantity | pricing | confirm | done
    misses: int = 0            # misses in a row at the current question
    quantity: int = 0
    total_cents: int = 0
    order: str = ""            # "", confirmed, cancelled
    touched: float = field(default_factory=time.monotonic)


class PizzaLine:
    def __init__(self, price_url: str) -> None:
        self.price_url = price_url
        self.sessions: dict[str, Session] = {}
        self.orders: dict[str, dict[str, Any]] = {}   # session_id -> order (idempotent)

    def session(self, sid: str, caller: str = "") -> Session:
        self.sweep()
        session = self.sessions.get(sid)
        if session is None:   # /start first, or the first step: whichever comes first
            session = self.sessions[sid] = Session(sid, caller)
        session.touched = time.monotonic()
        return session

    def sweep(self) -> None:
        limit = time.monotonic() - SESSION_TTL_S
        for sid in [s for s, v in self.sessions.items() if v.touched < limit]:
            del self.sessions[sid]

    def end(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    # --- one step ---------------------------------------------------------------
    def step(self, s: Session, event: dict[str, Any], variables: dict[str, str]) -> dict[str, Any]:
        kind = event.get("type")
        if kind == "session_start":
            s.phase, s.misses = "main", 0
            return self.tag(s, {"type": "prompt", "interruptible": True,
                                "tts_text": "Welcome to Pronto Pizza!",
                                "next": main_menu()}, "welcome")
        if kind == "error":
            log.warning("session=%s error event: %s", s.session_id, event.get("reason"))
            s.phase = "done"
            return self.tag(s, dict(TO_OPERATOR), "error_to_operator")
        if kind in ("dtmf_menu_invalid", "dtmf_menu_timeout"):
            return self.menu_miss(s, kind, variables)
        if kind == "dtmf":
            return self.digits(s, str(event.get("digit", "")), variables)
        if kind == "dtmf_timeout":
            return self.quantity_miss(s, "Sorry, I did not get a number.")
        if kind == "api_response":
            return self.priced(s, event)
        if kind == "audio_complete":
            return self.audio_done(s, variables)
        s.phase = "done"
        return self.tag(s, dict(GOODBYE), "unexpected_event")

    def menu_miss(self, s: Session, kind: str, variables: dict[str, str]) -> dict[str, Any]:
        s.misses += 1
        if s.misses > MAX_MISSES - 1:
            s.phase = "done"
            return self.tag(s, {"type": "prompt", "tts_text": "Sorry, we could not help you.",
                                "next": dict(GOODBYE)}, "too_many_misses")
        notice = "sounds/invalid.wav" if kind == "dtmf_menu_invalid" else "sounds/timeout.wav"
        if s.phase == "confirm":
            menu = confirm_menu(say_money(s.total_cents), s.quantity)
        else:
            menu = main_menu()
        return self.tag(s, {"type": "prompt", "file": notice, "next": menu},
                        f"{s.phase}_{'invalid' if 'invalid' in kind else 'timeout'}")

    def digits(self, s: Session, digits: str, variables: dict[str, str]) -> dict[str, Any]:
        if variables.get("menu") != "order" or s.phase not in ("main", "quantity"):
            # A digit outside the quantity question (none expected: the opening hours
            # keep digits as type-ahead for the menu): back to the menu.
            s.phase = "main"
            return self.tag(s, main_menu(), "menu_again")
        if s.phase == "main":   # the order entry of the menu: a new question
            s.phase, s.misses = "quantity", 0
        if not digits.isdigit():
            return self.quantity_miss(s, "Sorry, I did not get a number.")
        # The price service checks the quantity (400 when out of range). It gets the
        # digits as the query string: `variables` names the session variables to send.
        # A session variable `price_url` (set by a test) points it elsewhere.
        s.quantity, s.phase = int(digits), "pricing"
        url = variables.get("price_url") or self.price_url
        return self.tag(s, {"type": "api", "url": url, "method": "GET",
                            "variables": "dtmf_input,session_id", "timeout": 5}, "price")

    def quantity_miss(self, s: Session, sorry: str) -> dict[str, Any]:
        if s.phase == "main":   # the first answer to the question: count anew
            s.misses = 0
        s.phase = "quantity"
        s.misses += 1
        if s.misses > MAX_MISSES - 1:
            s.phase = "done"
            return self.tag(s, {"type": "prompt", "tts_text": "Sorry, we could not take your order.",
                                "next": dict(GOODBYE)}, "too_many_misses")
        return self.tag(s, ask_quantity(sorry), "quantity_again")

    def priced(self, s: Session, event: dict[str, Any]) -> dict[str, Any]:
        body = event.get("body")
        if event.get("status") == 200 and isinstance(body, dict) and "total_cents" in body:
            s.total_cents, s.phase, s.misses = int(body["total_cents"]), "confirm", 0
            s.quantity = int(body.get("quantity", s.quantity))
            n = s.quantity
            node = {"type": "prompt", "interruptible": True,
                    "tts_text": f"{n} {'pizza' if n == 1 else 'pizzas'} "
                                f"come to {say_money(s.total_cents)}.",
                    "next": confirm_menu(say_money(s.total_cents), n)}
            return self.tag(s, node, "read_total")
        if event.get("status") == 400:   # the service refused the quantity
            return self.quantity_miss(s, f"Sorry, we deliver from 1 to {MAX_QUANTITY} pizzas.")
        # The price service failed (status 0, 5xx...): a person takes the order.
        log.warning("session=%s price service: %s %s", s.session_id, event.get("status"), body)
        s.phase = "done"
        return self.tag(s, {"type": "prompt",
                            "tts_text": "Sorry, we cannot price your order right now. "
                                        "Please hold for the operator.",
                            "next": dict(TO_OPERATOR)}, "price_failed")

    def audio_done(self, s: Session, variables: dict[str, str]) -> dict[str, Any]:
        order = variables.get("order", "")
        if s.phase == "confirm" and order in ("confirmed", "cancelled"):
            s.order, s.phase = order, "done"
            if order == "confirmed":
                # Idempotent: a repeated step (retry) places the order once.
                self.orders.setdefault(s.session_id, {"caller": s.caller, "quantity": s.quantity,
                                                      "total_cents": s.total_cents})
                log.info("session=%s ORDER %d pizzas, %d cents", s.session_id, s.quantity,
                         s.total_cents)
            return self.tag(s, dict(GOODBYE), f"order_{order}")
        if variables.get("menu") == "hours" and s.phase == "main":
            return self.tag(s, main_menu(), "after_hours")
        s.phase = "done"
        return self.tag(s, dict(GOODBYE), "goodbye")

    @staticmethod
    def tag(s: Session, node: dict[str, Any], step: str) -> dict[str, Any]:
        node["step_id"] = f"pizza.{step}"
        node["step_name"] = step.replace("_", " ")
        node["extra"] = {"flow": "pizza", "phase": s.phase, "misses": s.misses}
        return node


# --- HTTP --------------------------------------------------------------------------
LINE = web.AppKey("line", PizzaLine)


async def step(request: web.Request) -> web.Response:
    try:
        context = await request.json()
    except ValueError:
        return web.json_response({"error": "invalid JSON"}, status=400)
    if not isinstance(context, dict) or not isinstance(context.get("session_id"), str):
        return web.json_response({"error": "session_id missing"}, status=400)
    line = request.app[LINE]
    session = line.session(context["session_id"], str(context.get("caller") or ""))
    raw_event, raw_vars = context.get("event"), context.get("variables")
    event: dict[str, Any] = raw_event if isinstance(raw_event, dict) else {}
    variables: dict[str, str] = raw_vars if isinstance(raw_vars, dict) else {}
    node = line.step(session, event, variables)
    log.info("session=%s event=%s -> %s (%s)", session.session_id, event.get("type"),
             node["type"], node.get("step_id"))
    return web.json_response(node)


async def notification(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    try:
        body = await request.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    sid = str(body.get("session_id") or "")
    line = request.app[LINE]
    if kind == "start" and sid:
        line.session(sid, str(body.get("caller") or ""))   # never reset on a repeat
        log.info("session=%s start caller=%s callee=%s", sid, body.get("caller"),
                 body.get("callee"))
    elif kind == "end":
        line.end(sid)
        log.info("session=%s end reason=%s", sid, body.get("reason"))
    elif kind == "dtmf-match":
        log.info("session=%s menu key %s -> %s", sid, body.get("digit"),
                 (body.get("action") or {}).get("type"))
    return web.json_response({"status": "ok"})


async def price_api(request: web.Request) -> web.Response:
    status, body = price(request.query)
    log.info("price %s -> %d", dict(request.query), status)
    return web.json_response(body, status=status)


def app(port: int) -> web.Application:
    application = web.Application()
    application[LINE] = PizzaLine(f"http://127.0.0.1:{port}/api/price")
    application.router.add_post("/ivr/step", step)
    application.router.add_post("/ivr/step/{kind:start|end|dtmf-match}", notification)
    application.router.add_get("/api/price", price_api)
    return application


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8090
    web.run_app(app(port), host="127.0.0.1", port=port, print=None)
