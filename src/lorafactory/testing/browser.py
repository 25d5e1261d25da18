"""A real headless Chromium driven over the DevTools protocol, with the network cut off: for tests
that open a page the way a user's browser does.

Chromium resolves no host name (``--host-resolver-rules``) and sends everything through a proxy
that is not there, so a page that needs the network shows it; requests the page makes are recorded.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str | None:
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


class Browser:
    """``with Browser() as browser: browser.open(path); browser.evaluate(js); browser.screenshot()``."""

    def __init__(self, binary: str | None = None, timeout_s: float = 30.0) -> None:
        self.binary = binary or chromium_binary()
        if self.binary is None:
            raise RuntimeError("no Chromium found; install Debian's chromium package")
        self.timeout_s = timeout_s
        self.ids = itertools.count(1)
        self.requests: list[str] = []  # URLs the page asked for

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="lorafactory-chromium-")
        command = [
            self.binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9",
            "--window-size=1200,900",
            "about:blank",
        ]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        url = self._devtools_url()
        self.stack = ExitStack()
        self.socket = self.stack.enter_context(connect(url, max_size=None, open_timeout=self.timeout_s))
        return self

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if "DevTools listening on " in line:
                return line.split("DevTools listening on ", 1)[1].strip()
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError(f"Chromium did not start its DevTools endpoint (exit {self.process.poll()})")

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        message = {"id": next(self.ids), "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=self.timeout_s))
            if reply.get("method") == "Network.requestWillBeSent":
                self.requests.append(reply["params"]["request"]["url"])
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, page: Path) -> None:
        """Open ``page`` (a file) in a new tab and wait until it has loaded."""
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._send("Network.enable", session=self.session)
        self._send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=self.session)
        deadline = time.monotonic() + self.timeout_s
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{page} did not finish loading")
            time.sleep(0.1)

    def evaluate(self, expression: str):
        result = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        """The whole page as PNG."""
        size = self._send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        params = {"format": "png", "captureBeyondViewport": True, "clip": clip}
        return base64.b64decode(self._send("Page.captureScreenshot", params, self.session)["data"])
