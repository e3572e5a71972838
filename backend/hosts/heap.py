"""The simulated guest's workload: a tagged heap with injected memory-safety bugs.

It mirrors the real bare-metal guest (backend/qemu/guest/guest.c) so simulated and real VMs
give comparable counters: each vCPU owns the heap slice [heap_base, heap_base + heap_size) at the
same place in RAM as the real guest's, cut into slots (up to 1024; objects of 1..16 granules
with untagged slack behind them).

* allocate = IRG + STG over the object. IRG excludes tag 0, the slot's previous tag and the tag
  of the granule just past the object, so a use-after-free or an overflow always mismatches;
* free = retag the object with a fresh IRG tag (excluding its old tag and 0);
* ``step(n)`` is one time step: dead slots are allocated, use-after-free victims are freed, then
  n accesses run as ONE vectorised batch through ``cpu.run_batch`` -- mostly valid accesses of
  1..16 bytes inside live objects; with the configured probabilities a use-after-free (an
  8-byte access through the stale pointer), an overflow (8 bytes just past the object) or a
  wild pointer (anywhere in the heap, random tag) -- and afterwards about 1 in 64 objects
  accessed is freed (churn).

A sync fault stops only its access; the workload goes on (like a guest kernel that kills the
task). Everything random comes from a generator seeded with (seed, vCPU), so the same seed
gives the same counters.
"""
from __future__ import annotations

import numpy as np

from backend.errors import ConfigError
from backend.hosts.workload import WorkloadConfig
from backend.qemu.guest_abi import HEAP_BASE, RAM_BASE
from backend.tagcheck import BatchResult, GuestRam, TagCheckCpu
from backend.tagcheck.pointers import choose_nonexcluded_tags

HEAP_OFFSET = HEAP_BASE - RAM_BASE     # where the real guest's heaps start, from the RAM base
MAX_SLOTS = 1024
MAX_OBJECT_GRANULES = 16
VALID_SIZES = np.array([1, 2, 4, 8, 8, 8, 16, 16])     # the real guest's mix of access sizes
FREE_AFTER_USE = 1 / 64                 # chance that a valid access's object is freed afterwards
BUG_SIZE = 8                            # use-after-free, overflow and wild accesses are 8 bytes
UAF, OVERFLOW, WILD, VALID = 0, 1, 2, 3


