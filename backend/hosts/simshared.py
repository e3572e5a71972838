"""A simulated VM's shared memory: counters, TCF modes, faults and tag memory in one segment.

The daemon creates one ``multiprocessing.shared_memory`` segment per running simulated VM; the
worker process that runs the VM's vCPUs (backend.hosts.simworker) maps the same segment. Both see
the same numpy views, so the daemon reads counters and faults with no message and no copy per
sample, sets a vCPU's TCF by writing one byte, and a migration copies the tags straight out of
the segment while the vCPUs are paused.

Layout (every part 64-byte aligned, sizes from ``VmLayout``, computed identically on both sides):

* ``header``   int64[8]: tag pool blocks in use, tag index rows in use, faults written so far
* ``counters`` int64[vcpus, 4]: checked, unchecked, sync_faults, async_faults (written by the
  one process that runs the vCPUs, after each batch)
* ``tcf``      int8[vcpus]: each vCPU's TCF (the daemon writes, the vCPUs read before each batch)
* ``last``     FAULT[vcpus]: each vCPU's newest fault (seq 0: none yet)
* ``faults``   FAULT[FAULT_HISTORY]: a ring of the newest faults, seq = 1 + its position overall
* the tag memory (MTE VMs): TagMemory's index and block pool at a fixed capacity (the workload
  only tags its heaps, so the capacity is known before the VM starts).

Only one process writes at a time (the worker while it runs the vCPUs, the daemon while they are
paused); readers may see a sample mid-update, which for monotonic counters is harmless.
"""
from __future__ import annotations

import os
import re
import secrets
import sys
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import _posixshmem  # the module SharedMemory itself uses: unlink without a resource tracker
import numpy as np

from backend.errors import MtevmError
from backend.tagcheck import TCF, FaultRecord, GuestRam, TagMemory
from backend.tagcheck.layout import PAGE, TAG_BYTES_PER_PAGE
from backend.tagcheck.tags import CHUNK_PAGES, DENSE_INDEX_CHUNKS

FAULT_HISTORY = 200
COUNTER_NAMES = ("checked", "unchecked", "sync_faults", "async_faults")
FAULT = np.dtype([("seq", "<i8"), ("time", "<f8"), ("addr", "<u8"), ("vcpu", "<i4"), ("size", "<i4"),
                  ("ptr_tag", "u1"), ("mem_tag", "u1"), ("kind", "u1"), ("access", "u1")])
