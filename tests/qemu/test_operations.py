"""The everyday operations on a real QEMU VM (the ``local`` host), through the real Service:
pause/resume, the monitor pass-through, snapshots with the MTE tags, edit, clone, reboot,
migrate-cancel and shutdown. One VM serves the whole module (the tests run in order and each
leaves it running) to keep the suite quick; every QEMU is checked gone by PID at the end.
"""
from __future__ import annotations

import asyncio
import tempfile

import pytest
import pytest_asyncio

from backend.errors import ConfigError, MtevmError, NotFoundError, StateError
from backend.qemu.driver import kill_strays
from tests.helpers.polling import resume_and_check_boot_tags, until

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio(loop_scope="module")]
VM = "ops1"
MTE_BLOCKER = "Live migration disabled due to MTE enabled"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client():
    from backend.client import connect
    with tempfile.TemporaryDirectory(prefix="mtevm-ops-") as d:
        c = await connect(in_process=True, runtime_dir=f"{d}/run", state_dir=f"{d}/state")
        await c.create({"name": VM, "host": "local", "memory": "128M", "vcpus": 1, "workload": {"rate": 0}})
        await c.start(VM)
        try:
            yield c
        finally:
            for vm in await c.list():
                if vm["state"] in ("running", "paused"):
                    await c.stop(vm["name"])
            await c.close()
            assert await kill_strays(d) == [], "a QEMU of the module was left running"


async def counters(client) -> dict:
    return (await client.counters(VM))["vm"]


async def guest_counting(client, above: int = 0) -> dict:
    async def check():
        c = await counters(client)
        return c if c["checked"] > above else None
    return await until("the guest to count", check)


async def test_pause_holds_the_counters_still_and_resume_lets_them_go_on(client):
    before = await guest_counting(client)
    vm = await client.pause(VM)
    assert vm["state"] == "paused"
    assert [v["state"] for v in await client.list()] == ["paused"]
    assert (await client.monitor(VM, "query-status"))["return"]["status"] == "paused"
    held = await counters(client)
    assert held["checked"] >= before["checked"]
    await asyncio.sleep(0.5)
    assert await counters(client) == held          # nothing moves while paused
    with pytest.raises(StateError, match="paused, not running"):
        await client.pause(VM)
    assert (await client.resume(VM))["state"] == "running"
    await guest_counting(client, held["checked"])
    with pytest.raises(StateError, match="running, not paused"):
        await client.resume(VM)


async def test_the_monitor_passes_qmp_and_hmp_through_mtevms_connection(client):
    mtree = (await client.monitor(VM, "info mtree", hmp=True))["return"]
    assert "mach-virt.tag" in mtree and "tag-memory" in mtree      # the MTE tag RAM, as QEMU has it
    reply = await client.monitor(VM, '{"execute": "qom-get", "arguments": {"path": "/machine", "property": "mte"}}')
    assert reply["return"] is True
    with pytest.raises(MtevmError, match="The command no-such-command has not been found"):
        await client.monitor(VM, "no-such-command")
    with pytest.raises(ConfigError, match="mtevm stop"):
        await client.monitor(VM, "quit")
    # A 'stop' typed at the monitor is seen by mtevm: the VM shows as paused, and 'cont' undoes it.
    await client.monitor(VM, "stop")
    assert (await client.show(VM))["state"] == "paused"
    await client.monitor(VM, "cont", hmp=True)
    assert (await client.show(VM))["state"] == "running"


async def test_a_snapshot_brings_back_counters_and_tags(client):
    await guest_counting(client)
    await client.pause(VM)
    paused = await client.snapshot_save(VM, "paused1")
    assert paused["vm_state"] == "paused" and paused["bytes"] > 0
    assert paused["tags"] == "saved with RAM (mach-virt.tag block)"
    with pytest.raises(StateError, match="saved while paused and has not run since.*resume it, then save"):
        await client.snapshot_save(VM, "paused2")          # QEMU's limit, said with the way out
    await client.resume(VM)
    running = await client.snapshot_save(VM, "running1")       # the VM goes on running after a save
    assert running["vm_state"] == "running" and (await client.show(VM))["state"] == "running"
    assert running["counters"]["checked"] > paused["counters"]["checked"]
    assert [s["tag"] for s in await client.snapshot_list(VM)] == ["paused1", "running1"]

    # The paused snapshot comes back paused, with exactly the counters it was saved with ...
    vm = await client.snapshot_restore(VM, "paused1")
    assert vm["state"] == "paused" and vm["snapshot"]["tag"] == "paused1"
    assert await counters(client) == paused["counters"]
    assert (await client.monitor(VM, "query-status"))["return"]["status"] == "paused"
    # ... and its guest, resumed, still finds every tag it stored at boot (LDG of each granule).
    v = await resume_and_check_boot_tags(client, VM)
    assert v["boot_tags"] is True

    # The running snapshot comes back running, from its counters, not the later ones.
    ahead = await guest_counting(client, running["counters"]["checked"] + 200_000)
    vm = await client.snapshot_restore(VM)          # no tag: the newest
    assert vm["state"] == "running" and vm["snapshot"]["tag"] == "running1"
    now = await counters(client)
    assert running["counters"]["checked"] <= now["checked"] < ahead["checked"]

    await client.snapshot_delete(VM, "paused1")
    assert [s["tag"] for s in await client.snapshot_list(VM)] == ["running1"]
    with pytest.raises(NotFoundError, match="no snapshot 'paused1'"):
        await client.snapshot_restore(VM, "paused1")
    with pytest.raises(ConfigError, match="already has a snapshot 'running1'"):
        await client.snapshot_save(VM, "running1")
    with pytest.raises(ConfigError, match="not valid"):
        await client.snapshot_save(VM, "../x")


