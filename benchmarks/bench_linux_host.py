"""Linux guests through mtevm (the host side): boot to agent ready, and fault-to-counter latency.

1. ``mtevm start`` of a ``--guest linux`` VM (2 vCPUs, 512M, the workload off) until the client
   sees the agent connected, beside a bare qemu-system-aarch64 of the same kernel and initramfs
   until its agent answers (benchmarks/bench_linux_guest.py's ``bare_boot_to_agent_ready``).
   Goal: mtevm within 1.1x of bare. Interleaved runs; medians.
2. Fault-to-counter latency: one sync tag-check fault in the guest (``mte-faults 1 0`` run with
   exec) until a ``counters`` event that counts it reaches the client's event stream (the feed
   ``mtevm counters --watch`` and the app read), at 10 events/s. The fault's time is the guest's
   own trace timestamp (CLOCK_MONOTONIC) mapped to host time through the agent's uptime.
   Goal: p95 <= 0.5 s.

Run: ``python -m benchmarks linux_host`` (needs QEMU and the built image: mtevm image build linux).
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

from backend.client import connect
from backend.guests.linux import image

BOOT_RUNS = 3
LATENCY_FAULTS = 30
EVENT_RATE = 10.0
GOAL_BOOT_RATIO = 1.1
GOAL_P95 = 0.5


async def mtevm_boot(client, name: str) -> float:
    """Seconds from ``start`` to the agent being connected, as a client sees it."""
    t0 = time.monotonic()
    await client.start(name)
    while True:
        vm = await client.show(name)
        if (vm.get("guest_facts") or {}).get("agent") == "connected":
            return time.monotonic() - t0
        if vm["state"] != "running" or time.monotonic() - t0 > 300:
            raise RuntimeError(f"the guest did not come up: {vm['state']} {vm.get('last_error')}")
        await asyncio.sleep(0.02)


async def latency(client, name: str, program: str) -> list[float]:
    """Per fault: event arrival (host clock) - the fault's time in the guest (mapped to host clock)."""
    data = open(program, "rb").read()
    out: list[float] = []
    events = client.events(rate_hz=EVENT_RATE)
    seen = asyncio.Queue()

    async def follow() -> None:
        async for e in events:
            if e["type"] == "counters" and e["vm"] == name:
                seen.put_nowait((time.time(), e["counters"]))

    follower = asyncio.get_running_loop().create_task(follow())
    try:
        await asyncio.sleep(1.0)
        for _ in range(LATENCY_FAULTS):
            before = (await client.counters(name))["vm"]["sync_faults"]
            while not seen.empty():
                seen.get_nowait()
            async for _msg in client.exec(name, ["1", "0"], program="mte-faults", data=data):
                pass
            while True:
                arrived, c = await asyncio.wait_for(seen.get(), 10)
                if c["vm"]["sync_faults"] > before:
                    faults = [v["last_fault"] for v in c["vcpus"] if v.get("last_fault")]
                    t_fault = max(f["time"] for f in faults)
                    out.append(arrived - t_fault)
                    break
            await asyncio.sleep(0.2)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    return out


async def run() -> None:
    from benchmarks.bench_linux_guest import bare_boot_to_agent_ready
    img = image.linux_image()
    with tempfile.TemporaryDirectory(prefix="mtevm-bench-") as tmp:
        client = await connect(in_process=True, runtime_dir=f"{tmp}/run", state_dir=f"{tmp}/state")
        async with client:
            await client.create({"name": "b", "host": "local", "vcpus": 2, "memory": "512M",
                                 "guest": {"kind": "linux", "append": "mtevm.workload=0"}})
            bare, ours = [], []
            for _ in range(BOOT_RUNS):
                bare.append((await asyncio.to_thread(bare_boot_to_agent_ready, img))[1])
                ours.append(await mtevm_boot(client, "b"))
                lat = None
                if len(ours) == BOOT_RUNS:
                    lat = await latency(client, "b", img.program("mte-faults"))
                await client.stop("b")
            ratio = statistics.median(ours) / statistics.median(bare)
            print(f"boot to agent ready, {BOOT_RUNS} interleaved runs, 2 vCPUs 512M TCG:")
            print(f"  bare qemu-system-aarch64: median {statistics.median(bare):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in bare)})")
            print(f"  mtevm start --guest linux: median {statistics.median(ours):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in ours)})")
            print(f"  ratio {ratio:.2f}x (goal <= {GOAL_BOOT_RATIO}x: {'met' if ratio <= GOAL_BOOT_RATIO else 'NOT met'})")
            lat.sort()
            p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
            print(f"fault-to-counter latency ({len(lat)} sync faults, events at {EVENT_RATE:g}/s): "
                  f"median {statistics.median(lat):.3f} s, p95 {p95:.3f} s, max {lat[-1]:.3f} s "
                  f"(goal p95 <= {GOAL_P95} s: {'met' if p95 <= GOAL_P95 else 'NOT met'})")


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
