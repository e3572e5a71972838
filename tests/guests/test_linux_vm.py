"""A real Linux MTE guest (the Debian kernel, mtevm's image) as a user runs it: through the real
``mtevm`` CLI and a real daemon, QEMU under TCG. One boot for most of the module (a second one
after the clean poweroff, for the panic); every QEMU and daemon is stopped by PID at the end.

What a user relies on: the guest's facts; exact sync/async fault counts of a program run with
``mtevm exec`` (per process and guest-wide, per vCPU); exec's streams, exit status and errors;
the console through a real pty; the kernel's MTE selftests; a new daemon reattaching console and
agent; a local migration with the counters continuing; stop as a clean poweroff; a kernel panic
shown as crashed with its lines.
"""
from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import time

import pytest

from backend.paths import Paths
from backend.qemu.driver import kill_strays
from tests.helpers.pty_io import read_until, reap
from tests.conftest import stop_daemon_by_pid

pytestmark = pytest.mark.qemu
FAST_SELFTESTS = ["check_buffer_fill", "check_tags_inclusion", "check_mmap_options", "check_child_memory",
                  "check_prctl"]


class Cli:
    """The real CLI on one private runtime/state dir pair."""

    def __init__(self, paths: Paths):
        self.paths = paths
        self.env = {**os.environ, "MTEVM_RUNTIME_DIR": paths.runtime_dir, "MTEVM_STATE_DIR": paths.state_dir,
                    "COLUMNS": "200"}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "backend.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def json(self, *args: str, timeout: float = 120):
        r = self.run(*args, "--json", timeout=timeout)
        assert r.returncode == 0, f"mtevm {' '.join(args)}: {r.stderr}"
        return json.loads(r.stdout)

    def wait(self, predicate, what: str, timeout: float = 120.0, name: str = "lx") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            vm = self.json("show", name)
            if predicate(vm):
                return vm
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s; last: {vm}"
            time.sleep(0.5)


def exec_json(cli: Cli, *argv: str) -> dict:
    r = cli.run("exec", "lx", "--json", "--", *argv)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def agent_connected(vm: dict) -> bool:
    return vm["state"] == "running" and (vm.get("guest_facts") or {}).get("agent") == "connected"


def vm_faults(vm: dict) -> tuple[int, int]:
    return (sum(c["sync_faults"] for c in vm["vcpus"]), sum(c["async_faults"] for c in vm["vcpus"]))


@pytest.fixture(scope="module")
def lx(linux_image, tmp_path_factory):
    """A running ``linux`` VM, 2 vCPUs, the workload on with tcf none (its checked accesses move, it
    takes no faults: every fault the guest counts is the tests' own), sync fault addresses on (the
    default: nothing asked)."""
    base = tmp_path_factory.mktemp("lx")
    paths = Paths(str(base / "run"), str(base / "state"))
    cli = Cli(paths)
    try:
        vm = cli.json("create", "lx", "--host", "local", "--guest", "linux", "--vcpus", "2", "--memory", "256M",
                      "--tcf", "none", "--rate", "2000")
        assert vm["guest"] == {"kind": "linux", "fault_address": True}     # on by default, stored explicitly
        cli.json("start", "lx")
        cli.wait(agent_connected, "the guest agent connects")
        yield cli
    finally:
        stop_daemon_by_pid(paths)
        # A daemon leaves real VMs running on purpose (the next one reattaches): stop ours by PID.
        asyncio.run(kill_strays(paths.runtime_dir))


def program(linux_image, name: str) -> str:
    return linux_image.program(name)


def test_the_guest_says_what_it_is(lx, linux_image):
    vm = lx.json("show", "lx")
    facts = vm["guest_facts"]
    assert facts["kernel"] == linux_image.kernel_release
    assert facts["hwcap2_mte"] is True and facts["hwcap2_mte3"] is True
    assert [c["cpu"] for c in facts["cpus"]] == [0, 1]
    assert all(c["mte_tcf_preferred"] in ("sync", "async", "asymm") for c in facts["cpus"])
    assert facts["tracing"] is True
    assert facts["fault_address"] is True and facts["fault_address_why"].startswith("sync faults: ")   # default: on
    human = lx.run("show", "lx").stdout
    assert linux_image.kernel_release in human and "MTE, MTE3" in human
    argv = lx.json("show", "lx", "--argv")
    assert argv[argv.index("-kernel") + 1] == linux_image.kernel
    assert argv[argv.index("-initrd") + 1] == linux_image.initrd
    assert "mtevm.tcf=none,none" in argv[argv.index("-append") + 1]
    assert "virtserialport,chardev=agent,name=org.mtevm.agent.0" in argv
    # the workload runs with no user action: its checked accesses move on both vCPUs
    moving = lx.wait(lambda v: all(c["checked"] > 0 for c in v["vcpus"]), "the workload counts accesses")
    assert all(c["tcf"] == "none" for c in moving["vcpus"])


