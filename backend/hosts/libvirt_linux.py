"""mtevm's Linux guest on a libvirt host: the same kernel, initramfs and command line as on the
local host (backend.hosts.linux), booted by libvirt from mtevm's storage pool, its agent reached
through the domain's virtio-serial channel.

The channel is opened with ``virDomainOpenChannel``, so the agent's bytes travel inside the libvirt
connection (over ``qemu+ssh://`` too): no socket on the remote host is reached directly. The stream
is bridged to a local socket pair by two threads, and the ordinary agent client
(backend.guests.agent.AgentClient) reads and writes the other end, so counters, exec, selftests and
poweroff work exactly as for a local Linux VM.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

from backend.errors import MtevmError
from backend.guests.agent import MAX_LINE, AgentClient
from backend.hosts.agent_view import AgentGuestView
from backend.hosts.libvirt import LibvirtVm, load_libvirt
from backend.qemu.argv import AGENT_PORT
from backend.qemu.console import ConsoleLog, SerialConsole

log = logging.getLogger("mtevm.libvirt")

POWEROFF_TIMEOUT = 10.0     # seconds the guest gets to power off before the domain is destroyed
CHUNK = 64 * 1024


class LibvirtLinuxVm(AgentGuestView, LibvirtVm):
    """A libvirt domain running mtevm's Linux image; counters from its guest agent."""

    def __init__(self, host, spec):
        super().__init__(host, spec)
        self._closed = False
        self.agent = AgentClient(f"{host.name}:{self.name}:{AGENT_PORT}", spec.config.vcpus, self._guest_running,
                                 fault_address=spec.guest.fault_address,
                                 connect=lambda: self._open_stream(self._open_channel, MAX_LINE)).start()
        self.console = SerialConsole(f"{host.name}:{self.name}:serial", ConsoleLog(spec.log_dir), self._guest_running,
                                     on_panic=self._on_panic,
                                     connect=lambda: self._open_stream(self._open_console, 2 ** 16)).start()

    _panicked = False

    def _guest_running(self) -> bool:
        return not self._gone and not self._closed and not self._stopping and not self._panicked

    def _on_panic(self, lines: list[str]) -> None:
        """A guest kernel panic on the console: the VM is crashed (a panicked kernel never powers
        off; the daemon then destroys the domain, as the local host stops its QEMU)."""
        self._panicked = True

    @property
    def state(self) -> str:
        return "crashed" if self._panicked else super().state

    def stderr_tail(self) -> list[str]:
        return super().stderr_tail() + self._panic_lines()

    async def _open_stream(self, open_fn, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The agent's port or the serial console as a stream pair: libvirt's stream, bridged to a
        socket pair. OSError (retried by the caller) while the host or the domain is not there."""
        if self.host.status != "connected":
            raise OSError(f"host {self.host.name} is not connected")
        try:
            stream = await self.host._call(open_fn)
        except MtevmError as e:
            raise OSError(str(e)) from None
        ours, theirs = socket.socketpair()
        bridge = _Bridge(stream, theirs, self.name)
        bridge.start()
        return await asyncio.open_unix_connection(sock=ours, limit=limit)

    def _open_console(self, conn):
        libvirt, _, _ = load_libvirt()
        stream = conn.newStream(0)
        self._domain(conn).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        return stream

    def _open_channel(self, conn):
        libvirt, _, _ = load_libvirt()
        stream = conn.newStream(0)
        # FORCE: a previous daemon's session (this VM reattached after a restart) gives way
        self._domain(conn).openChannel(AGENT_PORT, stream, libvirt.VIR_DOMAIN_CHANNEL_FORCE)
        return stream

    async def guest_power(self, action: str, timeout: float) -> bool:
        """The agent's ``poweroff`` (True once libvirt reports the domain shut off) or ``reboot``
        (True once the rebooted guest's agent is back); False without the agent or in time."""
        agent = self.agent
        if agent is None or not agent.ready.is_set() or not self._guest_running():
            return False
        if action != "poweroff":
            return await self._agent_reboot(action, timeout)
        self._stopping = True                  # the shutdown event that follows is no crash
        try:
            await agent.send({"type": "poweroff"})
        except (MtevmError, OSError):
            self._stopping = False
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                state = await self.host._call(lambda conn: self._domain(conn).state()[0])
            except MtevmError:
                break
            if state == 5:                     # VIR_DOMAIN_SHUTOFF
                return True
            await asyncio.sleep(0.2)
        self._stopping = False
        self._poweroff_missed = True
        return False

    _poweroff_missed = False     # the agent was asked and the guest did not power off in time

    async def stop(self) -> None:
        """Power off through the agent (clean), then virDomainDestroy if it does not (at once when
        a shutdown's own wait for the agent has just run out: it is not asked twice)."""
        if not self._poweroff_missed and await self.guest_power("poweroff", POWEROFF_TIMEOUT):
            if self.host.vms.get(self.name) is self:       # shut off already: nothing to destroy
                del self.host.vms[self.name]
        else:
            await super().stop()
        await self.close_channels()

    async def close_channels(self) -> None:
        self._closed = True
        await self.agent.close()
        await self.console.close()

    async def migrate_to(self, dst, spec, with_tags, progress):
        """As any libvirt VM; the destination's VM opens the channel of the new domain, this one's
        agent session ends with the source domain."""
        target = await super().migrate_to(dst, spec, with_tags, progress)
        await self.close_channels()
        if isinstance(target, LibvirtLinuxVm):
            target.agent.state.last_faults = self.agent.state.last_faults
            target.agent.state.processes = dict(self.agent.state.processes)
        return target


class _Bridge:
    """Copies bytes between a libvirt stream (blocking) and one end of a socket pair, in two
    threads (never the asyncio executor's: they block for the VM's life). Either side ending
    ends both."""

    def __init__(self, stream, sock: socket.socket, name: str):
        self.stream, self.sock, self.name = stream, sock, name
        self._lock = threading.Lock()
        self._ended = False      # the stream was finished or aborted (exactly once: libvirtd must not see both)
        self._down = threading.Thread(target=self._to_socket, name=f"agent-down-{name}", daemon=True)
        self._up = threading.Thread(target=self._to_stream, name=f"agent-up-{name}", daemon=True)

    def start(self) -> None:
        self._down.start()
        self._up.start()

    def _end(self, how) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        _quietly(how)

    def _to_socket(self) -> None:
        try:
            while True:
                data = self.stream.recv(CHUNK)
                if not isinstance(data, bytes) or not data:
                    break              # end of stream (the domain stopped) or an error code
                self.sock.sendall(data)
            self._end(self.stream.finish)   # libvirtd ended it: finish, as libvirt's stream protocol wants
        except Exception as e:         # libvirtError (stream aborted, connection gone) or the socket closed
            log.debug("agent channel of %s: %s", self.name, e)
        finally:
            _quietly(self.sock.shutdown, socket.SHUT_RDWR)

    def _to_stream(self) -> None:
        try:
            while data := self.sock.recv(CHUNK):
                view = memoryview(data)
                while view:
                    sent = self.stream.send(bytes(view))
                    if sent < 0:
                        raise OSError("the channel stream refused data")
                    view = view[sent:]
        except Exception as e:
            log.debug("agent channel of %s: %s", self.name, e)
        finally:
            self._end(self.stream.abort)
            _quietly(self.sock.shutdown, socket.SHUT_RDWR)
            self._down.join(10)
            self.sock.close()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass
