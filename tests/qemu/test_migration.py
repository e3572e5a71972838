"""Live migration of real QEMU VMs between two QEMU processes on this machine (TCG).

What a user relies on: the guest keeps counting on the destination and its tags survive (the
guest's own boot-time tag check stays OK), progress is reported, a real QEMU blocker refuses the
migration with QEMU's text and leaves the VM running, and ``only_migratable`` refuses such a VM
at start with QEMU's text.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from backend.errors import MigrationError, RealizeError
from backend.hosts.base import VmSpec
from backend.hosts.local import LocalHost
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig
from backend.qemu.driver import kill_strays

pytestmark = pytest.mark.qemu
MIB = 1 << 20
IVSHMEM_BLOCKER = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"


@pytest.fixture
async def hosts(tmp_path):
    """Two LocalHost objects (as two hosts a user migrates between); no QEMU may outlive the test."""
    yield LocalHost(str(tmp_path / "a")), LocalHost(str(tmp_path / "b"))
    assert await kill_strays(str(tmp_path)) == [], "the test left QEMU processes running"


@pytest.fixture
def shm_args():
    """An ivshmem-plain device on shared memory (memfd: no host file, so no --allow-host-files):
    a real QEMU migration blocker."""
    return ["-object", "memory-backend-memfd,id=shm,size=1M,share=on", "-device", "ivshmem-plain,memdev=shm"]


def spec_for(tmp_path, *, only_migratable=False) -> VmSpec:
    config = VirtMachineConfig(name="mig", vcpus=2, memory=128 * MIB, only_migratable=only_migratable)
    return VmSpec(config, WorkloadConfig(rate=0), str(tmp_path / "a" / "mig"))


async def running_guest(vm, min_checks=1):
    """Sample until every vCPU has verified its boot tags and counted some accesses."""
    for _ in range(200):
        vcpus = await vm.sample()
        if all(c["boot_tags"] is True and c["checked"] >= min_checks for c in vcpus):
            return vcpus
        await asyncio.sleep(0.1)
    raise AssertionError(f"the guest never got going: {vcpus}")


async def test_a_running_vm_migrates_with_its_counters_and_tags(hosts, tmp_path):
    src_host, dst_host = hosts
    spec = spec_for(tmp_path)
    vm = await src_host.start(spec)
    before = await running_guest(vm)
    src_argv = list(vm.proc.argv)
    reports = []

    async def progress(fraction, stats):
        reports.append((fraction, stats["status"]))

    dst = await vm.migrate_to(dst_host, spec, with_tags=True, progress=progress)
    assert vm.state == "stopped" and not os.path.exists(f"/proc/{vm.proc.pid}")
    assert dst.state == "running" and dst.host is dst_host
    assert reports[-1] == (1.0, "completed")
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)
    i = dst.proc.argv.index("-incoming")
    assert dst.proc.argv[i + 1].startswith("tcp:127.0.0.1:")
    # per-QEMU file names (QMP, parameter block, console socket) differ; the source starts paused (-S)
    # until its console is read, the destination waits for the incoming state instead
    strip = lambda argv: [a for a in argv if a != "-S" and not any(k in a for k in ("qmp-", "params-", "serial-"))]
    assert strip(dst.proc.argv[:i]) == strip(src_argv)    # the same machine, plus -incoming

    # The guest goes on counting from where it was, and re-verifies its boot-time tags (LDG of
    # every granule it tagged at boot) on the destination: they came over with the migration.
    after = await running_guest(dst)
    for _ in range(200):
        if all(a["boot_tag_checks"] > b["boot_tag_checks"] and a["checked"] > b["checked"]
               for a, b in zip(after, before)):     # `checked` is published once per batch
            break
        await asyncio.sleep(0.1)
        after = await dst.sample()
    for b, a in zip(before, after):
        assert a["boot_tag_checks"] > b["boot_tag_checks"]
        assert a["checked"] > b["checked"]
        assert a["boot_tags"] is True
    await dst.stop()


async def test_a_qemu_blocker_refuses_migration_verbatim_and_the_vm_runs_on(hosts, tmp_path, shm_args):
    src_host, dst_host = hosts
    spec = spec_for(tmp_path)
    vm = await src_host.start(spec, extra_args=shm_args)
    assert await vm.blocked_reasons() == [IVSHMEM_BLOCKER]
    before = await running_guest(vm)
    with pytest.raises(MigrationError) as err:
        await vm.migrate_to(dst_host, spec, with_tags=True, progress=lambda f, s: None)
    assert str(err.value) == IVSHMEM_BLOCKER
    assert vm.state == "running"
    assert dst_host.vms == set()                     # no destination QEMU was left
    after = await running_guest(vm, before[0]["checked"] + 1)
    assert after[0]["checked"] > before[0]["checked"]
    await vm.stop()


async def test_only_migratable_refuses_a_vm_with_a_blocker_in_qemus_words(hosts, tmp_path, shm_args):
    src_host, _ = hosts
    with pytest.raises(RealizeError) as err:
        await src_host.start(spec_for(tmp_path, only_migratable=True), extra_args=shm_args)
    assert str(err.value).endswith(
        "disallowing migration blocker (--only-migratable) for: " + IVSHMEM_BLOCKER)
    assert src_host.vms == set()


async def test_a_cancelled_migration_leaves_the_source_running(hosts, tmp_path):
    src_host, dst_host = hosts
    spec = spec_for(tmp_path)
    vm = await src_host.start(spec)
    before = await running_guest(vm)
    # Slow the transfer down so the migration is surely still running when it is cancelled.
    await vm.proc.qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 * 1024})
    active = asyncio.Event()

    def progress(fraction, stats):
        if stats["status"] == "active":
            active.set()

    task = asyncio.create_task(vm.migrate_to(dst_host, spec, with_tags=True, progress=progress))
    await asyncio.wait_for(active.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dst_host.vms == set()                     # the destination QEMU was stopped
    assert (await vm.proc.qmp.execute("query-status"))["status"] == "running"
    after = await running_guest(vm, before[0]["checked"] + 1)
    assert after[0]["checked"] > before[0]["checked"]
    await vm.stop()
