"""mtevm's Linux guest image booted in a bare qemu-system-aarch64 (TCG, -M virt,mte=on, the real
Debian kernel), spoken to over the agent's virtio-serial port, as the host side will.

What a user relies on: the agent says hello with the guest's MTE facts; a program with a known
number of sync and async tag-check faults shows exactly those numbers in the agent's totals and in
its process entry, with the fault address and pointer tag of each sync fault; a program copied from
the host runs with streamed output and its exit status; the kernel's MTE selftests run and print
TAP; bad exec requests get an error; a host that reconnects gets hello again and the totals kept.
One boot for the module; QEMU is stopped by its PID.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from tests.guests.bare_linux import booted

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest(linux_image):
    with booted(linux_image, smp=2) as vm_and_link:
        yield vm_and_link


def totals(link) -> dict:
    """The agent's cumulative totals now (hello makes it send a faults message)."""
    link.send({"type": "hello"})
    return link.wait_for("faults", timeout=10)["totals"]


def test_hello_reports_the_guests_mte_facts(guest, linux_image):
    vm, link = guest
    h = link.hello()
    assert h["agent"] == 1
    assert h["kernel"] == linux_image.kernel_release
    assert h["hwcap2_mte"] is True and h["hwcap2_mte3"] is True
    assert [c["cpu"] for c in h["cpus"]] == [0, 1]
    assert all(c["mte_tcf_preferred"] in ("sync", "async", "asymm") for c in h["cpus"])
    assert h["tracing"] is True and h["tracing_error"] is None
    # Fault addresses: from the BPF program (si_addr), on until the host turns them off
    assert h["fault_address_available"] is True and h["fault_address"] is True
    assert h["counting"] == "bpf" and h["counting_note"] is None and h["paused"] is False
    assert 0 < h["setup_s"] < h["uptime"]
    assert "mtevm: init ready" in vm.console()


def test_exact_sync_and_async_fault_counts(guest):
    _, link = guest
    before = totals(link)
    r = link.run("faults-1", path="/opt/mtevm/bin/mte-faults", args=["37", "23"])
    assert r["exit"]["status"] == 0, r
    assert b"sync 37/37 async 23/23" in r["stdout"]
    pid = r["started"]["pid"]
    # The agent sends the program's faults before its exit: they are in the messages already.
    faults = [m for m in r["messages"] if m["type"] == "faults"]
    after = faults[-1]["totals"]
    assert after["sync"] - before["sync"] == 37
    assert after["async"] - before["async"] == 23
    procs = [p for m in faults for p in m["processes"] if p["pid"] == pid]
    assert procs[-1] == {"pid": pid, "comm": "mte-faults", "sync": 37, "async": 23}
    # With fault addresses on (the default) every fault is an event: the address and pointer tag
    # of each sync one (mte-faults loads through a pointer tagged 5 from memory tagged 3, in one
    # page); an async fault has no address (the CPU only sets TFSR_EL1.TF0).
    events = [e for m in faults for e in m["events"] if e["pid"] == pid]
    sync = [e for e in events if e["code"] == 9]
    assert len(sync) == 37 and len(events) == 60 and sum(m["dropped"] for m in faults) == 0
    assert all(0 <= e["cpu"] < 2 and e["comm"] == "mte-faults" for e in events)
    assert all(e["ptr_tag"] == 5 and e["addr"] > 0 and e["addr"] % 4096 == 0 for e in sync)
    assert len({e["addr"] for e in sync}) == 1
    assert not any("addr" in e for e in events if e["code"] == 8)
    per_cpu = faults[-1]["cpus"]
    assert sum(c["sync"] for c in per_cpu) == after["sync"] and sum(c["async"] for c in per_cpu) == after["async"]


def test_with_fault_addresses_off_counts_stay_exact_and_events_are_sampled(guest):
    """The host may turn addresses off (faster faulting programs): counts are still exact, events
    are a sample (a short recording window per batch) and 'dropped' accounts for the rest."""
    _, link = guest
    link.send({"type": "config", "fault_address": False})
    try:
        h = link.hello()
        assert h["fault_address"] is False and "turned off by the host" in h["fault_address_why"]
        before = totals(link)
        r = link.run("sampled", path="/opt/mtevm/bin/mte-faults", args=["37", "23"])
        assert r["exit"]["status"] == 0
        faults = [m for m in r["messages"] if m["type"] == "faults"]
        after = faults[-1]["totals"]
        assert (after["sync"] - before["sync"], after["async"] - before["async"]) == (37, 23)
        events = [e for m in faults for e in m["events"] if e["pid"] == r["started"]["pid"]]
        assert len(events) + sum(m["dropped"] for m in faults) == 60
        assert not any("addr" in e for e in events)
    finally:
        link.send({"type": "config", "fault_address": True})
    assert link.hello()["fault_address"] is True


