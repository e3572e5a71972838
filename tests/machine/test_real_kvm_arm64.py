"""The real KVM MTE path, on the hardware it needs: an arm64 host whose /dev/kvm has KVM_CAP_ARM_MTE.

These are the only tests in the suite allowed to skip (see the skip policy in tests/conftest.py):
on any other host they say what they would need. Everything else about KVM MTE is covered on the
simulated arm64 kernel (tests/machine/test_kvm.py, test_realize.py), which follows the same rules.
"""
from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

from backend.hosts.base import VmSpec
from backend.hosts.workload import WorkloadConfig
from backend.machine import (KVM_CAP_ARM_MTE, MigrationState, RealKvmDevice, VirtMachineConfig,
                             realize)
from backend.machine.kvm import host_arch

PAGE = 4096


def _host_has_kvm_mte() -> bool:
    if host_arch() != "aarch64":
        return False
    kvm = RealKvmDevice()
    try:
        return kvm.present and kvm.check_extension(KVM_CAP_ARM_MTE) > 0
    finally:
        kvm.close()


pytestmark = [
    pytest.mark.needs_arm64_kvm_mte,
    pytest.mark.skipif(not _host_has_kvm_mte(),
                       reason="needs an arm64 host whose /dev/kvm reports KVM_CAP_ARM_MTE (205) > 0 "
                              f"(this host: {host_arch()}, /dev/kvm "
                              f"{'present' if os.path.exists('/dev/kvm') else 'absent'})"),
]


def _config(**kw) -> VirtMachineConfig:
    base = dict(name="kvm-mte", vcpus=2, memory=64 << 20, cpu="host", accel="kvm", mte=True)
    base.update(kw)
    return VirtMachineConfig(**base)


def test_realize_on_real_kvm_enables_mte_once_and_marks_every_vcpu():
    kvm = RealKvmDevice()
    migration = MigrationState()
    machine = realize(_config(vcpus=4), kvm, migration)
    try:
        assert [v.kvm_mte for v in machine.vcpus] == [True] * 4
        assert machine.kvm_vm.mte_enabled
        assert migration.query_migrate()["blocked-reasons"] == ["Live migration disabled due to MTE enabled"]
    finally:
        machine.close()
        kvm.close()


def test_real_kernel_refuses_the_cap_once_a_vcpu_exists():
    kvm = RealKvmDevice()
    vm = kvm.create_vm()
    try:
        vm.create_vcpu(0)
        with pytest.raises(OSError) as exc:
            vm.enable_cap(KVM_CAP_ARM_MTE)
        assert exc.value.errno == errno.EINVAL
    finally:
        vm.close()
        kvm.close()


def test_copy_tags_round_trip_through_the_real_kernel():
    kvm = RealKvmDevice()
    vm = kvm.create_vm()
    try:
        vm.enable_cap(KVM_CAP_ARM_MTE)
        vm.create_vcpu(0)
        vm.set_user_memory_region(0, 0x40000000, 1 << 20, "anonymous")
        tags = np.random.default_rng(7).integers(0, 16, size=4 * PAGE // 16, dtype=np.uint8)
        assert vm.mte_copy_tags(0x40000000, 4 * PAGE, tags, to_guest=True) == tags.size
        back = np.zeros_like(tags)
        assert vm.mte_copy_tags(0x40000000, 4 * PAGE, back, to_guest=False) == tags.size
        assert np.array_equal(back, tags)
    finally:
        vm.close()
        kvm.close()


@pytest.mark.qemu
async def test_real_qemu_under_kvm_reports_kvm_mte_and_the_seed_blocker(tmp_path):
    from backend.hosts.local import LocalHost
    assert shutil.which("qemu-system-aarch64"), "QEMU >= 9.2 is needed for -accel kvm with mte=on"
    host = LocalHost(runtime_dir=str(tmp_path))
    vm = await host.start(VmSpec(config=_config(), workload=WorkloadConfig(seed=3)))
    try:
        await vm.sample()
        assert [v["kvm_mte"] for v in vm.vcpus()] == [True, True]
        assert await vm.blocked_reasons() == ["Live migration disabled due to MTE enabled"]
    finally:
        await vm.stop()


@pytest.mark.qemu
async def test_a_snapshot_of_a_kvm_mte_vm_is_refused_with_qemus_text(tmp_path):
    """KVM MTE without tag migration: QEMU (9.2+) blocks migration, so a snapshot (its state written
    by migration) is refused with QEMU's own blocker text, as QEMU's savevm refuses it."""
    from backend.client import connect
    from backend.errors import MigrationError
    c = await connect(in_process=True, runtime_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))
    try:
        await c.create({"name": "k", "host": "local", "accel": "kvm", "cpu": "host", "vcpus": 1, "memory": "128M"})
        await c.start("k")
        with pytest.raises(MigrationError, match="^Live migration disabled due to MTE enabled$"):
            await c.snapshot_save("k")
        assert await c.snapshot_list("k") == []
        await c.stop("k")
    finally:
        await c.close()
