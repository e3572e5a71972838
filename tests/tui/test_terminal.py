"""When its terminal goes away (ssh dropped: pty hang-up or SIGHUP) the app exits by itself,
and the VMs it showed keep running in the daemon.

The app runs as a real process on a real pty; the process is stopped by PID if it does not leave
on its own, and the daemon by the shared ``mtevm_daemon`` fixture.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

WAIT = 30.0      # an upper bound for a hang, not a speed goal


def spawn_app(tmp_path, *app_args: str, term: str = "xterm-256color"):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "TERM": term, "MTEVM_CONFIG": str(tmp_path / "none.toml")}
    env.pop("COLORTERM", None)
    env.pop("CI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui", *app_args],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True)
    os.close(slave)
    return proc, master


def read_until(master: int, needle: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + WAIT
    while needle not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"the app never drew {needle!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
    return seen


@contextlib.contextmanager
def running_app(tmp_path, *app_args: str, shows: bytes = b"UTC", term: str = "xterm-256color"):
    """The app in a pty, once it has drawn ``shows`` (default: its status line); yields what it wrote."""
    proc, master = spawn_app(tmp_path, *app_args, term=term)
    try:
        drawn = read_until(master, shows)
        yield proc, master, drawn
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.close(master)
        except OSError:
            pass


@pytest.fixture
def app_process(tmp_path):
    with running_app(tmp_path, "--no-daemon", "--state-dir", str(tmp_path / "state"),
                     "--runtime-dir", str(tmp_path / "run")) as (proc, master, _drawn):
        yield proc, master


def wait_exit(proc) -> int:
    try:
        return proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the app kept running after its terminal went away") from None


def test_exits_when_the_pty_hangs_up(app_process):
    proc, master = app_process
    os.close(master)                          # what sshd does when the connection drops
    assert wait_exit(proc) == 0


@pytest.mark.parametrize("after", [0.05, 0.2])
def test_exits_when_the_pty_closes_right_after_start(tmp_path, after):
    """Issue 11 item 15: a terminal that dies while the app is still starting (ssh dropped at once).
    Textual's output thread died at the first failed write and the app then waited forever for
    room in its queue; it must exit like any other hang-up."""
    proc, master = spawn_app(tmp_path, "--no-daemon", "--state-dir", str(tmp_path / "state"),
                             "--runtime-dir", str(tmp_path / "run"))
    try:
        time.sleep(after)
        os.close(master)
        assert wait_exit(proc) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_exits_on_sighup(app_process):
    proc, master = app_process
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_exit(proc) == 0


async def test_vms_keep_running_in_the_daemon_when_the_ssh_terminal_drops(tmp_path, mtevm_paths, mtevm_daemon):
    from backend.client import connect
    async with await connect(runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir,
                             start_daemon=False) as client:
        await client.create({"name": "web1", "host": "sim-mte"})
        await client.start("web1")
        with running_app(tmp_path, shows=b"running") as (proc, master, _):   # web1 listed as running
            os.close(master)
            assert wait_exit(proc) == 0
        assert (await client.show("web1"))["state"] == "running"


async def test_quitting_the_app_leaves_vms_running_in_the_daemon(mtevm_paths, mtevm_daemon):
    from backend.client import connect
    from tests.tui.pilot_helpers import started, wait_for
    from tui.app import MtevmApp

    async def factory():
        return await connect(runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir,
                             start_daemon=False)
    app = MtevmApp(factory)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot, app)
        await app.client.create({"name": "web1", "host": "sim-mte"})
        await app.client.start("web1")
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit")
    async with await connect(runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir,
                             start_daemon=False) as client:
        assert (await client.show("web1"))["state"] == "running"


def test_linux_console_gets_only_the_16_ansi_colours(tmp_path):
    """TERM=linux: the app picks the ANSI theme by itself; no 256-colour or RGB escape is written."""
    with running_app(tmp_path, "--no-daemon", "--state-dir", str(tmp_path / "state"), "--runtime-dir",
                     str(tmp_path / "run"), term="linux") as (proc, master, drawn):
        drawn += read_until(master, b"quit")               # the footer: the whole screen is drawn
    assert b"\x1b[" in drawn
    assert not re.search(rb"\x1b\[[0-9;]*[34]8;[25];", drawn), "256-colour or RGB escapes on a 16-colour console"
