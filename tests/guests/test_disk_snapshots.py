"""Snapshots of a real Linux MTE guest with qcow2 disks (issue 12): each disk keeps an internal
snapshot taken at the same instant as the state file, a restore reverts the disks with the state, a
disk changed behind mtevm's back refuses the restore with nothing half-done, delete (and deleting
the VM) removes the disks' snapshots, a clone's copies drop them, a raw disk is refused with the
way out. Real QEMU, real qcow2 images made by qemu-img; the disks are written and read by the
guest itself (busybox dd with O_DIRECT on /dev/vda, through ``mtevm exec``) while it runs, and with
qemu-io on the files while it is stopped. One 1-vCPU VM; every QEMU is checked gone by PID at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from backend.client import connect
from backend.errors import StateError
from backend.hosts.disk_snapshots import summary as disks_summary
from backend.qemu.driver import kill_strays, qemus_mentioning
from tests.helpers.polling import until

pytestmark = pytest.mark.qemu
MB = 1 << 20


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(path: str, command: str) -> str:
    """qemu-io on a disk no QEMU has open (the VM is stopped)."""
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def disk_snapshots(path: str) -> list[str]:
    """The internal snapshots' names, as qemu-img lists them (-U: the VM may have it open)."""
    info = json.loads(qemu_img("info", "-U", "-f", "qcow2", "--output=json", path))
    return [s["name"] for s in info.get("snapshots", [])]


def faults(vcpus: list[dict]) -> int:
    return sum(v["sync_faults"] + v["async_faults"] for v in vcpus)


