"""The everyday operations through the real CLI and a real daemon on one real QEMU VM: what a user
scripting ``mtevm ... --json`` relies on, including a paused VM that a new daemon finds paused."""
from __future__ import annotations

import asyncio
import json

import pytest

from backend.qemu.driver import kill_strays, qemus_mentioning
from tests.helpers.cli import error_of, ok

pytestmark = pytest.mark.qemu


def test_operations_from_the_command_line(run_mtevm, mtevm_daemon, mtevm_paths):
    try:
        ok(run_mtevm, "create", "c1", "--host", "local", "--memory", "128M", "--vcpus", "1", "--rate", "0")
        ok(run_mtevm, "start", "c1")
        assert ok(run_mtevm, "pause", "c1")["state"] == "paused"
        assert [vm["state"] for vm in ok(run_mtevm, "list")] == ["paused"]
        # A new daemon finds the QEMU paused, and says so.
        assert run_mtevm("daemon", "stop").returncode == 0
        assert ok(run_mtevm, "show", "c1")["state"] == "paused"
        assert ok(run_mtevm, "resume", "c1")["state"] == "running"

        r = run_mtevm("monitor", "c1", "--hmp", "info", "mtree")
        assert r.returncode == 0 and "mach-virt.tag" in r.stdout
        assert ok(run_mtevm, "monitor", "c1", "query-status")["return"]["status"] == "running"
        r = run_mtevm("monitor", "c1", "no-such-command")
        assert r.returncode == 1 and error_of(r) == "The command no-such-command has not been found"

        snap = ok(run_mtevm, "snapshot", "c1", "save", "s1")
        assert snap["tag"] == "s1" and snap["vm_state"] == "running"
        assert [s["tag"] for s in ok(run_mtevm, "snapshot", "c1", "list")] == ["s1"]
        r = run_mtevm("snapshot", "c1", "restore", "s1")          # over a running VM: asks first
        assert r.returncode == 2 and "pass --yes" in error_of(r)
        restored = ok(run_mtevm, "snapshot", "c1", "restore", "s1", "--yes")
        assert restored["state"] == "running" and restored["snapshot"]["tag"] == "s1"
        assert restored["vcpus"][0]["checked"] >= snap["counters"]["checked"]
        r = run_mtevm("snapshot", "c1", "delete", "s1")
        assert r.returncode == 2 and "pass --yes" in error_of(r)
        ok(run_mtevm, "snapshot", "c1", "delete", "s1", "--yes")
        assert ok(run_mtevm, "snapshot", "c1", "list") == []

        vm = ok(run_mtevm, "edit", "c1", "--vcpus", "2", "--memory", "192M",
                "--qemu-args", "-device virtio-rng-device")
        assert vm["pending"] == {"vcpus": 2, "memory": 192 << 20, "qemu_args": ["-device", "virtio-rng-device"]}
        r = run_mtevm("edit", "c1", "--no-mte", "--json")        # pending, then back: nothing pending
        assert r.returncode == 0 and json.loads(r.stdout)["pending"]["mte"] is False
        r = run_mtevm("edit", "c1", "--mte", "--cpu", "cortex-a57")
        assert r.returncode == 0 and ("mtevm: warning: VM c1 cannot start on local: MTE requested, but not "
                                      "supported by the guest CPU") in r.stderr
        ok(run_mtevm, "edit", "c1", "--cpu", "max")
        r = run_mtevm("edit", "c1", "--qemu-args", "-kernel x")
        assert r.returncode == 2 and "'-kernel' is not allowed" in error_of(r)
        clone = ok(run_mtevm, "clone", "c1", "c2")
        assert clone["config"]["vcpus"] == 2 and clone["qemu_args"] == ["-device", "virtio-rng-device"]

        out = ok(run_mtevm, "reboot", "c1")
        assert out["outcome"]["how"] == "reset"
        r = run_mtevm("migrate-cancel", "c1")
        assert r.returncode == 1 and "no migration to cancel" in error_of(r)
        r = run_mtevm("shutdown", "c1")
        assert r.returncode == 0 and "stopped it instead (QMP quit)" in r.stdout
        vm = ok(run_mtevm, "start", "c1")         # the pending edit is the new definition
        assert (vm["config"]["vcpus"], vm["qemu_args"], vm["pending"]) == (2, ["-device", "virtio-rng-device"], {})
        assert len(ok(run_mtevm, "monitor", "c1", "query-cpus-fast")["return"]) == 2
        ok(run_mtevm, "stop", "c1")
        assert qemus_mentioning(mtevm_paths.runtime_dir) == []
    finally:
        asyncio.run(kill_strays(mtevm_paths.runtime_dir))     # only if the test failed half-way
