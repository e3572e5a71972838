"""kill -9 of a real daemon in the middle of a real QEMU start or migration, then a new daemon.

The new daemon must find the truth from QEMU: adopt the VM where it really runs, stop every other
QEMU, record the migration's real outcome, and never make a second QEMU for one VM; `mtevm stop`
afterwards leaves no QEMU behind.

To kill the daemon at a chosen moment, the daemon runs QEMU through a wrapper ($MTEVM_QEMU) that
execs the real qemu-system-aarch64 (same pid, same process start time). The daemon's environment
is fixed when it starts, so the test steers the wrapper with files in its directory: ``gate-vm`` /
``gate-incoming`` hold such a launch before the exec until the file ``go`` appears; ``monitor`` gives the test a QMP monitor of its own on the
source VM (a second ``-qmp``), through which the test makes QEMU pause a migration before its
switch-over (QEMU's ``pause-before-switchover`` capability) and later lets it complete.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from qemu.qmp import QMPClient

from backend.qemu.driver import kill_strays, proc_start_time, qemus_mentioning

pytestmark = pytest.mark.qemu
SMALL_VM = ("--host", "local", "--memory", "128M", "--vcpus", "1", "--rate", "2000")   # paced: idles between batches

WRAPPER = r"""#!/bin/sh
# Test wrapper around QEMU: see tests/qemu/test_daemon_killed.py
case " $* " in
  *" -incoming "*) kind=incoming ;;
  *" -qmp "*) kind=vm ;;
  *) exec "$REAL_QEMU" "$@" ;;
esac
if [ -e "$WRAP_DIR/gate-$kind" ]; then
  echo $$ > "$WRAP_DIR/held-$kind.tmp" && mv "$WRAP_DIR/held-$kind.tmp" "$WRAP_DIR/held-$kind"
  while [ ! -e "$WRAP_DIR/go" ]; do sleep 0.02; done
fi
if [ "$kind" = vm ] && [ -e "$WRAP_DIR/monitor" ]; then
  exec "$REAL_QEMU" "$@" -qmp "unix:$WRAP_DIR/monitor-$$.sock,server=on,wait=off"
