"""The binary interface between mtevm and its bare-metal MTE guest (backend/qemu/guest/).

The host hands the guest a *parameter block* (loaded into guest RAM with
``-device loader,file=params.bin,addr=PARAM_ADDR,force-raw=on``) and reads back a *status block*
that the guest keeps up to date at STATUS_ADDR (QMP ``human-monitor-command`` ``xp /Ngx`` or
``pmemsave``). In trace mode the guest also writes one result record per trace op at RESULTS_ADDR.

Everything is little-endian. These constants are mirrored by backend/qemu/guest/abi.h; the guest
test suite checks both agree (tests/qemu/test_guest.py), so change them together.

Guest-physical memory map (RAM starts at 0x40000000 on ``-M virt``; at least 128 MiB):

====================  =========================================================
0x40000000            device tree (QEMU puts it at the bottom of RAM)
0x40080000            guest image: code, data, bss, page tables, stacks
PARAM_ADDR            parameter block header, then the trace op records
STATUS_ADDR           status header, then one record per vCPU
RESULTS_ADDR          trace mode: one result record per op
BOOT_TAG_ADDR         per vCPU one page tagged at boot and re-verified later
TRACE_ARENA_BASE      trace mode: the only memory trace ops may address
HEAP_BASE             workload mode: vCPU i's heap is [HEAP_BASE + i*heap_size, +heap_size)
====================  =========================================================
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backend.errors import ConfigError
from backend.jsonvalues import is_int, is_number

if TYPE_CHECKING:  # backend/qemu sits below backend/hosts: use the workload by its attributes only
    from backend.hosts.workload import WorkloadConfig

# The committed guest build (backend/qemu/guest/Makefile): the one place its path is spelled.
GUEST_ELF = Path(__file__).resolve().parent / "guest" / "build" / "mtevm-guest.elf"

ABI_VERSION = 1
MAX_VCPUS = 8

RAM_BASE = 0x4000_0000
IMAGE_ADDR = 0x4008_0000
PARAM_ADDR = 0x4020_0000
PARAM_AREA_SIZE = 0x10_0000
STATUS_ADDR = 0x4030_0000
RESULTS_ADDR = 0x4040_0000
RESULTS_AREA_SIZE = 0x10_0000
BOOT_TAG_ADDR = 0x4050_0000
BOOT_TAG_SIZE = 0x1000            # per vCPU
TRACE_ARENA_BASE = 0x4060_0000
TRACE_ARENA_SIZE = 0x1_0000       # 64 KiB: the guest re-zeroes its tags between traces
HEAP_BASE = 0x4100_0000
MAPPED_END = 0x1_0000_0000        # the guest maps RAM (as Normal Tagged) up to 4 GiB
DEFAULT_RAM_SIZE = 256 << 20

PARAM_MAGIC = 0x314D_5241_5056_544D   # "MTVPARM1" little-endian
STATUS_MAGIC = 0x3141_5453_5654_4D    # "MTVSTA1\0" little-endian (the guest writes it once it is up)
VCPU_MAGIC = 0x5550_4356_5654_4D      # "MTVVCPU\0"

MODES = {"workload": 0, "trace": 1}
TCF_NAMES = ("none", "sync", "async", "asymm")
PPM = 1_000_000                   # rates travel as parts per million

# --- parameter block ---------------------------------------------------------------------------
# magic, version, mode, nvcpus, flags, seed, uaf_ppm, overflow_ppm, wild_ppm, rate (accesses/s/vCPU),
# heap_base, heap_size, tcf[8], trace_count, trace_offset (from PARAM_ADDR), arena_base, arena_size
PARAM_HEADER_FMT = "<QIIIIQIIIIQQ8sIIQQ"
PARAM_HEADER_SIZE = 128
assert struct.calcsize(PARAM_HEADER_FMT) <= PARAM_HEADER_SIZE

# one trace op: opcode, size, tag, config mask (bit0 tcf, bit1 tcma, bit2 tco), tcf, tcma, tco, pad, addr
TRACE_OP_FMT = "<BBBBBBBxQ"
TRACE_OP_SIZE = struct.calcsize(TRACE_OP_FMT)   # 16
OPCODES = {"config": 0, "stg": 1, "st2g": 2, "stzg": 3, "ldg": 4, "load": 5, "store": 6, "reset": 7}
OP_NAMES = {v: k for k, v in OPCODES.items()}
CFG_TCF, CFG_TCMA, CFG_TCO = 1, 2, 4
ACCESS_SIZES = (1, 2, 4, 8, 16)
MAX_TRACE_OPS = min((PARAM_AREA_SIZE - PARAM_HEADER_SIZE) // TRACE_OP_SIZE, RESULTS_AREA_SIZE // 16)

# one trace result: kind (0 none, 1 sync, 2 async), ldg valid, ldg tag, pad, ESR (sync), FAR (sync) or
# the op's pointer (async: FAR is UNKNOWN architecturally, the guest records what it accessed)
RESULT_FMT = "<BBBxIQ"
RESULT_SIZE = struct.calcsize(RESULT_FMT)       # 16
KIND_NONE, KIND_SYNC, KIND_ASYNC = 0, 1, 2
KIND_NAMES = {KIND_SYNC: "sync", KIND_ASYNC: "async"}

# --- status block ------------------------------------------------------------------------------
# magic, version, nvcpus_up, mode, state, ops_done, cntfrq, error_esr, error_elr, error_far, pad..
STATUS_HEADER_FMT = "<QIIIIQQQQQ"
STATUS_HEADER_SIZE = 64
GUEST_STATES = {0: "booting", 1: "running", 2: "done", 3: "error"}
# per vCPU, all u64 (so ``xp /Ngx`` words map 1:1 onto fields):
VCPU_FIELDS = (
    "magic", "heartbeat", "checked", "unchecked", "sync_faults", "async_faults",
    "last_fault_addr", "last_fault_esr", "last_fault_info", "fault_time", "tcf",
    "boot_tags", "boot_tag_checks", "cpu_state", "mpidr", "cntvct",
)
VCPU_FMT = "<" + "Q" * len(VCPU_FIELDS)
VCPU_SIZE = struct.calcsize(VCPU_FMT)           # 128
BOOT_TAGS = {0: None, 1: True, 2: False}        # not yet checked / verified / a tag was lost
# last_fault_info bits: kind 7:0 (KIND_*), access 8 (1 store), size 23:16, ptr_tag 27:24, mem_tag 31:28


def status_size(nvcpus: int) -> int:
    """Bytes of the status block for ``nvcpus`` vCPUs (what to read from STATUS_ADDR)."""
    _check_nvcpus(nvcpus)
    return STATUS_HEADER_SIZE + nvcpus * VCPU_SIZE


def xp_command(nvcpus: int) -> str:
    """The HMP command (for QMP ``human-monitor-command``) that dumps the whole status block."""
    return f"xp /{status_size(nvcpus) // 8}gx {STATUS_ADDR:#x}"


_XP_LINE = re.compile(r"^\s*([0-9a-fA-F]+):((?:\s+0x[0-9a-fA-F]+)+)\s*$")


def parse_xp(text: str) -> bytes:
    """The bytes shown by an ``xp /Ngx`` dump (lines ``ADDR: 0xWORD 0xWORD``), in address order."""
    out = bytearray()
    for line in text.splitlines():
        m = _XP_LINE.match(line)
        if not m:
            if line.strip():
                raise ValueError(f"unexpected xp output line: {line!r}")
            continue
        for word in m.group(2).split():
            out += struct.pack("<Q", int(word, 16))
    return bytes(out)


# --- packing ---------------------------------------------------------------------------------------

def _check_nvcpus(nvcpus: int) -> None:
    if not is_int(nvcpus) or not 1 <= nvcpus <= MAX_VCPUS:
        raise ConfigError(f"the MTE guest runs on 1 to {MAX_VCPUS} vCPUs, not {nvcpus!r}")


def _ppm(name: str, value: float) -> int:
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"workload {name}: {value!r} is not a probability between 0 and 1")
    return round(value * PPM)


def trace_int(value: Any, what: str = "value") -> int:
    """A trace integer: a JSON int or a "0x..." string (as `mtevm tagcheck replay` accepts)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise ConfigError(f"{what}: {value!r} is not an integer")


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not true or false")
    return value


