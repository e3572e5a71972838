"""End to end: a real daemon process driven through the real CLI, on the simulated hosts.

The user's stories: create/start/toggle MTE/migrate/delete on both simulated hosts, the seed's
error texts, kill -9 and SIGTERM of the daemon.
"""
from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import time

from backend.daemon.launch import daemon_pid

MTE_BLOCKER = "Live migration disabled due to MTE enabled"


def fails(run_mtevm, code: int, *args: str) -> str:
    """Run a command that must fail with ``code``; return its one error line (stdout stays empty)."""
    r = run_mtevm(*args)
    assert r.returncode == code, (args, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("mtevm: error: ")
    return r.stderr.strip().removeprefix("mtevm: error: ")


def test_the_whole_story_on_sim_mte(mtevm, run_mtevm):
    vm = mtevm("create", "web")
    assert (vm["host"], vm["state"]) == ("sim-mte", "stopped")
    assert vm["config"] == {"accel": "kvm", "cpu": "host", "vcpus": 2, "memory": 256 << 20, "mte": True,
                            "secure": False, "only_migratable": False}
    assert fails(run_mtevm, 2, "create", "web") == "a VM named 'web' already exists"

    vm = mtevm("start", "web")
    assert vm["state"] == "running"
    vm = mtevm("show", "web")
    assert [c["kvm_mte"] for c in vm["vcpus"]] == [True, True]
    assert vm["blocked_reasons"] == [MTE_BLOCKER]
    assert {"index", "kvm_mte", "tcf", "checked", "sync_faults", "async_faults"} <= set(vm["vcpus"][0])

    # MTE cannot change under a running machine: the change waits for the next start.
    vm = mtevm("mte", "web", "off")
    assert vm["pending"] == {"mte": False} and vm["config"]["mte"] is True
    assert mtevm("list")[0]["pending"] == {"mte": False}
    assert mtevm("mte", "web", "on")["pending"] == {}      # back to the running value: nothing pending
    mtevm("mte", "web", "off")

    # The seed's blocker, verbatim, refuses the migration and is recorded as blocked.
    assert fails(run_mtevm, 1, "migrate", "web", "--to", "sim-nomte") == MTE_BLOCKER
    [m] = mtevm("migrations")
    assert (m["vm"], m["src"], m["dst"], m["state"], m["reason"]) == ("web", "sim-mte", "sim-nomte", "blocked",
                                                                       MTE_BLOCKER)
    assert fails(run_mtevm, 1, "delete", "web", "--yes") == "VM 'web' is running: stop it first"

    mtevm("stop", "web")
    vm = mtevm("start", "web")                              # the pending change applies now
    assert vm["config"]["mte"] is False and vm["pending"] == {}
    assert [c["kvm_mte"] for c in vm["vcpus"]] == [False, False] and vm["blocked_reasons"] == []

    before = mtevm("counters", "web")["vm"]["checked"]
    m = mtevm("migrate", "web", "--to", "sim-nomte")        # waits for the end by default
    assert (m["state"], m["progress"], m["src"], m["dst"]) == ("completed", 1.0, "sim-mte", "sim-nomte")
    assert m["finished"] >= m["started"]
    vm = mtevm("show", "web")
    assert (vm["host"], vm["state"]) == ("sim-nomte", "running")
    assert mtevm("counters", "web")["vm"]["checked"] >= before    # counters carry on after the move
    assert [x["state"] for x in mtevm("migrations")] == ["completed", "blocked"]

    assert fails(run_mtevm, 1, "delete", "web") == "VM 'web' is running: stop it first"   # before any question
    mtevm("stop", "web")
    assert fails(run_mtevm, 2, "delete", "web") == ("refusing to delete VM 'web' without confirmation: "
                                                    "pass --yes")
    assert mtevm("delete", "web", "--yes") == {"deleted": "web"}
    assert mtevm("list") == []
    assert fails(run_mtevm, 1, "show", "web") == "no VM named 'web'"


def stored_host(paths, name: str) -> str:
    db = sqlite3.connect(f"file:{paths.store}?mode=ro", uri=True)
    try:
        return db.execute("SELECT host FROM vms WHERE name=?", (name,)).fetchone()[0]
    finally:
        db.close()


def test_story_on_sim_nomte_and_tag_migration(mtevm_paths, mtevm, run_mtevm):
    vm = mtevm("create", "plain", "--host", "sim-nomte", "--no-mte", "--vcpus", "3", "--memory", "512M",
               "--workload", "seed=7,tcf=sync,async", "--rate", "5000")
    assert vm["config"]["vcpus"] == 3 and vm["config"]["memory"] == 512 << 20 and not vm["config"]["mte"]
    assert vm["workload"]["seed"] == 7 and vm["workload"]["tcf"] == ["sync", "async"]
    assert vm["workload"]["rate"] == 5000
    mtevm("start", "plain")
    vm = mtevm("show", "plain")
    assert [c["tcf"] for c in vm["vcpus"]] == ["sync", "async", "async"]
    vm = mtevm("tcf", "plain", "asymm", "--vcpu", "1")          # live, and kept in the definition
    assert [c["tcf"] for c in vm["vcpus"]] == ["sync", "asymm", "async"]
    assert vm["workload"]["tcf"] == ["sync", "asymm", "async"]
    m = mtevm("migrate", "plain", "--to", "sim-mte")
    assert m["state"] == "completed"
    assert mtevm("show", "plain")["host"] == "sim-mte"
    assert stored_host(mtevm_paths, "plain") == "sim-mte"     # persisted, not only in the daemon's memory

    # An MTE VM under KVM can move only with mtevm's opt-in tag migration.
    mtevm("create", "tagged")
    mtevm("start", "tagged")
    m = mtevm("migrate", "tagged", "--to", "sim-mte", "--with-tags")
    assert (m["state"], m["with_tags"]) == ("completed", True)
    vm = mtevm("show", "tagged")
    assert vm["state"] == "running" and vm["blocked_reasons"] == [MTE_BLOCKER]


def test_the_seeds_error_messages(mtevm, run_mtevm):
    mtevm("create", "nokvm", "--host", "sim-nomte")
    assert fails(run_mtevm, 1, "start", "nokvm") == "MTE requested, but not supported by KVM"
    vm = mtevm("show", "nokvm")
    assert vm["state"] == "stopped" and vm["last_error"] == "MTE requested, but not supported by KVM"

    mtevm("create", "a57", "--accel", "tcg", "--cpu", "cortex-a57")
    assert fails(run_mtevm, 1, "start", "a57") == "MTE requested, but not supported by the guest CPU"

    mtevm("create", "strict", "--only-migratable")
    assert fails(run_mtevm, 1, "start", "strict") == \
        "disallowing migration blocker (--only-migratable) for: Live migration disabled due to MTE enabled"
    assert [v["state"] for v in mtevm("list")] == ["stopped"] * 3


def test_bad_usage_exits_2_and_operation_failures_exit_1(mtevm, run_mtevm):
    assert "vcpus" in fails(run_mtevm, 2, "create", "x", "--vcpus", "0")
    assert "memory" in fails(run_mtevm, 2, "create", "x", "--memory", "lots")
    assert "colour" in fails(run_mtevm, 2, "create", "x", "--workload", "colour=red")
    assert "'rate' is not k=v" in fails(run_mtevm, 2, "create", "x", "--workload", "rate")
    # argparse's errors are one line like every other error, pointing at the command's --help
    assert fails(run_mtevm, 2, "create") == ("the following arguments are required: name "
                                             "(see 'mtevm create --help')")
    assert fails(run_mtevm, 1, "stop", "nosuch") == "no VM named 'nosuch'"
    mtevm("create", "x")
    # The same unknown host gives the same error and exit code wherever it is named.
    assert fails(run_mtevm, 1, "migrate", "x", "--to", "mars") == \
        fails(run_mtevm, 1, "create", "y", "--host", "mars") == \
        fails(run_mtevm, 1, "probe", "--host", "mars")
    assert "unknown host 'mars'" in fails(run_mtevm, 1, "create", "y", "--host", "mars")
    # Errors speak the user's words, not the API's internals (null, extra_args).
    vcpu_error = fails(run_mtevm, 2, "tcf", "x", "sync", "--vcpu", "7")
    assert vcpu_error == "VM 'x' has no vCPU 7: give a vCPU index 0..1, or no vCPU to set all of them"
    qemu_error = fails(run_mtevm, 2, "create", "q", "--host", "local", "--qemu-arg=-monitor stdio")
    assert "null" not in vcpu_error + qemu_error and "extra_args" not in qemu_error
    assert mtevm("list")[0]["name"] == "x"


def test_kill_9_of_the_daemon_loses_no_definition(mtevm_paths, mtevm, run_mtevm):
    mtevm("create", "a", "--vcpus", "4")
    mtevm("create", "b", "--host", "sim-nomte", "--no-mte")
    mtevm("start", "a")
    mtevm("mte", "a", "off")
    before = {v["name"]: v for v in mtevm("list")}
    old = daemon_pid(mtevm_paths)
    os.kill(old, signal.SIGKILL)
    while daemon_pid(mtevm_paths) is not None:
        time.sleep(0.02)

    after = {v["name"]: v for v in mtevm("list")}           # a new daemon, started on demand
    assert daemon_pid(mtevm_paths) not in (None, old)
    assert set(after) == {"a", "b"}
    assert after["a"]["state"] == "stopped"                   # simulated VMs died with their daemon
    assert after["a"]["pending"] == {"mte": False}
    for name in after:
        for key in ("host", "accel", "cpu", "vcpus", "memory", "mte", "pending"):
            assert after[name][key] == before[name][key]
    assert mtevm("start", "a")["config"]["mte"] is False


def test_sigterm_stops_cleanly_and_saves_sim_vms_stopped(mtevm_paths, mtevm, run_mtevm):
    mtevm("create", "a")
    mtevm("start", "a")
    pid = daemon_pid(mtevm_paths)
    os.kill(pid, signal.SIGTERM)
    while daemon_pid(mtevm_paths) is not None:
        time.sleep(0.02)
    assert not os.path.exists(mtevm_paths.socket)
    assert open(mtevm_paths.log_file).read().splitlines()[-1].endswith("stopped")
    db = sqlite3.connect(f"file:{mtevm_paths.store}?mode=ro", uri=True)
    assert db.execute("SELECT state FROM vms WHERE name='a'").fetchall() == [("stopped",)]
    db.close()
    assert mtevm("show", "a")["state"] == "stopped"


def test_counters_watch_streams_samples(mtevm_paths, mtevm):
    mtevm("create", "w", "--rate", "2000")
    mtevm("start", "w")
    # Ctrl+C as at a terminal: a test run started in the background (`cmd &`) inherits SIGINT ignored,
    # and a program started with SIGINT ignored rightly keeps ignoring it, so give it back its default.
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "counters", "w", "--watch", "--json",
                             "--rate", "10"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        samples = [json.loads(proc.stdout.readline()) for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)   # keep reading: a watcher blocked on a full pipe cannot exit
    assert [s["name"] for s in samples] == ["w"] * 3
    assert samples[0]["time"] < samples[1]["time"] < samples[2]["time"]
    assert samples[2]["vm"]["checked"] >= samples[0]["vm"]["checked"]


def test_delete_asks_on_a_terminal(mtevm_paths, mtevm):
    mtevm("create", "d")

    def delete_answering(answer: str) -> tuple[int, str]:
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "delete", "d"], stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(slave)
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=30)
        os.close(master)
        return proc.returncode, out + err

    mtevm("start", "d")                     # running: refused before the question, not after a yes
    code, text = delete_answering("y")
    assert code == 1 and "VM 'd' is running: stop it first" in text and "Delete VM" not in text
    mtevm("stop", "d")
    code, text = delete_answering("n")
    assert code == 1 and "not deleted" in text
    assert [v["name"] for v in mtevm("list")] == ["d"]
    code, text = delete_answering("y")
    assert code == 0 and "deleted VM d" in text
    assert mtevm("list") == []


