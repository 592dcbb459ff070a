"""HTTP client for the step-mode provider (docs/protocol.md, docs/errors.md).

A shell around the machine's `ProviderRequest`s: one `aiohttp.ClientSession` per
executor (connection pooling), bodies encoded with orjson, the route's configured
headers plus `Content-Type: application/json` on every call.

* `step()` — the retry policy: per-request timeout `retry.timeout_ms`; retry on
  timeout, connection error and 5xx, up to `retry.max_retries` retries, 100 ms apart;
  a 4xx (or any other non-2xx) is final. Gives a `ProviderResult`: `ok` with the
  decoded JSON, `fallback` when the provider could not answer, `invalid` when the
  answer is not JSON.
* `notify()` — `/start`, `/end`, `/dtmf-match`: a background task with its own short
  timeout, no retry, response ignored, failures logged at debug. Never awaited by the
  step path; `close()` waits (bounded) for the ones still pending.
* `api()` — the `api` action's HTTP call (docs/actions.md "api"), on the same session: any
  method, the action's own headers and timeout, no retry. Gives an `ApiResult`: the
  status and the body decoded as JSON (the raw text when it is not JSON); status 0
  and `{"error": "..."}` when no HTTP answer came.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from pbx.config import IvrAppParams
from pbx.httpbody import BodyTooLarge, read_capped
from pbx.ivr.requests import ApiResult, ProviderRequest, ProviderResult

log = logging.getLogger(__name__)

RETRY_DELAY_MS = 100
NOTIFY_TIMEOUT_MS = 500
API_TIMEOUT_S = 10.0
# What one answer may take in memory (pbx.httpbody): a step's ActionNode, an `api`
# call's body (it goes back to the provider as `api_response`), a notification's.
MAX_STEP_BYTES = 1 << 20
MAX_API_BYTES = 1 << 20
MAX_NOTIFY_BYTES = 1 << 16


def step_attempts(params: IvrAppParams) -> int:
    """How many times a step request is tried: once and `retry.max_retries` retries
    (spec §8); rustpbx tries `max_retries` times in all (at least once here: with 0 it
    would not ask at all), and a route with `compat = "rustpbx"` does the same."""
    if params.compat == "rustpbx":
        return max(1, params.retry.max_retries)
    return 1 + params.retry.max_retries


class ProviderClient:
    def __init__(
        self,
        *,
        retry_delay_ms: int = RETRY_DELAY_MS,
        notify_timeout_ms: int = NOTIFY_TIMEOUT_MS,
        # 0: no pool limit; waiting for a pooled connection would eat the step timeout.
        connection_limit: int = 0,
    ) -> None:
        self.retry_delay_ms = retry_delay_ms
        self.notify_timeout_ms = notify_timeout_ms
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily, inside the running loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connection_limit)
            # No cookie jar: the executor keeps no session state, and one provider's
            # cookie must not ride along on every other session's (and tenant's)
            # requests; it also spares each request the jar's filtering (issue 9).
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    @property
    def pending_notifications(self) -> int:
        return len(self._pending)

    @staticmethod
    def _headers(params: IvrAppParams) -> dict[str, str]:
        headers = dict(params.headers)
        headers["Content-Type"] = "application/json"
        return headers

    async def step(self, params: IvrAppParams, body: dict[str, Any]) -> ProviderResult:
        """POST `body` to `params.url` under the retry policy of spec §8."""
        data = orjson.dumps(body)
        headers = self._headers(params)
        timeout = aiohttp.ClientTimeout(total=params.retry.timeout_ms / 1000.0)
        attempts = step_attempts(params)
        reason = ""
        status: int | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry_delay_ms / 1000.0)
            try:
                async with self.session.post(
                    params.url, data=data, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    payload = await read_capped(resp, MAX_STEP_BYTES, "provider answer")
            except BodyTooLarge as exc:
                return ProviderResult("invalid", reason=str(exc), status=status,
                                      attempts=attempt)
            except TimeoutError:
                reason = f"timeout after {params.retry.timeout_ms} ms"
                status = None
                log.debug("provider %s: attempt %d: %s", params.url, attempt, reason)
                continue
            except aiohttp.ClientError as exc:
                reason = f"connection error: {exc.__class__.__name__}: {exc}"
                status = None
                log.debug("provider %s: attempt %d: %s", params.url, attempt, reason)
                continue
            if status >= 500:
                reason = f"HTTP {status}"
                log.debug("provider %s: attempt %d: %s", params.url, attempt, reason)
                continue
            if not 200 <= status < 300:
                # 4xx (and anything else unexpected) is final: no retry.
                return ProviderResult(
                    "fallback", reason=f"HTTP {status}", status=status, attempts=attempt
                )
            try:
                decoded = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                return ProviderResult(
                    "invalid",
                    body=payload[:200].decode("utf-8", "replace"),
                    reason=f"not JSON: {exc}",
                    status=status,
                    attempts=attempt,
                )
            return ProviderResult("ok", body=decoded, status=status, attempts=attempt)
        return ProviderResult(
            "fallback",
            reason=f"{reason}; gave up after {attempts} attempt(s)",
            status=status,
            attempts=attempts,
        )

    async def api(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
        timeout_s: float = API_TIMEOUT_S,
    ) -> ApiResult:
        """One HTTP call for the `api` action: `query` as the query string, or `body` as
        a JSON body (when `query` is None). Never raises for a failed call."""
        send_headers = dict(headers or {})
        data: bytes | None = None
        if query is None and body is not None:
            data = orjson.dumps(body)
            if not any(name.lower() == "content-type" for name in send_headers):
                send_headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.request(
                method, url, params=query, data=data, headers=send_headers, timeout=timeout
            ) as resp:
                status = resp.status
                payload = await read_capped(resp, MAX_API_BYTES, "answer")
        except asyncio.CancelledError:
            raise
        except BodyTooLarge as exc:
            return ApiResult(0, {"error": str(exc)})
        except TimeoutError:
            return ApiResult(0, {"error": f"timeout after {timeout_s:g} s"})
        except Exception as exc:  # connection refused, DNS, bad URL, ...
            log.debug("api %s %s failed: %s: %s", method, url, exc.__class__.__name__, exc)
            return ApiResult(0, {"error": f"{exc.__class__.__name__}: {exc}"})
        return ApiResult(status, _decode_body(payload))

    async def perform_api(self, request: ProviderRequest) -> ApiResult:
        """An `api` request from the machine."""
        return await self.api(
            request.method,
            request.url,
            headers=request.headers,
            body=request.body,
            query=request.query,
            timeout_s=request.timeout_s or API_TIMEOUT_S,
        )

    def notify(self, url: str, body: dict[str, Any], params: IvrAppParams) -> asyncio.Task[None]:
        """Fire-and-forget POST; returns the task (kept here until it finishes)."""
        task = asyncio.get_running_loop().create_task(self._notify(url, body, params))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def send(self, request: ProviderRequest) -> asyncio.Task[None]:
        """A notification request from the machine (`start`, `end`, `dtmf_match`)."""
        return self.notify(request.url, request.body, request.params)

    async def _notify(self, url: str, body: dict[str, Any], params: IvrAppParams) -> None:
        timeout = aiohttp.ClientTimeout(total=self.notify_timeout_ms / 1000.0)
        try:
            async with self.session.post(
                url, data=orjson.dumps(body), headers=self._headers(params), timeout=timeout
            ) as resp:
                await read_capped(resp, MAX_NOTIFY_BYTES, "notification answer")
                log.debug("notify %s: HTTP %d", url, resp.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # response ignored, whatever happened
            log.debug("notify %s failed: %s: %s", url, exc.__class__.__name__, exc)

    async def close(self, wait_s: float = 1.0) -> None:
        """Wait (bounded) for pending notifications, then close the HTTP session."""
        if self._pending:
            _, not_done = await asyncio.wait(set(self._pending), timeout=wait_s)
            for task in not_done:
                task.cancel()
            if not_done:
                await asyncio.gather(*not_done, return_exceptions=True)
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def _decode_body(payload: bytes) -> Any:
    """An api response body: its JSON value, else its text (None when empty)."""
    if not payload.strip():
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload.decode("utf-8", "replace")