def encode_op(op: Mapping[str, Any], where: str = "trace op") -> bytes:
    """One trace op (a dict as in a `mtevm tagcheck replay` JSON line) as a TRACE_OP_FMT record.

    Ops must stay inside the trace arena (TRACE_ARENA_BASE, TRACE_ARENA_SIZE) so the guest's own
    memory is never touched; tag stores must be 16-byte aligned.
    """
    name = op.get("op")
    if name not in OPCODES or name == "reset":
        raise ConfigError(f"{where}: unknown op {name!r}")
    code = OPCODES[name]
    if name == "config":
        unknown = set(op) - {"op", "tcf", "tcma", "tco"}
        if unknown:
            raise ConfigError(f"{where}: unknown config key(s) {', '.join(sorted(unknown))}")
        mask = tcf = tcma = tco = 0
        if "tcf" in op:
            if op["tcf"] not in TCF_NAMES:
                raise ConfigError(f"{where}: tcf {op['tcf']!r} is not one of {', '.join(TCF_NAMES)}")
            mask |= CFG_TCF
            tcf = TCF_NAMES.index(op["tcf"])
        if "tcma" in op:
            mask |= CFG_TCMA
            tcma = int(_bool(op["tcma"], f"{where}: tcma"))
        if "tco" in op:
            mask |= CFG_TCO
            tco = int(_bool(op["tco"], f"{where}: tco"))
        return struct.pack(TRACE_OP_FMT, code, 0, 0, mask, tcf, tcma, tco, 0)
    if name in ("load", "store"):
        addr = trace_int(op.get("ptr"), f"{where}: ptr")
        size = trace_int(op.get("size"), f"{where}: size")
        if size not in ACCESS_SIZES:
            raise ConfigError(f"{where}: size {size} is not one of {ACCESS_SIZES}")
        tag = 0
        span = size
    else:
        addr = trace_int(op.get("addr"), f"{where}: addr")
        size = 0
        tag = trace_int(op.get("tag", 0), f"{where}: tag") if name != "ldg" else 0
        if not 0 <= tag <= 15:
            raise ConfigError(f"{where}: tag {tag} is not 0..15")
        if name != "ldg" and addr % 16:
            raise ConfigError(f"{where}: {name} address {addr:#x} is not 16-byte aligned")
        span = 32 if name == "st2g" else 16
    if not 0 <= addr < 1 << 64:
        raise ConfigError(f"{where}: address {addr:#x} is not a 64-bit value")
    untagged = addr & ((1 << 56) - 1)
    if not (TRACE_ARENA_BASE <= untagged and untagged + span <= TRACE_ARENA_BASE + TRACE_ARENA_SIZE):
        raise ConfigError(f"{where}: address {addr:#x} is outside the guest's trace arena "
                          f"{TRACE_ARENA_BASE:#x}..{TRACE_ARENA_BASE + TRACE_ARENA_SIZE:#x}")
    return struct.pack(TRACE_OP_FMT, code, size, tag, 0, 0, 0, 0, addr)