def test_exact_fault_counts_of_a_program_run_with_exec(lx, linux_image):
    before = vm_faults(lx.json("show", "lx"))
    r = lx.run("exec", "lx", "--json", "--", program(linux_image, "mte-faults"), "37", "23")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["status"] == 0 and result["signal"] is None
    assert result["faults"] == {"sync": 37, "async": 23}
    assert "sync 37/37 async 23/23" in result["stdout"]
    vm = lx.wait(lambda v: vm_faults(v) == (before[0] + 37, before[1] + 23), "guest-wide counters")
    [proc] = [p for p in vm["processes"] if p["pid"] == result["pid"]]
    assert proc == {"pid": result["pid"], "comm": "mte-faults", "sync": 37, "async": 23}
    # The newest faults are the program's (the workload takes none): async ones have no address
    # (the CPU records none), sync ones have the fault address and pointer tag (the SIGSEGV's si_addr).
    mine = [f for f in vm["last_faults"] if f.get("pid") == result["pid"]]
    assert mine and all(f["comm"] == "mte-faults" and f["vcpu"] in (0, 1) for f in mine)
    assert all((f["addr"] is None) == (f["kind"] == "async") for f in mine)
    few = exec_json(lx, program(linux_image, "mte-faults"), "3", "0")
    vm = lx.wait(lambda v: any(f.get("pid") == few["pid"] for f in v["last_faults"]), "the sync faults' events")
    sync = [f for f in vm["last_faults"] if f.get("pid") == few["pid"]]
    assert sync and all(f["kind"] == "sync" and f["addr"].startswith("0x") and 0 <= f["ptr_tag"] <= 15 for f in sync)


def test_exec_streams_output_and_returns_the_exit_status(lx, linux_image, tmp_path):
    faults = program(linux_image, "mte-faults")
    r = lx.run("exec", "lx", "--", faults, "2", "1")
    assert r.returncode == 0 and r.stdout.startswith("mte-faults: sync 2/2 async 1/1")
    bad = lx.run("exec", "lx", "--", faults, "nonsense")     # its usage error: stderr and its status
    assert bad.returncode != 0 and bad.stdout == "" and "usage" in bad.stderr.lower()

    r = lx.run("exec", "lx", "--", sys.executable)
    assert r.returncode == 2 and "not an aarch64 ELF program (it is for x86-64)" in r.stderr
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(33 << 20)
    r = lx.run("exec", "lx", "--", str(big))
    assert r.returncode == 2 and "is too big to run in the guest" in r.stderr
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    r = lx.run("exec", "lx", "--", str(script))
    assert r.returncode == 2 and "not an aarch64 ELF program (a script)" in r.stderr
    r = lx.run("exec", "nope", "--", faults)
    assert r.returncode == 1 and "no VM named 'nope'" in r.stderr


def attach(lx: Cli):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "console", "lx"], stdin=slave, stdout=slave,
                            stderr=slave, env=lx.env, start_new_session=True)
    os.close(slave)
    read_until(master, b"detach: ^]")
    return master, proc


def detach(master: int, proc: subprocess.Popen) -> None:
    try:
        os.write(master, b"\x1d")
        read_until(master, b"Detached from the console.")
        assert proc.wait(10) == 0
    finally:
        reap(master, proc)


def test_the_console_through_a_real_pty(lx):
    master, proc = attach(lx)
    try:
        os.write(master, b"\r")
        read_until(master, b"mtevm#")           # the guest's shell prompt
        os.write(master, b"echo hello-$((6*7))\r")
        read_until(master, b"hello-42")         # the guest's shell computed it
    finally:
        detach(master, proc)
    log = lx.json("console", "lx", "--log", "--lines", "1000")["lines"]
    assert "mtevm: init ready" in log and "hello-42" in log