async def test_qcow2_disks_are_snapshotted_with_the_state_and_come_back_with_it(linux_image, mtevm_paths, tmp_path):
    a, b, raw = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2"), str(tmp_path / "r.raw")
    for disk in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    qemu_io(a, "write -P 0x41 0 64k")       # 'A's
    qemu_io(b, "write -P 0x42 0 64k")       # 'B's
    qemu_img("create", "-q", "-f", "raw", raw, "16M")
    c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    try:
        # The workload's heap: tagged objects, every access with the right tag, tcf sync. Were the
        # tags not restored, every access would fault: faults stay 0 only if the tags come back.
        await c.create({"name": "dk", "host": "local", "memory": "256M", "vcpus": 1, "guest": {
            "kind": "linux", "disks": [a, b]}, "workload": {"tcf": "sync", "rate": 2000, "uaf_rate": 0,
                                                             "overflow_rate": 0, "wild_rate": 0}})
        await c.start("dk")

        async def agent_up():
            return ((await c.show("dk")).get("guest_facts") or {}).get("agent") == "connected"

        async def checked(above: int = 0):
            vcpus = await c.vcpus("dk")
            return vcpus if vcpus[0]["checked"] > above else None

        async def sh(script: str) -> bytes:
            out = [m["data"] async for m in c.exec("dk", ["-c", script], path="/bin/sh")
                   if m.get("type") == "exec-output"]
            return b"".join(out)

        async def guest_reads(dev: str) -> bytes:      # the disk itself, not the guest's page cache
            return await sh(f"dd if=/dev/{dev} bs=512 count=1 iflag=direct 2>/dev/null | head -c 16")

        async def mte_faults(sync: int) -> dict:
            data = open(linux_image.program("mte-faults"), "rb").read()
            [end] = [m async for m in c.exec("dk", [str(sync), "0"], program="mte-faults", data=data)
                     if m.get("type") == "exec-exit"]
            return end

        await until("the guest agent", agent_up, timeout=180)
        await until("the workload to count", checked, timeout=60)

        # -- save: each disk gets an internal snapshot named after the tag, at the state's instant
        snap = await c.snapshot_save("dk", "s1")
        assert [(d["path"], d["format"], d["snapshot"]["name"]) for d in snap["disks"]] == [
            (a, "qcow2", "s1"), (b, "qcow2", "s1")]
        assert disk_snapshots(a) == disk_snapshots(b) == ["s1"]
        assert (await c.show("dk"))["state"] == "running"
        at_save = snap["counters"]
        assert at_save["sync_faults"] == 0 and at_save["checked"] > 0

        # -- after the snapshot: the disk is written, the guest takes 3 faults of its own
        # virtio-mmio devices are found in reverse order: the guest tells which of vda/vdb is disk a
        seen = {dev: await guest_reads(dev) for dev in ("vda", "vdb")}
        assert sorted(seen.values()) == [b"A" * 16, b"B" * 16]
        disk_a = next(dev for dev, data in seen.items() if data == b"A" * 16)
        await sh(f"echo after-snapshot | dd of=/dev/{disk_a} bs=512 conv=sync,fsync oflag=direct 2>/dev/null")
        assert await guest_reads(disk_a) == b"after-snapshot\n\0"
        assert (await mte_faults(3))["faults"] == {"sync": 3, "async": 0}
        await until("the 3 faults to be counted", lambda: _at_least(c, 3))

        # -- restore: the disk as it was, the counters as they were, the tags intact
        vm = await c.snapshot_restore("dk", "s1")
        assert vm["state"] == "running" and vm["snapshot"]["tag"] == "s1"
        await until("the guest agent after the restore", agent_up, timeout=60)
        assert await guest_reads(disk_a) == b"A" * 16           # the disk as it was at the snapshot
        vcpus = await until("the workload to go on", lambda: checked(at_save["checked"] + 2000), timeout=60)
        assert faults(vcpus) == 0        # the 3 later faults are gone, and the restored tags still match
        assert (await mte_faults(2))["faults"] == {"sync": 2, "async": 0}     # MTE works after the restore
        [listed] = await c.snapshot_list("dk")
        assert [(d["path"], d["present"]) for d in listed["disks"]] == [(a, True), (b, True)]

        # -- a paused VM: saved paused, its disks usable at once (QEMU hands them back after the save,
        # -- and after loading a paused snapshot): a disk write to an inactive disk aborts QEMU
        await c.snapshot_save("dk", "x1")
        await c.pause("dk")
        paused = await c.snapshot_save("dk", "p1")
        assert paused["vm_state"] == "paused" and (await c.show("dk"))["state"] == "paused"
        await c.snapshot_delete("dk", "x1")     # through the paused QEMU, right after the save
        with pytest.raises(StateError, match="saved while paused and has not run since.*resume it, then save"):
            await c.snapshot_save("dk", "p2")  # QEMU's limit; the disks' part of p2 is taken back
        assert disk_snapshots(a) == disk_snapshots(b) == ["s1", "p1"]
        assert (await c.monitor("dk", "query-status"))["return"]["running"] is False   # alive, still paused
        await c.resume("dk")
        assert (await c.snapshot_restore("dk", "p1"))["state"] == "paused"
        await c.snapshot_delete("dk", "p1")     # through the QEMU that loaded it, still paused
        assert (await c.monitor("dk", "query-status"))["return"]["running"] is False
        assert disk_snapshots(a) == disk_snapshots(b) == ["s1"]
        await c.resume("dk")

        # -- a running VM whose disk snapshot was re-made behind mtevm's back (through the monitor):
        # -- the restore is refused naming the disk, and the VM runs on untouched
        await c.snapshot_save("dk", "s3")
        await sh(f"echo after-s3 | dd of=/dev/{disk_a} bs=512 conv=sync,fsync oflag=direct 2>/dev/null")
        await c.monitor("dk", 'blockdev-snapshot-delete-internal-sync {"device": "disk1", "name": "s3"}')
        await c.monitor("dk", 'blockdev-snapshot-internal-sync {"device": "disk1", "name": "s3"}')
        with pytest.raises(StateError) as refused:
            await c.snapshot_restore("dk", "s3")
        assert f"disk {b} has an internal snapshot 's3' made " in str(refused.value)
        assert "not the one mtevm took" in str(refused.value) and "Nothing was changed" in str(refused.value)
        assert (await c.show("dk"))["state"] == "running"
        assert await guest_reads(disk_a) == b"after-s3\n".ljust(16, b"\0")      # not reverted
        [s3] = [s for s in await c.snapshot_list("dk") if s["tag"] == "s3"]
        assert disks_summary(s3) == "a.qcow2, b.qcow2 (gone)"          # the CLI's and the app's column
        await c.snapshot_delete("dk", "s3")          # mtevm's own goes; the one made outside stays
        assert disk_snapshots(a) == ["s1"] and disk_snapshots(b) == ["s1", "s3"]
        await c.monitor("dk", 'blockdev-snapshot-delete-internal-sync {"device": "disk1", "name": "s3"}')

        # -- a disk changed behind mtevm's back: restore refused, nothing half-restored
        await c.snapshot_save("dk", "s2")
        await c.stop("dk")
        qemu_io(a, "write -P 0x44 0 64k")              # 'D's, written with the VM stopped
        qemu_img("snapshot", "-f", "qcow2", "-d", "s2", b)
        listed = {s["tag"]: s for s in await c.snapshot_list("dk")}
        assert [d["present"] for d in listed["s2"]["disks"]] == [True, False]
        with pytest.raises(StateError) as refused:
            await c.snapshot_restore("dk", "s2")
        assert f"disk {b} no longer has its internal snapshot 's2'" in str(refused.value)
        assert "Nothing was changed" in str(refused.value)
        assert (await c.show("dk"))["state"] == "stopped"
        assert "Pattern verification failed" not in qemu_io(a, "read -P 0x44 0 64k")   # disk a not reverted
        assert disk_snapshots(a) == ["s1", "s2"]

        # -- a restore of a stopped VM reverts its disks too; delete removes the disks' snapshots
        assert (await c.snapshot_restore("dk", "s1"))["state"] == "running"
        await c.stop("dk")
        assert "Pattern verification failed" not in qemu_io(a, "read -P 0x41 0 64k")
        await c.snapshot_delete("dk", "s1")
        assert disk_snapshots(a) == ["s2"] and disk_snapshots(b) == []

        # -- a clone's disk copies drop the original's snapshots (they stay the original's)
        clone = await c.clone("dk", "dk2")
        copies = clone["copied"]
        assert copies == [str(tmp_path / "a-dk2.qcow2"), str(tmp_path / "b-dk2.qcow2")]
        assert clone["dropped_snapshots"] == ["s2"]
        assert [disk_snapshots(p) for p in copies] == [[], []] and disk_snapshots(a) == ["s2"]
        assert await c.snapshot_list("dk2") == []

        # -- a QEMU killed behind mtevm's back, before mtevm noticed: the restore reads the files
        await c.start("dk2")
        await c.snapshot_save("dk2", "k1")
        [pid] = qemus_mentioning(mtevm_paths.vm_runtime_root + "/dk2")
        os.kill(pid, signal.SIGKILL)
        assert (await c.snapshot_restore("dk2", "k1"))["state"] == "running"
        assert [d["present"] for d in (await c.snapshot_list("dk2"))[0]["disks"]] == [True, True]
        await c.stop("dk2")

        # -- a raw disk cannot keep a snapshot: refused, naming the disk and the conversion
        await c.create({"name": "rw", "host": "local", "guest": {"kind": "linux", "disks": [raw]}})
        with pytest.raises(StateError) as refused:
            await c.snapshot_save("rw", "x")
        assert f"disk {raw} is a raw image, which cannot keep a snapshot" in str(refused.value)
        assert f"qemu-img convert -f raw -O qcow2 {raw} {raw}.qcow2" in str(refused.value)

        # -- deleting the VM deletes its snapshots, the disks' part included (the disks stay)
        await c.delete("dk")
        assert disk_snapshots(a) == [] and "Pattern verification failed" not in qemu_io(a, "read -P 0x41 0 64k")
    finally:
        for vm in await c.list():
            if vm["state"] in ("running", "paused"):
                await c.stop(vm["name"])
        await c.close()
        assert await kill_strays(mtevm_paths.runtime_dir) == [], "a QEMU was left running"