def _trace_records(trace: Sequence[Mapping] | Sequence[Sequence[Mapping]]) -> list[bytes]:
    """Records for one trace (a list of op dicts) or a batch of traces (a list of such lists).

    Each trace of a batch starts with a reset op: the guest zeroes the arena's tags, clears TFSR
    and returns to the initial config (tcf sync, tcma off, tco off), as a fresh replay would.
    """
    traces = [trace] if not trace or isinstance(trace[0], Mapping) else trace
    reset = struct.pack(TRACE_OP_FMT, OPCODES["reset"], 0, 0, 0, 0, 0, 0, 0)
    records = []
    for t_index, ops in enumerate(traces):
        records.append(reset)
        for i, op in enumerate(ops):
            if not isinstance(op, Mapping):
                raise ConfigError(f"trace {t_index} op {i}: {op!r} is not an object")
            records.append(encode_op(op, f"trace {t_index} op {i}"))
    if len(records) > MAX_TRACE_OPS:
        raise ConfigError(f"trace too long: {len(records)} ops (with resets), the guest takes at most {MAX_TRACE_OPS}")
    return records


def pack_params(workload: "WorkloadConfig", nvcpus: int, mode: str = "workload",
                trace: Sequence[Mapping] | Sequence[Sequence[Mapping]] | None = None, *,
                ram_size: int = DEFAULT_RAM_SIZE) -> bytes:
    """The parameter block for the guest (write it to params.bin for ``-device loader``).

    ``workload`` is a backend.hosts.workload.WorkloadConfig (or anything with its attributes);
    rates become parts per million. ``ram_size`` is the VM's memory, to check that every vCPU's heap
    fits. In ``trace`` mode, ``trace`` is one trace (a list of op dicts as in `mtevm tagcheck replay`
    JSON lines) or a list of traces run one after another on vCPU 0.
    """
    _check_nvcpus(nvcpus)
    if mode not in MODES:
        raise ConfigError(f"guest mode {mode!r} is not one of {', '.join(MODES)}")
    tcf = []
    for v in range(MAX_VCPUS):
        name = workload.tcf[min(v, len(workload.tcf) - 1)] if workload.tcf else "sync"
        if name not in TCF_NAMES:
            raise ConfigError(f"workload tcf: {name!r} is not one of none, sync, async, asymm")
        tcf.append(TCF_NAMES.index(name))
    rate = workload.rate
    if not is_int(rate) or not 0 <= rate < 1 << 32:
        raise ConfigError(f"workload rate: {rate!r} is not a number of accesses per second >= 0")
    heap_size = workload.heap_size
    if not is_int(heap_size) or heap_size < 4096 or heap_size % 4096:
        raise ConfigError(f"workload heap_size: {heap_size!r} is not a multiple of 4096 >= 4096")
    heap_end = HEAP_BASE + nvcpus * heap_size
    if heap_end > min(RAM_BASE + ram_size, MAPPED_END):
        raise ConfigError(f"workload heap_size: {nvcpus} vCPUs x {heap_size} bytes do not fit in "
                          f"{ram_size >> 20} MiB of RAM above {HEAP_BASE:#x} (the guest maps RAM up to {MAPPED_END:#x})")
    seed = workload.seed
    if not is_int(seed) or not 0 <= seed < 1 << 64:
        raise ConfigError(f"workload seed: {seed!r} is not an integer in 0..2^64-1")
    records: list[bytes] = []
    if mode == "trace":
        if trace is None:
            raise ConfigError("trace mode needs a trace")
        records = _trace_records(trace)
    elif trace is not None:
        raise ConfigError("a trace is only used in trace mode")
    header = struct.pack(
        PARAM_HEADER_FMT, PARAM_MAGIC, ABI_VERSION, MODES[mode], nvcpus, 0, seed,
        _ppm("uaf_rate", workload.uaf_rate), _ppm("overflow_rate", workload.overflow_rate),
        _ppm("wild_rate", workload.wild_rate), rate, HEAP_BASE, heap_size, bytes(tcf),
        len(records), PARAM_HEADER_SIZE, TRACE_ARENA_BASE, TRACE_ARENA_SIZE,
    ).ljust(PARAM_HEADER_SIZE, b"\0")
    return header + b"".join(records)


