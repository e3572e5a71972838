"""Per-VM migration state as QEMU keeps it (migration/migration.c), plus a RAM (and tag) migration.

MigrationState reproduces what a user sees through QMP: ``migrate_add_blocker`` refusing with the
"--only-migratable" or "migration/snapshot in progress" prefix, ``query-migrate`` with
``blocked-reasons`` (newest first, present only when non-empty, even before any migration), and
``migrate`` failing with the first blocker's own text, unprefixed.

Beyond QEMU: ``RamMigration`` with ``with_tags`` moves MTE tags through the KVM_ARM_MTE_COPY_TAGS
layout (one tag per byte, page-aligned ranges) and verifies every tag at the destination. QEMU
9.2 has no tag migration for KVM (its ``/* TODO: Add migration support with MTE enabled */``) and
blocks migration instead; mtevm lifts that blocker only when the user asks for tags and both sides
have MTE (the caller decides: see backend.hosts.sim).
"""
from __future__ import annotations

import bisect
import time
from typing import Callable, Iterator

import numpy as np

from backend.errors import MigrationError
from backend.tagcheck.layout import GRANULE, PAGE

# migration_is_running(): the states in which a new blocker is refused (-EBUSY).
RUNNING_STATES = ("setup", "active", "postcopy-active", "pre-switchover", "device", "cancelling")
STATES = ("none",) + RUNNING_STATES + ("completed", "failed", "cancelled")

ONLY_MIGRATABLE_PREFIX = "disallowing migration blocker (--only-migratable) for: "
IN_PROGRESS_PREFIX = "disallowing migration blocker (migration/snapshot in progress) for: "


class MigrationState:
    """One VM's outgoing migration: blockers, status and RAM statistics, shaped like QMP's."""

    def __init__(self, only_migratable: bool = False):
        self.blockers: list[str] = []         # newest first, as query-migrate lists them
        self.only_migratable = only_migratable
        self.status = "none"
        self.ram: dict = {}
        self.error_desc: str | None = None
        self.started: float | None = None
        self.finished: float | None = None

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATES

    def add_blocker(self, reason: str) -> None:
        """migrate_add_blocker(): -EACCES under --only-migratable, -EBUSY while migrating."""
        if self.only_migratable:
            raise MigrationError(ONLY_MIGRATABLE_PREFIX + reason)
        if self.running:
            raise MigrationError(IN_PROGRESS_PREFIX + reason)
        self.blockers.insert(0, reason)

    def remove_blocker(self, reason: str) -> None:
        if reason in self.blockers:
            self.blockers.remove(reason)

    def check_can_migrate(self, lifted: tuple[str, ...] = ()) -> None:
        """migrate_prepare(): a running migration, then the newest blocker's own text.

        ``lifted`` names blockers this migration does not need to respect (mtevm's opt-in tag
        migration lifts the MTE blocker; QEMU has no such option).
        """
        if self.running:
            raise MigrationError("There's a migration process in progress")
        remaining = [b for b in self.blockers if b not in lifted]
        if remaining:
            raise MigrationError(remaining[0])

    def query_migrate(self) -> dict:
        """The ``query-migrate`` reply: {} before any migration with nothing blocking it."""
        info: dict = {}
        if self.blockers:
            info["blocked-reasons"] = list(self.blockers)
        if self.status == "none":
            return info
        info["status"] = self.status
        if self.status in ("active", "completed", "postcopy-active", "device", "pre-switchover"):
            info["ram"] = dict(self.ram)
        if self.started is not None:
            end = self.finished if self.finished is not None else time.monotonic()
            info["total-time"] = int((end - self.started) * 1000)
        if self.status == "failed" and self.error_desc:
            info["error-desc"] = self.error_desc
        return info

    # The lifecycle, driven by RamMigration.
    def begin(self, total_bytes: int) -> None:
        self.status = "setup"
        self.error_desc = None
        self.started, self.finished = time.monotonic(), None
        self.ram = {"transferred": 0, "remaining": total_bytes, "total": total_bytes, "duplicate": 0,
                    "normal": 0, "normal-bytes": 0, "page-size": PAGE, "mbps": 0.0}

    def finish(self, status: str, error: str | None = None) -> None:
        self.status = status
        self.error_desc = error
        self.finished = time.monotonic()
        if self.started is not None and status == "completed":
            seconds = max(self.finished - self.started, 1e-6)
            self.ram["mbps"] = round(self.ram["transferred"] * 8 / seconds / 1e6, 3)


