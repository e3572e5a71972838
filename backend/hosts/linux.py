"""Linux guests on the local host: mtevm's Linux MTE image (with the agent) or a custom kernel.

A ``LinuxVm`` is a LocalVm (same QEMU process, console, migration) whose counters come from the
guest agent (backend.guests.agent) instead of the bare-metal guest's status block: every
tag-check fault of every guest process, per vCPU and per process, plus the tagged-heap workload's
checked accesses. A custom kernel has no agent: its counters stay at zero and its console is
the way in.

Stop powers the guest off through the agent (a clean shutdown; there is no ACPI on ``virt``
without firmware) and falls back to QEMU's quit. A guest kernel panic, seen on the console, makes
the VM crashed with the panic lines (a panicked kernel never powers off by itself).
"""
from __future__ import annotations

import shlex

from backend.errors import ConfigError, MtevmError
from backend.guests.agent import AgentClient
from backend.hosts.agent_view import AgentGuestView
from backend.hosts.base import VmSpec
from backend.hosts.local import LocalVm

POWEROFF_TIMEOUT = 10.0     # seconds a Linux guest gets to power off before QEMU is told to quit
LINUX_CONSOLE_ARGS = "console=ttyAMA0 quiet"


def image_build_hint() -> str:
    return "mtevm image build linux"


def linux_image_files() -> tuple[str, str, str]:
    """(Image, initramfs, kernel release) of the built Linux guest image, checked; else an error
    that names the command that builds it."""
    try:
        from backend.guests.linux.image import linux_image
    except ImportError:
        raise ConfigError(f"the Linux guest image is not built: build it with '{image_build_hint()}'") from None
    img = linux_image()   # ImageError (an MtevmError) says what is wrong and how to rebuild
    return img.kernel, img.initrd, getattr(img, "kernel_release", "?")


def workload_args(spec: VmSpec) -> list[str]:
    """The workload's parameters as the guest's /init and agent read them (docs/agent-protocol.md)."""
    w, n = spec.workload, spec.config.vcpus
    return ["mtevm.workload=1", "mtevm.tcf=" + ",".join(w.tcf_for(i) for i in range(n)),
            f"mtevm.rate={w.rate}", f"mtevm.seed={w.seed}", f"mtevm.uaf={w.uaf_rate:g}",
            f"mtevm.overflow={w.overflow_rate:g}", f"mtevm.wild={w.wild_rate:g}", f"mtevm.heap={w.heap_size}"]


def linux_boot(spec: VmSpec) -> tuple[str, str | None, str]:
    """-kernel, -initrd and -append for a ``linux`` or ``custom`` guest."""
    g = spec.guest
    if g.kind == "custom":
        return g.kernel, g.initrd, g.append or LINUX_CONSOLE_ARGS
    kernel, initrd, _ = linux_image_files()
    user = shlex.split(g.append or "")
    words = [LINUX_CONSOLE_ARGS]
    if "mtevm.workload=0" not in user:   # the user turned the workload off: no workload parameters
        words += workload_args(spec)
    if g.append:
        words.append(g.append)
    return kernel, initrd, " ".join(words)


class LinuxVm(AgentGuestView, LocalVm):
    """A local VM running a Linux kernel; ``agent`` is None for a custom kernel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.console.on_panic = self._on_panic
        self.agent: AgentClient | None = None
        if self.spec.guest.has_agent:
            self.agent = AgentClient(self.proc.files.socket("agent"), self.spec.config.vcpus, self.proc.alive,
                                     fault_address=self.spec.guest.fault_address).start()
        self._panicked = False

    # ------------------------------------------------------------------------------ state
    def _on_panic(self, lines: list[str]) -> None:
        self._panicked = True

    @property
    def state(self) -> str:
        if self._panicked:
            return "crashed"
        return super().state

    def stderr_tail(self) -> list[str]:
        lines = self.proc.stderr_tail()
        panic = self._panic_lines()
        if panic:
            lines += panic
        elif not self.proc.alive() and not self.proc.stopping:
            lines.append(self.proc.exit_reason())
        return lines

    async def close_channels(self) -> None:
        await super().close_channels()
        if self.agent is not None:
            await self.agent.close()

    def _take_history(self, other) -> None:
        """A migration: the last faults and the per-process table go with the VM (the counters
        themselves continue by themselves: the guest agent keeps cumulative totals)."""
        super()._take_history(other)
        if self.agent is not None and getattr(other, "agent", None) is not None:
            self.agent.state.last_faults = other.agent.state.last_faults
            self.agent.state.processes = {**other.agent.state.processes, **self.agent.state.processes}

    def _guest_running(self) -> bool:
        return self.proc.alive() and not self._panicked

    async def guest_power(self, action: str, timeout: float) -> bool:
        """The agent's clean ``poweroff`` (True once QEMU has exited) or ``reboot`` (True once the
        rebooted guest's agent is back); False without an agent or when it did not happen in time."""
        agent = self.agent
        if agent is None or not agent.ready.is_set() or not self.proc.alive() or self._panicked:
            return False
        if action == "poweroff":
            self.proc.stopping = True       # the exit that follows is no crash
            try:
                await agent.send({"type": "poweroff"})
            except (MtevmError, OSError):
                self.proc.stopping = False
                return False
            if await self.proc.wait(timeout):
                return True
            self.proc.stopping = False
            self._poweroff_missed = True
            return False
        return await self._agent_reboot(action, timeout)

    _poweroff_missed = False     # the agent was asked and the guest did not power off in time

    async def reset(self) -> None:
        await super().reset()
        self.console.panic, self._panicked = None, False

    async def stop(self) -> None:
        """Power off through the agent (clean), then QEMU quit / SIGTERM / SIGKILL if it does not (at
        once when a shutdown's own wait for the agent has just run out: it is not asked twice)."""
        if not self._poweroff_missed:
            await self.guest_power("poweroff", POWEROFF_TIMEOUT)
        await super().stop()