# --- parsing ---------------------------------------------------------------------------------------

def parse_status_header(raw: bytes) -> dict:
    """The status header: whether the guest is up, how many vCPUs started, trace progress, errors."""
    if len(raw) < STATUS_HEADER_SIZE:
        raise ValueError(f"status block too short: {len(raw)} bytes")
    (magic, version, nvcpus_up, mode, state, ops_done, cntfrq, err_esr, err_elr,
     err_far) = struct.unpack_from(STATUS_HEADER_FMT, raw)
    up = magic == STATUS_MAGIC
    return {
        "up": up, "version": version if up else None, "vcpus_up": nvcpus_up if up else 0,
        "mode": {v: k for k, v in MODES.items()}.get(mode) if up else None,
        "state": GUEST_STATES.get(state, f"unknown({state})") if up else "booting",
        "ops_done": ops_done if up else 0, "cntfrq": cntfrq if up else 0,
        "error": ({"esr": err_esr, "elr": err_elr, "far": err_far} if up and state == 3 else None),
    }


def decode_fault(addr: int, esr: int, info: int) -> dict | None:
    """A FaultInfo-like dict from a vCPU's last-fault words (None before the first fault)."""
    kind = KIND_NAMES.get(info & 0xFF)
    if kind is None:
        return None
    return {
        "kind": kind, "addr": f"{addr:#x}", "ptr_tag": (info >> 24) & 0xF, "mem_tag": (info >> 28) & 0xF,
        "access": "store" if info & 0x100 else "load", "size": (info >> 16) & 0xFF, "esr": esr,
    }


