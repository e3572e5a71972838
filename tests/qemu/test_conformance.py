"""Conformance: mtevm's tag-check core against real QEMU, op by op.

Every seeded trace of tests/qemu/traces.py runs twice: in the bare-metal guest on a real
``qemu-system-aarch64 -M virt,mte=on -cpu max -accel tcg`` (all traces in one boot, see
backend/qemu/trace_runner.py) and through the real ``mtevm tagcheck replay --json`` command in a
subprocess. Faults (op index, kind, address), LDG values and counters must be identical. A difference is a bug
in the core (backend/tagcheck), never something to adjust here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import traces
from backend.qemu.trace_runner import GUEST_ELF, run_traces_in_qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None or not GUEST_ELF.exists(),
                       reason="needs qemu-system-aarch64 (scripts/install-deps.sh) and the built guest"),
]

TRACES = traces.all_traces()
REPO = Path(__file__).resolve().parents[2]


def _replay_command() -> list[str]:
    """`mtevm tagcheck replay` (the CLI) when it is wired, else the replay module it delegates to."""
    mtevm = shutil.which("mtevm")
    if mtevm:
        probe = subprocess.run([mtevm, "tagcheck", "replay", "--help"], capture_output=True, cwd=REPO)
        if probe.returncode == 0:
            return [mtevm, "tagcheck", "replay"]
    return [sys.executable, "-m", "backend.tagcheck.replay"]


def _replay(command: list[str], path: Path) -> dict:
    r = subprocess.run([*command, str(path), "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, f"{' '.join(command)} {path.name} failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def qemu_results() -> list[dict]:
    return run_traces_in_qemu(TRACES)


@pytest.fixture(scope="module")
def replay_results(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("traces")
    paths = []
    for i, trace in enumerate(TRACES):
        paths.append(directory / f"trace-{i:02d}.jsonl")
        paths[-1].write_text(traces.to_jsonl(trace))
    command = _replay_command()
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda p: _replay(command, p), paths))


@pytest.mark.parametrize("index", range(len(TRACES)))
def test_qemu_and_core_agree(index, qemu_results, replay_results):
    qemu, core = qemu_results[index], replay_results[index]
    trace_file = f"python tests/qemu/traces.py DIR -> DIR/trace-{index:02d}.jsonl"
    assert core["faults"] == qemu["faults"], f"faults differ for {trace_file}"
    assert core["ldg"] == qemu["ldg"], f"LDG values differ for {trace_file}"
    # counters: fault totals measured in QEMU; op counts and checked/unchecked from the trace's config
    assert core["counters"] == qemu["counters"], f"counters differ for {trace_file}"
    assert core == qemu                           # the same JSON, key for key


def test_traces_cover_every_mode_size_and_boundary():
    """The generated traces exercise what the suite claims (a generator change cannot hollow it out)."""
    seen = set()
    for trace in TRACES:
        tcf, tcma, tco = "sync", False, False
        for op in trace:
            if op["op"] == "config":
                tcf, tcma, tco = op.get("tcf", tcf), op.get("tcma", tcma), op.get("tco", tco)
                continue
            seen.add(op["op"])
            if op["op"] not in ("load", "store"):
                continue
            ptr, size = int(op["ptr"], 0), op["size"]
            addr = ptr & ((1 << 56) - 1)
            seen |= {("tcf", tcf, op["op"]), ("size", size)}
            if addr // 16 != (addr + size - 1) // 16:
                seen.add("crosses granule")
            if addr // 4096 != (addr + size - 1) // 4096:
                seen.add(("crosses page", tcf))
            if tcma and (ptr >> 56) & 0xF == 0:
                seen.add("tcma match-all pointer")
            if tco and tcf != "none":
                seen.add("tco")
            if ptr >> 60:
                seen.add("pointer bits 63:60 set")
    need = {("tcf", m, a) for m in traces.MODES for a in ("load", "store")} | {("size", s) for s in traces.SIZES}
    need |= {("crosses page", m) for m in ("sync", "async", "asymm")}
    need |= {"crosses granule", "tcma match-all pointer", "tco", "pointer bits 63:60 set",
             "stg", "st2g", "stzg", "ldg"}
    assert need <= seen, f"not covered: {sorted(map(str, need - seen))}"
    assert len(TRACES) >= 30


def test_qemu_results_hold_every_fault_kind_and_far_rule(qemu_results):
    """The QEMU side saw sync and async faults and both FAR rules (access start / granule base)."""
    kinds, far_rules = set(), set()
    for trace, result in zip(TRACES, qemu_results):
        for fault in result["faults"]:
            kinds.add(fault["kind"])
            if fault["kind"] == "sync":
                ptr = int(trace[fault["i"]]["ptr"], 0) & ((1 << 56) - 1)
                far_rules.add("start" if int(fault["addr"], 0) == ptr else "granule")
    assert kinds == {"sync", "async"} and far_rules == {"start", "granule"}
