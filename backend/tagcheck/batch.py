"""The vectorised tag check: a whole batch of loads/stores in one numpy pass.

No Python loop runs over accesses. Every access's first granule is looked up at once; then,
for k = 1, 2, 3, the accesses that touch a (k+1)-th granule and have not failed yet look it
up (an 8- or 16-byte access touches at most 2 granules, so this is one extra pass at most).
Only an access touching more than ``VECTOR_GRANULES`` granules (a block copy) is checked
on its own, still vectorised over its granules.

Faults never change later accesses' outcome (a sync fault only stops its own access, TFSR
only accumulates), so the batch gives exactly what the per-access path gives in order.

Speed: the work arrays are kept between batches and every step writes into them, because
allocating fresh 64k-element arrays costs page faults that would otherwise double the time
of a batch. They are shared by all vCPUs of a thread (a check never runs inside another),
so a fleet of vCPUs holds one set, sized for the largest batch seen.
"""
from __future__ import annotations

import threading

import numpy as np

from backend.tagcheck.errors import OutsideRamError
from backend.tagcheck.pointers import (LOW56, LOW60, fault_address_array, physical_array,
                                       tcma_match_array)
from backend.tagcheck.results import ASYNC, SYNC, BatchResult
from backend.tagcheck.tags import TagMemory
from backend.tagcheck.tcf import TCF

VECTOR_GRANULES = 4          # accesses touching more granules are checked one at a time
_HUGE_STEP = 1 << 16         # granules looked up at once for a block access


_LONGEST = 1 << 62         # any size beyond this is longer than every RAM: clamped to it


def _int64_sizes(sizes: np.ndarray) -> np.ndarray:
    """Sizes as int64; sizes beyond int64 (they arrive as uint64, float or object arrays) are
    clamped to _LONGEST, so they give OutsideRamError rather than wrap around."""
    if sizes.dtype.kind == "f" and not np.array_equal(sizes, np.floor(sizes)):
        raise ValueError("access sizes must be whole numbers of bytes")
    if sizes.dtype.kind in "iub":
        big = sizes > _LONGEST
        out = sizes.astype(np.int64)
        out[big] = _LONGEST
        return out
    return np.minimum(sizes.astype(np.float64), float(_LONGEST)).astype(np.int64)


def as_batch(ptrs, sizes, is_store) -> tuple[np.ndarray, np.ndarray | int, np.ndarray | bool]:
    """Normalise a batch: uint64 pointers, int64 sizes (>= 1) and bool is_store, where a
    scalar size or is_store (one for all accesses) stays a Python scalar."""
    ptrs = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    n = len(ptrs)
    if np.ndim(sizes) == 0:
        sizes = int(sizes)
        if sizes < 1:
            raise ValueError(f"access size {sizes} is not >= 1")
    else:
        sizes = _int64_sizes(np.asarray(sizes).reshape(-1))
        if len(sizes) != n:
            raise ValueError(f"{len(sizes)} sizes for {n} pointers")
        if n and sizes.min() < 1:
            i = int(np.argmax(sizes < 1))
            raise ValueError(f"access {i}: size {int(sizes[i])} is not >= 1")
    if np.ndim(is_store) == 0:
        is_store = bool(is_store)
    else:
        is_store = np.asarray(is_store, dtype=bool).reshape(-1)
        if len(is_store) != n:
            raise ValueError(f"{len(is_store)} is_store flags for {n} pointers")
    return ptrs, sizes, is_store


def _pick(values, fi: np.ndarray, dtype) -> np.ndarray:
    """``values[fi]``, where a scalar stands for the same value at every position."""
    if isinstance(values, np.ndarray):
        return values[fi].astype(dtype, copy=False)
    return np.full(len(fi), values, dtype=dtype)


