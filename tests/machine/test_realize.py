"""realize(): the seed's machvirt_init / kvm_arm_enable_mte decision tree, with QEMU's exact messages."""
import errno

import pytest

from backend.errors import RealizeError
from backend.machine import (KVM_CAP_ARM_MTE, MTE_MIGRATION_BLOCKER, MigrationState, RealKvmDevice,
                             SimulatedArm64Kvm, VirtMachineConfig, dry_run, realize)
from backend.machine.kvm import SimulatedKvmVm


def cfg(**kw):
    kw.setdefault("name", "vm")
    return VirtMachineConfig(**kw)


class RecordingKernel(SimulatedArm64Kvm):
    """The simulated kernel, remembering the VMs it handed out so tests can see what was released."""

    def __init__(self, host_mte):
        super().__init__(host_mte)
        self.vms: list[SimulatedKvmVm] = []

    def create_vm(self):
        vm = super().create_vm()
        self.vms.append(vm)
        return vm


def assert_refused_cleanly(kernel, config, message, **kw) -> MigrationState:
    """realize() fails with exactly ``message`` and leaves no open VM and no blocker behind."""
    state = MigrationState()
    with pytest.raises(RealizeError) as e:
        realize(config, kernel, state, **kw)
    assert str(e.value) == message
    assert all(vm.closed and not vm.vcpus and not vm.memslots for vm in kernel.vms)
    assert state.blockers == [] and state.query_migrate() == {}
    return state


# --- TCG -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu", ["max", "cortex-a710", "neoverse-n2"])
def test_tcg_mte_creates_tag_memory_once_and_links_every_vcpu(cpu):
    m = realize(cfg(cpu=cpu, vcpus=4), None, MigrationState())
    assert m.tag_memory and not m.secure_tag_memory
    assert m.ram.tags is not None
    assert [v.tag_memory_linked for v in m.vcpus] == [True] * 4
    assert not any(v.kvm_mte or v.secure_tag_memory_linked for v in m.vcpus)
    assert m.kvm_vm is None and m.blockers == []


def test_tcg_secure_adds_secure_tag_memory_on_every_vcpu():
    m = realize(cfg(secure=True, vcpus=3), None, MigrationState())
    assert m.tag_memory and m.secure_tag_memory
    assert all(v.tag_memory_linked and v.secure_tag_memory_linked for v in m.vcpus)


@pytest.mark.parametrize("cpu", ["cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1", "neoverse-v1", "a64fx"])
def test_tcg_cpu_without_mte(cpu):
    with pytest.raises(RealizeError) as e:
        realize(cfg(cpu=cpu), None, MigrationState())
    assert str(e.value) == "MTE requested, but not supported by the guest CPU"


def test_tcg_without_mte_has_no_tag_memory():
    m = realize(cfg(cpu="cortex-a57", mte=False), None, MigrationState())
    assert not m.tag_memory and m.ram.tags is None and not any(v.tag_memory_linked for v in m.vcpus)


def test_tcg_mte_never_blocks_migration_even_only_migratable():
    state = MigrationState()
    realize(cfg(only_migratable=True), None, state)
    assert state.query_migrate() == {} and state.only_migratable


# --- KVM -------------------------------------------------------------------------------------------

def test_kvm_mte_enables_cap_once_adds_blocker_and_sets_kvm_mte_on_every_vcpu():
    kernel = RecordingKernel(host_mte=True)
    state = MigrationState()
    m = realize(cfg(accel="kvm", vcpus=4), kernel, state)
    assert [v.kvm_mte for v in m.vcpus] == [True] * 4
    assert not m.tag_memory and not any(v.tag_memory_linked for v in m.vcpus)
    assert m.kvm_vm.mte_enabled and m.kvm_vm.vcpus == {0, 1, 2, 3}
    assert state.blockers == [MTE_MIGRATION_BLOCKER] == ["Live migration disabled due to MTE enabled"]
    assert state.query_migrate() == {"blocked-reasons": ["Live migration disabled due to MTE enabled"]}
    assert m.blockers == [MTE_MIGRATION_BLOCKER]
    assert m.ram.tags is not None            # the memslot was registered with MTE on: tags "in hardware"
    assert m.kvm_vm.ram is m.ram