def test_hosts_and_probe_as_json(mtevm, run_mtevm):
    hosts = {h["name"]: h for h in mtevm("hosts")}
    assert set(hosts) == {"sim-mte", "sim-nomte", "local"}
    assert hosts["sim-mte"]["kvm_mte"] is True and hosts["sim-nomte"]["kvm_mte"] is False
    assert hosts["sim-mte"]["kind"] == "simulated" and hosts["local"]["kind"] == "local"
    reports = {r["host"]: r for r in mtevm("probe")}
    assert set(reports) == set(hosts)
    for r in reports.values():
        assert {"present", "api_version", "cap_arm_mte"} <= set(r["kvm"])
        assert {"binary", "version", "usable_for_mte"} <= set(r["qemu"])
        assert r["verdicts"] and all(v["level"] in ("ok", "warn", "error") for v in r["verdicts"])
    assert reports["sim-mte"]["kvm"]["cap_arm_mte"] == 1 and not reports["sim-nomte"]["kvm"]["cap_arm_mte"]
    [only] = mtevm("probe", "--host", "sim-nomte")
    assert only["host"] == "sim-nomte"
    assert "unknown host 'mars'" in fails(run_mtevm, 1, "probe", "--host", "mars")
    human = run_mtevm("probe")
    assert human.returncode == 0 and "KVM_CAP_ARM_MTE" in human.stdout


