"""The tiny preset's static site as a reader sees it: every page loaded in headless Chromium.

Every image loads, every internal link (and its #anchor) resolves, and no page reports
anything on the browser console (but for the search index's progress notes). Chromium is driven through the DevTools protocol over a
pipe (``--remote-debugging-pipe``: no extra dependency); the site is served over HTTP on
127.0.0.1, as a reader's web server would. Each page's screenshot goes to
``results/site-screenshots/<page>.png`` for a person to look at.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import select
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = REPO_ROOT / "results" / "site-screenshots"
# Images, links, scripts and style sheets: what a page needs or points to.
URL_ATTRIBUTES = {"a": "href", "img": "src", "script": "src", "link": "href"}
# MkDocs' search index, built in a web worker that notes its progress on the console.
SEARCH_WORKER = "/search/worker.js"
# The JavaScript expression that lists the images a page failed to load.
BROKEN_IMAGES = "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"


class _PageParser(HTMLParser):
    """The URLs a page refers to and the anchors (ids, names) it defines."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.anchors: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.anchors.update(attrs[key] for key in ("id", "name") if attrs.get(key))
        if attrs.get(URL_ATTRIBUTES.get(tag, "")):
            self.urls.append(attrs[URL_ATTRIBUTES[tag]])


def _parse(path: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(path.read_text())
    return parser


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _broken_links(site: Path, page: Path) -> list[str]:
    """The page's internal URLs whose file, or #anchor in it, the site does not hold."""
    broken = []
    for url in _parse(page).urls:
        parts = urlsplit(url)
        if parts.scheme or parts.netloc:  # external: not the site's to resolve
            continue
        folder = site if parts.path.startswith("/") else page.parent  # "/..." from the site's root (404.html)
        target = (folder / unquote(parts.path).lstrip("/")).resolve() if parts.path else page
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file() or site.resolve() not in target.parents:
            broken.append(f"{url} (no file {target})")
        elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _parse(target).anchors:
            broken.append(f"{url} (no anchor #{parts.fragment} in {target.name})")
    return broken


class Chromium:
    """Headless Chromium driven through the DevTools protocol over ``--remote-debugging-pipe``.

    Chromium reads commands on its fd 3 and writes replies and events on its fd 4,
    each a JSON message ending in a NUL byte.
    """

    def __init__(self, profile: Path):
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def pipes_to_3_and_4():  # in the child: moved above 4 first, so that neither overwrites the other
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (command_read, reply_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--no-first-run", "--hide-scrollbars", "about:blank"],
            preexec_fn=pipes_to_3_and_4, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(command_read)
        os.close(reply_write)
        self._buffer, self._last_id, self.events = b"", 0, []

    def _next(self, timeout: float) -> dict | None:
        """The next message from Chromium, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._reply_read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self._reply_read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed its pipe (exit status {self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        """Send one command and return its result; events received meanwhile are kept in ``events``."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        while (reply := self._next(timeout)) is not None:
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)
        raise TimeoutError(f"{method}: no reply within {timeout} s")

    def wait_for(self, event: str, timeout: float = 30) -> dict:
        """Wait until ``event`` has arrived (it may have before); every event stays in ``events``."""
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            message = self._next(deadline - time.monotonic())
            if message is None:
                raise TimeoutError(f"no {event} within {timeout} s")
            self.events.append(message)
        return next(e for e in self.events if e.get("method") == event)

    def settle(self, quiet_s: float = 0.5) -> None:
        """Collect the events that still come until ``quiet_s`` passes without one (late console messages)."""
        while (message := self._next(quiet_s)) is not None:
            self.events.append(message)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._command_write)
        os.close(self._reply_read)


def _console_messages(events: list[dict]) -> list[str]:
    """What the page reported on its console: console calls, uncaught exceptions, browser log entries."""
    messages = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            messages.append(f"console.{params['type']}: {args}")
        elif event.get("method") == "Runtime.exceptionThrown":
            messages.append(f"exception: {params['exceptionDetails'].get('exception', {}).get('description')}")
        elif event.get("method") == "Log.entryAdded":
            entry = params["entry"]
            if entry["level"] == "info" and entry.get("url", "").endswith(SEARCH_WORKER):
                continue  # the search index's own progress notes ("... search ready")
            messages.append(f"{entry['level']}: {entry['text']} {entry.get('url', '')}".strip())
    return messages


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served_site(tiny_workflow):
    """The tiny preset's site served over HTTP on 127.0.0.1: (site folder, base URL)."""
    site = tiny_workflow / "site"
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()


def test_every_internal_link_resolves(tiny_workflow):
    site = tiny_workflow / "site"
    pages = _pages(site)
    assert {p.name for p in pages} >= {"index.html", "benchmark_results.html", "cnn_benchmark_results.html",
                                       "memory_profiling_analysis.html", "torch_benchmarks.html"}
    broken = {page.name: links for page in pages if (links := _broken_links(site, page))}
    assert not broken


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test-infra installs it)")
def test_every_page_loads_in_a_browser_with_its_images_and_a_quiet_console(served_site, tmp_path):
    site, base = served_site
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser = Chromium(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session)
        browser.call("Emulation.setDeviceMetricsOverride", session, width=1280, height=900, deviceScaleFactor=1,
                     mobile=False)
        problems, shown = {}, set()
        for page in _pages(site):
            name = str(page.relative_to(site))
            browser.events.clear()
            browser.call("Page.navigate", session, url=base + name)
            browser.wait_for("Page.loadEventFired")
            browser.settle()
            broken = browser.call("Runtime.evaluate", session, expression=BROKEN_IMAGES,
                                  returnByValue=True)["result"]["value"]
            shown.update(browser.call("Runtime.evaluate", session, returnByValue=True, expression=(
                "[...document.images].map(i => i.src)"))["result"]["value"])
            if broken or (console := _console_messages(browser.events)):
                problems[name] = {"images not loaded": broken, "console": console}
            size = browser.call("Page.getLayoutMetrics", session)["cssContentSize"]
            png = browser.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
            screenshot = (SCREENSHOTS / name).with_suffix(".png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(png["data"]))
    finally:
        browser.close()
    assert not problems, json.dumps(problems, indent=1)
    # every chart of the site is shown on some page
    assert {base + f"assets/{chart.name}" for chart in (site / "assets").glob("*.png")} <= shown
