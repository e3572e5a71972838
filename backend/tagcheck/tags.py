"""Sparse allocation-tag storage: 4 bits per 16-byte granule, two tags per byte, per page.

Layout (chosen so that a batch lookup is two or three array gathers, no dict):

* ``_blocks`` is a pool of 128-byte blocks, one per tagged page, in QEMU's packing (the
  granule with address bit 4 = 0 in the low nibble). Block 0 is all zeros and shared by
  every page never tagged, so untouched pages read tag 0 (as KVM guarantees) and cost nothing.
* ``_table`` holds rows of 512 block numbers, one row per 2 MiB chunk of RAM that has a
  tagged page; row 0 is all zeros (points at block 0) and shared by untouched chunks.
* ``_dir`` maps each 2 MiB chunk of RAM to its row: 8 bytes per 2 MiB, so a 64 GiB VM needs
  256 KiB of index and is created in milliseconds. RAM up to 1 GiB gets a row for every chunk
  up front (a dense index, at most 2 MiB), so its lookups skip the ``_dir`` gather.

Writing tag 0 to a page that was never tagged allocates nothing (it already reads 0).
``bytes_used`` counts every array this object holds (pool and index capacity included).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from backend.tagcheck.errors import TagAlignmentError
from backend.tagcheck.layout import (GRANULE, GRANULES_PER_PAGE, PAGE, TAG_BYTES_PER_PAGE,
                                     check_range, validate_region)

CHUNK_PAGES = 512     # pages per index row (2 MiB of RAM)
DENSE_INDEX_CHUNKS = 512   # RAM up to 1 GiB: index rows for every chunk up front (<= 2 MiB)
_PAGE_SHIFT = 12
_CHUNK_SHIFT = 9


def _check_tag(tag: int) -> int:
    if not isinstance(tag, (int, np.integer)) or isinstance(tag, bool) or not 0 <= tag <= 15:
        raise ValueError(f"allocation tag {tag!r} is not an integer 0..15")
    return int(tag)


def _grown(arr: np.ndarray, needed: int, unit: int) -> np.ndarray:
    """``arr`` with room for at least ``needed`` units of ``unit`` elements (grows by 1/8)."""
    have = len(arr) // unit
    if needed <= have:
        return arr
    cap = max(needed, have + have // 8, 16)
    new = np.zeros(cap * unit, dtype=arr.dtype)
    new[:len(arr)] = arr
    return new


class TagMemory:
    """The allocation tags of one VM's RAM region [base, base+size)."""

    def __init__(self, base: int, size: int):
        validate_region(base, size)
        self._geometry(base, size)
        n_chunks = self._n_chunks
        # Up to DENSE_INDEX_CHUNKS every chunk gets its row now (chunk c -> row c + 1), which
        # saves the lookup one gather; larger VMs get rows as their chunks are tagged.
        self._dir = self._array("_dir", n_chunks, np.int64)
        if self._dense:
            self._dir[:] = np.arange(1, n_chunks + 1, dtype=np.int64)
        self._rows = n_chunks + 1 if self._dense else 1
        self._table = self._array("_table", self._rows * CHUNK_PAGES, np.int64)   # row 0: the untouched chunk
        self._row_used = self._array("_row_used", n_chunks if self._dense else 0, bool)   # dense rows written
        self._blocks = self._array("_blocks", TAG_BYTES_PER_PAGE, np.uint8)   # block 0: all tags 0
        self._n_blocks = 1

    def _geometry(self, base: int, size: int) -> None:
        """The region and the shape of its index (no arrays yet)."""
        self.base = base
        self.size = size
        self.n_pages = size // PAGE
        self._n_chunks = -(-self.n_pages // CHUNK_PAGES)
        self._dense = self._n_chunks <= DENSE_INDEX_CHUNKS

    @property
    def _dense_table(self) -> np.ndarray:
        """Dense index: page p's block number is at [p] (the rows after row 0)."""
        return self._table[CHUNK_PAGES:]

    # ---- storage (overridden by a TagMemory in shared memory: backend.hosts.simshared) ------
    def _array(self, name: str, length: int, dtype) -> np.ndarray:
        """A zeroed array for the index or the block pool (``name`` is the attribute)."""
        return np.zeros(length, dtype=dtype)

    def _grow(self, name: str, needed: int, unit: int) -> None:
        """Make the array attribute ``name`` hold at least ``needed`` units of ``unit`` elements."""
        setattr(self, name, _grown(getattr(self, name), needed, unit))

    # ---- accounting ----------------------------------------------------------------------
    @property
    def tagged_pages(self) -> int:
        return self._n_blocks - 1

    @property
    def bytes_used(self) -> int:
        """Bytes of memory these tags occupy. The dense index is allocated zeroed (calloc: the
        kernel maps its 4 KiB rows on first write), so only rows that hold a tagged page count."""
        table = self._table.nbytes
        if self._dense:
            table = (1 + int(np.count_nonzero(self._row_used))) * CHUNK_PAGES * self._table.itemsize
        return self._dir.nbytes + table + self._blocks.nbytes

    def pages(self) -> Iterator[int]:
        """Addresses of the pages that hold tags, ascending (what a migration must copy)."""
        for chunk in np.flatnonzero(self._dir):
            row = self._table[self._dir[chunk] * CHUNK_PAGES:(self._dir[chunk] + 1) * CHUNK_PAGES]
            for p in np.flatnonzero(row):
                yield self.base + (int(chunk) * CHUNK_PAGES + int(p)) * PAGE

    # ---- page -> block ---------------------------------------------------------------------
    def _slots(self, pages: np.ndarray) -> np.ndarray:
        """Positions in ``_table`` of page numbers' block numbers (through each chunk's row)."""
        return self._dir[pages >> _CHUNK_SHIFT] * CHUNK_PAGES + (pages & (CHUNK_PAGES - 1))

    def _page_blocks(self, pages: np.ndarray) -> np.ndarray:
        """Block numbers of page numbers (0 = never tagged)."""
        return self._table[self._slots(pages)]

    def _allocate(self, pages: np.ndarray) -> np.ndarray:
        """Block numbers of page numbers, giving a fresh zero block to pages that have none."""
        pages = np.asarray(pages, dtype=np.int64)
        if not self._dense:                       # dense: every chunk has its row already
            chunks = np.unique(pages >> _CHUNK_SHIFT)
            new_chunks = chunks[self._dir[chunks] == 0]
            if len(new_chunks):
                self._grow("_table", self._rows + len(new_chunks), CHUNK_PAGES)
                self._dir[new_chunks] = np.arange(self._rows, self._rows + len(new_chunks))
                self._rows += len(new_chunks)
        slots = self._slots(pages)
        blocks = self._table[slots]
        fresh = blocks == 0
        if fresh.any():
            missing = np.unique(slots[fresh])
            if self._dense:
                self._row_used[(missing // CHUNK_PAGES) - 1] = True
            self._grow("_blocks", self._n_blocks + len(missing), TAG_BYTES_PER_PAGE)
            self._table[missing] = np.arange(self._n_blocks, self._n_blocks + len(missing))
            self._n_blocks += len(missing)
            blocks = self._table[slots]
        return blocks

    # ---- single granules -------------------------------------------------------------------
    def _granule_offset(self, addr: int, length: int = GRANULE) -> int:
        if addr % GRANULE:
            raise TagAlignmentError(f"tag store address {addr:#x} is not 16-byte aligned (alignment fault)")
        return check_range(self.base, self.size, addr, length)

    def _block_of(self, page: int) -> int:
        return int(self._table[int(self._dir[page >> _CHUNK_SHIFT]) * CHUNK_PAGES + (page & (CHUNK_PAGES - 1))])

    def tag_at(self, off: int) -> int:
        """The tag of the granule at byte offset ``off`` from base (the per-access path)."""
        block = self._block_of(off >> _PAGE_SHIFT)
        byte = int(self._blocks[block * TAG_BYTES_PER_PAGE + ((off >> 5) & (TAG_BYTES_PER_PAGE - 1))])
        return (byte >> (off & 16 and 4)) & 0xF

    def _store(self, off: int, tag: int) -> None:
        page = off >> _PAGE_SHIFT
        block = self._block_of(page)
        if block == 0:
            if tag == 0:
                return
            block = int(self._allocate(np.array([page]))[0])
        i = block * TAG_BYTES_PER_PAGE + ((off >> 5) & (TAG_BYTES_PER_PAGE - 1))
        shift = off & 16 and 4
        self._blocks[i] = (int(self._blocks[i]) & ~(0xF << shift) & 0xFF) | (tag << shift)

    def stg(self, addr: int, tag: int) -> None:
        """STG: set the tag of the granule at 16-aligned ``addr``."""
        tag = _check_tag(tag)
        self._store(self._granule_offset(addr), tag)

    def st2g(self, addr: int, tag: int) -> None:
        """ST2G: tag two granules (the second may be the first granule of the next page)."""
        tag = _check_tag(tag)
        off = self._granule_offset(addr, 2 * GRANULE)
        self._store(off, tag)
        self._store(off + GRANULE, tag)

    def stg_many(self, addrs: np.ndarray, tags: np.ndarray) -> None:
        """STG on many granules at once (16-aligned addresses; if one repeats, its last tag wins).
        Checked before anything changes: TagAlignmentError / OutsideRamError / ValueError."""
        addrs = np.asarray(addrs, dtype=np.uint64).reshape(-1)
        tags = np.broadcast_to(np.asarray(tags), addrs.shape)
        if not len(addrs):
            return
        misaligned = addrs & np.uint64(15)
        if misaligned.any():
            bad = int(addrs[np.argmax(misaligned != 0)])
            raise TagAlignmentError(f"tag store address {bad:#x} is not 16-byte aligned (alignment fault)")
        check_range(self.base, self.size, int(addrs.min()), GRANULE)
        check_range(self.base, self.size, int(addrs.max()), GRANULE)
        if tags.min() < 0 or tags.max() > 15:
            raise ValueError("allocation tags must be 0..15")
        off = (addrs - np.uint64(self.base)).astype(np.int64)
        if len(off) > 1 and not (off[1:] > off[:-1]).all():     # repeats possible: keep each one's last
            last = len(off) - 1 - np.unique(off[::-1], return_index=True)[1]
            off, tags = off[last], tags[last]
        tags = tags.astype(np.uint8)
        pages = off >> _PAGE_SHIFT
        blocks = self._page_blocks(pages)
        fresh = blocks == 0
        if fresh.any():
            need = ~fresh | (tags != 0)             # tag 0 into a never-tagged page: nothing to do
            off, tags, pages = off[need], tags[need], pages[need]
            blocks = self._allocate(pages)
        index = blocks * TAG_BYTES_PER_PAGE + ((off >> 5) & (TAG_BYTES_PER_PAGE - 1))
        high = (off & 16) != 0
        for sel, keep, shift in ((~high, 0xF0, 0), (high, 0x0F, 4)):   # each byte at most once per pass
            i = index[sel]
            self._blocks[i] = (self._blocks[i] & keep) | (tags[sel] << shift)

    def ldg(self, addr: int) -> int:
        """LDG: the tag of the granule holding ``addr`` (any address in RAM)."""
        return self.tag_at(check_range(self.base, self.size, addr, 1))

    # ---- vectorised ------------------------------------------------------------------------
    def lookup(self, offsets: np.ndarray) -> np.ndarray:
        """Tags (uint8) of the granules at byte ``offsets`` from base. Offsets must be in RAM."""
        off = np.asarray(offsets).astype(np.int64)
        out = np.empty(len(off), dtype=np.uint8)
        return self.lookup_into(off, out, np.empty_like(off), np.empty_like(off))

    def lookup_into(self, off: np.ndarray, out: np.ndarray, s1: np.ndarray, s2: np.ndarray,
                    low: np.ndarray | None = None, raw: np.ndarray | None = None) -> np.ndarray:
        """``lookup`` without allocating: int64 ``off`` in RAM, uint8 ``out``, int64 scratch s1/s2
        of the same length, optionally ``low`` = each offset's low byte (uint8, contiguous).
        Gathers page -> block (through the chunk row unless the index is dense) and the tag
        byte, then selects the nibble by address bit 4. Given a uint8 ``raw``, the packed bytes
        are kept there and s1 keeps their positions in the pool, for ``next_tags_into``.

        The gathers use mode="clip": the positions are in range by construction, and numpy's
        default mode checks them and buffers the whole output (about 15% of a batch's time)."""
        if self._dense:
            np.right_shift(off, _PAGE_SHIFT, out=s1)
            np.take(self._dense_table, s1, out=s1, mode="clip")          # page -> block
        else:
            np.right_shift(off, _PAGE_SHIFT + _CHUNK_SHIFT, out=s1)
            np.take(self._dir, s1, out=s1, mode="clip")                  # chunk -> row
            np.left_shift(s1, _CHUNK_SHIFT, out=s1)
            np.right_shift(off, _PAGE_SHIFT, out=s2)
            np.bitwise_and(s2, CHUNK_PAGES - 1, out=s2)
            np.add(s1, s2, out=s1)
            np.take(self._table, s1, out=s1, mode="clip")                # page -> block
        np.left_shift(s1, 7, out=s1)                         # block * 128 bytes
        np.right_shift(off, 5, out=s2)
        np.bitwise_and(s2, TAG_BYTES_PER_PAGE - 1, out=s2)
        np.add(s1, s2, out=s1)
        packed = out if raw is None else raw
        np.take(self._blocks, s1, out=packed, mode="clip")   # the byte holding two tags
        shift = s2.view(np.uint8)[:len(out)]
        if low is None:                                      # the low byte: a cast wraps to it
            np.copyto(shift, off, casting="unsafe")
            low = shift
        np.right_shift(low, 2, out=shift)
        np.bitwise_and(shift, 4, out=shift)                  # address bit 4 set: high nibble
        np.right_shift(packed, shift, out=out)
        np.bitwise_and(out, 0xF, out=out)
        return out

    def next_tags_into(self, off: np.ndarray, low: np.ndarray, raw: np.ndarray, pos: np.ndarray,
                       wanted: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Tags of the granules right after those at ``off``, where ``wanted`` (elsewhere ``out``
        is undefined), from ``lookup_into``'s ``raw`` bytes and positions ``pos``.

        Two granules share a tag byte, so the granule after one with address bit 4 = 0 is the
        same byte's high nibble: no gather. After one with bit 4 = 1 it is the next byte's low
        nibble, a gather next to one just made; only a page's last granule goes through the
        index again (its successor's block is anywhere in the pool)."""
        np.right_shift(raw, 4, out=out)
        odd = np.flatnonzero(np.logical_and(wanted, np.bitwise_and(low, 16)))
        if len(odd):
            where = pos[odd]
            page_last = np.flatnonzero((where & (TAG_BYTES_PER_PAGE - 1)) == TAG_BYTES_PER_PAGE - 1)
            where += 1                           # past the pool's end only for a page's last byte
            tags = np.take(self._blocks, where, mode="clip")
            tags &= 0xF
            if len(page_last):
                tags[page_last] = self.lookup((off[odd[page_last]] | 15) + 1)
            out[odd] = tags
        return out

    def tags_of_granules(self, granule_addrs: np.ndarray) -> np.ndarray:
        """Tags of granules given by (any) address inside each; OutsideRamError if one is not in RAM."""
        addrs = np.asarray(granule_addrs, dtype=np.uint64)
        if addrs.size:
            lo, hi = int(addrs.min()), int(addrs.max())
            check_range(self.base, self.size, lo, 1)
            check_range(self.base, self.size, hi, 1)
        return self.lookup(addrs - np.uint64(self.base))

    # ---- bulk, KVM_ARM_MTE_COPY_TAGS layout ------------------------------------------------
    def _page_span(self, addr: int, length: int) -> np.ndarray:
        if addr % PAGE or length % PAGE:
            raise TagAlignmentError(
                f"bulk tag copy at {addr:#x} length {length:#x}: both must be page-aligned (4 KiB)")
        off = check_range(self.base, self.size, addr, length)
        return np.arange(off >> _PAGE_SHIFT, (off + length) >> _PAGE_SHIFT, dtype=np.int64)

    def get_tags(self, addr: int, length: int) -> np.ndarray:
        """Tags of [addr, addr+length), one per byte per granule (length/16 bytes)."""
        pages = self._page_span(addr, length)
        packed = self._blocks.reshape(-1, TAG_BYTES_PER_PAGE)[self._page_blocks(pages)]
        tags = np.empty((len(pages), GRANULES_PER_PAGE), dtype=np.uint8)
        tags[:, 0::2] = packed & 0xF
        tags[:, 1::2] = packed >> 4
        return tags.reshape(-1)

    def packed(self, addr: int, length: int) -> np.ndarray:
        """Tags of the pages [addr, addr+length) as QEMU stores them: 2 per byte, granule with
        address bit 4 = 0 in the low nibble (length/32 bytes)."""
        pages = self._page_span(addr, length)
        return self._blocks.reshape(-1, TAG_BYTES_PER_PAGE)[self._page_blocks(pages)].reshape(-1)

    def set_tags(self, addr: int, tags: np.ndarray) -> None:
        """Set the tags of the pages from ``addr``, one tag per byte per granule."""
        tags = np.asarray(tags)
        if tags.ndim != 1 or len(tags) % GRANULES_PER_PAGE:
            raise TagAlignmentError(
                f"bulk tag copy of {tags.size} tags: must be whole pages ({GRANULES_PER_PAGE} tags each)")
        if tags.size and (tags.min() < 0 or tags.max() > 15):
            raise ValueError("bulk tag copy: every tag must be 0..15")
        pages = self._page_span(addr, len(tags) * GRANULE)
        tags = tags.astype(np.uint8).reshape(-1, GRANULES_PER_PAGE)
        packed = tags[:, 0::2] | (tags[:, 1::2] << 4)
        # Pages never tagged that stay all-zero need no block.
        keep = packed.any(axis=1) | (self._page_blocks(pages) != 0)
        if keep.any():
            blocks = self._allocate(pages[keep])
            self._blocks.reshape(-1, TAG_BYTES_PER_PAGE)[blocks] = packed[keep]