async def _next_matching(events, predicate, limit: float = 30.0) -> dict:
    """The next event that satisfies ``predicate`` (the bound only stops a broken daemon hanging the test)."""
    async def scan():
        async for event in events:
            if predicate(event):
                return event
        raise AssertionError("the event stream ended")
    return await asyncio.wait_for(scan(), limit)


async def test_events_over_the_socket(mtevm_paths):
    from backend.client import connect
    async with await connect() as client:
        assert not client.in_process
        await client.create({"name": "ev1", "workload": {"rate": 5000}})
        await client.start("ev1")
        events = client.events(rate_hz=20)
        try:
            first = await _next_matching(events, lambda e: e["type"] == "counters")
            assert first["vm"] == "ev1" and first["counters"]["name"] == "ev1"
            assert len(first["counters"]["vcpus"]) == 2
            # from here on the stream is subscribed: every change shows up in it
            await client.create({"name": "ev2", "host": "sim-nomte", "mte": False})
            e = await _next_matching(events, lambda e: e["type"] == "vm" and e.get("vm", {}).get("name") == "ev2")
            assert e["vm"]["state"] == "stopped" and e["vm"]["host"] == "sim-nomte"
            await client.set_mte("ev1", False)
            e = await _next_matching(events, lambda e: e["type"] == "vm" and e.get("vm", {}).get("name") == "ev1")
            assert e["vm"]["pending"] == {"mte": False}
            await client.start("ev2")
            states = []
            while states[-2:] != ["starting", "running"]:
                e = await _next_matching(events, lambda e: e["type"] == "vm" and e.get("vm", {}).get("name") == "ev2")
                states.append(e["vm"]["state"])

            m = await client.migrate("ev2", "sim-mte")
            progress = []
            while True:
                e = await _next_matching(events, lambda e: e["type"] == "migration" and e["migration"]["id"] == m["id"])
                progress.append(e["migration"]["progress"])
                if e["migration"]["state"] in ("completed", "failed"):
                    break
            assert e["migration"]["state"] == "completed", e["migration"]["reason"]
            assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > 2
            e = await _next_matching(events, lambda e: e["type"] == "vm" and e.get("vm", {}).get("name") == "ev2")
            assert (e["vm"]["host"], e["vm"]["state"]) == ("sim-mte", "running")
            await _next_matching(events, lambda e: e["type"] == "counters" and e["vm"] == "ev2")

            await client.stop("ev2")
            await client.delete("ev2")
            await _next_matching(events, lambda e: e.get("deleted") == "ev2")
        finally:
            await events.aclose()
        # faults/s comes from successive samples of a VM that takes faults (ev1's workload injects bugs)
        for _ in range(100):
            if [v for v in await client.list() if v["name"] == "ev1"][0]["faults_per_s"] > 0:
                break
            await asyncio.sleep(0.1)
        assert [v for v in await client.list() if v["name"] == "ev1"][0]["faults_per_s"] > 0


