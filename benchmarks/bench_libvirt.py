"""libvirt hosts: mtevm through its daemon beside virsh for the same facts, on two real libvirtd.

Two test libvirt hosts (tests/helpers/libvirtd.py: private namespaces, one reached over a real
sshd on loopback) and an mtevm daemon with both added, every connection warm:
- ``list``: mtevm's VM list vs ``virsh list --all`` (goal: mtevm not slower);
- ``show``: mtevm's VM detail vs virsh's ``dominfo`` + the same two monitor commands mtevm's
  detail reads (the guest's status block with HMP ``xp``, ``query-migrate``) (goal: not slower);
- a counter sample of a VM on the ssh host through the daemon (goal: <= 10 ms);
- a live peer-to-peer migration between the hosts vs ``virsh migrate --live --p2p`` of an
  identical domain (goal: within 1.2x);
- a snapshot (libvirt external memory snapshot) saved and restored by mtevm vs ``virsh
  snapshot-create-as --memspec`` / ``snapshot-revert`` of the identical domain (goal: within 1.2x;
  virsh's process start-up and connection are subtracted: a ``virsh list`` on the same URI).
virsh runs as one interactive process per figure (its connection opened once, as mtevm's is);
its per-command time is (time of R+1 rounds - time of 1 round) / R, best of 3 each, so process
start-up and connection are not counted. On a loaded machine every figure is noisy: run it idle.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from backend.client import connect
from backend.daemon.launch import daemon_pid, stop_daemon
from backend.paths import Paths
from backend.qemu import guest_abi

N = 40                  # samples per figure
ROUNDS = 3              # interleaved rounds of every list/show/sample figure (medians reported)
MIGRATIONS = 2          # each way, for mtevm and for virsh
GOAL_SAMPLE_MS = 10.0
GOAL_MIGRATION_RATIO = 1.2
SNAPSHOTS = 3           # save + restore rounds, for mtevm and for virsh
GOAL_SNAPSHOT_RATIO = 1.2
UUIDS = ("6d7e0b6a-1f0e-4c55-9a53-3b8e2f4c0a91", "6d7e0b6a-1f0e-4c55-9a53-3b8e2f4c0b92")


def virsh_per_command(uri: str, commands: list[str]) -> float:
    """Milliseconds per round of ``commands`` in one warm interactive virsh."""
    def run(rounds: int) -> float:
        script = "\n".join(commands * rounds) + "\nquit\n"
        t = time.perf_counter()
        r = subprocess.run(["virsh", "-q", "-c", uri], input=script, capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"virsh failed: {r.stderr.strip()}")
        return time.perf_counter() - t
    rounds = N * 5       # virsh's per-command time is small beside its start-up: many rounds, best of 3
    one = min(run(1) for _ in range(3))
    return max(0.0, (min(run(rounds + 1) for _ in range(3)) - one) / rounds * 1000)


async def timed_ms(fn, n: int = N) -> float:
    """Median milliseconds of ``await fn()``."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def virsh_migrate(src_uri: str, dst_uri: str, name: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(["virsh", "-c", src_uri, "migrate", "--live", "--p2p", "--persistent", "--undefinesource",
                        name, dst_uri, "--migrateuri", "tcp://127.0.0.1"], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"virsh migrate failed: {r.stderr.strip()}")
    return time.perf_counter() - t


def virsh_seconds(uri: str, *args: str) -> float:
    """Seconds of one ``virsh`` command (a process: start-up and connection included)."""
    t = time.perf_counter()
    r = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"virsh {args[0]} failed: {r.stderr.strip()}")
    return time.perf_counter() - t