KINDS = ("sync", "async")
ACCESSES = ("load", "store")
TCF_CODES = {str(t): int(t) for t in TCF}
TCF_NAMES_BY_CODE = tuple(str(TCF(code)) for code in range(len(TCF)))
H_BLOCKS, H_ROWS, H_FAULTS = 0, 1, 2
_ALIGN = 64
NAME_PREFIX = "mtevm-sim-"       # + daemon pid + random: remove_orphans knows whose it is
_NAME_RE = re.compile(r"^mtevm-sim-(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class VmLayout:
    """Where each part of a VM's segment lies; the same numbers give the same layout anywhere."""

    vcpus: int
    ram_base: int
    ram_size: int
    mte: bool                 # the segment holds tag memory
    tag_pages: int = 0        # capacity: pages that may ever hold tags
    tag_span: int = 0         # capacity: bytes of RAM (from ram_base) the tagged pages lie within

    def parts(self) -> list[tuple[str, np.dtype, tuple]]:
        parts = [("header", np.dtype("<i8"), (8,)), ("counters", np.dtype("<i8"), (self.vcpus, 4)),
                 ("tcf", np.dtype("i1"), (self.vcpus,)), ("last", FAULT, (self.vcpus,)),
                 ("faults", FAULT, (FAULT_HISTORY,))]
        if self.mte:
            n_chunks = -(-(self.ram_size // PAGE) // CHUNK_PAGES)
            dense = n_chunks <= DENSE_INDEX_CHUNKS
            rows = n_chunks + 1 if dense else 2 + -(-self.tag_span // (CHUNK_PAGES * PAGE))
            parts += [("_dir", np.dtype("<i8"), (n_chunks,)), ("_table", np.dtype("<i8"), (rows * CHUNK_PAGES,)),
                      ("_row_used", np.dtype("?"), (n_chunks if dense else 0,)),
                      ("_blocks", np.dtype("u1"), ((1 + self.tag_pages) * TAG_BYTES_PER_PAGE,))]
        return parts

    def offsets(self) -> tuple[dict[str, tuple[int, np.dtype, tuple]], int]:
        out, pos = {}, 0
        for name, dtype, shape in self.parts():
            out[name] = (pos, dtype, shape)
            pos += -(-(dtype.itemsize * int(np.prod(shape))) // _ALIGN) * _ALIGN
        return out, max(pos, _ALIGN)


class SharedTagMemory(TagMemory):
    """A TagMemory whose index and block pool live in a VmShared segment, at a fixed capacity."""

    def __init__(self, shared: "VmShared"):
        self._shared = shared
        super().__init__(shared.layout.ram_base, shared.layout.ram_size)

    @classmethod
    def attach(cls, shared: "VmShared") -> "SharedTagMemory":
        """The tag memory another process made in ``shared`` (nothing is written)."""
        tags = cls.__new__(cls)
        tags._shared = shared
        tags._geometry(shared.layout.ram_base, shared.layout.ram_size)
        for name in ("_dir", "_table", "_row_used", "_blocks"):
            setattr(tags, name, shared.views[name])
        return tags

    def _array(self, name: str, length: int, dtype) -> np.ndarray:
        return self._shared.views[name]        # zeroed by the kernel, at full capacity

    def _grow(self, name: str, needed: int, unit: int) -> None:
        have = len(getattr(self, name)) // unit
        if needed > have:
            raise MtevmError(f"simulated VM tag memory is full: {needed - 1} pages would hold tags, "
                             f"room was made for {have - 1} (the workload's heaps)")

    # the two counters of the pool live in the segment's header, so every process sees them
    _n_blocks = property(lambda self: int(self._shared.header[H_BLOCKS]),
                         lambda self, value: self._shared.header.__setitem__(H_BLOCKS, value))
    _rows = property(lambda self: int(self._shared.header[H_ROWS]),
                     lambda self, value: self._shared.header.__setitem__(H_ROWS, value))

    @property
    def bytes_used(self) -> int:
        """Index rows and blocks in use (the segment's untouched capacity takes no memory)."""
        rows = (1 + int(np.count_nonzero(self._row_used))) if self._dense else self._rows
        return self._dir.nbytes + rows * CHUNK_PAGES * 8 + self._n_blocks * TAG_BYTES_PER_PAGE

    def privatise(self) -> None:
        """Copy the tags out of the segment (it is about to go away); this object keeps working."""
        n_blocks, rows = self._n_blocks, self._rows
        self._blocks = np.array(self._blocks[:n_blocks * TAG_BYTES_PER_PAGE])
        self._table = np.array(self._table[:rows * CHUNK_PAGES])
        self._dir, self._row_used = np.array(self._dir), np.array(self._row_used)
        header = np.array(self._shared.header)
        self._shared = _Detached(header)


class _Detached:
    """What a privatised SharedTagMemory keeps of its segment: a private header."""

    def __init__(self, header: np.ndarray):
        self.header = header


class VmShared:
    """One VM's segment and the numpy views on it. ``create`` in the daemon, ``attach`` in a worker."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: VmLayout, owner: bool):
        self.shm, self.layout, self.owner = shm, layout, owner
        self.name = shm.name
        offsets, _ = layout.offsets()
        self.views = {name: np.ndarray(shape, dtype, buffer=shm.buf, offset=pos)
                      for name, (pos, dtype, shape) in offsets.items()}
        self.header, self.counters, self.tcf = self.views["header"], self.views["counters"], self.views["tcf"]
        self.last, self.faults = self.views["last"], self.views["faults"]
        self.tag_memory: SharedTagMemory | None = None
        self._last_cache: dict[int, tuple[int, dict]] = {}

    @classmethod
    def create(cls, layout: VmLayout) -> "VmShared":
        _, size = layout.offsets()
        shm = _untracked(name=f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(6)}", create=True, size=size)
        _close_fd(shm)
        shared = cls(shm, layout, owner=True)
        if layout.mte:
            shared.tag_memory = SharedTagMemory(shared)
        return shared

    @classmethod
    def attach(cls, name: str, layout: VmLayout) -> "VmShared":
        shm = _untracked(name=name)
        _close_fd(shm)
        shared = cls(shm, layout, owner=False)
        if layout.mte:
            shared.tag_memory = SharedTagMemory.attach(shared)
        return shared

    def ram(self) -> GuestRam:
        """A GuestRam over this VM's RAM region whose tags are this segment's."""
        ram = GuestRam(self.layout.ram_base, self.layout.ram_size, mte=False)
        ram.tags = self.tag_memory
        return ram

    # ---- what the daemon reads ------------------------------------------------------------
    def vcpu_rows(self) -> list[tuple[dict, str, dict | None]]:
        """Per vCPU: its counters, its TCF's name and its newest fault (one read of each array;
        a fault's dict is kept until a newer one, as most samples see no new fault)."""
        tcfs = self.tcf.tolist()
        seqs = self.last["seq"].tolist()
        out = []
        for i, row in enumerate(self.counters.tolist()):
            fault = None
            if seqs[i]:
                cached = self._last_cache.get(i)
                if cached is None or cached[0] != seqs[i]:
                    cached = self._last_cache[i] = (seqs[i], fault_info(self.last[i]))
                fault = dict(cached[1])
            out.append((dict(zip(COUNTER_NAMES, row)), TCF_NAMES_BY_CODE[tcfs[i]], fault))
        return out

    def recent_faults(self, limit: int) -> list[dict]:
        """The newest ``limit`` faults, newest first (entries overwritten while reading are skipped)."""
        head = int(self.header[H_FAULTS])
        out = []
        for seq in range(head, max(0, head - min(limit, FAULT_HISTORY)), -1):
            entry = self.faults[(seq - 1) % FAULT_HISTORY]
            if int(entry["seq"]) == seq:
                out.append(fault_info(entry))
        return out

    def copy_state_from(self, other: "VmShared") -> None:
        """Counters, TCF modes and faults of another VM's segment (a migration's destination)."""
        for name in ("counters", "tcf", "last", "faults"):
            self.views[name][...] = other.views[name]
        self.header[H_FAULTS] = other.header[H_FAULTS]

    # ---- what the vCPUs write -------------------------------------------------------------
    def record_fault(self, vcpu: int, record: FaultRecord, now: float) -> None:
        seq = int(self.header[H_FAULTS]) + 1
        entry = self.faults[(seq - 1) % FAULT_HISTORY]
        entry["seq"] = 0                          # readers skip it while it changes
        entry["time"], entry["addr"], entry["vcpu"], entry["size"] = now, record.addr, vcpu, record.size
        entry["ptr_tag"], entry["mem_tag"] = record.ptr_tag, record.mem_tag
        entry["kind"], entry["access"] = KINDS.index(record.kind), ACCESSES.index(record.access)
        entry["seq"] = seq
        self.last[vcpu] = entry
        self.header[H_FAULTS] = seq

    # ---- life --------------------------------------------------------------------------------
    def release(self) -> None:
        """The daemon is done with this VM: counters and tags are copied to private memory (so
        the objects that show them keep working), the mapping goes and the segment is removed."""
        for name in ("header", "counters", "tcf", "last", "faults"):
            setattr(self, name, np.array(self.views[name]))
        self.views = {}
        if self.tag_memory is not None:
            self.tag_memory.privatise()
        self._close()
        if self.owner:
            unlink(self.name)

    def detach(self) -> None:
        """A worker lets go of the segment (the daemon removes it)."""
        self.views = {}
        self.header = self.counters = self.tcf = self.last = self.faults = None
        self.tag_memory = None
        self._close()

    def _close(self) -> None:
        try:
            self.shm.close()
        except BufferError:       # a view is still referenced somewhere: the mapping goes with it
            pass


def fault_info(entry) -> dict:
    """A FAULT entry as FaultInfo (the dict the API shows: FaultRecord.to_dict's fields, less its
    batch index, with the vCPU and the time). Built directly: this runs per vCPU per sample."""
    _, when, addr, vcpu, size, ptr_tag, mem_tag, kind, access = entry.item()
    return {"vcpu": vcpu, "kind": KINDS[kind], "addr": f"{addr:#x}", "ptr_tag": ptr_tag, "mem_tag": mem_tag,
            "access": ACCESSES[access], "size": size, "time": when}


def _close_fd(shm: shared_memory.SharedMemory) -> None:
    """The mapping is all we need: do not hold a file descriptor per VM (1,000 VMs, 1,000 fds)."""
    if getattr(shm, "_fd", -1) >= 0:
        os.close(shm._fd)
        shm._fd = -1


def _untracked(**kwargs) -> shared_memory.SharedMemory:
    """A SharedMemory that no resource tracker process follows. The daemon unlinks its segments
    itself (``release``), and a later daemon removes those of one that was killed
    (``remove_orphans``); a tracker would be one more process per daemon and per worker, and
    Python < 3.13 registers even attachments, so a worker's exit would unlink the daemon's
    segment (CPython gh-82300; 3.13 has ``track=False`` for this)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(track=False, **kwargs)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kw: None
    try:
        return shared_memory.SharedMemory(**kwargs)
    finally:
        resource_tracker.register = register


def unlink(name: str) -> None:
    """Remove a segment by name (no resource tracker involved); gone already is fine."""
    try:
        _posixshmem.shm_unlink("/" + name.lstrip("/"))
    except FileNotFoundError:
        pass


def remove_orphans(directory: str = "/dev/shm") -> list[str]:
    """Remove the segments of daemons that no longer run (killed before they could clean up)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        unlink(name)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    """A process that runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