def ram_stats(ram: dict) -> dict:
    """A ``query-migrate`` ``ram`` dict (QEMU's, or MigrationState's) as the flat figures mtevm
    records with a migration: bytes total/transferred/remaining, zero ("duplicate") and normal pages."""
    return {"ram_total": ram.get("total", 0), "ram_transferred": ram.get("transferred", 0),
            "ram_remaining": ram.get("remaining", 0), "ram_duplicate": ram.get("duplicate", 0),
            "ram_normal": ram.get("normal", 0), "ram_page_size": ram.get("page-size", PAGE)}


def _machine_has_tags(machine) -> bool:
    return machine.ram is not None and machine.ram.tags is not None


def read_tags(machine, addr: int, length: int) -> np.ndarray:
    """A machine's tags for a page-aligned range: KVM_ARM_MTE_COPY_TAGS FROM guest, or TCG's tag RAM."""
    if machine.kvm_vm is not None:
        buf = np.zeros(length // GRANULE, dtype=np.uint8)
        machine.kvm_vm.mte_copy_tags(addr, length, buf, to_guest=False)
        return buf
    return machine.ram.tags.get_tags(addr, length)


def write_tags(machine, addr: int, tags: np.ndarray) -> None:
    """Store tags into a machine: KVM_ARM_MTE_COPY_TAGS TO guest, or TCG's tag RAM."""
    if machine.kvm_vm is not None:
        machine.kvm_vm.mte_copy_tags(addr, len(tags) * GRANULE, np.ascontiguousarray(tags, dtype=np.uint8),
                                     to_guest=True)
    else:
        machine.ram.tags.set_tags(addr, tags)


class RamMigration:
    """Moves written RAM pages (and, with_tags, their tags) from one realized machine to another.

    ``steps()`` does the work in chunks and yields ``(done, total)`` after each, so an asyncio caller
    can yield to its event loop and show progress; ``run()`` does it all at once. The source's
    MigrationState goes setup -> active -> completed | failed; ``stats`` holds the figures.
    """

    def __init__(self, src, dst, *, with_tags: bool, chunk_pages: int = 64, ram_slices: int = 0):
        if src.ram.size != dst.ram.size or src.ram.base != dst.ram.base:
            raise MigrationError(f"destination RAM 0x{dst.ram.base:x}+{dst.ram.size} does not match "
                                 f"source RAM 0x{src.ram.base:x}+{src.ram.size}")
        if with_tags and not _machine_has_tags(src):
            raise MigrationError(f"cannot migrate MTE tags: VM {src.config.name!r} has no MTE tag storage")
        if with_tags and not _machine_has_tags(dst):
            raise MigrationError(f"cannot migrate MTE tags: the destination of {src.config.name!r} "
                                 f"has no MTE tag storage")
        self.src, self.dst, self.with_tags = src, dst, with_tags
        self.chunk_pages = max(1, chunk_pages)
        self.ram_slices = ram_slices   # > 0: the RAM phase yields after each 1/ram_slices of guest RAM
        self.data_pages = sorted(src.ram.pages())
        self.tag_pages = sorted(src.ram.tags.pages()) if with_tags else []
        # Units of work: copy each data page, copy each tag page, verify each tag page.
        self.total = len(self.data_pages) + 2 * len(self.tag_pages)
        self.stats: dict = {}

    def run(self, progress: Callable[[int, int], None] | None = None) -> dict:
        for done, total in self.steps():
            if progress:
                progress(done, total)
        return self.stats

    def steps(self) -> Iterator[tuple[int, int]]:
        state = self.src.migration
        if state.running:
            raise MigrationError("There's a migration process in progress")
        state.begin(self.src.ram.size)
        started = time.monotonic()
        try:
            state.status = "active"
            yield from self._copy_data(state)
            yield from self._copy_tags()
            yield from self._verify_tags()
        except MigrationError as e:
            state.finish("failed", str(e))
            raise
        except OSError as e:
            state.finish("failed", f"tag copy failed: {e.strerror or e}")
            raise MigrationError(f"tag copy failed: {e.strerror or e}") from e
        except GeneratorExit:
            state.finish("cancelled")
            raise
        state.finish("completed")
        self.stats = {
            "pages": len(self.data_pages), "bytes": len(self.data_pages) * PAGE,
            "tag_pages": len(self.tag_pages), "tags": len(self.tag_pages) * (PAGE // GRANULE),
            "tags_verified": len(self.tag_pages) * (PAGE // GRANULE), "with_tags": self.with_tags,
            "seconds": round(time.monotonic() - started, 6), "mbps": state.ram["mbps"],
        }

    def _chunks(self, pages: list[int]) -> Iterator[list[int]]:
        for i in range(0, len(pages), self.chunk_pages):
            yield pages[i:i + self.chunk_pages]

    def _copy_data(self, state: MigrationState) -> Iterator[tuple[int, int]]:
        """Walk guest RAM in address order as QEMU's RAM migration does. A page never written is
        zero and, as in QEMU, counts as a "duplicate" (zero) page that is not sent; a written page
        is sent ("normal") unless it is all zeros. ``transferred`` is the bytes of normal pages
        sent, so at completion transferred + duplicate * page-size == total."""
        ram = self.src.ram
        done = 0
        walked = ram.base               # RAM below this address is accounted for

        def account(upto: int) -> None:
            nonlocal walked
            state.ram["duplicate"] += (upto - walked) // PAGE
            walked = upto

        def send(chunk: list[int]) -> None:
            nonlocal walked
            for addr in chunk:
                account(addr)
                data = ram.read(addr, PAGE)
                self.dst.ram.write(addr, data)
                if data.count(0) == PAGE:
                    state.ram["duplicate"] += 1
                else:
                    state.ram["normal"] += 1
                    state.ram["normal-bytes"] += PAGE
                walked = addr + PAGE

        def report() -> None:
            state.ram["transferred"] = state.ram["normal-bytes"]
            state.ram["remaining"] = ram.base + ram.size - walked

        if self.ram_slices > 0:
            end = ram.base
            i = 0
            for s in range(1, self.ram_slices + 1):
                end = ram.base + (ram.size // PAGE * s // self.ram_slices) * PAGE
                j = bisect.bisect_left(self.data_pages, end, lo=i)
                send(self.data_pages[i:j])
                done += j - i
                i = j
                account(end)
                report()
                yield done, self.total
        else:
            for chunk in self._chunks(self.data_pages):
                send(chunk)
                done += len(chunk)
                report()
                yield done, self.total
        account(ram.base + ram.size)
        report()

    def _copy_tags(self) -> Iterator[tuple[int, int]]:
        done = len(self.data_pages)
        for chunk in self._chunks(self.tag_pages):
            for addr in chunk:
                write_tags(self.dst, addr, read_tags(self.src, addr, PAGE))
            done += len(chunk)
            yield done, self.total

    def _verify_tags(self) -> Iterator[tuple[int, int]]:
        done = len(self.data_pages) + len(self.tag_pages)
        for chunk in self._chunks(self.tag_pages):
            for addr in chunk:
                want, got = read_tags(self.src, addr, PAGE), read_tags(self.dst, addr, PAGE)
                bad = np.flatnonzero(want != got)
                if bad.size:
                    granule = addr + int(bad[0]) * GRANULE
                    raise MigrationError(f"tag mismatch after migration at 0x{granule:x}: source tag "
                                         f"{int(want[bad[0]])}, destination tag {int(got[bad[0]])} "
                                         f"({bad.size} of {want.size} granules differ in that page)")
            done += len(chunk)
            yield done, self.total


def migrate_ram(src, dst, *, with_tags: bool, progress: Callable[[int, int], None] | None = None) -> dict:
    """Copy ``src``'s RAM (and tags) into ``dst`` in one go; returns the stats (see RamMigration)."""
    return RamMigration(src, dst, with_tags=with_tags).run(progress)
