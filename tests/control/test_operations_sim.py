"""The everyday operations on the simulated hosts (the embedded default), through the real Service:
pause/resume, reboot, edit, clone, migrate-cancel, and the refusals where a simulated host cannot
(snapshots of a KVM MTE VM are refused with QEMU's own blocker text, as QEMU's savevm does)."""
from __future__ import annotations

import asyncio

import pytest

from backend.errors import ConfigError, MigrationError, StateError
from tests.helpers.polling import until

MTE_BLOCKER = "Live migration disabled due to MTE enabled"


async def checked(client, name) -> int:
    return (await client.counters(name))["vm"]["checked"]


async def test_pause_resume_and_reboot_of_a_simulated_vm(inproc_client):
    c = inproc_client
    await c.create({"name": "s1", "workload": {"rate": 0}})
    await c.start("s1")
    await until("counting", lambda: _above(c, "s1", 10_000))
    assert (await c.pause("s1"))["state"] == "paused"
    held = await c.counters("s1")
    await asyncio.sleep(0.3)
    assert (await c.counters("s1"))["vm"] == held["vm"]
    assert (await c.resume("s1"))["state"] == "running"
    await until("counting again", lambda: _above(c, "s1", held["vm"]["checked"]))
    before = await checked(c, "s1")
    vm = await c.reboot("s1")
    assert vm["outcome"]["how"] == "reset" and vm["state"] == "running"
    assert await checked(c, "s1") < before
    with pytest.raises(StateError, match="runs no QEMU"):
        await c.monitor("s1", "query-status")
    vm = await c.shutdown("s1")
    assert vm["state"] == "stopped" and vm["outcome"]["how"] == "stop" and "no agent" in vm["outcome"]["message"]
    with pytest.raises(StateError, match="stopped, not running"):
        await c.pause("s1")


async def _above(c, name, n):
    return await checked(c, name) > n


async def test_snapshots_of_a_kvm_mte_vm_are_refused_with_qemus_text(inproc_client):
    c = inproc_client
    await c.create({"name": "k1", "host": "sim-mte"})
    await c.start("k1")
    with pytest.raises(MigrationError) as err:
        await c.snapshot_save("k1", "x")
    assert str(err.value) == MTE_BLOCKER
    await c.create({"name": "n1", "host": "sim-mte", "mte": False})
    await c.start("n1")
    with pytest.raises(StateError, match="keeps no VM snapshots"):
        await c.snapshot_save("n1")
    assert await c.snapshot_list("k1") == []


async def test_edit_clone_and_pending_changes(inproc_client):
    c = inproc_client
    await c.create({"name": "e1", "host": "sim-mte"})
    vm = await c.edit("e1", {"vcpus": 3, "memory": "512M", "workload": {"tcf": "async"}})
    assert (vm["config"]["vcpus"], vm["config"]["memory"], vm["workload"]["tcf"]) == (3, 512 << 20, ["async"])
    vm = await c.edit("e1", {"accel": "tcg", "cpu": "cortex-a57"})      # kept, with QEMU's text, as create
    assert vm["warnings"] == ["MTE requested, but not supported by the guest CPU"]
    await c.create({"name": "plain", "host": "sim-nomte", "mte": False})
    vm = await c.edit("plain", {"mte": True})
    assert vm["config"]["mte"] is True and vm["warnings"] == ["MTE requested, but not supported by KVM"]
    await c.edit("e1", {"accel": "kvm", "cpu": "host"})
    with pytest.raises(ConfigError, match="vcpus"):
        await c.edit("e1", {"vcpus": 0})
    with pytest.raises(ConfigError, match="give at least one change"):
        await c.edit("e1", {})
    await c.start("e1")
    vm = await c.edit("e1", {"vcpus": 1, "qemu_args": []})
    assert vm["pending"] == {"vcpus": 1} and vm["config"]["vcpus"] == 3
    clone = await c.clone("e1", "e2")
    assert clone["config"]["vcpus"] == 1 and clone["state"] == "stopped"     # the definition it will boot with
    with pytest.raises(ConfigError, match="not valid"):
        await c.clone("e1", "bad name")
    await c.stop("e1")
    vm = await c.start("e1")
    assert vm["config"]["vcpus"] == 1 and vm["pending"] == {} and len(vm["vcpus"]) == 1


async def test_a_simulated_migration_can_be_cancelled(inproc_client):
    c = inproc_client
    await c.create({"name": "m1", "host": "sim-mte", "mte": False})
    await c.start("m1")
    m = await c.migrate("m1", "sim-nomte")
    for busy in (c.pause("m1"), c.snapshot_save("m1"), c.reboot("m1"), c.edit("m1", {"vcpus": 1})):
        with pytest.raises(StateError, match="^VM 'm1' is migrating$"):    # one operation at a time
            await busy
    await c.migrate_cancel("m1")

    async def settled():
        return next((x for x in await c.migrations() if x["id"] == m["id"] and x["state"] not in ("setup", "active")),
                    None)
    record = await until("the migration to end", settled)
    assert (record["state"], record["reason"]) == ("cancelled", "cancelled by the user")
    vm = await c.show("m1")
    assert (vm["state"], vm["host"]) == ("running", "sim-mte")
    with pytest.raises(StateError, match="no migration to cancel"):
        await c.migrate_cancel("m1")


async def test_clone_copies_a_vms_disks_beside_them(inproc_client, tmp_path):
    c = inproc_client
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 56 + b"ARM\x64" + b"\0" * 64)      # an arm64 Image header (never booted here)
    disk = tmp_path / "root.img"
    disk.write_bytes(b"disk data " * 1000)
    await c.create({"name": "d1", "host": "local", "guest": {"kind": "custom", "kernel": str(kernel),
                                                              "disks": [str(disk)]}})
    clone = await c.clone("d1", "d2")
    copy = tmp_path / "root-d2.img"
    assert clone["copied"] == [str(copy)] and copy.read_bytes() == disk.read_bytes()
    assert (await c.show("d2"))["guest"]["disks"] == [str(copy)]
    assert (await c.show("d1"))["guest"]["disks"] == [str(disk)]        # the original keeps its own disk
    copy.write_bytes(b"changed")
    assert disk.read_bytes().startswith(b"disk data")
    with pytest.raises(StateError, match=r"disk .*root.img is a raw image, which cannot keep a snapshot .*"
                                         r"qemu-img convert -f raw -O qcow2"):
        await c.snapshot_save("d1")
    (tmp_path / "root-d2b.img").write_bytes(b"someone's file")
    with pytest.raises(ConfigError, match="root-d2b.img already exists"):     # never over an existing file
        await c.clone("d1", "d2b")
    assert "d2b" not in [vm["name"] for vm in await c.list()]
    assert (tmp_path / "root-d2b.img").read_bytes() == b"someone's file"
