"""The bare-metal MTE guest in real qemu-system-aarch64 processes (TCG, -M virt,mte=on).

What a user relies on: every vCPU comes up and its counters rise; synchronous faults are counted
only when the workload injects bugs, asynchronous ones in async mode, none at all with tcf none;
the boot tags verify; trace mode reports the fault addresses and ESR rules measured on QEMU; the
ABI constants in the guest's C header match guest_abi.py; the Makefile works without the cross
compiler when the committed ELF exists. Every QEMU started here is stopped by its PID.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from backend.errors import ConfigError
from backend.hosts.workload import WorkloadConfig
from backend.qemu import guest_abi
from backend.qemu.driver import QemuFiles, QemuProcess
from backend.qemu.trace_runner import GUEST_ELF, TraceRunError, run_trace_in_qemu

GUEST_DIR = GUEST_ELF.parent.parent
QEMU = shutil.which("qemu-system-aarch64")
_skip_without_qemu = pytest.mark.skipif(QEMU is None or not GUEST_ELF.exists(),
                                        reason="needs qemu-system-aarch64 (scripts/install-deps.sh) and the built guest")


def needs_qemu(test):
    """Marks a test that runs real QEMU (marker ``qemu``), skipped where QEMU is not installed."""
    return pytest.mark.qemu(_skip_without_qemu(test))


# --- the ABI without QEMU ---------------------------------------------------------------------------

def test_c_header_matches_guest_abi():
    """Every address, magic and op code in abi.h equals guest_abi.py's (the two sides of one ABI)."""
    defines = dict(re.findall(r"^#define\s+(\w+)\s+(0x[0-9A-Fa-f]+|\d+)(?:UL?)?\b", (GUEST_DIR / "abi.h").read_text(), re.M))
    boot_tags = {"UNCHECKED": None, "OK": True, "LOST": False}
    for name, text in defines.items():
        value = int(text, 0)
        if hasattr(guest_abi, name):
            assert getattr(guest_abi, name) == value, name
        elif name.startswith("OP_"):
            assert guest_abi.OPCODES[name[3:].lower()] == value, name
        elif name.startswith("MODE_"):
            assert guest_abi.MODES[name[5:].lower()] == value, name
        elif name.startswith("STATE_"):
            assert guest_abi.GUEST_STATES[value] == name[6:].lower(), name
        elif name.startswith("BOOT_TAGS_"):
            assert guest_abi.BOOT_TAGS[value] is boot_tags[name[10:]], name
        else:
            pytest.fail(f"abi.h defines {name}, which guest_abi.py does not have")
    assert len(defines) >= 40
    assert guest_abi.STATUS_HEADER_SIZE == 64 and guest_abi.VCPU_SIZE == 128
    assert guest_abi.TRACE_OP_SIZE == 16 and guest_abi.RESULT_SIZE == 16


def test_pack_params_encodes_rates_as_ppm_and_tcf_per_vcpu():
    w = WorkloadConfig(seed=7, tcf=["async", "none"], uaf_rate=0.25, overflow_rate=0.5, wild_rate=1.0,
                       rate=1234, heap_size=8192)
    raw = guest_abi.pack_params(w, 3)
    fields = struct.unpack_from(guest_abi.PARAM_HEADER_FMT, raw)
    magic, version, mode, nvcpus, _flags, seed, uaf, ovf, wild, rate, heap_base, heap_size, tcf = fields[:13]
    assert (magic, version, mode, nvcpus, seed) == (guest_abi.PARAM_MAGIC, 1, 0, 3, 7)
    assert (uaf, ovf, wild, rate) == (250_000, 500_000, 1_000_000, 1234)
    assert (heap_base, heap_size) == (guest_abi.HEAP_BASE, 8192)
    assert list(tcf) == [2, 0, 0, 0, 0, 0, 0, 0]       # the last mode repeats for later vCPUs
    assert len(raw) == guest_abi.PARAM_HEADER_SIZE