async def _at_least(c, n: int):
    return faults(await c.vcpus("dk")) >= n


def test_the_cli_refuses_a_raw_disk_and_asks_before_reverting_disks(run_mtevm, tmp_path):
    """No QEMU needed: a raw disk is refused before the VM's state matters, and a restore that would
    revert a stopped VM's disks asks first, as one over a running VM does."""
    from tests.guests.test_definition import arm64_image
    image, raw, qcow = arm64_image(tmp_path / "Image"), str(tmp_path / "d.raw"), str(tmp_path / "d.qcow2")
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    qemu_img("create", "-q", "-f", "qcow2", qcow, "1M")
    for name, disk in (("r", raw), ("q", qcow)):
        r = run_mtevm("create", name, "--host", "local", "--guest", "custom", "--kernel", image, "--disk", disk)
        assert r.returncode == 0, r.stderr
    r = run_mtevm("snapshot", "r", "save", "s1")
    assert r.returncode != 0 and f"disk {raw} is a raw image, which cannot keep a snapshot" in r.stderr
    assert "qemu-img convert -f raw -O qcow2" in r.stderr
    r = run_mtevm("snapshot", "q", "save", "s1")             # qcow2: only the state says no
    assert r.returncode != 0 and "VM 'q' is stopped, not running or paused" in r.stderr
    r = run_mtevm("snapshot", "q", "restore", "s1")
    assert r.returncode != 0 and "without confirmation: pass --yes" in r.stderr
    assert "DISKS" in run_mtevm("snapshot", "q", "list").stdout