def test_a_short_lived_child_shows_under_its_own_pid_and_name(guest):
    """A process the agent did not start (a shell's child) that lived for a moment: its faults are
    its own process row, with the kernel's name for it, in fast mode too (the BPF program takes
    the comm with the process's first fault), and the events are a bounded sample of the newest."""
    _, link = guest
    link.send({"type": "config", "fault_address": False})
    try:
        link.hello()
        r = link.run("child", path="/bin/sh", args=["-c", "/opt/mtevm/bin/mte-faults 150 50; echo done"])
        assert r["exit"]["status"] == 0, r
        faults = [m for m in r["messages"] if m["type"] == "faults"]
        rows = {p["pid"]: p for m in faults for p in m["processes"]}
        child = [p for pid, p in rows.items() if pid != r["started"]["pid"]]
        assert [(p["comm"], p["sync"], p["async"]) for p in child] == [("mte-faults", 150, 50)]
        events = [e for m in faults for e in m["events"] if e["pid"] == child[0]["pid"]]
        assert 0 < len(events) < 200 and len(events) + sum(m["dropped"] for m in faults) == 200
        assert all(e["comm"] == "mte-faults" and "addr" not in e for e in events)
    finally:
        link.send({"type": "config", "fault_address": True})


def test_counting_can_be_paused(guest):
    """config counting=false: no tracing at all (a program runs at full speed), counts kept;
    true: counting goes on from there."""
    _, link = guest
    before = totals(link)
    link.send({"type": "config", "counting": False})
    try:
        assert link.hello()["paused"] is True
        assert link.run("p1", path="/opt/mtevm/bin/mte-faults", args=["5", "5"])["exit"]["status"] == 0
        assert totals(link) == before
    finally:
        link.send({"type": "config", "counting": True})
    assert link.hello()["paused"] is False
    assert link.run("p2", path="/opt/mtevm/bin/mte-faults", args=["2", "1"])["exit"]["status"] == 0
    assert totals(link) == {"sync": before["sync"] + 2, "async": before["async"] + 1}


def test_exec_copies_a_host_program_and_streams_its_output(guest, linux_image):
    _, link = guest
    data = Path(linux_image.program("mte-faults")).read_bytes()
    r = link.run(7, name="my-prog", args=["2", "1"], data=base64.b64encode(data).decode())
    assert r["error"] is None, r["error"]
    assert r["started"]["pid"] > 1
    assert r["exit"] == {"type": "exec-exit", "id": 7, "pid": r["started"]["pid"], "status": 0, "signal": None}
    assert b"sync 2/2 async 1/1" in r["stdout"]
    procs = [p for m in r["messages"] if m["type"] == "faults" for p in m["processes"]]
    assert {"pid": r["started"]["pid"], "comm": "my-prog", "sync": 2, "async": 1} in procs
    # usage error: exit status 2 and the text on stderr
    r = link.run(8, name="my-prog", args=[], data=base64.b64encode(data).decode())
    assert r["exit"]["status"] == 2 and b"usage: mte-faults" in r["stderr"]


def test_exec_errors_are_reported(guest):
    _, link = guest
    r = link.run("bad-1", path="/opt/mtevm/bin/no-such-program")
    assert "no-such-program" in r["error"]["message"]
    r = link.run("bad-2", name="../escape", data="AAAA")
    assert "plain file name" in r["error"]["message"]
    r = link.run("bad-3", name="x", data="not base64!")
    assert "base64" in r["error"]["message"]
    # a file that is not a program: the agent runs it, the kernel refuses, status 127
    r = link.run("bad-4", name="junk", data=base64.b64encode(b"just text\n").decode())
    assert r["exit"]["status"] == 127 and b"cannot run" in r["stderr"]


def test_kernel_selftests_run_and_print_tap(guest):
    _, link = guest
    r = link.run("list", path="/bin/cat", args=["/opt/mtevm/selftests/list"])
    listing = r["stdout"].decode().splitlines()
    default = [l for l in listing if l and not l.startswith("#") and "# slow" not in l]
    slow = [l.split()[0] for l in listing if "# slow" in l and not l.startswith("#")]
    assert set(slow) == {"check_user_mem", "check_gcr_el1_cswitch"}
    assert default[:5] == ["check_buffer_fill", "check_tags_inclusion", "check_mmap_options",
                           "check_child_memory", "check_prctl"]
    for name in default[:5]:
        r = link.run(name, path=f"/opt/mtevm/selftests/{name}", cwd="/opt/mtevm/selftests")
        out = r["stdout"].decode()
        assert r["exit"]["status"] == 0, (name, out, r["stderr"])
        assert re.search(r"^1\.\.\d+$", out, re.M), out
        m = re.search(r"# Totals: pass:(\d+) fail:(\d+)", out)
        assert m and int(m.group(1)) > 0 and m.group(2) == "0", out


def test_reconnecting_host_gets_hello_and_the_totals_kept(guest):
    vm, link = guest
    before = totals(link)
    link.close()
    second = vm.connect()
    try:
        h = second.hello()
        assert h["hwcap2_mte"] is True
        r = second.run("again", path="/opt/mtevm/bin/mte-faults", args=["3", "0"])
        assert r["exit"]["status"] == 0
        after = [m for m in r["messages"] if m["type"] == "faults"][-1]["totals"]
        assert after == {"sync": before["sync"] + 3, "async": before["async"]}
    finally:
        guest_link = second
    # the module's later users keep talking through the new connection
    link.__dict__.update(guest_link.__dict__)


def test_poweroff_says_bye_and_the_guest_powers_off(guest):
    """Last in this module: it ends the guest. QEMU exits by itself (PSCI SYSTEM_OFF)."""
    vm, link = guest
    link.send({"type": "poweroff"})
    assert link.wait_for("bye", timeout=30) == {"type": "bye", "reason": "poweroff"}
    assert vm.proc.wait(timeout=60) == 0
