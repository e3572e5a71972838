"""The vectorised tag check: a whole batch of loads/stores in one numpy pass.

No Python loop runs over accesses. Every access's first granule is looked up at once. When no
access is longer than a granule (16 bytes, so it touches at most the next granule too), the
accesses that cross into the next granule and passed their first are checked in one more step
that mostly needs no gather: two granules share a tag byte, so the next tag is usually in the
byte just loaded, else in the byte after it (``TagMemory.next_tags_into``). Longer accesses
take the general path: for k = 1, 2, 3 the accesses that touch a (k+1)-th granule and have
not failed yet look it up. Only an access touching more than ``VECTOR_GRANULES`` granules (a
block copy) is checked on its own, still vectorised over its granules.

Faults never change later accesses' outcome (a sync fault only stops its own access, TFSR
only accumulates), so the batch gives exactly what the per-access path gives in order.

Speed: the work arrays are kept between batches and every step writes into them (``out=``),
because a fresh 64k-element int64 array costs page faults (about 2 us per 4 KiB page on this
kind of host) that would otherwise double the time of a batch; for the same reason no chained
expression builds whole-batch temporaries. Per access the check works on 1-byte values
(tags, the offset's low byte, flags) wherever it can, cast straight out of the 64-bit words.
The work arrays are shared by all vCPUs of a thread (a check never runs inside another), so
a fleet of vCPUs holds one set, sized for the largest batch seen. A result's seven fault
arrays are views of one fresh buffer: freeing several large arrays at once lets glibc give
the heap top back to the kernel, and the next batch's arrays page-fault in again (measured
for 61k faults: 950 us as seven arrays, 170 us as one buffer).
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from backend.tagcheck.errors import OutsideRamError
from backend.tagcheck.layout import GRANULE
from backend.tagcheck.pointers import (LOW56, fault_address_array, halves_array, physical_array,
                                       ptr_tags_array, tcma_match_array)
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
        if not len(sizes) or sizes.max() <= _LONGEST:        # the usual case: no copy if int64
            return sizes.astype(np.int64, copy=False)
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


def _pick_into(values, fi: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``values[fi]`` into ``out``, where a scalar stands for the same value at every position."""
    if isinstance(values, np.ndarray):
        return np.take(values, fi, out=out, mode="clip")
    out.fill(values)
    return out


def _fault_arrays(k: int) -> SimpleNamespace:
    """Fresh arrays for the fields of k faults, views of one buffer (see the module docstring)."""
    buf = np.empty(28 * k, np.uint8)
    wide = buf[:24 * k].view(np.int64)
    return SimpleNamespace(index=wide[:k], addr=wide[k:2 * k].view(np.uint64), size=wide[2 * k:],
                           kind=buf[24 * k:25 * k], ptr_tag=buf[25 * k:26 * k],
                           mem_tag=buf[26 * k:27 * k], is_store=buf[27 * k:].view(bool))


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

_WORK_ARRAYS = (
    ("off", np.int64), ("pos", np.int64), ("scratch", np.int64),   # offsets, tag-byte positions, scratch
    ("ptag", np.uint8), ("mem", np.uint8),      # pointer tags; tag of each access's first failing granule
    ("raw", np.uint8), ("low", np.uint8),       # packed tag bytes; each offset's low byte
    ("second", np.uint8), ("small", np.uint8),  # tags of the next granules; scratch
    ("fail", bool), ("crosses", bool), ("fail2", bool))   # failed; needs its 2nd granule; failed on it


def _work(n: int) -> SimpleNamespace:
    """This thread's work arrays cut to ``n`` (made anew only for a longer batch than before)."""
    ws = _workspace
    if n > getattr(ws, "cap", -1):
        ws.cap = max(n, 1024)
        ws.arrays = {name: np.empty(ws.cap, dtype) for name, dtype in _WORK_ARRAYS}
    return _head(ws.arrays, n)


def _head(arrays: dict, n: int) -> SimpleNamespace:
    return SimpleNamespace(**{name: a[:n] for name, a in arrays.items()})


