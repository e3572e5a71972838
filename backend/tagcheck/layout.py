"""Sizes of the MTE tag layout and the checks that an address range lies in guest RAM."""
from backend.tagcheck.errors import OutsideRamError

GRANULE = 16          # bytes per allocation tag
PAGE = 4096           # bytes per page: tag storage is allocated per page
GRANULES_PER_PAGE = PAGE // GRANULE
TAG_BYTES_PER_PAGE = PAGE // GRANULE // 2   # two 4-bit tags per byte, as QEMU stores them
MAX_PHYS = 1 << 48    # largest guest-physical address the model accepts


def validate_region(base: int, size: int) -> None:
    """A RAM region must be page-aligned, non-empty and below 2^48 (ValueError otherwise)."""
    if not isinstance(base, int) or not isinstance(size, int):
        raise ValueError(f"RAM base and size must be integers, not {base!r} and {size!r}")
    if base < 0 or base % PAGE:
        raise ValueError(f"RAM base {base:#x} is not a page-aligned (4 KiB) address")
    if size <= 0 or size % PAGE:
        raise ValueError(f"RAM size {size:#x} is not a positive multiple of 4 KiB")
    if base + size > MAX_PHYS:
        raise ValueError(f"RAM [{base:#x}, {base + size:#x}) does not fit below 2^48")


def check_range(base: int, size: int, addr: int, length: int) -> int:
    """Return ``addr - base`` if [addr, addr+length) lies in RAM, else raise OutsideRamError."""
    off = addr - base
    if off < 0 or length > size - off:
        raise OutsideRamError(
            f"address {addr:#x} (+{length} bytes) is outside guest RAM [{base:#x}, {base + size:#x})")
    return off