async def test_validate_only_dry_runs_the_seed_without_storing(inproc_client):
    """One rule (issue 11 item 13): a malformed definition is an error; a well-formed one that can
    never start on its host is ok, with QEMU's text as a warning (the user may move it)."""
    c = inproc_client
    assert await c.create({"name": "ok1"}, validate_only=True) == {"ok": True, "error": None, "warnings": []}
    assert await c.create({"name": "n", "host": "sim-nomte"}, validate_only=True) == \
        {"ok": True, "error": None, "warnings": ["MTE requested, but not supported by KVM"]}
    assert await c.create({"name": "n", "accel": "tcg", "cpu": "cortex-a57"}, validate_only=True) == \
        {"ok": True, "error": None, "warnings": ["MTE requested, but not supported by the guest CPU"]}
    assert (await c.create({"name": "n", "vcpus": 0}, validate_only=True))["ok"] is False
    assert await c.list() == []


async def test_a_definition_that_cannot_start_is_stored_with_the_warning(inproc_client):
    c = inproc_client
    vm = await c.create({"name": "n", "host": "sim-nomte", "mte": True})
    assert vm["warnings"] == ["MTE requested, but not supported by KVM"]
    assert (await c.show("n"))["warnings"] == ["MTE requested, but not supported by KVM"]
    assert (await c.set_mte("n", False))["warnings"] == []          # fixed: no warning any more
    await c.create({"name": "ok1"})
    assert await c.create({"name": "ok1", "host": "sim-nomte"}, validate_only=True, existing=True) == \
        {"ok": True, "error": None, "warnings": ["MTE requested, but not supported by KVM"]}
    assert (await c.create({"name": "nope"}, validate_only=True, existing=True))["ok"] is False


