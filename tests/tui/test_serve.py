"""`mtevm serve`: the app in a browser, as a real server process on a real port."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import urllib.request
from contextlib import contextmanager

import pytest

from tests.helpers import mtevm_executable
from tests.helpers.sshd import SshServer, free_port, stop_pid, wait_until

SERVE = [mtevm_executable(), "serve"]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env["MTEVM_RUNTIME_DIR"] = str(tmp_path / "run")
    env["MTEVM_STATE_DIR"] = str(tmp_path / "state")
    return env


def _fetch(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return None


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
    url = f"http://127.0.0.1:{port}/"

    def page():
        assert proc.poll() is None, f"mtevm serve exited: {open(log.name).read()}"
        return _fetch(url)
    status, html = wait_until(page, 30, f"{url} to answer")
    assert status == 200
    return html


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
            status, html = wait_until(lambda: _fetch(f"http://127.0.0.1:{local}/"), 30, "the page through the tunnel")
            assert status == 200 and f"ws://127.0.0.1:{local}/ws" in html
            screen = asyncio.run(_app_screen(f"ws://127.0.0.1:{local}/ws", log))
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


async def _app_screen(ws_url: str, log, while_open=None) -> str:
    """Open a browser tab's websocket and read the app's screen until the VM list is drawn."""
    import aiohttp

    screen = ""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{ws_url}?width=100&height=30") as ws:
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
    await _app_screen(f"ws://127.0.0.1:{port}/ws", log,
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
