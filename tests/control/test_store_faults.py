"""A store that cannot be written never makes the daemon say or do something untrue.

On a real full file system (a small tmpfs mounted as the state directory) every change is refused
with "the store could not be written: <reason>; nothing changed" and the daemon's memory (what
``list``/``show`` say) stays what the store says; a daemon starts on that full disk and still
serves. On a read-only file system, or with an immutable -shm file, the daemon refuses to start
with one clear line naming what to fix. Needs root (mount, chattr): CI runs as root.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import stop_daemon_by_pid

NOTHING_CHANGED = "; nothing changed"
DISK_FULL = "the store could not be written: database or disk is full" + NOTHING_CHANGED


@pytest.fixture
def small_state_fs(mtevm_paths):
    """A 1 MiB tmpfs mounted on the state directory; unmounted (after the daemon stops) at the end."""
    os.makedirs(mtevm_paths.state_dir, mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "mtevm-test", mtevm_paths.state_dir],
                   check=True)
    yield mtevm_paths.state_dir
    stop_daemon_by_pid(mtevm_paths)
    subprocess.run(["umount", mtevm_paths.state_dir], check=True)


def fill(directory: str) -> None:
    """Write a file until the file system has no block left."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def ok(run_mtevm, *args):
    r = run_mtevm(*args, "--json")
    assert r.returncode == 0, (args, r.stderr)
    return json.loads(r.stdout)


def error_line(r) -> str:
    assert r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtevm: error: "), r.stderr
    return lines[0].removeprefix("mtevm: error: ")


def states(run_mtevm) -> dict:
    return {v["name"]: (v["state"], v["mte"], v["pending"]) for v in ok(run_mtevm, "list")}


def test_a_full_disk_refuses_every_change_and_memory_stays_true(small_state_fs, run_mtevm):
    ok(run_mtevm, "create", "runs")
    ok(run_mtevm, "create", "idle")
    ok(run_mtevm, "start", "runs")
    before = states(run_mtevm)
    workload = ok(run_mtevm, "show", "runs")["workload"]
    fill(small_state_fs)

    for args in (("start", "idle"), ("stop", "runs"), ("mte", "idle", "off"), ("mte", "runs", "off"),
                 ("create", "new"), ("delete", "idle", "--yes"), ("tcf", "runs", "async")):
        r = run_mtevm(*args)
        assert error_line(r) == DISK_FULL, args
        assert "internal error" not in r.stderr
        assert states(run_mtevm) == before, args            # nothing changed, in memory either
    assert ok(run_mtevm, "show", "runs")["workload"] == workload

    # A new daemon starts on the full disk and shows the same truth.
    assert run_mtevm("daemon", "stop").returncode == 0
    after_restart = states(run_mtevm)
    assert after_restart == {**before, "runs": ("stopped", True, {})}   # simulated VMs stop with their daemon
    assert error_line(run_mtevm("start", "idle")) == DISK_FULL

    os.unlink(os.path.join(small_state_fs, "filler"))      # room again: changes work again
    assert ok(run_mtevm, "start", "idle")["state"] == "running"
    assert ok(run_mtevm, "mte", "runs", "off")["mte"] is False


def test_a_read_only_state_disk_is_a_clear_error_at_daemon_start(small_state_fs, run_mtevm, mtevm_paths):
    ok(run_mtevm, "create", "kept")
    assert run_mtevm("daemon", "stop").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", small_state_fs], check=True)
    r = run_mtevm("list")
    assert error_line(r) == (f"the mtevm store {mtevm_paths.store} is on a read-only file system: mtevm must "
                             "write it; remount it read-write or choose another --state-dir / MTEVM_STATE_DIR")
    subprocess.run(["mount", "-o", "remount,rw", small_state_fs], check=True)
    assert [v["name"] for v in ok(run_mtevm, "list")] == ["kept"]


@pytest.fixture
def immutable(mtevm_paths):
    """chattr +i on a file; always undone at the end (an immutable file cannot even be deleted)."""
    made = []

    def make(path: str) -> None:
        subprocess.run(["chattr", "+i", path], check=True)
        made.append(path)
    yield make
    for path in made:
        subprocess.run(["chattr", "-i", path], check=True)


def test_an_immutable_shm_file_is_a_clear_error_not_a_crash(run_mtevm, mtevm_paths, immutable):
    ok(run_mtevm, "create", "kept")
    pid = int(open(mtevm_paths.pid_file).read())
    os.kill(pid, 9)                       # the -wal and -shm files stay, as after any crash
    shm = mtevm_paths.store + "-shm"
    assert os.path.exists(shm)
    immutable(shm)
    r = run_mtevm("list")
    assert error_line(r) == (f"the mtevm store file {shm} cannot be written: Operation not permitted "
                             "(immutable? see lsattr; chattr -i); the store was left untouched")