def test_no_command_opens_the_app(run_mtevm):
    r = run_mtevm("--keys")          # the app's own option: proves the app, not the CLI, got the arguments
    assert r.returncode == 0 and r.stdout.strip()


def test_sigterm_during_a_migration_records_it_failed(mtevm_paths, mtevm):
    mtevm("create", "mover", "--no-mte")
    mtevm("start", "mover")
    m = mtevm("migrate", "mover", "--to", "sim-nomte", "--no-wait")
    assert m["state"] in ("setup", "active")
    os.kill(daemon_pid(mtevm_paths), signal.SIGTERM)     # a simulated migration takes ~0.6 s: still running
    while daemon_pid(mtevm_paths) is not None:
        time.sleep(0.02)
    [after] = mtevm("migrations")
    assert (after["id"], after["state"]) == (m["id"], "failed")
    assert after["reason"] == "the daemon stopped during the migration" and after["finished"]
    vm = mtevm("show", "mover")
    assert (vm["host"], vm["state"]) == ("sim-mte", "stopped")


async def test_events_carry_the_counters_of_a_512_vcpu_vm(mtevm_paths):
    """A counters event of the biggest VM (512 vCPUs, each with a last fault) arrives whole."""
    from backend.client import connect
    async with await connect() as client:
        await client.create({"name": "big", "vcpus": 512, "workload": {"rate": 500, "uaf_rate": 0.2,
                                                                       "heap_size": 65536}})
        await client.start("big")
        events = client.events(rate_hz=4)
        try:
            e = await _next_matching(events, lambda e: e["type"] == "counters" and all(
                c["last_fault"] for c in e["counters"]["vcpus"]))
        finally:
            await events.aclose()
        assert [c["index"] for c in e["counters"]["vcpus"]] == list(range(512))


def test_cli_create_of_a_vm_that_cannot_start_warns_with_qemus_text(run_mtevm):
    """The CLI and the forms share one rule: accepted (exit 0), with QEMU's text as a warning."""
    r = run_mtevm("--no-daemon", "create", "n1", "--host", "sim-nomte", "--mte")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "mtevm: warning: VM n1 cannot start on sim-nomte: MTE requested, but not supported by KVM"
    r = run_mtevm("--no-daemon", "create", "n2", "--host", "sim-nomte", "--no-mte")
    assert r.returncode == 0 and r.stderr == ""
    r = run_mtevm("--no-daemon", "show", "n1")
    assert r.returncode == 0 and "MTE requested, but not supported by KVM" in r.stdout
    r = run_mtevm("--no-daemon", "mte", "n2", "on")        # the same rule when MTE is switched on later
    assert r.returncode == 0
    assert r.stderr.strip() == "mtevm: warning: VM n2 cannot start on sim-nomte: MTE requested, but not supported by KVM"
