"""Scale: the daemon stays responsive with hundreds of VMs, simulated vCPUs use every core.

Why: a user with a big fleet must not wait for the simulation (issue 10). Four measurements, each on
a real daemon in the foreground on private dirs (backend.daemon, stopped by PID), clients as real
processes; figures, goals and ratios printed together, with the load average (the machine may be
shared: other load shows up in every figure).

1. fleet    200 simulated VMs x 4 vCPUs at the default workload rate: ``list`` p50/p99 over the
            socket while a second process follows the event stream at 4 Hz; the share of the expected
            4 Hz counter samples it got (and the ``skipped`` it was told of); the daemon's RSS.
            Goals: p99 <= 20 ms, >= 95 % of samples, RSS <= 400 MB.
2. cores    8 VMs x 4 vCPUs flat out (rate 0): aggregate checked accesses/s with one worker process
            (MTEVM_SIM_WORKERS=1) and with the default (one per core). Goal: >= 1.7x on 2 cores.
3. app      the app (a real process in a real 120x36 pty) on 1,000 VMs x 4 vCPUs at 4 Hz, VM list
            open: its CPU % of a core and the time from its start (the daemon answering) to a first
            screen listing every VM. Goals: CPU <= 15 %, first screen <= 1 s.
4. local    32 local VMs (real QEMU, the builtin guest) sampled at 4 Hz by an event client: the
            daemon's CPU %. Goal <= 10 %. Needs QEMU and the built guest.

Run: ``python -m benchmarks scale`` or ``python -m benchmarks.bench_scale [--only fleet,cores,app,local]
[--app-runs N]`` (the app section starts the app N times, default 3, on one fleet and reports medians:
one run's CPU varies with how many figures change while it is measured).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_tui import Daemon, _cpu_seconds, start_in_pty, stop_in_pty
from benchmarks.bench_control import percentile

SECTIONS = ("fleet", "cores", "app", "local")
RATE_HZ = 4.0
FLEET_VMS, FLEET_VCPUS = 200, 4
GOAL_LIST_P99_MS, GOAL_DELIVERED, GOAL_RSS_MB = 20.0, 0.95, 400.0
FLAT_VMS, FLAT_VCPUS = 8, 4
GOAL_SCALING = 1.7
APP_VMS, APP_VCPUS, APP_RATE = 1000, 4, 100
GOAL_APP_CPU, GOAL_FIRST_SCREEN_S = 15.0, 1.0
LOCAL_VMS = 32
GOAL_LOCAL_DAEMON_CPU = 10.0
MEASURE_S = 10.0
WIDTH, HEIGHT = 120, 36


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def start_daemon(tmp: Path, name: str, **env) -> Daemon:
    root = tmp / name
    root.mkdir()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        daemon = Daemon(root)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    daemon.wait_listening()
    return daemon


async def client_for(daemon: Daemon):
    from backend.client import connect
    return await connect(in_process=False, runtime_dir=daemon.env["MTEVM_RUNTIME_DIR"],
                         state_dir=daemon.env["MTEVM_STATE_DIR"], start_daemon=False)


async def fleet_of(daemon: Daemon, n: int, make: dict, prefix: str = "vm", before_start=None) -> list[str]:
    """``n`` VMs created and started through the socket (a few at a time); ``before_start()`` is
    awaited between the two."""
    names = [f"{prefix}{i:04d}" for i in range(n)]
    async with await client_for(daemon) as client:
        for name in names:
            await client.create({"name": name, **make})
        if before_start is not None:
            await before_start()

        async def start(chunk):
            for name in chunk:
                await client.start(name)
        await asyncio.gather(*(start(names[i::8]) for i in range(8)))
    return names


def run_child(daemon: Daemon, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.bench_scale", "--child", *args], env=daemon.env,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)


# ------------------------------------------------------------------------------------ 1. fleet
async def _list_times(daemon: Daemon, seconds: float) -> list[float]:
    times = []
    async with await client_for(daemon) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t = time.perf_counter()
            await client.list()
            times.append((time.perf_counter() - t) * 1e3)
            await asyncio.sleep(0.02)
    return times


def fleet(tmp: Path) -> dict:
    daemon = start_daemon(tmp, "fleet")
    try:
        idle: list[float] = []

        async def idle_list() -> None:        # the same 200 definitions, nothing running: the floor
            idle.extend(await _list_times(daemon, 3.0))
        t = time.monotonic()
        asyncio.run(fleet_of(daemon, FLEET_VMS, {"vcpus": FLEET_VCPUS}, before_start=idle_list))
        started_s = time.monotonic() - t
        time.sleep(3.0)
        events = run_child(daemon, "events", str(MEASURE_S))
        time.sleep(1.0)                     # the follower connected and counting
        cpu0, t0 = _cpu_seconds(daemon.proc.pid), time.monotonic()
        times = asyncio.run(_list_times(daemon, MEASURE_S - 2.0))
        cpu1, t1 = _cpu_seconds(daemon.proc.pid), time.monotonic()
        got = json.loads(events.communicate(timeout=120)[0])
        rss = rss_mb(daemon.proc.pid)
        workers = [p for p in children(daemon.proc.pid)]
        workers_rss = sum(rss_mb(p) for p in workers)
        la = load()
    finally:
        daemon.stop()
    expected = FLEET_VMS * RATE_HZ * got["seconds"]
    return {"start_s": started_s, "idle_p50_ms": statistics.median(idle), "idle_p99_ms": percentile(idle, 99),
            "list_p50_ms": statistics.median(times), "list_p99_ms": percentile(times, 99),
            "list_calls": len(times), "samples": got["samples"], "expected": expected, "skipped": got["skipped"],
            "delivered": got["samples"] / expected, "rss_mb": rss, "workers_rss_mb": workers_rss,
            "daemon_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0), "load": la}


async def child_events(seconds: float) -> None:
    """Follow the event stream at RATE_HZ for ``seconds``; print samples received and skipped."""
    from backend.client import connect
    async with await connect(in_process=False, start_daemon=False) as client:
        samples = skipped = 0
        events = client.events(rate_hz=RATE_HZ)
        t0 = None
        async for e in events:
            if e.get("type") != "counters":
                continue
            now = time.monotonic()
            if t0 is None:
                t0 = now                   # from the first sample on
            if now - t0 >= seconds:
                break
            samples += 1
            skipped += e.get("skipped", 0)
        await events.aclose()
    print(json.dumps({"samples": samples, "skipped": skipped, "seconds": seconds}))


# ------------------------------------------------------------------------------------ 2. cores
async def _flat_out_rate(daemon: Daemon) -> float:
    names = await fleet_of(daemon, FLAT_VMS, {"vcpus": FLAT_VCPUS, "workload": {"rate": 0}}, "flat")
    async with await client_for(daemon) as client:
        async def total() -> int:
            return sum([(await client.counters(n))["vm"]["checked"] for n in names])
        await asyncio.sleep(2.0)
        workers = children(daemon.proc.pid)
        c0, t0, w0 = await total(), time.monotonic(), sum(_cpu_seconds(p) for p in workers)
        await asyncio.sleep(MEASURE_S / 2)
        c1, t1, w1 = await total(), time.monotonic(), sum(_cpu_seconds(p) for p in workers)
    return (c1 - c0) / (t1 - t0), 100 * (w1 - w0) / (t1 - t0)


def cores(tmp: Path) -> dict:
    from backend.hosts.workers import default_worker_count
    n = default_worker_count()
    out = {"workers": n}
    for label, count in (("one", 1), ("all", n)):
        daemon = start_daemon(tmp, f"cores-{label}", MTEVM_SIM_WORKERS=str(count))
        try:
            out[label], out[f"cpu_{label}"] = asyncio.run(_flat_out_rate(daemon))
            out[f"load_{label}"] = load()
        finally:
            daemon.stop()
    out["ratio"] = out["all"] / out["one"] if out["one"] else 0.0
    return out


# ------------------------------------------------------------------------------------ 3. app
def app(tmp: Path, runs: int = 3) -> dict:
    """The fleet once, then the app started ``runs`` times on it (a fresh process each): medians."""
    daemon = start_daemon(tmp, "app")
    try:
        asyncio.run(fleet_of(daemon, APP_VMS, {"vcpus": APP_VCPUS, "workload": {"rate": APP_RATE}}))
        time.sleep(2.0)
        each = [_app_once(tmp / f"app-ready-{i}", daemon) for i in range(runs)]
    finally:
        daemon.stop()
    out = {key: statistics.median(r[key] for r in each)
           for key in ("cpu_pct", "daemon_cpu_pct", "bytes_per_s", "first_screen_s", "list_s")}
    out.update(runs=each, load=each[-1]["load"])
    return out


def _app_once(ready: Path, daemon: Daemon) -> dict:
    """One app process in a fresh pty on ``daemon``'s fleet: its first screen, then MEASURE_S of CPU."""
    proc, term, master = start_in_pty([sys.executable, "-m", "benchmarks.bench_scale", "--child", "app"], daemon,
                                      ready, WIDTH, HEIGHT)
    try:
        term.drain(time.monotonic() + 120, lambda: ready.exists() or proc.poll() is not None)
        if not ready.exists():
            raise RuntimeError(f"app: did not show its list (exit {proc.poll()}):\n{term.tail_text()}")
        first = json.loads(ready.read_text())
        term.drain(time.monotonic() + 3.0)
        cpu0, d0, t0 = _cpu_seconds(proc.pid), _cpu_seconds(daemon.proc.pid), time.monotonic()
        nbytes = term.drain(t0 + MEASURE_S)
        cpu1, d1, t1 = _cpu_seconds(proc.pid), _cpu_seconds(daemon.proc.pid), time.monotonic()
        la = load()
    finally:
        stop_in_pty(proc, term, master)
    wall = t1 - t0
    return {"cpu_pct": 100 * (cpu1 - cpu0) / wall, "daemon_cpu_pct": 100 * (d1 - d0) / wall,
            "bytes_per_s": nbytes / wall, "first_screen_s": first["first_screen_s"], "list_s": first["list_s"],
            "load": la}


