"""Simulated arm64 hosts ("sim-mte", "sim-nomte"): VMs whose vCPUs run the tagged-heap workload.

A SimHost is an arm64 machine whose kernel is backend.machine's SimulatedArm64Kvm, with or without
KVM_CAP_ARM_MTE. Starting a VM runs the same realize() as every other host (QEMU 9.2's decision
tree, per VM), then gives each vCPU a TagCheckCpu and a TaggedHeapWorkload (backend.hosts.simvcpus)
that run in a worker process (backend.hosts.workers), never on the daemon's event loop. The VM's
counters, faults, TCF modes and tag memory live in a shared-memory segment (backend.hosts.simshared)
that the daemon reads in place. Nothing is installed: this is the embedded default host.

Limits (``check_limits``, before anything runs, each message naming its limit): vCPUs, memory,
workload rate and heap size that a simulated VM can have, and the machine's capacity in
vCPU-seconds per second (``WorkerPool.check_room``) when a VM starts.

Migration follows QEMU: refused with the newest blocker's own text (a KVM MTE VM carries "Live
migration disabled due to MTE enabled"). Beyond QEMU, ``with_tags`` migrates the tags through the
KVM_ARM_MTE_COPY_TAGS layout when both hosts have MTE, which lifts only that blocker.
"""
from __future__ import annotations

import asyncio
import math

from backend.errors import ConfigError, MigrationError, MtevmError, RealizeError, StateError
from backend.hosts.base import Host, ProgressCallback, RunningVm, VmSpec, report_progress
from backend.hosts.heap import HEAP_OFFSET
from backend.hosts.simshared import VmLayout, VmShared
from backend.hosts.simvcpus import SimVcpus, tcf_code
from backend.hosts.workers import WorkerPool, layout_dict, shared_pool, vcpu_seconds
from backend.hosts.workload import TCF_NAMES, WorkloadConfig
from backend.machine import (MTE_MIGRATION_BLOCKER, MigrationState, RamMigration, RealizedMachine,
                             SimulatedArm64Kvm, VirtMachineConfig, dry_run, format_size, probe_simulated, realize)
from backend.machine.migration import PAGE, ram_stats

MIGRATION_SECONDS = 0.6       # how long a migration's progress takes, so front ends can show it
MIGRATION_STEPS = 20          # progress reports per migration phase (RAM, tags, verify)
FAULT_LIMIT = 20              # faults shown by last_faults() by default

# What one simulated VM may ask for (a simulated vCPU's cost is its workload, not its RAM, but
# every vCPU and heap page is real memory and CPU in a worker process).
MAX_SIM_MEMORY = 64 << 30
MAX_SIM_RATE = 5_000_000      # accesses/s per vCPU; one core checks ~10-20 M/s flat out (rate 0)
MAX_SIM_HEAP = 64 << 20       # per vCPU
MAX_SIM_HEAPS = 1 << 30       # all vCPUs' heaps of one VM: their tags take 1/32 of it in shared memory
VM_CAPACITY = 1.0             # vCPU-seconds per second one VM can have: its vCPUs share one worker


