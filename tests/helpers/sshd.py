"""A real remote terminal for tests: a throwaway OpenSSH server on 127.0.0.1 and a private tmux.

Why: "works over ssh" is only true if a real sshd hands the app a real pty and takes it away
again when the connection drops. ``SshServer`` runs ``/usr/sbin/sshd -D`` with its own host key,
user key and config in a temp directory (nothing of the machine's ssh setup is used or changed);
``TmuxServer`` runs tmux on its own socket so a test can type keys and read the screen.
Everything is started as a child process and stopped by its PID.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from backend.qemu.driver import proc_start_time

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (the daemon's own /proc check, not a second parser)."""
    return proc_start_time(pid) is not None


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still there after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mtevm-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


class SshServer:
    """sshd on 127.0.0.1:<free port> that lets this user in with a key made for the test only."""

    def __init__(self, directory: Path, wrap: list[str] | None = None):
        self.wrap = list(wrap or [])   # an argv prefix for sshd, e.g. nsenter into a test host's namespaces
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.user_key = self.dir / "id_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.pidfile = self.dir / "sshd.pid"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SshServer":
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} is missing: install openssh-server (scripts/install-deps.sh does)")
        _keygen(self.host_key)
        _keygen(self.user_key)
        self.authorized_keys.write_text(Path(f"{self.user_key}.pub").read_text())
        self.config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"PidFile {self.pidfile}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "AcceptEnv LANG LC_*\n"
            # A dead client must cost the server its session quickly (the test drops the link).
            "ClientAliveInterval 2\n"
            "ClientAliveCountMax 2\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege-separation directory
        self.proc = subprocess.Popen([*self.wrap, SSHD, "-D", "-f", str(self.config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_until(self._listening, 15, f"sshd to listen on 127.0.0.1:{self.port}")
        except TimeoutError as e:
            self.stop()
            raise RuntimeError(f"{e}; sshd log:\n{self.log_text()}") from None
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {self.proc.returncode}; log:\n{self.log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def ssh_argv(self, remote_command: str | None, *, tty: bool = True, forward: str | None = None) -> list[str]:
        """The ssh client command line that logs in to this server as the current user.

        ``remote_command`` None runs nothing (-N), e.g. for a tunnel: ``forward="9000:127.0.0.1:8000"``.
        """
        return ["ssh", *(["-tt"] if tty else ["-T"]), "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-o", "ExitOnForwardFailure=yes",
                "-i", str(self.user_key), "-p", str(self.port),
                *(["-L", forward] if forward else []),
                f"{_user()}@127.0.0.1", *([remote_command] if remote_command is not None else ["-N"])]

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> "SshServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


class TmuxServer:
    """A tmux server on its own socket (never the user's), with one session of a fixed size."""

    def __init__(self, directory: Path, width: int = 100, height: int = 30):
        self.socket = Path(directory) / "tmux.sock"
        self.width, self.height = width, height
        self.session = "mtevm-test"
        self.server_pid: int | None = None

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # -u: UTF-8 whatever the locale (CI may have none), so the app's text comes back as drawn.
        return subprocess.run(["tmux", "-u", "-S", str(self.socket), *args], check=check, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, env=self._env())

    @staticmethod
    def _env() -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        env.setdefault("TERM", "xterm-256color")
        env.setdefault("LANG", "C.UTF-8")
        return env

    def start(self, argv: list[str]) -> int:
        """Start the session running ``argv`` (exec'd, so the pane's PID is that program); return it."""
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", self.session,
                  "-x", str(self.width), "-y", str(self.height),
                  "exec " + shlex.join(argv))
        self.tmux("set-option", "-t", self.session, "remain-on-exit", "on")
        self.server_pid = int(self.tmux("display-message", "-p", "#{pid}").stdout.strip())
        return self.pane_pid()

    def respawn(self, argv: list[str]) -> int:
        """Run ``argv`` again in the (dead) pane, as a user reconnecting; return its PID."""
        self.tmux("respawn-pane", "-k", "-t", self.session, "exec " + shlex.join(argv))
        return self.pane_pid()

    def pane_pid(self) -> int:
        return int(self.tmux("display-message", "-p", "-t", self.session, "#{pane_pid}").stdout.strip())

    def capture(self) -> str:
        """The text on the pane right now, as the user sees it."""
        return self.tmux("capture-pane", "-p", "-t", self.session).stdout

    def send_keys(self, *keys: str) -> None:
        """tmux key names (``Enter``, ``Down``, ``C-c``) or literal text."""
        self.tmux("send-keys", "-t", self.session, *keys)

    def send_text(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.session, "-l", text)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` shows on the pane; return the screen (the failure shows the last one)."""
        last = [""]

        def shown():
            last[0] = self.capture()
            return text in last[0]
        try:
            wait_until(shown, timeout, f"{text!r} on the tmux pane")
        except TimeoutError as e:
            raise AssertionError(f"{e}; the pane shows:\n{last[0]}") from None
        return last[0]

    def stop(self) -> None:
        if self.server_pid is not None:
            stop_pid(self.server_pid)
            self.server_pid = None