async def test_a_restore_across_a_changed_definition_is_refused_with_the_reason(client):
    vm = await client.edit(VM, {"vcpus": 2, "memory": "192M"})       # running: pending, as MTE is
    assert vm["pending"] == {"vcpus": 2, "memory": 192 << 20} and vm["config"]["vcpus"] == 1
    with pytest.raises(StateError) as err:
        await client.snapshot_restore(VM, "running1")
    assert "was taken with vcpus=1, memory=128M" in str(err.value)
    assert "will now boot vcpus=2, memory=192M" in str(err.value)
    assert (await client.show(VM))["state"] == "running"               # refused: nothing changed
    vm = await client.edit(VM, {"vcpus": 1, "memory": "128M"})        # back to the current: no change pending
    assert vm["pending"] == {}


async def test_edit_is_judged_by_the_decision_tree(client):
    # As create: a definition that cannot start here is kept, with QEMU's text as the warning.
    vm = await client.edit(VM, {"cpu": "cortex-a57"})
    assert vm["pending"] == {"cpu": "cortex-a57"}
    assert vm["warnings"] == ["MTE requested, but not supported by the guest CPU"]
    vm = await client.edit(VM, {"cpu": "max"})
    assert vm["pending"] == {} and vm["warnings"] == []
    with pytest.raises(ConfigError, match="host cannot be edited"):
        await client.edit(VM, {"host": "sim-mte"})
    with pytest.raises(ConfigError, match="vcpus"):
        await client.edit(VM, {"vcpus": 0})
    assert (await client.show(VM))["pending"] == {}


async def test_clone_copies_the_definition(client):
    await client.edit(VM, {"workload": {"seed": 7}})          # pending: the clone gets it
    clone = await client.clone(VM, "ops1-copy")
    assert clone["state"] == "stopped" and clone["host"] == "local" and clone["cloned_from"] == VM
    assert clone["config"] == {**(await client.show(VM))["config"]}
    assert clone["workload"]["seed"] == 7 and clone["copied"] == []     # the built-in guest has no disks
    with pytest.raises(ConfigError, match="already exists"):
        await client.clone(VM, "ops1-copy")
    await client.delete("ops1-copy")


async def test_reboot_resets_the_builtin_guest_and_says_so(client):
    async def settled():      # the guest has verified its boot tags a few times (10 per second)
        [v] = await client.vcpus(VM)
        return v if v["boot_tag_checks"] >= 8 else None
    before = await until("a guest that has run a while", settled)
    vm = await client.reboot(VM)
    assert vm["outcome"]["how"] == "reset"
    assert "no agent" in vm["outcome"]["message"] and "system_reset" in vm["outcome"]["message"]

    async def booted_again():  # its counters begin again: fewer boot-tag checks than before the reset
        [v] = await client.vcpus(VM)
        return v if v["up"] and v["boot_tag_checks"] < before["boot_tag_checks"] else None
    after = await until("the guest to boot again", booted_again)
    assert after["boot_tags"] is True
    await guest_counting(client, 0)


async def test_migrate_cancel_keeps_the_vm_running_here(client):
    # Slow the transfer (QEMU's own max-bandwidth, set through the monitor) so it is still running.
    await client.monitor(VM, 'migrate-set-parameters {"max-bandwidth": 65536}')
    m = await client.migrate(VM, "local")

    async def active():
        return next((x for x in await client.migrations() if x["id"] == m["id"] and x["state"] == "active"), None)
    await until("the migration to be active", active)
    await client.migrate_cancel(VM)

    async def cancelled():
        return next((x for x in await client.migrations() if x["id"] == m["id"] and x["state"] == "cancelled"), None)
    record = await until("the migration to be cancelled", cancelled)
    assert record["reason"] == "cancelled by the user"
    vm = await client.show(VM)
    assert vm["state"] == "running" and vm["host"] == "local"
    await guest_counting(client, (await counters(client))["checked"])
    with pytest.raises(StateError, match="no migration to cancel"):
        await client.migrate_cancel(VM)
    await client.monitor(VM, 'migrate-set-parameters {"max-bandwidth": 134217728}')


async def test_shutdown_of_the_builtin_guest_falls_back_to_stop_and_says_so(client):
    vm = await client.shutdown(VM, timeout=5)
    assert vm["state"] == "stopped" and vm["outcome"]["how"] == "stop"
    assert "no agent" in vm["outcome"]["message"] and "QMP quit" in vm["outcome"]["message"]
    # Stopped: an edit applies now, and the next boot has it (QEMU's own view of its vCPUs).
    vm = await client.edit(VM, {"vcpus": 2})
    assert vm["config"]["vcpus"] == 2 and vm["pending"] == {} and vm["workload"]["seed"] == 7
    await client.start(VM)
    cpus = (await client.monitor(VM, "query-cpus-fast"))["return"]
    assert len(cpus) == 2
