"""Where mtevm keeps its files: a runtime dir (socket, pid, locks), a state dir (store, logs) and a
cache dir (guest images, downloaded packages; see cache_dir()).

Both follow the XDG rules through platformdirs, can be moved with ``MTEVM_RUNTIME_DIR`` /
``MTEVM_STATE_DIR`` (or ``--runtime-dir`` / ``--state-dir``), and are created private (0700)
because the socket in the runtime dir gives full control over the user's VMs.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import platformdirs

from backend.errors import ConfigError

APP = "mtevm"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/mtevm, or /tmp/mtevm-<uid> when there is no XDG runtime dir (root in CI, cron)."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return platformdirs.user_runtime_dir(APP)
    return f"/tmp/{APP}-{os.getuid()}"


def default_state_dir() -> str:
    return platformdirs.user_state_dir(APP)


def cache_dir() -> str:
    """Downloaded packages and built guest images: ``MTEVM_CACHE_DIR``, else the XDG cache dir.
    Everything there can be rebuilt (``mtevm image build``), so it may be deleted at any time."""
    return os.path.abspath(os.environ.get("MTEVM_CACHE_DIR") or platformdirs.user_cache_dir(APP))


@dataclass(frozen=True)
class Paths:
    """The files of one mtevm installation (one daemon)."""

    runtime_dir: str
    state_dir: str

    @classmethod
    def resolve(cls, runtime_dir: str | None = None, state_dir: str | None = None) -> "Paths":
        """Flags win over environment variables, which win over the XDG defaults."""
        rt = runtime_dir or os.environ.get("MTEVM_RUNTIME_DIR") or default_runtime_dir()
        st = state_dir or os.environ.get("MTEVM_STATE_DIR") or default_state_dir()
        return cls(os.path.abspath(rt), os.path.abspath(st))

    @property
    def socket(self) -> str:
        return os.path.join(self.runtime_dir, "mtevm.sock")

    @property
    def pid_file(self) -> str:
        """Holds the daemon's pid; the daemon keeps an flock on it for as long as it lives."""
        return os.path.join(self.runtime_dir, "mtevm.pid")

    @property
    def start_lock(self) -> str:
        """Taken by a client that starts the daemon on demand, so two racing clients start one."""
        return os.path.join(self.runtime_dir, "start.lock")

    @property
    def vm_runtime_root(self) -> str:
        return os.path.join(self.runtime_dir, "vms")

    @property
    def store(self) -> str:
        return os.path.join(self.state_dir, "mtevm.sqlite3")

    @property
    def log_file(self) -> str:
        return os.path.join(self.state_dir, "daemon.log")

    def ensure_runtime_dir(self) -> None:
        """Create the runtime dir 0700 and refuse one that others could write to or that is not ours."""
        ensure_private_dir(self.runtime_dir)
        if len(self.socket.encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"runtime directory {self.runtime_dir} is too long for a Unix socket path "
                              f"({len(self.socket.encode())} > {MAX_SOCKET_PATH} bytes): "
                              "choose a shorter MTEVM_RUNTIME_DIR or --runtime-dir")

    def ensure_state_dir(self) -> None:
        ensure_private_dir(self.state_dir)


def ensure_private_dir(path: str) -> None:
    """mkdir -p with mode 0700; an existing dir must belong to us and not be writable by others."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot create directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"directory {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise ConfigError(f"directory {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                          f"run 'chmod 700 {path}'")