fi
exec "$REAL_QEMU" "$@"
"""


@pytest.fixture
def wrap(tmp_path, mtevm_paths):
    """Environment for run_mtevm that makes the daemon run QEMU through WRAPPER."""
    d = tmp_path / "wrap"
    d.mkdir()
    script = d / "qemu"
    script.write_text(WRAPPER)
    script.chmod(0o755)
    env = {"MTEVM_QEMU": str(script), "REAL_QEMU": shutil.which("qemu-system-aarch64"), "WRAP_DIR": str(d)}
    yield d, env
    (d / "go").touch()                      # never leave a held launch waiting
    left = asyncio.run(kill_strays(mtevm_paths.runtime_dir))
    assert left == [], f"the test left QEMU processes running: {left}"


def ok(run_mtevm, *args, env=None):
    r = run_mtevm(*args, "--json", env=env)
    assert r.returncode == 0, f"mtevm {' '.join(args)}: {r.stderr}"
    return json.loads(r.stdout)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def launch_records(paths) -> list[str]:
    return [f for _, _, files in os.walk(paths.vm_runtime_root) for f in files if f.startswith("launch-")]


def held_launch(d, kind: str, paths, records: int) -> int:
    """The pid of the launch the wrapper holds, once the daemon has recorded it (``records`` in all)."""
    pid = int(wait_for(lambda: (d / f"held-{kind}").exists() and (d / f"held-{kind}").read_text().strip(),
                       f"the {kind} launch"))
    wait_for(lambda: len(launch_records(paths)) == records, "the daemon to record the launch")
    return pid


def kill_daemon(paths) -> None:
    pid = int(open(paths.pid_file).read())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: proc_start_time(pid) is None, "the daemon to die")


def qemus(paths) -> list[int]:
    return sorted(qemus_mentioning(paths.vm_runtime_root))


def background(run_mtevm, *args, env):
    """A client call that will lose its daemon: run it in a thread-free subprocess, don't wait."""
    full = {**os.environ, **env}    # MTEVM_RUNTIME_DIR / MTEVM_STATE_DIR: set by the mtevm_paths fixture
    return subprocess.Popen([sys.executable, "-m", "backend.cli", *args], env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def finish(client: subprocess.Popen) -> None:
    """The client whose daemon was killed exits (with an error) by itself."""
    client.wait(timeout=60)


def counting(run_mtevm, name: str) -> None:
    """The adopted guest really runs: its checked-access counter grows."""
    first = ok(run_mtevm, "counters", name)["vm"]["checked"]
    wait_for(lambda: ok(run_mtevm, "counters", name)["vm"]["checked"] > first, "the guest's counters to grow")


def test_kill_during_a_start_then_the_next_daemon_adopts_the_qemu(run_mtevm, mtevm_paths, wrap):
    d, env = wrap
    ok(run_mtevm, "create", "boot", *SMALL_VM, env=env)
    (d / "gate-vm").touch()
    client = background(run_mtevm, "start", "boot", env=env)
    held = held_launch(d, "vm", mtevm_paths, 1)
    kill_daemon(mtevm_paths)                 # QEMU forked, not yet ready: the daemon dies here
    (d / "go").touch()
    finish(client)
    assert qemus(mtevm_paths) == [held]

    [vm] = ok(run_mtevm, "list")             # a new daemon starts and finds the QEMU
    assert (vm["name"], vm["state"]) == ("boot", "running")
    counting(run_mtevm, "boot")
    r = run_mtevm("start", "boot")
    assert r.returncode != 0 and r.stderr.strip() == "mtevm: error: VM 'boot' is running"
    assert qemus(mtevm_paths) == [held]      # never a second QEMU for one VM
    ok(run_mtevm, "stop", "boot")
    assert qemus(mtevm_paths) == []


def test_a_launch_the_daemon_never_recorded_is_reaped_by_its_mark_not_by_name(run_mtevm, mtevm_paths, wrap,
                                                                              tmp_path):
    d, env = wrap
    ok(run_mtevm, "create", "boot", *SMALL_VM, env=env)
    (d / "gate-vm").touch()
    client = background(run_mtevm, "start", "boot", env=env)
    held = held_launch(d, "vm", mtevm_paths, 1)
    kill_daemon(mtevm_paths)
    # As if the daemon had died between the fork and writing the launch record.
    [record] = launch_records(mtevm_paths)
    os.unlink(os.path.join(mtevm_paths.vm_runtime_root, "boot", record))
    (d / "go").touch()
    finish(client)
    # A QEMU of the same name that mtevm did not launch (no mark of this daemon) must survive.
    other = subprocess.Popen([shutil.which("qemu-system-aarch64"), "-M", "virt", "-nodefaults", "-display", "none",
                              "-qmp", f"unix:{tmp_path}/other.sock,server=on,wait=off"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Nor a user's tool that names a socket of the VM (as `socat - unix:.../serial.sock` would).
    console = subprocess.Popen(["sh", "-c", "sleep 60", f"unix:{mtevm_paths.vm_runtime_root}/boot/serial.sock"])
    try:
        [vm] = ok(run_mtevm, "list")
        assert vm["state"] == "stopped"
        assert proc_start_time(held) is None         # killed by the new daemon (at most a zombie of init's)
        assert other.poll() is None and console.poll() is None    # not ours: left alone
    finally:
        for p in (other, console):
            p.kill()
            p.wait()
    assert qemus(mtevm_paths) == []


async def monitor(d, pid: int) -> QMPClient:
    """The test's own QMP monitor on the source QEMU (the wrapper's second -qmp)."""
    qmp = QMPClient("test")
    await qmp.connect(str(d / f"monitor-{pid}.sock"))
    return qmp


async def migration_status(qmp: QMPClient) -> str:
    return (await qmp.execute("query-migrate")).get("status", "none")


def test_kill_while_the_destination_is_still_inmigrate(run_mtevm, mtevm_paths, wrap):
    d, env = wrap
    ok(run_mtevm, "create", "mover", *SMALL_VM, env=env)
    ok(run_mtevm, "start", "mover", env=env)
    [source] = qemus(mtevm_paths)
    (d / "gate-incoming").touch()
    client = background(run_mtevm, "migrate", "mover", "--to", "local", env=env)
    dest = held_launch(d, "incoming", mtevm_paths, 2)
    kill_daemon(mtevm_paths)
    (d / "go").touch()                        # the destination starts: -incoming, listening, unmanaged
    finish(client)
    assert qemus(mtevm_paths) == sorted([source, dest])

    [vm] = ok(run_mtevm, "list")
    assert (vm["state"], vm["host"]) == ("running", "local")
    assert qemus(mtevm_paths) == [source]      # the destination was stopped
    [m] = ok(run_mtevm, "migrations")
    assert (m["state"], m["reason"]) == ("failed", "the daemon stopped during the migration, which QEMU had "
                                                   "not completed; the VM runs on its source")
    counting(run_mtevm, "mover")
    ok(run_mtevm, "stop", "mover")
    assert qemus(mtevm_paths) == []


def test_kill_after_qemu_completed_the_migration_adopts_the_destination(run_mtevm, mtevm_paths, wrap):
    d, env = wrap
    ok(run_mtevm, "create", "mover", *SMALL_VM, env=env)
    (d / "monitor").touch()
    ok(run_mtevm, "start", "mover", env=env)
    [source] = qemus(mtevm_paths)
    before = ok(run_mtevm, "counters", "mover")["vm"]["checked"]

    async def scenario():
        qmp = await monitor(d, source)
        try:
            await qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
            client = background(run_mtevm, "migrate", "mover", "--to", "local", env=env)
            while await migration_status(qmp) != "pre-switchover":
                await asyncio.sleep(0.02)
            kill_daemon(mtevm_paths)          # the daemon dies; then QEMU completes the migration
            await qmp.execute("migrate-continue", {"state": "pre-switchover"})
            while await migration_status(qmp) != "completed":
                await asyncio.sleep(0.02)
            assert (await qmp.execute("query-status"))["status"] == "postmigrate"
            finish(client)
        finally:
            await qmp.disconnect()
    asyncio.run(scenario())
    [dest] = [pid for pid in qemus(mtevm_paths) if pid != source]

    [vm] = ok(run_mtevm, "list")
    assert vm["state"] == "running"
    assert qemus(mtevm_paths) == [dest]         # adopted where it runs; the paused source was stopped
    [m] = ok(run_mtevm, "migrations")
    assert m["state"] == "completed" and m["progress"] == 1.0, m
    assert ok(run_mtevm, "counters", "mover")["vm"]["checked"] >= before   # the guest's counters moved with it
    counting(run_mtevm, "mover")
    ok(run_mtevm, "stop", "mover")
    assert qemus(mtevm_paths) == []


def test_kill_while_qemu_migrates_then_the_unwatched_migration_is_cancelled(run_mtevm, mtevm_paths, wrap):
    """A migration still running when the next daemon starts gets SETTLE_TIMEOUT to finish; this one
    cannot (its bandwidth is 1 KiB/s), so it is cancelled and the VM stays on its source."""
    d, env = wrap
    ok(run_mtevm, "create", "mover", *SMALL_VM, env=env)
    (d / "monitor").touch()
    ok(run_mtevm, "start", "mover", env=env)
    [source] = qemus(mtevm_paths)

    async def scenario():
        qmp = await monitor(d, source)
        try:
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1024})
            client = background(run_mtevm, "migrate", "mover", "--to", "local", env=env)
            while await migration_status(qmp) != "active":
                await asyncio.sleep(0.02)
            kill_daemon(mtevm_paths)
            finish(client)
            assert await migration_status(qmp) == "active"    # QEMU migrates on, unwatched
        finally:
            await qmp.disconnect()
    asyncio.run(scenario())
    assert len(qemus(mtevm_paths)) == 2

    [vm] = ok(run_mtevm, "list")
    assert vm["state"] == "running"
    assert qemus(mtevm_paths) == [source]
    [m] = ok(run_mtevm, "migrations")
    assert (m["state"], m["reason"]) == ("failed", "the daemon stopped during the migration, which QEMU had "
                                                   "not completed; the VM runs on its source")
    counting(run_mtevm, "mover")
    ok(run_mtevm, "stop", "mover")
    assert qemus(mtevm_paths) == []
