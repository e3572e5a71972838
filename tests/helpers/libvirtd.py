"""A real libvirt host for tests: libvirtd + virtlogd in their own mount and UTS namespace.

Why: mtevm's libvirt host kind must be tested against the real daemon, and migration between
two libvirt hosts needs two daemons with different host UUIDs (libvirt refuses a migration to
"the same host"). ``LibvirtDaemon`` gives each daemon private copies of /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind mounts inside ``unshare -m -u``),
its own hostname and ``host_uuid``. Nothing of the machine's libvirt setup is used or changed,
and no systemd is needed: the daemons are started with ``-d -p PIDFILE`` and stopped by PID.
From outside, the daemon is reached through its socket: ``qemu+unix:///system?socket=...``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers.sshd import SshServer, _user, pid_alive, stop_pid, wait_until

# inside the namespace -> the directory (under the daemon's base) bind-mounted over it
PRIVATE_DIRS = {"/etc/libvirt": "etc", "/run/libvirt": "run", "/var/lib/libvirt": "lib",
                "/var/cache/libvirt": "cache", "/var/log/libvirt": "log"}


class LibvirtDaemon:
    """libvirtd and virtlogd for one test host; ``start()``, then ``uri``, then ``stop()``."""

    def __init__(self, base: Path, hostname: str, host_uuid: str):
        self.base = Path(base)
        self.hostname = hostname
        self.host_uuid = host_uuid
        self.libvirtd_pid: int | None = None
        self.virtlogd_pid: int | None = None

    def path(self, inside: str) -> Path:
        """Where a path inside the namespace (under one of PRIVATE_DIRS) is seen from outside."""
        for prefix, sub in PRIVATE_DIRS.items():
            if inside == prefix or inside.startswith(prefix + "/"):
                return self.base / sub / inside[len(prefix):].lstrip("/")
        raise ValueError(f"{inside} is not private to the test libvirt host")

    @property
    def socket(self) -> Path:
        return self.path("/run/libvirt/libvirt-sock")

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def nsenter(self) -> list[str]:
        """The argv prefix that runs a command inside this host's namespaces (e.g. its sshd)."""
        return ["nsenter", "-t", str(self.libvirtd_pid), "-m", "-u", "--"]

    def seed_cache(self, other: "LibvirtDaemon") -> None:
        """Start with ``other``'s QEMU capability cache (same machine, same QEMU): libvirt's first
        connection then skips its seconds of probing."""
        src = other.path("/var/cache/libvirt/qemu/capabilities")
        if src.exists():
            shutil.copytree(src, self.base / "cache" / "qemu" / "capabilities")

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # QEMU runs as libvirt-qemu and must reach the files mtevm puts under /var/lib/libvirt.
        os.chmod(self.base, 0o755)
        shutil.copytree("/etc/libvirt", self.base / "etc", symlinks=True)
        # No default network: it would need dnsmasq and mtevm's guests have no NIC.
        shutil.rmtree(self.base / "etc" / "qemu" / "networks" / "autostart", ignore_errors=True)
        with open(self.base / "etc" / "libvirtd.conf", "a") as f:
            f.write(f'\nhost_uuid = "{self.host_uuid}"\n'
                    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        for sub in ("run", "lib", "cache", "log"):
            (self.base / sub).mkdir(mode=0o755, exist_ok=True)
        (self.base / "lib" / "qemu").mkdir(mode=0o751)
        shutil.chown(self.base / "lib" / "qemu", "libvirt-qemu", "libvirt-qemu")
        (self.base / "log" / "qemu").mkdir(mode=0o755)
        (self.base / "cache" / "qemu").mkdir(mode=0o711, exist_ok=True)

    def start(self) -> "LibvirtDaemon":
        self._prepare()
        mounts = "\n".join(f"mkdir -p {inside}; mount --bind {self.base / sub} {inside}" for inside, sub in PRIVATE_DIRS.items())
        script = (f"set -e\nmount --make-rprivate /\n{mounts}\nhostname {self.hostname}\n"
                  "virtlogd -d -p /run/libvirt/virtlogd.pid\n"
                  "libvirtd -d -p /run/libvirt/libvirtd.pid\n")
        r = subprocess.run(["unshare", "-m", "-u", "sh", "-c", script], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        try:
            if r.returncode:
                raise RuntimeError(f"starting libvirtd for {self.hostname} failed: {r.stderr.strip()}")
            self.virtlogd_pid = self._read_pid("virtlogd")
            self.libvirtd_pid = self._read_pid("libvirtd")
            wait_until(self.socket.exists, 20, f"libvirtd's socket {self.socket}")
        except BaseException:
            self.stop()
            raise
        return self

    def _read_pid(self, name: str) -> int:
        pidfile = self.path(f"/run/libvirt/{name}.pid")
        text = wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, f"{name}'s pid file")
        return int(text)

    def qemu_pids(self) -> list[int]:
        """QEMU processes this libvirtd started (from its /run/libvirt/qemu/*.pid files)."""
        pids = []
        for f in self.path("/run/libvirt/qemu").glob("*.pid"):
            if f.name == "driver.pid":      # libvirtd's own QEMU-driver lock, not a QEMU
                continue
            try:
                pids.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
        return [p for p in pids if pid_alive(p)]

    def start_libvirtd(self) -> None:
        """Start libvirtd again in the same namespaces (after stop_libvirtd): the host comes back."""
        pidfile = self.path("/run/libvirt/libvirtd.pid")
        pidfile.unlink(missing_ok=True)
        subprocess.run(["nsenter", "-t", str(self.virtlogd_pid), "-m", "-u", "--",
                        "libvirtd", "-d", "-p", "/run/libvirt/libvirtd.pid"], check=True, stdin=subprocess.DEVNULL,
                       timeout=60)
        self.libvirtd_pid = self._read_pid("libvirtd")
        wait_until(self.socket.exists, 20, f"libvirtd's socket {self.socket}")

    def ssh_uri(self, sshd: SshServer) -> str:
        """qemu+ssh:// to this host through ``sshd`` (started with ``wrap=self.nsenter()``)."""
        return (f"qemu+ssh://{_user()}@127.0.0.1:{sshd.port}/system?keyfile={sshd.user_key}&no_verify=1")

    def stop_libvirtd(self) -> None:
        """Stop libvirtd only (its QEMU processes and virtlogd keep running): the host 'goes away'."""
        if self.libvirtd_pid is not None:
            stop_pid(self.libvirtd_pid, timeout=10)
            self.libvirtd_pid = None

    def stop(self) -> None:
        """Stop every QEMU this daemon started, then libvirtd, then virtlogd; all by PID."""
        for pid in self.qemu_pids():
            stop_pid(pid, timeout=10)
        self.stop_libvirtd()
        if self.virtlogd_pid is not None:
            stop_pid(self.virtlogd_pid)
            self.virtlogd_pid = None

    def log_text(self) -> str:
        log = self.path("/var/log/libvirt/libvirtd.log")
        return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
