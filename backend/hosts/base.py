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


@dataclass
class Recovery:
    """What Host.recover found: the adopted VM (or None) and what happened to the others."""

    vm: "RunningVm | None"
    stopped: list[int] = field(default_factory=list)   # pids of the processes it stopped
    moved: bool = False      # the adopted VM is not the saved one: a migration had completed
    others: bool = False     # more than one process was found: a migration was under way
    reason: str | None = None   # why nothing was adopted, when something was found


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

    async def recover(self, spec: VmSpec, runtime: dict, *, want_running: bool) -> "Recovery":
        """At daemon start-up: what became of this VM (``runtime`` is what the last daemon saved).
        Adopt what really runs it if ``want_running``, else stop it. LocalHost asks QEMU and does
        both; the default only reattaches ``runtime`` (what runs is shown running, whatever the
        last daemon meant to do: the user can stop it again)."""
        return Recovery(await self.reattach(spec, runtime) if runtime else None)

    async def reap(self) -> list[int]:
        """After start-up reconciliation: stop what this host launched that no VM adopted; pids."""
        return []

    def forget(self, spec: VmSpec) -> None:
        """The VM was deleted: remove what the host kept for it (runtime files, logs)."""

    def can_migrate_to(self, dst: "Host") -> str | None:
        """None if VMs of this host can migrate to ``dst``, else the reason."""
        if dst.kind != self.kind:
            return f"cannot migrate from a {self.kind} host to a {dst.kind} host"
        return None

    async def vm_migration_refusal(self, spec: "VmSpec") -> str | None:
        """Why this one VM cannot migrate to any host now, though its host could (None: nothing of
        its own stops it). libvirt: a domain that has snapshots."""
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

    # -- everyday operations (pause, snapshots, clone; issue 12) ----------------------------------
    def snapshot_refusal(self) -> str | None:
        """None if this host keeps VM snapshots (the VM's whole state, tags included), else why not."""
        return f"host {self.name} is {self.kind}: it keeps no VM snapshots (only local QEMU VMs have them)"

    # Where snapshots live: False = files in mtevm's state dir, written by ``RunningVm.save_state``
    # and loaded by ``restore`` (local QEMU); True = the host keeps them itself (libvirt's domain
    # snapshots: virsh sees the same ones) through the four methods below. Snapshot dicts are the
    # contract's ``Snapshot`` (docs/contracts.md).
    keeps_snapshots = False

    async def snapshots(self, spec: VmSpec) -> list[dict]:
        """The VM's snapshots as the host lists them (also those made without mtevm), oldest first."""
        raise _unsupported(self.snapshot_refusal() or f"host {self.name} keeps no snapshots")

    async def snapshot_save(self, vm: "RunningVm", tag: str, info: dict) -> dict:
        """Take snapshot ``tag`` of ``vm`` (``info``: what mtevm knows of it, counters included)."""
        raise _unsupported(self.snapshot_refusal() or f"host {self.name} keeps no snapshots")

    async def snapshot_revert(self, spec: VmSpec, tag: str, running: "RunningVm | None") -> "RunningVm":
        """Bring the VM back to ``tag`` (replacing ``running``, if any); the VM that runs now."""
        raise _unsupported(self.snapshot_refusal() or f"host {self.name} keeps no snapshots")

    async def snapshot_delete(self, spec: VmSpec, tag: str) -> None:
        raise _unsupported(self.snapshot_refusal() or f"host {self.name} keeps no snapshots")

    async def restore(self, spec: VmSpec, state_file: str, *, paused: bool) -> "RunningVm":
        """Boot ``spec`` from a state file that ``RunningVm.save_state`` wrote (running, or paused)."""
        raise _unsupported(self.snapshot_refusal() or f"host {self.name} cannot restore snapshots")

    def clone_storage(self, src: VmSpec, dst: VmSpec) -> list[str]:
        """Copy the disks of ``src`` for its clone ``dst``; returns the files made. The built-in guest
        has no disks: nothing to copy (hosts whose VMs have disk images override this)."""
        return []

    # -- the disks' part of a snapshot (qcow2 internal snapshots, backend/hosts/disk_snapshots.py).
    # -- ``running`` is the VM's RunningVm while a QEMU has the disks open, else None.
    def disk_snapshot_refusal(self, spec: VmSpec) -> str | None:
        """None if every disk of ``spec`` can keep its part of a snapshot (or it has none), else why not."""
        return f"host {self.name} cannot snapshot a VM's disks" if spec.guest.disks else None

    async def snapshot_disks(self, spec: VmSpec, tag: str, running: "RunningVm") -> list[dict]:
        """Snapshot every disk as ``tag``, all or none, the vCPUs stopped; the disks' records
        (``{"path", "format", "snapshot": identity}``) for the snapshot's description."""
        raise _unsupported(self.disk_snapshot_refusal(spec) or f"host {self.name} cannot snapshot disks")

    async def disk_inventory(self, spec: VmSpec, running: "RunningVm | None") -> dict[str, dict]:
        """Each disk's ``{"format", "snapshots": [..], "error"}`` as it is now."""
        return {}

    async def revert_disks(self, spec: VmSpec, saved: list[dict], tag: str) -> None:
        """With no QEMU running: every disk in ``saved`` back to snapshot ``tag``, or none (StateError why)."""
        raise _unsupported(f"host {self.name} cannot revert disks")

    async def delete_disk_snapshots(self, spec: VmSpec, saved: list[dict], tag: str,
                                    running: "RunningVm | None") -> None:
        """Remove snapshot ``tag`` from the disks of ``saved`` (the snapshot's disk records): only the
        very snapshot mtevm took; a disk that lost it or has another of that name is left as it is."""
        raise _unsupported(f"host {self.name} cannot delete disk snapshots")


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

    # -- everyday operations (issue 12). A host that cannot do one raises StateError saying why;
    # -- the Service checks the VM's state before calling any of them.
    paused: bool = False     # vCPUs stopped (QMP ``stop``); the Service shows the VM as "paused"
    stop_call = "QMP quit"   # how ``stop`` powers the VM off, as the shutdown fallback names it

    async def pause(self) -> None:
        """Stop the vCPUs; counters hold still until ``resume``."""
        raise _unsupported(f"host {self.host.name} cannot pause a VM")

    async def resume(self) -> None:
        raise _unsupported(f"host {self.host.name} cannot resume a VM")

    async def refresh_run_state(self) -> None:
        """Re-read running/paused from the VM (a monitor command may have changed it)."""

    async def reset(self) -> None:
        """A hard reset (QMP ``system_reset``): the guest boots again, counters begin again."""
        raise _unsupported(f"host {self.host.name} cannot reset a VM")

    async def guest_power(self, action: str, timeout: float) -> bool:
        """Ask the guest's own agent for a clean ``"reboot"`` or ``"poweroff"``.

        The hook for guests with an agent (Linux guests, docs/agent-protocol.md): return True once
        the guest has done it within ``timeout`` (for poweroff: QEMU has exited, and the VM was
        marked as stopping so the exit is no crash); False when the guest has no agent or it did not
        answer, and the Service falls back to ``reset`` / ``stop`` and says so. mtevm's built-in
        bare-metal guest has no agent.
        """
        return False

    async def cancel_migration(self) -> None:
        """Cancel this VM's outgoing migration (QMP ``migrate_cancel``): the VM keeps running here."""
        raise _unsupported(f"host {self.host.name} cannot cancel a migration")

    async def monitor(self, command: str, *, hmp: bool):
        """Pass one HMP command line, or one QMP command object as JSON text (``{"execute": ...,
        "arguments": ...}``), to the VM's QEMU; return QEMU's reply (HMP: text; QMP: the reply
        object, or its JSON text)."""
        raise _unsupported(f"host {self.host.name} runs no QEMU: it has no monitor")

    async def save_state(self, state_file: str, progress: ProgressCallback | None = None) -> dict:
        """Write the VM's whole state (RAM, tags, devices, vCPUs) to ``state_file``; the VM goes on as
        it was (running or paused). Returns figures (bytes, time)."""
        raise _unsupported(self.host.snapshot_refusal() or f"host {self.host.name} cannot save a VM's state")


def snapshot_exists_text(vm: str, tag: str) -> str:
    """The refusal of a snapshot tag a VM already has (the same words from every host kind)."""
    return f"VM {vm!r} already has a snapshot {tag!r}: delete it first or use another tag"


def _unsupported(message: str):
    from backend.errors import StateError
    return StateError(message)
