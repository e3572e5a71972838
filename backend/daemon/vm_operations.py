"""The everyday VM operations of the Service: pause/resume, reboot/shutdown, edit, clone, snapshots,
migrate-cancel and the monitor pass-through (what virsh suspend/resume/reboot/shutdown/edit/
snapshot-*/domjobabort/qemu-monitor-command do).

A mixin of backend.daemon.service.Service, so the service module keeps the life cycle and this one
the operations; both share the Service's records, store and event bus. The hosts do the work
(backend.hosts.base.RunningVm); each operation here checks the VM's state first and says why not.

Snapshots are the VM's whole state written by QEMU's migration to a file, vCPUs stopped: RAM,
devices, and under TCG the ``mach-virt.tag`` RAM block, so the MTE tags come back with it. They are
kept in the state dir (``snapshots/<vm>/<tag>.state`` and a ``.json`` beside it with the definition
they were taken with); a restore across a changed definition is refused before QEMU is involved.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shutil
import time

from backend.daemon.api import REBOOT_WAIT, SHUTDOWN_GRACE
from backend.daemon.operations import claim
from backend.errors import ConfigError, MigrationError, MtevmError, NotFoundError, StateError
from backend.hosts.base import snapshot_exists_text
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig
from backend.paths import ensure_private_dir, open_private_path
from backend.store import VmRow

log = logging.getLogger("mtevm.operations")
SHUTDOWN_TIMEOUT = SHUTDOWN_GRACE   # seconds a guest agent gets to power off before mtevm stops the VM
REBOOT_TIMEOUT = REBOOT_WAIT
MACHINE_KEYS = ("accel", "cpu", "vcpus", "memory", "mte", "secure", "only_migratable")
EDIT_KEYS = MACHINE_KEYS + ("qemu_args", "workload", "allow_host_files")
LIVE_STATES = ("running", "paused")     # a QEMU (or simulated vCPUs) exists
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# QMP/HMP commands that `mtevm monitor` refuses: they end the QEMU or move the VM behind mtevm's back.
MONITOR_REFUSED = {"quit": "use 'mtevm stop NAME' (or 'mtevm shutdown NAME')",
                   "q": "use 'mtevm stop NAME' (or 'mtevm shutdown NAME')",
                   "migrate": "use 'mtevm migrate NAME --to HOST' or 'mtevm snapshot NAME save'",
                   "migrate-incoming": "use 'mtevm snapshot NAME restore TAG'",
                   "migrate_incoming": "use 'mtevm snapshot NAME restore TAG'"}


def parse_qmp_command(command: str) -> tuple[str, dict | None]:
    """``{"execute": "x", "arguments": {...}}`` or ``x`` or ``x {"arg": 1}`` -> (name, arguments)."""
    text = command.strip()
    try:
        if text.startswith("{"):
            obj = json.loads(text)
            if not isinstance(obj, dict) or not isinstance(obj.get("execute"), str):
                raise ConfigError('monitor: a QMP command object needs "execute": "<command>"')
            name, arguments = obj["execute"], obj.get("arguments")
        else:
            name, _, rest = text.partition(" ")
            arguments = json.loads(rest) if rest.strip() else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"monitor: the QMP arguments are not JSON: {e}") from None
    if not name:
        raise ConfigError("monitor: give a QMP command, e.g. query-status (or --hmp 'info mtree')")
    if arguments is not None and not isinstance(arguments, dict):
        raise ConfigError("monitor: QMP arguments must be a JSON object")
    return name, arguments


def _monitor_request(command: str, hmp: bool) -> str:
    """The command as the host gets it (HMP: the line; QMP: a command object as JSON), after
    refusing what would end or move the VM behind mtevm's back."""
    if hmp:
        word = command.split(None, 1)[0]
    else:
        word, arguments = parse_qmp_command(command)
        command = json.dumps({"execute": word, **({"arguments": arguments} if arguments is not None else {})})
    if word in MONITOR_REFUSED:
        raise ConfigError(f"monitor: mtevm does not pass '{word}' to QEMU: {MONITOR_REFUSED[word]}")
    return command