async def snapshot_figures(c, uri: str) -> dict:
    """mtevm's v1 and virsh's twin, both running on ``uri``: median save and restore seconds each."""
    overhead = statistics.median(virsh_seconds(uri, "list", "--name") for _ in range(5))
    times: dict[str, list[float]] = {}
    for i in range(SNAPSHOTS):
        for key, step in (("mtevm_snap_save_s", lambda: c.snapshot_save("v1", f"b{i}")),
                          ("mtevm_snap_restore_s", lambda: c.snapshot_restore("v1", f"b{i}"))):
            t = time.perf_counter()
            await step()
            times.setdefault(key, []).append(time.perf_counter() - t)
        memspec = f"file=/var/lib/libvirt/mtevm/twin@b{i}.mem,snapshot=external"
        times.setdefault("virsh_snap_save_s", []).append(
            virsh_seconds(uri, "snapshot-create-as", "twin", f"b{i}", "--memspec", memspec) - overhead)
        times.setdefault("virsh_snap_restore_s", []).append(
            virsh_seconds(uri, "snapshot-revert", "twin", f"b{i}") - overhead)
    return {key: statistics.median(values) for key, values in times.items()}


def twin_domain(uris: tuple[str, str], name: str) -> None:
    """A domain like mtevm's v1 (same XML, the same guest files under its own name) on host a,
    defined and started by libvirt alone: what a virsh user would migrate."""
    import libvirt

    from backend.hosts.libvirt import _upload, register_error_handler
    register_error_handler()
    from backend.hosts.libvirt_domain import domain_xml, guest_volume, params_volume
    from backend.hosts.workload import WorkloadConfig
    from backend.machine import VirtMachineConfig
    config, workload = VirtMachineConfig(name=name, vcpus=2), WorkloadConfig()
    with open(guest_abi.GUEST_ELF, "rb") as f:
        guest = f.read()
    params = guest_abi.pack_params(workload, config.vcpus, ram_size=config.memory)
    paths = {}
    for uri in uris:
        conn = libvirt.open(uri)
        paths = {"kernel": _upload(conn, guest_volume(name), guest), "params": _upload(conn, params_volume(name), params)}
        conn.close()
    conn = libvirt.open(uris[0])
    conn.defineXML(domain_xml(config, workload.to_dict(), [], **paths)).create()
    conn.close()


async def run(hosts, paths: Paths) -> dict:
    uri_a, uri_b = hosts["a"].uri, hosts["b"].ssh_uri(hosts["sshd"])
    f: dict = {}
    async with await connect(runtime_dir=paths.runtime_dir, state_dir=paths.state_dir) as c:
        await c.host_add("a", uri_a)
        await c.host_add("b", uri_b)
        await c.create({"name": "v1", "host": "b", "vcpus": 2})
        await c.start("v1")
        await asyncio.sleep(1.0)
        await c.list()
        xp = guest_abi.xp_command(2)
        show_cmds = ["dominfo v1", f"qemu-monitor-command v1 --hmp '{xp}'",
                     "qemu-monitor-command v1 '{\"execute\":\"query-migrate\"}'"]
        rounds: dict[str, list[float]] = {}
        for _ in range(ROUNDS):     # interleaved, so load that comes and goes hits both sides alike
            for key, value in (("mtevm_list_ms", await timed_ms(c.list)),
                               ("virsh_list_ms", virsh_per_command(uri_b, ["list --all"])),
                               ("mtevm_show_ms", await timed_ms(lambda: c.show("v1"))),
                               ("virsh_show_ms", virsh_per_command(uri_b, show_cmds)),
                               ("sample_ssh_ms", await timed_ms(lambda: c.counters("v1")))):
                rounds.setdefault(key, []).append(value)
        f.update({key: statistics.median(values) for key, values in rounds.items()})
        # migration: mtevm's v1 b -> a -> b ..., virsh's twin a -> b -> a ...
        await c.stop("v1")
        await c.delete("v1")
        await c.create({"name": "v1", "host": "a", "vcpus": 2})
        await c.start("v1")
        twin_domain((uri_a, uri_b), "twin")
        await asyncio.sleep(1.0)
        mtevm_s, virsh_s = [], []
        for i in range(MIGRATIONS * 2):
            dst = "b" if i % 2 == 0 else "a"
            t = time.perf_counter()
            m = await c.migrate("v1", dst)
            while m["state"] in ("setup", "active"):
                await asyncio.sleep(0.02)
                m = next(x for x in await c.migrations() if x["id"] == m["id"])
            if m["state"] != "completed":
                raise RuntimeError(f"mtevm migration {m['state']}: {m['reason']}")
            mtevm_s.append(time.perf_counter() - t)
            src_uri, dst_uri = (uri_a, uri_b) if i % 2 == 0 else (uri_b, uri_a)
            virsh_s.append(virsh_migrate(src_uri, dst_uri, "twin"))
        f["mtevm_migrate_s"] = statistics.median(mtevm_s)
        f["virsh_migrate_s"] = statistics.median(virsh_s)
        f.update(await snapshot_figures(c, uri_a))     # both are back on host a
        await c.stop("v1")
        await c.delete("v1")
    return f


