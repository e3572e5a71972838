"""The Arm64 virt machine model: definitions, MTE realize (QEMU 9.2's decision tree), KVM, probe, migration.

See docs/contracts.md "backend.machine" for the API other modules use.
"""
from backend.machine.config import VirtMachineConfig, format_size, parse_size
from backend.machine.cpu_models import CPU_MODELS, cpu_has_tag_memory, cpu_mte_level
from backend.machine.kvm import (KVM_CAP_ARM_MTE, KvmDevice, KvmVm, RealKvmDevice, SimulatedArm64Kvm,
                                 SimulatedKvmVm)
from backend.machine.migration import MigrationState, RamMigration, migrate_ram
from backend.machine.probe import ProbeReport, probe_local, probe_simulated
from backend.machine.realize import (MTE_MIGRATION_BLOCKER, RealizedMachine, VcpuState, dry_run,
                                     realize)

__all__ = ["VirtMachineConfig", "parse_size", "format_size", "CPU_MODELS", "cpu_mte_level", "cpu_has_tag_memory",
           "realize", "dry_run", "RealizedMachine", "VcpuState", "MTE_MIGRATION_BLOCKER",
           "KvmDevice", "KvmVm", "RealKvmDevice", "SimulatedArm64Kvm", "SimulatedKvmVm", "KVM_CAP_ARM_MTE",
           "probe_local", "probe_simulated", "ProbeReport", "MigrationState", "RamMigration", "migrate_ram"]
