"""mtevm's Linux guest on a libvirt host: the same kernel, initramfs and command line as on the
local host (backend.hosts.linux), booted by libvirt from mtevm's storage pool, its agent reached
through the domain's virtio-serial channel.

The channel is opened with ``virDomainOpenChannel``, so the agent's bytes travel inside the libvirt
connection (over ``qemu+ssh://`` too): no socket on the remote host is reached directly. The stream
is bridged to a local socket pair (backend.hosts.libvirt_stream), and the ordinary agent client
(backend.guests.agent.AgentClient) reads and writes the other end, so counters, exec, selftests and
poweroff work exactly as for a local Linux VM. The serial console is every libvirt VM's
(backend.hosts.libvirt.LibvirtVm).
"""
from __future__ import annotations

import asyncio

from backend.errors import MtevmError
from backend.guests.agent import MAX_LINE, AgentClient
from backend.hosts.agent_view import AgentGuestView
from backend.hosts.libvirt import LibvirtVm, load_libvirt
from backend.qemu.argv import AGENT_PORT

POWEROFF_TIMEOUT = 10.0     # seconds the guest gets to power off before the domain is destroyed


class LibvirtLinuxVm(AgentGuestView, LibvirtVm):
    """A libvirt domain running mtevm's Linux image; counters from its guest agent."""

    def __init__(self, host, spec):
        super().__init__(host, spec)
        self.agent = AgentClient(f"{host.name}:{self.name}:{AGENT_PORT}", spec.config.vcpus, self._guest_running,
                                 fault_address=spec.guest.fault_address,
                                 connect=lambda: self._open_stream(self._open_channel, MAX_LINE)).start()

    _panicked = False

    def _guest_running(self) -> bool:
        return LibvirtVm._guest_running(self) and not self._panicked   # (AgentGuestView's is abstract)

    def _on_panic(self, lines: list[str]) -> None:
        """A guest kernel panic on the console: the VM is crashed (a panicked kernel never powers
        off; the daemon then destroys the domain, as the local host stops its QEMU)."""
        self._panicked = True

    @property
    def state(self) -> str:
        return "crashed" if self._panicked else super().state

    def stderr_tail(self) -> list[str]:
        return super().stderr_tail() + self._panic_lines()

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
            await self.close_channels()
        else:
            await super().stop()

    async def close_channels(self) -> None:
        await super().close_channels()
        await self.agent.close()

    async def migrate_to(self, dst, spec, with_tags, progress):
        """As any libvirt VM; the destination's VM opens the channel of the new domain, this one's
        agent session ends with the source domain."""
        target = await super().migrate_to(dst, spec, with_tags, progress)
        if isinstance(target, LibvirtLinuxVm):
            target.agent.state.last_faults = self.agent.state.last_faults
            target.agent.state.processes = dict(self.agent.state.processes)
        return target
