"""Run `mtevm tagcheck replay` traces in a real QEMU guest, for conformance with the tag-check core.

The mtevm guest (backend/qemu/guest) executes the trace ops on vCPU 0 of a fresh
``qemu-system-aarch64 -M virt,mte=on -cpu max -accel tcg`` and records per op: the fault kind, the FAR
of a synchronous fault, whether TFSR_EL1 became set (then the guest clears it, so an async fault
belongs to the op whose access set TFSR -- the rule `mtevm tagcheck replay` follows), and LDG's tag.
When it is done the guest powers off (PSCI SYSTEM_OFF); QEMU runs with ``-no-shutdown`` so the
results stay in RAM and are read with QMP ``pmemsave``. The QEMU process is launched, stopped and
reaped by backend.qemu.driver, as every QEMU mtevm runs.

Several traces run in one boot (each after a reset of the arena's tags and of the config), which is
what keeps the conformance suite fast.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from backend.errors import MtevmError, RealizeError
from backend.qemu import guest_abi
from backend.machine import VirtMachineConfig
from backend.qemu.argv import QEMU_BINARY as DEFAULT_QEMU, LaunchFiles, build_argv, quote_option
from backend.qemu.driver import QemuFiles, QemuProcess
from backend.qemu.guest_abi import GUEST_ELF
from backend.paths import open_private_path

BOOT_TIMEOUT = 60.0        # seconds for the whole batch (TCG on a busy 2-core machine)
TRACE_VM = VirtMachineConfig(name="trace", vcpus=1, memory=256 << 20)   # virt,mte=on, -cpu max, TCG


class TraceRunError(MtevmError):
    """QEMU or the guest failed to run a trace (the message says what happened)."""


class _Workload:
    """The parameter block's workload fields for trace mode: one vCPU, sync, no bugs."""

    seed, tcf, uaf_rate, overflow_rate, wild_rate, rate, heap_size = 1, ["sync"], 0.0, 0.0, 0.0, 0, 4096


def parse_ops(ops: Iterable[Mapping[str, Any] | str]) -> list[dict]:
    """Trace ops as dicts; JSON Lines strings (the replay file format) are parsed, blank lines skipped."""
    out = []
    for n, op in enumerate(ops):
        if isinstance(op, str):
            if not op.strip():
                continue
            try:
                op = json.loads(op)
            except json.JSONDecodeError as e:
                raise TraceRunError(f"line {n + 1}: not JSON: {e}") from None
        if not isinstance(op, Mapping):
            raise TraceRunError(f"line {n + 1}: {op!r} is not an object")
        out.append(dict(op))
    return out


def qemu_argv(qemu: str, params: Path, qmp_sock: Path, serial_log: Path) -> list[str]:
    """build_argv's command line (as for every VM) for one trace batch on one vCPU, kept alive
    after the guest's power-off."""
    files = LaunchFiles(str(qmp_sock), str(GUEST_ELF), str(params), guest_abi.PARAM_ADDR)
    return build_argv(TRACE_VM, files, qemu=qemu) + [
        "-no-shutdown", "-serial", f"file:{quote_option(str(serial_log))}"]


_OP_COUNTER = {"stg": "tag_stores", "st2g": "tag_stores", "stzg": "tag_stores", "ldg": "ldg",
               "load": "loads", "store": "stores"}


def _is_checked(ptr: int, tcf: str, tcma: bool, tco: bool) -> bool:
    """Whether the architecture checks an access (lower half, Normal Tagged RAM): TCF not none,
    PSTATE.TCO clear, and not a TCMA0 match-all pointer (bits 59:55 all zero)."""
    return tcf != "none" and not tco and not (tcma and (ptr >> 55) & 0x1F == 0)


def results_to_json(ops: Sequence[Mapping[str, Any]], results: Sequence[dict]) -> dict:
    """The `mtevm tagcheck replay --json` shape from the guest's per-op results of one trace.

    Faults and LDG tags are what QEMU did. The counters are their totals, plus op counts and the
    checked/unchecked split, which QEMU does not report: those follow from the config in force at
    each access (``_is_checked``).
    """
    faults, ldg = [], []
    counts = {"checked": 0, "unchecked": 0, "ops": 0, "loads": 0, "stores": 0, "tag_stores": 0, "ldg": 0}
    tcf, tcma, tco = "sync", False, False
    for i, (op, r) in enumerate(zip(ops, results)):
        name = op.get("op")
        counts["ops"] += 1
        if name in _OP_COUNTER:
            counts[_OP_COUNTER[name]] += 1
        if name == "config":
            tcf, tcma, tco = op.get("tcf", tcf), op.get("tcma", tcma), op.get("tco", tco)
        elif name in ("load", "store"):
            checked = _is_checked(guest_abi.trace_int(op["ptr"]), tcf, tcma, tco)
            counts["checked" if checked else "unchecked"] += 1
        if r["kind"] == "sync":
            faults.append({"i": i, "kind": "sync", "addr": f"{r['far'] & ((1 << 56) - 1):#x}"})
        elif r["kind"] == "async":
            faults.append({"i": i, "kind": "async", "addr": None})
        if name == "ldg":
            ldg.append({"i": i, "tag": r["ldg"]})
    counters = {
        "sync_faults": sum(f["kind"] == "sync" for f in faults),
        "async_faults": sum(f["kind"] == "async" for f in faults),
        **counts,
    }
    return {"faults": faults, "ldg": ldg, "counters": counters}


