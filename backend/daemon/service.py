"""The Service: everything the daemon does, independent of how clients reach it.

It owns the hosts (backend.hosts registry), the VMs (stored definitions plus the RunningVm a host
returned), the store, the event bus and the migrations. The socket server (backend.daemon.server)
and the in-process client transport (backend.client) both call these methods, so every front end
sees exactly the same behaviour and errors.

Two deliberate departures from QEMU live below this layer (backend.machine) and show up here:
MTE's enable-once state is per VM, not process-wide statics, and a failed enable is a per-VM
RealizeError (the VM stays stopped with ``last_error``), where QEMU would abort the whole process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from backend.daemon.events import HEARTBEAT_PERIOD, EventBus, check_event_rate
from backend.daemon.operations import Operation, claim
from backend.daemon.guest_ops import GuestOps, guest_detail, parse_guest, remove_console_log
from backend.guests.definition import GuestConfig
from backend.daemon.vm_operations import VmOperations
from backend.errors import ConfigError, MigrationError, MtevmError, NotFoundError, StateError, StoreError
from backend.hosts import DEFAULT_HOST, HOST_NAMES, create_hosts, create_libvirt_host
from backend.hosts.base import Host, RunningVm, VmSpec
from backend.hosts.workload import TCF_NAMES, WorkloadConfig
from backend.machine import MTE_MIGRATION_BLOCKER, VirtMachineConfig
from backend.paths import Paths
from backend.store import Store, VmRow

log = logging.getLogger("mtevm.daemon")

CONFIG_KEYS = ("name", "host", "accel", "cpu", "vcpus", "memory", "mte", "secure", "only_migratable", "workload",
               "qemu_args", "guest", "allow_host_files")
ACTIVE_STATES = ("starting", "running", "stopping", "migrating", "paused")
SAMPLE_PERIOD = 1.0          # background sampling: keeps faults/s fresh and notices crashed VMs
RATE_WINDOW = 0.5            # faults/s is computed over at least this many seconds
PROGRESS_EVENT_PERIOD = 0.05  # at most 20 progress events per second per migration
HOST_ADD_WAIT = 30.0         # host add waits this long for the first connection (libvirt probes QEMU)

COUNTER_KEYS = ("checked", "unchecked", "sync_faults", "async_faults")
ROUND_SLICE = 8              # counters events per client between two turns of the event loop
KEEP = object()              # _set_state: keep the record's last_error


def _default_accel(host: Host) -> str:
    """KVM on the simulated arm64 hosts (that is what they simulate); TCG on the real machine."""
    return "kvm" if host.kind == "simulated" else "tcg"


@dataclass
class FaultRate:
    """Faults per second from successive counter samples."""

    t0: float = 0.0
    total0: int = -1
    value: float = 0.0

    def update(self, t: float, total: int) -> None:
        if self.total0 < 0 or total < self.total0:
            self.t0, self.total0 = t, total
            return
        if t - self.t0 >= RATE_WINDOW:
            self.value = (total - self.total0) / (t - self.t0)
            self.t0, self.total0 = t, total

    def reset(self) -> None:
        self.t0, self.total0, self.value = 0.0, -1, 0.0


@dataclass
class VmRecord:
    """One VM as the daemon knows it: its definition, its state and, when running, its RunningVm."""

    name: str
    host: str
    config: VirtMachineConfig
    workload: WorkloadConfig
    state: str = "stopped"
    last_error: str | None = None
    pending: dict = field(default_factory=dict)
    running: RunningVm | None = None
    stderr: list[str] = field(default_factory=list)
    rate: FaultRate = field(default_factory=FaultRate)
    qemu_args: list[str] = field(default_factory=list)   # extra QEMU arguments (local host only)
    guest: GuestConfig = field(default_factory=GuestConfig)   # what it boots (local host only)
    allow_host_files: bool = False   # qemu_args may name host files (create --allow-host-files)
    operation: Operation | None = None   # the one operation running on this VM (backend.daemon.operations)


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"a VM name must be a string, not {type(name).__name__}")
    return name


def _check_bool(what: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    return value


def _stopped_vcpus(rec: VmRecord) -> list[dict]:
    """VcpuInfo for a VM that is not running: its configured TCF and zero counters."""
    return [{"index": i, "kvm_mte": False, "tcf": rec.workload.tcf_for(i), **{k: 0 for k in COUNTER_KEYS},
             "last_fault": None} for i in range(rec.config.vcpus)]


class Service(GuestOps, VmOperations):
    """The daemon's brain. Create it, ``await open()``, call the API methods, ``await close()``.
    The everyday operations (pause, snapshots, edit, ...) are in backend.daemon.vm_operations."""

    def __init__(self, paths: Paths, hosts: dict[str, Host] | None = None):
        self.paths = paths
        self._hosts_override = hosts
        self.hosts: dict[str, Host] = {}
        self.vms: dict[str, VmRecord] = {}
        self.bus = EventBus()
        self.store: Store | None = None
        self._migrations: dict[int, dict] = {}
        self._cancel_requested: set[int] = set()     # migration ids the user cancelled
        self._tasks: set[asyncio.Task] = set()
        self._sampler: asyncio.Task | None = None
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the store, build the hosts and reconcile stored state with what is really running."""
        self.paths.ensure_state_dir()
        self.store = Store(self.paths.store)
        try:
            self.hosts = self._hosts_override or create_hosts(self.paths.vm_runtime_root)
            for h in self.store.load_hosts():
                await self._open_host(create_libvirt_host(h["name"], h["uri"]))
            cut_short: dict[str, dict] = {}     # VM -> its migration the last daemon did not see end
            for m in self.store.load_migrations():   # newest first
                self._migrations[m["id"]] = m
                if m["state"] in ("setup", "active"):
                    cut_short.setdefault(m["vm"], m)
            for row in self.store.load_vms():
                await self._load_vm(row, cut_short.pop(row.name, None))
            for m in self._migrations.values():
                if m["state"] in ("setup", "active"):
                    self._update_migration(m, state="failed", reason="the daemon stopped during the migration",
                                           finished=time.time())
            for host in self.hosts.values():
                for pid in await host.reap():
                    log.warning("host %s: stopped QEMU pid %d, which no VM owns any more", host.name, pid)
        except BaseException:
            self.store.close()
            raise
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _load_vm(self, row: VmRow, migration: dict | None) -> None:
        try:
            config = VirtMachineConfig.from_dict(row.config)
            workload = WorkloadConfig.from_dict(row.workload)
            guest = GuestConfig.from_dict(row.guest)
        except (MtevmError, TypeError, ValueError) as e:
            log.error("VM %s: stored definition is not valid any more (%s); it is kept in the store "
                      "but not shown", row.name, e)
            return
        rec = VmRecord(row.name, row.host, config, workload, "stopped", row.last_error, dict(row.pending),
                       qemu_args=list(row.qemu_args), guest=guest, allow_host_files=row.allow_host_files)
        self.vms[rec.name] = rec
        host = self.hosts.get(row.host)
        if host is None or host.kind == "simulated":
            # Simulated VMs lived inside the previous daemon: they stopped with it.
            if row.state != "stopped" or row.runtime:
                self._note_state(rec, row.state if row.state == "crashed" else "stopped", runtime={})
            return
        await self._recover(rec, host, row, migration)

    async def _recover(self, rec: VmRecord, host: Host, row: VmRow, migration: dict | None) -> None:
        """Make the VM what QEMU says it is. The store holds the last daemon's intent ("starting",
        "running", "stopping", ...) and runtime; the host finds every QEMU of the VM and adopts the
        one that really runs it (a start or migration the last daemon did not live to finish) or
        stops them all (a stop it did not finish, or a stopped VM). A cut-short migration's record
        gets its real outcome: completed if the VM now runs on the destination QEMU."""
        want_running = row.state in ACTIVE_STATES and row.state != "stopping"
        try:
            found = await host.recover(self._spec(rec), row.runtime, want_running=want_running)
        except Exception as e:   # a recovery that fails must not stop the daemon from starting
            log.exception("VM %s: recovery failed", rec.name)
            found, error = None, f"reattach failed: {e}"
        else:
            error = found.reason
        if found and found.stopped:
            log.warning("VM %s: stopped QEMU pid(s) %s that no longer ran it", rec.name,
                        ", ".join(map(str, found.stopped)))
        if migration is not None:
            self._settle_migration(rec, migration, found)
        if found is not None and found.vm is not None and found.vm.state == "running":
            rec.running = found.vm
            self._note_state(rec, "paused" if found.vm.paused else "running", runtime=found.vm.runtime_info())
            log.info("VM %s: %s", rec.name, "adopted" if row.state != "running" else "reattached")
        elif want_running and row.state != "starting" and (row.runtime or error):
            self._note_state(rec, "crashed", runtime={},
                             last_error=error or "the VM was gone when the daemon restarted")
        elif row.state != "stopped" or row.runtime:
            self._note_state(rec, "crashed" if row.state == "crashed" else "stopped", runtime={},
                             last_error=error if row.state == "starting" else KEEP)

    def _settle_migration(self, rec: VmRecord, m: dict, found) -> None:
        """The real outcome of a migration the last daemon did not see end, from what QEMU said."""
        if found is not None and found.vm is not None and found.moved:
            self._update_migration(m, state="completed", progress=1.0, finished=time.time(),
                                   reason="completed while no daemon watched it (found by the next daemon)")
            if m["dst"] != rec.host and m["dst"] in self.hosts:
                rec.host = m["dst"]
                try:
                    self.store.update_vm(rec.name, host=rec.host)
                except StoreError as e:
                    log.error("VM %s: %s", rec.name, e)
            return
        where = "the VM runs on its source" if found is not None and found.vm is not None else "the VM is not running"
        self._update_migration(m, state="failed", finished=time.time(),
                               reason=f"the daemon stopped during the migration, which QEMU had not "
                                      f"completed; {where}")

    async def close(self) -> None:
        """Stop cleanly: simulated VMs stop and are saved as stopped; real QEMU VMs keep running
        and their runtime info is saved so the next daemon reattaches them."""
        if self._closed:
            return
        self._closed = True
        self.bus.close()
        tasks = [t for t in self._tasks] + ([self._sampler] if self._sampler else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rec in self.vms.values():
            if rec.running is None:
                continue
            host = self.hosts[rec.host]
            if host.kind == "simulated":
                try:
                    await rec.running.stop()
                except Exception:
                    log.exception("VM %s: stop failed", rec.name)
                rec.running = None
                self._note_state(rec, "stopped", runtime={})
            else:
                self._note_state(rec, rec.state, runtime=rec.running.runtime_info())
        for host in self.hosts.values():
            try:
                await host.close()
            except Exception:
                log.exception("host %s: close failed", host.name)
        self.store.close()

    # -- lookups and shapes -----------------------------------------------------------------------
    def _vm(self, name) -> VmRecord:
        rec = self.vms.get(_check_name(name))
        if rec is None:
            foreign = self._foreign(name)
            if foreign is not None:
                raise StateError(f"{name} is a libvirt domain mtevm did not make: it is shown read-only "
                                 f"(manage it with virsh -c {self.hosts[foreign['host']].uri})")
            raise NotFoundError(f"no VM named {name!r}")
        return rec

    def _host(self, name) -> Host:
        if not isinstance(name, str) or name not in self.hosts:
            raise NotFoundError(f"unknown host {name!r} (hosts: {', '.join(self.hosts)})")
        return self.hosts[name]

    def _spec(self, rec: VmRecord) -> VmSpec:
        return VmSpec(rec.config, rec.workload, os.path.join(self.paths.vm_runtime_root, rec.name),
                      extra_args=list(rec.qemu_args), guest=rec.guest, log_dir=self._log_dir(rec.name),
                      allow_host_files=rec.allow_host_files)

    def _log_dir(self, name: str) -> str:
        """A VM's console log lives in the state dir: it outlives the VM, the daemon and a reboot."""
        return os.path.join(self.paths.state_dir, "vms", name)

    def _vcpus(self, rec: VmRecord) -> list[dict]:
        return rec.running.vcpus() if rec.running is not None else _stopped_vcpus(rec)

    def _summary(self, rec: VmRecord) -> dict:
        c = rec.config
        host = self.hosts.get(rec.host)
        state = host.shown_state(rec.state) if host is not None else rec.state
        return {"name": rec.name, "host": rec.host, "state": state, "accel": c.accel, "cpu": c.cpu,
                "vcpus": c.vcpus, "memory": c.memory, "mte": c.mte,
                "faults_per_s": round(rec.rate.value, 3) if rec.running else 0.0,
                "pending": dict(rec.pending), "last_error": rec.last_error}

    async def _detail(self, rec: VmRecord) -> dict:
        c = rec.config
        running = rec.running
        return {**self._summary(rec),
                "config": {"accel": c.accel, "cpu": c.cpu, "vcpus": c.vcpus, "memory": c.memory, "mte": c.mte,
                           "secure": c.secure, "only_migratable": c.only_migratable},
                "workload": rec.workload.to_dict(),
                "qemu_args": list(rec.qemu_args),
                "allow_host_files": rec.allow_host_files,
                "vcpus": self._vcpus(rec),
                "blocked_reasons": list(await running.blocked_reasons()) if running else [],
                "last_faults": running.last_faults() if running else [],
                "tag_memory": running.tag_memory() if running else None,
                "stderr": running.stderr_tail() if running else list(rec.stderr),
                "migration_targets": await self._migration_targets(rec),
                "warnings": self._start_warnings(rec.host, self._next_config(rec)),
                **guest_detail(rec.guest, running)}

    def _next_config(self, rec: VmRecord) -> VirtMachineConfig:
        """The definition the VM's next start realizes: its config with any pending change applied."""
        return self._pending_applied(rec).get("config", rec.config)

    def _start_warnings(self, host_name: str, config: VirtMachineConfig) -> list[str]:
        """Why ``config`` can never start on ``host_name``: the host's dry run of the seed's decision
        tree (QEMU's text), [] if it can. The one rule behind create, validate_only and every VmDetail,
        so the forms and the CLI warn alike."""
        try:
            self.hosts[host_name].check_config(config)
        except MtevmError as e:
            return [str(e)]
        return []

    async def _migration_targets(self, rec: VmRecord) -> dict[str, str | None]:
        """Each host -> None if this VM's host can migrate to it, else why not (the rule migrate()
        applies, and what of the VM's own stops it now, e.g. a libvirt domain's snapshots): front
        ends offer only possible targets and grey out the others with the reason."""
        src = self.hosts[rec.host]
        targets = {name: src.can_migrate_to(dst) for name, dst in self.hosts.items()}
        if None in targets.values():
            own = await src.vm_migration_refusal(self._spec(rec))
            targets = {name: reason or own for name, reason in targets.items()}
        return targets

    def _set_state(self, rec: VmRecord, state: str, *, persist: bool = True, runtime: dict | None = None,
                   last_error=KEEP, **definition) -> None:
        """Write-then-apply: the store first (StoreWriteError: memory untouched, nothing changed),
        then memory and the event. ``definition`` (config=, pending=) is written in the same
        transaction and applied to the record with the state."""
        error = rec.last_error if last_error is KEEP else last_error
        if persist:
            self.store.set_state(rec.name, state, error, runtime=runtime,
                                 **{k: v.to_dict() if k in ("config", "workload") else v
                                    for k, v in definition.items()})
        self._apply_state(rec, state, error, definition)

    def _note_state(self, rec: VmRecord, state: str, *, runtime: dict | None = None, last_error=KEEP,
                    **definition) -> None:
        """Record what already happened (a QEMU stopped, crashed or migrated): memory follows the
        truth even if the store cannot be written then; the next daemon reconciles the store from
        what really runs (see _load_vm), so a failed write here is logged, not raised."""
        error = rec.last_error if last_error is KEEP else last_error
        try:
            self.store.set_state(rec.name, state, error, runtime=runtime, **definition)
        except StoreError as e:
            log.error("VM %s: %s (it is %s)", rec.name, e, state)
        self._apply_state(rec, state, error, definition)

    def _apply_state(self, rec: VmRecord, state: str, error, definition: dict) -> None:
        rec.state, rec.last_error = state, error
        for key, value in definition.items():
            setattr(rec, key, value)
        self.bus.publish("vm", vm=self._summary(rec))

    # -- hosts ------------------------------------------------------------------------------------
    async def hosts_info(self) -> list[dict]:
        return [await asyncio.to_thread(h.info) for h in self.hosts.values()]

    async def probe(self, host: str | None = None) -> list[dict]:
        hosts = list(self.hosts.values()) if host is None else [self._host(host)]
        return [await asyncio.to_thread(h.probe) for h in hosts]

    async def _open_host(self, host: Host) -> None:
        """Add a host that keeps a connection (libvirt): it connects in the background."""
        self.hosts[host.name] = host
        await host.open(self._host_event)

    def _host_event(self, type_: str, **payload) -> None:
        """A host's event; when its connection changes, its VMs' shown states change too. A
        ``domain`` event (libvirt: a VM paused, resumed or stopped outside mtevm) updates that VM."""
        if type_ == "domain":
            self._follow_domain(payload["host"], payload["vm"])     # backend/daemon/vm_operations.py
            return
        self.bus.publish(type_, **payload)
        name = (payload.get("host") or {}).get("name")
        for rec in list(self.vms.values()):
            if rec.host == name:
                self.bus.publish("vm", vm=self._summary(rec))

    async def host_add(self, name: str, uri: str) -> dict:
        """Add a libvirt host by URI; persisted. Waits for the first connection attempt (a host
        that is down is still added, and shows why it is unreachable)."""
        if isinstance(name, str) and name in self.hosts:
            raise ConfigError(f"a host named {name!r} already exists")
        host = create_libvirt_host(name, uri)      # checks name and URI (ConfigError)
        from backend.hosts.libvirt import load_libvirt
        load_libvirt()                              # without libvirt-python: say what to install
        self.store.add_host(host.name, host.kind, host.uri)
        await self._open_host(host)
        await host.wait_connected(HOST_ADD_WAIT)
        self.bus.publish("host", host=host.info())
        return host.info()

    async def host_remove(self, name: str) -> None:
        host = self._host(name)
        if host.kind != "libvirt":
            raise ConfigError(f"host {name!r} is built in: only hosts added with 'mtevm host add' can be removed")
        vms = sorted(r.name for r in self.vms.values() if r.host == name)
        if vms:
            raise StateError(f"host {name!r} has VMs defined by mtevm ({', '.join(vms)}): delete or migrate them first")
        self.store.delete_host(name)
        del self.hosts[name]
        await host.close()
        self.bus.publish("host", removed=name)

    # -- VM definitions ---------------------------------------------------------------------------
    async def list(self) -> list[dict]:
        return [self._summary(rec) for rec in self.vms.values()] + self._foreign_vms()

    def _foreign_vms(self) -> list[dict]:
        """Domains on libvirt hosts that mtevm did not make: listed, read-only."""
        return [vm for h in self.hosts.values() for vm in h.foreign_vms()]

    def _foreign(self, name) -> dict | None:
        return next((vm for vm in self._foreign_vms() if vm["name"] == name), None)

    async def show(self, name: str) -> dict:
        foreign = self._foreign(name) if _check_name(name) not in self.vms else None
        if foreign is not None:
            return {**foreign, "config": {k: foreign[k] for k in ("accel", "cpu", "vcpus", "memory", "mte")}
                    | {"secure": False, "only_migratable": False}, "workload": {}, "qemu_args": [],
                    "allow_host_files": False, "vcpus": [],
                    "blocked_reasons": [], "last_faults": [], "tag_memory": None, "stderr": []}
        return await self._detail(self._vm(name))

    def _parse_definition(self, config) -> tuple[str, VirtMachineConfig, WorkloadConfig, list[str], bool]:
        """A create() request -> (host name, machine config, workload, qemu_args, allow_host_files), with
        the documented defaults. qemu_args are checked by the host: only ``local`` runs a QEMU to pass
        them to, and only with allow_host_files may they name host files."""
        if not isinstance(config, dict):
            raise ConfigError(f"a VM definition must be a JSON object, not {type(config).__name__}")
        unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"unknown VM setting(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})")
        host_name = config.get("host", DEFAULT_HOST)
        if host_name is None:
            host_name = DEFAULT_HOST
        self._host(host_name)      # an unknown host: the same NotFoundError as migrate --to and probe --host
        allow_host_files = _check_bool("allow_host_files", config.get("allow_host_files", False))
        qemu_args = self.hosts[host_name].check_extra_args(config.get("qemu_args"), allow_host_files=allow_host_files)
        machine = {k: v for k, v in config.items()
                   if k not in ("host", "workload", "qemu_args", "guest", "allow_host_files") and v is not None}
        machine.setdefault("accel", _default_accel(self.hosts[host_name]))
        machine.setdefault("cpu", "host" if machine["accel"] == "kvm" else "max")
        try:
            vm_config = VirtMachineConfig.from_dict(machine)  # validates, with the machine's own messages
            workload = WorkloadConfig.from_dict(config.get("workload"))
        except MtevmError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise ConfigError(f"invalid VM definition: {e}") from None
        self.hosts[host_name].check_limits(vm_config, workload)   # what this host can honour, before anything runs
        return host_name, vm_config, workload, qemu_args, allow_host_files

    async def create(self, config: dict, validate_only: bool = False, existing: bool = False) -> dict:
        """Store a new definition (VmDetail, with ``warnings``), or with ``validate_only`` only check it:
        ``{"ok", "error", "warnings"}``. ``error``: the definition is malformed (nothing is stored).
        ``warnings``: it is well formed but can never start on its host, with QEMU's text from the
        seed's decision tree (dry run); such a definition is accepted, since the user may move it.
        ``existing`` (with validate_only): check it as the new definition of that existing VM (the
        edit form), not as a new one."""
        _check_bool("validate_only", validate_only)
        _check_bool("existing", existing)
        if existing and not validate_only:
            raise ConfigError("existing applies to validate_only: change a VM with its own operations")
        if validate_only:
            try:
                host_name, vm_config, *_ = self._parse_definition(config)
                await asyncio.to_thread(parse_guest, config.get("guest"), self.hosts[host_name])
                if existing:
                    self._vm(vm_config.name)
                elif vm_config.name in self.vms:
                    raise ConfigError(f"a VM named {vm_config.name!r} already exists")
            except MtevmError as e:
                return {"ok": False, "error": str(e), "warnings": []}
            return {"ok": True, "error": None, "warnings": self._start_warnings(host_name, vm_config)}
        host_name, vm_config, workload, qemu_args, allow_host_files = self._parse_definition(config)
        guest = await asyncio.to_thread(parse_guest, config.get("guest"), self.hosts[host_name])
        if vm_config.name in self.vms:
            raise ConfigError(f"a VM named {vm_config.name!r} already exists")
        rec = VmRecord(vm_config.name, host_name, vm_config, workload, qemu_args=qemu_args, guest=guest,
                       allow_host_files=allow_host_files)
        host = self.hosts[host_name]
        await host.define(self._spec(rec))      # libvirt: the persistent domain (checked first)
        try:
            self.store.add_vm(VmRow(rec.name, host_name, vm_config.to_dict(), workload.to_dict(), qemu_args=qemu_args,
                                    guest=guest.to_dict(), allow_host_files=allow_host_files))
        except BaseException:
            await host.undefine(rec.name)
            raise
        remove_console_log(self._log_dir(rec.name))   # an older VM of that name left its log
        self.vms[rec.name] = rec
        self.bus.publish("vm", vm=self._summary(rec))
        return await self._detail(rec)

    async def delete(self, name: str) -> None:
        rec = self._vm(name)
        with claim(rec, "being deleted"):
            if rec.state not in ("stopped", "crashed"):
                raise StateError(f"VM {rec.name!r} is {rec.state}: stop it first")
            await self.hosts[rec.host].undefine(rec.name)    # libvirt: undefine the domain
            self.store.delete_vm(rec.name)
            del self.vms[rec.name]
            remove_console_log(self._log_dir(rec.name))
            await self._delete_snapshots(rec)      # its snapshots (and their parts in its disks) go with it
            host = self.hosts.get(rec.host)
            if host is not None:
                host.forget(self._spec(rec))     # its runtime directory and QEMU logs go with it
            self.bus.publish("vm", deleted=rec.name)

    # -- running ----------------------------------------------------------------------------------
    async def start(self, name: str) -> dict:
        rec = self._vm(name)
        with claim(rec, "starting"):
            return await self._start(rec)

    async def _start(self, rec: VmRecord) -> dict:
        if rec.state not in ("stopped", "crashed"):
            raise StateError(f"VM {rec.name!r} is {rec.state}")
        # The intent is stored before QEMU exists ("starting", with the pending changes applied: they
        # become the definition at start even if the start then fails, as a change made while stopped
        # would have), so a daemon killed during the launch is followed by one that adopts or stops it.
        self._set_state(rec, "starting", runtime={}, **self._pending_applied(rec))
        rec.stderr = []
        host = self.hosts[rec.host]
        try:
            running = await host.start(self._spec(rec))
        except BaseException as e:
            error = str(e) if isinstance(e, MtevmError) else f"start failed: {e!r}"
            self._note_state(rec, "stopped", runtime={}, last_error=error)
            if isinstance(e, MtevmError) or not isinstance(e, Exception):
                raise
            log.exception("VM %s: start failed", rec.name)
            raise MtevmError(error) from e
        try:
            self._set_state(rec, "running", runtime=running.runtime_info(), last_error=None)
        except StoreError:
            await running.stop()     # the store cannot say it runs: it must not run
            self._note_state(rec, "stopped", runtime={})
            raise
        rec.running = running
        rec.rate.reset()
        log.info("VM %s: started on %s", rec.name, rec.host)
        return await self._detail(rec)

    def _pending_applied(self, rec: VmRecord) -> dict:
        """The definition with the pending changes applied ({} when none): config=, pending= (and
        workload=, qemu_args= when those are pending: see backend.daemon.vm_operations.edit)."""
        if not rec.pending:
            return {}
        pending = dict(rec.pending)
        workload, qemu_args = pending.pop("workload", None), pending.pop("qemu_args", None)
        d = rec.config.to_dict()
        d.update(pending)
        applied = {"config": VirtMachineConfig.from_dict(d), "pending": {}}
        if workload:
            applied["workload"] = WorkloadConfig.from_dict({**rec.workload.to_dict(), **workload})
        if qemu_args is not None:
            applied["qemu_args"] = list(qemu_args)
        return applied

    async def stop(self, name: str) -> dict:
        rec = self._vm(name)
        with claim(rec, "stopping"):
            return await self._stop(rec)

    async def _stop(self, rec: VmRecord) -> dict:
        if rec.state not in ("running", "paused"):
            raise StateError(f"VM {rec.name!r} is {rec.state}, not running")
        # Intent first ("stopping", the runtime kept): a daemon killed now is followed by one that
        # finishes the stop. A store that cannot be written refuses the stop: nothing changed.
        self._set_state(rec, "stopping", runtime=rec.running.runtime_info())
        running, rec.running = rec.running, None
        try:
            await running.stop()
        except MtevmError:
            if running.state == "running":
                # The host could not power it off (a libvirt host that is unreachable): it still runs.
                rec.running = running
                self._note_state(rec, "running", runtime=running.runtime_info())
            raise
        finally:
            if rec.running is None:
                rec.rate.reset()
                self._note_state(rec, "stopped", runtime={})
                log.info("VM %s: stopped", rec.name)
        return await self._detail(rec)

    async def set_mte(self, name: str, on: bool) -> dict:
        rec = self._vm(name)
        _check_bool("on", on)
        if rec.state in ("stopped", "crashed"):
            d = rec.config.to_dict()
            d["mte"] = on
            config = VirtMachineConfig.from_dict(d)
            config.validate()
            spec = self._spec(rec)
            spec.config = config
            await self.hosts[rec.host].define(spec)   # libvirt: the domain follows the definition
            self.store.update_vm(rec.name, config=config.to_dict(), pending={})
            rec.config, rec.pending = config, {}
        else:
            # A running machine cannot change its MTE setting (QEMU fixes it at machvirt_init): keep it
            # for the next start. Toggling back to the current value cancels the change.
            pending = {k: v for k, v in rec.pending.items() if k != "mte"}
            if on != rec.config.mte:
                pending["mte"] = on
            self.store.update_vm(rec.name, pending=pending)
            rec.pending = pending
        self.bus.publish("vm", vm=self._summary(rec))
        return await self._detail(rec)

    async def set_tcf(self, name: str, vcpu: int | None, tcf: str) -> dict:
        rec = self._vm(name)
        if vcpu is not None and (not isinstance(vcpu, int) or isinstance(vcpu, bool)
                                 or not 0 <= vcpu < rec.config.vcpus):
            raise ConfigError(f"VM {rec.name!r} has no vCPU {vcpu!r}: give a vCPU index 0..{rec.config.vcpus - 1}, "
                              "or no vCPU to set all of them")
        if tcf not in TCF_NAMES:
            raise ConfigError(f"tcf {tcf!r} is not one of {', '.join(TCF_NAMES)}")
        if vcpu is None:
            modes = [tcf]
        else:
            modes = [rec.workload.tcf_for(i) for i in range(rec.config.vcpus)]
            modes[vcpu] = tcf
        with claim(rec, "changing its TCF"):
            before = [rec.workload.tcf_for(i) for i in range(rec.config.vcpus)]
            if rec.running is not None:
                rec.running.set_tcf(vcpu, tcf)      # refuses (StateError) before anything changes
            try:
                self.store.update_vm(rec.name, workload={**rec.workload.to_dict(), "tcf": modes})
            except StoreError:
                if rec.running is not None:          # roll the live change back
                    for i, mode in enumerate(before):
                        rec.running.set_tcf(i, mode)
                raise
            rec.workload.tcf = modes
        self.bus.publish("vm", vm=self._summary(rec))
        return await self._detail(rec)

    # -- counters ---------------------------------------------------------------------------------
    async def _sample(self, rec: VmRecord) -> list[dict]:
        """Fresh counters of a running VM; updates faults/s and notices a VM that died."""
        running = rec.running
        vcpus = await running.sample()
        total = sum(v["sync_faults"] + v["async_faults"] for v in vcpus)
        rec.rate.update(time.monotonic(), total)
        if running.state == "crashed" and rec.running is running and rec.state in ("running", "paused"):
            rec.stderr = running.stderr_tail()
            rec.running = None
            rec.rate.reset()
            self._note_state(rec, "crashed", runtime={},
                             last_error=rec.stderr[-1] if rec.stderr else "the VM stopped unexpectedly")
            try:
                await running.stop()
            except Exception:
                log.exception("VM %s: cleanup after crash failed", rec.name)
        return vcpus

    async def _fresh_vcpus(self, rec: VmRecord) -> list[dict]:
        """A running VM's counters sampled now; a stopped VM's zeros."""
        return await self._sample(rec) if rec.running else _stopped_vcpus(rec)

    async def vcpus(self, name: str) -> list[dict]:
        return await self._fresh_vcpus(self._vm(name))

    async def counters(self, name: str) -> dict:
        return await self._counters(self._vm(name))

    async def _counters(self, rec: VmRecord) -> dict:
        vcpus = await self._fresh_vcpus(rec)
        return {"name": rec.name, "time": time.time(),
                "vm": {k: sum(v[k] for v in vcpus) for k in COUNTER_KEYS}, "vcpus": vcpus}

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_PERIOD)
            for rec in list(self.vms.values()):
                if rec.running is not None and rec.state == "running":
                    try:
                        await self._sample(rec)
                    except Exception:
                        log.exception("VM %s: sampling failed", rec.name)

    def events(self, rate_hz: float = 4.0, vcpus: str = "all") -> AsyncIterator[dict]:
        """State changes and migration progress as they happen, plus a counters event per running
        VM every 1/rate_hz seconds. ``vcpus``: whose counters events carry the per-vCPU list
        ("all", "none": VM totals only, or a VM name). A bad argument raises here, before any iteration."""
        if not isinstance(vcpus, str) or not vcpus:
            raise ConfigError(f"vcpus must be \"all\", \"none\" or a VM name, not {vcpus!r}")
        return self._events(check_event_rate(rate_hz), vcpus)

    async def _events(self, rate_hz: float, vcpus: str = "all") -> AsyncIterator[dict]:
        """Counter samples are coalesced per VM for a slow client: when the client is ready for
        the next round, each VM's sample is taken then (the latest wins, nothing queues up), and
        carries ``skipped``: how many of this VM's ticks passed since its last delivered sample
        without one. Memory per client: one tick number per VM. A queued state/migration event
        that had to be dropped (queue full) is counted in the next one's ``skipped_events``."""
        q = self.bus.subscribe()
        period = 1.0 / rate_hz
        loop = asyncio.get_running_loop()
        start = next_tick = loop.time()
        last_sent = loop.time()
        delivered: dict[str, int] = {}          # VM name -> the tick of its last delivered sample
        try:
            while True:
                if loop.time() - last_sent >= HEARTBEAT_PERIOD:       # nothing else said for a while
                    last_sent = loop.time()
                    yield {"type": "heartbeat", "time": time.time()}
                timeout = min(next_tick, last_sent + HEARTBEAT_PERIOD) - loop.time()
                if timeout > 0:
                    try:
                        event = await asyncio.wait_for(q.get(), timeout)
                    except TimeoutError:
                        continue            # a tick or a heartbeat is due: decided above and below
                    if event is None:  # the service is closing
                        return
                    last_sent = loop.time()
                    dropped = self.bus.dropped(q)
                    yield {**event, "skipped_events": dropped} if dropped else event
                    continue
                now = loop.time()
                if now < next_tick:
                    continue                # the heartbeat was due, not the tick
                tick = int((now - start) / period)
                next_tick = start + (tick + 1) * period
                running = [rec for rec in list(self.vms.values())
                           if rec.running is not None and rec.state in ("running", "migrating", "paused")]
                for name in set(delivered) - {rec.name for rec in running}:
                    del delivered[name]
                for i, rec in enumerate(running):
                    if i and i % ROUND_SLICE == 0:
                        await asyncio.sleep(0)        # a round of 1,000 VMs must not hold up a list() call
                    try:
                        counters = await self._counters(rec)
                    except Exception:
                        log.exception("VM %s: sampling failed", rec.name)
                        continue
                    if vcpus != "all" and vcpus != rec.name:
                        del counters["vcpus"]          # VM totals only: a big fleet's list needs no more
                    skipped = max(0, tick - delivered.get(rec.name, tick - 1) - 1)
                    delivered[rec.name] = tick
                    last_sent = loop.time()
                    yield {"type": "counters", "time": counters["time"], "vm": rec.name, "counters": counters,
                           "skipped": skipped}
                    # a client that took longer than a tick to take this round: later VMs get a fresher tick
                    tick = max(tick, int((loop.time() - start) / period))
        finally:
            self.bus.unsubscribe(q)

    # -- migration --------------------------------------------------------------------------------
    async def migrations(self) -> list[dict]:
        return [dict(m) for m in sorted(self._migrations.values(), key=lambda m: -m["id"])]

    def _record_migration(self, rec: VmRecord, dst: str, with_tags: bool, state: str,
                          reason: str | None = None) -> dict:
        now = time.time()
        m = {"id": 0, "vm": rec.name, "src": rec.host, "dst": dst, "with_tags": with_tags, "state": state,
             "reason": reason, "progress": 0.0, "started": now,
             "finished": now if state in ("blocked", "failed") else None, "stats": {}}
        m["id"] = self.store.add_migration(m)    # write-then-apply: a refused write records nothing
        self._migrations[m["id"]] = m
        self.bus.publish("migration", migration=dict(m))
        return m

    def _update_migration(self, m: dict, **changes) -> None:
        """A migration's progress or outcome (a fact: memory follows it even if the store refuses)."""
        m.update(changes)
        try:
            self.store.update_migration(m)
        except StoreError as e:
            log.error("migration %d: %s (it is %s)", m["id"], e, m["state"])
        self.bus.publish("migration", migration=dict(m))

    async def migrate(self, name: str, to_host: str, with_tags: bool = False) -> dict:
        rec = self._vm(name)
        _check_bool("with_tags", with_tags)
        dst = self._host(to_host)
        op = claim(rec, "migrating")   # held until the migration task ends (released there)
        try:
            return await self._migrate(rec, dst, with_tags, op)
        except BaseException:
            op.release()
            raise

    async def _migrate(self, rec: VmRecord, dst: Host, with_tags: bool, op: Operation) -> dict:
        if rec.state != "running":
            raise StateError(f"VM {rec.name!r} is {rec.state}: only a running VM can be migrated")
        src = self.hosts[rec.host]
        # As libvirt does: ask for blocked-reasons first, so a refusal is reported (and recorded)
        # with QEMU's own text before anything moves. mtevm's opt-in tag migration (with_tags)
        # lifts the MTE blocker, and only that one (QEMU has no such option).
        reasons = [r for r in await rec.running.blocked_reasons()
                   if not (with_tags and r == MTE_MIGRATION_BLOCKER)]
        refusal = await rec.running.refusal_text(dst, reasons) if reasons else src.can_migrate_to(dst)
        if refusal:
            try:
                self._record_migration(rec, dst.name, with_tags, "blocked" if reasons else "failed", refusal)
            except StoreError as e:   # the refusal is what the user needs to read
                log.error("VM %s: refused migration not recorded: %s", rec.name, e)
            log.info("VM %s: migration to %s refused: %s", rec.name, dst.name, refusal)
            raise MigrationError(refusal)
        m = self._record_migration(rec, dst.name, with_tags, "setup")
        self._set_state(rec, "migrating", persist=False)
        task = asyncio.get_running_loop().create_task(self._run_migration(rec, dst, m))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: op.release())
        return dict(m)

    async def _run_migration(self, rec: VmRecord, dst: Host, m: dict) -> None:
        last_event = 0.0

        def progress(fraction: float, stats: dict) -> None:
            nonlocal last_event
            m.update(state="active", progress=max(0.0, min(1.0, float(fraction))), stats=dict(stats))
            now = time.monotonic()
            if now - last_event >= PROGRESS_EVENT_PERIOD:
                last_event = now
                self.bus.publish("migration", migration=dict(m))

        spec = self._spec(rec)
        try:
            self._update_migration(m, state="active")
            new_vm = await rec.running.migrate_to(dst, spec, m["with_tags"], progress)
        except asyncio.CancelledError:
            self._update_migration(m, state="failed", reason="the daemon stopped during the migration",
                                   finished=time.time())
            self._set_state(rec, "running", persist=False)
            raise
        except Exception as e:
            reason = str(e) if isinstance(e, MtevmError) else f"migration failed: {e!r}"
            if m["id"] in self._cancel_requested:
                self._update_migration(m, state="cancelled", reason="cancelled by the user", finished=time.time())
            else:
                self._update_migration(m, state="failed", reason=reason, finished=time.time())
            self._cancel_requested.discard(m["id"])
            self._set_state(rec, "running", persist=False)
            log.warning("VM %s: migration %d to %s failed: %s", rec.name, m["id"], dst.name, reason)
            return
        rec.running = new_vm
        self._update_migration(m, state="completed", progress=1.0, finished=time.time())
        self._note_state(rec, "running", runtime=new_vm.runtime_info(), host=dst.name)
        log.info("VM %s: migrated to %s (migration %d)", rec.name, dst.name, m["id"])


async def open_service(paths: Paths, hosts: dict[str, Host] | None = None) -> Service:
    """A started Service (the store opened and reconciled)."""
    service = Service(paths, hosts)
    await service.open()
    return service


__all__ = ["Service", "open_service", "HOST_NAMES"]
