"""The Linux MTE guest image in a bare qemu-system-aarch64: boot time and the agent's cost.

1. Launch to agent ready: Popen of the bare QEMU command line (tests/guests/bare_linux.py) until
   the agent answers a host ``hello`` on its virtio-serial port; beside it, launch to the first
   line of /init (``mtevm: init ready`` on the console), i.e. what the agent adds after the kernel
   and /init. The mtevm side (``mtevm start`` of a ``--guest linux`` VM to agent ready, same kernel
   and initramfs) is linux-host's bench_linux_host.py; both use ``bare_boot_to_agent_ready`` here.
2. The tracepoint's cost to a faulting program: ``mte-faults`` faults/s in a 1-vCPU guest with the
   agent as mtevm runs it (the config mtevm's host sends a ``--guest linux`` VM by default: its batch
   interval, fault addresses as GuestConfig's linux default, on) and with the other choice
   (``--no-fault-address``, or ``--fault-address`` were the default off), each against the agent without its tracing
   (config counting=false: BPF program detached; the agent still runs). Goal: >= 0.9x. Two more
   modes show where the cost goes: the agent stopped (SIGSTOP) while the program runs, with its
   BPF program attached (the kernel side alone) and without (no agent at all).

Run: ``python -m benchmarks.bench_linux_guest [--only boot,tracing]`` (needs QEMU and the built image).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time

from backend.guests.agent import INTERVAL_MS
from backend.guests.definition import GuestConfig
from backend.guests.linux import image
from tests.guests.bare_linux import BareLinux

BOOT_RUNS = 3
FAULT_ROUNDS = 9
ICOUNT_ROUNDS = 3       # deterministic: rounds agree to a fraction of a percent
SYNC_N, ASYNC_N = 5000, 5000
WARM_N = 3000           # faults of an unmeasured run after each config change (see tracing_cost)
GOAL_TRACE_RATIO = 0.9
BASELINE = "agent, tracing off"
NO_AGENT = "agent stopped, no tracing"
AS_MTEVM = GuestConfig("linux").fault_address     # what a --guest linux VM gets when the user says nothing
GOAL_MODES = ("agent as mtevm runs it", "agent, --no-fault-address" if AS_MTEVM else "agent, --fault-address")
# mode -> (the config the agent gets, whether the agent is stopped while the program runs)
MODES = {
    GOAL_MODES[0]: ({"counting": True, "fault_address": AS_MTEVM}, False),
    GOAL_MODES[1]: ({"counting": True, "fault_address": not AS_MTEVM}, False),
    "BPF program, agent stopped": ({"counting": True, "fault_address": AS_MTEVM}, True),
    NO_AGENT: ({"counting": False, "fault_address": AS_MTEVM}, True),
    BASELINE: ({"counting": False, "fault_address": AS_MTEVM}, False),
}
RATIO_TO = {"BPF program, agent stopped": NO_AGENT}   # the rest: to BASELINE


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


ICOUNT = ["-icount", "shift=0,sleep=off"]   # guest time = instructions (1 ns each): a host-load-free clock


def _vcpu_schedstat(qemu_pid: int) -> str:
    """/proc path of the schedstat of QEMU's vCPU thread (named with -name ...,debug-threads=on)."""
    for tid in os.listdir(f"/proc/{qemu_pid}/task"):
        with open(f"/proc/{qemu_pid}/task/{tid}/comm") as f:
            if f.read().startswith(("CPU 0/", "ALL CPUs/")):   # MTTCG, or one thread for all (icount)
                return f"/proc/{qemu_pid}/task/{tid}/schedstat"
    raise RuntimeError("QEMU has no vCPU thread named 'CPU 0/...' (-name ...,debug-threads=on)")


def _run_ns(schedstat: str) -> int:
    with open(schedstat) as f:
        return int(f.read().split()[0])    # ns this thread has run on a host CPU


def _run_faults(link, schedstat: str, tag: str, n_sync: int, n_async: int, stop_agent: bool) -> tuple[float, float]:
    """One mte-faults run: (its own faults/s, its faults per second the vCPU thread ran on a host
    CPU during the whole exec). With stop_agent the shell that runs it stops the agent (its parent)
    first and resumes it after."""
    # the same shell (a child for mte-faults, then its status) in every mode; ':' is a no-op
    cmd = (f"{'kill -STOP' if stop_agent else ':'} $PPID; /opt/mtevm/bin/mte-faults {n_sync} {n_async}; "
           f"s=$?; {'kill -CONT' if stop_agent else ':'} $PPID; exit $s")
    ran = _run_ns(schedstat)
    r = link.run(tag, path="/bin/sh", args=["-c", cmd], timeout=300)
    ran = _run_ns(schedstat) - ran
    out = r["stdout"].decode()
    m = re.search(r"\((\d+) faults/s\)", out)
    if not m or r["exit"] is None or r["exit"]["status"] != 0:
        raise RuntimeError(f"mte-faults failed: {out} {r['stderr']!r} {r['error']}")
    return float(m.group(1)), (n_sync + n_async) / (ran / 1e9)