def parse_status(raw: bytes, nvcpus: int) -> list[dict]:
    """VcpuInfo-like dicts (docs/contracts.md) for each vCPU from a status block dump.

    A vCPU that has not come up yet shows zero counters and ``up: False``. ``boot_tags`` is True
    when the tags the vCPU stored at boot verified at every check so far, False once one was
    found lost (it stays False), None before the first check. Counters are read word by word while the guest runs, so two
    counters may disagree by one.
    """
    _check_nvcpus(nvcpus)
    need = status_size(nvcpus)
    if len(raw) < need:
        raise ValueError(f"status block too short: {len(raw)} bytes, {nvcpus} vCPUs need {need}")
    header = parse_status_header(raw)
    out = []
    for i in range(nvcpus):
        f = dict(zip(VCPU_FIELDS, struct.unpack_from(VCPU_FMT, raw, STATUS_HEADER_SIZE + i * VCPU_SIZE)))
        up = header["up"] and f["magic"] == VCPU_MAGIC
        if not up:
            f = dict.fromkeys(VCPU_FIELDS, 0)
        fault = decode_fault(f["last_fault_addr"], f["last_fault_esr"], f["last_fault_info"]) if up else None
        if fault is not None:
            fault["vcpu"] = i
        out.append({
            "index": i, "up": up, "heartbeat": f["heartbeat"],
            "tcf": TCF_NAMES[f["tcf"]] if f["tcf"] < 4 else "none",
            "checked": f["checked"], "unchecked": f["unchecked"],
            "sync_faults": f["sync_faults"], "async_faults": f["async_faults"],
            "last_fault": fault, "boot_tags": BOOT_TAGS.get(f["boot_tags"], False),
            "boot_tag_checks": f["boot_tag_checks"], "cntvct": f["cntvct"],
        })
    return out


def parse_results(raw: bytes, count: int) -> list[dict]:
    """Trace results: per op record {"kind": None|"sync"|"async", "ldg": tag|None, "esr", "far"}."""
    if len(raw) < count * RESULT_SIZE:
        raise ValueError(f"results too short: {len(raw)} bytes for {count} ops")
    out = []
    for i in range(count):
        kind, ldg_valid, tag, esr, far = struct.unpack_from(RESULT_FMT, raw, i * RESULT_SIZE)
        out.append({"kind": KIND_NAMES.get(kind), "ldg": tag if ldg_valid else None, "esr": esr, "far": far})
    return out