async def _wait_for_poweroff(proc: QemuProcess, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        status = await proc.qmp.execute("query-status")
        if status["status"] == "shutdown":
            return
        if not proc.alive():
            raise TraceRunError(f"{proc.exit_reason()} before the trace finished")
        if loop.time() > deadline:
            raise TraceRunError("the guest did not finish the trace in time")
        await asyncio.sleep(0.02)


async def run_traces_in_qemu_async(traces: Sequence[Iterable[Mapping[str, Any] | str]], *,
                                   qemu: str = DEFAULT_QEMU, timeout: float = BOOT_TIMEOUT) -> list[dict]:
    """Run several traces in one QEMU boot; one replay-shaped dict per trace, in order."""
    parsed = [parse_ops(t) for t in traces]
    if not parsed:
        return []
    if not GUEST_ELF.exists():
        raise TraceRunError(f"the guest is not built: {GUEST_ELF} (run make -C backend/qemu/guest)")
    if shutil.which(qemu) is None:
        raise TraceRunError(f"{qemu} not found")
    params = guest_abi.pack_params(_Workload(), 1, mode="trace", trace=parsed)
    total = sum(len(t) + 1 for t in parsed)          # each trace starts with a reset record
    with tempfile.TemporaryDirectory(prefix="mtevm-trace-") as tmp:
        d = Path(tmp)
        with os.fdopen(open_private_path(str(d / "params.bin"), os.O_WRONLY, exclusive=True), "wb") as f:
            f.write(params)
        files = QemuFiles.new(tmp)
        argv = qemu_argv(qemu, d / "params.bin", Path(files.qmp_socket), d / "serial.log")
        # The driver launches, connects QMP and always stops (by pidfd) and reaps this QEMU.
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            proc = await QemuProcess.launch(argv, files, ready_timeout=timeout)
        except RealizeError as e:
            raise TraceRunError(f"QEMU did not start: {e}") from None
        try:
            await _wait_for_poweroff(proc, deadline)
            await proc.qmp.execute("pmemsave", {"val": guest_abi.STATUS_ADDR, "size": guest_abi.status_size(1),
                                                "filename": str(d / "status.bin")})
            await proc.qmp.execute("pmemsave", {"val": guest_abi.RESULTS_ADDR,
                                                "size": total * guest_abi.RESULT_SIZE,
                                                "filename": str(d / "results.bin")})
        except TraceRunError as e:
            stderr = "\n".join(proc.stderr_tail(50))
            raise TraceRunError(f"{e}{': ' + stderr if stderr else ''}") from None
        finally:
            await proc.stop()
        header = guest_abi.parse_status_header((d / "status.bin").read_bytes())
        if header["state"] != "done" or header["ops_done"] != total:
            err = header["error"] or {}
            raise TraceRunError(
                f"the guest stopped in state {header['state']} after {header['ops_done']} of {total} ops"
                + (f" (ESR {err['esr']:#x} at {err['elr']:#x}, FAR {err['far']:#x})" if err else ""))
        results = guest_abi.parse_results((d / "results.bin").read_bytes(), total)
    out, pos = [], 0
    for ops in parsed:
        pos += 1                                     # the reset record
        out.append(results_to_json(ops, results[pos:pos + len(ops)]))
        pos += len(ops)
    return out


def run_traces_in_qemu(traces: Sequence[Iterable[Mapping[str, Any] | str]], *,
                       qemu: str = DEFAULT_QEMU, timeout: float = BOOT_TIMEOUT) -> list[dict]:
    """Blocking form of run_traces_in_qemu_async (not for use inside a running event loop)."""
    return asyncio.run(run_traces_in_qemu_async(traces, qemu=qemu, timeout=timeout))


def run_trace_in_qemu(ops: Iterable[Mapping[str, Any] | str], *, qemu: str = DEFAULT_QEMU,
                      timeout: float = BOOT_TIMEOUT) -> dict:
    """One trace in a fresh QEMU guest, as `mtevm tagcheck replay --json` would print it."""
    return run_traces_in_qemu([ops], qemu=qemu, timeout=timeout)[0]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backend.qemu.trace_runner TRACE.jsonl``: print the QEMU guest's replay JSON."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m backend.qemu.trace_runner", description=main.__doc__)
    ap.add_argument("trace", help="a JSON Lines trace, as for `mtevm tagcheck replay`")
    ap.add_argument("--qemu", default=DEFAULT_QEMU)
    args = ap.parse_args(argv)
    try:
        with open(args.trace) as f:
            print(json.dumps(run_trace_in_qemu(f.read().splitlines(), qemu=args.qemu)))
    except (OSError, MtevmError) as e:
        print(f"trace_runner: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OSError) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