def check_sim_limits(config: VirtMachineConfig, workload: WorkloadConfig) -> None:
    """ConfigError naming the limit when a definition asks for more than a simulated host can honour."""
    if config.memory > MAX_SIM_MEMORY:
        raise ConfigError(f"memory {format_size(config.memory)} is more than a simulated host gives one VM: "
                          f"at most {format_size(MAX_SIM_MEMORY)}")
    if workload.rate > MAX_SIM_RATE:
        raise ConfigError(f"workload rate {workload.rate} is more than a simulated vCPU can run: at most "
                          f"{MAX_SIM_RATE} accesses per second per vCPU (rate 0 runs flat out)")
    if workload.heap_size > MAX_SIM_HEAP:
        raise ConfigError(f"workload heap_size {format_size(workload.heap_size)} is more than a simulated vCPU "
                          f"gets: at most {format_size(MAX_SIM_HEAP)} per vCPU")
    heaps = config.vcpus * workload.heap_size
    if heaps > MAX_SIM_HEAPS:
        raise ConfigError(f"workload heap_size: {config.vcpus} vCPU heaps of {format_size(workload.heap_size)} "
                          f"make {format_size(heaps)}; a simulated VM's heaps may take at most "
                          f"{format_size(MAX_SIM_HEAPS)} in all")
    if HEAP_OFFSET + heaps > config.memory:
        raise ConfigError(f"workload heap_size: {config.vcpus} vCPU heaps of {format_size(workload.heap_size)} "
                          f"from RAM offset {format_size(HEAP_OFFSET)} need {format_size(HEAP_OFFSET + heaps)} "
                          f"of memory, the VM has {format_size(config.memory)}")
    asks = vcpu_seconds(workload.rate, config.vcpus)
    if asks > VM_CAPACITY:
        raise ConfigError(f"{config.vcpus} vCPUs at workload rate {workload.rate} need {asks:.2f} vCPU-seconds per "
                          f"second; a simulated VM gets at most {VM_CAPACITY:g} (its vCPUs share one worker "
                          "process): lower the rate or the vCPUs, or use rate 0 (flat out)")