def test_two_kvm_mte_vms_in_one_process_both_get_kvm_mte():
    """Departure 1 from QEMU: the enable-once state is per VM, not a process-wide static."""
    kernel = SimulatedArm64Kvm(host_mte=True)
    a, b = MigrationState(), MigrationState()
    vm_a = realize(cfg(name="a", accel="kvm"), kernel, a)
    vm_b = realize(cfg(name="b", accel="kvm"), kernel, b)
    assert all(v.kvm_mte for v in vm_a.vcpus + vm_b.vcpus)
    assert vm_a.kvm_vm is not vm_b.kvm_vm and vm_a.kvm_vm.mte_enabled and vm_b.kvm_vm.mte_enabled
    assert a.blockers == b.blockers == [MTE_MIGRATION_BLOCKER]


def test_kvm_without_cap():
    kernel = RecordingKernel(host_mte=False)
    assert_refused_cleanly(kernel, cfg(accel="kvm"), "MTE requested, but not supported by KVM")
    assert len(kernel.vms) == 1


def test_kvm_without_mte_realizes_without_blocker():
    state = MigrationState()
    m = realize(cfg(accel="kvm", mte=False), SimulatedArm64Kvm(host_mte=True), state)
    assert not any(v.kvm_mte for v in m.vcpus) and not m.kvm_vm.mte_enabled
    assert state.query_migrate() == {} and m.ram.tags is None


class EnableFailsKernel(RecordingKernel):
    """A kernel whose KVM_ENABLE_CAP fails as a real one does when a vCPU was created too early."""

    def create_vm(self):
        vm = super().create_vm()
        vm.create_vcpu(7)        # e.g. a scratch vCPU: now the cap must be refused with EINVAL
        return vm


def test_enable_cap_failure_message_uses_strerror_and_undoes():
    kernel = EnableFailsKernel(host_mte=True)
    assert_refused_cleanly(kernel, cfg(accel="kvm"), "Failed to enable KVM_CAP_ARM_MTE: Invalid argument")


def test_vcpus_are_created_after_the_cap_is_enabled():
    order = []

    class Watching(SimulatedKvmVm):
        def enable_cap(self, cap, arg=0):
            order.append(("cap", cap))
            super().enable_cap(cap, arg)

        def create_vcpu(self, index):
            order.append(("vcpu", index))
            super().create_vcpu(index)

        def set_user_memory_region(self, slot, gpa, size, backing):
            order.append(("memslot", slot))
            super().set_user_memory_region(slot, gpa, size, backing)

    class Kernel(SimulatedArm64Kvm):
        def create_vm(self):
            return Watching(self)

    realize(cfg(accel="kvm", vcpus=3), Kernel(True), MigrationState())
    assert order == [("cap", KVM_CAP_ARM_MTE), ("vcpu", 0), ("vcpu", 1), ("vcpu", 2), ("memslot", 0)]


def test_only_migratable_refuses_the_blocker_and_leaves_nothing_half_made():
    kernel = RecordingKernel(host_mte=True)
    state = assert_refused_cleanly(kernel, cfg(accel="kvm", only_migratable=True),
                                   "disallowing migration blocker (--only-migratable) for: "
                                   "Live migration disabled due to MTE enabled")
    assert len(kernel.vms) == 1
    assert state.only_migratable is False        # the caller's state is as it was


def test_blocker_refused_while_a_migration_runs():
    state = MigrationState()
    state.status = "active"
    with pytest.raises(RealizeError) as e:
        realize(cfg(accel="kvm"), SimulatedArm64Kvm(True), state)
    assert str(e.value) == ("disallowing migration blocker (migration/snapshot in progress) for: "
                            "Live migration disabled due to MTE enabled")


