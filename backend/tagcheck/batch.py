"""The vectorised tag check: a whole batch of loads/stores in one numpy pass.

No Python loop runs over accesses. Every access's first granule is looked up at once; then,
for k = 1, 2, 3, the accesses that touch a (k+1)-th granule and have not failed yet look it
up (an 8- or 16-byte access touches at most 2 granules, so this is one extra pass at most).
Only an access touching more than ``VECTOR_GRANULES`` granules (a block copy) is checked
on its own, still vectorised over its granules.

Faults never change later accesses' outcome (a sync fault only stops its own access, TFSR
only accumulates), so the batch gives exactly what the per-access path gives in order.
"""
from __future__ import annotations

import numpy as np

from backend.tagcheck.errors import OutsideRamError
from backend.tagcheck.pointers import (fault_address_array, physical_array, ptr_tags_array,
                                       tcma_match_array)
from backend.tagcheck.results import ASYNC, SYNC, BatchResult
from backend.tagcheck.tags import TagMemory
from backend.tagcheck.tcf import TCF

VECTOR_GRANULES = 4          # accesses touching more granules are checked one at a time
_HUGE_STEP = 1 << 16         # granules looked up at once for a block access


def as_batch(ptrs, sizes, is_store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise a batch: uint64 pointers, int64 sizes (>= 1), bool is_store (scalars broadcast)."""
    ptrs = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    n = len(ptrs)
    sizes = np.broadcast_to(np.asarray(sizes), (n,)).astype(np.int64)
    if n and sizes.min() < 1:
        i = int(np.argmax(sizes < 1))
        raise ValueError(f"access {i}: size {int(sizes[i])} is not >= 1")
    is_store = np.broadcast_to(np.asarray(is_store, dtype=bool), (n,))
    return ptrs, sizes, is_store


def ram_offsets(ptrs: np.ndarray, sizes: np.ndarray, base: int, size: int) -> np.ndarray:
    """Offsets from RAM base of each access; OutsideRamError (naming the first bad one) if any
    access is not entirely in RAM."""
    off = physical_array(ptrs) - np.uint64(base)
    bad = (off >= size) | (sizes.astype(np.uint64) > np.uint64(size) - off)
    if bad.any():
        i = int(np.argmax(bad))
        addr = int(physical_array(ptrs[i:i + 1])[0])
        raise OutsideRamError(f"access {i}: address {addr:#x} (+{int(sizes[i])} bytes) is outside guest RAM "
                              f"[{base:#x}, {base + size:#x})")
    return off


def _first_mismatch_huge(tags: TagMemory, off: int, count: int, ptag: int) -> tuple[int, int] | None:
    """(granule number, memory tag) of the first mismatch of a block access, or None."""
    first = off >> 4
    for start in range(0, count, _HUGE_STEP):
        granules = np.arange(first + start, first + min(count, start + _HUGE_STEP), dtype=np.uint64)
        mem = tags.lookup(granules << np.uint64(4))
        bad = np.flatnonzero(mem != ptag)
        if len(bad):
            return start + int(bad[0]), int(mem[bad[0]])
    return None


def check_batch(tags: TagMemory | None, base: int, size: int, *, tcf: TCF, tcma0: bool, tcma1: bool,
                tco: bool, ptrs, sizes, is_store) -> tuple[BatchResult, int]:
    """Check a batch; return its result and the TFSR bits its async faults set."""
    ptrs, sizes, is_store = as_batch(ptrs, sizes, is_store)
    n = len(ptrs)
    off = ram_offsets(ptrs, sizes, base, size)
    if tags is None or tcf == TCF.NONE or tco or n == 0:
        return BatchResult(unchecked=n), 0

    index = None          # positions of the checked accesses (None: all of them)
    if tcma0 or tcma1:
        index = np.flatnonzero(~tcma_match_array(ptrs, tcma0, tcma1))
        ptrs, sizes, is_store, off = ptrs[index], sizes[index], is_store[index], off[index]
    checked = len(ptrs)

    ptag = ptr_tags_array(ptrs)
    mem = tags.lookup(off)                         # first granule of every access
    fail = mem != ptag
    granule = np.zeros(checked, dtype=np.int64)    # first mismatching granule, where fail
    ngran = ((off + (sizes - 1).astype(np.uint64)) >> np.uint64(4)) - (off >> np.uint64(4)) + np.uint64(1)
    most = int(ngran.max()) if checked else 1
    if most > 1:
        huge = ngran > VECTOR_GRANULES
        for k in range(1, min(most, VECTOR_GRANULES)):
            sel = np.flatnonzero((ngran > k) & ~fail & ~huge)
            if not len(sel):
                break
            m = tags.lookup(((off[sel] >> np.uint64(4)) + np.uint64(k)) << np.uint64(4))
            bad = m != ptag[sel]
            hit = sel[bad]
            fail[hit] = True
            granule[hit] = k
            mem[hit] = m[bad]
        for i in np.flatnonzero(huge & ~fail):
            found = _first_mismatch_huge(tags, int(off[i]), int(ngran[i]), int(ptag[i]))
            if found:
                fail[i] = True
                granule[i], mem[i] = found

    fi = np.flatnonzero(fail)
    if tcf == TCF.SYNC:
        kind = np.full(len(fi), SYNC, dtype=np.uint8)
    elif tcf == TCF.ASYNC:
        kind = np.full(len(fi), ASYNC, dtype=np.uint8)
    else:                                          # ASYMM: loads sync, stores async
        kind = np.where(is_store[fi], ASYNC, SYNC).astype(np.uint8)
    fptrs = ptrs[fi]
    n_async = int(kind.sum())
    tfsr = 0
    if n_async:
        halves = (fptrs[kind == ASYNC] >> np.uint64(55)) & np.uint64(1)
        tfsr = (1 if (halves == 0).any() else 0) | (2 if halves.any() else 0)
    result = BatchResult(
        checked=checked, unchecked=n - checked, sync_faults=len(fi) - n_async, async_faults=n_async,
        fault_index=fi if index is None else index[fi], fault_addr=fault_address_array(fptrs, granule[fi]),
        fault_kind=kind, fault_ptr_tag=ptag[fi], fault_mem_tag=mem[fi].astype(np.uint8),
        fault_is_store=np.array(is_store[fi], dtype=bool), fault_size=sizes[fi])
    return result, tfsr
