"""The report in a real browser: headless Chromium loads report.html offline, the findings table and
every figure are visible, and the console stays free of errors.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (JSON messages
ending in NUL on file descriptors 3 and 4), so no websocket client or browser driver is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from opdlab.cli import main

from helpers import write_demo

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).is_file()), None)
pytestmark = [pytest.mark.browser, pytest.mark.optional,
              pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                 "(apt-get install chromium; CI's .ci/run installs it)")]
TIMEOUT_S = 60.0

# Evaluated in the page: is the findings table laid out, is every <img> decoded and laid out,
# and did the page load anything that is not a data: URI or an in-page anchor?
CHECK_JS = """(() => {
  const visible = el => { const r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.display !== 'none' && s.visibility !== 'hidden' && +s.opacity > 0; };
  const table = document.getElementById('findings-table');
  const imgs = [...document.images];
  return JSON.stringify({
    ready: document.readyState,
    table: !!table && visible(table),
    rows: table ? table.tBodies[0].rows.length : 0,
    verdicts: [...document.querySelectorAll('#findings-table .verdict')].filter(visible).map(e => e.textContent),
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0 && visible(i))).map(i => i.alt),
    external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !u.startsWith('data:') && !u.startsWith('#')),
    fetched: performance.getEntriesByType('resource').map(e => e.name),
  });
})()"""


class Browser:
    """Headless Chromium with a DevTools session on one page; collects console errors."""

    def __init__(self, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()

        def wire_fds() -> None:  # in the child: our pipe ends become fds 3 (commands) and 4 (responses)
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1400,1000", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=wire_fds)
        os.close(cmd_r)
        os.close(resp_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._resp_r], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._resp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def open(self, url: str) -> dict[str, Any]:
        """Navigate, wait for the load event, run CHECK_JS; returns its result."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")
        res = self.call("Runtime.evaluate", {"expression": CHECK_JS, "returnByValue": True}, session=True)
        return json.loads(res["result"]["value"])

    def console_errors(self) -> list[str]:
        errs = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errs.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif ev.get("method") == "Runtime.exceptionThrown":
                errs.append(str(p.get("exceptionDetails", {}).get("text")))
            elif ev.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errs.append(str(p["entry"].get("text")))
        return errs

    def screenshot(self) -> bytes:
        res = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        return base64.b64decode(res["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._resp_r)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_report_in_headless_chromium(tmp_path, browser):
    root = write_demo(tmp_path / "demo")
    assert main(["report", str(root)]) == 0
    page = root / "report" / "report.html"
    state = browser.open(page.as_uri())
    assert state["ready"] == "complete"
    assert state["table"] and state["rows"] == 8 and state["verdicts"] == ["holds"] * 8
    assert state["images"] == len(list((root / "report" / "figures").iterdir())) >= 9
    assert state["broken"] == [], f"figures not visible: {state['broken']}"
    assert state["external"] == [] and state["fetched"] == [], "the report must not load anything"
    assert browser.console_errors() == []
    shot = browser.screenshot()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
    (tmp_path / "report.png").write_bytes(shot)


def test_harness_sees_console_errors_and_broken_images(tmp_path, browser):
    """The checks above can fail: a page with a console error and a broken image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><table id="findings-table"><tbody><tr><td>x</td></tr></tbody></table>'
                   '<img alt="broken" src="data:image/png;base64,AAAA">'
                   '<script>console.error("boom")</script></body></html>')
    state = browser.open(bad.as_uri())
    assert state["broken"] == ["broken"]
    assert any("boom" in e for e in browser.console_errors())
