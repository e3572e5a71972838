"""Real QEMU: what the driver costs, and how fast the real guest checks tags.

1. VM start to QMP ready: the driver (QemuProcess.launch, and the whole LocalHost.start) beside
   a bare launch of the same argv that connects QMP with qemu.qmp directly. Goal: within 1.2x.
2. Checked accesses per second: the real guest under TCG (flat out, one vCPU) beside the
   tag-check core running the same workload parameters (backend.hosts.heap, rate 0).

Run: ``python -m benchmarks.bench_qemu`` (needs QEMU >= 8.0 and the built guest).
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time

from qemu.qmp import QMPClient

from backend.hosts.base import VmSpec
from backend.hosts.local import LocalHost
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig
from backend.qemu import guest_abi
from backend.qemu.driver import QemuFiles, QemuProcess
from backend.qemu.qmp import POLL_INTERVAL

RUNS = 10
GOAL_START_RATIO = 1.2
MEASURE_S = 3.0            # seconds of guest counting per accesses/s figure
CONFIG = VirtMachineConfig(name="bench", vcpus=1, memory=128 << 20)
WORKLOAD = WorkloadConfig(rate=0)


def _argv(host: LocalHost, files: QemuFiles) -> list[str]:
    """Exactly the argv LocalHost.start runs for this VM."""
    return host.launch_argv(VmSpec(CONFIG, WORKLOAD), files)[0]


async def _bare_start(argv: list[str], socket_path: str) -> float:
    """What anyone would write: Popen, then retry QMPClient.connect until QEMU listens."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    qmp = QMPClient("bench")
    while True:
        try:
            await qmp.connect(socket_path)
            break
        except Exception:
            await asyncio.sleep(POLL_INTERVAL)
    elapsed = time.perf_counter() - t0
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except EOFError:          # QEMU hung up first, as quit makes it do
        pass
    proc.wait(10)
    return elapsed


async def _driver_start(argv: list[str], files: QemuFiles) -> float:
    t0 = time.perf_counter()
    proc = await QemuProcess.launch(argv, files)
    elapsed = time.perf_counter() - t0
    await proc.stop()
    return elapsed


async def _host_start(host: LocalHost, tmp: str, i: int) -> float:
    spec = VmSpec(CONFIG, WORKLOAD, os.path.join(tmp, f"vm{i}"))
    t0 = time.perf_counter()
    vm = await host.start(spec)
    elapsed = time.perf_counter() - t0
    await vm.stop()
    return elapsed


async def bench_start(tmp: str) -> dict:
    host = LocalHost(tmp)
    bare, driver, whole = [], [], []
    for i in range(RUNS + 1):   # interleaved, so drift in machine load hits all three alike
        files = QemuFiles.new(os.path.join(tmp, f"bare{i}"))
        bare.append(await _bare_start(_argv(host, files), files.qmp_socket))
        files = QemuFiles.new(os.path.join(tmp, f"drv{i}"))
        driver.append(await _driver_start(_argv(host, files), files))
        whole.append(await _host_start(host, tmp, i))
    # Round 0 warms the page cache and Python's imports for all three: not counted.
    return {"bare": statistics.median(bare[1:]), "driver": statistics.median(driver[1:]),
            "host": statistics.median(whole[1:])}


async def guest_checks_per_s(tmp: str) -> float:
    """Checked accesses per second of one real vCPU under TCG, from the guest's own counters."""
    host = LocalHost(tmp)
    vm = await host.start(VmSpec(CONFIG, WORKLOAD, os.path.join(tmp, "rate")))
    try:
        while not (await vm.sample())[0]["checked"]:
            await asyncio.sleep(0.05)
        t0, c0 = time.perf_counter(), (await vm.sample())[0]["checked"]
        await asyncio.sleep(MEASURE_S)
        t1, c1 = time.perf_counter(), (await vm.sample())[0]["checked"]
    finally:
        await vm.stop()
    return (c1 - c0) / (t1 - t0)


def core_checks_per_s() -> float:
    """The tag-check core on the same workload parameters, flat out, one vCPU."""
    from backend.hosts.heap import TaggedHeapWorkload
    from backend.hosts.sim import FLAT_OUT_BATCH
    from backend.tagcheck import GuestRam, TagCheckCpu
    ram = GuestRam(guest_abi.RAM_BASE, CONFIG.memory, mte=True)
    cpu = TagCheckCpu(ram, 0, seed=WORKLOAD.seed)
    heap = TaggedHeapWorkload(cpu, ram, WORKLOAD, 0)
    checked0 = cpu.counters.checked
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < MEASURE_S:
        heap.step(FLAT_OUT_BATCH)   # the batch the simulated host uses at rate 0
    return (cpu.counters.checked - checked0) / (time.perf_counter() - t0)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mtevm-bench-") as tmp:
        start = asyncio.run(bench_start(tmp))
        guest = asyncio.run(guest_checks_per_s(tmp))
    ratio = start["driver"] / start["bare"]
    print(f"qemu start to QMP ready, median of {RUNS}: bare {start['bare'] * 1e3:.1f} ms, "
          f"driver {start['driver'] * 1e3:.1f} ms (ratio {ratio:.2f}, goal <= {GOAL_START_RATIO}: "
          f"{'met' if ratio <= GOAL_START_RATIO else 'MISSED'}), "
          f"LocalHost.start {start['host'] * 1e3:.1f} ms (ratio {start['host'] / start['bare']:.2f})")
    core = core_checks_per_s()
    print(f"checked accesses/s, one vCPU flat out: real guest under TCG {guest:,.0f}, "
          f"tag-check core {core:,.0f} (guest/core {guest / core:.2f})")


if __name__ == "__main__":
    main()
