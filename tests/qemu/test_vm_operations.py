"""One operation at a time per VM, on real QEMU VMs through the daemon's Service (in process).

A user (or two front ends) may ask for a migration and a stop of the same VM at the same moment.
The second request is refused with "VM 'x' is migrating" (or "... is stopping"), the first one
completes, history records the true outcome, and no QEMU is left behind.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from backend.client import connect
from backend.errors import StateError
from backend.qemu.driver import kill_strays, qemus_mentioning

pytestmark = pytest.mark.qemu
SMALL_VM = {"host": "local", "memory": "128M", "vcpus": 1, "workload": {"rate": 0}}


@pytest.fixture
async def client(mtevm_paths):
    c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    yield c
    await c.close()
    assert await kill_strays(mtevm_paths.runtime_dir) == [], "the test left QEMU processes running"


async def wait_migration(client, mid: int, timeout: float = 60.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        [m] = [m for m in await client.migrations() if m["id"] == mid]
        if m["state"] not in ("setup", "active") or loop.time() > deadline:
            return m
        await asyncio.sleep(0.05)


async def test_a_stop_during_a_migration_is_refused_and_the_migration_completes(client, mtevm_paths):
    await client.create({"name": "racer", **SMALL_VM})
    await client.start("racer")
    migration, stop = await asyncio.gather(client.migrate("racer", "local"), client.stop("racer"),
                                           return_exceptions=True)
    assert isinstance(stop, StateError) and str(stop) == "VM 'racer' is migrating", stop
    assert not isinstance(migration, BaseException), migration
    m = await wait_migration(client, migration["id"])
    assert (m["state"], m["reason"]) == ("completed", None), m
    assert (await client.show("racer"))["state"] == "running"
    assert len(qemus_mentioning(mtevm_paths.vm_runtime_root)) == 1     # the destination only

    # Once the migration has ended, the VM is free again: stop works and leaves no QEMU.
    assert (await client.stop("racer"))["state"] == "stopped"
    assert qemus_mentioning(mtevm_paths.vm_runtime_root) == []


async def test_a_migration_during_a_stop_is_refused(client, mtevm_paths):
    await client.create({"name": "racer", **SMALL_VM})
    await client.start("racer")
    stop, migration = await asyncio.gather(client.stop("racer"), client.migrate("racer", "local"),
                                           return_exceptions=True)
    assert isinstance(migration, StateError) and str(migration) == "VM 'racer' is stopping", migration
    assert stop["state"] == "stopped"
    assert await client.migrations() == []      # nothing was attempted, so nothing is recorded
    assert qemus_mentioning(mtevm_paths.vm_runtime_root) == []


async def test_deleting_a_vm_removes_its_runtime_directory_and_qemu_logs(client, mtevm_paths):
    await client.create({"name": "gone", **SMALL_VM})
    await client.start("gone")
    await client.stop("gone")
    vm_dir = os.path.join(mtevm_paths.vm_runtime_root, "gone")
    assert any(f.startswith("qemu-") and f.endswith(".log") for f in os.listdir(vm_dir))
    await client.delete("gone")
    assert not os.path.exists(vm_dir)
    # A new VM of the same name starts with nothing of the old one's.
    await client.create({"name": "gone", **SMALL_VM})
    assert (await client.show("gone"))["stderr"] == []
