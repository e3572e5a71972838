"""The control plane: what a client pays to talk to the daemon, and what the daemon costs.

1. ``list`` round trip over the Unix socket, p50/p99 (goal: p50 < 2 ms), with 10 VMs defined.
2. Creating 100 VMs over the socket (each one a durable SQLite transaction).
3. Aggregate checks/s of 8 VMs x 4 vCPUs on sim-mte at workload rate 0 (goal >= 10 M/s), with the
   daemon's CPU use over the same window (from /proc/<pid>/stat).
4. The daemon's idle CPU with 3 running VMs at the default workload rate (goal < 10 %).

A real daemon in a throwaway runtime/state dir, started as clients start it, stopped by PID.
Run: ``python -m benchmarks.bench_control``.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time

from backend.client import connect
from backend.daemon.launch import stop_daemon, daemon_pid
from backend.paths import Paths

LIST_CALLS = 1000
GOAL_LIST_P50_MS = 2.0
CREATE_COUNT = 100
GOAL_CHECKS_PER_S = 10e6
THROUGHPUT_VMS, THROUGHPUT_VCPUS = 8, 4
GOAL_IDLE_CPU = 10.0
MEASURE_S = 5.0

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def cpu_percent(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def total_checked(client, names: list[str]) -> int:
    return sum([(await client.counters(n))["vm"]["checked"] for n in names])


async def run(paths: Paths) -> dict:
    figures: dict = {}
    client = await connect(runtime_dir=paths.runtime_dir, state_dir=paths.state_dir)
    async with client:
        pid = daemon_pid(paths)
        for i in range(10):
            await client.create({"name": f"idle{i}"})
        for _ in range(50):  # warm up
            await client.list()
        times = []
        for _ in range(LIST_CALLS):
            t = time.perf_counter()
            await client.list()
            times.append((time.perf_counter() - t) * 1e3)
        figures["list_p50_ms"] = statistics.median(times)
        figures["list_p99_ms"] = percentile(times, 99)

        t = time.perf_counter()
        for i in range(CREATE_COUNT):
            await client.create({"name": f"c{i}"})
        figures["create_100_s"] = time.perf_counter() - t

        names = [f"flat{i}" for i in range(THROUGHPUT_VMS)]
        for n in names:
            await client.create({"name": n, "vcpus": THROUGHPUT_VCPUS, "workload": {"rate": 0}})
            await client.start(n)
        await asyncio.sleep(1.0)
        c0, t0, cpu0 = await total_checked(client, names), time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(MEASURE_S)
        c1, t1, cpu1 = await total_checked(client, names), time.monotonic(), cpu_seconds(pid)
        figures["checks_per_s"] = (c1 - c0) / (t1 - t0)
        figures["flat_out_daemon_cpu_pct"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        for n in names:
            await client.stop(n)

        for i in range(3):
            await client.create({"name": f"steady{i}"})
            await client.start(f"steady{i}")
        await asyncio.sleep(1.0)
        figures["idle_cpu_pct_3_vms"] = await cpu_percent(pid, MEASURE_S)
    return figures


def main() -> dict:
    base = tempfile.mkdtemp(prefix="mtevm-bench-")
    paths = Paths(os.path.join(base, "run"), os.path.join(base, "state"))
    try:
        f = asyncio.run(run(paths))
    finally:
        if daemon_pid(paths):
            stop_daemon(paths)
        shutil.rmtree(base, ignore_errors=True)
    print("control plane (daemon over its Unix socket)")
    print(f"  list round trip      p50 {f['list_p50_ms']:.3f} ms  p99 {f['list_p99_ms']:.3f} ms   "
          f"goal p50 < {GOAL_LIST_P50_MS} ms  (p50/goal {f['list_p50_ms'] / GOAL_LIST_P50_MS:.2f})")
    print(f"  create 100 VMs       {f['create_100_s']:.3f} s  ({f['create_100_s'] * 10:.2f} ms per VM, durable)")
    print(f"  checks/s, {THROUGHPUT_VMS} VMs x {THROUGHPUT_VCPUS} vCPUs, rate 0   {f['checks_per_s'] / 1e6:.2f} M/s   "
          f"goal >= {GOAL_CHECKS_PER_S / 1e6:.0f} M/s  (ratio {f['checks_per_s'] / GOAL_CHECKS_PER_S:.2f}); "
          f"daemon CPU {f['flat_out_daemon_cpu_pct']:.0f} %")
    print(f"  daemon CPU, 3 VMs at the default rate   {f['idle_cpu_pct_3_vms']:.1f} %   goal < {GOAL_IDLE_CPU:.0f} %  "
          f"(ratio {f['idle_cpu_pct_3_vms'] / GOAL_IDLE_CPU:.2f})")
    return f


if __name__ == "__main__":
    main()
