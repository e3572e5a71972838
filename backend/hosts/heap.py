"""The simulated guest's workload: a tagged heap with injected memory-safety bugs.

It mirrors the real bare-metal guest (backend/qemu/guest/guest.c) so simulated and real VMs
give comparable counters: each vCPU owns the heap slice [heap_base, heap_base + heap_size) at the
same place in RAM as the real guest's, cut into slots (up to 1024) that each hold one object of
1..16 granules with untagged slack behind it.

* allocate = IRG + STG over the object; free = retag the object with a fresh IRG tag. IRG
  excludes tag 0 (as the guest's GCR_EL1 does), the freed object's tag, the free tag and the
  tag of the granule just past the new object, so every use-after-free and every overflow
  mismatches (wild pointers still match 1 time in 16, as on hardware);
* ``step(n)`` is one time step: n accesses run as ONE vectorised batch through
  ``cpu.run_batch`` -- mostly valid accesses of 1, 2, 4, 8 or 16 bytes inside live objects; with
  the configured probabilities a use-after-free (8 bytes through the pointer of the slot's
  previously freed object), an overflow (8 bytes just past the object) or a wild pointer
  (anywhere in the heap, random tag). Then the objects hit by a use-after-free and about 1 in
  64 of the objects used are freed and their slots get new objects (churn) -- all tag stores
  of a step in one vectorised STG, so a step costs little more than its batch.

A sync fault stops only its access; the workload goes on (like a guest kernel that kills the
task). Everything random comes from a generator seeded with (seed, vCPU): the same seed gives
the same counters.
"""
from __future__ import annotations

import numpy as np

from backend.errors import ConfigError
from backend.hosts.workload import WorkloadConfig
from backend.qemu.guest_abi import HEAP_BASE, RAM_BASE
from backend.tagcheck import BatchResult, GuestRam, TagCheckCpu
from backend.tagcheck.pointers import TAG_SHIFT, choose_nonexcluded_tags, ptr_tags_array

