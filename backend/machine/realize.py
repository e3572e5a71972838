"""realize(): building a virt machine, with the MTE decision tree of QEMU 9.2's machvirt_init.

This is the only place in mtevm where the seed patch's logic ("arm/kvm: add support for MTE",
hw/arm/virt.c machvirt_init + target/arm/kvm.c kvm_arm_enable_mte) exists. Every host driver and
the create form's dry run go through it, so the messages a user sees are QEMU's exact strings:

  TCG    tag memory created once and linked to every vCPU (+ secure tag memory when secure=on), or
         "MTE requested, but not supported by the guest CPU" for a CPU model without MTE
  KVM    "MTE requested, but not supported by KVM" without KVM_CAP_ARM_MTE, else enable the cap once
         per VM ("Failed to enable KVM_CAP_ARM_MTE: <strerror>"), add the migration blocker
         "Live migration disabled due to MTE enabled" and set kvm_mte on every vCPU
  HVF    "mach-virt: HVF does not support providing MTE to the guest CPU" (the early check QEMU 9.2 keeps)
  (and before all that, secure=on under KVM/HVF: "mach-virt: KVM does not support providing Security
  extensions (TrustZone) to the guest CPU")
  other  "MTE requested, but not supported " (QEMU's trailing space kept)

Two departures from QEMU, on purpose:
  1. QEMU keeps tried_to_enable / succeeded_to_enable as function statics: one per process, which is
     one VM in QEMU. mtevm realizes many VMs in one process, so that state lives in each VM's realize
     (``_KvmMteEnableState``): two MTE VMs realized one after the other both get kvm_mte.
  2. QEMU passes &error_abort / calls exit(1), killing the process. Here a failure raises RealizeError
     with QEMU's text and undoes everything realize did (closes the KVM VM, removes the blocker it
     added): that VM fails to start, the manager and its other VMs carry on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from backend.errors import MigrationError, RealizeError
from backend.machine.config import VirtMachineConfig
from backend.machine.cpu_models import cpu_has_tag_memory
from backend.machine.kvm import KVM_CAP_ARM_MTE, KvmDevice, KvmVm
from backend.machine.migration import MigrationState
from backend.tagcheck import GuestRam

RAM_BASE = 0x4000_0000              # VIRT_MEM in hw/arm/virt.c's memory map
RAM_SLOT = 0
MTE_MIGRATION_BLOCKER = "Live migration disabled due to MTE enabled"

MSG_TCG_CPU_NO_MTE = "MTE requested, but not supported by the guest CPU"
MSG_KVM_NO_MTE = "MTE requested, but not supported by KVM"
MSG_OTHER_ACCEL = "MTE requested, but not supported "          # sic: QEMU's trailing space
MSG_ENABLE_FAILED = "Failed to enable KVM_CAP_ARM_MTE"
MSG_HVF = "mach-virt: HVF does not support providing MTE to the guest CPU"
MSG_NO_TRUSTZONE = "mach-virt: {accel} does not support providing Security extensions (TrustZone) to the guest CPU"


@dataclass
class VcpuState:
    index: int
    kvm_mte: bool = False                    # ARMCPU.kvm_mte: "CPU has MTE enabled in KVM mode"
    tag_memory_linked: bool = False          # TCG: the CPU's "tag-memory" link is set
    secure_tag_memory_linked: bool = False   # TCG + secure: "secure-tag-memory" link is set


@dataclass
class RealizedMachine:
    config: VirtMachineConfig
    ram: object                              # GuestRam
    vcpus: list[VcpuState]
    kvm_vm: KvmVm | None
    tag_memory: bool
    secure_tag_memory: bool
    blockers: list[str]                      # the blockers this machine added to its MigrationState
    migration: MigrationState = field(default_factory=MigrationState)

    def close(self) -> None:
        """Power off: release the KVM VM and withdraw this machine's migration blockers."""
        for reason in self.blockers:
            self.migration.remove_blocker(reason)
        self.blockers = []
        if self.kvm_vm is not None:
            self.kvm_vm.close()
            self.kvm_vm = None


@dataclass
class _KvmMteEnableState:
    """kvm_arm_enable_mte's two statics, kept per VM instead of per process (departure 1)."""

    tried_to_enable: bool = False
    succeeded_to_enable: bool = False


def _kvm_arm_enable_mte(state: _KvmMteEnableState, vcpu: VcpuState, kvm_vm: KvmVm,
                        migration: MigrationState, added_blockers: list[str]) -> None:
    """target/arm/kvm.c kvm_arm_enable_mte(), raising instead of filling an &error_abort."""
    if not state.tried_to_enable:
        # MTE on KVM is enabled on a per-VM basis (and retrying doesn't make sense),
        # and we only want a single migration blocker as well.
        state.tried_to_enable = True
        try:
            kvm_vm.enable_cap(KVM_CAP_ARM_MTE, 0)
        except OSError as e:
            raise RealizeError(f"{MSG_ENABLE_FAILED}: {os.strerror(e.errno)}") from None
        # QEMU: /* TODO: Add migration support with MTE enabled */ -- mtevm offers opt-in tag migration.
        try:
            migration.add_blocker(MTE_MIGRATION_BLOCKER)
        except MigrationError as e:
            raise RealizeError(str(e)) from None
        added_blockers.append(MTE_MIGRATION_BLOCKER)
        state.succeeded_to_enable = True
    if state.succeeded_to_enable:
        vcpu.kvm_mte = True


