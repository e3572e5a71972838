"""`mtevm serve`: the app in a browser, as a real server process on a real port."""
from __future__ import annotations

import asyncio
import http.cookiejar
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from tests.helpers import mtevm_executable
from tests.helpers.browser import HeadlessChromium, ocr
from tests.helpers.sshd import SshServer, free_port, stop_pid, wait_until

SERVE = [mtevm_executable(), "serve"]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env["MTEVM_RUNTIME_DIR"] = str(tmp_path / "run")
    env["MTEVM_STATE_DIR"] = str(tmp_path / "state")
    return env


def _fetch(url: str, headers: dict | None = None) -> tuple[int, str] | None:
    """(status, body) of a GET that follows redirects and keeps cookies, as a browser does;
    None if nothing answers."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None


def token_url(proc, log) -> str:
    """The URL with this run's token that `mtevm serve` printed."""
    def printed():
        assert proc.poll() is None, f"mtevm serve exited: {open(log.name).read()}"
        found = re.search(r"(http://\S+/\?token=(\S+))", open(log.name).read())
        return found and found.group(1)
    return wait_until(printed, 30, "the URL with the token")


@contextmanager
def running_server(tmp_path, *options: str):
    """A running `mtevm serve` on a free loopback port; stopped by PID afterwards."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    # --no-daemon: each tab's app runs its own service, so no daemon outlives the test.
    proc = subprocess.Popen([*SERVE, "--port", str(port), *options, "--", "--no-daemon"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path))
    try:
        yield proc, port, log
    finally:
        tabs = _children(proc.pid) if proc.poll() is None else []
        stop_pid(proc.pid)
        proc.wait()
        for pid in tabs:          # an app a failed test left behind
            stop_pid(pid)
        log.close()


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path) as s:
        yield s


def _page(proc, port: int, log) -> str:
    url = token_url(proc, log).replace(f"{_public_port(proc, log)}/", f"{port}/", 1)
    status, html = wait_until(lambda: _fetch(url), 30, f"{url} to answer")
    assert status == 200
    return html


def _public_port(proc, log) -> int:
    return int(re.match(r"http://[^/]*:(\d+)/", token_url(proc, log)).group(1))


def _token(proc, log) -> str:
    return token_url(proc, log).split("token=", 1)[1]


def test_serve_gives_the_app_page_on_loopback(server):
    proc, port, log = server
    html = _page(proc, port, log)
    assert "mtevm" in html                     # the page names the app it runs
    assert f"ws://127.0.0.1:{port}/ws" in html  # and the browser's terminal connects back here
    # It listens on loopback only: the machine's other addresses get nothing.
    for addr in _non_loopback_addresses():
        with pytest.raises(OSError):
            socket.create_connection((addr, port), timeout=1).close()


def test_public_url_points_the_browser_through_a_tunnel_port(tmp_path):
    """ssh -L 9000:127.0.0.1:8000: the page must tell the browser to connect back to 9000."""
    with running_server(tmp_path, "--public-url", "http://127.0.0.1:9000/") as (proc, port, log):
        html = _page(proc, port, log)
    assert "ws://127.0.0.1:9000/ws" in html and f":{port}/ws" not in html


def test_the_documented_ssh_tunnel_reaches_the_app(tmp_path):
    """docs/remote.md's recipe, for real: ssh -L to a real sshd, then page and app through it."""
    local = free_port()
    with running_server(tmp_path, "--public-url", f"http://127.0.0.1:{local}") as (proc, port, log), \
            SshServer(tmp_path / "ssh") as sshd:
        tunnel = subprocess.Popen(sshd.ssh_argv(None, tty=False, forward=f"{local}:127.0.0.1:{port}"),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            url = token_url(proc, log)
            assert url.startswith(f"http://127.0.0.1:{local}/?token=")   # it prints the address to open
            status, html = wait_until(lambda: _fetch(url), 30, "the page through the tunnel")
            assert status == 200 and f"ws://127.0.0.1:{local}/ws" in html
            screen = asyncio.run(_app_screen(f"ws://127.0.0.1:{local}/ws", log, _token(proc, log)))
            assert "faults/s" in screen
        finally:
            stop_pid(tunnel.pid)
            tunnel.wait()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the app processes textual-serve started for browser tabs)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


async def _app_screen(ws_url: str, log, token: str, while_open=None) -> str:
    """Open a browser tab's websocket and read the app's screen until the VM list is drawn."""
    import aiohttp

    screen = ""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{ws_url}?token={token}&width=100&height=30") as ws:
            await ws.send_json(["resize", {"width": 100, "height": 30}])
            # The VM list's header, and the status bar saying the app got `--no-daemon` from serve.
            while "faults/s" not in screen or "in-process" not in screen:
                msg = await ws.receive(timeout=60)
                assert msg.type == aiohttp.WSMsgType.BINARY, (msg, screen[-2000:], open(log.name).read())
                screen += msg.data.decode(errors="replace")
            if while_open is not None:
                assert while_open()
    return screen


async def test_a_browser_tab_runs_the_app_and_closing_it_ends_the_app(server):
    """The websocket the page opens runs the real app (its screen arrives); closing the tab ends it."""
    proc, port, log = server
    wait_until(lambda: _fetch(f"http://127.0.0.1:{port}/"), 30, "the server to answer")
    await _app_screen(f"ws://127.0.0.1:{port}/ws", log, _token(proc, log),
                      while_open=lambda: len(_children(proc.pid)) == 1)   # one app process for this tab
    # The tab is gone: textual-serve tells the app to quit and the app process ends.
    wait_until(lambda: not _children(proc.pid), 30, "the app process of the closed tab to exit")