def _layout(machine: RealizedMachine, spec: VmSpec) -> VmLayout:
    """The shared segment of a VM: tag memory (if any) sized for the heaps its workload tags."""
    ram = machine.ram
    heaps = spec.config.vcpus * spec.workload.heap_size
    return VmLayout(vcpus=spec.config.vcpus, ram_base=ram.base, ram_size=ram.size, mte=ram.tags is not None,
                    tag_pages=-(-heaps // PAGE) + 1, tag_span=HEAP_OFFSET + heaps)


class SimHost(Host):
    """A simulated arm64 host. ``host_mte``: its CPUs and KVM have MTE (KVM_CAP_ARM_MTE = 1).
    ``pool``: the worker processes its vCPUs run in (default: the process's, shared by all hosts)."""

    kind = "simulated"

    def __init__(self, name: str, host_mte: bool, *, pool: WorkerPool | None = None):
        self.name = name
        self.host_mte = host_mte
        self.kvm = SimulatedArm64Kvm(host_mte=host_mte)
        self.description = ("simulated arm64 host whose KVM has KVM_CAP_ARM_MTE" if host_mte else
                            "simulated arm64 host without MTE (no KVM_CAP_ARM_MTE)")
        self.vms: set[SimVm] = set()
        self._pool = pool

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = shared_pool()
        return self._pool

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description, "arch": "aarch64",
                "kvm_mte": self.host_mte, "available": True, "reason": None}

    def probe(self) -> dict:
        return probe_simulated(self.name, host_mte=self.host_mte).to_dict()

    def check_limits(self, config: VirtMachineConfig, workload: WorkloadConfig) -> None:
        check_sim_limits(config, workload)

    def check_config(self, config: VirtMachineConfig) -> None:
        dry_run(config, self.kvm)

    def _realize(self, config: VirtMachineConfig) -> RealizedMachine:
        return realize(config, self.kvm, MigrationState())

    async def start(self, spec: VmSpec, *, run: bool = True) -> "SimVm":
        """Realize ``spec`` here and start its vCPUs in a worker process. ``run=False``: they stay
        paused in this process (the caller steps the VM with ``step``, e.g. a deterministic
        number of batches)."""
        self.check_extra_args(spec.extra_args)    # no QEMU here: extra QEMU arguments are refused
        spec.workload.validate()
        self.check_limits(spec.config, spec.workload)
        if run:
            self.pool.check_room(self.name, spec.config.name, spec.workload.rate, spec.config.vcpus)
        machine = self._realize(spec.config)      # RealizeError: realize has already undone itself
        try:
            vm = SimVm(self, spec, machine)
        except BaseException:
            machine.close()
            raise
        self.vms.add(vm)
        if run:
            try:
                await vm.run()
            except BaseException:
                await vm.stop()
                raise
        return vm

    async def close(self) -> None:
        """The daemon stops: simulated VMs cannot outlive it, nor can idle worker processes."""
        for vm in list(self.vms):
            await vm.stop()
        if self._pool is not None:
            self._pool.shutdown_if_idle()


class SimVm(RunningVm):
    """One simulated VM: a realized machine, its shared segment, and its vCPUs (SimVcpus), which
    run in a worker process (``worker``) or, paused, in this one (``paused_vcpus``)."""

    def __init__(self, host: SimHost, spec: VmSpec, machine: RealizedMachine, *, fresh: bool = True):
        self.host = host
        self.spec = spec
        self.machine = machine
        self.shared = VmShared.create(_layout(machine, spec))
        if machine.ram.tags is not None:
            machine.ram.tags = self.shared.tag_memory   # a new machine's tags are empty: nothing to move
        self.worker = None
        self.demand = 0.0                  # vCPU-seconds per second reserved in the worker pool
        self.paused_vcpus: SimVcpus | None = None
        self._crash: str | None = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_migration = False
        if fresh:
            self._boot()

    def _boot(self) -> None:
        """Fresh paused vCPUs (heaps, counters from zero) on this VM's shared segment."""
        for i in range(self.spec.config.vcpus):
            self.shared.tcf[i] = tcf_code(self.spec.workload.tcf_for(i))
        try:
            self.paused_vcpus = SimVcpus(self.shared, self.spec.workload)
        except BaseException:
            self.shared.release()
            raise

    # ------------------------------------------------------------------------------ running
    @property
    def state(self) -> str:
        return "crashed" if self._crash else "running"

    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    def stderr_tail(self) -> list[str]:
        return [self._crash] if self._crash else []

    def step(self, accesses: int) -> None:
        """Run one batch of ``accesses`` on every vCPU of a paused VM (tests and snapshots)."""
        if self.paused_vcpus is None:
            raise StateError(f"VM '{self.spec.config.name}' runs in a worker process: pause it to step it by hand")
        self.paused_vcpus.step(accesses)

    async def run(self) -> None:
        """Hand the paused vCPUs to a worker process, which steps them at the workload's rate."""
        if self.paused_vcpus is None or self._stopped:
            return
        pool = self.host.pool
        worker = pool.place()
        state = self.paused_vcpus.export_state()
        self._loop = asyncio.get_running_loop()
        self.worker = worker
        self.demand = vcpu_seconds(self.spec.workload.rate, self.spec.config.vcpus)
        worker.vms[id(self)] = self
        try:
            await worker.call("start", id(self), self.shared.name, layout_dict(self.shared.layout),
                              self.spec.workload.to_dict(), state)
        except BaseException:
            worker.vms.pop(id(self), None)
            self.worker, self.demand = None, 0.0
            raise
        self.paused_vcpus = None

    def worker_lost(self, reason: str) -> None:
        """Called by the worker's reader thread: the vCPUs are gone (the worker died or they crashed)."""
        def lost() -> None:
            self.worker, self.demand = None, 0.0
            self._crash = self._crash or reason
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(lost)
                return
            except RuntimeError:
                pass
        lost()

    async def _pause(self) -> None:
        """Take the vCPUs back from the worker (their state travels; counters are in the segment)."""
        worker = self.worker
        if worker is None:
            if self.paused_vcpus is None:
                raise StateError(f"VM '{self.spec.config.name}' has no vCPUs left to pause: {self._crash}")
            return
        state = await worker.call("detach", id(self))
        worker.vms.pop(id(self), None)
        self.worker, self.demand = None, 0.0
        self.paused_vcpus = SimVcpus(self.shared, self.spec.workload, state)

    # -------------------------------------------------------------------- everyday operations
    async def pause(self) -> None:
        """The vCPUs come back from their worker and stand still; so do the counters."""
        await self._pause()
        self.paused = True

    async def resume(self) -> None:
        await self.run()
        self.paused = False

    async def reset(self) -> None:
        """As system_reset: a fresh machine (RAM and tags cleared), vCPUs and counters from zero."""
        was_running = self.worker is not None
        await self._pause()
        try:
            machine = self.host._realize(self.spec.config)
            try:
                shared = VmShared.create(_layout(machine, self.spec))
            except BaseException:
                machine.close()
                raise
        except BaseException:
            if was_running:
                await self.run()     # the reset failed: the VM goes on as it was
            raise
        old_machine, old_shared = self.machine, self.shared
        self.shared = shared
        if machine.ram.tags is not None:
            machine.ram.tags = self.shared.tag_memory
        self.machine = machine
        self._boot()
        old_shared.release()
        old_machine.close()
        if was_running:
            await self.run()

    async def cancel_migration(self) -> None:
        """The migration's copy loop stops at its next step; the VM resumes here."""
        self._cancel_migration = True

    async def stop(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.vms.pop(id(self), None)
            self.demand = 0.0
            try:
                await worker.call("stop", id(self))
            except MtevmError:
                pass                   # the worker died, or already dropped the VM: it runs nowhere
        self.paused_vcpus = None
        if not self._stopped:
            self._stopped = True
            self.shared.release()
            self.machine.close()
            self.host.vms.discard(self)

    # ----------------------------------------------------------------------------- counters
    def vcpus(self) -> list[dict]:
        return [{"index": i, "kvm_mte": v.kvm_mte, "tcf": tcf, **counts, "last_fault": fault}
                for i, (v, (counts, tcf, fault)) in enumerate(zip(self.machine.vcpus, self.shared.vcpu_rows()))]

    async def sample(self) -> list[dict]:
        return self.vcpus()      # the counters are live in shared memory

    def last_faults(self, limit: int = FAULT_LIMIT) -> list[dict]:
        return self.shared.recent_faults(limit)

    def tag_memory(self) -> dict | None:
        tags = self.machine.ram.tags
        return None if tags is None else {"bytes": tags.bytes_used, "tagged_pages": tags.tagged_pages}

    def set_tcf(self, vcpu: int | None, tcf: str) -> None:
        if tcf not in TCF_NAMES:
            raise ConfigError(f"tcf {tcf!r} is not one of {', '.join(TCF_NAMES)}")
        n = self.spec.config.vcpus
        if vcpu is not None and (isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < n):
            raise ConfigError(f"VM '{self.spec.config.name}' has vCPUs 0 to {n - 1}: there is no vCPU {vcpu!r}")
        if vcpu is None:
            self.shared.tcf[:] = tcf_code(tcf)     # the vCPUs read it before their next batch
        else:
            self.shared.tcf[vcpu] = tcf_code(tcf)

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
        """Stop-and-copy to ``dst``: pause the vCPUs (back from their worker), copy RAM (and tags)
        between the two VMs' shared segments, verify, resume there.

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
        was_running = self.worker is not None
        vm = None
        try:
            await self._pause()
            vm = SimVm(dst, spec, target, fresh=False)
            stats = await self._copy(target, copy_tags, progress)
            vm.shared.copy_state_from(self.shared)
            vm.paused_vcpus = SimVcpus(vm.shared, spec.workload, self.paused_vcpus.export_state())
        except BaseException:
            if vm is not None:
                vm.shared.release()
            target.close()
            if was_running:
                await self.run()
            raise
        stats["with_tags"] = with_tags
        stats["tags"] = ("copied with KVM_ARM_MTE_COPY_TAGS and verified" if copy_tags and self._tags_in_kvm() else
                         "migrated with RAM (TCG tag memory) and verified" if copy_tags else "none")
        dst.vms.add(vm)
        self._stopped = True          # the source's vCPUs now belong to the destination
        self.paused_vcpus = None
        self.shared.release()
        self.machine.close()
        self.host.vms.discard(self)
        if was_running:
            try:
                await vm.run()
            except MtevmError as e:
                vm._crash = f"simulated vCPUs could not resume after the migration: {e}"
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