def realize(config: VirtMachineConfig, kvm: KvmDevice | None, migration: MigrationState,
            *, ram_backing: str = "anonymous") -> RealizedMachine:
    """Build ``config`` on ``kvm`` (None: no KVM on this host). Raises RealizeError, leaving nothing behind.

    ``ram_backing`` is how the RAM memslot is mapped under KVM ("anonymous", "memfd", "tmpfs", "file").
    """
    config.validate()
    saved_only_migratable = migration.only_migratable
    migration.only_migratable = config.only_migratable      # QEMU: -only-migratable on this VM's command line
    machine = RealizedMachine(config=config, ram=None, vcpus=[], kvm_vm=None, tag_memory=False,
                              secure_tag_memory=False, blockers=[], migration=migration)
    try:
        if config.accel == "kvm":
            machine.kvm_vm = _kvm_init(kvm)
        # machvirt_init's early checks, before any CPU exists (accel names as current_accel_name()).
        if config.secure and config.accel in ("kvm", "hvf"):
            raise RealizeError(MSG_NO_TRUSTZONE.format(accel=config.accel.upper()))
        if config.mte and config.accel == "hvf":
            raise RealizeError(MSG_HVF)
        mte_state = _KvmMteEnableState()
        for n in range(config.vcpus):
            vcpu = VcpuState(index=n)
            if config.mte:
                if config.accel == "tcg":
                    # Create the memory region only once, but link to all cpus.
                    if not machine.tag_memory:
                        # The property exists only if MemTag is supported.
                        if not cpu_has_tag_memory(config.cpu):
                            raise RealizeError(MSG_TCG_CPU_NO_MTE)
                        machine.tag_memory = True
                        machine.secure_tag_memory = config.secure
                    vcpu.tag_memory_linked = True
                    vcpu.secure_tag_memory_linked = config.secure
                elif config.accel == "kvm":
                    if not kvm.check_extension(KVM_CAP_ARM_MTE):
                        raise RealizeError(MSG_KVM_NO_MTE)
                    _kvm_arm_enable_mte(mte_state, vcpu, machine.kvm_vm, migration, machine.blockers)
                else:
                    raise RealizeError(MSG_OTHER_ACCEL)
            if machine.kvm_vm is not None:
                # qdev_realize(cpu) -> kvm_arch_init_vcpu: after the cap, as the kernel requires.
                _kvm_call(machine.kvm_vm.create_vcpu, n, what="kvm_init_vcpu: KVM_CREATE_VCPU failed")
            machine.vcpus.append(vcpu)
        # memory_region_add_subregion(sysmem, VIRT_MEM, ram): the KVM memory listener adds the slot.
        if machine.kvm_vm is not None:
            _kvm_call(machine.kvm_vm.set_user_memory_region, RAM_SLOT, RAM_BASE, config.memory, ram_backing,
                      what="kvm_set_phys_mem: error registering slot")
            machine.ram = machine.kvm_vm.ram
            if machine.ram is None:          # a real KVM VM: mtevm does not see the guest's memory
                machine.ram = GuestRam(RAM_BASE, config.memory, mte=False)
        else:
            machine.ram = GuestRam(RAM_BASE, config.memory, mte=machine.tag_memory)
        return machine
    except BaseException:
        machine.close()
        migration.only_migratable = saved_only_migratable
        raise


def _kvm_init(kvm: KvmDevice | None) -> KvmVm:
    """kvm_init(): open the VM, with QEMU's texts when this host's KVM cannot run aarch64 guests."""
    if kvm is None or not kvm.present:
        raise RealizeError("-accel kvm: Could not access KVM kernel module: No such file or directory")
    if kvm.arch != "aarch64":
        raise RealizeError("-accel kvm: invalid accelerator kvm")   # qemu-system-aarch64 on a non-arm64 host
    try:
        return kvm.create_vm()
    except OSError as e:
        raise RealizeError(f"ioctl(KVM_CREATE_VM) failed: {e.errno} {os.strerror(e.errno)}") from None


def _kvm_call(fn, *args, what: str):
    try:
        return fn(*args)
    except OSError as e:
        raise RealizeError(f"{what}: {os.strerror(e.errno)}") from None


def dry_run(config: VirtMachineConfig, kvm: KvmDevice | None) -> None:
    """Realize and immediately release ``config`` (the create form's check); raises RealizeError."""
    realize(config, kvm, MigrationState()).close()