HEAP_OFFSET = HEAP_BASE - RAM_BASE     # where the real guest's heaps start, from the RAM base
MAX_SLOTS = 1024
MAX_OBJECT_GRANULES = 16
VALID_SHIFTS = np.array([0, 1, 2, 3, 3, 3, 4, 4])   # log2 of the real guest's mix of access sizes
BUG_SHIFT = 3                           # use-after-free, overflow and wild accesses are 8 bytes
UAF, OVERFLOW, WILD, VALID = 0, 1, 2, 3
_TAG = np.uint64(TAG_SHIFT)


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
        # the live object of each slot (tagged pointer, granules) and the one freed before it
        self.slot_ptr = self.slot_base.copy()
        self.slot_granules = np.zeros(self.nslots, dtype=np.int64)
        self.stale_ptr = self.slot_base.copy()
        self.stale_granules = np.zeros(self.nslots, dtype=np.int64)
        self.allocations = self.frees = 0
        everything = np.arange(self.nslots)
        self.recycle(everything)          # the first objects (nothing to free yet) ...
        self.recycle(everything)          # ... and a freed one behind each, for use-after-free

    def export_state(self) -> dict:
        """Everything but the vCPU and RAM it runs on (picklable: the heap moves between processes
        and hosts with its slots, its objects' tags and its seeded generator)."""
        return {k: v for k, v in vars(self).items() if k not in ("cpu", "ram")}

    @classmethod
    def from_state(cls, cpu: TagCheckCpu, ram: GuestRam, state: dict) -> "TaggedHeapWorkload":
        """The heap ``export_state`` described, now driving ``cpu`` over ``ram``."""
        heap = cls.__new__(cls)
        vars(heap).update(state)
        heap.cpu, heap.ram = cpu, ram
        return heap

    @property
    def live_objects(self) -> int:
        return self.nslots

    # ---- heap management --------------------------------------------------------------------
    def _irg(self, exclude: np.ndarray) -> np.ndarray:
        """IRG for many objects: random tags, stepped past ``exclude | GCR_EL1.Exclude``."""
        tags = choose_nonexcluded_tags(self._rng.integers(0, 16, len(exclude)), exclude | self.cpu.gcr_exclude)
        return tags.astype(np.int64)

    def _memory_tags(self, addrs: np.ndarray) -> np.ndarray:
        if self.ram.tags is None:
            return np.zeros(len(addrs), dtype=np.int64)
        return self.ram.tags.tags_of_granules(addrs).astype(np.int64)

    def recycle(self, slots: np.ndarray) -> None:
        """Free the object in each of ``slots`` (retag it) and allocate a new one there (IRG +
        STG over 1..max granules), with one vectorised STG for all of them."""
        slots = np.unique(slots)
        if not len(slots):
            return
        old_g = self.slot_granules[slots]
        old_tag = ptr_tags_array(self.slot_ptr[slots]).astype(np.int64)
        free_tag = self._irg(1 | (1 << old_tag))
        new_g = self._rng.integers(1, self.max_granules + 1, len(slots))
        after = self.slot_base[slots] + (new_g * 16).astype(np.uint64)
        after_tag = np.where(new_g < old_g, free_tag, self._memory_tags(after))
        new_tag = self._irg(1 | (1 << old_tag) | (1 << free_tag) | (1 << after_tag))
        if self.ram.tags is not None:
            # granule k of the slot: the new object's tag below new_g, the free tag up to old_g
            count = np.maximum(old_g, new_g)
            k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
            tags = np.where(k < np.repeat(new_g, count), np.repeat(new_tag, count), np.repeat(free_tag, count))
            self.ram.tags.stg_many(np.repeat(self.slot_base[slots], count) + (k * 16).astype(np.uint64), tags)
        freed = old_g > 0
        self.stale_ptr[slots[freed]] = self.slot_ptr[slots[freed]]
        self.stale_granules[slots[freed]] = old_g[freed]
        self.slot_ptr[slots] = self.slot_base[slots] | (new_tag.astype(np.uint64) << _TAG)
        self.slot_granules[slots] = new_g
        self.frees += int(freed.sum())
        self.allocations += len(slots)

    # ---- one time step ------------------------------------------------------------------------
    def step(self, n: int) -> BatchResult:
        """Run ``n`` accesses (one vectorised batch), then this step's frees and allocations."""
        rng = self._rng
        bits = rng.integers(0, 1 << 62, n, dtype=np.int64)     # each access's dice, in bit fields
        slot = bits % self.nslots
        t_uaf, t_over, t_wild = self._thresholds
        if t_wild > 0:                                          # which bug, if any (UAF..VALID)
            u = rng.random(n)
            kind = VALID - (u < t_wild).view(np.int8) - (u < t_over).view(np.int8) - (u < t_uaf).view(np.int8)
            valid, uaf, over = kind == VALID, kind == UAF, kind == OVERFLOW
        else:
            valid, uaf, over = np.ones(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        # valid accesses: a naturally aligned 1..16 bytes; bugs: 8 bytes
        shift = np.where(valid, VALID_SHIFTS[(bits >> 41) & 7], BUG_SHIFT)
        if uaf.any():                                 # through the slot's previously freed object
            base = np.where(uaf, self.stale_ptr[slot], self.slot_ptr[slot])
            granules = np.where(uaf, self.stale_granules[slot], self.slot_granules[slot])
        else:
            base, granules = self.slot_ptr[slot], self.slot_granules[slot]
        # a random place inside the object (place = (rand32 * count) >> 32, no division) ...
        places = (granules << 4) >> shift
        offset = ((((bits >> 8) & 0xFFFFFFFF) * places) >> 32) << shift
        if over.any():                                # ... or, for an overflow, just past its end
            offset = np.where(over, granules << 4, offset)
        ptrs = base + offset.astype(np.uint64)
        if t_wild > t_over:
            wild = np.flatnonzero(kind == WILD)       # anywhere in the heap, any tag
            ptrs[wild] = (np.uint64(self.heap_base) + ((bits[wild] >> 8) % (self.heap_size // 8) * 8).astype(np.uint64)) \
                | (((bits[wild] >> 56) & 0xF).astype(np.uint64) << _TAG)
        result = self.cpu.run_batch(ptrs, np.left_shift(1, shift), ((bits >> 40) & 1).astype(bool))
        # churn: objects hit by a use-after-free and ~1 in 64 of those used are freed and replaced
        self.recycle(slot[uaf | (valid & (((bits >> 44) & 63) == 0))])
        return result