def tracing_cost(img: image.BuiltImage, rounds: int = FAULT_ROUNDS,
                 icount: bool = False) -> dict[str, dict[str, list[float]]]:
    """Per mode (MODES), in each round: mte-faults' own faults/s ("wall"), and its faults per
    second of host CPU that QEMU's vCPU thread got during the exec ("vcpu").

    "wall" is what the goal is about. Under plain TCG the guest's clock is the host's, so on a
    shared host it swings with other load (a descheduled QEMU looks like a slow program): the modes
    are interleaved in every round and each is divided by the baseline of its round. "vcpu" leaves
    out the time the vCPU thread waited for a host CPU (it still counts the exec's start and end,
    the same in every mode, and other load's cache pollution). With ``icount`` the guest's clock
    counts the instructions the vCPU executes instead, so "wall" is the guest's instructions per
    fault (the program's, the kernel's, the BPF program's and the agent's, which share the one
    vCPU): the same on a quiet or a loaded host, to within a fraction of a percent, but blind to
    QEMU's own overheads (translating code, emulating devices).

    One vCPU: the agent's work shares the program's CPU, so its whole cost shows. After each config
    change a short unmeasured run goes first: attaching or detaching the BPF program patches the
    tracepoint's static key, which makes TCG retranslate that code once; the agent does that at
    start, not while a user's program runs."""
    vm = BareLinux(img, smp=1)
    vm.argv += ["-name", "mtevm-bench,debug-threads=on"] + (ICOUNT if icount else [])
    vm.start()
    rates = {mode: {"wall": [], "vcpu": []} for mode in MODES}
    try:
        link = vm.connect(timeout=120)
        link.hello(timeout=120)
        schedstat = _vcpu_schedstat(vm.proc.pid)
        link.send({"type": "config", "interval_ms": INTERVAL_MS})
        for rnd in range(rounds):   # interleaved: load drifts hit every mode alike
            for mode, (config, stop_agent) in MODES.items():
                link.send({"type": "config", **config})
                _run_faults(link, schedstat, f"warm-{rnd}-{mode}", WARM_N // 2, WARM_N // 2, stop_agent)
                wall, vcpu = _run_faults(link, schedstat, f"{rnd}-{mode}", SYNC_N, ASYNC_N, stop_agent)
                rates[mode]["wall"].append(wall)
                rates[mode]["vcpu"].append(vcpu)
        link.send({"type": "config", "counting": True})
        link.close()
    finally:
        vm.stop()
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench_linux_guest", description=__doc__.split("\n")[0])
    p.add_argument("--only", default="boot,tracing", help="comma-separated: boot, tracing")
    sections = p.parse_args(argv).only.split(",")
    img = image.linux_image()
    print(f"image: kernel {img.kernel_release}, initramfs {img.manifest['files']['initramfs.cpio.gz']['size'] / 1e6:.1f} MB")
    if "boot" in sections:
        boot(img)
    if "tracing" in sections:
        tracing(img)


def boot(img: image.BuiltImage) -> None:
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


def tracing(img: image.BuiltImage) -> None:
    print(f"mte-faults {SYNC_N} sync + {ASYNC_N} async in a 1-vCPU guest (TCG), agent batches every {INTERVAL_MS} ms; "
          f"ratio = median over interleaved rounds of (mode / {BASELINE}, or the mode named) in the same round")
    runs = (("TCG", False, FAULT_ROUNDS, {"wall": "faults/s (the program's own: the goal)",
                                          "vcpu": "faults per vCPU-thread CPU s"}),
            (" ".join(ICOUNT), True, ICOUNT_ROUNDS, {"wall": "faults per guest s = per 1e9 instructions"}))
    for title, icount, rounds, figures in runs:
        load0 = os.getloadavg()[0]
        rates = tracing_cost(img, rounds, icount)
        print(f"{title}, {rounds} rounds, load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after:")
        for figure, what in figures.items():
            print(f"  {what}:")
            for mode, r in rates.items():
                rs = r[figure]
                line = f"    {mode:26s} median {statistics.median(rs):7.0f}  best {max(rs):7.0f}"
                if mode != BASELINE:
                    to = RATIO_TO.get(mode, BASELINE)
                    ratio = statistics.median(x / b for x, b in zip(rs, rates[to][figure]))
                    line += f"  ratio {ratio:.3f}x" + ("" if to == BASELINE else f" of {to}")
                    if mode in GOAL_MODES:
                        line += f" (goal >= {GOAL_TRACE_RATIO}x: {'met' if ratio >= GOAL_TRACE_RATIO else 'NOT met'})"
                print(line)


if __name__ == "__main__":
    main()
