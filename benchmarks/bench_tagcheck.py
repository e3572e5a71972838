"""The tag-check core: how fast a batch is checked, against C, and what tags cost in memory.

Figures (goals in benchmarks/README.md):
1. Checked accesses/s of ``TagCheckCpu.run_batch`` on batches of 64k random 8-byte accesses over
   1 GiB of RAM whose every granule has a random tag, beside a C reference (benchmarks/c/
   tagcheck_ref.c, gcc -O2, built here in a temp dir) running the same check over the same tags
   (written in QEMU's 2-tags-per-byte layout) and the same accesses; ratio Python / C (goal <= 3).
   Both must count the same faults. Three access mixes: aligned pointers with the right tag
   except 1 in 100; aligned pointers with random tags (15 in 16 fault); unaligned (granule-crossing).
2. The per-access Python path (``cpu.load`` in a loop) on the same accesses: what vectorising buys.
3. Tag memory: bytes after tagging N pages (goal N*4096/32 plus a small index), for a 1 GiB and a
   64 GiB VM, and an untouched 64 GiB VM's bytes and creation time.
4. The heap workload (backend/hosts/heap.py) of one vCPU flat out: checked accesses/s.

Run: ``python -m benchmarks.bench_tagcheck`` (or ``python -m benchmarks tagcheck``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.hosts.heap import TaggedHeapWorkload
from backend.hosts.workload import WorkloadConfig
from backend.tagcheck import TCF, GuestRam, TagCheckCpu

BASE = 0x40000000
RAM = 1 << 30
BATCH = 65536
REPEATS = 10              # batches per round (the best counts)
ROUNDS = 3                # rounds of Python and C in turn
SCALAR_ACCESSES = 20000
GOAL_RATIO = 3.0
C_SOURCE = Path(__file__).resolve().parent / "c" / "tagcheck_ref.c"


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def build_c(tmp: Path) -> Path | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    exe = tmp / "tagcheck_ref"
    subprocess.run([gcc, "-O2", "-o", str(exe), str(C_SOURCE)], check=True)
    return exe


def run_c(exe: Path, tags_file: Path, ptrs: np.ndarray, size: int, tmp: Path) -> tuple[int, float]:
    """(faults, best seconds per pass) of the C reference on these accesses."""
    acc = tmp / "accesses.bin"
    np.stack([ptrs, np.full(len(ptrs), size, dtype=np.uint64)], axis=1).astype("<u8").tofile(acc)
    out = subprocess.run([str(exe), str(tags_file), str(acc), hex(BASE), str(REPEATS * 3)],
                         check=True, capture_output=True, text=True).stdout
    fields = dict(kv.split("=") for kv in out.split())
    return int(fields["faults"]), int(fields["best_ns"]) / 1e9


def access_mixes(ram: GuestRam, rng: np.random.Generator) -> dict[str, np.ndarray]:
    aligned = np.uint64(BASE) + rng.integers(0, RAM // 8, BATCH, dtype=np.uint64) * np.uint64(8)
    unaligned = np.uint64(BASE) + rng.integers(0, RAM - 8, BATCH, dtype=np.uint64)

    def with_tags(addrs, wrong_fraction):
        tags = ram.tags.tags_of_granules(addrs).astype(np.uint64)
        wrong = rng.random(len(addrs)) < wrong_fraction
        tags[wrong] = (tags[wrong] + rng.integers(1, 16, int(wrong.sum()), dtype=np.uint64)) & np.uint64(15)
        return addrs | (tags << np.uint64(56))

    return {"aligned, 1% wrong tags": with_tags(aligned, 0.01),
            "aligned, random tags": aligned | (rng.integers(0, 16, BATCH, dtype=np.uint64) << np.uint64(56)),
            "unaligned, 1% wrong tags": with_tags(unaligned, 0.01)}


def bench_batches(results: dict) -> None:
    rng = np.random.default_rng(2024)
    ram = GuestRam(BASE, RAM, mte=True)
    t = time.perf_counter()
    ram.tags.set_tags(BASE, rng.integers(0, 16, RAM // 16, dtype=np.uint8))
    tag_s = time.perf_counter() - t
    print(f"tagged 1 GiB ({ram.tags.tagged_pages} pages, random tags) via set_tags in {tag_s:.2f} s")
    mixes = access_mixes(ram, rng)
    with tempfile.TemporaryDirectory(prefix="mtevm-bench-") as d:
        tmp = Path(d)
        exe = build_c(tmp)
        tags_file = tmp / "tags.bin"
        ram.tags.packed(BASE, RAM).tofile(tags_file)
        if exe is None:
            print("C reference skipped: gcc not found")
        print(f"\n{'64k x 8-byte accesses':28s} {'Python batch':>14s} {'C reference':>14s} {'ratio':>7s}  faults")
        for name, ptrs in mixes.items():
            cpu = TagCheckCpu(ram, tcf=TCF.SYNC)
            py_faults = cpu.run_batch(ptrs, 8, False).sync_faults
            py_s = c_s = float("inf")
            for _ in range(ROUNDS):       # alternate, so a burst of other load hits both sides
                py_s = min(py_s, best_of(lambda: cpu.run_batch(ptrs, 8, False), REPEATS))
                if exe is not None:
                    c_faults, c_round = run_c(exe, tags_file, ptrs, 8, tmp)
                    c_s = min(c_s, c_round)
            row = {"python_checks_per_s": BATCH / py_s, "python_faults": py_faults}
            line = f"{name:28s} {BATCH / py_s / 1e6:10.1f} M/s"
            if exe is not None:
                row.update(c_checks_per_s=BATCH / c_s, c_faults=c_faults, ratio=py_s / c_s)
                same = "same" if c_faults == py_faults else f"DIFFER (C {c_faults})"
                line += f" {BATCH / c_s / 1e6:10.1f} M/s {py_s / c_s:6.2f}x  {py_faults} ({same})"
            else:
                line += f" {'-':>14s} {'-':>7s}  {py_faults}"
            print(line)
            results[name] = row
        headline = results["aligned, 1% wrong tags"]
        if "ratio" in headline:
            verdict = "meets" if headline["ratio"] <= GOAL_RATIO else "MISSES"
            print(f"goal: Python batch within {GOAL_RATIO:.0f}x of C -> {headline['ratio']:.2f}x ({verdict})")

    # the per-access path on the same accesses
    ptrs = [int(p) for p in mixes["aligned, 1% wrong tags"][:SCALAR_ACCESSES]]
    cpu = TagCheckCpu(ram, tcf=TCF.SYNC)
    t = time.perf_counter()
    for p in ptrs:
        cpu.load(p, 8)
    scalar = SCALAR_ACCESSES / (time.perf_counter() - t)
    batch = results["aligned, 1% wrong tags"]["python_checks_per_s"]
    results["per_access_checks_per_s"] = scalar
    print(f"per-access path (cpu.load in a loop): {scalar / 1e6:.2f} M/s; the batch is {batch / scalar:.0f}x faster")


def bench_memory(results: dict) -> None:
    print()
    for label, size, pages in (("1 GiB VM", 1 << 30, 1 << 18), ("64 GiB VM", 64 << 30, 10000)):
        ram = GuestRam(BASE, size, mte=True)
        empty = ram.tags.bytes_used
        ram.tags.set_tags(BASE, np.full(pages * 256, 5, dtype=np.uint8))
        used = ram.tags.bytes_used
        ideal = pages * 4096 // 32
        print(f"{label}: tags of {pages} pages take {used / 2**20:.2f} MiB "
              f"(ideal N*4096/32 = {ideal / 2**20:.2f} MiB, overhead {(used - ideal) / 2**10:.0f} KiB, "
              f"{used / ideal:.3f}x; untouched {empty / 2**10:.0f} KiB)")
        results[f"tag_bytes_{label}"] = {"pages": pages, "bytes": used, "ideal": ideal, "empty": empty}
    create = best_of(lambda: GuestRam(BASE, 64 << 30, mte=True), 5)
    empty = GuestRam(BASE, 64 << 30, mte=True).bytes_used
    results["vm64g_create_s"], results["vm64g_bytes"] = create, empty
    print(f"untouched 64 GiB VM: created in {create * 1e3:.2f} ms, {empty / 2**10:.0f} KiB")


def bench_heap(results: dict) -> None:
    ram = GuestRam(BASE, 256 << 20, mte=True)
    cpu = TagCheckCpu(ram)
    heap = TaggedHeapWorkload(cpu, ram, WorkloadConfig(seed=1, rate=0), 0)
    print()
    for n in (4096, 65536):
        steps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            heap.step(n)
            steps += 1
        rate = steps * n / (time.perf_counter() - t)
        results[f"heap_checks_per_s_{n}"] = rate
        print(f"heap workload, one vCPU flat out, {n}-access steps: {rate / 1e6:.2f} M checked accesses/s")


def _peak_rss_of(argv: list[str]) -> int:
    """Peak resident memory (bytes) of one child process run to its end (wait4's rusage)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}")
    return usage.ru_maxrss * 1024


def bench_replay_memory(results: dict, lines: int = 200_000) -> None:
    """`mtevm tagcheck replay` streams its trace: its peak RSS must not grow with the file.
    (It read the whole file and split it first: peak RSS was 6.6x the trace.)"""
    print()
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small.jsonl", Path(tmp) / "big.jsonl"
        line = '{"op":"load","ptr":"0x40001000","size":8}\n'
        small.write_text(line * 10)
        big.write_text(line * lines)
        replay = [sys.executable, "-m", "backend.cli", "tagcheck", "replay", "--json"]
        base = _peak_rss_of([*replay, str(small)])
        peak = _peak_rss_of([*replay, str(big)])
        size = big.stat().st_size
    ratio = (peak - base) / size
    results["replay_peak_rss_growth_per_trace_byte"] = ratio
    print(f"tagcheck replay of a {size / 2**20:.1f} MiB trace ({lines} ops): peak RSS {peak / 2**20:.1f} MiB, "
          f"{(peak - base) / 2**20:.1f} MiB above a 10-line trace = {ratio:.2f}x the file (was 6.6x)")


def main() -> dict:
    results: dict = {}
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.1f} -- other work on this machine makes the figures noisy")
    bench_batches(results)
    bench_memory(results)
    bench_heap(results)
    bench_replay_memory(results)
    return results


if __name__ == "__main__":
    main()
