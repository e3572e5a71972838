"""One vCPU's MTE state (TCF, TCMA0/1, PSTATE.TCO, GCR_EL1.Exclude, TFSR) and its checks.

``load``/``store`` check one access in plain Python; ``run_batch`` checks thousands at once
(backend.tagcheck.batch). Both follow the same rules and counting (backend.tagcheck.results):

* every granule the access touches, ascending, is compared with the pointer tag (59:56);
* SYNC: the first mismatch stops the access, FAR = the pointer as given if the first
  granule mismatched, else the 16-aligned base of the mismatching granule;
* ASYNC: the access is performed and TFSR.TF0 (pointer bit 55 = 0) or TF1 (bit 55 = 1) is
  set; ASYMM: loads behave as SYNC, stores as ASYNC;
* TCF NONE, PSTATE.TCO = 1, a TCMA match, or a VM without MTE: unchecked.
"""
from __future__ import annotations

import random

import numpy as np

from backend.tagcheck.batch import BatchChecker
from backend.tagcheck.pointers import (MASK64, choose_nonexcluded_tag, fault_address, half, physical,
                                       ptr_tag, tcma_match, with_tag)
from backend.tagcheck.ram import GuestRam
from backend.tagcheck.results import BatchResult, FaultRecord, VcpuCounters
from backend.tagcheck.tcf import TCF

_SMALL_ACCESS_GRANULES = 64     # larger accesses look their granules up vectorised


class TagCheckCpu:
    def __init__(self, ram: GuestRam, index: int = 0, *, tcf=TCF.SYNC, tcma0: bool = False,
                 tcma1: bool = False, tco: bool = False, gcr_exclude: int = 0, seed: int | None = None):
        self.ram = ram
        self.index = index
        self.tcf = tcf
        self.tcma0 = tcma0
        self.tcma1 = tcma1
        self.tco = tco
        self.gcr_exclude = gcr_exclude
        self.tfsr = 0                 # bit 0: TF0, bit 1: TF1 (sticky until software clears it)
        self.counters = VcpuCounters()
        self._rng = random.Random(seed)
        self._checker = BatchChecker(ram.tags, ram.base, ram.size)

    @property
    def tcf(self) -> TCF:
        return self._tcf

    @tcf.setter
    def tcf(self, value) -> None:
        self._tcf = TCF.parse(value)

    # ---- tag arithmetic (registers only, never checked) ----------------------------------
    def irg(self, ptr: int, exclude: int = 0) -> int:
        """IRG: ``ptr`` with a random tag not in ``exclude | GCR_EL1.Exclude`` (all excluded: 0)."""
        excluded = (exclude | self.gcr_exclude) & 0xFFFF
        tag = 0 if excluded == 0xFFFF else choose_nonexcluded_tag(self._rng.randrange(16), 0, excluded)
        return with_tag(ptr, tag)

    def addg(self, ptr: int, offset: int, tag_offset: int) -> int:
        """ADDG: ``ptr + offset`` with the tag stepped ``tag_offset`` times over non-excluded tags."""
        return self._step(ptr, offset, tag_offset)

    def subg(self, ptr: int, offset: int, tag_offset: int) -> int:
        """SUBG: ``ptr - offset``; the tag steps forward like ADDG's (as in the architecture)."""
        return self._step(ptr, -offset, tag_offset)

    def _step(self, ptr: int, offset: int, tag_offset: int) -> int:
        if not 0 <= tag_offset <= 15:
            raise ValueError(f"tag offset {tag_offset} is not 0..15")
        tag = choose_nonexcluded_tag(ptr_tag(ptr), tag_offset, self.gcr_exclude)
        return with_tag((ptr + offset) & MASK64, tag)

    # ---- checked accesses ----------------------------------------------------------------
    def _fault_kind(self, is_store: bool) -> str | None:
        """How a mismatch would be reported, or None if accesses of this kind are unchecked."""
        if self.ram.tags is None or self.tco or self._tcf == TCF.NONE:
            return None
        if self._tcf == TCF.SYNC or (self._tcf == TCF.ASYMM and not is_store):
            return "sync"
        return "async"

    def _first_mismatch(self, off: int, size: int, ptag: int) -> tuple[int, int] | None:
        tags = self.ram.tags
        first, last = off >> 4, (off + size - 1) >> 4
        if last - first < _SMALL_ACCESS_GRANULES:
            for k in range(last - first + 1):
                mem = tags.tag_at((first + k) << 4)
                if mem != ptag:
                    return k, mem
            return None
        mem = tags.lookup(np.arange(first, last + 1, dtype=np.uint64) << np.uint64(4))
        bad = np.flatnonzero(mem != ptag)
        return (int(bad[0]), int(mem[bad[0]])) if len(bad) else None

    def _access(self, ptr: int, size: int, is_store: bool) -> FaultRecord | None:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"access size {size!r} is not a whole number >= 1")
        ptr, size = int(ptr), int(size)
        off = self.ram.check_range(physical(ptr), size)
        kind = self._fault_kind(is_store)
        if kind is None or tcma_match(ptr, self.tcma0, self.tcma1):
            self.counters.unchecked += 1
            return None
        self.counters.checked += 1
        ptag = ptr_tag(ptr)
        found = self._first_mismatch(off, size, ptag)
        if found is None:
            return None
        granule, mem = found
        fault = FaultRecord(index=-1, kind=kind, addr=fault_address(ptr, granule), ptr_tag=ptag, mem_tag=mem,
                            access="store" if is_store else "load", size=size)
        if kind == "sync":
            self.counters.sync_faults += 1
        else:
            self.counters.async_faults += 1
            self.tfsr |= 1 << half(ptr)
        self.counters.last_fault = fault
        return fault

    def load(self, ptr: int, size: int) -> FaultRecord | None:
        """A checked load; returns its fault (sync or async) or None. OutsideRamError if not in RAM."""
        return self._access(ptr, size, False)

    def store(self, ptr: int, size: int) -> FaultRecord | None:
        """A checked store; returns its fault (sync or async) or None. OutsideRamError if not in RAM."""
        return self._access(ptr, size, True)

    def run_batch(self, ptrs, sizes, is_store) -> BatchResult:
        """Check a batch of accesses in one vectorised pass and add it to the counters.

        ``ptrs`` uint64, ``sizes`` (>= 1) and ``is_store`` arrays or scalars. A bad batch
        (an access outside RAM, a size < 1) raises before anything is counted.
        """
        result, tfsr = self._checker.check(ptrs, sizes, is_store, tcf=self._tcf, tcma0=self.tcma0,
                                           tcma1=self.tcma1, tco=self.tco)
        self.tfsr |= tfsr
        result.add_to(self.counters)
        return result
