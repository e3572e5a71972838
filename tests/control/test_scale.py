"""Scale: simulated vCPUs run in worker processes; limits are refused up front; a dead worker is a
crashed VM, never a dead daemon; no worker outlives the daemon. Real daemon, real CLI, real
processes and signals (no timing is asserted: speed goals are in benchmarks/bench_scale.py)."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from backend.errors import ConfigError, StateError
from backend.hosts.sim import MAX_SIM_HEAP, MAX_SIM_RATE, SimHost
from backend.hosts.workers import WorkerPool, vcpu_seconds
from backend.daemon.launch import daemon_pid


def children(pid: int, needle: str) -> list[int]:
    """PIDs whose parent is ``pid`` and whose command line contains ``needle`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and needle in cmdline:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_a_killed_worker_is_a_crashed_vm_and_the_daemon_carries_on(mtevm, run_mtevm, mtevm_paths):
    mtevm("create", "a")
    mtevm("start", "a")
    daemon = daemon_pid(mtevm_paths)
    workers = wait_until(lambda: children(daemon, "backend.hosts.simworker"), "a worker process")
    assert len(workers) == 1                     # the vCPUs run outside the daemon
    wait_until(lambda: mtevm("counters", "a")["vm"]["checked"] > 0, "counters moving in shared memory")

    os.kill(workers[0], signal.SIGKILL)
    vm = wait_until(lambda: (v := mtevm("show", "a"))["state"] == "crashed" and v, "the VM to be crashed")
    assert vm["last_error"] == f"simulated vCPU worker (pid {workers[0]}) died: killed by signal 9 (SIGKILL)"
    assert daemon_pid(mtevm_paths) == daemon and alive(daemon)
    assert [v["name"] for v in mtevm("list")] == ["a"]

    # The VM starts again, on a new worker; and a stopped daemon leaves no worker behind.
    assert mtevm("start", "a")["state"] == "running"
    new = wait_until(lambda: children(daemon, "backend.hosts.simworker"), "a new worker process")
    assert new != workers
    r = run_mtevm("daemon", "stop")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not alive(daemon), "the daemon to exit")
    wait_until(lambda: not any(alive(p) for p in new), "the worker to exit with the daemon")


def test_a_daemon_killed_with_sigkill_takes_its_workers_along(mtevm, mtevm_paths):
    mtevm("create", "a", "--vcpus", "1")
    mtevm("start", "a")
    daemon = daemon_pid(mtevm_paths)
    workers = wait_until(lambda: children(daemon, "backend.hosts.simworker"), "a worker process")
    segments = [n for n in os.listdir("/dev/shm") if n.startswith(f"mtevm-sim-{daemon}-")]
    assert len(segments) == 1                   # the VM's counters and tags, shared with its worker
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in workers), "the worker to die with its daemon")
    # The next daemon removes what the killed one could not (and the VM restarts there).
    assert mtevm("start", "a")["state"] == "running"
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in segments)


@pytest.mark.parametrize("args, message", [
    (["--memory", "128G"], "memory 128G is more than a simulated host gives one VM: at most 64G"),
    (["--workload", f"rate={MAX_SIM_RATE + 1}"],
     f"workload rate {MAX_SIM_RATE + 1} is more than a simulated vCPU can run: at most {MAX_SIM_RATE} accesses "
     "per second per vCPU (rate 0 runs flat out)"),
    (["--workload", f"heap_size={MAX_SIM_HEAP * 2}"],
     "workload heap_size 128M is more than a simulated vCPU gets: at most 64M per vCPU"),
    (["--vcpus", "512", "--memory", "4G", "--workload", f"heap_size={4 << 20}"],
     "workload heap_size: 512 vCPU heaps of 4M make 2G; a simulated VM's heaps may take at most 1G in all"),
    (["--vcpus", "8", "--memory", "64M", "--workload", f"heap_size={16 << 20}"],
     "workload heap_size: 8 vCPU heaps of 16M from RAM offset 16M need 144M of memory, the VM has 64M"),
    (["--vcpus", "64", "--workload", "rate=1000000"],
     "64 vCPUs at workload rate 1000000 need 3.67 vCPU-seconds per second; a simulated VM gets at most 1 (its "
     "vCPUs share one worker process): lower the rate or the vCPUs, or use rate 0 (flat out)"),
])
def test_the_cli_refuses_what_a_simulated_host_cannot_honour(run_mtevm, mtevm, args, message):
    r = run_mtevm("create", "big", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"mtevm: error: {message}"
    assert mtevm("list") == []                 # nothing was stored, nothing runs


async def test_the_api_and_the_form_check_limits_before_anything_runs(inproc_client):
    c = inproc_client
    with pytest.raises(ConfigError, match=r"^memory 1T is more than a simulated host gives one VM: at most 64G$"):
        await c.create({"name": "big", "vcpus": 512, "memory": "1T"})
    check = await c.create({"name": "big", "workload": {"rate": 10**9}}, validate_only=True)
    assert {k: check[k] for k in ("ok", "error")} == {"ok": False, "error": f"workload rate 1000000000 is more than a simulated vCPU can run: at most "
                                           f"{MAX_SIM_RATE} accesses per second per vCPU (rate 0 runs flat out)"}
    assert await c.list() == []


async def test_a_full_host_says_so_with_both_figures(mtevm_paths):
    from backend.client import connect
    pool = WorkerPool(size=1)
    hosts = {"sim-mte": SimHost("sim-mte", True, pool=pool)}
    client = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir,
                           hosts=hosts)
    try:
        await client.create({"name": "small", "vcpus": 4, "workload": {"rate": 3_000_000}})
        await client.start("small")
        await client.create({"name": "hog", "vcpus": 4, "workload": {"rate": 3_000_000}})
        asks = vcpu_seconds(3_000_000, 4)
        assert 0.5 < asks <= 1.0            # each fits in one worker; both do not
        with pytest.raises(StateError) as e:
            await client.start("hog")
        assert str(e.value).startswith("host sim-mte is full: it has 1 vCPU-seconds per second for simulated "
                                       f"vCPUs (1 worker processes), {asks:.3f} are in use, and VM 'hog' asks for "
                                       f"{asks:.3f} (4 vCPUs at 3000000 accesses/s)")
        states = {v["name"]: v["state"] for v in await client.list()}
        assert states == {"small": "running", "hog": "stopped"}
        assert len(pool.pids()) == 1 and len(pool.workers[0].vms) == 1     # the refused VM got no worker
    finally:
        await client.close()
    assert pool.workers == []                  # closing the hosts stopped the worker


async def test_a_slow_event_client_gets_the_latest_sample_and_is_told_what_it_skipped(inproc_client):
    c = inproc_client
    for name in ("a", "b"):
        await c.create({"name": name, "vcpus": 1, "workload": {"rate": 5000}})
        await c.start(name)
    events = c.events(rate_hz=20)
    try:
        seen: dict[str, list[dict]] = {"a": [], "b": []}
        async for e in events:
            if e["type"] == "counters":
                seen[e["vm"]].append(e)
                if all(seen.values()):
                    break
        assert all(v[0]["skipped"] == 0 for v in seen.values())    # a first sample skips nothing
        await asyncio.sleep(1.0)              # this client falls 20 ticks behind
        later: dict[str, dict] = {}
        async for e in events:
            if e["type"] == "counters":
                later.setdefault(e["vm"], e)
                if len(later) == 2:
                    break
    finally:
        await events.aclose()
    for name in ("a", "b"):
        # one sample per VM for the time it was away, the newest, with the count of those it replaced
        assert later[name]["skipped"] >= 18
        assert later[name]["counters"]["time"] > seen[name][-1]["counters"]["time"] + 1.0


def test_the_watch_line_says_how_many_samples_were_skipped():
    from backend.cli import counters_line
    c = {"time": 0.0, "vm": {"checked": 5, "unchecked": 1, "sync_faults": 2, "async_faults": 0}}
    assert "skipped" not in counters_line(c, 0.0, 0)
    assert counters_line(c, 1.5, 3).endswith("faults/s 1.5  (skipped 3 samples: this terminal fell behind)")


async def test_the_socket_stream_carries_per_vcpu_figures_only_where_asked(mtevm_paths):
    from backend.client import connect
    async with await connect() as client:          # a real daemon over its socket
        for name in ("a", "b"):
            await client.create({"name": name, "vcpus": 2, "workload": {"rate": 1000}})
            await client.start(name)

        async def first_round(**kwargs) -> dict[str, dict]:
            got: dict[str, dict] = {}
            events = client.events(rate_hz=10, **kwargs)
            try:
                async for e in events:
                    if e["type"] == "counters":
                        got[e["vm"]] = e["counters"]
                        if len(got) == 2:
                            return got
            finally:
                await events.aclose()

        everything = await first_round()
        assert [len(everything[n]["vcpus"]) for n in ("a", "b")] == [2, 2]
        totals = await first_round(vcpus="none")
        assert all("vcpus" not in c and set(c["vm"]) == {"checked", "unchecked", "sync_faults", "async_faults"}
                   for c in totals.values())
        one = await first_round(vcpus="b")
        assert "vcpus" not in one["a"] and len(one["b"]["vcpus"]) == 2


async def test_a_round_of_a_fleet_goes_out_in_few_writes_and_the_client_reads_every_sample(mtevm_paths):
    """The daemon writes the events its stream has ready together (backend/daemon/server.py), and the
    client decodes such a batch at once: every VM's sample still arrives, once per round, whole."""
    import aiohttp
    import json
    from backend.client import connect
    names = [f"r{i:02d}" for i in range(24)]
    async with await connect() as client:          # a real daemon over its socket
        for name in names:
            await client.create({"name": name, "vcpus": 1, "workload": {"rate": 100}})
            await client.start(name)

        rounds: list[list[str]] = []
        events = client.events(rate_hz=4, vcpus="none")
        try:
            async for e in events:
                if e["type"] != "counters":
                    continue
                if not rounds or e["vm"] in rounds[-1]:
                    rounds.append([])
                rounds[-1].append(e["vm"])
                assert set(e["counters"]["vm"]) >= {"checked", "sync_faults", "async_faults"}
                if len(rounds) == 4:
                    break
        finally:
            await events.aclose()
        assert all(sorted(r) == names for r in rounds[1:3])     # whole rounds, each VM once

        # On the wire: HTTP chunks that carry several events (one write per slice of a round).
        per_chunk: list[int] = []
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=mtevm_paths.socket)) as http:
            async with http.get("http://mtevm/v1/events", params={"rate": "4", "vcpus": "none"}) as resp:
                buffer = b""
                while sum(per_chunk) < 3 * len(names):
                    data, end = await asyncio.wait_for(resp.content.readchunk(), 30)
                    buffer += data
                    if end:
                        lines = [line for line in buffer.split(b"\n") if line.strip()]
                        per_chunk.append(sum(json.loads(line)["type"] == "counters" for line in lines))
                        buffer = b""
        assert max(per_chunk) > 1, per_chunk