async def child_app() -> None:
    """The real app on the daemon of MTEVM_RUNTIME_DIR; writes when its list shows every VM."""
    from backend.client import connect
    from tui.app import MtevmApp
    from tui.screens.vm_list import VmListScreen

    client = await connect(in_process=False, start_daemon=False)       # the daemon answered
    t0 = time.monotonic()
    await client.list()
    list_s = time.monotonic() - t0

    class Measured(MtevmApp):
        def on_mount(self) -> None:
            self.run_worker(self.note_first_screen())

        async def note_first_screen(self) -> None:
            while not (isinstance(self.screen, VmListScreen) and hasattr(self.screen, "rows")
                       and len(self.screen.rows.keys) == APP_VMS):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)                      # the frame with the rows goes out
            Path(os.environ["MTEVM_BENCH_READY"]).write_text(json.dumps(
                {"first_screen_s": time.monotonic() - t1, "list_s": list_s}))

    async def factory():
        return client
    t1 = time.monotonic()
    async with client:
        await Measured(factory, rate_hz=RATE_HZ).run_async()


# ------------------------------------------------------------------------------------ 4. local
def local(tmp: Path) -> dict:
    daemon = start_daemon(tmp, "local")
    try:
        t = time.monotonic()
        asyncio.run(fleet_of(daemon, LOCAL_VMS, {"host": "local", "vcpus": 1, "memory": "128M",
                                                  "workload": {"rate": 1000}}, "qemu"))
        started_s = time.monotonic() - t
        events = run_child(daemon, "events", str(MEASURE_S + 2))
        time.sleep(2.0)
        cpu0, t0 = _cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(MEASURE_S)
        cpu1, t1 = _cpu_seconds(daemon.proc.pid), time.monotonic()
        got = json.loads(events.communicate(timeout=120)[0])
        la = load()
        asyncio.run(_stop_all(daemon, [f"qemu{i:04d}" for i in range(LOCAL_VMS)]))
    finally:
        daemon.stop()
    return {"start_s": started_s, "daemon_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "delivered": got["samples"] / (LOCAL_VMS * RATE_HZ * got["seconds"]), "load": la}


async def _stop_all(daemon: Daemon, names: list[str]) -> None:
    async with await client_for(daemon) as client:
        for name in names:
            try:
                await client.stop(name)
            except Exception:
                pass


# ------------------------------------------------------------------------------------ report
def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--app-runs", type=int, default=3, metavar="N",
                   help="app section: start the app N times on the same fleet and report medians (default 3)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        if args.child[0] == "events":
            asyncio.run(child_events(float(args.child[1])))
        else:
            asyncio.run(child_app())
        return {}
    wanted = [s for s in args.only.split(",") if s]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="mtevm-bench-scale-") as tmp:
        for section in wanted:
            try:
                if section == "app":
                    results[section] = app(Path(tmp), max(1, args.app_runs))
                else:
                    results[section] = globals()[section](Path(tmp))
            except Exception as e:          # one section failing (e.g. no QEMU) leaves the others
                print(f"  {section}: FAILED: {type(e).__name__}: {e}")
                results[section] = None
            report(section, results[section])
    return results


