"""
A minimal W3C WebDriver client (the protocol chromedriver speaks: JSON over
HTTP on loopback), enough for the status page's browser test: open a
headless Chromium, load a page, run a script in it, take a screenshot.
Standard library only; every call blocks (run it in a thread under a
reactor).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial import unittest

#: Chromium's flags: headless, nothing fetched from the internet, a new profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1600")


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/lib/chromium/{name}") if os.access(p, os.X_OK)), None)


def require_browser(environ: dict[str, str] | None = None) -> tuple[str, str]:
    """
    The paths of C{chromium} and C{chromedriver}; skip (naming what is
    missing) when either is not installed, unless C{CI=true}.
    """
    env = os.environ if environ is None else environ
    chromium, driver = _find("chromium"), _find("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        if env.get("CI", "").lower() == "true":
            raise RuntimeError(f"CI=true but {' and '.join(missing)} not installed")
        raise unittest.SkipTest(f"{' and '.join(missing)} not installed")
    assert chromium is not None and driver is not None
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """A chromedriver process and one headless Chromium session."""

    def __init__(self, chromium: str, chromedriver: str, profile: str, log_path: str) -> None:
        """
        Start chromedriver on a loopback port and open a session.

        @param profile: a new, empty directory for Chromium's profile.
        @param log_path: where chromedriver's output goes.
        """
        self.port = _free_port()
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([chromedriver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                self._call("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        try:
            value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}})
        except BaseException:
            self._stop()
            raise
        self.session = value["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.code} {e.read()[:500]!r}") from None

    def get(self, url: str) -> None:
        """Load C{url} (returns once the page has loaded)."""
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str) -> Any:
        """Run C{script} (a function body) in the page; its return value."""
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []})

    def screenshot(self, path: str) -> int:
        """Save a PNG screenshot to C{path}; its size in bytes."""
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))
        with open(path, "wb") as f:
            f.write(png)
        return len(png)

    def close(self) -> None:
        """End the session (Chromium exits) and stop chromedriver."""
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self._stop()

    def _stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