def _raise_outside(ptrs: np.ndarray, sizes, base: int, size: int) -> None:
    """Find the first access not entirely in RAM (with the exact address rule) and raise."""
    off = physical_array(ptrs).astype(np.int64) - base      # below base: negative
    bad = (off < 0) | (off > size - np.asarray(sizes))
    if bad.any():
        i = int(np.argmax(bad))
        n = sizes if isinstance(sizes, int) else int(sizes[i])
        raise OutsideRamError(f"access {i}: address {int(off[i]) + base:#x} (+{n} bytes) is outside guest RAM "
                              f"[{base:#x}, {base + size:#x})")


def _first_mismatch_huge(tags: TagMemory, off: int, count: int, ptag: int) -> tuple[int, int] | None:
    """(granule number, memory tag) of the first mismatch of a block access, or None."""
    first = off >> 4
    for start in range(0, count, _HUGE_STEP):
        granules = np.arange(first + start, first + min(count, start + _HUGE_STEP), dtype=np.int64)
        mem = tags.lookup(granules << 4)
        bad = np.flatnonzero(mem != ptag)
        if len(bad):
            return start + int(bad[0]), int(mem[bad[0]])
    return None


_workspace = threading.local()     # this thread's work arrays (see the module docstring)


class BatchChecker:
    """Checks batches against one RAM's tags, with the thread's reused work arrays."""

    def __init__(self, tags: TagMemory | None, base: int, size: int):
        self.tags, self.base, self.size = tags, base, size

    @staticmethod
    def _work(n: int):
        ws = _workspace
        if n > getattr(ws, "cap", -1):
            ws.cap = max(n, 1024)
            ws.i64 = [np.empty(ws.cap, dtype=np.int64) for _ in range(3)]
            ws.u8 = [np.empty(ws.cap, dtype=np.uint8) for _ in range(3)]
            ws.b = [np.empty(ws.cap, dtype=bool) for _ in range(2)]
        return [a[:n] for a in ws.i64], [a[:n] for a in ws.u8], [a[:n] for a in ws.b]

    def _later_granules(self, off, sizes, ptag, mem, fail, more, scratch) -> np.ndarray:
        """Check the granules after the first for the accesses that have them (``more``) and
        did not fail yet; update ``fail``/``mem``; return each access's first failing granule."""
        granule = np.zeros(len(off), dtype=np.int64)
        if isinstance(sizes, int) and sizes <= 16:    # at most one more granule: the next one
            np.logical_and(more, ~fail, out=more)
            sel = np.flatnonzero(more)
            if len(sel):
                nxt = (off[sel] | 15) + 1
                m = self.tags.lookup_into(nxt, np.empty(len(sel), np.uint8), scratch[:len(sel)],
                                          np.empty_like(nxt))
                hit = sel[m != ptag[sel]]
                fail[hit] = True
                granule[hit] = 1
                mem[hit] = m[m != ptag[sel]]
            return granule
        extra = ((off + (np.asarray(sizes) - 1)) >> 4) - (off >> 4)
        huge = extra >= VECTOR_GRANULES
        for k in range(1, VECTOR_GRANULES):
            sel = np.flatnonzero((extra >= k) & ~fail & ~huge)
            if not len(sel):
                break
            m = self.tags.lookup(((off[sel] >> 4) + k) << 4)
            bad = m != ptag[sel]
            hit = sel[bad]
            fail[hit] = True
            granule[hit] = k
            mem[hit] = m[bad]
        for i in np.flatnonzero(huge & ~fail):
            found = _first_mismatch_huge(self.tags, int(off[i]), int(extra[i]) + 1, int(ptag[i]))
            if found:
                fail[i] = True
                granule[i], mem[i] = found
        return granule

    def offsets(self, ptrs: np.ndarray, sizes, out: np.ndarray) -> np.ndarray:
        """Each access's offset from RAM base (int64); OutsideRamError if one is not all in RAM."""
        np.bitwise_and(ptrs.view(np.int64), LOW56, out=out)
        np.subtract(out, self.base, out=out)
        # Unsigned view: below base wraps to huge. Upper-half pointers land far above RAM
        # here; they take the exact (slower) address rule.
        longest = sizes if isinstance(sizes, int) else (int(sizes.max()) if len(sizes) else 0)
        if longest > self.size or \
                (out.view(np.uint64) > np.uint64(self.size) - np.asarray(sizes, dtype=np.uint64)).any():
            _raise_outside(ptrs, sizes, self.base, self.size)
            out[:] = physical_array(ptrs).astype(np.int64) - self.base
        return out

    def check(self, ptrs, sizes, is_store, *, tcf: TCF, tcma0: bool, tcma1: bool,
              tco: bool) -> tuple[BatchResult, int]:
        """Check a batch; return its result and the TFSR bits its async faults set."""
        ptrs, sizes, is_store = as_batch(ptrs, sizes, is_store)
        n = len(ptrs)
        (off, s1, s2), (ptag, mem, low), (fail, more) = self._work(n)
        self.offsets(ptrs, sizes, off)
        if self.tags is None or tcf == TCF.NONE or tco or n == 0:
            return BatchResult(unchecked=n), 0

        index = None          # positions of the checked accesses (None: all of them)
        if tcma0 or tcma1:
            index = np.flatnonzero(~tcma_match_array(ptrs, tcma0, tcma1))
            ptrs, off = ptrs[index], off[index]
            sizes = sizes if isinstance(sizes, int) else sizes[index]
            is_store = is_store if isinstance(is_store, bool) else is_store[index]
            s1, s2, ptag, mem, low, fail, more = (a[:len(index)] for a in (s1, s2, ptag, mem, low, fail, more))
        checked = len(ptrs)

        np.bitwise_and(ptrs.view(np.uint8)[7::8], 0xF, out=ptag)   # pointer tag: top byte's low nibble
        np.copyto(low, off.view(np.uint8)[::8])                 # each offset's low byte (little endian)
        self.tags.lookup_into(off, mem, s1, s2, low)            # first granule of every access
        np.not_equal(mem, ptag, out=fail)
        granule = None                                          # first mismatching granule (None: all 0)
        if isinstance(sizes, int) and sizes <= 16:
            # One size for all: an access crosses into a 2nd granule iff (off & 15) + size > 16.
            np.bitwise_and(low, 15, out=low)
            np.greater(low, 16 - sizes, out=more)
        else:
            # Extra granules touched: ((off + size - 1) >> 4) - (off >> 4)
            np.add(off, np.asarray(sizes) - 1, out=s1)
            np.right_shift(s1, 4, out=s1)
            np.right_shift(off, 4, out=s2)
            np.subtract(s1, s2, out=s1)
            np.greater(s1, 0, out=more)
        if more.any():
            granule = self._later_granules(off, sizes, ptag, mem, fail, more, s1)
        fi = np.flatnonzero(fail)
        if tcf == TCF.SYNC:
            kind = np.full(len(fi), SYNC, dtype=np.uint8)
        elif tcf == TCF.ASYNC:
            kind = np.full(len(fi), ASYNC, dtype=np.uint8)
        else:                                          # ASYMM: loads sync, stores async
            kind = _pick(is_store, fi, np.uint8)
        fptrs = ptrs[fi]
        n_async = int(np.count_nonzero(kind))
        tfsr = 0
        if n_async:
            halves = (fptrs[kind == ASYNC] >> np.uint64(55)) & np.uint64(1)
            tfsr = (1 if (halves == 0).any() else 0) | (2 if halves.any() else 0)
        if granule is None:                            # all failed on their first granule: FAR = ptr
            fault_addr = fptrs & np.uint64(LOW60)
        else:
            fault_addr = fault_address_array(fptrs, granule[fi])
        result = BatchResult(
            checked=checked, unchecked=n - checked, sync_faults=len(fi) - n_async, async_faults=n_async,
            fault_index=fi if index is None else index[fi], fault_addr=fault_addr,
            fault_kind=kind, fault_ptr_tag=ptag[fi], fault_mem_tag=mem[fi],
            fault_is_store=_pick(is_store, fi, bool), fault_size=_pick(sizes, fi, np.int64))
        return result, tfsr