def _monitor_reply(reply):
    """A QMP reply as an object (a host may hand back its JSON text); QEMU's error as QmpError."""
    if isinstance(reply, str):
        reply = json.loads(reply)
    if isinstance(reply, dict) and "error" in reply:
        raise MtevmError(reply["error"].get("desc", str(reply["error"])))
    return reply.get("return") if isinstance(reply, dict) else reply


def _check_tag(tag) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise ConfigError(f"snapshot tag {tag!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return tag


def _claiming(verb: str):
    """Run the operation under the VM's claim (backend.daemon.operations): taken before the first
    await, so a second operation on a busy VM is refused at once ("VM 'x' is pausing")."""
    def wrap(method):
        @functools.wraps(method)
        async def run(self, name, *args, **kwargs):
            with claim(self._vm(name), verb):
                return await method(self, name, *args, **kwargs)
        return run
    return wrap


def _disk_holder(rec):
    """The RunningVm whose QEMU has the VM's disks open (ask it), or None (a QEMU that died but is
    not yet noticed as crashed holds nothing: the files are read directly)."""
    running = rec.running
    return running if running is not None and running.state == "running" else None


def _failure(e: BaseException) -> str:
    return str(e) if isinstance(e, MtevmError) else f"restore failed: {e!r}"


def _describe(d: dict) -> str:
    from backend.machine.config import format_size
    return ", ".join(f"{k}={format_size(v) if k == 'memory' else json.dumps(v)}" for k, v in d.items())


class VmOperations:
    """Mixin for Service (uses its ``_vm``, ``_detail``, ``_set_state``, ``store``, ``hosts``, ...)."""

    # -- helpers ----------------------------------------------------------------------------------
    def _live(self, name: str, *states: str):
        rec = self._vm(name)
        states = states or LIVE_STATES
        if rec.state not in states or rec.running is None:
            raise StateError(f"VM {rec.name!r} is {rec.state}, not {' or '.join(states)}")
        return rec

    async def _with_outcome(self, rec, how: str, message: str) -> dict:
        return {**await self._detail(rec), "outcome": {"how": how, "message": message}}

    # -- pause / resume ---------------------------------------------------------------------------
    @_claiming("pausing")
    async def pause(self, name: str) -> dict:
        """QMP ``stop``: the vCPUs stop, counters hold still; the VM is "paused" everywhere."""
        return await self._switch(name, "running", "paused", lambda vm: vm.pause())

    @_claiming("resuming")
    async def resume(self, name: str) -> dict:
        """QMP ``cont``: the vCPUs go on and so do the counters."""
        return await self._switch(name, "paused", "running", lambda vm: vm.resume())

    async def _switch(self, name: str, before: str, after: str, call) -> dict:
        rec = self._live(name, before)
        await call(rec.running)
        rec.rate.reset()
        self._note_state(rec, after)     # a fact by now: QEMU has stopped / resumed
        return await self._detail(rec)

    # -- reboot / shutdown ------------------------------------------------------------------------
    @_claiming("rebooting")
    async def reboot(self, name: str) -> dict:
        """The guest agent's clean reboot where the guest has one, else QMP ``system_reset``."""
        rec = self._live(name)
        running = rec.running
        if await running.guest_power("reboot", REBOOT_TIMEOUT):
            how, message = "agent", f"VM {rec.name}: the guest's agent rebooted it"
        else:
            await running.reset()
            how = "reset"
            message = (f"VM {rec.name}: the guest has no agent to reboot it (the built-in mtevm guest): "
                       "reset it instead (QMP system_reset)")
        rec.rate.reset()
        self.bus.publish("vm", vm=self._summary(rec))
        return await self._with_outcome(rec, how, message)

    @_claiming("shutting down")
    async def shutdown(self, name: str, timeout: float = SHUTDOWN_TIMEOUT) -> dict:
        """Graceful power-off through the guest's agent; the built-in guest (no agent) or an agent
        that does not finish within ``timeout`` is stopped instead (QMP quit), and the answer says so."""
        rec = self._live(name)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ConfigError(f"timeout must be a number of seconds in (0, 3600], not {timeout!r}")
        running = rec.running
        self._set_state(rec, "stopping", runtime=running.runtime_info())   # intent first, as stop
        try:
            graceful = await running.guest_power("poweroff", float(timeout))
        except MtevmError:
            graceful = False
        if graceful:
            how, message = "agent", f"VM {rec.name}: the guest's agent powered it off"
        elif getattr(running, "has_agent", False):
            how, message = "stop", (f"VM {rec.name}: the guest did not power off within {timeout:g} s: "
                                    f"stopped it instead ({running.stop_call})")
        else:
            how, message = "stop", (f"VM {rec.name}: the guest has no agent to power it off (the built-in mtevm "
                                    f"guest): stopped it instead ({running.stop_call})")
        rec.running = None
        try:
            await running.stop()
        finally:
            rec.rate.reset()
            self._note_state(rec, "stopped", runtime={})
        return await self._with_outcome(rec, how, message)

    # -- migrate-cancel ---------------------------------------------------------------------------
    async def migrate_cancel(self, name: str) -> dict:
        """QMP ``migrate_cancel``: the VM keeps running on its host; the history says "cancelled"."""
        rec = self._vm(name)
        m = next((m for m in sorted(self._migrations.values(), key=lambda m: -m["id"])
                  if m["vm"] == rec.name and m["state"] in ("setup", "active")), None)
        if rec.state != "migrating" or m is None or rec.running is None:
            raise StateError(f"VM {rec.name!r} is {rec.state}: it has no migration to cancel")
        self._cancel_requested.add(m["id"])
        await rec.running.cancel_migration()
        return dict(m)

    # -- monitor ----------------------------------------------------------------------------------
    async def monitor(self, name: str, command: str, hmp: bool = False):
        """One QMP command (JSON) or HMP command line through mtevm's own QMP connection."""
        rec = self._live(name, "running", "paused", "migrating")
        if not isinstance(command, str) or not command.strip():
            raise ConfigError("monitor: give a command, e.g. query-status, or --hmp 'info mtree'")
        if not isinstance(hmp, bool):
            raise ConfigError(f"hmp must be true or false, not {hmp!r}")
        reply = await rec.running.monitor(_monitor_request(command, hmp), hmp=hmp)
        if rec.state in LIVE_STATES:        # e.g. 'stop' / 'cont' typed at the monitor
            state = "paused" if rec.running.paused else "running"
            if state != rec.state:
                self._note_state(rec, state)
        return {"vm": rec.name, "hmp": hmp, "command": command,
                "return": reply if hmp else _monitor_reply(reply)}

    # -- edit / clone -----------------------------------------------------------------------------
    def _next_definition(self, rec, changes: dict | None = None):
        """(config, workload, qemu_args) the VM will boot with: its definition, its pending changes,
        then ``changes``; validated (ConfigError). What the host's decision tree says of it is the
        VmDetail's ``warnings``, as for create: a definition that cannot start here is kept, with why."""
        merged = {**rec.pending, **(changes or {})}
        machine = rec.config.to_dict()
        machine.update({k: v for k, v in merged.items() if k in MACHINE_KEYS})
        host = self.hosts[rec.host]
        try:
            config = VirtMachineConfig.from_dict(machine)
            workload = rec.workload.to_dict()
            workload.update(merged.get("workload") or {})
            workload = WorkloadConfig.from_dict(workload)
        except MtevmError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise ConfigError(f"invalid change: {e}") from None
        allow = merged.get("allow_host_files", rec.allow_host_files)
        if not isinstance(allow, bool):
            raise ConfigError(f"allow_host_files must be true or false, not {allow!r}")
        # QEMU arguments are checked against the opt-in they will start with (backend/qemu/argv.py)
        qemu_args = (host.check_extra_args(merged.get("qemu_args", rec.qemu_args), allow_host_files=allow)
                     if "qemu_args" in merged or "allow_host_files" in merged else list(rec.qemu_args))
        return config, workload, qemu_args

    @_claiming("being edited")
    async def edit(self, name: str, changes: dict) -> dict:
        """Change vCPUs, memory, CPU model, accel, MTE, secure, only-migratable, QEMU arguments or the
        workload. A stopped VM takes them now; a running one at its next start (``pending``), as MTE.
        The seed's decision tree judges the result as it judges create: its text is in ``warnings``."""
        rec = self._vm(name)
        if not isinstance(changes, dict) or not changes:
            raise ConfigError("edit: give at least one change, e.g. {\"vcpus\": 2} "
                              f"(editable: {', '.join(EDIT_KEYS)})")
        unknown = sorted(str(k) for k in changes if k not in EDIT_KEYS)
        if unknown:
            raise ConfigError(f"edit: {', '.join(unknown)} cannot be edited (editable: {', '.join(EDIT_KEYS)})")
        if "workload" in changes and not isinstance(changes["workload"], dict):
            raise ConfigError("edit: workload must be an object of workload parameters")
        if rec.state in ("starting", "stopping", "migrating"):
            raise StateError(f"VM {rec.name!r} is {rec.state}: edit it when that has finished")
        config, workload, qemu_args = self._next_definition(rec, changes)
        # The host-files opt-in gates the next start's check only: it is stored at once, even running.
        allow = changes.get("allow_host_files", rec.allow_host_files)
        if rec.state in ("stopped", "crashed"):     # the store first: a failed write changes nothing
            spec = self._spec(rec)
            spec.config, spec.workload, spec.extra_args = config, workload, qemu_args
            await self.hosts[rec.host].define(spec)   # libvirt: the domain follows the definition
            self.store.update_vm(rec.name, config=config.to_dict(), workload=workload.to_dict(),
                                 qemu_args=qemu_args, pending={}, allow_host_files=allow)
            rec.config, rec.workload, rec.qemu_args, rec.pending = config, workload, qemu_args, {}
        else:
            pending = self._pending_between(rec, config, workload, qemu_args)
            self.store.update_vm(rec.name, pending=pending, allow_host_files=allow)
            rec.pending = pending
        rec.allow_host_files = allow
        self.bus.publish("vm", vm=self._summary(rec))
        return await self._detail(rec)

    @staticmethod
    def _pending_between(rec, config, workload, qemu_args) -> dict:
        """What differs from the running definition: the pending changes (none: back to current)."""
        pending = {k: v for k, v in config.to_dict().items()
                   if k in MACHINE_KEYS and v != getattr(rec.config, k)}
        now = rec.workload.to_dict()
        changed = {k: v for k, v in workload.to_dict().items() if now.get(k) != v}
        if changed:
            pending["workload"] = changed
        if qemu_args != list(rec.qemu_args):
            pending["qemu_args"] = qemu_args
        return pending

    async def clone(self, name: str, new_name: str) -> dict:
        """A new stopped VM with the definition ``name`` will boot with (pending changes included),
        on the same host, with copies of its disks where it has any (the host copies them, beside
        the originals; a running VM's disks are being written: pause or stop it first)."""
        rec = self._vm(name)
        if not isinstance(new_name, str):
            raise ConfigError(f"a VM name must be a string, not {type(new_name).__name__}")
        if new_name in self.vms:
            raise ConfigError(f"a VM named {new_name!r} already exists")
        config, workload, qemu_args = self._next_definition(rec)
        d = config.to_dict()
        d["name"] = new_name
        config = VirtMachineConfig.from_dict(d)      # the new name is checked like any other
        from backend.daemon.service import VmRecord
        from backend.guests.definition import GuestConfig
        guest = GuestConfig.from_dict(rec.guest.to_dict())
        if guest.disks and rec.state not in ("stopped", "crashed", "paused"):
            raise StateError(f"VM {rec.name!r} is {rec.state} and writes its disks: pause or stop it to clone them")
        new = VmRecord(new_name, rec.host, config, workload, qemu_args=list(qemu_args), guest=guest,
                       allow_host_files=rec.allow_host_files)
        host = self.hosts[rec.host]
        copied = await asyncio.to_thread(host.clone_storage, self._spec(rec), self._spec(new))
        if copied:
            guest.disks = list(copied)
        # A qcow2 copy carries the original's internal snapshots, but mtevm's snapshots (state file and
        # record) stay with the original: the clone could never restore them, and a leftover would
        # refuse the clone's own snapshot of that name. So the copies drop them (others stay).
        dropped = [s for s in self._snapshot_records(rec.name) if s.get("disks")] if copied else []
        try:
            for snap in dropped:     # the copies hold the very same snapshots, under the copies' names
                copies = [{**d, "path": copied[rec.guest.disks.index(d["path"])]} for d in snap["disks"]
                          if d["path"] in rec.guest.disks]
                await host.delete_disk_snapshots(self._spec(new), copies, snap["tag"], None)
            await host.define(self._spec(new))      # libvirt: the clone's persistent domain
            try:
                self.store.add_vm(VmRow(new.name, new.host, config.to_dict(), workload.to_dict(),
                                        qemu_args=new.qemu_args, guest=guest.to_dict(),
                                        allow_host_files=new.allow_host_files))
            except BaseException:
                await host.undefine(new.name)
                raise
        except BaseException:
            for path in copied:       # nothing half made: the copies go with the failed clone
                os.unlink(path)
            raise
        self.vms[new.name] = new
        self.bus.publish("vm", vm=self._summary(new))
        return {**await self._detail(new), "cloned_from": rec.name, "copied": copied,
                "dropped_snapshots": [s["tag"] for s in dropped]}

    # -- snapshots --------------------------------------------------------------------------------
    def _snapshot_dir(self, vm: str) -> str:
        return os.path.join(self.paths.state_dir, "snapshots", vm)

    def _snapshot_files(self, vm: str, tag: str) -> tuple[str, str]:
        base = os.path.join(self._snapshot_dir(vm), tag)
        return base + ".state", base + ".json"

    def _snapshot_meta(self, vm: str, tag: str) -> dict:
        state, meta = self._snapshot_files(vm, _check_tag(tag))
        try:
            with open(meta) as f:
                info = json.load(f)
        except FileNotFoundError:
            raise NotFoundError(f"VM {vm!r} has no snapshot {tag!r}") from None
        except (OSError, ValueError) as e:
            raise MtevmError(f"snapshot {tag!r} of VM {vm!r}: its description {meta} is unreadable: {e}") from None
        if not os.path.exists(state):
            raise MtevmError(f"snapshot {tag!r} of VM {vm!r}: its state file {state} is missing")
        return info

    def _snapshot_records(self, vm: str) -> list[dict]:
        folder = self._snapshot_dir(vm)
        out = []
        for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if entry.endswith(".json") and _TAG_RE.match(entry[:-5]):
                try:
                    out.append(self._snapshot_meta(vm, entry[:-5]))
                except MtevmError:
                    continue
        return sorted(out, key=lambda s: s["created"])

    async def snapshot_list(self, name: str) -> list[dict]:
        """The VM's snapshots, oldest first; each disk's part says whether the disk still holds it
        (``present``: false once it was deleted or re-made behind mtevm's back; restore then refuses)."""
        rec = self._vm(name)
        host = self.hosts[rec.host]
        out = await self._snapshots(rec)
        if not host.keeps_snapshots and any(s.get("disks") for s in out):
            from backend.hosts.disk_snapshots import problems
            try:
                inventory = await host.disk_inventory(self._spec(rec), _disk_holder(rec))
            except MtevmError as e:
                inventory, error = None, str(e)
            for snap in out:
                for disk in snap.get("disks") or []:
                    wrong = problems([disk], inventory, snap["tag"]) if inventory is not None else [error]
                    disk["present"] = not wrong
                    if wrong:
                        disk["problem"] = wrong[0]
        return out

    @_claiming("saving a snapshot")
    async def snapshot_save(self, name: str, tag: str | None = None) -> dict:
        """The whole state of a running or paused VM, MTE tags included, under ``tag`` (default:
        the time). Refused with QEMU's own text where QEMU cannot (a migration blocker, e.g. KVM MTE),
        on libvirt hosts with libvirt's own refusal."""
        rec = self._vm(name)
        host = self.hosts[rec.host]
        disk_refusal = host.disk_snapshot_refusal(self._spec(rec))    # a raw disk: said before anything else
        if disk_refusal:
            raise StateError(disk_refusal)
        rec = self._live(name)
        tag = _check_tag(tag) if tag is not None else time.strftime("snap-%Y%m%d-%H%M%S")
        if host.keeps_snapshots:
            return await self._save_on_host(rec, host, tag)
        state_file, meta_file = self._snapshot_files(rec.name, tag)
        if os.path.exists(meta_file):
            raise ConfigError(snapshot_exists_text(rec.name, tag))
        # As QEMU's savevm: a migration blocker (its own text) refuses the snapshot.
        refusal = host.snapshot_refusal()
        blockers = await rec.running.blocked_reasons()
        if blockers:
            raise MigrationError(blockers[0])
        if refusal:
            raise StateError(refusal)
        ensure_private_dir(self._snapshot_dir(rec.name))
        partial = state_file + ".partial"
        running, was_running = rec.running, rec.state == "running"
        if was_running:      # counters and state from the same instant: the vCPUs stand still
            await running.pause()
        disks: list[dict] = []
        try:
            counters = await self._counters(rec)
            if rec.guest.disks:     # the disks at the same instant as the state (vCPUs stopped)
                disks = await host.snapshot_disks(self._spec(rec), tag, running)
            stats = await running.save_state(partial)
            os.replace(partial, state_file)
            info = {**self._snapshot_info(rec, tag, counters, stats.get("bytes", os.path.getsize(state_file))),
                    "disks": disks}
            with os.fdopen(open_private_path(meta_file + ".partial", os.O_WRONLY | os.O_TRUNC), "w") as f:
                json.dump(info, f, indent=1)
            os.replace(meta_file + ".partial", meta_file)
        except BaseException:
            for path in (partial, state_file, meta_file + ".partial"):
                if os.path.exists(path):
                    os.unlink(path)
            if disks:               # no half snapshot: the disks' part goes too
                try:
                    await host.delete_disk_snapshots(self._spec(rec), disks, tag, running)
                except MtevmError as e:
                    log.warning("VM %s: a failed snapshot %r left its disks' part: %s", rec.name, tag, e)
            raise
        finally:
            if was_running:
                await running.resume()
        return info

    @staticmethod
    def _snapshot_info(rec, tag: str, counters: dict, size: int | None) -> dict:
        """What a snapshot records beside the state: the definition it was taken with, the counters."""
        return {"vm": rec.name, "tag": tag, "created": time.time(), "host": rec.host,
                "vm_state": rec.state, "config": rec.config.to_dict(), "workload": rec.workload.to_dict(),
                "qemu_args": list(rec.qemu_args), "bytes": size, "counters": counters["vm"],
                "tags": "saved with RAM (mach-virt.tag block)"
                if rec.config.mte and rec.config.accel == "tcg" else "none"}

    async def _save_on_host(self, rec, host, tag: str) -> dict:
        """A host that keeps snapshots (libvirt) takes it: the counters are read just before, while
        the VM runs on (libvirt stops the vCPUs itself while it writes the state, as ``virsh
        snapshot-create`` does, so the snapshot remembers the VM running). A blocker refuses it with
        the host's own text (libvirt's, verbatim)."""
        refusal = host.snapshot_refusal()      # e.g. a libvirt too old to revert what it would save
        if refusal:
            raise StateError(refusal)
        counters = await self._counters(rec)    # (a tag the VM has already: the host refuses it)
        return await host.snapshot_save(rec.running, tag, self._snapshot_info(rec, tag, counters, None))

    async def _snapshots(self, rec) -> list[dict]:
        """The VM's snapshots, oldest first, wherever its host keeps them: libvirt's domain snapshots
        (virsh's included), else mtevm's records in the state dir."""
        host = self.hosts[rec.host]
        if host.keeps_snapshots:
            return sorted(await host.snapshots(self._spec(rec)), key=lambda s: s["created"])
        return self._snapshot_records(rec.name)

    async def _find_snapshot(self, rec, tag: str) -> dict:
        """Snapshot ``tag`` of the VM, wherever its host keeps it (NotFoundError if none)."""
        if not self.hosts[rec.host].keeps_snapshots:
            return self._snapshot_meta(rec.name, tag)
        _check_tag(tag)
        found = [s for s in await self._snapshots(rec) if s["tag"] == tag]
        if not found:
            raise NotFoundError(f"VM {rec.name!r} has no snapshot {tag!r}")
        return found[0]

    @_claiming("restoring a snapshot")
    async def snapshot_restore(self, name: str, tag: str | None = None) -> dict:
        """Bring the VM back to a snapshot (the newest without ``tag``): its QEMU, if any, is replaced
        by one that loads the state; the VM is running or paused as it was when saved."""
        rec = self._vm(name)
        if rec.state not in ("stopped", "crashed", "running", "paused"):
            raise StateError(f"VM {rec.name!r} is {rec.state}: restore it when that has finished")
        if tag is None:
            snaps = await self._snapshots(rec)
            if not snaps:
                raise NotFoundError(f"VM {rec.name!r} has no snapshots")
            tag = snaps[-1]["tag"]
        info = await self._find_snapshot(rec, tag)
        host = self.hosts[rec.host]
        if info.get("host") != rec.host:
            raise StateError(f"snapshot {tag!r} was taken on host {info.get('host')}, VM {rec.name!r} is on "
                             f"{rec.host}: restore refused")
        if not info.get("config"):
            raise StateError(f"snapshot {tag!r} of VM {rec.name!r} does not say which definition it was taken "
                             "with (it has no mtevm metadata): restore refused")
        config, workload, qemu_args = self._next_definition(rec)
        saved = {**VirtMachineConfig.from_dict(info["config"]).to_dict(), "qemu_args": info.get("qemu_args", []),
                 "workload": WorkloadConfig.from_dict(info.get("workload")).to_dict()}
        now = {**config.to_dict(), "qemu_args": qemu_args, "workload": workload.to_dict()}
        differs = {k: v for k, v in now.items() if k != "name" and saved.get(k) != v}
        if differs:
            was = {k: saved.get(k) for k in differs}
            raise StateError(f"snapshot {tag!r} of VM {rec.name!r} was taken with {_describe(was)}; the VM "
                             f"{'will now boot' if rec.pending else 'now has'} {_describe(differs)}: restore "
                             "refused (QEMU can only load a state into the machine that saved it)")
        saved_disks = info.get("disks") or []
        if [d["path"] for d in saved_disks] != list(rec.guest.disks):
            raise StateError(f"snapshot {tag!r} of VM {rec.name!r} was taken with disks "
                             f"{', '.join(d['path'] for d in saved_disks) or 'none'}; the VM now has "
                             f"{', '.join(rec.guest.disks) or 'none'}: restore refused")
        if saved_disks:     # every disk still holds its part, or nothing is touched (the VM runs on)
            await self._check_disk_snapshots(rec, info, _disk_holder(rec))
        if host.keeps_snapshots:
            running = await self._revert_on_host(rec, host, info)
        else:
            running = await self._restore_from_file(rec, host, info)
        await running.sample()          # the counters the snapshot brought back, shown at once
        try:
            self._set_state(rec, "paused" if running.paused else "running", runtime=running.runtime_info(),
                            last_error=None)
        except MtevmError:
            await running.stop()        # the store cannot say it runs: it must not run (as start)
            self._note_state(rec, "stopped", runtime={})
            raise
        rec.running = running
        rec.rate.reset()
        return {**await self._detail(rec), "snapshot": info}

    async def _restore_from_file(self, rec, host, info: dict):
        """Local QEMU: stop the VM's QEMU, revert its disks (no QEMU has them open now: all or none),
        start one that loads the state file."""
        state_file, _ = self._snapshot_files(rec.name, info["tag"])
        if rec.running is not None:
            self._set_state(rec, "stopping", runtime=rec.running.runtime_info())
            running, rec.running = rec.running, None
            await running.stop()
        # As a start: the intent stored first, pending changes (already checked equal) applied.
        self._set_state(rec, "starting", runtime={}, **self._pending_applied(rec))
        try:
            if info.get("disks"):
                await host.revert_disks(self._spec(rec), info["disks"], info["tag"])
            return await host.restore(self._spec(rec), state_file, paused=info.get("vm_state") == "paused")
        except BaseException as e:
            self._note_state(rec, "stopped", runtime={}, last_error=_failure(e))
            raise

    async def _revert_on_host(self, rec, host, info: dict):
        """libvirt: the host reverts the domain in place (virDomainRevertToSnapshot stops its QEMU and
        starts one from the snapshot, running or paused as it was). If the host refuses, the VM is as
        the host says: still running (libvirt refused before touching it) or stopped."""
        old = rec.running
        # the intent stored first (a refused store write leaves the VM as it was), then detached
        self._set_state(rec, "starting", runtime=old.runtime_info() if old else {}, **self._pending_applied(rec))
        rec.running = None
        try:
            return await host.snapshot_revert(self._spec(rec), info["tag"], old)
        except BaseException as e:
            if old is not None and old.state != "crashed":
                rec.running = old
                self._note_state(rec, "paused" if old.paused else "running", runtime=old.runtime_info(),
                                 last_error=_failure(e))
            else:
                self._note_state(rec, "stopped", runtime={}, last_error=_failure(e))
            raise

    @_claiming("deleting a snapshot")
    async def snapshot_delete(self, name: str, tag: str) -> dict:
        """The state file, its description and the disks' internal snapshots (through the VM's QEMU
        while it runs, else in the files); a disk that fails keeps the whole snapshot, to try again.
        On libvirt hosts: virDomainSnapshotDelete (libvirt removes its memory file)."""
        rec = self._vm(name)
        info = await self._find_snapshot(rec, tag)
        host = self.hosts[rec.host]
        if host.keeps_snapshots:
            await host.snapshot_delete(self._spec(rec), tag)
            return info
        if info.get("disks"):
            if rec.state not in ("stopped", "crashed") and rec.running is None:
                raise StateError(f"VM {rec.name!r} is {rec.state}: delete the snapshot when that has finished")
            await host.delete_disk_snapshots(self._spec(rec), info["disks"], info["tag"], _disk_holder(rec))
        for path in self._snapshot_files(rec.name, tag):
            os.unlink(path)
        return info

    async def _check_disk_snapshots(self, rec, info: dict, running) -> None:
        """StateError naming each disk that lost (or never had) the internal snapshot ``info`` recorded."""
        from backend.hosts.disk_snapshots import problems
        inventory = await self.hosts[rec.host].disk_inventory(self._spec(rec), running)
        wrong = problems(info["disks"], inventory, info["tag"])
        if wrong:
            raise StateError(f"snapshot {info['tag']!r} of VM {rec.name!r} cannot be restored: {'; '.join(wrong)}. "
                             "Nothing was changed: no disk reverted, the VM left as it was")

    async def _delete_snapshots(self, rec) -> None:
        """A deleted VM's snapshots go with it, the disks' internal ones too (the disks stay: they are
        the user's; a disk that cannot be changed keeps its internal snapshot, logged)."""
        host = self.hosts.get(rec.host)
        for snap in self._snapshot_records(rec.name):
            if snap.get("disks") and host is not None:
                try:
                    await host.delete_disk_snapshots(self._spec(rec), snap["disks"], snap["tag"], None)
                except MtevmError as e:
                    log.warning("VM %s deleted: %s", rec.name, e)
        shutil.rmtree(self._snapshot_dir(rec.name), ignore_errors=True)

    # -- state changes made outside mtevm (libvirt's lifecycle events) ------------------------------
    def _follow_domain(self, host: str, name: str) -> None:
        """A host saw VM ``name`` paused, resumed or stopped behind mtevm's back (``virsh suspend``,
        ``virsh destroy``): list, show and events follow at once. An operation of mtevm's own in
        progress sets the state itself when it ends, so it is left alone."""
        rec = self.vms.get(name)
        if rec is None or rec.host != host or rec.running is None or rec.operation is not None \
                or rec.state not in LIVE_STATES:
            return
        if rec.running.state == "crashed":     # handled as the sampler handles a crash
            task = asyncio.get_running_loop().create_task(self._sample(rec))
            self._tasks.add(task)           # the Service's tasks: referenced until done, cancelled at close
            task.add_done_callback(self._tasks.discard)
            return
        state = "paused" if rec.running.paused else "running"
        if state != rec.state:
            rec.rate.reset()
            self._note_state(rec, state)
