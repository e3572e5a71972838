"""Two real libvirt hosts for the libvirt tests, started once per session and stopped by PID.

``hosta`` is reached through its socket (``qemu+unix://``), ``hostb`` through a real sshd on
loopback that runs inside hostb's namespaces (``qemu+ssh://``), so the ssh transport, libvirt's
``virt-ssh-helper`` and peer-to-peer migration between two daemons with different host UUIDs are
all real. See tests/helpers/libvirtd.py for how a host gets its own /etc, /run, /var/lib/libvirt.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.libvirtd import LibvirtDaemon
from tests.helpers.sshd import SshServer


# Fixed (and different: libvirt refuses a migration to "the same host"), so snapshots that show
# the probe are the same on every run.
UUID_A = "6d7e0b6a-1f0e-4c55-9a53-3b8e2f4c0a01"
UUID_B = "6d7e0b6a-1f0e-4c55-9a53-3b8e2f4c0b02"


@dataclass
class LibvirtHosts:
    a: LibvirtDaemon
    b: LibvirtDaemon
    sshd: SshServer

    @property
    def uri_a(self) -> str:
        return self.a.uri

    @property
    def uri_b(self) -> str:
        return self.b.ssh_uri(self.sshd)


def _warm(daemon: LibvirtDaemon) -> None:
    """libvirt's first connection probes QEMU for seconds: do it once, here."""
    import libvirt
    conn = libvirt.open(daemon.uri)
    try:
        conn.getVersion()
    finally:
        conn.close()


@pytest.fixture(scope="session")
def libvirt_hosts():
    # Not pytest's tmp_path: its directories are 0700 and QEMU runs as libvirt-qemu.
    base = Path(tempfile.mkdtemp(prefix="mtevm-libvirt-"))
    a = LibvirtDaemon(base / "a", "mtevm-lva", UUID_A)
    b = LibvirtDaemon(base / "b", "mtevm-lvb", UUID_B)
    sshd = None
    try:
        a.start()
        _warm(a)
        b.seed_cache(a)
        b.start()
        sshd = SshServer(base / "ssh", wrap=b.nsenter()).start()
        yield LibvirtHosts(a, b, sshd)
    finally:
        if sshd is not None:
            sshd.stop()
        b.stop()
        a.stop()
        shutil.rmtree(base, ignore_errors=True)


def clean(daemon: LibvirtDaemon) -> None:
    """Destroy and undefine every domain (snapshots too) and delete mtevm's volumes (memory files too):
    each test starts on empty hosts."""
    def virsh(*args):
        return subprocess.run(["virsh", "-q", "-c", daemon.uri, *args], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    if daemon.libvirtd_pid is None:
        daemon.start_libvirtd()
    for name in virsh("list", "--all", "--name").stdout.split():
        virsh("destroy", name)
        virsh("undefine", "--snapshots-metadata", name)   # libvirt refuses a domain with snapshots otherwise
    virsh("pool-refresh", "mtevm")                          # snapshot memory files libvirt wrote there
    for line in virsh("vol-list", "mtevm").stdout.splitlines():
        if line.split():
            virsh("vol-delete", "--pool", "mtevm", line.split()[0])


@pytest.fixture
def libvirt_env(libvirt_hosts):
    """The session's libvirt hosts, emptied after the test (whatever it left behind)."""
    yield libvirt_hosts
    clean(libvirt_hosts.a)
    clean(libvirt_hosts.b)
