"""The host-driver interface: what the daemon needs from a place that runs VMs.

A host is either simulated (``sim-mte``, ``sim-nomte``: vCPUs run the workload through the
tag-check core) or real (``local``: qemu-system-aarch64 processes over QMP). The daemon's
service (backend.daemon.service) only talks to these two ABCs, so a new host kind (libvirt
over ssh, later) is one new module.
"""
from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from backend.guests.definition import GuestConfig
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig

ProgressCallback = Callable[[float, dict], Awaitable[None] | None]  # (fraction 0..1, stats)


async def report_progress(progress: ProgressCallback | None, fraction: float, stats: dict) -> None:
    """Call a migration progress callback, which may be a plain function or a coroutine function."""
    if progress is None:
        return
    result = progress(fraction, stats)
    if inspect.isawaitable(result):
        await result


@dataclass
class VmSpec:
    """Everything a host needs to run one VM: its definition, its workload and where to keep files."""

    config: VirtMachineConfig
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    runtime_dir: str = ""     # a private directory for this VM's sockets and logs (local host)
    extra_args: list[str] = field(default_factory=list)   # the definition's qemu_args (local host only)
    guest: GuestConfig = field(default_factory=GuestConfig)  # what a local VM boots (builtin, linux, custom)
    log_dir: str = ""         # where the VM's console log is kept (its state dir; local host)
    allow_host_files: bool = False   # extra_args may name host files (the user opted in: --allow-host-files)


class Host(abc.ABC):
    name: str
    kind: str            # "simulated" | "local"
    description: str

    @abc.abstractmethod
    def info(self) -> dict:
        """The ``hosts()`` entry: name, kind, description, arch, kvm_mte, available, reason."""

    @abc.abstractmethod
    def probe(self) -> dict:
        """The capability probe of this host (``ProbeReport.to_dict()``)."""

    @abc.abstractmethod
    def check_config(self, config: VirtMachineConfig) -> None:
        """Dry-run the seed's decision tree for ``config`` on this host; raise RealizeError."""

    def check_extra_args(self, extra_args, *, allow_host_files: bool = False) -> list[str]:
        """Validate a definition's ``qemu_args``; hosts without a QEMU process refuse any."""
        from backend.errors import ConfigError
        if extra_args:
            raise ConfigError(f"qemu_args: host {self.name} is {self.kind}: it runs no QEMU process, so extra "
                              "QEMU arguments only apply to VMs on the local host")
        if extra_args is not None and not isinstance(extra_args, (list, tuple)):
            raise ConfigError("qemu_args must be a list of strings")
        return []

    def check_limits(self, config: VirtMachineConfig, workload: WorkloadConfig) -> None:
        """ConfigError (naming the limit) if this host cannot honour the definition; checked at
        create, in the create form (validate_only) and at start, before anything runs."""

    @abc.abstractmethod
    async def start(self, spec: VmSpec) -> "RunningVm":
        """Boot the VM. Raises RealizeError (QEMU's text) leaving nothing behind."""

    async def reattach(self, spec: VmSpec, runtime: dict) -> "RunningVm | None":
        """Find a VM that outlived the previous daemon (``runtime`` is what it saved); None if gone."""
        return None

    def can_migrate_to(self, dst: "Host") -> str | None:
        """None if VMs of this host can migrate to ``dst``, else the reason."""
        if dst.kind != self.kind:
            return f"cannot migrate from a {self.kind} host to a {dst.kind} host"
        return None

    async def close(self) -> None:
        """The daemon is stopping. Simulated VMs stop; real QEMU processes keep running."""

    # Hosts that define VMs on the host itself (libvirt domains) override these; others keep
    # definitions only in mtevm's store.
    async def open(self, publish=None) -> None:
        """Start whatever the host keeps running (libvirt: its connection); ``publish(type, **fields)``
        sends events to the daemon's clients."""

    async def define(self, spec: VmSpec) -> None:
        """Create or update the VM's definition on the host (called at create and when it changes)."""

    async def undefine(self, name: str) -> None:
        """Remove the VM's definition from the host (delete)."""

    def shown_state(self, state: str) -> str:
        """The state users see for a VM of this host (a host that cannot be reached: "unknown")."""
        return state

    def foreign_vms(self) -> list[dict]:
        """VMs on this host that mtevm did not make (read-only VmSummary entries)."""
        return []


class RunningVm(abc.ABC):
    spec: VmSpec
    host: Host

    @property
    @abc.abstractmethod
    def state(self) -> str:
        """"running" or "crashed" (then ``stderr_tail`` says why)."""

    @abc.abstractmethod
    def vcpus(self) -> list[dict]:
        """VcpuInfo dicts (see docs/contracts.md), from the last sample."""

    @abc.abstractmethod
    async def sample(self) -> list[dict]:
        """Read fresh counters (the simulated vCPUs, or the guest's status block over QMP)."""

    @abc.abstractmethod
    def last_faults(self, limit: int = 20) -> list[dict]:
        """The most recent FaultInfo dicts, newest first."""

    @abc.abstractmethod
    async def blocked_reasons(self) -> list[str]:
        """``query-migrate``'s blocked-reasons, newest first; [] when migration is allowed."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Power off and release everything (QMP quit, then SIGTERM, then SIGKILL for QEMU)."""

    @abc.abstractmethod
    async def migrate_to(self, dst: Host, spec: VmSpec, with_tags: bool,
                         progress: ProgressCallback) -> "RunningVm":
        """Migrate to ``dst`` (a VM with ``spec`` is started there); return the destination VM.

        Raises MigrationError with the blocker's own text when blocked. On success this VM is
        stopped; on failure it keeps running.
        """

    async def refusal_text(self, dst: Host, reasons: list[str]) -> str:
        """The refusal to show when ``blocked_reasons`` is not empty (libvirt: libvirt's own text)."""
        return reasons[0]

    def set_tcf(self, vcpu: int | None, tcf: str) -> None:
        """Change the TCF mode of one vCPU (or all). Hosts that cannot do it live raise StateError."""
        from backend.errors import StateError
        raise StateError(f"host {self.host.name} cannot change TCF of a running VM")

    def tag_memory(self) -> dict | None:
        """{"bytes": n, "tagged_pages": n} for VMs whose tags mtevm can see, else None."""
        return None

    def runtime_info(self) -> dict:
        """What a later daemon needs to reattach (pid, QMP socket); {} if nothing survives."""
        return {}

    def stderr_tail(self) -> list[str]:
        return []
