"""How light is the app on a big fleet? CPU and terminal bytes, beside a naive DataTable baseline.

Why: the app is meant to be left open over ssh on a host running many VMs. 64 simulated VMs of
8 vCPUs each run in a real mtevm daemon (started here in the foreground, stopped by PID), and each
front end runs as a real process in a real pty (120x36, TERM=xterm-256color) with counters
arriving at 4 Hz; this parent reads the pty's master side (the bytes an ssh link would carry) and
the child's CPU time from /proc/<pid>/stat.

The service runs in the daemon, not in the measured process: stepping 512 simulated vCPUs costs
about 60 % of a core by itself, which would bury the front ends' difference in noise.

Three children, measured one after another in this run, over the same window:
  client    the 4 Hz event stream decoded by a client, no UI (the floor both UIs pay)
  baseline  a plain Textual DataTable, one row per vCPU, update_cell for every counter on every sample
  app       mtevm's app with the VM detail screen open (the goals are for this one)
  app-list  mtevm's app on its VM list screen (for reference)
Figures: CPU % of one core, bytes/s to the terminal; a UI's own CPU is its child's minus the
client's. Goals: app < 32 KiB/s; app's own CPU at most half the baseline's.

Run: `python -m benchmarks tui` or `python benchmarks/bench_tui.py [--seconds 10]`.
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

WIDTH, HEIGHT = 120, 36
N_VMS, N_VCPUS = 64, 8
RATE_HZ = 4.0
ACCESSES_PER_S = 100           # per vCPU: counters rise visibly, the service stays a small floor
WARMUP_S = 3.0
BYTES_GOAL = 32 * 1024
COUNTER_COLUMNS = ("checked", "unchecked", "sync_faults", "async_faults")
KINDS = ("client", "baseline", "app", "app-list")   # app: detail open (the goal); app-list: for reference


# ----------------------------------------------------------------------------- the child side
def vm_name(i: int) -> str:
    return f"bench-{i:02d}"


async def seed_fleet(env: dict) -> None:
    """N_VMS simulated MTE VMs of N_VCPUS vCPUs in the daemon of ``env``'s dirs, all running."""
    from backend.client import connect

    async with await connect(in_process=False, runtime_dir=env["MTEVM_RUNTIME_DIR"],
                             state_dir=env["MTEVM_STATE_DIR"]) as client:
        for i in range(N_VMS):
            await client.create({"name": vm_name(i), "host": "sim-mte", "accel": "kvm", "cpu": "host",
                                 "vcpus": N_VCPUS, "memory": "256M", "mte": True,
                                 "workload": {"seed": i + 1, "rate": ACCESSES_PER_S,
                                              "tcf": ["sync", "async", "asymm", "none"]}})
            await client.start(vm_name(i))


def baseline_app(client):
    """A plain Textual DataTable: one row per vCPU, update_cell for each counter of each sample."""
    from textual.app import App, ComposeResult
    from textual.widgets import DataTable

    class DataTableBaseline(App):
        def compose(self) -> ComposeResult:
            yield DataTable()

        async def on_mount(self) -> None:
            table = self.query_one(DataTable)
            table.add_column("vm", key="vm")
            table.add_column("vcpu", key="vcpu")
            table.add_column("tcf", key="tcf")
            for col in COUNTER_COLUMNS:
                table.add_column(col, key=col)
            for vm in await client.list():
                for v in await client.vcpus(vm["name"]):
                    table.add_row(vm["name"], v["index"], v["tcf"],
                                  *(v[c] for c in COUNTER_COLUMNS), key=f"{vm['name']}/{v['index']}")
            self.run_worker(self.follow(table), exclusive=True)
            _ready()

        async def follow(self, table) -> None:
            async for event in client.events(rate_hz=RATE_HZ):
                if event.get("type") != "counters":
                    continue
                for v in event["counters"]["vcpus"]:
                    row = f"{event['vm']}/{v['index']}"
                    for col in COUNTER_COLUMNS:
                        table.update_cell(row, col, v[col])

    return DataTableBaseline()


