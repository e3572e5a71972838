"""How MTE reads a pointer: its logical tag, its address half, TCMA, FAR, and tag stepping.

Both the per-access path (Python ints) and the batch path (numpy ``uint64`` arrays) use
these, so the bit rules live in one place.

Address model: the simulated guest maps both halves of the address space 1:1 onto physical
RAM. A lower-half pointer (bit 55 = 0) addresses ``ptr[55:0]``; an upper-half (kernel)
pointer, canonical with bits 55:48 all ones, addresses ``ptr[47:0]``. Anything else lands
outside RAM. This lets TCMA1 and TFSR.TF1 be exercised without an MMU.
"""
from __future__ import annotations

import numpy as np

TAG_SHIFT = 56
LOW56 = (1 << 56) - 1                 # clears the top byte (TBI)
LOW60 = (1 << 60) - 1                 # FAR: bits 63:60 read as 0, the tag in 59:56 stays
UPPER_FLIP = 0xFF << 48               # turns a canonical upper-half address into its linear offset
BIT55 = 1 << 55
MASK64 = (1 << 64) - 1


def ptr_tag(ptr: int) -> int:
    """The logical tag: pointer bits 59:56."""
    return (ptr >> TAG_SHIFT) & 0xF


def with_tag(ptr: int, tag: int) -> int:
    """The pointer with its logical tag replaced (QEMU address_with_allocation_tag)."""
    return (ptr & ~(0xF << TAG_SHIFT) & MASK64) | ((tag & 0xF) << TAG_SHIFT)


def half(ptr: int) -> int:
    """0 for the lower (TTBR0) half, 1 for the upper (TTBR1) half: pointer bit 55."""
    return (ptr >> 55) & 1


def physical(ptr: int) -> int:
    """The RAM address a pointer reaches (see the module docstring)."""
    va = ptr & LOW56
    return va ^ UPPER_FLIP if va & BIT55 else va


def tcma_match(ptr: int, tcma0: bool, tcma1: bool) -> bool:
    """True when TCMA makes the access unchecked: bits 59:55 all 0 (TCMA0) or all 1 (TCMA1)."""
    top = (ptr >> 55) & 0x1F
    return (tcma0 and top == 0) or (tcma1 and top == 0x1F)


def fault_address(ptr: int, granule: int) -> int:
    """FAR of a tag-check fault whose first mismatch is the access's ``granule``-th granule.

    QEMU's rule: the pointer as given when the first granule mismatches, else the 16-aligned
    base of the mismatching granule (possibly in the next page); bits 63:60 are 0 and the
    pointer tag stays in 59:56.
    """
    if granule == 0:
        return ptr & LOW60
    return (((ptr & LOW56 & ~0xF) + 16 * granule) & LOW56) | (ptr_tag(ptr) << TAG_SHIFT)


def choose_nonexcluded_tag(tag: int, offset: int, exclude: int) -> int:
    """QEMU's choose_nonexcluded_tag: step ``offset`` times to the next tag not in ``exclude``.

    With offset 0 the tag itself is kept unless excluded. All 16 excluded gives tag 0.
    """
    exclude &= 0xFFFF
    if exclude == 0xFFFF:
        return 0
    tag &= 0xF
    if offset == 0:
        while exclude & (1 << tag):
            tag = (tag + 1) & 0xF
        return tag
    for _ in range(offset):
        tag = (tag + 1) & 0xF
        while exclude & (1 << tag):
            tag = (tag + 1) & 0xF
    return tag


# ---- the same rules over numpy uint64 arrays (the batch path) --------------------------------

def ptr_tags_array(ptrs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The logical tags (bits 59:56) of uint64 pointers, as uint8 (into ``out`` if given).
    Shifting straight into bytes avoids a whole-batch uint64 temporary."""
    out = np.empty(len(ptrs), np.uint8) if out is None else out
    np.right_shift(ptrs, np.uint64(TAG_SHIFT), out=out, casting="unsafe")
    return np.bitwise_and(out, 0xF, out=out)


def halves_array(ptrs: np.ndarray) -> np.ndarray:
    """``half`` (pointer bit 55) of uint64 pointers, as uint8 0/1."""
    out = np.empty(len(ptrs), np.uint8)
    np.right_shift(ptrs, np.uint64(55), out=out, casting="unsafe")     # bits 62:55
    return np.bitwise_and(out, 1, out=out)


def physical_array(ptrs: np.ndarray) -> np.ndarray:
    va = ptrs & LOW56
    upper = (va >> 55).astype(bool)
    if upper.any():
        va = np.where(upper, va ^ UPPER_FLIP, va)
    return va


def tcma_match_array(ptrs: np.ndarray, tcma0: bool, tcma1: bool) -> np.ndarray:
    top = (ptrs >> 55) & 0x1F
    match = np.zeros(ptrs.shape, dtype=bool)
    if tcma0:
        match |= top == 0
    if tcma1:
        match |= top == 0x1F
    return match


def choose_nonexcluded_tags(tags: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """``choose_nonexcluded_tag(tag, 0, exclude)`` element-wise (IRG's rule): the tag, or the
    next one up that is not excluded; 0 where all 16 are excluded. No loop: the exclude mask
    is rotated so that bit i says whether tag + i is excluded, and the answer is tag + the
    number of trailing ones."""
    tags = np.asarray(tags).astype(np.int64) & 0xF
    exclude = np.broadcast_to(np.asarray(exclude).astype(np.int64) & 0xFFFF, tags.shape)
    rotated = ((exclude | (exclude << 16)) >> tags) & 0xFFFF
    first_free = ~rotated & (rotated + 1)              # lowest clear bit, as a power of two
    step = np.frexp(first_free.astype(np.float64))[1] - 1
    return np.where(exclude == 0xFFFF, 0, (tags + step) & 0xF).astype(np.uint8)


def fault_address_array(ptrs: np.ndarray, granule: np.ndarray | None,
                        out: np.ndarray | None = None) -> np.ndarray:
    """``fault_address`` for arrays of pointers and first-mismatch granule numbers (None: all 0),
    in whole-array steps (no subset: most faults of unaligned accesses are on a later granule);
    ``out`` may be ``ptrs``. The pointers are of accesses inside RAM (below 2^48), so stepping
    to a later granule never carries out of bit 55."""
    far = np.bitwise_and(ptrs, np.uint64(LOW60), out=out)
    if granule is None:
        return far
    step = granule.astype(np.uint64)
    low = np.minimum(step, np.uint64(1))
    low *= np.uint64(15)                 # 15 where the fault is on a later granule, else 0
    far |= low
    np.left_shift(step, np.uint64(4), out=step)
    far += step
    far -= low                           # (ptr & ~15) + 16 * granule, tag bits kept
    return far
