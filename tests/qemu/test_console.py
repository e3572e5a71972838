"""Every local VM's serial console: a bounded, persisted log and an interactive attach through a
real pty (the builtin guest here; the Linux guest's console is typed into in tests/guests/test_linux_guest.py)."""
from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import termios
import time

import pytest

from backend.qemu.console import ConsoleLog, SerialConsole, read_log
from backend.qemu.driver import kill_strays
from tests.helpers.pty_io import read_until, reap

SMALL_VM = ("--host", "local", "--memory", "128M", "--vcpus", "2")


def ok(run_mtevm, *args):
    r = run_mtevm(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_log_is_bounded_and_rotated(tmp_path):
    log = ConsoleLog(str(tmp_path), max_bytes=1000)
    for i in range(100):
        log.append(f"line {i:03d} ".encode() + b"x" * 40 + b"\r\n")
    log.close()
    sizes = [os.path.getsize(tmp_path / n) for n in ("console.log", "console.log.1")]
    assert all(s <= 1000 for s in sizes)
    lines = read_log(str(tmp_path), 1000)
    assert lines[-1].startswith("line 099") and lines == sorted(lines)      # newest kept, in order
    assert read_log(str(tmp_path), 3) == lines[-3:]


async def test_a_panic_on_the_console_is_caught_with_its_lines(tmp_path):
    seen = []
    console = SerialConsole(str(tmp_path / "none.sock"), ConsoleLog(str(tmp_path)), lambda: False, seen.append)
    console._received(b"[   1.0] sysrq: Trigger a crash\r\n[   1.1] Kernel panic - not syn")
    assert console.panic is None
    console._received(b"cing: sysrq triggered crash\r\n[   1.2] CPU: 0 PID: 1\r\n")
    assert seen and "[   1.1] Kernel panic - not syncing: sysrq triggered crash" in console.panic
    assert "sysrq: Trigger a crash" in console.panic[0]
    console._received(b"[   1.3] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\r\n\x1b[6nmore\r\n")
    assert console.panic[-2:] == ["[   1.2] CPU: 0 PID: 1",
                                  "[   1.3] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---"]


@pytest.mark.qemu
def test_console_log_and_attach_through_a_real_pty(run_mtevm, mtevm_daemon, mtevm_paths):
    ok(run_mtevm, "create", "c", *SMALL_VM)
    ok(run_mtevm, "start", "c")
    try:
        # QEMU is started paused until the daemon reads the console: the first lines are there.
        deadline = time.monotonic() + 20
        while True:
            lines = ok(run_mtevm, "console", "c", "--log")["lines"]
            if "mtevm-guest: cpu 1 up" in lines or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "mtevm-guest: cpu 0 up" in lines and "mtevm-guest: cpu 1 up" in lines
        human = run_mtevm("console", "c", "--log", "--lines", "1")
        assert human.stdout == "mtevm-guest: cpu 1 up\n"

        master, slave = pty.openpty()
        before = termios.tcgetattr(master)
        env = {**os.environ, "MTEVM_RUNTIME_DIR": mtevm_paths.runtime_dir, "MTEVM_STATE_DIR": mtevm_paths.state_dir}
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "console", "c"], stdin=slave, stdout=slave,
                                stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        try:
            read_until(master, b"detach: ^]")
            assert not termios.tcgetattr(master)[3] & termios.ICANON       # raw while attached
            os.write(master, b"\x1d")
            read_until(master, b"Detached from the console.")
            assert proc.wait(10) == 0
            assert termios.tcgetattr(master) == before                       # the terminal is restored
        finally:
            reap(master, proc)

        r = run_mtevm("console", "nope")
        assert r.returncode == 1 and "no VM named 'nope'" in r.stderr
    finally:
        ok(run_mtevm, "stop", "c")
    # stopped: attach says so; the log is still there
    r = run_mtevm("console", "c")
    assert r.returncode == 1 and "VM 'c' is stopped, not running" in r.stderr
    assert "mtevm-guest: cpu 0 up" in ok(run_mtevm, "console", "c", "--log")["lines"]
    ok(run_mtevm, "delete", "c", "--yes")
    assert asyncio.run(kill_strays(mtevm_paths.runtime_dir)) == []