def report(section: str, r: dict | None) -> None:
    if r is None:
        return
    if section == "fleet":
        print(f"fleet: {FLEET_VMS} VMs x {FLEET_VCPUS} vCPUs at the default rate (started in {r['start_s']:.1f} s; "
              f"{r['load']})")
        print(f"  list  p50 {r['list_p50_ms']:.2f} ms  p99 {r['list_p99_ms']:.2f} ms over {r['list_calls']} calls   "
              f"goal p99 <= {GOAL_LIST_P99_MS:g} ms ({verdict(r['list_p99_ms'] <= GOAL_LIST_P99_MS)}; "
              f"ratio {r['list_p99_ms'] / GOAL_LIST_P99_MS:.2f})")
        print(f"  list with the same VMs defined but none running (the machine's floor right now): "
              f"p50 {r['idle_p50_ms']:.2f} ms  p99 {r['idle_p99_ms']:.2f} ms")
        print(f"  samples delivered {r['samples']} of {r['expected']:.0f} expected at {RATE_HZ:g} Hz = "
              f"{100 * r['delivered']:.1f} % (told skipped: {r['skipped']})   goal >= {100 * GOAL_DELIVERED:.0f} % "
              f"({verdict(r['delivered'] >= GOAL_DELIVERED)})")
        print(f"  daemon RSS {r['rss_mb']:.0f} MB   goal <= {GOAL_RSS_MB:.0f} MB ({verdict(r['rss_mb'] <= GOAL_RSS_MB)}; "
              f"ratio {r['rss_mb'] / GOAL_RSS_MB:.2f}); worker processes {r['workers_rss_mb']:.0f} MB; "
              f"daemon CPU {r['daemon_cpu_pct']:.0f} %")
    elif section == "cores":
        print(f"cores: {FLAT_VMS} VMs x {FLAT_VCPUS} vCPUs flat out")
        print(f"  1 worker {r['one'] / 1e6:.2f} M checks/s, workers got {r['cpu_one']:.0f} % CPU ({r['load_one']})")
        print(f"  {r['workers']} workers {r['all'] / 1e6:.2f} M checks/s, workers got {r['cpu_all']:.0f} % CPU "
              f"({r['load_all']})")
        print(f"  ratio {r['ratio']:.2f}x   goal >= {GOAL_SCALING:g}x on 2 cores ({verdict(r['ratio'] >= GOAL_SCALING)}); "
              f"per worker CPU-second {r['one'] / max(r['cpu_one'], 1e-9) / 1e4:.1f} vs "
              f"{r['all'] / max(r['cpu_all'], 1e-9) / 1e4:.1f} M checks (CPU the machine gave them: "
              f"{r['cpu_all'] / max(r['cpu_one'], 1e-9):.2f}x)")
    elif section == "app":
        print(f"app: {APP_VMS} VMs x {APP_VCPUS} vCPUs (rate {APP_RATE}/s), VM list at {RATE_HZ:g} Hz, "
              f"{WIDTH}x{HEIGHT} pty; median of {len(r['runs'])} app processes on the same fleet")
        for i, run in enumerate(r["runs"]):
            print(f"  run {i + 1}: app CPU {run['cpu_pct']:.1f} %, terminal {run['bytes_per_s'] / 1024:.1f} KiB/s, "
                  f"first screen {run['first_screen_s']:.2f} s, daemon CPU {run['daemon_cpu_pct']:.0f} % "
                  f"({run['load']})")
        print(f"  app CPU {r['cpu_pct']:.1f} % of a core   goal <= {GOAL_APP_CPU:g} % "
              f"({verdict(r['cpu_pct'] <= GOAL_APP_CPU)}; ratio {r['cpu_pct'] / GOAL_APP_CPU:.2f}); "
              f"terminal {r['bytes_per_s'] / 1024:.1f} KiB/s; daemon CPU {r['daemon_cpu_pct']:.0f} %")
        print(f"  first screen {r['first_screen_s']:.2f} s after the daemon answered (list() alone "
              f"{r['list_s'] * 1e3:.0f} ms)   goal <= {GOAL_FIRST_SCREEN_S:g} s "
              f"({verdict(r['first_screen_s'] <= GOAL_FIRST_SCREEN_S)})")
    elif section == "local":
        print(f"local: {LOCAL_VMS} real QEMU VMs (builtin guest), sampled at {RATE_HZ:g} Hz "
              f"(started in {r['start_s']:.1f} s; {r['load']})")
        print(f"  daemon CPU {r['daemon_cpu_pct']:.1f} % of a core   goal <= {GOAL_LOCAL_DAEMON_CPU:g} % "
              f"({verdict(r['daemon_cpu_pct'] <= GOAL_LOCAL_DAEMON_CPU)}); samples delivered "
              f"{100 * r['delivered']:.1f} %")


if __name__ == "__main__":
    main()
