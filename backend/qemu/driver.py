"""One qemu-system-aarch64 process: launch, QMP, exit detection, stop and reattach.

The rule this module keeps is the one QEMU's own python/qemu/machine keeps: a QEMU it started
never outlives a failed launch or a stop, and is always reaped. It watches the process through a
pidfd (Linux >= 5.3), which works the same for a child of this daemon and for a QEMU started by
an earlier daemon (reattach), and signals through that pidfd so a reused pid is never hit.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Callable

from backend.errors import ConfigError, RealizeError
from backend.paths import ensure_private_dir, open_private_path
from backend.qemu.qmp import QmpConnection, QmpError, QmpGone

SUN_PATH_MAX = 107          # bytes in a Unix socket path (sockaddr_un.sun_path minus the NUL)
READY_TIMEOUT = 20.0        # seconds from exec to a negotiated QMP session
REATTACH_TIMEOUT = 5.0
SOCKETS = ("qmp", "serial", "agent")   # the Unix sockets one QEMU serves (QemuFiles.socket)


@dataclass
class StopTimeouts:
    """How long each step of a stop waits for QEMU to exit before the next, harder one."""

    quit: float = 5.0       # QMP quit: QEMU shuts down cleanly
    term: float = 3.0       # SIGTERM
    kill: float = 3.0       # SIGKILL (cannot be refused; only a stuck kernel delays it)


def proc_start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot, /proc/<pid>/stat field 22); None if gone.

    Saved with the pid so a later daemon never mistakes a new process that reused the pid for
    its QEMU. Zombies count as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class QemuFiles:
    """Where one QEMU keeps its socket and log (names unique per launch: a migration
    destination shares the VM's runtime directory with its source)."""

    runtime_dir: str
    launch_id: str
    qmp_socket: str
    log: str
    socket_dir: str | None = None   # a private short directory when runtime_dir is too long for a socket

    @classmethod
    def new(cls, runtime_dir: str) -> "QemuFiles":
        ensure_private_dir(runtime_dir)        # checked, never through another user's symlink
        prune_logs(runtime_dir)
        launch_id = secrets.token_hex(4)
        sock = os.path.join(runtime_dir, f"qmp-{launch_id}.sock")
        socket_dir = None
        longest = os.path.join(runtime_dir, f"{max(SOCKETS, key=len)}-{launch_id}.sock")
        if len(os.fsencode(longest)) > SUN_PATH_MAX:
            socket_dir = tempfile.mkdtemp(prefix="mtevm-")
            sock = os.path.join(socket_dir, "qmp.sock")
        return cls(runtime_dir, launch_id, sock, os.path.join(runtime_dir, f"qemu-{launch_id}.log"),
                   socket_dir)

    def path(self, suffix: str) -> str:
        """Another per-launch file in the runtime directory (e.g. the guest parameter block)."""
        return os.path.join(self.runtime_dir, f"{suffix}-{self.launch_id}")

    @property
    def record(self) -> str:
        """The launch record: this QEMU's pid and start time, written before ``launch`` returns."""
        return self.path("launch") + ".json"

    def socket(self, kind: str) -> str:
        """The path of another socket QEMU serves for this launch (``serial``, ``agent``), beside
        the QMP socket."""
        if self.socket_dir:
            return os.path.join(self.socket_dir, f"{kind}.sock")
        return os.path.join(os.path.dirname(self.qmp_socket), f"{kind}-{self.launch_id}.sock")

    def remove_socket(self) -> None:
        """QEMU removes its sockets on a clean exit, not when killed: tidy up after it."""
        for path in [self.qmp_socket] + [self.socket(k) for k in SOCKETS if k != "qmp"]:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.socket_dir:
            try:
                os.rmdir(self.socket_dir)
            except OSError:
                pass

    def to_dict(self) -> dict:
        return {"runtime_dir": self.runtime_dir, "launch_id": self.launch_id,
                "qmp_socket": self.qmp_socket, "log": self.log, "socket_dir": self.socket_dir}

    @classmethod
    def from_dict(cls, d: dict) -> "QemuFiles":
        return cls(d["runtime_dir"], d["launch_id"], d["qmp_socket"], d["log"], d.get("socket_dir"))


def read_tail(path: str, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log file ([] if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return list(deque((ln for ln in text.splitlines() if ln.strip()), maxlen=lines))


KEEP_LOGS = 3               # QEMU logs of ended launches kept per VM (a crash's stderr stays readable)


def prune_logs(runtime_dir: str, keep: int = KEEP_LOGS) -> list[str]:
    """Remove the QEMU logs of ended launches (no launch record: that QEMU is gone) beyond the
    newest ``keep``, so a VM restarted many times does not pile up logs; returns what went."""
    try:
        names = os.listdir(runtime_dir)
    except OSError:
        return []
    live = {n[len("launch-"):-len(".json")] for n in names if n.startswith("launch-") and n.endswith(".json")}
    ended = [n for n in names if n.startswith("qemu-") and n.endswith(".log") and n[5:-4] not in live]
    ended.sort(key=lambda n: _mtime(os.path.join(runtime_dir, n)), reverse=True)
    gone = ended[keep:]
    for name in gone:
        _unlink(os.path.join(runtime_dir, name))
    return gone


def write_record(path: str, record: dict) -> None:
    """Write a launch record durably (temporary file, fsync, rename): a reader sees all of it or none."""
    tmp = f"{path}.tmp"
    fd = open_private_path(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_records(runtime_dir: str) -> list[dict]:
    """The launch records left in a VM's runtime directory (oldest first; unreadable ones skipped)."""
    try:
        names = sorted(os.listdir(runtime_dir), key=lambda n: _mtime(os.path.join(runtime_dir, n)))
    except OSError:
        return []
    records = []
    for name in names:
        if name.startswith("launch-") and name.endswith(".json"):
            try:
                with open(os.path.join(runtime_dir, name), "rb") as f:
                    record = json.loads(f.read())
                int(record["pid"]), int(record["start_time"]), QemuFiles.from_dict(record["files"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            records.append(record)
    return records


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def marked_processes(root: str) -> dict[int, int]:
    """{pid: start time} of this user's live processes that carry mtevm's mark for ``root`` (a
    hosts' VM runtime root): an option naming a file under it as only mtevm's QEMU command line
    does (``-qmp unix:<root>/...`` or ``-device loader,file=<root>/...``; a ``socat unix:...`` on
    a console socket is not one). A launch the daemon did not live to record is found this way;
    never by process name."""
    prefix = os.fsencode(os.path.join(os.path.abspath(root), ""))
    marks = {b"-qmp": b"unix:" + prefix, b"-device": b"loader,file=" + prefix}   # option -> its value
    uid = os.getuid()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(marks.get(opt) and value.startswith(marks[opt]) for opt, value in zip(argv, argv[1:])):
            start = proc_start_time(int(entry))
            if start is not None:
                found[int(entry)] = start
    return found


async def kill_pid(pid: int, start_time: int, timeout: float = 5.0) -> bool:
    """SIGKILL ``pid`` if it is still the process that started at ``start_time`` (a pidfd makes a
    reused pid safe); wait until it is gone and reap it if it is our child. True if it was killed."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if proc_start_time(pid) != start_time:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc_start_time(pid) is not None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return True
    finally:
        os.close(fd)


def qemus_mentioning(path: str) -> list[int]:
    """Live QEMU processes whose command line contains ``path`` (a VM's runtime directory names
    every QEMU mtevm started for that VM: its QMP socket and parameter file are in it)."""
    needle = os.fsencode(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if needle not in argv or not os.path.basename(argv.split(b"\0", 1)[0]).startswith(b"qemu-system"):
            continue
        if proc_start_time(int(entry)) is not None:
            found.append(int(entry))
    return found


async def kill_strays(path: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every live QEMU that mentions ``path`` (left by a crashed daemon or test), wait
    until each is gone (reaping our own children) and return their PIDs."""
    pids = qemus_mentioning(path)
    for pid in pids:
        start = proc_start_time(pid)
        if start is not None:
            await kill_pid(pid, start, timeout)
    return pids


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class QemuProcess:
    """A running QEMU with its QMP session. Build it with ``launch`` or ``reattach``."""

    def __init__(self, pid: int, start_time: int, files: QemuFiles, argv: list[str],
                 popen: subprocess.Popen | None = None):
        self.pid = pid
        self.start_time = start_time
        self.files = files
        self.argv = argv
        self.qmp = QmpConnection(files.qmp_socket)
        self.returncode: int | None = None       # known only for our own children
        self.stopping = False                    # an exit after stop() began is not a crash
        self.unreachable: str | None = None      # why QMP could not be reached (reattach only)
        self._popen = popen
        self._exited = asyncio.Event()
        self._exit_callbacks: list[Callable[["QemuProcess"], None]] = []
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._on_exit)

    # ----------------------------------------------------------------------------- start
    @classmethod
    async def launch(cls, argv: list[str], files: QemuFiles, ready_timeout: float = READY_TIMEOUT,
                     record: dict | None = None) -> "QemuProcess":
        """Start QEMU and wait for QMP. On failure: RealizeError with QEMU's stderr, nothing left.

        Right after the fork, before waiting for QMP, the launch record (``runtime_info()`` plus
        ``record``) is written durably to ``files.record``: a daemon killed at any later moment
        leaves its successor the pid and start time of every QEMU it started."""
        with os.fdopen(open_private_path(files.log, os.O_WRONLY, exclusive=True), "wb") as log:
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, close_fds=True)
            except OSError as e:
                files.remove_socket()
                raise RealizeError(f"cannot run {argv[0]}: {e.strerror}") from e
        start_time = proc_start_time(popen.pid) or 0
        proc = cls(popen.pid, start_time, files, argv, popen)
        try:
            try:
                write_record(files.record, {**proc.runtime_info(), **(record or {})})
            except (OSError, ConfigError) as e:
                raise RealizeError(f"cannot record QEMU's pid in {files.record}: {getattr(e, 'strerror', e)}") from None
            await proc.qmp.connect(proc.alive, ready_timeout)
        except BaseException as e:   # includes cancellation: never leave a half-started QEMU
            proc.stopping = True
            await proc.kill()
            if isinstance(e, QmpGone):
                raise RealizeError(proc.startup_error(str(e))) from None
            raise
        return proc

    @classmethod
    async def reattach(cls, runtime: dict, timeout: float = REATTACH_TIMEOUT) -> "QemuProcess | None":
        """The QEMU an earlier daemon saved in ``runtime``, or None if it is gone (or the pid was
        reused). If it runs but its QMP socket does not answer, ``unreachable`` says why."""
        pid, start_time = int(runtime["pid"]), int(runtime["start_time"])
        if proc_start_time(pid) != start_time:
            return None
        try:
            proc = cls(pid, start_time, QemuFiles.from_dict(runtime["files"]), list(runtime.get("argv", [])))
        except ProcessLookupError:
            return None
        if proc_start_time(pid) != start_time:   # exited (and the pid reused) between the checks
            proc._close_pidfd()
            return None
        try:
            await proc.qmp.connect(proc.alive, timeout)
        except QmpGone as e:
            if not proc.alive():
                return None
            # Alive but deaf (e.g. another client holds its one QMP connection): keep it, so the
            # user sees it and can still stop it (by signal).
            proc.unreachable = str(e)
        return proc

    def runtime_info(self) -> dict:
        """What ``reattach`` needs; JSON-able."""
        return {"pid": self.pid, "start_time": self.start_time, "files": self.files.to_dict(),
                "argv": self.argv}

    # ------------------------------------------------------------------------------ exit
    def alive(self) -> bool:
        return not self._exited.is_set()

    def on_exit(self, callback: Callable[["QemuProcess"], None]) -> None:
        """Call ``callback(self)`` once QEMU has exited (at once if it already has)."""
        if self._exited.is_set():
            callback(self)
        else:
            self._exit_callbacks.append(callback)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for QEMU to exit; True if it did within ``timeout``."""
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _on_exit(self) -> None:
        self._close_pidfd()
        self._reap()
        self.files.remove_socket()
        _unlink(self.files.record)    # the record describes a live QEMU only
        self._exited.set()
        for cb in self._exit_callbacks:
            cb(self)
        self._exit_callbacks.clear()

    def _reap(self) -> None:
        if self._popen is not None:
            self.returncode = self._popen.wait()
            return
        try:   # a reattached QEMU may still be our child (same process, new driver object)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass   # another process's child (an earlier daemon started it): its status is lost

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _signal(self, sig: int) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def exit_reason(self) -> str:
        """How QEMU ended, in words (for a crashed VM)."""
        rc = self.returncode
        if rc is None:
            # Only a parent learns the exit status; a QEMU reattached from an earlier daemon is not ours.
            return f"QEMU (pid {self.pid}) exited while reattached; its exit status is unknown"
        if rc < 0:
            return f"QEMU was killed by {signal.Signals(-rc).name}"
        return f"QEMU exited with status {rc}"

    def stderr_tail(self, lines: int = 20) -> list[str]:
        return read_tail(self.files.log, lines)

    def startup_error(self, fallback: str) -> str:
        """QEMU's own start-up message, verbatim (every line it printed), else ``fallback``."""
        tail = self.stderr_tail(50)
        return "\n".join(tail) if tail else f"{fallback} ({self.exit_reason()})"

    # ------------------------------------------------------------------------------ stop
    async def stop(self, timeouts: StopTimeouts = StopTimeouts()) -> None:
        """QMP quit, then SIGTERM, then SIGKILL, each with a timeout; returns once QEMU is gone
        (and reaped if it is our child)."""
        self.stopping = True
        if self.alive():
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), timeouts.quit)
                quit_sent = True
            except (QmpError, asyncio.TimeoutError):
                quit_sent = False   # no QMP: waiting for a quit that was never sent is pointless
            if not (quit_sent and await self.wait(timeouts.quit)):
                self._signal(signal.SIGTERM)
                if not await self.wait(timeouts.term):
                    await self.kill(timeouts.kill)
        await self.qmp.close()
        self.files.remove_socket()

    async def kill(self, timeout: float = StopTimeouts.kill) -> None:
        """SIGKILL and wait (used when a start fails half-way)."""
        self.stopping = True
        self._signal(signal.SIGKILL)
        if not await self.wait(timeout):
            raise RuntimeError(f"QEMU pid {self.pid} survived SIGKILL for {timeout} s")
        await self.qmp.close()
        self.files.remove_socket()

    async def detach(self) -> None:
        """Drop QMP and the watch but leave QEMU running (the daemon exits; a later one reattaches)."""
        await self.qmp.close()
        self._close_pidfd()
