"""What a tag check reports: one fault, a batch's outcome, and a vCPU's running counters.

Counting rule (the same on the per-access and the batch path):

* ``checked``: accesses the tag check applied to -- the VM has tag storage, TCF is not NONE for
  that access, PSTATE.TCO is 0 and TCMA does not match the pointer -- whether or not they
  faulted. A sync fault stops its access but still counts as checked.
* ``unchecked``: every other access. ``checked + unchecked`` is the number of accesses.
* ``sync_faults`` / ``async_faults``: checked accesses whose tags mismatched, by how they were
  reported. An async fault is counted per faulting access, even while TFSR is already set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

SYNC, ASYNC = 0, 1          # values of BatchResult.fault_kind
KIND_NAMES = ("sync", "async")


@dataclass
class FaultRecord:
    """One tag-check fault. ``addr`` follows the FAR rule even for async faults (where the
    hardware reports none) so a user can see where it happened."""

    index: int            # position in the batch, -1 for a single access
    kind: str             # "sync" | "async"
    addr: int             # FAR: bits 63:60 clear, pointer tag in 59:56
    ptr_tag: int
    mem_tag: int
    access: str           # "load" | "store"
    size: int

    def to_dict(self) -> dict:
        return {**asdict(self), "addr": f"{self.addr:#x}"}


@dataclass
class TagCheckCounts:
    """The four counts of the counting rule above, shared by a batch's outcome and a vCPU's
    running totals so the two cannot drift apart."""

    checked: int = 0
    unchecked: int = 0
    sync_faults: int = 0
    async_faults: int = 0


COUNT_NAMES = tuple(f.name for f in fields(TagCheckCounts))


@dataclass
class VcpuCounters(TagCheckCounts):
    last_fault: FaultRecord | None = None

    def to_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in COUNT_NAMES},
                "last_fault": self.last_fault.to_dict() if self.last_fault else None}


def _empty(dtype) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


@dataclass
class BatchResult(TagCheckCounts):
    """The outcome of ``TagCheckCpu.run_batch``; the fault arrays are in batch order."""

    fault_index: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    fault_addr: np.ndarray = field(default_factory=lambda: _empty(np.uint64))
    fault_kind: np.ndarray = field(default_factory=lambda: _empty(np.uint8))     # 0 sync, 1 async
    fault_ptr_tag: np.ndarray = field(default_factory=lambda: _empty(np.uint8))
    fault_mem_tag: np.ndarray = field(default_factory=lambda: _empty(np.uint8))
    fault_is_store: np.ndarray = field(default_factory=lambda: _empty(bool))
    fault_size: np.ndarray = field(default_factory=lambda: _empty(np.int64))

    @property
    def faults(self) -> int:
        return len(self.fault_index)

    def record(self, j: int) -> FaultRecord:
        """The ``j``-th fault of this batch as a FaultRecord."""
        return FaultRecord(index=int(self.fault_index[j]), kind=KIND_NAMES[int(self.fault_kind[j])],
                           addr=int(self.fault_addr[j]), ptr_tag=int(self.fault_ptr_tag[j]),
                           mem_tag=int(self.fault_mem_tag[j]),
                           access="store" if self.fault_is_store[j] else "load", size=int(self.fault_size[j]))

    def records(self, limit: int | None = None) -> list[FaultRecord]:
        """The faults as records, the last ``limit`` of them when given."""
        start = 0 if limit is None else max(0, self.faults - limit)
        return [self.record(j) for j in range(start, self.faults)]

    def add_to(self, counters: VcpuCounters) -> None:
        for name in COUNT_NAMES:
            setattr(counters, name, getattr(counters, name) + getattr(self, name))
        if self.faults:
            counters.last_fault = self.record(self.faults - 1)
