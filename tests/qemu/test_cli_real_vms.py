"""Real QEMU VMs through the real CLI and a real daemon: what a user of the ``local`` host sees.

- A VM defined with extra QEMU arguments (an ivshmem-plain device on a shared memory backend)
  carries QEMU's own migration blocker: ``show`` lists it, ``migrate`` is refused with it and the
  refusal is recorded, and ``--only-migratable`` refuses the VM's start with QEMU's text.
- A QEMU reattached by a new daemon that then dies is shown as crashed with why: its pid, that its
  exit status is unknown (it is not the new daemon's child), and the tail of its stderr log.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from backend.qemu.driver import kill_strays, qemus_mentioning, read_tail
from tests.helpers.cli import error_of, ok

pytestmark = pytest.mark.qemu
IVSHMEM_BLOCKER = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"
SMALL_VM = ("--host", "local", "--memory", "128M", "--vcpus", "1")


@pytest.fixture
def no_qemu_left(mtevm_paths):
    """Every QEMU the test started (all name the runtime dir) is gone at the end, by PID."""
    yield
    left = asyncio.run(kill_strays(mtevm_paths.runtime_dir))
    assert left == [], f"the test left QEMU processes running: {left}"


@pytest.fixture
def ivshmem_args(tmp_path):
    """--qemu-arg options for an ivshmem-plain device on a shared memory file under /dev/shm (a host
    file: the VM must allow it)."""
    path = f"/dev/shm/mtevm-test-{os.getpid()}-{tmp_path.name}"
    yield ["--qemu-arg=-object", f"--qemu-arg=memory-backend-file,id=shm,mem-path={path},size=1M,share=on",
           "--qemu-arg=-device ivshmem-plain,memdev=shm", "--allow-host-files"]
    if os.path.exists(path):
        os.unlink(path)


def test_an_ivshmem_blocker_reaches_the_user_verbatim(run_mtevm, mtevm_daemon, ivshmem_args, no_qemu_left):
    mem_path = ivshmem_args[1].split("mem-path=")[1].split(",")[0]
    # Without the opt-in, a QEMU argument that names a host file is refused before anything exists.
    r = run_mtevm("create", "shared", *SMALL_VM, *ivshmem_args[:-1])
    assert r.returncode == 2
    assert f"mem-path={mem_path} (a host file)" in error_of(r) and "--allow-host-files" in error_of(r)
    assert not os.path.exists(mem_path) and ok(run_mtevm, "list") == []

    vm = ok(run_mtevm, "create", "shared", *SMALL_VM, *ivshmem_args)
    assert vm["qemu_args"] == ["-object", ivshmem_args[1].removeprefix("--qemu-arg="),
                               "-device", "ivshmem-plain,memdev=shm"]
    assert vm["allow_host_files"] is True
    [host_files] = [ln for ln in run_mtevm("show", "shared").stdout.splitlines() if "host files" in ln]
    assert "allowed" in host_files
    assert ok(run_mtevm, "start", "shared")["state"] == "running"
    assert os.path.getsize(mem_path) == 1 << 20      # allowed, QEMU really made and grew the host file
    try:
        shown = ok(run_mtevm, "show", "shared")
        assert shown["blocked_reasons"] == [IVSHMEM_BLOCKER]
        assert shown["qemu_args"] == vm["qemu_args"]

        r = run_mtevm("migrate", "shared", "--to", "local")
        assert r.returncode == 1 and error_of(r) == IVSHMEM_BLOCKER
        [m] = ok(run_mtevm, "migrations")
        assert (m["vm"], m["src"], m["dst"], m["state"], m["reason"]) == ("shared", "local", "local", "blocked",
                                                                           IVSHMEM_BLOCKER)
        assert ok(run_mtevm, "show", "shared")["state"] == "running"     # refused: nothing moved
    finally:
        ok(run_mtevm, "stop", "shared")

    # The same device with --only-migratable: QEMU itself refuses to start, in its own words.
    ok(run_mtevm, "create", "strict", *SMALL_VM, "--only-migratable", *ivshmem_args)
    r = run_mtevm("start", "strict")
    assert r.returncode == 1
    assert ("disallowing migration blocker (--only-migratable) for: " + IVSHMEM_BLOCKER) in error_of(r)
    strict = ok(run_mtevm, "show", "strict")
    assert strict["state"] == "stopped"
    assert IVSHMEM_BLOCKER in strict["last_error"]


def test_extra_qemu_arguments_survive_a_daemon_restart(run_mtevm, mtevm_paths, ivshmem_args, no_qemu_left):
    """The definition is persisted: a new daemon (a new Service on the same store) still has it."""
    vm = ok(run_mtevm, "create", "kept", *SMALL_VM, *ivshmem_args)
    assert run_mtevm("daemon", "stop").returncode == 0
    kept = ok(run_mtevm, "show", "kept")
    assert (kept["qemu_args"], kept["allow_host_files"]) == (vm["qemu_args"], True)


def wait_for_state(run_mtevm, name: str, state: str, timeout: float = 30.0) -> dict:
    """Poll ``show`` until the VM is in ``state`` (the daemon samples about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        vm = ok(run_mtevm, "show", name)
        if vm["state"] == state or time.monotonic() > deadline:
            return vm
        time.sleep(0.2)


def test_a_reattached_qemu_that_dies_shows_its_pid_and_log(run_mtevm, mtevm_paths, no_qemu_left):
    for name in ("killed", "termed"):
        ok(run_mtevm, "create", name, *SMALL_VM, "--rate", "0")
        ok(run_mtevm, "start", name)
    assert run_mtevm("daemon", "stop").returncode == 0       # the QEMUs keep running, orphaned
    listed = ok(run_mtevm, "list")                            # a new daemon reattaches them
    assert sorted((v["name"], v["state"]) for v in listed) == [("killed", "running"), ("termed", "running")]

    pids = {}
    for name in ("killed", "termed"):
        [pids[name]] = qemus_mentioning(os.path.join(mtevm_paths.vm_runtime_root, name))
    os.kill(pids["killed"], signal.SIGKILL)
    os.kill(pids["termed"], signal.SIGTERM)                  # QEMU logs who sent it before it exits

    for name in ("killed", "termed"):
        vm = wait_for_state(run_mtevm, name, "crashed")
        reason = f"QEMU (pid {pids[name]}) exited while reattached; its exit status is unknown"
        assert vm["state"] == "crashed" and vm["last_error"] == reason
        [log] = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(mtevm_paths.vm_runtime_root, name))
                 for f in files if f.startswith("qemu-") and f.endswith(".log")]
        assert vm["stderr"] == read_tail(log) + [reason]
    # SIGTERM makes QEMU say so on stderr: that line reaches the user with the reason.
    termed = ok(run_mtevm, "show", "termed")["stderr"]
    assert any(f"terminating on signal 15 from pid {os.getpid()}" in line for line in termed), termed
    assert [v["state"] for v in ok(run_mtevm, "list")] == ["crashed", "crashed"]
