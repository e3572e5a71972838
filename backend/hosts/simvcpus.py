"""The vCPUs of one simulated VM: a TagCheckCpu and a tagged-heap workload per vCPU.

They run in a worker process (backend.hosts.simworker) while the VM runs, and in the daemon only
while it is paused (a migration copies it; tests and snapshots step it by hand). Wherever they
run they read their TCF from, and write their counters and faults to, the VM's shared segment
(backend.hosts.simshared), so the daemon sees them without asking. ``export_state`` /
``SimVcpus(shared, workload, state)`` move them between processes and hosts: registers and the
heap (slots, object tags, seeded generator) travel; counters and faults are in the segment.
"""
from __future__ import annotations

import time

from backend.hosts.heap import TaggedHeapWorkload
from backend.hosts.simshared import TCF_CODES, VmShared
from backend.hosts.workload import WorkloadConfig
from backend.tagcheck import TagCheckCpu

FAULTS_PER_BATCH = 5          # the newest faults of each batch that go into the history
_REGISTERS = ("tcma0", "tcma1", "tco", "gcr_exclude", "tfsr")


class SimVcpus:
    def __init__(self, shared: VmShared, workload: WorkloadConfig, state: dict | None = None):
        self.shared = shared
        ram = shared.ram()
        if state is None:         # a fresh boot: seeded vCPUs and heaps, TCF from the workload
            self.cpus = [TagCheckCpu(ram, i, tcf=workload.tcf_for(i), seed=workload.seed * 7919 + i)
                         for i in range(shared.layout.vcpus)]
            self.workloads = [TaggedHeapWorkload(cpu, ram, workload, i) for i, cpu in enumerate(self.cpus)]
            for i, cpu in enumerate(self.cpus):
                shared.tcf[i] = int(cpu.tcf)
        else:                     # carried over: registers and heaps from the state, the rest from the segment
            self.cpus = []
            for i, regs in enumerate(state["cpus"]):
                cpu = TagCheckCpu(ram, i, tcf=int(shared.tcf[i]))
                for name in _REGISTERS:
                    setattr(cpu, name, regs[name])
                self.cpus.append(cpu)
            self.workloads = [TaggedHeapWorkload.from_state(cpu, ram, s)
                              for cpu, s in zip(self.cpus, state["workloads"])]
        for i, cpu in enumerate(self.cpus):       # the running totals go on from the segment's
            for name, value in zip(("checked", "unchecked", "sync_faults", "async_faults"),
                                   shared.counters[i].tolist()):
                setattr(cpu.counters, name, value)

    def step(self, accesses: int) -> None:
        """One batch of ``accesses`` on every vCPU; counters and newest faults into the segment."""
        shared = self.shared
        now = time.time()
        for i, (cpu, workload) in enumerate(zip(self.cpus, self.workloads)):
            mode = int(shared.tcf[i])
            if mode != cpu.tcf:
                cpu.tcf = mode
            result = workload.step(accesses)
            c = cpu.counters
            shared.counters[i] = (c.checked, c.unchecked, c.sync_faults, c.async_faults)
            if result.faults:
                for record in result.records(FAULTS_PER_BATCH):
                    shared.record_fault(i, record, now)

    def export_state(self) -> dict:
        return {"cpus": [{name: getattr(cpu, name) for name in _REGISTERS} for cpu in self.cpus],
                "workloads": [w.export_state() for w in self.workloads]}


def tcf_code(name: str) -> int:
    return TCF_CODES[name]
