"""Simulated arm64 hosts ("sim-mte", "sim-nomte"): VMs whose vCPUs run the tagged-heap workload.

A SimHost is an arm64 machine whose kernel is backend.machine's SimulatedArm64Kvm, with or without
KVM_CAP_ARM_MTE. Starting a VM runs the same realize() as every other host (QEMU 9.2's decision
tree, per VM), then gives each vCPU a TagCheckCpu and a TaggedHeapWorkload; one asyncio task per
VM steps all its vCPUs at the workload's rate. Nothing is installed or started outside this
process: this is the embedded default host.

Migration follows QEMU: refused with the newest blocker's own text (a KVM MTE VM carries "Live
migration disabled due to MTE enabled"). Beyond QEMU, ``with_tags`` migrates the tags through the
KVM_ARM_MTE_COPY_TAGS layout when both hosts have MTE, which lifts only that blocker.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from backend.errors import ConfigError, MigrationError, RealizeError, StateError
from backend.hosts.base import Host, ProgressCallback, RunningVm, VmSpec, report_progress
from backend.hosts.workload import TCF_NAMES
from backend.machine import (MTE_MIGRATION_BLOCKER, MigrationState, RamMigration, RealizedMachine,
                             SimulatedArm64Kvm, VirtMachineConfig, dry_run, probe_simulated, realize)
from backend.machine.migration import PAGE, ram_stats
from backend.tagcheck import TagCheckCpu

TICKS_PER_S = 10              # a paced VM's task wakes this often (batches = rate / TICKS_PER_S): each
                              # batch has a fixed cost, so fewer, larger batches keep a daemon with VMs cheap
MAX_CATCH_UP_S = 0.5          # after a stall, at most this much missed work is made up
FLAT_OUT_BATCH = 16384        # rate 0: accesses per vCPU per batch (16k amortises the step cost; ~1-2 ms), then yield
MIGRATION_SECONDS = 0.6       # how long a migration's progress takes, so front ends can show it
MIGRATION_STEPS = 20          # progress reports per migration phase (RAM, tags, verify)
FAULT_HISTORY = 200
FAULTS_PER_BATCH = 5          # the newest faults of each batch that go into the history


def _new_workload(cpu: TagCheckCpu, ram, spec: VmSpec, index: int):
    from backend.hosts.heap import TaggedHeapWorkload
    return TaggedHeapWorkload(cpu, ram, spec.workload, index)


class SimHost(Host):
    """A simulated arm64 host. ``host_mte``: its CPUs and KVM have MTE (KVM_CAP_ARM_MTE = 1)."""

    kind = "simulated"

    def __init__(self, name: str, host_mte: bool):
        self.name = name
        self.host_mte = host_mte
        self.kvm = SimulatedArm64Kvm(host_mte=host_mte)
        self.description = ("simulated arm64 host whose KVM has KVM_CAP_ARM_MTE" if host_mte else
                            "simulated arm64 host without MTE (no KVM_CAP_ARM_MTE)")
        self.vms: set[SimVm] = set()

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description, "arch": "aarch64",
                "kvm_mte": self.host_mte, "available": True, "reason": None}

    def probe(self) -> dict:
        return probe_simulated(self.name, host_mte=self.host_mte).to_dict()

    def check_config(self, config: VirtMachineConfig) -> None:
        dry_run(config, self.kvm)

    def _realize(self, config: VirtMachineConfig) -> RealizedMachine:
        return realize(config, self.kvm, MigrationState())

    async def start(self, spec: VmSpec, *, run: bool = True) -> "SimVm":
        """Realize ``spec`` here and start its vCPUs. ``run=False``: no background task (the caller
        steps the VM with ``step``, e.g. for a deterministic number of batches)."""
        self.check_extra_args(spec.extra_args)    # no QEMU here: extra QEMU arguments are refused
        spec.workload.validate()
        machine = self._realize(spec.config)      # RealizeError: realize has already undone itself
        try:
            vm = SimVm(self, spec, machine)
        except BaseException:
            machine.close()
            raise
        self.vms.add(vm)
        if run:
            vm.run()
        return vm

    async def close(self) -> None:
        """The daemon stops: simulated VMs cannot outlive it."""
        for vm in list(self.vms):
            await vm.stop()


class SimVm(RunningVm):
    """One simulated VM: a realized machine, one TagCheckCpu + heap workload per vCPU, counters."""

    def __init__(self, host: SimHost, spec: VmSpec, machine: RealizedMachine, *, moved_from: "SimVm | None" = None):
        self.host = host
        self.spec = spec
        self.machine = machine
        self._task: asyncio.Task | None = None
        self._crash: str | None = None
        self._stopped = False
        self._cancel_migration = False
        if moved_from is None:
            self._boot()
        else:
            self._take_over(moved_from)

    def _boot(self) -> None:
        """Fresh vCPUs, heaps and counters on this VM's machine (at start, and at a reset)."""
        spec, ram = self.spec, self.machine.ram
        w = spec.workload
        self.cpus = [TagCheckCpu(ram, i, tcf=w.tcf_for(i), seed=w.seed * 7919 + i)
                     for i in range(spec.config.vcpus)]
        self.workloads = [_new_workload(cpu, ram, spec, i) for i, cpu in enumerate(self.cpus)]
        self._last_fault: list[dict | None] = [None] * spec.config.vcpus
        self._faults: deque[dict] = deque(maxlen=FAULT_HISTORY)

    # ------------------------------------------------------------------------------ running
    @property
    def state(self) -> str:
        return "crashed" if self._crash else "running"

    def stderr_tail(self) -> list[str]:
        return [self._crash] if self._crash else []

    def step(self, accesses: int) -> None:
        """Run one batch of ``accesses`` on every vCPU (what the background task does each tick)."""
        now = time.time()
        for i, workload in enumerate(self.workloads):
            result = workload.step(accesses)
            if result.faults:
                for record in result.records(FAULTS_PER_BATCH):
                    fault = {"vcpu": i, **record.to_dict(), "time": now}
                    del fault["index"]
                    self._faults.appendleft(fault)
                self._last_fault[i] = self._faults[0]

    def run(self) -> None:
        """Start the background task that steps the vCPUs at the workload's rate."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-vm-{self.spec.config.name}")

    async def _run(self) -> None:
        rate = self.spec.workload.rate
        try:
            if rate == 0:
                while True:                     # flat out, but never starve the event loop
                    self.step(FLAT_OUT_BATCH)
                    await asyncio.sleep(0)
            loop = asyncio.get_running_loop()
            owed, last = 0.0, loop.time()
            while True:
                await asyncio.sleep(1.0 / TICKS_PER_S)
                now = loop.time()
                owed += rate * min(now - last, MAX_CATCH_UP_S)
                last = now
                if owed >= 1:
                    n = int(owed)
                    owed -= n
                    self.step(n)
        except asyncio.CancelledError:
            raise
        except Exception as e:        # a bug in the simulation crashes this VM, not the daemon
            self._crash = f"simulated vCPUs stopped: {type(e).__name__}: {e}"

    async def _pause(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def pause(self) -> None:
        """The vCPUs' task stops; counters hold still."""
        await self._pause()
        self.paused = True

    async def resume(self) -> None:
        self.paused = False
        self.run()

    async def reset(self) -> None:
        """As system_reset: a fresh machine (RAM and tags cleared), vCPUs and counters from zero."""
        await self._pause()
        machine = self.host._realize(self.spec.config)
        self.machine.close()
        self.machine = machine
        self._boot()
        if not self.paused:
            self.run()

    async def cancel_migration(self) -> None:
        """The migration's copy loop stops at its next step; the VM resumes here."""
        self._cancel_migration = True

    async def stop(self) -> None:
        await self._pause()
        if not self._stopped:
            self._stopped = True
            self.machine.close()
            self.host.vms.discard(self)

    # ----------------------------------------------------------------------------- counters
    def _vcpu_info(self, i: int) -> dict:
        c = self.cpus[i].counters
        return {"index": i, "kvm_mte": self.machine.vcpus[i].kvm_mte, "tcf": str(self.cpus[i].tcf),
                "checked": c.checked, "unchecked": c.unchecked, "sync_faults": c.sync_faults,
                "async_faults": c.async_faults, "last_fault": dict(self._last_fault[i]) if self._last_fault[i] else None}

    def vcpus(self) -> list[dict]:
        return [self._vcpu_info(i) for i in range(len(self.cpus))]

    async def sample(self) -> list[dict]:
        return self.vcpus()      # the counters are live in this process

    def last_faults(self, limit: int = 20) -> list[dict]:
        return [dict(f) for f in list(self._faults)[:limit]]

    def tag_memory(self) -> dict | None:
        tags = self.machine.ram.tags
        return None if tags is None else {"bytes": tags.bytes_used, "tagged_pages": tags.tagged_pages}

    def set_tcf(self, vcpu: int | None, tcf: str) -> None:
        if tcf not in TCF_NAMES:
            raise ConfigError(f"tcf {tcf!r} is not one of {', '.join(TCF_NAMES)}")
        n = len(self.cpus)
        if vcpu is not None and (isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < n):
            raise ConfigError(f"VM '{self.spec.config.name}' has vCPUs 0 to {n - 1}: there is no vCPU {vcpu!r}")
        for cpu in self.cpus if vcpu is None else [self.cpus[vcpu]]:
            cpu.tcf = tcf

    async def blocked_reasons(self) -> list[str]:
        return list(self.machine.migration.query_migrate().get("blocked-reasons", []))

    # ---------------------------------------------------------------------------- migration
    def _tags_in_kvm(self) -> bool:
        """The VM's tags live in the host's MTE hardware (KVM with MTE), not in QEMU's tag RAM."""
        return self.machine.kvm_vm is not None and self.machine.kvm_vm.mte_enabled

    def _check_migration(self, dst: Host, with_tags: bool) -> None:
        if not isinstance(dst, SimHost):
            raise MigrationError(self.host.can_migrate_to(dst) or f"cannot migrate a simulated VM to host {dst.name}")
        if self._stopped or self.state != "running":
            raise StateError(f"VM '{self.spec.config.name}' is not running")
        if with_tags and self._tags_in_kvm() and not dst.host_mte:
            raise MigrationError(f"destination {dst.name} has no KVM_CAP_ARM_MTE: cannot migrate MTE tags")
        # Beyond QEMU: asking for tags, with MTE on both hosts, lifts the blocker that exists only
        # because QEMU cannot move tags (its "TODO: Add migration support with MTE enabled").
        lift = (MTE_MIGRATION_BLOCKER,) if with_tags and self.host.host_mte and dst.host_mte else ()
        self.machine.migration.check_can_migrate(lifted=lift)

    async def migrate_to(self, dst: Host, spec: VmSpec, with_tags: bool,
                         progress: ProgressCallback) -> "SimVm":
        """Stop-and-copy to ``dst``: pause the vCPUs, copy RAM (and tags), verify, resume there.

        A TCG VM's tags always travel (QEMU migrates its tag RAM as a RAM block); a KVM VM's
        tags travel only with ``with_tags``. On failure the source resumes and nothing is left
        on ``dst``; on success counters and workload continue on ``dst`` and this VM is stopped.
        """
        self._check_migration(dst, with_tags)
        try:
            target = dst._realize(spec.config)
        except RealizeError as e:
            raise MigrationError(f"cannot start VM '{spec.config.name}' on {dst.name}: {e}") from None
        copy_tags = with_tags or self.machine.tag_memory
        was_running = self._task is not None and not self.paused
        await self._pause()
        try:
            stats = await self._copy(target, copy_tags, progress)
            vm = SimVm(dst, spec, target, moved_from=self)
        except BaseException:
            target.close()
            if was_running:
                self.run()
            raise
        stats["with_tags"] = with_tags
        stats["tags"] = ("copied with KVM_ARM_MTE_COPY_TAGS and verified" if copy_tags and self._tags_in_kvm() else
                         "migrated with RAM (TCG tag memory) and verified" if copy_tags else "none")
        dst.vms.add(vm)
        self._stopped = True          # the source's vCPUs now belong to the destination
        self.machine.close()
        self.host.vms.discard(self)
        if was_running:
            vm.run()
        await report_progress(progress, 1.0, stats)
        return vm

    async def _copy(self, target: RealizedMachine, copy_tags: bool, progress: ProgressCallback) -> dict:
        """RamMigration over the whole guest RAM in MIGRATION_STEPS slices with short awaits (about
        MIGRATION_SECONDS in all). Progress and figures are query-migrate's: RAM total = the VM's
        memory, zero pages count as "duplicate", written ones as "normal"; then tags, then verify."""
        job = RamMigration(self.machine, target, with_tags=copy_tags, ram_slices=MIGRATION_STEPS)
        job.chunk_pages = math.ceil(max(len(job.tag_pages), 1) / MIGRATION_STEPS)
        state = self.machine.migration        # its ram dict is replaced when the migration begins
        ram_pages = self.machine.ram.size // PAGE
        tag_units = 2 * len(job.tag_pages)          # copy each tag page, then verify it
        n_steps = MIGRATION_STEPS + 2 * math.ceil(len(job.tag_pages) / job.chunk_pages)
        steps = job.steps()
        try:
            for done, _ in steps:
                if self._cancel_migration:
                    raise MigrationError("migration cancelled")
                ram = state.ram
                ram_done = (ram["total"] - ram["remaining"]) // PAGE
                tags_done = max(0, done - len(job.data_pages))
                await report_progress(progress, 0.99 * (ram_done + tags_done) / (ram_pages + tag_units),
                              {"status": "active", **ram_stats(ram)})
                await asyncio.sleep(MIGRATION_SECONDS / n_steps)
        finally:
            steps.close()             # cancelled midway: the source's status says "cancelled"
            self._cancel_migration = False
        return {"status": "completed", **ram_stats(state.ram), **job.stats}

    def _take_over(self, src: "SimVm") -> None:
        """Carry the source's vCPU state, counters, fault history and workload onto this machine."""
        ram = self.machine.ram
        self.cpus = []
        for old in src.cpus:
            cpu = TagCheckCpu(ram, old.index, tcf=old.tcf, tcma0=old.tcma0, tcma1=old.tcma1, tco=old.tco,
                              gcr_exclude=old.gcr_exclude)
            cpu.tfsr = old.tfsr
            cpu.counters = old.counters
            self.cpus.append(cpu)
        self.workloads = src.workloads     # the heap (slots, tags' owners, its seeded generator) goes on
        for workload, cpu in zip(self.workloads, self.cpus):
            workload.cpu, workload.ram = cpu, ram
        self._last_fault = src._last_fault
        self._faults = src._faults
