"""When its terminal goes away (ssh dropped: pty hang-up or SIGHUP) the app exits by itself.

The app runs as a real process on a real pty, with the service in-process (--no-daemon) so the
test needs no daemon; the process is stopped by PID if it does not leave on its own.
"""
from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

WAIT = 30.0      # an upper bound for a hang, not a speed goal


def spawn_app(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "MTEVM_CONFIG": str(tmp_path / "none.toml")}
    env.pop("CI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui", "--no-daemon", "--state-dir", str(tmp_path / "state"),
         "--runtime-dir", str(tmp_path / "run")],
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


@pytest.fixture
def app_process(tmp_path):
    proc, master = spawn_app(tmp_path)
    try:
        read_until(master, b"UTC")            # the status line: the app is up and drawing
        yield proc, master
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.close(master)
        except OSError:
            pass


def wait_exit(proc) -> int:
    try:
        return proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the app kept running after its terminal went away") from None


def test_exits_when_the_pty_hangs_up(app_process):
    proc, master = app_process
    os.close(master)                          # what sshd does when the connection drops
    assert wait_exit(proc) == 0


def test_exits_on_sighup(app_process):
    proc, master = app_process
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_exit(proc) == 0