def _non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses other than 127.x (may be none in a bare container)."""
    try:
        found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        found = [ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    return [a for a in found if "." in a and not a.startswith("127.")]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.org"])
def test_serve_refuses_any_address_but_loopback(tmp_path, host):
    r = subprocess.run([*SERVE, "--host", host, "--port", str(free_port())], capture_output=True,
                       text=True, timeout=60, env=_env(tmp_path), stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert f"refusing to listen on {host}" in r.stderr
    assert "no authentication" in r.stderr
    assert "ssh -L" in r.stderr


def test_serve_says_clearly_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*SERVE, "--port", str(port)], capture_output=True, text=True, timeout=60,
                           env=_env(tmp_path), stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_serve_checks_the_app_arguments_before_listening(tmp_path):
    port = free_port()
    r = subprocess.run([*SERVE, "--port", str(port), "--", "--rate", "fast"], capture_output=True,
                       text=True, timeout=60, env=_env(tmp_path), stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "--rate" in r.stderr and "'fast'" in r.stderr
    assert _fetch(f"http://127.0.0.1:{port}/") is None          # nothing was started


# --- the token (issue 11, item 1) -----------------------------------------------------------------

def _ws_status(url: str, headers: dict | None = None) -> int:
    """The HTTP status a websocket handshake gets (101 when it is accepted)."""
    import aiohttp

    async def attempt() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url, headers=headers or {}) as ws:
                    await ws.close()
                    return 101
            except aiohttp.WSServerHandshakeError as e:
                return e.status
    return asyncio.run(attempt())


def test_every_request_without_the_token_is_refused(server):
    proc, port, log = server
    token, base = _token(proc, log), f"http://127.0.0.1:{port}"
    assert _page(proc, port, log)                                     # with it: the page
    status, body = _fetch(f"{base}/")
    assert status == 401 and "open the URL that `mtevm serve` printed" in body
    assert _fetch(f"{base}/?token=not-{token}")[0] == 403
    assert _fetch(f"{base}/static/js/textual.js")[0] == 401          # every path, not just the page
    assert _fetch(f"{base}/?token={token}", {"Authorization": f"token {token}"})[0] == 200
    # The websocket: no token, a wrong one, a foreign page's Origin, a DNS-rebinding Host.
    assert _ws_status(f"ws://127.0.0.1:{port}/ws?width=80&height=24") == 401
    assert _ws_status(f"ws://127.0.0.1:{port}/ws?token=x{token}&width=80") == 403
    assert _ws_status(f"ws://127.0.0.1:{port}/ws?token={token}", {"Origin": "http://evil.example"}) == 403
    assert _ws_status(f"ws://127.0.0.1:{port}/ws?token={token}", {"Host": f"evil.example:{port}"}) == 403
    assert _children(proc.pid) == []                                  # no app was started for any of them
    assert _ws_status(f"ws://127.0.0.1:{port}/ws?token={token}",
                      {"Origin": f"http://127.0.0.1:{port}"}) == 101      # the page's own origin: fine


# Another local user: stdlib only (it runs with /usr/bin/python3 as nobody), raw HTTP, as the
# attacker of the issue did: the page, then a websocket upgrade with a foreign Origin and Host.
OTHER_USER_CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
def ask(lines):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = s.recv(4096).decode(errors="replace")
    s.close()
    return data.split("\r\n", 1)[0]
print(ask(["GET / HTTP/1.1", f"Host: 127.0.0.1:{port}"]))
print(ask(["GET /ws?width=80&height=24 HTTP/1.1", "Host: attacker.example", "Origin: http://attacker.example",
           "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]))
print(ask(["GET /ws?width=80&height=24 HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
           "Connection: Upgrade", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid (nobody)")
def test_a_client_of_another_uid_cannot_drive_the_app(server):
    proc, port, log = server
    token = _token(proc, log)
    as_nobody = [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    r = subprocess.run([*as_nobody, "/usr/bin/python3", "-c", OTHER_USER_CLIENT, str(port)],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["HTTP/1.1 401 Unauthorized", "HTTP/1.1 403 Forbidden",
                                     "HTTP/1.1 401 Unauthorized"]
    assert _children(proc.pid) == []                # no app process: nothing to type into
    # and the token is nowhere another user could read it: not in the server's argv or environment
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        assert token.encode() not in f.read()
    with open(f"/proc/{proc.pid}/environ", "rb") as f:
        assert token.encode() not in f.read()


def _vm_list_drawn(seen: str) -> bool:
    return "faults/s" in seen and "alpha" in seen and "sim-mte" in seen


def test_a_real_browser_with_the_token_shows_the_vm_list_and_without_it_the_refusal(tmp_path):
    created = subprocess.run([sys.executable, "-m", "backend.cli", "--no-daemon", "create", "alpha"],
                             capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert created.returncode == 0, created.stderr
    with running_server(tmp_path) as (proc, port, log):
        url = token_url(proc, log)
        with HeadlessChromium() as browser:
            # settle on the row, not just the header: the table is drawn a refresh before its rows
            _, png = asyncio.run(browser.visit(url, lambda png, text: _vm_list_drawn(ocr(png))))
        (tmp_path / "with-token.png").write_bytes(png)
        seen = ocr(png)
        assert _vm_list_drawn(seen), seen    # the VM list, drawn
        for bare in (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/?token=guess"):
            with HeadlessChromium() as browser:                      # a fresh profile: no cookie
                text, png = asyncio.run(browser.visit(bare, lambda png, text: "refused" in text))
            (tmp_path / "without-token.png").write_bytes(png)
            assert text.startswith("mtevm serve: refused: "), text
            assert "refused" in ocr(png) and "faults/s" not in ocr(png)
