"""What a VM running mtevm's Linux guest shows, read from its guest agent (backend.guests.agent):
per-vCPU and per-process tag-check faults, the guest's facts, exec and reboot through the agent.

Shared by the local host's LinuxVm (agent on QEMU's Unix socket) and the libvirt host's
LibvirtLinuxVm (agent through a libvirt channel stream), so both show the same counters.
"""
from __future__ import annotations

import asyncio

from backend.errors import MtevmError, StateError
from backend.guests.agent import AgentClient


class AgentGuestView:
    """Counters and guest operations from ``self.agent`` (None: a custom kernel without the agent).
    The VM class says whether its guest runs (``_guest_running``)."""

    agent: AgentClient | None = None

    def _guest_running(self) -> bool:
        raise NotImplementedError

    def _panic_lines(self) -> list[str]:
        """The guest kernel's panic report seen on the serial console, then its one-line summary
        (the VM's last error); empty when it has not panicked."""
        panic = self.console.panic
        if not panic:
            return []
        first = next((ln for ln in panic if "Kernel panic" in ln), panic[-1])
        return ([f"console: {line}" for line in panic if line.strip()]
                + ["guest kernel panic: " + first[first.find("Kernel panic"):].strip()])

    def _tcf(self, index: int) -> str:
        return self.spec.workload.tcf_for(index)

    def vcpus(self) -> list[dict]:
        kvm_mte = self.spec.config.accel == "kvm" and self.spec.config.mte
        if self.agent is None:
            return [{"index": i, "kvm_mte": kvm_mte, "tcf": self._tcf(i), "checked": 0, "unchecked": 0,
                     "sync_faults": 0, "async_faults": 0, "last_fault": None} for i in range(self.spec.config.vcpus)]
        return [self.agent.state.vcpu_info(i, self._tcf(i), kvm_mte) for i in range(self.spec.config.vcpus)]

    async def sample(self) -> list[dict]:
        """The agent pushes its counters (every 100 ms); nothing to ask QEMU."""
        return self.vcpus()

    def last_faults(self, limit: int = 20) -> list[dict]:
        return list(self.agent.state.last_faults)[:limit] if self.agent else []

    def tag_memory(self) -> dict | None:
        return None   # the guest kernel decides which pages are tagged; mtevm cannot see them from outside

    def guest_facts(self) -> dict | None:
        if self.agent is None:
            return None
        facts = self.agent.state.guest_facts()
        return {**(facts or {}), "agent": "connected" if self.agent.ready.is_set() else "waiting"}

    def processes(self) -> list[dict]:
        return self.agent.state.process_table() if self.agent else []

    def set_tcf(self, vcpu: int | None, tcf: str) -> None:
        raise StateError(f"VM '{self.spec.config.name}' runs Linux: its workload's TCF is a boot parameter "
                         "(mtevm.tcf=); stop the VM, change the workload's tcf and start it again")

    @property
    def has_agent(self) -> bool:
        return self.agent is not None

    def require_agent(self) -> AgentClient:
        if self.agent is None:
            raise StateError(f"VM '{self.spec.config.name}' runs a custom kernel without the mtevm agent: "
                             "exec and selftests need --guest linux")
        if not self._guest_running():
            raise StateError(f"VM '{self.spec.config.name}' is not running")
        return self.agent

    async def _agent_reboot(self, action: str, timeout: float) -> bool:
        """``reboot`` through the agent: True once the rebooted guest's agent is back."""
        agent = self.agent
        boots = agent.state.boots
        try:
            await agent.send({"type": action})
        except (MtevmError, OSError):
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and self._guest_running():
            if agent.state.boots > boots and agent.ready.is_set():
                return True
            await asyncio.sleep(0.1)
        return False
