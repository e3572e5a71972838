"""The libvirt host kind through the real CLI, against two real libvirt daemons (no mocks).

The story a user lives: add hosts by URI (one over ssh), create and start an MTE VM as a
persistent libvirt domain, watch its counters rise, see a blocked migration refused with libvirt's
own text, migrate live between the hosts with the guest's boot tags intact, lose a host (its VMs
become unknown, nothing else is hurt), get it back, and clean up.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from backend.machine.realize import MSG_TCG_CPU_NO_MTE
from tests.helpers.sshd import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

IVSHMEM_REFUSAL = ("Requested operation is not valid: cannot migrate domain: Migration is disabled when "
                   "using feature 'peer mode' in device 'ivshmem'")
IVSHMEM_BLOCKER = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def virsh(uri: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def wait_for(check, timeout: float, what: str):
    """Poll ``check`` until it returns something truthy (tests.helpers.sshd.wait_until), as an assertion."""
    try:
        return wait_until(check, timeout, what, interval=0.3)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None


def test_hosts_by_uri_vms_counters_migration_and_a_lost_host(libvirt_env, run_mtevm):
    h = libvirt_env
    qemu_version = ok(subprocess.run(["qemu-system-aarch64", "--version"], capture_output=True, text=True))

    def js(*args):
        return json.loads(ok(run_mtevm(*args, "--json")))

    def host(name):
        return next(x for x in js("hosts") if x["name"] == name)

    def vm(name):
        return next(v for v in js("list") if v["name"] == name)

    # -- hosts by URI: one through its socket, one over ssh --------------------------------------------
    out = ok(run_mtevm("host", "add", "hosta", h.uri_a))
    assert "added host hosta: libvirt 11." in out and "on mtevm-lva" in out
    ok(run_mtevm("host", "add", "hostb", h.uri_b))
    for name, hostname in (("hosta", "mtevm-lva"), ("hostb", "mtevm-lvb")):
        info = host(name)
        assert info["kind"] == "libvirt" and info["available"] and info["state"] == "connected", info
        assert info["hostname"] == hostname and info["libvirt_version"].startswith("11.")
        assert info["qemu_version"] in qemu_version
    probe = js("probe", "--host", "hostb")[0]
    assert probe["qemu"]["usable_for_mte"] and probe["cpu"]["arch"] == host("hostb")["arch"]
    assert {"name": "hostname", "value": "mtevm-lvb", "source": "virConnectGetHostname"} in probe["facts"]
    # the same name twice, or a URI that is not libvirt's QEMU driver: clear errors, nothing stored
    r = run_mtevm("host", "add", "hosta", h.uri_a)
    assert r.returncode == 2 and "a host named 'hosta' already exists" in r.stderr
    r = run_mtevm("host", "add", "web", "https://example.com/")
    assert r.returncode == 2 and "is not a libvirt URI of the QEMU driver" in r.stderr
    assert [x["name"] for x in js("hosts")][-2:] == ["hosta", "hostb"]

    # -- a persistent MTE domain made from mtevm's definition ----------------------------------------
    ok(run_mtevm("create", "v1", "--host", "hosta", "--vcpus", "2", "--memory", "256M"))
    dumped = ok(virsh(h.uri_a, "dumpxml", "v1"))
    assert "<qemu:arg value='mte=on'/>" in dumped and "urn:mtevm:domain:1" in dumped
    assert "yes" in ok(virsh(h.uri_a, "dominfo", "v1")).split("Persistent:")[1].split("\n")[0]
    # the seed's decision tree answers before anything is defined
    r = run_mtevm("create", "bad", "--host", "hosta", "--cpu", "cortex-a57")
    assert r.returncode == 1 and MSG_TCG_CPU_NO_MTE in r.stderr, r.stderr
    assert virsh(h.uri_a, "dominfo", "bad").returncode != 0

    ok(run_mtevm("start", "v1"))
    assert vm("v1")["state"] == "running"
    first = js("counters", "v1")
    later = wait_for(lambda: (c := js("counters", "v1"))["vm"]["checked"] > first["vm"]["checked"] + 1000 and c,
                     30, "v1's counters to rise")
    assert later["vm"]["sync_faults"] > 0
    # with a VM running, the probe reads QEMU's machine properties for real
    facts = {x["name"]: x for x in js("probe", "--host", "hosta")[0]["facts"]}
    assert facts["QEMU mte machine property"] == {"name": "QEMU mte machine property", "value": True,
                                                  "source": "qom-list /machine of VM v1"}
    # the domain runs under libvirt, not the daemon: a new daemon picks it up
    ok(run_mtevm("daemon", "stop"))
    assert vm("v1")["state"] == "running"
    c = js("counters", "v1")["vm"]["checked"]
    wait_for(lambda: js("counters", "v1")["vm"]["checked"] > c, 20, "v1's counters after a daemon restart")

    # -- snapshots through the CLI are libvirt's domain snapshots: virsh sees mtevm's, mtevm lists virsh's
    snap = js("snapshot", "v1", "save", "s1")
    assert (snap["tag"], snap["taken_by"], snap["vm_state"]) == ("s1", "mtevm", "running") and snap["bytes"] > 0
    assert "s1" in ok(virsh(h.uri_a, "snapshot-list", "v1", "--name")).split()
    ok(virsh(h.uri_a, "snapshot-create-as", "v1", "theirs", "--memspec",
             "file=/var/lib/libvirt/mtevm/v1-theirs.mem,snapshot=external"))
    rows = {cells[0]: cells for line in ok(run_mtevm("snapshot", "v1", "list")).splitlines()
            if len(cells := [x.strip() for x in line.split("│")]) > 1}
    assert rows["theirs"][4:6] == ["-", "-"] and rows["s1"][4] != "-"    # CHECKED, FAULTS: mtevm's counters only
    restored = js("snapshot", "v1", "restore", "s1", "--yes")
    assert restored["state"] == "running" and restored["snapshot"]["tag"] == "s1"
    # s1 is libvirt's current snapshot now, with a child: libvirt's own refusal, verbatim
    r = run_mtevm("snapshot", "v1", "delete", "s1", "--yes")
    assert r.returncode == 1 and r.stderr.strip() == ("mtevm: error: unsupported configuration: deletion of active "
                                                      "external snapshot that is not a leaf snapshot is not supported")
    for tag in ("theirs", "s1"):
        assert js("snapshot", "v1", "delete", tag, "--yes")["tag"] == tag
    assert ok(virsh(h.uri_a, "snapshot-list", "v1", "--name")).split() == []

    # -- a domain mtevm did not make: listed, read-only ---------------------------------------------
    ok(virsh(h.uri_a, "define", "/dev/stdin", input=(
        "<domain type='qemu'><name>theirs</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='aarch64' machine='virt'>hvm</type></os></domain>")))
    theirs = wait_for(lambda: next((v for v in js("list") if v["name"] == "hosta/theirs"), None), 10,
                      "the foreign domain in the list")
    assert theirs["read_only"] and theirs["state"] == "stopped" and theirs["memory"] == 64 << 20
    r = run_mtevm("start", "hosta/theirs")
    assert r.returncode == 1 and "mtevm did not make: it is shown read-only" in r.stderr
    ok(virsh(h.uri_a, "undefine", "theirs"))

    # -- a blocked migration: QEMU's blocker, libvirt's refusal verbatim --------------------------
    ok(run_mtevm("create", "vb", "--host", "hosta", "--vcpus", "1", "--rate", "1000",
                 "--qemu-arg=-object memory-backend-memfd,id=shm,size=1M,share=on",
                 "--qemu-arg=-device ivshmem-plain,memdev=shm"))
    ok(run_mtevm("start", "vb"))
    assert IVSHMEM_BLOCKER in js("show", "vb")["blocked_reasons"]
    r = run_mtevm("migrate", "vb", "--to", "hostb")
    assert r.returncode == 1 and IVSHMEM_REFUSAL in r.stderr, r.stderr
    m = js("migrations")[0]
    assert (m["vm"], m["state"], m["reason"]) == ("vb", "blocked", IVSHMEM_REFUSAL)
    assert virsh(h.uri_b, "dominfo", "vb").returncode != 0      # nothing was made on the destination
    ok(run_mtevm("stop", "vb"))
    ok(run_mtevm("delete", "vb", "--yes"))

    # -- libvirt <-> local: refused with a clear reason --------------------------------------------
    r = run_mtevm("migrate", "v1", "--to", "local")
    assert r.returncode == 1 and "cannot migrate from a libvirt host to a local host" in r.stderr

    # -- live, peer-to-peer migration over ssh: counters continue, tags survive -------------------
    before = js("show", "v1")
    assert all(v["boot_tags"] is True for v in before["vcpus"]), before["vcpus"]
    out = ok(run_mtevm("migrate", "v1", "--to", "hostb"))
    assert "from hosta to hostb: completed" in out
    m = js("migrations")[0]
    assert m["state"] == "completed" and m["progress"] == 1.0 and m["stats"]["ram_total"] == 256 << 20
    assert vm("v1")["host"] == "hostb" and vm("v1")["state"] == "running"
    assert virsh(h.uri_a, "dominfo", "v1").returncode != 0       # undefined at the source
    assert "yes" in ok(virsh(h.uri_b, "dominfo", "v1")).split("Persistent:")[1].split("\n")[0]
    after = wait_for(lambda: (s := js("show", "v1"))["vcpus"][0]["boot_tag_checks"]
                     > before["vcpus"][0]["boot_tag_checks"] and s, 30, "the guest to check its boot tags again")
    assert all(v["boot_tags"] is True for v in after["vcpus"]), "a boot-time tag was lost in the migration"
    assert sum(v["checked"] for v in after["vcpus"]) > sum(v["checked"] for v in before["vcpus"])

    # -- the host goes away: libvirt's reason, its VMs unknown, nothing else affected ------------
    ok(run_mtevm("create", "s1"))            # a VM on a simulated host keeps working meanwhile
    ok(run_mtevm("start", "s1"))
    h.b.stop_libvirtd()
    gone = wait_for(lambda: (x := host("hostb"))["state"] == "unreachable" and x, 30, "hostb to be unreachable")
    assert not gone["available"] and gone["reason"], gone
    assert vm("v1")["state"] == "unknown"
    assert host("hosta")["available"] and js("probe", "--host", "hosta")[0]["qemu"]["usable_for_mte"]
    s1 = js("counters", "s1")["vm"]["checked"]
    wait_for(lambda: js("counters", "s1")["vm"]["checked"] > s1, 20, "s1's counters to rise")
    r = run_mtevm("stop", "v1")
    assert r.returncode == 1 and "host hostb is unreachable" in r.stderr
    h.b.start_libvirtd()
    wait_for(lambda: host("hostb")["state"] == "connected", 60, "hostb to reconnect")
    assert vm("v1")["state"] == "running"
    c = js("counters", "v1")["vm"]["checked"]
    wait_for(lambda: js("counters", "v1")["vm"]["checked"] > c, 20, "v1's counters after the reconnect")
    ok(run_mtevm("stop", "s1"))

    # -- and back (the destination now reached through its socket) -----------------------------
    assert "completed" in ok(run_mtevm("migrate", "v1", "--to", "hosta"))
    assert vm("v1")["host"] == "hosta"
    assert all(v["boot_tags"] is True for v in js("show", "v1")["vcpus"])

    # -- MTE toggled on a running VM waits for the next boot ------------------------------------
    ok(run_mtevm("mte", "v1", "off"))
    assert vm("v1")["pending"] == {"mte": False} and "mte=on" in ok(virsh(h.uri_a, "dumpxml", "v1"))

    # -- a domain destroyed behind mtevm's back: libvirt's event, the VM crashed with the reason -------
    ok(virsh(h.uri_a, "destroy", "v1"))
    crashed = wait_for(lambda: (v := vm("v1"))["state"] == "crashed" and v, 20, "v1 to show as crashed")
    assert "destroyed outside mtevm" in crashed["last_error"]
    assert vm("v1")["pending"] == {"mte": False} and "mte=on" in ok(virsh(h.uri_a, "dumpxml", "v1"))
    ok(run_mtevm("mte", "v1", "off"))                  # stopped: the domain is redefined at once
    assert not vm("v1")["pending"] and "mte=off" in ok(virsh(h.uri_a, "dumpxml", "v1"))

    # -- clean up: delete (undefine), remove the hosts --------------------------------------------
    r = run_mtevm("host", "remove", "hosta")
    assert r.returncode == 1 and "has VMs defined by mtevm (v1)" in r.stderr
    ok(run_mtevm("delete", "v1", "--yes"))
    assert virsh(h.uri_a, "dominfo", "v1").returncode != 0
    assert "v1." not in ok(virsh(h.uri_a, "vol-list", "mtevm"))
    ok(run_mtevm("host", "remove", "hosta"))
    ok(run_mtevm("host", "remove", "hostb"))
    assert not [x for x in js("hosts") if x["kind"] == "libvirt"]
