"""The everyday operations on a VM of a real libvirt host, done through libvirt's own calls, so
virsh sees the same thing mtevm shows: pause/resume (virDomainSuspend/Resume), reboot (reset: the
built-in guest has no agent), the monitor through libvirt's passthrough, migrate-cancel
(virDomainAbortJob), shutdown (destroy, said so). Snapshots: test_libvirt_vm_snapshots.py."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from backend.client import connect
from backend.errors import MigrationError
from tests.helpers.polling import until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def domstate(uri: str, name: str) -> str:
    r = subprocess.run(["virsh", "-c", uri, "domstate", name], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    return r.stdout.strip()


async def test_operations_through_libvirt(libvirt_env, mtevm_paths):
    uri = libvirt_env.uri_a
    c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    try:
        await c.host_add("hosta", uri)
        await c.create({"name": "lv1", "host": "hosta", "vcpus": 1, "memory": "128M", "workload": {"rate": 0}})
        await c.start("lv1")

        async def counting(above: int = 0):
            n = (await c.counters("lv1"))["vm"]["checked"]
            return n if n > above else None
        await until("the guest to count", counting, timeout=60)

        assert (await c.pause("lv1"))["state"] == "paused"
        assert domstate(uri, "lv1") == "paused"                     # libvirt's own view agrees
        held = (await c.counters("lv1"))["vm"]
        await asyncio.sleep(0.5)
        assert (await c.counters("lv1"))["vm"] == held
        assert (await c.monitor("lv1", "query-status"))["return"]["status"] == "paused"
        assert (await c.resume("lv1"))["state"] == "running"
        assert domstate(uri, "lv1") == "running"
        await until("counting again", lambda: counting(held["checked"]), timeout=60)

        # A migration to the other libvirt host, slowed by libvirt's own speed limit, cancelled:
        # virDomainAbortJob; the VM keeps running on hosta and the history says "cancelled".
        await c.host_add("hostb", libvirt_env.uri_b)
        assert subprocess.run(["virsh", "-c", uri, "migrate-setspeed", "lv1", "1"], capture_output=True,
                              timeout=60).returncode == 0
        m = await c.migrate("lv1", "hostb")

        async def migration(state: str):
            return next((x for x in await c.migrations() if x["id"] == m["id"] and x["state"] == state), None)
        await until("the migration to run", lambda: migration("active"), timeout=60)
        await c.migrate_cancel("lv1")
        record = await until("the migration to be cancelled", lambda: migration("cancelled"), timeout=60)
        assert record["reason"] == "cancelled by the user"
        vm = await c.show("lv1")
        assert (vm["state"], vm["host"]) == ("running", "hosta") and domstate(uri, "lv1") == "running"

        # libvirt does not migrate a domain that has snapshots: its refusal, verbatim; the VM stays
        await c.snapshot_save("lv1", "s")
        refusal = ("libvirt does not migrate a domain that has snapshots (VM 'lv1' has 1: s), nor can it take "
                   "them along: delete them first (mtevm snapshot lv1 delete TAG)")
        targets = (await c.show("lv1"))["migration_targets"]      # said before libvirt is asked
        assert targets["hostb"] == refusal
        assert targets["hosta"].startswith("host hosta: libvirt does not migrate a domain to the host it runs on")
        try:
            m = await c.migrate("lv1", "hostb")       # refused when libvirt is asked, in the background
            reason = (await until("the migration to fail", lambda: migration("failed"), timeout=60))["reason"]
        except MigrationError as e:                 # (or at once)
            reason = str(e)
        assert reason == "Requested operation is not valid: cannot migrate domain with 1 snapshots"
        vm = await c.show("lv1")
        assert (vm["state"], vm["host"]) == ("running", "hosta")
        await c.snapshot_delete("lv1", "s")
        assert (await c.show("lv1"))["migration_targets"]["hostb"] is None

        vm = await c.reboot("lv1")
        assert vm["outcome"]["how"] == "reset"
        vm = await c.shutdown("lv1")
        assert vm["state"] == "stopped" and vm["outcome"]["how"] == "stop"
        assert vm["outcome"]["message"].endswith("stopped it instead (virDomainDestroy)")
        assert domstate(uri, "lv1") == "shut off"
    finally:
        for vm in await c.list():
            if vm["state"] in ("running", "paused") and vm["host"] == "hosta":
                await c.stop(vm["name"])
        await c.close()
