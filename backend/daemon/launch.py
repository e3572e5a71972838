"""Finding, starting and stopping the daemon from a client (the tmux model).

The first client that finds no daemon starts one. Two clients racing take ``start.lock``
(fcntl.flock) in turn, and the second finds the daemon the first started, so there is never a
second daemon. The daemon itself holds an flock on its pid file for as long as it lives, which is
how "is a daemon running?" is answered without trusting a pid that may have been reused.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from backend.errors import MtevmError, NotFoundError, error_from_name
from backend.paths import Paths, open_private_file, private_dir

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def peer_uid(sock) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def socket_alive(paths: Paths) -> bool:
    """True if a daemon of our own uid answers on the socket; False if there is none (or a stale file).

    Raises MtevmError if the socket belongs to another user: we never talk to someone else's daemon.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(paths.socket)
        uid = peer_uid(s)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTDIR):
            return False
        raise MtevmError(f"cannot connect to the mtevm daemon at {paths.socket}: {e.strerror}") from None
    finally:
        s.close()
    if uid != os.getuid():
        raise MtevmError(f"the mtevm daemon at {paths.socket} runs as uid {uid}, not as you (uid {os.getuid()}): "
                         "refusing to talk to it")
    return True


def daemon_pid(paths: Paths) -> int | None:
    """The pid of the running daemon, or None. Only a pid file whose flock is held counts."""
    try:
        with private_dir(paths.runtime_dir, create=False, what="runtime directory") as rt:
            fd = open_private_file(rt, os.path.basename(paths.pid_file), os.O_RDONLY, create=False)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0  # 0: a daemon is starting, pid not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def _flocked(path: str, timeout: float) -> Iterator[None]:
    with private_dir(os.path.dirname(path)) as d:
        fd = open_private_file(d, os.path.basename(path))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MtevmError(f"timed out waiting for {path} (another client is starting the daemon)") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def start_background(paths: Paths) -> int:
    """Start a daemon that detaches (double fork, setsid) and return its pid once it serves.

    The daemon reports readiness, or its startup error (e.g. a corrupted store), through a pipe,
    so this raises that error with its own class and message instead of timing out.
    """
    cmd = [sys.executable, "-m", "backend.daemon", "--background",
           "--runtime-dir", paths.runtime_dir, "--state-dir", paths.state_dir]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MtevmError(f"the mtevm daemon did not start within {START_TIMEOUT:g} s; see {paths.log_file}") from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MtevmError("the mtevm daemon failed to start"
                         + (f": {detail[-1]}" if detail else "") + f"; see {paths.log_file}") from None
    if "error" in report:
        raise error_from_name(report["error"]["class"], report["error"]["message"])
    return int(report["pid"])


def ensure_daemon(paths: Paths) -> None:
    """Make sure a daemon serves ``paths.socket``, starting one if needed (never two)."""
    if socket_alive(paths):
        return
    paths.ensure_runtime_dir()
    with _flocked(paths.start_lock, START_TIMEOUT):
        if socket_alive(paths):
            return  # another client started it while we waited for the lock
        check_socket_not_lost(paths)
        start_background(paths)


def check_socket_not_lost(paths: Paths) -> None:
    """A daemon holds the pid lock but nothing answers on its socket: the socket file was deleted
    (e.g. by a /tmp cleaner). No client can reach that daemon and no second one may start, so say
    exactly that and how to recover, instead of 'a daemon is already running'."""
    pid = daemon_pid(paths)
    if pid and not os.path.lexists(paths.socket):
        raise MtevmError(f"the mtevm daemon (pid {pid}) is running, but its socket {paths.socket} is gone "
                         "(deleted), so no client can reach it. Recover with 'mtevm daemon stop' (it stops "
                         f"pid {pid} through its pid file; running QEMU VMs keep running and are taken back) "
                         "and run the command again: a new daemon starts with a new socket")


def _released(paths: Paths, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the daemon to release its pid lock; True if it did."""
    deadline = time.monotonic() + timeout
    while daemon_pid(paths) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_daemon(paths: Paths, timeout: float = STOP_TIMEOUT, *, kill_after_timeout: bool = False) -> int:
    """SIGTERM the daemon and wait until it has released its pid lock; return its pid.

    ``kill_after_timeout`` (test teardown): SIGKILL a daemon that ignores SIGTERM instead of raising.
    """
    pid = daemon_pid(paths)
    if not pid:
        raise NotFoundError(f"no mtevm daemon is running (runtime dir {paths.runtime_dir})")
    signals = (signal.SIGTERM, signal.SIGKILL) if kill_after_timeout else (signal.SIGTERM,)
    for sig in signals:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return pid
        if _released(paths, timeout):
            return pid
    raise MtevmError(f"the mtevm daemon (pid {pid}) did not stop within {timeout:g} s")
