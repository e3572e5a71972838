"""Two real libvirt hosts for the libvirt tests, started once per session and stopped by PID.

``hosta`` is reached through its socket (``qemu+unix://``), ``hostb`` through a real sshd on
loopback that runs inside hostb's namespaces (``qemu+ssh://``), so the ssh transport, libvirt's
``virt-ssh-helper`` and peer-to-peer migration between two daemons with different host UUIDs are
all real. See tests/helpers/libvirtd.py for how a host gets its own /etc, /run, /var/lib/libvirt.
"""
from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.libvirtd import LibvirtDaemon
from tests.helpers.sshd import SshServer


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
    a = LibvirtDaemon(base / "a", "mtevm-lva", str(uuid.uuid4()))
    b = LibvirtDaemon(base / "b", "mtevm-lvb", str(uuid.uuid4()))
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