def test_kvm_memslot_rules_apply_at_realize():
    kernel = RecordingKernel(host_mte=True)
    assert_refused_cleanly(kernel, cfg(accel="kvm"), "kvm_set_phys_mem: error registering slot: Invalid argument",
                           ram_backing="file")
    for backing in ("memfd", "tmpfs"):
        realize(cfg(accel="kvm"), kernel, MigrationState(), ram_backing=backing).close()
    realize(cfg(accel="kvm", mte=False), kernel, MigrationState(), ram_backing="file").close()


def test_close_releases_vm_and_blocker():
    kernel = RecordingKernel(host_mte=True)
    state = MigrationState()
    m = realize(cfg(accel="kvm"), kernel, state)
    m.close()
    assert kernel.vms[0].closed and state.blockers == [] and m.kvm_vm is None


def test_kvm_unavailable_messages():
    with pytest.raises(RealizeError, match=r"^-accel kvm: Could not access KVM kernel module: No such file or directory$"):
        realize(cfg(accel="kvm"), None, MigrationState())


def test_real_kvm_device_through_realize():
    """On this x86_64 machine the real /dev/kvm gives QEMU's 'invalid accelerator' text."""
    dev = RealKvmDevice()
    try:
        if dev.present and dev.arch == "aarch64":      # a real arm64 host: the cap decides
            try:
                realize(cfg(accel="kvm", vcpus=1, memory=32 << 20), dev, MigrationState()).close()
            except RealizeError as e:
                assert str(e) == "MTE requested, but not supported by KVM"
            return
        with pytest.raises(RealizeError) as e:
            realize(cfg(accel="kvm"), dev, MigrationState())
        assert str(e.value) == ("-accel kvm: invalid accelerator kvm" if dev.present else
                                "-accel kvm: Could not access KVM kernel module: No such file or directory")
    finally:
        dev.close()


class CreateVmFails(SimulatedArm64Kvm):
    def create_vm(self):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")


def test_create_vm_failure():
    with pytest.raises(RealizeError, match=r"^ioctl\(KVM_CREATE_VM\) failed: 12 Cannot allocate memory$"):
        realize(cfg(accel="kvm"), CreateVmFails(True), MigrationState())


# --- other accelerators ------------------------------------------------------------------------

@pytest.mark.parametrize("accel", ["xen", "qtest", "whpx"])
def test_other_accelerator_keeps_qemus_trailing_space(accel):
    with pytest.raises(RealizeError) as e:
        realize(cfg(accel=accel), None, MigrationState())
    assert str(e.value) == "MTE requested, but not supported "


def test_hvf_gets_the_early_machvirt_check():
    with pytest.raises(RealizeError) as e:
        realize(cfg(accel="hvf"), None, MigrationState())
    assert str(e.value) == "mach-virt: HVF does not support providing MTE to the guest CPU"


@pytest.mark.parametrize("accel,mte", [("kvm", True), ("kvm", False), ("hvf", True)])
def test_secure_needs_tcg(accel, mte):
    kernel = RecordingKernel(host_mte=True)
    assert_refused_cleanly(kernel, cfg(accel=accel, secure=True, mte=mte),
                           f"mach-virt: {accel.upper()} does not support providing Security extensions "
                           f"(TrustZone) to the guest CPU")


def test_other_accelerator_without_mte_realizes():
    m = realize(cfg(accel="xen", mte=False), None, MigrationState())
    assert len(m.vcpus) == 2 and not m.tag_memory


def test_dry_run_raises_the_same_and_leaves_nothing():
    kernel = RecordingKernel(host_mte=False)
    with pytest.raises(RealizeError, match="^MTE requested, but not supported by KVM$"):
        dry_run(cfg(accel="kvm"), kernel)
    ok = RecordingKernel(host_mte=True)
    dry_run(cfg(accel="kvm"), ok)
    assert ok.vms[0].closed


def test_invalid_config_is_a_config_error():
    from backend.errors import ConfigError
    with pytest.raises(ConfigError):
        realize(cfg(vcpus=0), None, MigrationState())