def mtevm_app(client, open_detail: bool = True):
    """The real app, on this client (as `mtevm` builds it), that opens the first VM like a user."""
    from tui.app import MtevmApp
    from tui.screens.vm_detail import VmDetailScreen
    from tui.screens.vm_list import VmListScreen

    class Measured(MtevmApp):         # MtevmApp.CSS_PATH is absolute, so this subclass finds it too
        def on_mount(self) -> None:         # Textual runs MtevmApp.on_mount as well
            self.run_worker(self.open_detail_when_listed())

        async def open_detail_when_listed(self) -> None:
            while not isinstance(self.screen, VmListScreen):
                await asyncio.sleep(0.1)
            if open_detail:
                await self.push_screen(VmDetailScreen(vm_name(0)))
            _ready()

    async def factory():
        return client
    return Measured(factory, rate_hz=RATE_HZ)


def _ready() -> None:
    Path(os.environ["MTEVM_BENCH_READY"]).write_text(str(os.getpid()))


async def child_main(kind: str) -> None:
    from backend.client import connect

    client = await connect(in_process=False)        # the daemon of MTEVM_RUNTIME_DIR
    async with client:
        if kind == "client":
            _ready()
            async for _ in client.events(rate_hz=RATE_HZ):
                pass
        else:
            app = baseline_app(client) if kind == "baseline" else mtevm_app(client, kind == "app")
            await app.run_async()


# ----------------------------------------------------------------------------- the parent side
def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def stop_in_pty(proc: subprocess.Popen, term: "Terminal", master: int) -> None:
    """Stop a front end running in a pty by its PID (TERM, then KILL), draining the pty meanwhile so
    it never blocks on a full terminal, then close our end."""
    proc.terminate()
    try:
        term.drain(time.monotonic() + 5, lambda: proc.poll() is not None)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    os.close(master)


class Terminal:
    """The master side of a pty: counts what the child writes, per screen row too, and keeps the tail."""

    CURSOR_TO = re.compile(rb"\x1b\[(\d+);\d+H")

    def __init__(self, master: int):
        self.master = master
        self.tail = b""
        self.row = 0
        self.per_row: dict[int, int] = {}

    def drain(self, until: float, stop_when=None) -> int:
        """Read until ``until`` (or ``stop_when()``); return the bytes read."""
        n = 0
        while time.monotonic() < until:
            if stop_when is not None and stop_when():
                break
            r, _, _ = select.select([self.master], [], [], 0.05)
            if r:
                try:
                    data = os.read(self.master, 65536)
                except OSError:          # the child closed its terminal
                    break
                n += len(data)
                self.tail = (self.tail + data)[-4000:]
                self._count_rows(data)
        return n

    def _count_rows(self, data: bytes) -> None:
        """Charge each byte to the screen row the cursor was last moved to (Textual moves per line)."""
        pos = 0
        for m in self.CURSOR_TO.finditer(data):
            self.per_row[self.row] = self.per_row.get(self.row, 0) + m.start() - pos
            self.row, pos = int(m.group(1)), m.start()
        self.per_row[self.row] = self.per_row.get(self.row, 0) + len(data) - pos

    def tail_text(self) -> str:
        return self.tail.decode(errors="replace")


