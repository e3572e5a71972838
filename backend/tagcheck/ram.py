"""A VM's guest RAM: sparse data pages plus (for an MTE VM) its allocation tags.

Pages never written read as zeros and take no memory, so a 64 GiB VM costs nothing until the
guest touches it. The data is what a migration copies; checked loads/stores in the tag-check
core do not move data (only STZG/STZ2G and ``write`` change it).
"""
from __future__ import annotations

from typing import Iterator

from backend.tagcheck.errors import NoTagStorageError
from backend.tagcheck.layout import GRANULE, PAGE, check_range, validate_region
from backend.tagcheck.tags import TagMemory


class GuestRam:
    def __init__(self, base: int, size: int, mte: bool):
        validate_region(base, size)
        self.base = base
        self.size = size
        self.tags: TagMemory | None = TagMemory(base, size) if mte else None
        self._pages: dict[int, bytearray] = {}    # page offset from base -> 4 KiB of data

    def check_range(self, addr: int, length: int) -> int:
        """``addr - base``, or OutsideRamError if [addr, addr+length) is not all RAM."""
        return check_range(self.base, self.size, addr, length)

    def read(self, addr: int, length: int) -> bytes:
        off = self.check_range(addr, length)
        out = bytearray(length)
        pos = 0
        while pos < length:
            page, in_page = divmod(off + pos, PAGE)
            n = min(PAGE - in_page, length - pos)
            data = self._pages.get(page * PAGE)
            if data is not None:
                out[pos:pos + n] = data[in_page:in_page + n]
            pos += n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        off = self.check_range(addr, len(data))
        pos = 0
        while pos < len(data):
            page, in_page = divmod(off + pos, PAGE)
            n = min(PAGE - in_page, len(data) - pos)
            chunk = data[pos:pos + n]
            page_data = self._pages.get(page * PAGE)
            if page_data is None:
                if not any(chunk):
                    pos += n
                    continue       # zeros into a never-written page: it already reads zeros
                page_data = self._pages[page * PAGE] = bytearray(PAGE)
            page_data[in_page:in_page + n] = chunk
            pos += n

    def _tag_memory(self) -> TagMemory:
        if self.tags is None:
            raise NoTagStorageError("this VM has no MTE tag storage (mte is off)")
        return self.tags

    def stzg(self, addr: int, tag: int) -> None:
        """STZG: set the granule's tag and zero its data."""
        self._tag_memory().stg(addr, tag)
        self.write(addr, bytes(GRANULE))

    def stz2g(self, addr: int, tag: int) -> None:
        """STZ2G: STZG over two granules (possibly across a page boundary)."""
        self._tag_memory().st2g(addr, tag)
        self.write(addr, bytes(2 * GRANULE))

    def pages(self) -> Iterator[int]:
        """Addresses of the data pages that were written, ascending (for a migration copy)."""
        for off in sorted(self._pages):
            yield self.base + off

    @property
    def bytes_used(self) -> int:
        """Data pages held plus the tag storage."""
        return len(self._pages) * PAGE + (self.tags.bytes_used if self.tags is not None else 0)