def main() -> dict:
    from tests.helpers.libvirtd import LibvirtDaemon
    from tests.helpers.sshd import SshServer
    base = Path(tempfile.mkdtemp(prefix="mtevm-bench-libvirt-"))
    paths = Paths(str(base / "run"), str(base / "state"))
    a = LibvirtDaemon(base / "a", "bench-lva", UUIDS[0])
    b = LibvirtDaemon(base / "b", "bench-lvb", UUIDS[1])
    sshd = None
    try:
        a.start()
        subprocess.run(["virsh", "-c", a.uri, "capabilities"], capture_output=True, timeout=120)  # QEMU probe
        b.seed_cache(a)
        b.start()
        sshd = SshServer(base / "ssh", wrap=b.nsenter()).start()
        f = asyncio.run(run({"a": a, "b": b, "sshd": sshd}, paths))
    finally:
        if daemon_pid(paths):
            stop_daemon(paths)
        if sshd is not None:
            sshd.stop()
        b.stop()
        a.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"libvirt hosts (a: qemu+unix, b: qemu+ssh over a real sshd; warm connections; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"  list (VM on b)    mtevm {f['mtevm_list_ms']:.2f} ms   virsh list --all {f['virsh_list_ms']:.2f} ms   "
          f"ratio mtevm/virsh {f['mtevm_list_ms'] / f['virsh_list_ms']:.2f}  (goal <= 1)")
    print(f"  show (VM on b)    mtevm {f['mtevm_show_ms']:.2f} ms   virsh dominfo + xp + query-migrate "
          f"{f['virsh_show_ms']:.2f} ms   ratio {f['mtevm_show_ms'] / f['virsh_show_ms']:.2f}  (goal <= 1)")
    print(f"  counter sample over ssh   {f['sample_ssh_ms']:.2f} ms   goal <= {GOAL_SAMPLE_MS:.0f} ms  "
          f"(ratio {f['sample_ssh_ms'] / GOAL_SAMPLE_MS:.2f})")
    print(f"  live p2p migration, 256M   mtevm {f['mtevm_migrate_s']:.2f} s   virsh migrate {f['virsh_migrate_s']:.2f} s   "
          f"ratio {f['mtevm_migrate_s'] / f['virsh_migrate_s']:.2f}  (goal <= {GOAL_MIGRATION_RATIO})")
    for what in ("save", "restore"):
        mine, theirs = f[f"mtevm_snap_{what}_s"], f[f"virsh_snap_{what}_s"]
        print(f"  snapshot {what:<7} 256M   mtevm {mine:.3f} s   virsh snapshot-"
              f"{'create-as' if what == 'save' else 'revert'} {theirs:.3f} s   ratio {mine / theirs:.2f}  "
              f"(goal <= {GOAL_SNAPSHOT_RATIO})")
    return f


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "200")
    main()