class Daemon:
    """A real mtevm daemon in the foreground on private dirs, holding the fleet; stopped by PID."""

    def __init__(self, root: Path):
        self.env = dict(os.environ, MTEVM_RUNTIME_DIR=str(root / "run"), MTEVM_STATE_DIR=str(root / "state"))
        self.log = open(root / "daemon.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.daemon"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout: float = 60) -> None:
        sock = Path(self.env["MTEVM_RUNTIME_DIR"], "mtevm.sock")
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"the daemon did not start:\n{self.log.read()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start_in_pty(argv: list[str], daemon: Daemon, ready: Path, width: int = WIDTH, height: int = HEIGHT):
    """Start a front end on ``daemon`` in a fresh width x height pty (it writes ``ready`` when it
    has drawn what it is measured on); returns (process, Terminal, master fd) for stop_in_pty."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    env = dict(daemon.env, TERM="xterm-256color", COLUMNS=str(width), LINES=str(height),
               MTEVM_BENCH_READY=str(ready))
    env.pop("COLORTERM", None)
    env.pop("TEXTUAL_DRIVER", None)
    # Textual draws on stderr, so all three standard streams are the pty (as in a terminal).
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    os.close(slave)
    return proc, Terminal(master), master


def measure(kind: str, seconds: float, daemon: Daemon, tmp: Path) -> dict:
    """Run one child in a fresh pty; return its CPU %, the daemon's, and terminal bytes/s over ``seconds``."""
    ready = tmp / f"ready-{kind}"
    proc, term, master = start_in_pty([sys.executable, __file__, "--child", kind], daemon, ready)
    try:
        term.drain(time.monotonic() + 120, lambda: ready.exists() or proc.poll() is not None)
        if not ready.exists():
            raise RuntimeError(f"{kind}: child did not get ready (exit {proc.poll()}):\n{term.tail_text()}")
        term.drain(time.monotonic() + WARMUP_S)
        term.per_row.clear()
        cpu0, dcpu0, t0 = _cpu_seconds(proc.pid), _cpu_seconds(daemon.proc.pid), time.monotonic()
        nbytes = term.drain(t0 + seconds)
        cpu1, dcpu1, t1 = _cpu_seconds(proc.pid), _cpu_seconds(daemon.proc.pid), time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"{kind}: child exited during the measurement:\n{term.tail_text()}")
    finally:
        stop_in_pty(proc, term, master)
    wall = t1 - t0
    busiest = sorted(term.per_row.items(), key=lambda kv: -kv[1])[:5]
    return {"kind": kind, "seconds": wall, "cpu_pct": 100 * (cpu1 - cpu0) / wall,
            "daemon_cpu_pct": 100 * (dcpu1 - dcpu0) / wall, "bytes_per_s": nbytes / wall,
            "busiest_rows": [(row, n / wall) for row, n in busiest]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_tui", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per child")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        asyncio.run(child_main(args.child))
        return {}

    print(f"bench_tui: {N_VMS} VMs x {N_VCPUS} vCPUs (simulated, in a daemon), events at {RATE_HZ:g} Hz, "
          f"{WIDTH}x{HEIGHT} pty, {args.seconds:g} s per front end")
    with tempfile.TemporaryDirectory(prefix="mtevm-bench-tui-") as tmp:
        daemon = Daemon(Path(tmp))
        try:
            daemon.wait_listening()
            asyncio.run(seed_fleet(daemon.env))
            results = {kind: measure(kind, args.seconds, daemon, Path(tmp)) for kind in KINDS}
        finally:
            daemon.stop()
    return report(results)


def report(results: dict) -> dict:
    floor = results["client"]["cpu_pct"]
    for r in results.values():
        r["own_cpu_pct"] = max(r["cpu_pct"] - floor, 0.0) if r["kind"] != "client" else 0.0
        print(f"  {r['kind']:9s} CPU {r['cpu_pct']:6.1f} % of a core (own {r['own_cpu_pct']:6.1f} %)  "
              f"terminal {r['bytes_per_s'] / 1024:8.1f} KiB/s   (daemon {r['daemon_cpu_pct']:.0f} %)")
    app, base = results["app"], results["baseline"]
    cpu_ratio = app["own_cpu_pct"] / base["own_cpu_pct"] if base["own_cpu_pct"] else float("inf")
    bytes_ratio = app["bytes_per_s"] / base["bytes_per_s"] if base["bytes_per_s"] else float("inf")
    print(f"  app/baseline own CPU ratio {cpu_ratio:.2f} (goal <= 0.50: "
          f"{'met' if cpu_ratio <= 0.5 else 'NOT met'})")
    print(f"  app/baseline terminal bytes ratio {bytes_ratio:.2f}; app {app['bytes_per_s'] / 1024:.1f} KiB/s "
          f"(goal < {BYTES_GOAL // 1024} KiB/s: {'met' if app['bytes_per_s'] < BYTES_GOAL else 'NOT met'})")
    rows = ", ".join(f"row {row}: {bps / 1024:.1f}" for row, bps in app["busiest_rows"])
    print(f"  app's busiest screen rows (KiB/s): {rows}")
    results["ratios"] = {"cpu_app_over_baseline": cpu_ratio, "bytes_app_over_baseline": bytes_ratio}
    return results


if __name__ == "__main__":
    main()
