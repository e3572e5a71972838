"""The Linux MTE guest image in a bare qemu-system-aarch64: boot time and the agent's cost.

1. Launch to agent ready: Popen of the bare QEMU command line (tests/guests/bare_linux.py) until
   the agent answers a host ``hello`` on its virtio-serial port; beside it, launch to the first
   line of /init (``mtevm: init ready`` on the console), i.e. what the agent adds after the kernel
   and /init. The mtevm side (``mtevm start`` of a ``--guest linux`` VM to agent ready, same kernel
   and initramfs) is linux-host's bench_linux_host.py; both use ``bare_boot_to_agent_ready`` here.
2. The tracepoint's cost to a faulting program: ``mte-faults`` faults/s in the guest with the
   agent as it runs by default (fault addresses on), with fault addresses off (the tracepoint
   and its histogram only), and with no tracing. Goal: with the agent >= 0.9x of without.

Run: ``python -m benchmarks.bench_linux_guest`` (needs QEMU and the built image).
"""
from __future__ import annotations

import re
import statistics
import time

from backend.guests.linux import image
from tests.guests.bare_linux import BareLinux

BOOT_RUNS = 3
FAULT_ROUNDS = 7
SYNC_N, ASYNC_N = 2000, 2000
GOAL_TRACE_RATIO = 0.9


def bare_boot_to_agent_ready(img: image.BuiltImage, smp: int = 2) -> tuple[float, float]:
    """(seconds to 'mtevm: init ready' on the console, seconds to the agent's hello), one boot."""
    vm = BareLinux(img, smp=smp).start()
    try:
        init = vm.wait_console("mtevm: init ready", timeout=120)
        link = vm.connect(timeout=120)
        link.hello(timeout=120)
        ready = time.monotonic() - vm.started_at
        link.close()
        return init, ready
    finally:
        vm.stop()


def _faults_per_s(link, tag: str) -> float:
    r = link.run(tag, path="/opt/mtevm/bin/mte-faults", args=[str(SYNC_N), str(ASYNC_N)], timeout=300)
    out = r["stdout"].decode()
    m = re.search(r"\((\d+) faults/s\)", out)
    if not m or r["exit"]["status"] != 0:
        raise RuntimeError(f"mte-faults failed: {out} {r['stderr']!r}")
    return float(m.group(1))


def tracing_cost(img: image.BuiltImage, smp: int = 1) -> dict[str, list[float]]:
    """Per round, mte-faults' rate in each mode: the agent as it runs by default (its BPF program
    on the raw tracepoint counts; the fault-address kprobe on, every fault recorded as an event),
    the agent with fault addresses off (BPF counts, events recorded in a short window per batch:
    the tracepoint's own cost), and no tracing at all (config counting=false: BPF detached,
    tracepoint and kprobe off).
    One vCPU: the agent's work shares the program's CPU, so its whole cost shows."""
    vm = BareLinux(img, smp=smp).start()
    modes = {
        "agent default (fault addresses on)": True,
        "agent, fault addresses off": False,
        "no tracing": False,
    }
    rates: dict[str, list[float]] = {m: [] for m in modes}
    try:
        link = vm.connect(timeout=120)
        link.hello(timeout=120)
        for rnd in range(FAULT_ROUNDS):   # interleaved: load drifts hit every mode alike
            for mode, addresses in modes.items():
                # no tracing: the agent detaches its BPF program, tracepoint and kprobe
                link.send({"type": "config", "fault_address": addresses, "counting": mode != "no tracing"})
                rates[mode].append(_faults_per_s(link, f"{rnd}-{mode}"))
            link.send({"type": "config", "counting": True})
        link.close()
    finally:
        vm.stop()
    return rates


def main() -> None:
    img = image.linux_image()
    print(f"image: kernel {img.kernel_release}, initramfs {img.manifest['files']['initramfs.cpio.gz']['size'] / 1e6:.1f} MB")

    inits, readies = [], []
    for _ in range(BOOT_RUNS):
        init, ready = bare_boot_to_agent_ready(img)
        inits.append(init)
        readies.append(ready)
    print(f"bare QEMU launch -> /init's first line: median {statistics.median(inits):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in inits)})")
    print(f"bare QEMU launch -> agent hello:        median {statistics.median(readies):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in readies)}); the agent adds "
          f"{statistics.median(readies) - statistics.median(inits):+.2f} s")

    rates = tracing_cost(img)
    base = rates["no tracing"]
    print(f"mte-faults {SYNC_N} sync + {ASYNC_N} async in a 1-vCPU guest (TCG), {FAULT_ROUNDS} interleaved rounds; "
          "ratio = median over rounds of (mode / no tracing) in the same round:")
    for mode, rs in rates.items():
        line = f"  {mode:34s} median {statistics.median(rs):7.0f} faults/s  best {max(rs):7.0f}"
        if mode != "no tracing":
            ratio = statistics.median(r / b for r, b in zip(rs, base))
            goal = f" (goal >= {GOAL_TRACE_RATIO}x: {'met' if ratio >= GOAL_TRACE_RATIO else 'NOT met'})"
            line += f"  ratio {ratio:.2f}x{goal}"
        print(line)


if __name__ == "__main__":
    main()
