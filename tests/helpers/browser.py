"""A real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for tests of
``mtevm serve``: open a URL, read the page's text, take screenshots, read them back with tesseract.

Every process it starts is stopped by PID when the ``with`` block ends (the browser and the
helpers it spawned, found through /proc before the browser is told to go).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import subprocess
import tempfile
import time
import urllib.request

from tests.helpers.sshd import stop_pid, wait_until

CHROMIUM = "/usr/bin/chromium"
# What Chromium needs to run headless as root in a container, and nothing that phones home.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


class HeadlessChromium:
    def __init__(self, width: int = 1100, height: int = 700) -> None:
        self.size = (width, height)
        self.profile = tempfile.TemporaryDirectory(prefix="mtevm-chromium-")
        self.proc: subprocess.Popen | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> "HeadlessChromium":
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile.name}",
                                      f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile.name, "DevToolsActivePort")

        def port():
            assert self.proc.poll() is None, "chromium exited at start"
            try:
                return int(open(port_file).readline())
            except (OSError, ValueError):
                return None
        self.port = wait_until(port, 30, "chromium's DevTools port")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            helpers = descendants(self.proc.pid)
            stop_pid(self.proc.pid)
            self.proc.wait()
            for pid in helpers:
                stop_pid(pid)
        self.profile.cleanup()

    def _page_ws(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=5) as r:
            targets = json.load(r)
        return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    async def _call(self, ws, method: str, **params) -> dict:
        msg_id = next(self._ids)
        await ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await ws.receive_json(timeout=30)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def visit(self, url: str, settle) -> tuple[str, bytes]:
        """Open ``url``; poll screenshots until ``settle(png_bytes, page_text)`` is true (or 60 s);
        return (the page's text, the last screenshot as PNG)."""
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self._page_ws(), max_msg_size=0) as ws:
                await self._call(ws, "Page.enable")
                await self._call(ws, "Page.navigate", url=url)
                deadline = time.monotonic() + 60
                while True:
                    await asyncio.sleep(1.0)
                    text = (await self._call(ws, "Runtime.evaluate", expression="document.body ? "
                                             "document.body.innerText : ''", returnByValue=True))["result"]["value"]
                    png = base64.b64decode((await self._call(ws, "Page.captureScreenshot", format="png"))["data"])
                    if settle(png, text) or time.monotonic() > deadline:
                        return text, png


def ocr(png: bytes) -> str:
    """The text tesseract reads in a screenshot (terminal text: light on dark is fine for it)."""
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(png)
        f.flush()
        return subprocess.run(["tesseract", f.name, "-", "--psm", "6"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
