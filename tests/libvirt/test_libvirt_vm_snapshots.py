"""Snapshots, lifecycle events and shutdown of a VM on a real libvirt host, through libvirt's own
calls (issue 12 on the libvirt host kind): libvirt domain snapshots with an external memory file
(the MTE tags travel in QEMU's mach-virt.tag RAM block), listed from libvirt so virsh's own show up;
``virsh suspend`` / ``resume`` / ``destroy`` seen through the event stream; shutdown's fallback said.
One boot of the VM for the whole story (plus one for the blocked VM)."""
from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from backend.client import connect
from backend.errors import ConfigError, MtevmError, NotFoundError, StateError
from tests.helpers.polling import resume_and_check_boot_tags, until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

VM = "lvs"
IVSHMEM_REFUSAL = ("Requested operation is not valid: cannot migrate domain: Migration is disabled when "
                   "using feature 'peer mode' in device 'ivshmem'")


def virsh(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


async def test_snapshots_events_and_shutdown_through_libvirt(libvirt_env, mtevm_paths):
    uri, daemon = libvirt_env.uri_a, libvirt_env.a
    c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    seen: list[dict] = []            # the VM's summaries, as `mtevm events` delivers them
    done = asyncio.Event()

    async def listen():
        stream = c.events(rate_hz=1, vcpus="none")     # heartbeats every second: `done` is seen
        try:
            async for e in stream:
                if done.is_set():
                    return
                if e["type"] == "vm" and (e.get("vm") or {}).get("name") == VM:
                    seen.append(e["vm"])
        finally:
            await stream.aclose()
    listener = asyncio.create_task(listen())

    async def event(state: str, since: int):
        return next((v for v in seen[since:] if v["state"] == state), None)

    async def counters():
        return (await c.counters(VM))["vm"]

    async def counting(above: int = 0):
        n = await counters()
        return n if n["checked"] > above else None

    try:
        await c.host_add("hosta", uri)
        await c.create({"name": VM, "host": "hosta", "vcpus": 1, "memory": "128M", "workload": {"rate": 0}})
        await c.start(VM)
        await until("the guest to count", counting, timeout=60)

        # Started paused (VIR_DOMAIN_START_PAUSED) and resumed once mtevm reads the console: the log
        # has the guest's first line right after mtevm's start mark, as a local VM's (QEMU -S), and
        # the paused start was never shown as `paused` (the lifecycle events of the start are no pause)
        first = "mtevm-guest: cpu 0 up"

        async def after_the_mark():
            """The log's first line after the start mark, once it is no longer being written (the
            log's last line may be a line in progress: 'mt')."""
            log = (await c.console_log(VM, 50))["lines"]
            mark = max(i for i, line in enumerate(log) if line.startswith(f"-- mtevm: domain {VM} started"))
            after = log[mark + 1:mark + 2]
            return (log, after) if after and (after[0] == first or not first.startswith(after[0])) else None
        log, after = await until("the console's first line after the start mark", after_the_mark, timeout=30)
        assert after == [first], log
        states = [v["state"] for v in seen]
        assert "paused" not in states and states[-1] == "running", states

        # -- paused / resumed behind mtevm's back: libvirt's lifecycle events, no polling by mtevm --
        mark = len(seen)
        assert virsh(uri, "suspend", VM).returncode == 0
        await until("virsh suspend to show as paused in the event stream", lambda: event("paused", mark), timeout=10)
        assert (await c.show(VM))["state"] == "paused"
        assert [v["state"] for v in await c.list() if v["name"] == VM] == ["paused"]
        mark = len(seen)
        assert virsh(uri, "resume", VM).returncode == 0
        await until("virsh resume to show as running", lambda: event("running", mark), timeout=10)

        # -- save: paused (exact counters) and running; virsh sees mtevm's snapshots ---------------
        await c.pause(VM)
        paused = await c.snapshot_save(VM, "paused1")
        assert paused["vm_state"] == "paused" and paused["bytes"] > 0 and paused["taken_by"] == "mtevm"
        assert paused["tags"] == "saved with RAM (mach-virt.tag block)"
        assert paused["counters"] == await counters()
        await c.resume(VM)
        running = await c.snapshot_save(VM, "running1")
        assert running["vm_state"] == "running" and (await c.show(VM))["state"] == "running"
        assert running["counters"]["checked"] > paused["counters"]["checked"]
        assert virsh(uri, "snapshot-list", VM, "--name").stdout.split() == ["paused1", "running1"]
        assert daemon.path(f"/var/lib/libvirt/mtevm/{VM}@paused1.mem").stat().st_size == paused["bytes"]

        # A snapshot made with virsh is listed too (no mtevm counters in it); a virsh snapshot
        # without an external memory file is libvirt's own refusal (the domain has no disks).
        memfile = "/var/lib/libvirt/mtevm/by-virsh.mem"
        r = virsh(uri, "snapshot-create-as", VM, "virsh1", "--memspec", f"file={memfile},snapshot=external")
        assert r.returncode == 0, r.stderr
        assert "internal and full system snapshots require all disks" in virsh(uri, "snapshot-create-as", VM, "x").stderr
        listed = await c.snapshot_list(VM)
        assert [s["tag"] for s in listed] == ["paused1", "running1", "virsh1"]
        assert listed[2]["counters"] is None and listed[2]["taken_by"] == "libvirt"
        assert listed[2]["memory_file"] == memfile and listed[2]["config"]["vcpus"] == 1

        # -- restore: the paused snapshot comes back paused with exactly its counters -------------
        vm = await c.snapshot_restore(VM, "paused1")
        assert vm["state"] == "paused" and vm["snapshot"]["tag"] == "paused1"
        assert await counters() == paused["counters"]
        assert virsh(uri, "domstate", VM).stdout.strip() == "paused"
        assert (await c.monitor(VM, "query-status"))["return"]["status"] == "paused"
        # ... and its guest, resumed, still finds every tag it stored at boot (LDG of each granule).
        v = await resume_and_check_boot_tags(c, VM, timeout=60)
        assert v["boot_tags"] is True

        # The running snapshot comes back running, from its counters, not the later ones.
        ahead = await until("the counters to move on", lambda: counting(running["counters"]["checked"] + 200_000),
                            timeout=60)
        vm = await c.snapshot_restore(VM, "running1")
        assert vm["state"] == "running" and virsh(uri, "domstate", VM).stdout.strip() == "running"
        now = await counters()
        assert running["counters"]["checked"] <= now["checked"] < ahead["checked"]
        assert (await c.show(VM))["state"] == "running"        # the revert's stop event is no crash

        # -- a restore across a changed definition is refused with the reason ---------------------
        vm = await c.edit(VM, {"vcpus": 2, "memory": "192M"})
        with pytest.raises(StateError) as err:
            await c.snapshot_restore(VM, "running1")
        assert "was taken with vcpus=1, memory=128M" in str(err.value)
        assert "will now boot vcpus=2, memory=192M" in str(err.value)
        assert (await c.show(VM))["state"] == "running"
        assert (await c.edit(VM, {"vcpus": 1, "memory": "128M"}))["pending"] == {}

        # -- delete: libvirt drops the snapshot and its memory file --------------------------------
        deleted = await c.snapshot_delete(VM, "paused1")
        assert deleted["tag"] == "paused1"
        assert [s["tag"] for s in await c.snapshot_list(VM)] == ["running1", "virsh1"]
        assert virsh(uri, "snapshot-list", VM, "--name").stdout.split() == ["running1", "virsh1"]
        assert not daemon.path(f"/var/lib/libvirt/mtevm/{VM}@paused1.mem").exists()
        with pytest.raises(NotFoundError, match="no snapshot 'paused1'"):
            await c.snapshot_restore(VM, "paused1")
        with pytest.raises(ConfigError, match="already has a snapshot 'running1'"):
            await c.snapshot_save(VM, "running1")

        # -- destroyed behind mtevm's back while paused (the sampler never looks at a paused VM) --
        mark = len(seen)
        assert virsh(uri, "suspend", VM).returncode == 0
        await until("paused", lambda: event("paused", mark), timeout=10)
        mark = len(seen)
        assert virsh(uri, "destroy", VM).returncode == 0
        crashed = await until("virsh destroy to show as crashed", lambda: event("crashed", mark), timeout=10)
        assert "destroyed outside mtevm" in crashed["last_error"]

        # A stopped VM is restored too (libvirt reverts a shut-off domain), then shut down: the
        # built-in guest has no agent, so it is destroyed, and the answer says so.
        vm = await c.snapshot_restore(VM, "running1")
        assert vm["state"] == "running"
        vm = await c.shutdown(VM)
        assert vm["state"] == "stopped" and vm["outcome"]["how"] == "stop"
        assert vm["outcome"]["message"] == (f"VM {VM}: the guest has no agent to power it off (the built-in mtevm "
                                            "guest): stopped it instead (virDomainDestroy)")
        assert virsh(uri, "domstate", VM).stdout.strip() == "shut off"

        # -- a snapshot libvirt refuses: its own text, verbatim (a QEMU migration blocker) ---------
        await c.create({"name": "lvb", "host": "hosta", "vcpus": 1, "memory": "128M",
                        "qemu_args": ["-object", "memory-backend-memfd,id=shm,size=1M,share=on",
                                      "-device", "ivshmem-plain,memdev=shm"]})
        await c.start("lvb")
        with pytest.raises(MtevmError) as err:
            await c.snapshot_save("lvb", "s")
        assert str(err.value) == IVSHMEM_REFUSAL
        assert (await c.show("lvb"))["state"] == "running" and await c.snapshot_list("lvb") == []
        await c.stop("lvb")

        # -- delete the VM: its domain goes although it has snapshots, with their memory files ----
        await c.delete(VM)
        assert virsh(uri, "list", "--all", "--name").stdout.split() == ["lvb"]
        assert not [f for f in os.listdir(daemon.path("/var/lib/libvirt/mtevm")) if f.startswith(VM)]
    finally:
        done.set()
        await asyncio.wait_for(listener, 30)
        for vm in await c.list():
            if vm["state"] in ("running", "paused") and vm["host"] == "hosta":
                await c.stop(vm["name"])
        await c.close()


def test_a_libvirt_too_old_to_revert_external_snapshots_refuses_to_take_them():
    """libvirt reverts external snapshots from 9.7 on (Debian 12's own libvirt is 9.0): a host with
    an older libvirtd would take a snapshot it can never restore, so mtevm refuses it, saying why."""
    from backend.hosts.libvirt import LibvirtHost
    host = LibvirtHost("old", "qemu:///system")
    assert host.snapshot_refusal() is None                  # not connected yet: libvirt will say
    host.facts = {"libvirt_version": "9.0.0"}
    assert host.snapshot_refusal() == ("libvirt 9.0.0 on host old cannot revert external snapshots (libvirt >= 9.7 "
                                       "can), and a VM without disks can have no other kind: upgrade libvirt "
                                       "there to keep snapshots")
    host.facts = {"libvirt_version": "9.7.0"}
    assert host.snapshot_refusal() is None