class BatchChecker:
    """Checks batches against one RAM's tags, with the thread's reused work arrays."""

    def __init__(self, tags: TagMemory | None, base: int, size: int):
        self.tags, self.base, self.size = tags, base, size

    def _offsets(self, ptrs: np.ndarray, sizes, longest: int, w: SimpleNamespace) -> np.ndarray:
        """Each access's offset from RAM base (int64, in ``w.off``); OutsideRamError if one is
        not all in RAM."""
        out = w.off
        np.bitwise_and(ptrs.view(np.int64), LOW56, out=out)
        np.subtract(out, self.base, out=out)
        # Unsigned view: below base wraps to huge. Upper-half pointers land far above RAM
        # here; they take the exact (slower) address rule.
        unsigned = out.view(np.uint64)
        if longest > self.size:
            outside = True
        elif isinstance(sizes, int):
            outside = len(out) > 0 and int(unsigned.max()) > self.size - sizes
        else:
            limit = w.scratch.view(np.uint64)
            np.subtract(self.size, sizes, out=w.scratch)                # >= 0: longest <= size
            outside = bool(np.greater(unsigned, limit, out=w.fail).any())
        if outside:
            _raise_outside(ptrs, sizes, self.base, self.size)
            out[:] = physical_array(ptrs).astype(np.int64) - self.base
        return out

    def _second_granules(self, off: np.ndarray, sizes, w: SimpleNamespace) -> np.ndarray | None:
        """For accesses of at most a granule: check the next granule of those that cross into
        it and passed their first; update ``w.fail``/``w.mem``. Returns which accesses failed
        on their second granule (bool), or None when no access needed one."""
        np.bitwise_and(w.low, GRANULE - 1, out=w.small)           # offset within the granule
        if isinstance(sizes, int):
            np.greater(w.small, GRANULE - sizes, out=w.crosses)
        else:
            np.add(w.small, sizes, out=w.small, casting="unsafe")   # <= 15 + 16: fits a byte
            np.greater(w.small, GRANULE, out=w.crosses)
        np.logical_not(w.fail, out=w.fail2)
        np.logical_and(w.crosses, w.fail2, out=w.crosses)          # crosses, first granule passed
        if not w.crosses.any():
            return None
        second = self.tags.next_tags_into(off, w.low, w.raw, w.pos, w.crosses, w.second)
        np.not_equal(second, w.ptag, out=w.fail2)
        np.logical_and(w.fail2, w.crosses, out=w.fail2)
        np.logical_or(w.fail, w.fail2, out=w.fail)
        # mem = second where fail2 (copyto(where=) is 10x slower than this byte blend)
        np.bitwise_xor(w.mem, second, out=w.small)
        np.multiply(w.small, w.fail2.view(np.uint8), out=w.small)
        np.bitwise_xor(w.mem, w.small, out=w.mem)
        return w.fail2

    def _later_granules(self, off, sizes, ptag, mem, fail) -> np.ndarray:
        """The general path (some access longer than a granule): check the granules after the
        first for the accesses that have them and did not fail yet; update ``fail``/``mem``;
        return each access's first failing granule (int64)."""
        granule = np.zeros(len(off), dtype=np.int64)
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

    def check(self, ptrs, sizes, is_store, *, tcf: TCF, tcma0: bool, tcma1: bool,
              tco: bool) -> tuple[BatchResult, int]:
        """Check a batch; return its result and the TFSR bits its async faults set."""
        ptrs, sizes, is_store = as_batch(ptrs, sizes, is_store)
        n = len(ptrs)
        w = _work(n)
        longest = sizes if isinstance(sizes, int) else (int(sizes.max()) if n else 0)
        off = self._offsets(ptrs, sizes, longest, w)
        if self.tags is None or tcf == TCF.NONE or tco or n == 0:
            return BatchResult(unchecked=n), 0

        index = None          # positions of the checked accesses (None: all of them)
        if tcma0 or tcma1:
            index = np.flatnonzero(~tcma_match_array(ptrs, tcma0, tcma1))
            ptrs, off = ptrs[index], off[index]
            sizes = sizes if isinstance(sizes, int) else sizes[index]
            is_store = is_store if isinstance(is_store, bool) else is_store[index]
            w = _head(vars(w), len(index))

        ptr_tags_array(ptrs, out=w.ptag)
        np.copyto(w.low, off, casting="unsafe")                    # each offset's low byte
        self.tags.lookup_into(off, w.mem, w.pos, w.scratch, w.low, raw=w.raw)   # first granules
        np.not_equal(w.mem, w.ptag, out=w.fail)
        if longest <= GRANULE:
            granule = self._second_granules(off, sizes, w)          # None: all failed on granule 0
        else:
            granule = self._later_granules(off, sizes, w.ptag, w.mem, w.fail)

        return self._result(ptrs, sizes, is_store, tcf, w.fail, w.mem, granule, index, n)

    @staticmethod
    def _result(ptrs, sizes, is_store, tcf: TCF, fail, mem, granule, index, n: int) -> tuple[BatchResult, int]:
        """The BatchResult of the checked accesses ``ptrs`` (positions ``index`` in a batch of n;
        None: all of it) that ``fail`` with memory tags ``mem`` on granule ``granule`` (None:
        all on their first), and the TFSR bits their async faults set."""
        fi = np.flatnonzero(fail)
        f = _fault_arrays(len(fi))
        if index is None:
            np.copyto(f.index, fi)
        else:
            _pick_into(index, fi, f.index)
        _pick_into(is_store, fi, f.is_store)
        if tcf == TCF.ASYMM:                           # loads sync, stores async
            np.copyto(f.kind, f.is_store)
        else:
            f.kind.fill(ASYNC if tcf == TCF.ASYNC else SYNC)
        np.take(ptrs, fi, out=f.addr, mode="clip")     # the pointers, made FARs in place below
        ptr_tags_array(f.addr, out=f.ptr_tag)
        n_async = int(np.count_nonzero(f.kind))
        tfsr = 0
        if n_async:
            halves = halves_array(f.addr if n_async == len(fi) else f.addr[f.kind == ASYNC])
            tfsr = (1 if (halves == 0).any() else 0) | (2 if halves.any() else 0)
        fault_address_array(f.addr, None if granule is None else granule[fi], out=f.addr)
        np.take(mem, fi, out=f.mem_tag, mode="clip")
        _pick_into(sizes, fi, f.size)
        result = BatchResult(
            checked=len(ptrs), unchecked=n - len(ptrs), sync_faults=len(fi) - n_async, async_faults=n_async,
            fault_index=f.index, fault_addr=f.addr, fault_kind=f.kind, fault_ptr_tag=f.ptr_tag,
            fault_mem_tag=f.mem_tag, fault_is_store=f.is_store, fault_size=f.size)
        return result, tfsr
