"""A headless Chromium driven over raw W3C WebDriver HTTP (Debian's `chromium` and
`chromium-driver`; `make tools` installs them).

Raw HTTP rather than Selenium: the few commands the tests need (open a URL, run a
script, click, type, take a screenshot, quit) are one JSON request each, and no package has to
find or download a driver. Every request has a timeout; `close()` ends the session and
kills chromedriver's whole process group (chromedriver and the Chromium it started).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
REQUEST_TIMEOUT_S = 30.0


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """One headless Chromium session; use as a context manager."""

    def __init__(self, log_dir: Path, width: int = 1280, height: int = 720) -> None:
        driver = shutil.which("chromedriver")
        assert driver and Path(CHROMIUM).exists(), \
            "chromium / chromedriver missing (make tools installs Debian's packages)"
        self.port = _free_tcp_port()
        self.profile = tempfile.mkdtemp(prefix="pbx-chromium-")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "chromedriver.log"
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}", f"--log-path={self.log_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.session: str | None = None
        try:
            self._wait_ready(15.0)
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to
                    # start; the page is our own, on loopback.
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run",
                             "--disable-extensions", "--disable-background-networking",
                             f"--user-data-dir={self.profile}",
                             f"--window-size={width},{height}"],
                },
            }}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromedriver exited: {self.proc.returncode}")
            try:
                if self._call("GET", "/status", timeout=2).get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("chromedriver did not get ready")

    def _call(self, method: str, path: str, body: Any = None,
              timeout: float = REQUEST_TIMEOUT_S) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:2000]!r}") from None

    def _session_call(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session_call("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """The value of `script` (a function body: `return ...`) run in the page."""
        return self._session_call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float, what: str, *args: Any) -> Any:
        """Run `script` until it returns something truthy; bounded."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.run(script, *args)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} "
                             f"(last: {value!r})")

    def _element(self, css: str) -> str:
        element = self._session_call("POST", "/element", {"using": "css selector", "value": css})
        return str(next(iter(element.values())))

    def click(self, css: str) -> None:
        self._session_call("POST", f"/element/{self._element(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        """Type `text` into the element (as keystrokes; "\ue007" is Enter)."""
        self._session_call("POST", f"/element/{self._element(css)}/value", {"text": text})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._session_call("GET", "/screenshot"))

    def close(self) -> None:
        if self.session is not None:
            try:
                self._call("DELETE", f"/session/{self.session}", timeout=10)
            except (OSError, AssertionError):
                pass
            self.session = None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any Chromium left in the group
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