class TaggedHeapWorkload:
    def __init__(self, cpu: TagCheckCpu, ram: GuestRam, config: WorkloadConfig, vcpu_index: int):
        self.cpu, self.ram, self.config, self.vcpu = cpu, ram, config, vcpu_index
        cpu.tcf = config.tcf_for(vcpu_index)
        self.heap_base = ram.base + HEAP_OFFSET + vcpu_index * config.heap_size
        self.heap_size = config.heap_size
        if self.heap_base + self.heap_size > ram.base + ram.size:
            raise ConfigError(f"workload heap_size: vCPU {vcpu_index}'s heap [{self.heap_base:#x}, "
                              f"{self.heap_base + self.heap_size:#x}) does not fit in {ram.size >> 20} MiB of RAM")
        self.nslots = min(self.heap_size // 256, MAX_SLOTS)
        self.slot_size = (self.heap_size // self.nslots) & ~15
        self.max_granules = min((self.slot_size - 16) // 16, MAX_OBJECT_GRANULES)
        self._rng = np.random.default_rng([config.seed, vcpu_index])
        self._thresholds = np.cumsum([config.uaf_rate, config.overflow_rate, config.wild_rate])
        self.slot_base = self.heap_base + np.arange(self.nslots, dtype=np.uint64) * np.uint64(self.slot_size)
        self.slot_ptr = self.slot_base.copy()                 # tagged pointer of the current object
        self.slot_granules = np.ones(self.nslots, dtype=np.int64)
        self.slot_live = np.zeros(self.nslots, dtype=bool)
        self.allocations = self.frees = 0

    # ---- heap management --------------------------------------------------------------------
    def _tag_objects(self, slots: np.ndarray, tags: np.ndarray) -> None:
        """STG every granule of the objects in ``slots`` with their new ``tags``."""
        if self.ram.tags is None or not len(slots):
            return
        counts = self.slot_granules[slots]
        starts = np.repeat(self.slot_base[slots], counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        self.ram.tags.stg_many(starts + (within * 16).astype(np.uint64), np.repeat(tags, counts))

    def _irg(self, exclude: np.ndarray) -> np.ndarray:
        """IRG for many objects: random tags, stepped past ``exclude | GCR_EL1.Exclude``."""
        return choose_nonexcluded_tags(self._rng.integers(0, 16, len(exclude)), exclude | self.cpu.gcr_exclude)

    def _current_tags(self, addrs: np.ndarray) -> np.ndarray:
        if self.ram.tags is None:
            return np.zeros(len(addrs), dtype=np.int64)
        return self.ram.tags.tags_of_granules(addrs).astype(np.int64)

    def allocate(self, slots: np.ndarray) -> None:
        """Allocate a fresh object (1..max granules) in each dead slot of ``slots``."""
        slots = np.unique(slots)
        slots = slots[~self.slot_live[slots]]
        if not len(slots):
            return
        self.slot_granules[slots] = self._rng.integers(1, self.max_granules + 1, len(slots))
        after = self.slot_base[slots] + (self.slot_granules[slots] * 16).astype(np.uint64)
        exclude = 1 | (1 << self._current_tags(self.slot_base[slots])) | (1 << self._current_tags(after))
        tags = self._irg(exclude)
        self._tag_objects(slots, tags)
        self.slot_ptr[slots] = self.slot_base[slots] | (tags.astype(np.uint64) << np.uint64(56))
        self.slot_live[slots] = True
        self.allocations += len(slots)

    def free(self, slots: np.ndarray) -> None:
        """Free the live objects in ``slots``: retag them so stale pointers fault."""
        slots = np.unique(slots)
        slots = slots[self.slot_live[slots]]
        if not len(slots):
            return
        old = (self.slot_ptr[slots] >> np.uint64(56)).astype(np.int64) & 0xF
        self._tag_objects(slots, self._irg(1 | (1 << old)))
        self.slot_live[slots] = False
        self.frees += len(slots)

    @property
    def live_objects(self) -> int:
        return int(self.slot_live.sum())

    # ---- one time step ------------------------------------------------------------------------
    def step(self, n: int) -> BatchResult:
        """Run ``n`` accesses (one vectorised batch) plus this step's allocations and frees."""
        rng = self._rng
        self.allocate(np.flatnonzero(~self.slot_live))
        kind = np.searchsorted(self._thresholds, rng.random(n), side="right")   # UAF..VALID
        slot = rng.integers(0, self.nslots, n)
        r = rng.integers(0, 1 << 62, n, dtype=np.int64)
        ptrs = np.empty(n, dtype=np.uint64)
        sizes = np.full(n, BUG_SIZE, dtype=np.int64)

        uaf = np.flatnonzero(kind == UAF)             # stale pointers, taken before the free
        ptrs[uaf] = self.slot_ptr[slot[uaf]] + ((r[uaf] % (self.slot_granules[slot[uaf]] * 2)) * 8).astype(np.uint64)
        self.free(slot[uaf])
        others = np.flatnonzero((kind != UAF) & ~self.slot_live[slot])
        if len(others) and not self.slot_live.any():    # every object was a victim: refill first
            self.allocate(np.arange(self.nslots))
        live = np.flatnonzero(self.slot_live)
        slot[others] = live[rng.integers(0, len(live), len(others))]      # objects freed just now

        over = np.flatnonzero(kind == OVERFLOW)       # the granule just past the object
        ptrs[over] = self.slot_ptr[slot[over]] + (self.slot_granules[slot[over]] * 16).astype(np.uint64)

        wild = np.flatnonzero(kind == WILD)           # anywhere in the heap, any tag
        ptrs[wild] = (np.uint64(self.heap_base) + ((r[wild] % (self.heap_size // 8)) * 8).astype(np.uint64)) | \
            (rng.integers(0, 16, len(wild)).astype(np.uint64) << np.uint64(56))

        valid = np.flatnonzero(kind == VALID)         # inside the object, naturally aligned
        vs = VALID_SIZES[r[valid] & 7]
        sizes[valid] = vs
        ptrs[valid] = self.slot_ptr[slot[valid]] + \
            (((r[valid] >> 3) % (self.slot_granules[slot[valid]] * 16 // vs)) * vs).astype(np.uint64)

        result = self.cpu.run_batch(ptrs, sizes, rng.random(n) < 0.5)
        self.free(slot[valid[rng.random(len(valid)) < FREE_AFTER_USE]])
        return result
