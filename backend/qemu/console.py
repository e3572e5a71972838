"""A VM's serial console: QEMU serves the PL011 on a Unix socket; the daemon is its one client.

The daemon reads everything the guest prints into a bounded, persisted log (``console.log`` plus
one rotated ``console.log.1``, each at most ``LOG_MAX_BYTES``; in the VM's state directory, so it
outlives the VM, the daemon and a crash) and fans it out to attached users (``mtevm console``,
the app). What users type goes back to the guest. QEMU's socket chardev takes one client at a
time, which is why users attach through the daemon rather than to QEMU directly (as virsh
console attaches through libvirtd).

It also watches for a guest kernel panic ("Kernel panic - not syncing"): the VM is then shown as
crashed with the panic lines, since a panicked kernel never powers the machine off.
"""
from __future__ import annotations

import asyncio
import errno
import os
import re
from collections import deque
from typing import Callable

from backend.errors import ConfigError

LOG_NAME = "console.log"
LOG_MAX_BYTES = 256 * 1024       # per file; with the rotated one at most 512 KiB per VM
RECENT_LINES = 200               # kept in memory for panic reports
PANIC_RE = re.compile(r"Kernel panic - not syncing")
PANIC_END_RE = re.compile(r"---\[ end Kernel panic")
PANIC_BEFORE = 8                 # console lines before the panic line kept with it
PANIC_MAX = 80                   # the panic report (call trace etc.) is kept up to its end marker or this
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")   # terminal control sequences (the shell's cursor query)
SUBSCRIBER_QUEUE = 1024          # chunks buffered per attached user; a stalled one loses the oldest
CONNECT_POLL = 0.05


def _open_append(path: str) -> int:
    """Open a log file for appending through backend.paths' checks (its directory private and
    ours, no symlink followed, created 0600)."""
    from backend.paths import open_private_path
    return open_private_path(path, os.O_WRONLY | os.O_APPEND)


class ConsoleLog:
    """``console.log`` in ``directory``, rotated to ``console.log.1`` when it passes ``max_bytes``."""

    def __init__(self, directory: str, max_bytes: int = LOG_MAX_BYTES):
        self.directory = directory
        self.max_bytes = max_bytes
        self.path = os.path.join(directory, LOG_NAME)
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            self._fd = _open_append(self.path)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def append(self, data: bytes) -> None:
        try:
            fd = self._open()
            if self._size + len(data) > self.max_bytes and self._size:
                os.close(fd)
                self._fd = None
                os.replace(self.path, self.path + ".1")
                fd = self._open()
            os.write(fd, data[-self.max_bytes:])
            self._size += min(len(data), self.max_bytes)
        except (OSError, ConfigError):
            self.close()   # a full disk must not stop the console: the next chunk tries again

    def mark(self, text: str) -> None:
        """A line of mtevm's own in the log (boot, stop), so runs can be told apart."""
        self.append(f"\r\n-- mtevm: {text} --\r\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def read_log(directory: str, lines: int = 100) -> list[str]:
    """The last ``lines`` lines of a VM's console log (both files), as text; [] if none."""
    data = b""
    for name in (LOG_NAME + ".1", LOG_NAME):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data += f.read()
        except OSError:
            pass
    text = data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return out[-lines:] if lines > 0 else []


class SerialConsole:
    """The daemon's end of one QEMU's serial socket: log, fan-out, input, panic watch."""

    def __init__(self, socket_path: str, log: ConsoleLog, alive: Callable[[], bool],
                 on_panic: Callable[[list[str]], None] | None = None, connect: Callable | None = None):
        self.socket_path = socket_path
        # how the serial line is reached: QEMU's Unix socket, or e.g. a libvirt console stream
        # bridged to a socket pair (backend.hosts.libvirt_linux); OSError = not there yet
        self._connect = connect or (lambda: asyncio.open_unix_connection(self.socket_path))
        self.log = log
        self.alive = alive
        self.on_panic = on_panic
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.panic: list[str] | None = None       # the panic lines, once the guest kernel panicked
        self._panic_open = False
        self.connected = asyncio.Event()
        self._partial = ""
        self._subscribers: set[asyncio.Queue] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> "SerialConsole":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        misses = 0
        while self.alive():
            try:
                reader, writer = await self._connect()
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, None):
                    raise
                # QEMU has not made its socket yet (fast), or never will (a QEMU started by an older
                # mtevm without one): poll, backing off to once a second
                misses += 1
                await asyncio.sleep(min(CONNECT_POLL * misses, 1.0))
                continue
            misses = 0
            self._writer = writer
            self.connected.set()
            try:
                while chunk := await reader.read(65536):
                    self._received(chunk)
            except OSError:
                pass
            finally:
                self.connected.clear()
                self._writer = None
                writer.close()
            await asyncio.sleep(CONNECT_POLL)

    def _received(self, chunk: bytes) -> None:
        self.log.append(chunk)
        for q in list(self._subscribers):
            if q.full():
                q.get_nowait()
            q.put_nowait(chunk)
        text = self._partial + chunk.decode(errors="replace")
        *lines, self._partial = text.replace("\r", "").split("\n")
        for line in lines:
            line = ANSI_RE.sub("", line)
            self.recent.append(line)
            if self.panic is None:
                if PANIC_RE.search(line):
                    self.panic = list(self.recent)[-PANIC_BEFORE - 1:]
                    self._panic_open = True
                    if self.on_panic is not None:
                        self.on_panic(self.panic)
            elif self._panic_open and len(self.panic) < PANIC_MAX:
                self.panic.append(line)      # the report goes on (CPU, call trace) up to its end marker
                self._panic_open = not PANIC_END_RE.search(line)

    def subscribe(self) -> asyncio.Queue:
        """A queue of output chunks (bytes) from now on; ``None`` in it means the console closed."""
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    async def write(self, data: bytes) -> None:
        """Type ``data`` on the guest's console (dropped while QEMU's socket is not connected)."""
        writer = self._writer
        if writer is not None and data:
            writer.write(data)
            try:
                await writer.drain()
            except OSError:
                pass

    async def close(self) -> None:
        """Stop reading (the VM stopped or the daemon exits); attached users see the end."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.log.close()
        for q in list(self._subscribers):
            if q.full():
                q.get_nowait()
            q.put_nowait(None)
        self._subscribers.clear()
