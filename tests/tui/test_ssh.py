"""The app over a real ssh connection: a real sshd, a real pty, a real dropped link.

What a user relies on: `ssh -t host mtevm` shows the VMs with live counters; when the connection
drops, the app on the server goes away by itself and the daemon keeps the VMs running.
Everything started here (sshd, tmux server, ssh client, remote app, daemon) is stopped by PID.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.helpers import mtevm_executable
from tests.helpers.sshd import SshServer, TmuxServer, pid_alive, stop_pid, wait_until

pytestmark = pytest.mark.slow

VM = "remote-01"


class Remote:
    """One mtevm installation (runtime + state dirs) reached locally by the CLI and over ssh."""

    def __init__(self, root: Path):
        self.run_dir = root / "run"
        self.state_dir = root / "state"
        self.mtevm = mtevm_executable()
        self.env = dict(os.environ, MTEVM_RUNTIME_DIR=str(self.run_dir), MTEVM_STATE_DIR=str(self.state_dir))

    def cli(self, *args: str) -> str:
        r = subprocess.run([self.mtevm, *args], env=self.env, capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"mtevm {' '.join(args)} failed ({r.returncode}): {r.stderr}"
        return r.stdout

    def vms(self) -> dict[str, dict]:
        return {vm["name"]: vm for vm in json.loads(self.cli("list", "--json"))}

    def checked(self, name: str) -> int:
        return int(json.loads(self.cli("counters", name, "--json"))["vm"]["checked"])

    def remote_command(self, pidfile: Path) -> str:
        """What ssh runs on the server: note the app's PID, then exec this checkout's mtevm."""
        bindir = os.path.dirname(self.mtevm)
        return (f"echo $$ > {shlex.quote(str(pidfile))}; exec env "
                f"MTEVM_RUNTIME_DIR={shlex.quote(str(self.run_dir))} "
                f"MTEVM_STATE_DIR={shlex.quote(str(self.state_dir))} "
                f"PATH={shlex.quote(bindir)}:\"$PATH\" mtevm")

    def daemon_pid(self) -> int | None:
        """The daemon of this installation, if it runs (its pid file outlives it: check the PID)."""
        try:
            pid = int((self.run_dir / "mtevm.pid").read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        ours = str(self.run_dir).encode()
        return pid if ours in cmdline or b"MTEVM_RUNTIME_DIR=" + ours in environ else None


def screen_number(text: str) -> float:
    """A counter as the app prints it ("1234", "20.5k", "1.23M") back to a number."""
    m = re.fullmatch(r"([0-9.]+)([kMG]?)", text)
    assert m, f"not a counter: {text!r}"
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def vm_total_checked(screen: str) -> float | None:
    """The VM total row of the detail screen ("VM ... <checked> ..."): its checked counter, if shown."""
    for line in screen.splitlines():
        cells = line.replace("│", " ").split()
        if cells[:1] == ["VM"] and len(cells) >= 2:
            return screen_number(cells[1])
    return None


def test_app_over_ssh_keeps_vms_running_after_the_link_drops(tmp_path):
    remote = Remote(tmp_path)
    app_pidfile = tmp_path / "app.pid"
    with ExitStack() as cleanup:
        cleanup.callback(lambda: (pid := remote.daemon_pid()) and stop_pid(pid))
        # A VM made beforehand with the CLI (this starts the daemon on demand).
        remote.cli("create", VM, "--host", "sim-mte", "--accel", "kvm", "--vcpus", "2")
        remote.cli("start", VM)
        assert remote.daemon_pid() and pid_alive(remote.daemon_pid())

        sshd = SshServer(tmp_path / "ssh").start()
        cleanup.callback(sshd.stop)
        tmux = TmuxServer(tmp_path, width=100, height=30)
        cleanup.callback(tmux.stop)
        ssh_pid = tmux.start(sshd.ssh_argv(remote.remote_command(app_pidfile)))
        cleanup.callback(stop_pid, ssh_pid)
        cleanup.callback(lambda: app_pidfile.exists() and stop_pid(int(app_pidfile.read_text())))

        # The user sees the VM list with the VM running, on the server's daemon.
        screen = tmux.wait_for(VM, timeout=60)
        assert re.search(rf"{VM}\s+.*running", screen), screen
        app_pid = int(app_pidfile.read_text())
        assert pid_alive(app_pid)

        # Open it: live counters rise between two captures of the pane.
        tmux.send_keys("Enter")
        tmux.wait_for("kvm_mte", timeout=30)
        first = wait_until(lambda: vm_total_checked(tmux.capture()), 30, "the detail's VM total row")
        wait_until(lambda: (vm_total_checked(tmux.capture()) or 0) > first, 30, "the VM's checked counter to rise")

        # Drop the connection: kill the ssh client. The remote app must leave by itself.
        stop_pid(ssh_pid)
        wait_until(lambda: not pid_alive(app_pid), 20, "the app on the server to exit after the link dropped")

        # The daemon and its VM are unaffected: still running, counters still rising.
        assert pid_alive(remote.daemon_pid())
        assert remote.vms()[VM]["state"] == "running"
        before = remote.checked(VM)
        wait_until(lambda: remote.checked(VM) > before, 20, "counters to keep rising after the drop")

        # Coming back: a new ssh session shows the same VM, still running, on the same daemon.
        app_pidfile.unlink()
        ssh_pid = tmux.respawn(sshd.ssh_argv(remote.remote_command(app_pidfile)))
        cleanup.callback(stop_pid, ssh_pid)
        screen = tmux.wait_for("daemon", timeout=60)
        assert re.search(rf"{VM}\s+.*running", tmux.wait_for(VM, timeout=30)), screen
        tmux.send_keys("q")                      # quitting the app leaves the VM running too
        wait_until(lambda: not pid_alive(int(app_pidfile.read_text())), 20, "the app to quit on q")
        assert remote.vms()[VM]["state"] == "running"