@pytest.mark.parametrize("call, message", [
    (lambda: guest_abi.pack_params(WorkloadConfig(), 9), "1 to 8 vCPUs"),
    (lambda: guest_abi.pack_params(WorkloadConfig(heap_size=64 << 20), 4, ram_size=128 << 20), "do not fit"),
    (lambda: guest_abi.pack_params(WorkloadConfig(uaf_rate=1.5), 1), "probability"),
    (lambda: guest_abi.pack_params(WorkloadConfig(), 1, "trace",
                                   [{"op": "load", "ptr": "0x40000000", "size": 8}]), "outside the guest's trace arena"),
    (lambda: guest_abi.pack_params(WorkloadConfig(), 1, "trace",
                                   [{"op": "stg", "addr": guest_abi.TRACE_ARENA_BASE + 8, "tag": 1}]), "not 16-byte aligned"),
    (lambda: guest_abi.pack_params(WorkloadConfig(), 1, "trace",
                                   [{"op": "load", "ptr": guest_abi.TRACE_ARENA_BASE, "size": 3}]), "size 3"),
    (lambda: guest_abi.pack_params(WorkloadConfig(), 1, "trace", [{"op": "jump"}]), "unknown op"),
    (lambda: guest_abi.pack_params(WorkloadConfig(), 1, "mystery"), "guest mode"),
])
def test_pack_params_refuses_bad_input_clearly(call, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


def test_parse_xp_and_status_roundtrip():
    words = list(range(guest_abi.status_size(2) // 8))
    words[0] = guest_abi.STATUS_MAGIC
    words[guest_abi.STATUS_HEADER_SIZE // 8] = guest_abi.VCPU_MAGIC      # vCPU 0 up, vCPU 1 not
    text = "\n".join(f"{guest_abi.STATUS_ADDR + 16 * k:016x}: {words[2 * k]:#018x} {words[2 * k + 1]:#018x}"
                     for k in range(len(words) // 2))
    vcpus = guest_abi.parse_status(guest_abi.parse_xp(text), 2)
    assert vcpus[0]["up"] and not vcpus[1]["up"] and vcpus[1]["checked"] == 0
    assert vcpus[0]["checked"] == 10 and vcpus[0]["sync_faults"] == 12
    with pytest.raises(ValueError):
        guest_abi.parse_xp("this is not xp output")


# --- the Makefile -------------------------------------------------------------------------------------

def _copy_guest(tmp_path: Path) -> Path:
    dst = tmp_path / "guest"
    shutil.copytree(GUEST_DIR, dst)
    return dst


@pytest.mark.skipif(not GUEST_ELF.exists(), reason="needs the committed guest ELF")
def test_make_without_cross_compiler_uses_committed_elf(tmp_path):
    guest = _copy_guest(tmp_path)
    before = (guest / "build/mtevm-guest.elf").read_bytes()
    r = subprocess.run(["make", "-C", str(guest), "CROSS=/nonexistent/aarch64-"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "not found: using the committed build/mtevm-guest.elf" in r.stdout
    assert (guest / "build/mtevm-guest.elf").read_bytes() == before
    (guest / "build/mtevm-guest.elf").unlink()
    r = subprocess.run(["make", "-C", str(guest), "CROSS=/nonexistent/aarch64-"], capture_output=True, text=True)
    assert r.returncode != 0 and "install gcc-aarch64-linux-gnu" in r.stderr


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs aarch64-linux-gnu-gcc")
def test_make_builds_once_then_is_a_noop(tmp_path):
    guest = _copy_guest(tmp_path)
    (guest / "build/mtevm-guest.elf").unlink()
    subprocess.run(["make", "-s", "-C", str(guest)], check=True, capture_output=True)
    built = guest / "build/mtevm-guest.elf"
    stamp = built.stat().st_mtime_ns
    r = subprocess.run(["make", "-s", "-C", str(guest)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and built.stat().st_mtime_ns == stamp
    # the committed ELF is what the sources build (gcc output is deterministic here)
    assert built.read_bytes() == GUEST_ELF.read_bytes()


# --- real QEMU: workload mode -------------------------------------------------------------------------

class GuestVm:
    """One qemu-system-aarch64 running the guest (launched and stopped by the driver, as every
    QEMU mtevm runs), and a way to read its status block."""

    def __init__(self, proc: QemuProcess, nvcpus: int, serial: Path):
        self.proc, self.nvcpus, self.serial = proc, nvcpus, serial

    @classmethod
    async def boot(cls, tmp: Path, workload: WorkloadConfig, nvcpus: int, machine: str) -> "GuestVm":
        (tmp / "params.bin").write_bytes(guest_abi.pack_params(workload, nvcpus))
        files, serial = QemuFiles.new(str(tmp)), tmp / "serial.log"
        argv = [QEMU, "-M", machine, "-cpu", "max", "-accel", "tcg", "-nodefaults", "-display", "none",
                "-smp", str(nvcpus), "-m", "256M", "-kernel", str(GUEST_ELF),
                "-device", f"loader,file={tmp / 'params.bin'},addr={guest_abi.PARAM_ADDR:#x},force-raw=on",
                "-serial", f"file:{serial}", "-qmp", f"unix:{files.qmp_socket},server=on,wait=off"]
        return cls(await QemuProcess.launch(argv, files), nvcpus, serial)

    async def status(self) -> tuple[dict, list[dict]]:
        raw = guest_abi.parse_xp(await self.proc.qmp.hmp(guest_abi.xp_command(self.nvcpus)))
        return guest_abi.parse_status_header(raw), guest_abi.parse_status(raw, self.nvcpus)

    async def wait_for(self, predicate, what: str, timeout: float = 60.0) -> list[dict]:
        """Sample the status block until ``predicate(vcpus)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            header, vcpus = await self.status()
            assert header["error"] is None, f"guest error: {header['error']}"
            if predicate(vcpus):
                return vcpus
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {vcpus}"
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await self.proc.kill()
        assert not os.path.exists(f"/proc/{self.proc.pid}")


@pytest.fixture
async def boot(tmp_path):
    vms: list[GuestVm] = []

    async def start(workload: WorkloadConfig, nvcpus: int, machine: str = "virt,mte=on") -> GuestVm:
        directory = tmp_path / f"vm{len(vms)}"
        directory.mkdir()
        vm = await GuestVm.boot(directory, workload, nvcpus, machine)   # a failed launch leaves no QEMU
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        await vm.stop()


def _all(vcpus, pred) -> bool:
    return all(v["up"] and pred(v) for v in vcpus)


@needs_qemu
async def test_every_vcpu_comes_up_and_counts_faults_per_tcf(boot):
    w = WorkloadConfig(seed=3, tcf=["sync", "async", "asymm", "none"], uaf_rate=0.01, overflow_rate=0.01,
                       wild_rate=0.01, rate=40000, heap_size=64 << 10)
    vm = await boot(w, 4)
    first = await vm.wait_for(lambda vs: _all(vs, lambda v: v["heartbeat"] > 0), "all 4 vCPUs up")
    vcpus = await vm.wait_for(
        lambda vs: _all(vs, lambda v: v["checked"] + v["unchecked"] >= 20000)
        and vs[0]["sync_faults"] >= 20 and vs[1]["async_faults"] >= 20
        and vs[2]["sync_faults"] >= 5 and vs[2]["async_faults"] >= 5, "faults on every faulting vCPU")
    sync, asyn, asymm, none = vcpus
    assert [v["tcf"] for v in vcpus] == ["sync", "async", "asymm", "none"]
    for before, after in zip(first, vcpus):
        assert after["heartbeat"] > before["heartbeat"]
        assert after["checked"] + after["unchecked"] > before["checked"] + before["unchecked"]
    assert sync["async_faults"] == 0 and sync["last_fault"]["kind"] == "sync"
    assert sync["last_fault"]["esr"] in (0x96000011, 0x96000051)
    assert sync["last_fault"]["ptr_tag"] != sync["last_fault"]["mem_tag"]
    assert asyn["sync_faults"] == 0 and asyn["last_fault"]["kind"] == "async"
    assert none["checked"] == 0 and none["unchecked"] > 0
    assert none["sync_faults"] == none["async_faults"] == 0 and none["last_fault"] is None
    assert all(v["boot_tags"] is True and v["boot_tag_checks"] >= 1 for v in vcpus)
    header, _ = await vm.status()
    assert header["vcpus_up"] == 4 and header["state"] == "running" and header["mode"] == "workload"
    log = vm.serial.read_text()
    assert all(f"mtevm-guest: cpu {i} up" in log for i in range(4))


@needs_qemu
async def test_no_bugs_no_faults_and_tcf_none_never_faults(boot):
    clean = await boot(WorkloadConfig(seed=5, tcf=["sync", "async", "asymm"], uaf_rate=0.0, overflow_rate=0.0,
                                      wild_rate=0.0, rate=50000, heap_size=64 << 10), 3)
    unchecked = await boot(WorkloadConfig(seed=5, tcf=["none"], uaf_rate=0.05, overflow_rate=0.05,
                                          wild_rate=0.05, rate=50000, heap_size=64 << 10), 2)
    vcpus = await clean.wait_for(lambda vs: _all(vs, lambda v: v["checked"] >= 30000), "30000 clean accesses")
    assert all(v["sync_faults"] == 0 and v["async_faults"] == 0 and v["last_fault"] is None for v in vcpus)
    vcpus = await unchecked.wait_for(lambda vs: _all(vs, lambda v: v["unchecked"] >= 30000), "unchecked accesses")
    assert all(v["checked"] == 0 and v["sync_faults"] == 0 and v["async_faults"] == 0 for v in vcpus)


@needs_qemu
@pytest.mark.parametrize("machine", ["virt,mte=on,secure=on", "virt,mte=on,virtualization=on"])
async def test_guest_starts_all_vcpus_whatever_el_qemu_enters_at(boot, machine):
    """secure=on enters at EL3 (no PSCI: spin table), virtualization=on at EL2 (PSCI over SMC)."""
    w = WorkloadConfig(seed=9, tcf=["sync", "async"], uaf_rate=0.02, overflow_rate=0.0, wild_rate=0.0,
                       rate=40000, heap_size=64 << 10)
    vm = await boot(w, 2, machine)
    vcpus = await vm.wait_for(lambda vs: vs[0]["sync_faults"] >= 5 and vs[1]["async_faults"] >= 5,
                              "faults on both vCPUs")
    assert vcpus[0]["async_faults"] == 0 and vcpus[1]["sync_faults"] == 0
    assert all(v["boot_tags"] is True for v in vcpus)


# --- real QEMU: trace mode (the rules measured on QEMU 10, see qemu-tcg-mte-notes.md) ----------------

A = guest_abi.TRACE_ARENA_BASE


def _ptr(addr: int, tag: int) -> str:
    return f"{addr | tag << 56:#x}"


@needs_qemu
def test_trace_mode_reports_far_and_async_rules():
    page_end = A + 0x1000
    ops = [
        {"op": "stg", "addr": A, "tag": 3},
        {"op": "ldg", "addr": A + 9},                                     # 1: LDG of a tagged granule
        {"op": "load", "ptr": _ptr(A + 4, 3), "size": 16},                # 2: crosses into tag-0 granule
        {"op": "load", "ptr": _ptr(A + 4, 5), "size": 8},                 # 3: first granule wrong: FAR = ptr
        {"op": "st2g", "addr": page_end - 16, "tag": 7},                  # 4: also tags the next page's first
        {"op": "ldg", "addr": page_end},                                  # 5
        {"op": "store", "ptr": _ptr(page_end - 8, 7), "size": 16},        # 6: crosses the page: no fault
        {"op": "stg", "addr": page_end, "tag": 2},
        {"op": "load", "ptr": _ptr(page_end - 8, 7), "size": 16},         # 8: FAR = next page base
        {"op": "config", "tcf": "async"},
        {"op": "store", "ptr": _ptr(A, 4), "size": 1},                    # 10: async, at this op
        {"op": "load", "ptr": _ptr(A, 3), "size": 1},                     # 11: matches: nothing
        {"op": "config", "tcf": "asymm"},
        {"op": "store", "ptr": _ptr(A, 4), "size": 2},                    # 13: asymm store: async
        {"op": "load", "ptr": _ptr(A, 4), "size": 4},                     # 14: asymm load: sync
        {"op": "config", "tcf": "sync", "tcma": True},
        {"op": "load", "ptr": _ptr(A, 0), "size": 8},                     # 16: tag 0 + TCMA: unchecked
        {"op": "load", "ptr": _ptr(A + 0x100, 1), "size": 8},             # 17: non-zero into tag 0: faults
        {"op": "config", "tco": True},
        {"op": "load", "ptr": _ptr(A + 0x100, 1), "size": 8},             # 19: TCO: unchecked
    ]
    result = run_trace_in_qemu(ops)
    assert result["ldg"] == [{"i": 1, "tag": 3}, {"i": 5, "tag": 7}]
    assert result["faults"] == [
        {"i": 2, "kind": "sync", "addr": f"{A + 0x10:#x}"},
        {"i": 3, "kind": "sync", "addr": f"{A + 4:#x}"},
        {"i": 8, "kind": "sync", "addr": f"{page_end:#x}"},
        {"i": 10, "kind": "async", "addr": None},
        {"i": 13, "kind": "async", "addr": None},
        {"i": 14, "kind": "sync", "addr": f"{A:#x}"},
        {"i": 17, "kind": "sync", "addr": f"{A + 0x100:#x}"},
    ]
    assert result["counters"]["sync_faults"] == 5 and result["counters"]["async_faults"] == 2


@needs_qemu
def test_trace_runner_refuses_ops_outside_the_arena_before_starting_qemu():
    with pytest.raises(ConfigError, match="outside the guest's trace arena"):
        run_trace_in_qemu([{"op": "ldg", "addr": "0x40080000"}])
    with pytest.raises(TraceRunError, match="line 1: not JSON"):
        run_trace_in_qemu(["{not json"])


def _qemu_children() -> list[int]:
    """PIDs of qemu-system-aarch64 processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if "qemu-system" in comm and int(rest.split()[1]) == os.getpid():   # comm: 15 chars at most
            found.append(int(entry))
    return found


@needs_qemu
def test_trace_runner_leaves_no_qemu_behind():
    assert run_trace_in_qemu([{"op": "ldg", "addr": f"{A:#x}"}])["ldg"] == [{"i": 0, "tag": 0}]
    assert _qemu_children() == []