def test_the_console_over_a_real_ssh_connection(lx, tmp_path):
    """``ssh -t host mtevm console lx`` from a real pty, through a real sshd on loopback: the remote
    terminal goes raw (the guest's shell echoes), ctrl+] detaches, ssh ends cleanly."""
    import shlex

    from tests.helpers import mtevm_executable
    from tests.helpers.sshd import SshServer
    with SshServer(tmp_path / "ssh") as sshd:
        remote = (f"exec env MTEVM_RUNTIME_DIR={shlex.quote(lx.paths.runtime_dir)} "
                  f"MTEVM_STATE_DIR={shlex.quote(lx.paths.state_dir)} {shlex.quote(mtevm_executable())} console lx")
        master, slave = pty.openpty()
        proc = subprocess.Popen(sshd.ssh_argv(remote), stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
        os.close(slave)
        try:
            read_until(master, b"detach: ^]")
            os.write(master, b"echo over-ssh-$((40+2))\r")
            read_until(master, b"over-ssh-42")
            os.write(master, b"\x1d")
            read_until(master, b"Detached from the console.")
            assert proc.wait(20) == 0
        finally:
            reap(master, proc)


def test_the_kernels_mte_selftests_pass(lx):
    r = lx.run("selftest", "lx", *FAST_SELFTESTS, "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [t["name"] for t in report["tests"]] == FAST_SELFTESTS
    assert all(t["result"] == "pass" and t["pass"] > 0 and t["fail"] == 0 for t in report["tests"]), report
    assert report["totals"] == {"pass": 5, "fail": 0, "skip": 0}
    listing = lx.json("selftest", "lx", "--list")
    slow = {t["name"] for t in listing if t["slow"]}
    assert "check_gcr_el1_cswitch" in slow and not slow & set(FAST_SELFTESTS)
    live = lx.run("selftest", "lx", "check_prctl")          # live, one line per TAP case
    assert live.returncode == 0 and "check_prctl: pass" in live.stdout and "PASS  check_prctl  (5 pass" in live.stdout
    r = lx.run("selftest", "lx", "check_nothing")
    assert r.returncode == 2 and "no selftest named check_nothing" in r.stderr


async def test_the_app_shows_the_guest_its_console_processes_and_selftests(lx, linux_image):
    """The VM detail of the real app on the real daemon: the guest's facts, the per-process fault
    table, the live console (what the guest prints after the screen opened, too), QEMU's command
    line; ``t`` runs the selftests screen."""
    from textual.widgets import DataTable, Log, Static

    from backend.client import connect
    from tui.app import MtevmApp
    from tui.screens.vm_detail import VmDetailScreen

    async def factory():
        return await connect(runtime_dir=lx.paths.runtime_dir, state_dir=lx.paths.state_dir, start_daemon=False)

    app = MtevmApp(factory)
    async with app.run_test(size=(160, 60)) as pilot:
        await pilot.pause(1)
        screen = VmDetailScreen("lx")
        await app.push_screen(screen)
        await pilot.pause(0.5)

        async def until(check, what: str, timeout: float = 30.0) -> None:
            for _ in range(int(timeout * 10)):
                if check():
                    return
                await pilot.pause(0.1)
            raise AssertionError(what)

        await until(lambda: any("mtevm: init ready" in ln for ln in screen.query_one("#console", Log).lines),
                    "the console's log in the detail")
        config = str(screen.query_one("#vm-config", Static).render())
        assert "guest linux  fault addresses on (sync faults)" in config and "HWCAP2 MTE MTE3" in config
        result = await asyncio.to_thread(exec_json, lx, linux_image.program("mte-faults"), "2", "1")
        await until(lambda: f"{result['pid']:>7}  mte-faults" in str(screen.query_one("#procs", Static).render()),
                    "the program's faults in the process table")
        assert "-kernel" in str(screen.query_one("#argv", Static).render())
        # something printed on the console now reaches the open screen live
        master, proc = await asyncio.to_thread(attach, lx)
        try:
            os.write(master, b"echo live-$((40+2))\r")
            await asyncio.to_thread(read_until, master, b"live-42")
        finally:
            await asyncio.to_thread(detach, master, proc)
        await until(lambda: any("live-42" in ln for ln in screen.query_one("#console", Log).lines),
                    "live console output in the detail")

        await pilot.press("t")
        await until(lambda: app.screen is not screen, "the selftests screen")
        table = app.screen.query_one(DataTable)
        passed = lambda: sum(1 for i in range(table.row_count) if table.get_row_at(i)[1] == "pass")  # noqa: E731
        await until(lambda: passed() >= 5, "five selftests pass on the screen", 120)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert not any(r[1] == "fail" for r in rows), rows


def test_a_new_daemon_reattaches_console_and_agent(lx, linux_image):
    before = lx.json("show", "lx")
    r = lx.run("daemon", "stop")
    assert r.returncode == 0, r.stderr
    vm = lx.wait(agent_connected, "the agent reconnects to the new daemon", timeout=60)
    assert vm_faults(vm) == vm_faults(before)                   # the guest kept its totals
    result = exec_json(lx, program(linux_image, "mte-faults"), "3", "0")
    assert result["faults"] == {"sync": 3, "async": 0}
    lx.wait(lambda v: vm_faults(v)[0] == vm_faults(before)[0] + 3, "counters continue after reattach")
    master, proc = attach(lx)                                   # the console is back too
    try:
        os.write(master, b"echo again-$((2*21))\r")
        read_until(master, b"again-42")
    finally:
        detach(master, proc)


def test_a_local_migration_keeps_counting(lx, linux_image):
    before = lx.json("show", "lx")
    pid_before = lx.json("show", "lx", "--argv")
    m = lx.json("migrate", "lx", "--to", "local", timeout=180)
    assert m["state"] == "completed", m
    vm = lx.wait(agent_connected, "the agent reconnects on the destination", timeout=60)
    assert vm_faults(vm) == vm_faults(before)
    assert lx.json("show", "lx", "--argv") != pid_before      # a new QEMU (new sockets)
    result = exec_json(lx, program(linux_image, "mte-faults"), "4", "2")
    assert result["faults"] == {"sync": 4, "async": 2}
    lx.wait(lambda v: vm_faults(v) == (vm_faults(before)[0] + 4, vm_faults(before)[1] + 2),
            "counters continue on the destination")


def test_reboot_goes_through_the_guest_agent(lx):
    before = lx.json("show", "lx")
    assert vm_faults(before) != (0, 0)
    vm = lx.json("reboot", "lx", timeout=180)
    assert vm["outcome"]["how"] == "agent", vm["outcome"]
    vm = lx.wait(agent_connected, "the agent after the reboot")
    assert vm_faults(vm) == (0, 0) and vm["processes"] == []          # a new boot counts anew
    log = lx.json("console", "lx", "--log", "--lines", "400")["lines"]
    assert any("reboot: Restarting system" in line for line in log)
    assert log.count("mtevm: init ready") >= 2


def test_stop_powers_the_guest_off_and_a_panic_shows_as_crashed(lx):
    stopped = lx.json("stop", "lx")
    assert stopped["state"] == "stopped"
    log = lx.json("console", "lx", "--log", "--lines", "50")["lines"]
    assert any("reboot: Power down" in line for line in log), log[-10:]     # the kernel's own poweroff

    lx.json("start", "lx")
    lx.wait(agent_connected, "the agent after a second boot")
    master, proc = attach(lx)
    try:
        os.write(master, b"echo c > /proc/sysrq-trigger\r")
        read_until(master, b"Kernel panic - not syncing: sysrq triggered crash")
        read_until(master, b"The console closed")
        assert proc.wait(20) == 0
    finally:
        reap(master, proc)
    vm = lx.wait(lambda v: v["state"] == "crashed", "the panic makes the VM crashed", timeout=30)
    assert vm["last_error"] == "guest kernel panic: Kernel panic - not syncing: sysrq triggered crash"
    assert any("sysrq: Trigger a crash" in line for line in vm["stderr"])
    assert lx.json("list")[0]["state"] == "crashed"
    assert asyncio.run(kill_strays(lx.paths.runtime_dir)) == []      # the daemon stopped the panicked QEMU
