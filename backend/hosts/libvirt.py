"""The ``libvirt`` host kind: VMs as persistent libvirt domains on a host named by URI.

mtevm grows no remote protocol of its own: libvirt (through ``libvirt-python``) reaches the host
(``qemu:///system``, ``qemu+ssh://user@host/system``, ``qemu+unix:///system?socket=...``),
defines and starts the domains and migrates them peer-to-peer. mtevm adds MTE on top: the domain
XML (backend.hosts.libvirt_domain) turns MTE on with ``-machine mte=on`` in
``<qemu:commandline>`` and runs mtevm's bare-metal guest, whose status block is read with HMP
``xp`` through ``libvirt_qemu.qemuMonitorCommand``.

Connections: one per host, opened in the background and kept open (over ssh opening costs ~0.5 s;
libvirt's first connection to a daemon also probes QEMU for seconds). libvirt's events reach
asyncio through ``libvirtaio``; a closed connection is reopened with exponential backoff, and
while it is down the host shows libvirt's reason and its VMs show as ``unknown``. Nothing else
in mtevm waits for it.

Blocking libvirt calls run in worker threads (``asyncio.to_thread``) so a slow host never stalls
the daemon; libvirt then calls the event implementation from those threads, which asyncio does
not allow, so ``_ThreadSafeEvents`` queues every change onto the loop (see there).

Without ``libvirt-python`` this module still imports: a libvirt host then reports what to install
and the rest of mtevm works.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any, Callable

from backend.errors import ConfigError, MigrationError, MtevmError, RealizeError, StateError
from backend.hosts.base import (Host, ProgressCallback, RunningVm, VmSpec, report_progress,
                                snapshot_exists_text)
from backend.hosts.guest_status import GuestStatusView
from backend.hosts import libvirt_domain as xml
from backend.hosts.libvirt_stream import open_bridged
from backend.machine import VirtMachineConfig
from backend.machine.config import _NAME_RE, NAME_RULE
from backend.machine.migration import ram_stats
from backend.qemu import guest_abi
from backend.qemu.argv import validate_extra_args
from backend.qemu.console import ConsoleLog, SerialConsole

log = logging.getLogger("mtevm.libvirt")

INSTALL_HINT = ("the libvirt host kind needs libvirt-python: run pip install -e '.[libvirt]' (it builds "
                "against libvirt-dev and pkg-config, which `bash scripts/install-deps.sh` installs)")
URI_HINT = "use qemu:///system, qemu+ssh://user@host/system or qemu+unix:///system?socket=PATH"
GUEST_ENV = "MTEVM_GUEST"
RECONNECT_MIN = 0.5          # seconds before the first reconnect; doubles up to RECONNECT_MAX
RECONNECT_MAX = 30.0
KEEPALIVE = (5, 3)           # libvirt keepalive: a ping every 5 s, 3 unanswered = the host is gone
MIGRATION_POLL = 0.1         # seconds between job-info polls while a migration runs
QOM_LIST_MACHINE = '{"execute":"qom-list","arguments":{"path":"/machine"}}'
MIGRATE_URI = "tcp://127.0.0.1"   # where QEMU sends the migration stream (see migrate_uri)
CONSOLE_WAIT = 5.0           # seconds a domain started paused waits for mtevm's console client
SNAPSHOT_MIN_LIBVIRT = (9, 7)  # reverting (and deleting) external snapshots came with libvirt 9.7
CLOSE_REASONS = {0: "the connection to libvirtd failed (error)", 1: "libvirtd closed the connection (end of file)",
                 2: "libvirtd stopped answering keepalive pings", 3: "the connection was closed by mtevm"}


def load_libvirt():
    """(libvirt, libvirt_qemu, libvirtaio), or MtevmError saying what to install."""
    try:
        import libvirt
        import libvirt_qemu
        import libvirtaio
    except ImportError:
        raise MtevmError(INSTALL_HINT) from None
    return libvirt, libvirt_qemu, libvirtaio


def check_host_name(name) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"host name {name!r} is not valid: use {NAME_RULE}")
    return name


def check_uri(uri) -> str:
    """A libvirt URI for the QEMU driver (system or session), else ConfigError."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"a libvirt URI must be a string: {URI_HINT}")
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme != "qemu" or parts.path not in ("/system", "/session") or any(c in uri for c in "\0\n "):
        raise ConfigError(f"{uri!r} is not a libvirt URI of the QEMU driver: {URI_HINT}")
    return uri


def error_text(e: BaseException) -> str:
    """libvirt's own message for an error (verbatim), else the exception's text."""
    get = getattr(e, "get_error_message", None)
    return (get() if get else None) or str(e)


def version_text(v: int | None) -> str | None:
    """libvirt's packed version (major * 1e6 + minor * 1e3 + release) as "11.3.0"."""
    if not v:
        return None
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


# --- libvirt's event loop on asyncio ---------------------------------------------------------------
_events = None   # the registered implementation (one per process, re-registered for a new loop)


def _thread_safe_events_class(libvirtaio):
    class _ThreadSafeEvents(libvirtaio.virEventAsyncIOImpl):
        """libvirtaio, made safe for calls from any thread.

        libvirt calls the event implementation from the thread that runs a libvirt call (mtevm
        runs them in worker threads), but asyncio's loop may only be changed from its own thread.
        Every add/update/remove is queued onto the loop with ``call_soon_threadsafe`` (in order, as
        libvirt's own poll loop applies changes on its next iteration); ids are handed out at once,
        as libvirt needs them returned. Queuing, never waiting, matters: libvirt holds its client
        lock while it calls these, and the loop thread may be waiting for that lock.
        """

        def _defer(self, fn, *args) -> None:
            def run():
                try:
                    fn(*args)
                except KeyError:   # a handle of a connection from before switch_loop: gone with it
                    pass
            try:
                self.loop.call_soon_threadsafe(run)
            except RuntimeError:   # the loop is closed: nothing is watched any more
                pass

        def switch_loop(self, loop) -> None:
            """Serve a new event loop (libvirt takes its event implementation only once per
            process; a process that runs several loops one after another, like a test run, moves
            this one). What was watched for the old loop's connections is dropped with them."""
            self.loop = loop
            self.callbacks.clear()
            self.descriptors.clear()
            self._pending = 0
            self._finished = None

        def _add_handle(self, fd, event, cb, opaque):
            callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=None, event=event)

            def add():
                callback.descriptor = self.descriptors[fd]
                self.callbacks[callback.iden] = callback
                callback.descriptor.add_handle(callback)
                self._pending_inc()
            self._defer(add)
            return callback.iden

        def _update_handle(self, watch, event):
            self._defer(super()._update_handle, watch, event)

        def _remove_handle(self, watch):
            self._defer(super()._remove_handle, watch)
            return 0

        def _add_timeout(self, timeout, cb, opaque):
            callback = libvirtaio.TimeoutCallback(self, cb, opaque)

            def add():
                self.callbacks[callback.iden] = callback
                callback.update(timeout=timeout)
                self._pending_inc()
            self._defer(add)
            return callback.iden

        def _update_timeout(self, timer, timeout):
            self._defer(super()._update_timeout, timer, timeout)

        def _remove_timeout(self, timer):
            self._defer(super()._remove_timeout, timer)
            return 0

    return _ThreadSafeEvents


def register_error_handler() -> None:
    """libvirt's errors are raised as exceptions; without this libvirt also prints each to stderr."""
    libvirt, _, _ = load_libvirt()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)


def register_events(loop: asyncio.AbstractEventLoop) -> None:
    """Dispatch libvirt's events on ``loop`` (before the first connection is opened)."""
    global _events
    libvirt, _, libvirtaio = load_libvirt()
    if _events is None:
        register_error_handler()
        _events = _thread_safe_events_class(libvirtaio)(loop=loop).register()
    elif _events.loop is not loop:
        _events.switch_loop(loop)


# --- the host --------------------------------------------------------------------------------------
class LibvirtHost(Host):
    """One libvirt daemon, reached by URI over one connection that is kept open."""

    kind = "libvirt"

    def __init__(self, name: str, uri: str, *, guest_elf: str | None = None):
        self.name = check_host_name(name)
        self.uri = check_uri(uri)
        self.description = f"libvirt at {uri}"   # with versions and hostname once connected
        self.guest_elf = guest_elf or os.environ.get(GUEST_ENV) or str(guest_abi.GUEST_ELF)
        self.conn = None
        self.status = "connecting"          # connecting | connected | unreachable
        self.reason: str | None = None
        self.facts: dict = {}
        self.domains: dict[str, dict] = {}  # domains mtevm did not make: name -> summary (read-only)
        self.vms: dict[str, LibvirtVm] = {} # mtevm's running VMs here, by domain name
        self.publish: Callable[..., None] | None = None
        self._task: asyncio.Task | None = None
        self._first: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._close_reason: str | None = None
        self._generation = 0                # bumps on every new connection (cached virDomain objects die)
        self._followers: set[asyncio.Task] = set()   # lifecycle-event handlers still running

    # ------------------------------------------------------------------------- connection
    async def open(self, publish: Callable[..., None] | None = None) -> None:
        """Start connecting in the background (and keep the connection open)."""
        self.publish = publish
        self._first = asyncio.Event()
        try:
            load_libvirt()
        except MtevmError as e:     # said at once: there is nothing to wait for
            self._set_status("unreachable", str(e))
            self._first.set()
            return
        self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def wait_connected(self, timeout: float) -> None:
        """Wait for the first connection attempt to end (either way), at most ``timeout`` s."""
        if self._first is not None:
            try:
                await asyncio.wait_for(self._first.wait(), timeout)
            except TimeoutError:
                pass

    def _set_status(self, status: str, reason: str | None) -> None:
        changed = (status, reason) != (self.status, self.reason)
        self.status, self.reason = status, reason
        if changed:
            log.info("host %s: %s%s", self.name, status, f" ({reason})" if reason else "")
            if self.publish is not None:
                self.publish("host", host=self.info())

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RECONNECT_MIN
        while True:
            try:
                libvirt, _, _ = load_libvirt()
                register_events(loop)
            except MtevmError as e:
                self._set_status("unreachable", str(e))
                self._first.set()
                return
            try:
                conn, facts = await asyncio.to_thread(self._connect)
            except libvirt.libvirtError as e:
                self._set_status("unreachable", error_text(e))
                self._first.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            self._closed = asyncio.Event()
            self._close_reason = None
            closed = self._closed

            def on_close(_conn, reason, _opaque):
                self._close_reason = CLOSE_REASONS.get(reason, f"connection closed (reason {reason})")
                loop.call_soon_threadsafe(closed.set)

            try:
                await asyncio.to_thread(self._watch, conn, on_close)
            except libvirt.libvirtError as e:
                self._set_status("unreachable", error_text(e))
                await asyncio.to_thread(_close_quietly, conn)
                self._first.set()
                await asyncio.sleep(delay)
                continue
            self.conn, self.facts = conn, facts
            self._generation += 1
            await self._refresh_domains()
            self._set_status("connected", None)
            await self.recheck_vms()
            self._first.set()
            await closed.wait()
            self.conn = None
            await asyncio.to_thread(_close_quietly, conn)
            self._set_status("unreachable", self._close_reason or "the connection was closed")

    def _connect(self):
        """Open the connection and read the host's facts (a worker thread: this may take seconds)."""
        libvirt, _, _ = load_libvirt()
        conn = libvirt.open(self.uri)
        try:
            facts = self._read_facts(conn)
        except BaseException:
            _close_quietly(conn)
            raise
        return conn, facts

    def _watch(self, conn, on_close) -> None:
        libvirt, _, _ = load_libvirt()
        try:
            conn.setKeepAlive(*KEEPALIVE)
        except libvirt.libvirtError:
            pass    # not every transport has keepalive (EOF still closes it)
        conn.registerCloseCallback(on_close, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _read_facts(self, conn) -> dict:
        """What libvirt says about the host: versions, arch, QEMU, the accelerators it offers."""
        libvirt, _, _ = load_libvirt()
        caps = ET.fromstring(conn.getCapabilities())
        facts: dict[str, Any] = {
            "hostname": conn.getHostname(), "libvirt_version": version_text(conn.getLibVersion()),
            "qemu_version": version_text(conn.getVersion()),
            "arch": caps.findtext("host/cpu/arch"), "host_uuid": caps.findtext("host/uuid"),
            "host_cpu_mte": caps.find("host/cpu/feature[@name='mte']") is not None,
        }
        guest = next((g for g in caps.findall("guest") if g.find("arch").get("name") == "aarch64"), None)
        facts["emulator"] = guest.findtext("arch/emulator") if guest is not None else None
        facts["domain_types"] = sorted({d.get("type") for d in guest.findall("arch/domain")}) if guest is not None else []
        # "virt" and what it stands for (virt-10.0), not the 30 versioned machine types
        facts["machines"] = [f"{m.text} ({m.get('canonical')})" if m.get("canonical") else m.text
                             for m in guest.findall("arch/machine") if m.text == "virt"] if guest is not None else []
        try:
            domcaps = ET.fromstring(conn.getDomainCapabilities(None, "aarch64", "virt", "qemu"))
            facts["maximum_cpu"] = domcaps.find("cpu/mode[@name='maximum']").get("supported") == "yes"
        except (libvirt.libvirtError, AttributeError):
            facts["maximum_cpu"] = None
        return facts

    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        """A domain was defined, started, suspended, resumed, stopped... (by mtevm, virsh or the
        guest): the VM's state and the read-only list follow at once."""
        libvirt, _, _ = load_libvirt()
        name = dom.name()
        vm = self.vms.get(name)
        if vm is not None and event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            vm.domain_stopped(event, detail)
        task = asyncio.get_running_loop().create_task(self._follow(vm))
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)
        task.add_done_callback(_finished)

    async def _follow(self, vm: "LibvirtVm | None") -> None:
        """After a lifecycle event: re-read the domain list and the VM's run state from libvirt (the
        state now, not the event's: events of a revert or of mtevm's own calls may arrive late),
        then tell the daemon (``domain`` event: backend.daemon.vm_operations._follow_domain)."""
        await self._refresh_domains()
        if vm is None or self.vms.get(vm.name) is not vm or vm._stopping:
            return
        await vm.refresh_run_state()
        if self.publish is not None:
            self.publish("domain", host=self.name, vm=vm.name)

    async def _refresh_domains(self) -> None:
        try:
            self.domains = await self._call(self._list_foreign)
        except MtevmError:
            pass

    def _list_foreign(self, conn) -> dict[str, dict]:
        libvirt, _, _ = load_libvirt()
        out = {}
        for dom in conn.listAllDomains():
            try:
                if _mtevm_metadata(dom) is not None:
                    continue
                summary = xml.summarize_foreign(dom.XMLDesc(0))
                summary["state"] = _domain_state(dom)
                out[dom.name()] = summary
            except libvirt.libvirtError:
                continue   # went away while we looked
        return out

    async def _call(self, fn, *args):
        """``fn(conn, *args)`` in a worker thread; MtevmError when the host is not reachable and
        libvirt's own text for libvirt's errors."""
        libvirt, _, _ = load_libvirt()
        conn = self.conn
        if conn is None:
            raise MtevmError(self.unreachable_text())
        try:
            return await asyncio.to_thread(fn, conn, *args)
        except libvirt.libvirtError as e:
            raise MtevmError(error_text(e)) from None

    def unreachable_text(self) -> str:
        if self.status == "connecting":
            return f"host {self.name} is still connecting to {self.uri}"
        return f"host {self.name} is unreachable: {self.reason}"

    async def close(self) -> None:
        """The daemon exits (or the host is removed): drop the connection; domains keep running
        (their guest agents' channel sessions end here; the next daemon opens them again)."""
        for vm in list(self.vms.values()):
            await vm.close_channels()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        conn, self.conn = self.conn, None
        if conn is not None:
            await asyncio.to_thread(_close_quietly, conn)

    # ------------------------------------------------------------------------- what it is
    def info(self) -> dict:
        f = self.facts
        reason = None if self.status == "connected" else (self.reason or f"connecting to {self.uri}")
        description = self.description
        if f:
            description = (f"libvirt {f.get('libvirt_version')}, QEMU {f.get('qemu_version')} on "
                           f"{f.get('hostname')} ({self.uri})")
        return {"name": self.name, "kind": self.kind, "description": description,
                "arch": f.get("arch") or "?", "kvm_mte": False, "available": self.status == "connected",
                "reason": reason, "uri": self.uri, "state": self.status, "hostname": f.get("hostname"),
                "libvirt_version": f.get("libvirt_version"), "qemu_version": f.get("qemu_version")}

    def probe(self) -> dict:
        """The probe from what libvirt reports (capabilities, domcapabilities, versions). What
        libvirt cannot tell (KVM_CAP_ARM_MTE, QEMU's machine properties) is said to be unknown or
        inferred, with the source named."""
        from backend.machine.probe import QEMU_MIN_MTE, ProbeReport, parse_qemu_version
        report = ProbeReport(host=self.name)
        f = self.facts
        if self.status != "connected" and not f:
            report.kvm = {"present": None, "api_version": None, "cap_arm_mte": None, "path": "/dev/kvm"}
            report.qemu = {"binary": None, "version": None, "mte": None, "accels": [], "usable_for_mte": False,
                           "reason": self.reason}
            report.cpu = {"arch": "?", "mte": None, "source": "unknown: not connected"}
            report.verdict("error", self.unreachable_text())
            return report.to_dict()
        report.fact("libvirt", f.get("libvirt_version"), "virConnectGetLibVersion")
        report.fact("hostname", f.get("hostname"), "virConnectGetHostname")
        report.fact("host UUID", f.get("host_uuid"), "capabilities host/uuid")
        report.fact("arch", f.get("arch"), "capabilities host/cpu/arch")
        report.fact("aarch64 domain types", ", ".join(f.get("domain_types") or []) or "none",
                    "capabilities guest[aarch64]/domain")
        report.fact("virt machine", ", ".join(f.get("machines") or []) or "none",
                    "capabilities guest[aarch64]/machine")
        arch = f.get("arch") or "?"
        kvm_present = "kvm" in (f.get("domain_types") or [])
        report.kvm = {"present": kvm_present, "api_version": None, "cap_arm_mte": None,
                      "path": f"/dev/kvm on {f.get('hostname') or self.name}"}
        version = parse_qemu_version(f"version {f.get('qemu_version')}")
        usable = bool(f.get("emulator")) and version is not None and version >= QEMU_MIN_MTE
        reason = None
        if not f.get("emulator"):
            reason = f"libvirt on {self.name} offers no aarch64 emulator (install qemu-system-arm there)"
        elif not usable:
            reason = f"QEMU {f.get('qemu_version')} cannot run MTE guests correctly (needs >= 8.0)"
        # libvirt cannot list machine properties: ask a running VM's QEMU (qom-list /machine), else
        # infer it from the version (virt's mte exists in every QEMU >= 6.2).
        mte, mte_source = self._machine_has_mte()
        if mte is None and version is not None:
            mte, mte_source = version >= (6, 2), "inferred from the QEMU version (libvirt cannot list machine properties)"
        report.qemu = {"binary": f.get("emulator"), "version": f.get("qemu_version"), "mte": mte,
                       "accels": ["tcg"] + (["kvm"] if kvm_present else []), "usable_for_mte": usable,
                       "reason": reason}
        report.fact("QEMU mte machine property", mte, mte_source)
        cpu_mte = bool(f.get("host_cpu_mte")) if arch == "aarch64" else False
        report.cpu = {"arch": arch, "mte": cpu_mte, "source": "capabilities host/cpu/feature"}
        if reason:
            report.verdict("error", reason)
        else:
            report.verdict("ok", f"QEMU {f.get('qemu_version')} on {f.get('hostname')} runs MTE VMs with TCG through "
                                 f"libvirt {f.get('libvirt_version')} (-machine mte=on via qemu:commandline)")
        if kvm_present and arch == "aarch64":
            report.verdict("warn", "KVM is offered, but libvirt cannot tell whether its KVM has KVM_CAP_ARM_MTE: "
                                   "a KVM MTE VM shows QEMU's own error at start if it has not")
        else:
            report.verdict("warn", f"no KVM MTE on {f.get('hostname') or self.name} "
                                   f"({'no KVM offered' if not kvm_present else arch + ' host'}): use accel tcg")
        return report.to_dict()

    def _machine_has_mte(self) -> tuple[bool | None, str]:
        """Whether QEMU's virt machine has the ``mte`` property, read from a running mtevm VM here
        (``qom-list /machine`` through the monitor passthrough); (None, "") when none runs."""
        import json
        libvirt, libvirt_qemu, _ = load_libvirt()
        conn = self.conn
        for vm in list(self.vms.values()):
            if conn is None or vm._gone:
                continue
            try:
                reply = libvirt_qemu.qemuMonitorCommand(vm._domain(conn), QOM_LIST_MACHINE, 0)
                names = {p["name"] for p in json.loads(reply)["return"]}
            except (libvirt.libvirtError, ValueError, KeyError, TypeError):
                continue
            return "mte" in names, f"qom-list /machine of VM {vm.name}"
        return None, ""

    def can_migrate_to(self, dst: Host) -> str | None:
        """Only to another libvirt host (libvirt itself refuses "the same host")."""
        if dst is self:
            return f"host {self.name}: libvirt does not migrate a domain to the host it runs on"
        return super().can_migrate_to(dst)

    async def vm_migration_refusal(self, spec: VmSpec) -> str | None:
        """libvirt migrates no domain that has snapshots (qemuMigrationSrcIsAllowed: "cannot migrate
        domain with N snapshots"), and has no way to take them along: said before it is asked.
        Nothing is predicted while the host or the domain cannot be read (the migration then says)."""
        name = spec.config.name
        if self.status != "connected":
            return None
        try:
            tags = await self._call(lambda conn: conn.lookupByName(name).snapshotListNames(0))
        except MtevmError:
            return None
        if not tags:
            return None
        listed = ", ".join(sorted(tags))
        return (f"libvirt does not migrate a domain that has snapshots (VM '{name}' has {len(tags)}: {listed}), "
                f"nor can it take them along: delete them first (mtevm snapshot {name} delete TAG)")

    def shown_state(self, state: str) -> str:
        """A VM of an unreachable host is ``unknown``: mtevm cannot see it."""
        return state if self.status == "connected" else "unknown"

    def foreign_vms(self) -> list[dict]:
        """Domains on this host that mtevm did not make, as read-only VmSummary entries."""
        return [{"name": f"{self.name}/{name}", "host": self.name, "state": d["state"], "accel": d["accel"],
                 "cpu": d["cpu"], "vcpus": d["vcpus"], "memory": d["memory"], "mte": d["mte"],
                 "faults_per_s": 0.0, "pending": {}, "last_error": None, "read_only": True, "domain": name}
                for name, d in sorted(self.domains.items())]

    # ------------------------------------------------------------------------- definitions
    def check_config(self, config: VirtMachineConfig) -> None:
        """The seed's decision tree (backend.machine.realize) against what this host reports."""
        from backend.machine import dry_run
        config.validate()
        if config.vcpus > guest_abi.MAX_VCPUS:
            raise ConfigError(f"the mtevm guest runs on 1 to {guest_abi.MAX_VCPUS} vCPUs, not {config.vcpus}")
        if config.accel not in ("tcg", "kvm"):
            raise RealizeError(f"qemu-system-aarch64: -accel {config.accel}: invalid accelerator {config.accel}")
        if config.accel == "kvm" and self.status != "connected":
            raise MtevmError(self.unreachable_text())
        dry_run(config, _ReportedKvm(self.facts) if config.accel == "kvm" else None)

    def check_extra_args(self, extra_args, *, allow_host_files: bool = False) -> list[str]:
        """``-object``/``-device`` pairs, as on ``local`` (host files only with the VM's opt-in):
        they go into qemu:commandline."""
        return validate_extra_args(extra_args, allow_host_files=allow_host_files)

    async def define(self, spec: VmSpec) -> None:
        """Check ``spec`` and define (or redefine) its persistent domain, uploading the guest's files
        (the builtin guest and its parameter block, or the Linux kernel and initramfs) into mtevm's
        storage pool on the host first."""
        self.check_config(spec.config)
        spec.workload.validate()
        files = self.guest_files(spec)
        await self._call(self._define, spec, files)

    def guest_files(self, spec: VmSpec) -> dict[str, bytes]:
        """Pool volume name -> contents: what the host's QEMU loads for ``spec``'s guest."""
        name = spec.config.name
        if spec.guest.kind == "linux":
            from backend.hosts.linux import linux_boot
            kernel, initrd, _ = linux_boot(spec)
            with open(kernel, "rb") as k, open(initrd, "rb") as i:
                return {xml.kernel_volume(name): k.read(), xml.initrd_volume(name): i.read()}
        if spec.guest.kind != "builtin":
            raise ConfigError(f"--guest {spec.guest.kind} is not run on libvirt hosts (use builtin or linux)")
        params = guest_abi.pack_params(spec.workload, spec.config.vcpus, ram_size=spec.config.memory)
        with open(self.guest_elf, "rb") as f:
            return {xml.guest_volume(name): f.read(), xml.params_volume(name): params}

    def _define(self, conn, spec: VmSpec, files: dict[str, bytes]) -> None:
        libvirt, _, _ = load_libvirt()
        name = spec.config.name
        try:
            existing = conn.lookupByName(name)
        except libvirt.libvirtError:
            existing = None
        if existing is not None and _mtevm_metadata(existing) is None:
            raise MtevmError(f"host {self.name} already has a domain named {name!r} that mtevm did not make")
        paths = {vol: _upload(conn, vol, data) for vol, data in files.items()}
        uuid = existing.UUIDString() if existing is not None else None
        if spec.guest.kind == "linux":
            from backend.hosts.linux import linux_boot
            from backend.qemu.argv import AGENT_PORT
            boot = dict(kernel=paths[xml.kernel_volume(name)], initrd=paths[xml.initrd_volume(name)],
                        cmdline=linux_boot(spec)[2], agent_port=AGENT_PORT)
        else:
            boot = dict(kernel=paths[xml.guest_volume(name)], params=paths[xml.params_volume(name)])
        conn.defineXML(xml.domain_xml(spec.config, spec.workload.to_dict(), spec.extra_args, uuid=uuid, **boot))

    async def undefine(self, name: str) -> None:
        """Remove the VM's domain, its snapshots and its files from the host (the VM is stopped)."""
        await self._call(self._undefine, name)

    def _undefine(self, conn, name: str) -> None:
        libvirt, _, _ = load_libvirt()
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            dom = None
        if dom is not None and _mtevm_metadata(dom) is not None:
            _delete_snapshots(dom)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        _delete_volumes(conn, name)

    # ------------------------------------------------------------------------- snapshots
    # libvirt domain snapshots with an external memory file (backend.hosts.libvirt_domain): the
    # domain has no disks, so internal (qcow2) snapshots are impossible -- `virsh snapshot-create`
    # without --memspec says so -- and libvirt >= 9.7 reverts external ones. virsh lists, reverts
    # and deletes the same snapshots.
    keeps_snapshots = True

    def snapshot_refusal(self) -> str | None:
        """Why this host's libvirt cannot keep mtevm's snapshots (None: it can, or is not known yet).
        A snapshot libvirt could take but never revert would only be found out at restore."""
        version = self.facts.get("libvirt_version")
        if version and tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < SNAPSHOT_MIN_LIBVIRT:
            return (f"libvirt {version} on host {self.name} cannot revert external snapshots (libvirt >= "
                    f"{'.'.join(map(str, SNAPSHOT_MIN_LIBVIRT))} can), and a VM without disks can have no other "
                    "kind: upgrade libvirt there to keep snapshots")
        return None

    async def snapshots(self, spec: VmSpec) -> list[dict]:
        return await self._call(self._list_snapshots, spec.config.name)

    def _list_snapshots(self, conn, name: str) -> list[dict]:
        dom = conn.lookupByName(name)
        _pool(conn).refresh(0)    # memory files libvirt wrote since are volumes of mtevm's pool
        entries = [self._snapshot_entry(conn, name, snap.getXMLDesc(0)) for snap in dom.listAllSnapshots()]
        parents = {s["tag"]: s.pop("parent") for s in entries}

        def depth(tag):           # libvirt's creationTime has whole seconds: a child is the newer one
            n = 0
            while (tag := parents.get(tag)) is not None and n < len(parents):
                n += 1
            return n
        return sorted(entries, key=lambda s: (s["created"], depth(s["tag"])))

    def _snapshot_entry(self, conn, name: str, text: str) -> dict:
        """libvirt's snapshot as the contract's Snapshot (counters None: not taken by mtevm)."""
        libvirt, _, _ = load_libvirt()
        s = xml.parse_snapshot(text)
        definition = s["definition"] or {}
        config = definition.get("config")
        size = None
        if s["memory_file"]:
            try:
                size = conn.storageVolLookupByPath(s["memory_file"]).info()[1]
            except libvirt.libvirtError:
                size = None       # outside mtevm's pool (virsh --memspec file=...): libvirt cannot say
        mte_ram = bool(config and config.get("mte") and config.get("accel") == "tcg" and s["memory_file"])
        return {"vm": name, "tag": s["tag"], "created": s["created"], "parent": s["parent"], "host": self.name,
                "vm_state": s["vm_state"], "config": config, "workload": definition.get("workload"),
                "qemu_args": definition.get("qemu_args", []), "bytes": size, "counters": s["counters"],
                "tags": "saved with RAM (mach-virt.tag block)" if mte_ram else "none",
                "memory_file": s["memory_file"], "taken_by": "mtevm" if s["counters"] is not None else "libvirt"}

    async def snapshot_save(self, vm: "LibvirtVm", tag: str, info: dict) -> dict:
        """virDomainSnapshotCreateXML with the memory in ``<vm>@<tag>.mem`` of mtevm's pool; libvirt
        stops the vCPUs while QEMU writes the state (the mach-virt.tag block included) and lets the
        VM go on as it was. A refusal is libvirt's text, verbatim."""
        libvirt, _, _ = load_libvirt()

        def save(conn):
            dom = vm._domain(conn)
            try:
                dom.snapshotLookupByName(tag)
                raise ConfigError(snapshot_exists_text(vm.name, tag))
            except libvirt.libvirtError:
                pass                  # no snapshot of that name: take it
            pool = _pool(conn)
            path = os.path.join(_pool_path(pool), xml.memory_volume(vm.name, tag))
            started = time.monotonic()
            snap = dom.snapshotCreateXML(xml.snapshot_xml(tag, path, info["counters"]), 0)
            seconds = time.monotonic() - started
            pool.refresh(0)       # the memory file is a volume now: its size is the answer's bytes
            entry = self._snapshot_entry(conn, vm.name, snap.getXMLDesc(0))
            del entry["parent"]
            return {**entry, "seconds": round(seconds, 3)}
        if vm._gone:
            raise StateError(f"VM '{vm.name}': {vm._gone}")
        return await self._call(save)

    async def snapshot_revert(self, spec: VmSpec, tag: str, running: "LibvirtVm | None") -> "LibvirtVm":
        """virDomainRevertToSnapshot: libvirt stops the domain's QEMU (if it runs) and starts one that
        loads the memory file, running or paused as the snapshot was taken. The VM object is new (its
        QEMU is); the old one is retired first, so the revert's own stop event is no crash."""
        name = spec.config.name

        def revert(conn):
            dom = conn.lookupByName(name)
            dom.revertToSnapshot(dom.snapshotLookupByName(tag), 0)
        if running is not None:
            running._stopping = True
        try:
            await self._call(revert)
        except BaseException:
            if running is not None:         # libvirt refused: the domain is as libvirt says
                running._stopping = False
                await running.check_running()
            raise
        if running is not None:
            if self.vms.get(name) is running:
                del self.vms[name]
            await running.close_channels()
        vm = self._attach(spec)
        await vm.check_running()
        return vm

    async def snapshot_delete(self, spec: VmSpec, tag: str) -> None:
        """virDomainSnapshotDelete: libvirt removes the snapshot and its memory file."""
        name = spec.config.name
        await self._call(lambda conn: conn.lookupByName(name).snapshotLookupByName(tag).delete(0))

    # ------------------------------------------------------------------------- VMs
    async def start(self, spec: VmSpec) -> "LibvirtVm":
        """Define and start the domain paused (VIR_DOMAIN_START_PAUSED), attach mtevm's console,
        then resume it: the console log has the guest's first line, as a local VM's (QEMU -S).
        The VM joins ``self.vms`` only once it runs, so the lifecycle events of this paused start
        (suspended, resumed) are never taken for a user's pause (``_on_lifecycle``)."""
        libvirt, _, _ = load_libvirt()
        await self.define(spec)
        try:
            await self._call(lambda conn: conn.lookupByName(spec.config.name).createWithFlags(
                libvirt.VIR_DOMAIN_START_PAUSED))
        except MtevmError as e:
            raise RealizeError(str(e)) from None
        vm = self._new_vm(spec)
        vm.console.log.mark(f"domain {spec.config.name} started on host {self.name}")
        try:
            await vm.run_after_console()
        except BaseException:
            await vm.stop()
            raise
        self.vms[spec.config.name] = vm
        return vm

    def _new_vm(self, spec: VmSpec) -> "LibvirtVm":
        if spec.guest.kind == "linux":
            from backend.hosts.libvirt_linux import LibvirtLinuxVm
            return LibvirtLinuxVm(self, spec)
        return LibvirtVm(self, spec)

    def _attach(self, spec: VmSpec) -> "LibvirtVm":
        vm = self._new_vm(spec)
        self.vms[spec.config.name] = vm
        return vm

    async def reattach(self, spec: VmSpec, runtime: dict) -> "LibvirtVm | None":
        """The domain runs under libvirt, not the daemon: it is picked up by name. Whether it still
        runs is checked once the host is connected (until then it shows as unknown)."""
        vm = self._attach(spec)
        if self.status == "connected":
            await vm.check_running()
        return vm

    async def recheck_vms(self) -> None:
        """After a (re)connection: each VM as libvirt has it now (paused or stopped meanwhile too)."""
        for vm in list(self.vms.values()):
            await vm.check_running()
            if self.publish is not None:
                self.publish("domain", host=self.name, vm=vm.name)


class _ReportedKvm:
    """The host's KVM as libvirt reports it, for the seed's decision tree (backend.machine.realize).

    libvirt says whether KVM is offered and on which arch; it cannot say whether KVM has
    KVM_CAP_ARM_MTE, so an aarch64 KVM is modelled with the MTE capability the host CPU shows.
    """

    def __init__(self, facts: dict):
        self.present = "kvm" in (facts.get("domain_types") or [])
        self.arch = facts.get("arch") or "?"
        self.path = "/dev/kvm"
        self._host_mte = bool(facts.get("host_cpu_mte"))

    def api_version(self) -> int:
        return 12

    def check_extension(self, cap: int) -> int:
        return self._model().check_extension(cap)

    def create_vm(self):
        return self._model().create_vm()

    def _model(self):
        from backend.machine import SimulatedArm64Kvm
        return SimulatedArm64Kvm(host_mte=self._host_mte)


def _close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception:
        pass


def _mtevm_metadata(dom) -> dict | None:
    libvirt, _, _ = load_libvirt()
    try:
        return xml.parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml.NAMESPACE))
    except libvirt.libvirtError:
        return None


# (virDomainEventType, detail) -> what happened, for a domain that stopped by itself
STOP_REASONS = {(5, 0): "the guest powered itself off (libvirt: stopped, shutdown)",
                (5, 1): "the domain was destroyed outside mtevm (libvirt: stopped, destroyed)",
                (5, 2): "QEMU crashed (libvirt: stopped, crashed)",
                (5, 5): "QEMU failed (libvirt: stopped, failed)",
                (8, 0): "the guest panicked (libvirt: crashed, panicked)"}
STOPPED_FROM_SNAPSHOT = (5, 6)   # VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT
DOMAIN_STATES = {0: "unknown", 1: "running", 2: "running", 3: "paused", 4: "stopping", 5: "stopped",
                 6: "crashed", 7: "paused"}   # virDomainState: nostate running blocked paused shutdown shutoff crashed pmsuspended


def _domain_state(dom) -> str:
    return DOMAIN_STATES.get(dom.state()[0], "unknown")


def _pool(conn):
    """mtevm's storage pool on the host (a directory QEMU can read), made on first use."""
    libvirt, _, _ = load_libvirt()
    try:
        pool = conn.storagePoolLookupByName(xml.POOL_NAME)
    except libvirt.libvirtError:
        pool = conn.storagePoolDefineXML(xml.pool_xml())
        pool.build()
        pool.setAutostart(1)
    if not pool.isActive():
        pool.create()
    return pool


def _pool_path(pool) -> str:
    """Where mtevm's pool keeps its files on the host."""
    return ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or xml.POOL_PATH


def _delete_snapshots(dom) -> None:
    """Every snapshot of a domain that is being undefined (libvirt refuses to undefine one that has
    some), with its memory file: leaves first, as libvirt deletes the current external snapshot only
    when it has no children. What libvirt will not delete loses only its metadata (undefine's flag)."""
    libvirt, _, _ = load_libvirt()
    while leaves := dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_LEAVES):
        deleted = 0
        for snap in leaves:
            try:
                snap.delete(0)
                deleted += 1
            except libvirt.libvirtError:
                pass
        if not deleted:
            return


def _finished(task: asyncio.Task) -> None:
    """A background task's end: its exception is logged, a cancelled one (the daemon closing) is not."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("libvirt event handling failed: %s", task.exception())


def _upload(conn, name: str, data: bytes) -> str:
    """Put ``data`` into volume ``name`` of mtevm's pool (libvirt streams it, over ssh too); its path."""
    libvirt, _, _ = load_libvirt()
    pool = _pool(conn)
    try:
        pool.storageVolLookupByName(name).delete()
    except libvirt.libvirtError:
        pass
    vol = pool.createXML(xml.volume_xml(name, len(data)))
    stream = conn.newStream()
    vol.upload(stream, 0, len(data))
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        sent += stream.send(bytes(view[sent:sent + 256 * 1024]))
    stream.finish()
    return vol.path()


def _delete_volumes(conn, vm: str) -> None:
    libvirt, _, _ = load_libvirt()
    try:
        pool = conn.storagePoolLookupByName(xml.POOL_NAME)
    except libvirt.libvirtError:
        return
    try:
        pool.refresh(0)
        snapshots = [v.name() for v in pool.listAllVolumes() if v.name().startswith(vm + "@")]
    except libvirt.libvirtError:
        snapshots = []
    for name in (*xml.volumes(vm), *snapshots):
        try:
            pool.storageVolLookupByName(name).delete()
        except libvirt.libvirtError:
            pass


# --- a VM ------------------------------------------------------------------------------------------
class LibvirtVm(GuestStatusView, RunningVm):
    """An mtevm VM running as a libvirt domain; counters through HMP ``xp`` passthrough."""

    stop_call = "virDomainDestroy"

    def __init__(self, host: LibvirtHost, spec: VmSpec):
        self.host = host
        self.spec = spec
        self.name = spec.config.name
        self._gone: str | None = None        # why the domain stopped without mtevm (then "crashed")
        self._dom = None
        self._dom_generation = -1
        self._closed = False                 # the console (and agent) sessions were ended
        self._init_status()
        # The PL011 is <serial type='pty'>, read through virDomainOpenConsole (FORCE: a previous
        # daemon's session gives way), bridged into the same SerialConsole a local VM has.
        self.console = SerialConsole(f"{host.name}:{self.name}:serial", ConsoleLog(spec.log_dir), self._guest_running,
                                     on_panic=self._on_panic,
                                     connect=lambda: self._open_stream(self._open_console, 2 ** 16)).start()

    @property
    def state(self) -> str:
        return "crashed" if self._gone else "running"

    def domain_stopped(self, event: int, detail: int) -> None:
        """libvirt's lifecycle event for a domain that stopped without mtevm asking. A revert to a
        snapshot (``virsh snapshot-revert``) stops it only to start it again from the snapshot."""
        if (event, detail) == STOPPED_FROM_SNAPSHOT:
            return
        if self.host.vms.get(self.name) is self and not self._stopping:
            self._gone = STOP_REASONS.get((event, detail), f"the domain stopped (libvirt event {event}, detail {detail})")

    _stopping = False

    def _guest_running(self) -> bool:
        return not self._gone and not self._closed and not self._stopping

    def _on_panic(self, lines: list[str]) -> None:
        """A kernel panic on the console (the built-in guest has no kernel: LibvirtLinuxVm's)."""

    async def _open_stream(self, open_fn, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The serial console (or the Linux guest's agent port) as a stream pair: libvirt's stream,
        bridged to a socket pair. OSError (retried by the caller) while the host or domain is not there."""
        if self.host.status != "connected":
            raise OSError(f"host {self.host.name} is not connected")
        try:
            stream = await self.host._call(open_fn)
        except MtevmError as e:
            raise OSError(str(e)) from None
        return await open_bridged(stream, self.name, limit)

    def _open_console(self, conn):
        libvirt, _, _ = load_libvirt()
        stream = conn.newStream(0)
        self._domain(conn).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        return stream

    async def run_after_console(self, timeout: float = CONSOLE_WAIT) -> None:
        """Resume the domain started paused once mtevm reads its console (QEMU drops what the
        guest prints while nobody holds the pty): the log has the guest's first line."""
        try:
            await asyncio.wait_for(self.console.connected.wait(), timeout)
        except TimeoutError:
            pass   # run anyway: a VM without its first console lines beats a VM that does not start
        try:
            await self._dom_call("resume")
        except MtevmError as e:
            raise RealizeError(f"libvirt did not resume the domain started paused: {e}") from None

    async def close_channels(self) -> None:
        """Stop reading the console (the VM stopped or moved, or the daemon exits)."""
        self._closed = True
        await self.console.close()

    def stderr_tail(self) -> list[str]:
        return self.guest_error_lines() + ([self._gone] if self._gone else [])

    def runtime_info(self) -> dict:
        return {"host": self.host.name, "domain": self.name}

    def _domain(self, conn):
        if self._dom is None or self._dom_generation != self.host._generation:
            self._dom = conn.lookupByName(self.name)
            self._dom_generation = self.host._generation
        return self._dom

    async def check_running(self) -> None:
        """After a (re)connection: is the domain still running?"""
        try:
            state = await self.host._call(lambda conn: _domain_state(self._domain(conn)))
        except MtevmError as e:
            state = f"gone ({e})"
        if state not in ("running", "paused"):
            self._gone = f"the domain is not running on host {self.host.name} any more (libvirt: {state})"
        self.paused = state == "paused"     # a domain paused before the daemon came back stays paused

    async def monitor(self, command: str, hmp: bool = False) -> str:
        """A QMP (or, with ``hmp``, HMP) command through libvirt's monitor passthrough."""
        _, libvirt_qemu, _ = load_libvirt()
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0
        return await self.host._call(lambda conn: libvirt_qemu.qemuMonitorCommand(self._domain(conn), command, flags))

    # ------------------------------------------------------------------- everyday operations
    # Through libvirt's own calls (virsh suspend / resume / reset / domjobabort), so libvirt's view of
    # the domain stays right; the bare-metal guest has no agent, so reboot is a reset and shutdown
    # a destroy (the Service says so).
    async def _dom_call(self, method: str, *args) -> None:
        if self._gone:
            raise StateError(f"VM '{self.name}': {self._gone}")
        await self.host._call(lambda conn: getattr(self._domain(conn), method)(*args))

    async def pause(self) -> None:
        await self._dom_call("suspend")
        self.paused = True

    async def resume(self) -> None:
        await self._dom_call("resume")
        self.paused = False

    async def refresh_run_state(self) -> None:
        if not self._gone and self.host.status == "connected":
            try:
                state = await self.host._call(lambda conn: _domain_state(self._domain(conn)))
            except MtevmError:
                return
            self.paused = state == "paused"

    async def reset(self) -> None:
        await self._dom_call("reset", 0)

    _cancel_wanted = False       # migrate-cancel asked; migrate_to repeats it until libvirt's job exists

    async def cancel_migration(self) -> None:
        self._cancel_wanted = True
        try:
            await self._dom_call("abortJob")
        except MtevmError:
            return           # no job yet (libvirt still prepares): migrate_to aborts it once it runs
        self._cancel_wanted = False

    async def sample(self) -> list[dict]:
        if self._gone or self.host.status != "connected":
            return self.vcpus()
        try:
            text = await self.monitor(guest_abi.xp_command(self.spec.config.vcpus), hmp=True)
        except MtevmError:
            return self.vcpus()     # the host went away (it shows unknown) or the domain did
        return self._apply_status(self._parse_xp(text), list(range(self.spec.config.vcpus)))

    async def blocked_reasons(self) -> list[str]:
        if self._gone or self.host.status != "connected":
            return []
        import json
        try:
            reply = json.loads(await self.monitor('{"execute":"query-migrate"}'))
        except MtevmError:
            return []      # the domain went away meanwhile: the sampler marks it
        return list(reply.get("return", {}).get("blocked-reasons", []))

    async def stop(self) -> None:
        """Power off (virDomainDestroy: the bare-metal guest has no ACPI shutdown)."""
        libvirt, _, _ = load_libvirt()
        self._stopping = True

        def destroy(conn):
            try:
                self._domain(conn).destroy()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:   # already shut off
                    raise
        try:
            if not self._gone:
                await self.host._call(destroy)
        except BaseException:
            self._stopping = False    # still running (e.g. the host is unreachable)
            raise
        if self.host.vms.get(self.name) is self:
            del self.host.vms[self.name]
        await self.close_channels()

    # ------------------------------------------------------------------------- migration
    def _migrate_flags(self) -> int:
        libvirt, _, _ = load_libvirt()
        return (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)

    def _migrate(self, conn, dst: LibvirtHost) -> None:
        libvirt, _, _ = load_libvirt()
        params = {libvirt.VIR_MIGRATE_PARAM_URI: MIGRATE_URI}
        self._domain(conn).migrateToURI3(dst.uri, params, self._migrate_flags())

    async def refusal_text(self, dst: Host, reasons: list[str]) -> str:
        """QEMU reports blockers (query-migrate): ask libvirt, whose refusal is shown verbatim."""
        if not isinstance(dst, LibvirtHost):
            return reasons[0]
        try:
            await self.host._call(self._migrate, dst)
        except MtevmError as e:
            return str(e)
        raise MigrationError("libvirt migrated the VM although QEMU reported a blocker: " + reasons[0])

    async def migrate_to(self, dst: Host, spec: VmSpec, with_tags: bool,
                         progress: ProgressCallback) -> "LibvirtVm":
        """Live, peer-to-peer migration (the source libvirtd talks to the destination's), the
        domain persistent on the destination and undefined here. Progress from the job info.
        Under TCG the tags travel as QEMU's ``mach-virt.tag`` RAM block."""
        libvirt, _, _ = load_libvirt()
        if not isinstance(dst, LibvirtHost):
            raise MigrationError(self.host.can_migrate_to(dst) or f"cannot migrate a libvirt VM to host {dst.name}")
        if dst.status != "connected":
            raise MigrationError(dst.unreachable_text())
        # The destination QEMU loads the same files: put them into its pool first.
        files = self.host.guest_files(spec)
        await dst._call(lambda conn: [_upload(conn, vol, data) for vol, data in files.items()])
        self._stopping = True
        started = time.monotonic()
        job = asyncio.get_running_loop().create_task(self.host._call(self._migrate, dst))
        stats: dict = {}
        try:
            while not job.done():
                await asyncio.wait([job], timeout=MIGRATION_POLL)
                if job.done():
                    break
                if self._cancel_wanted:        # mtevm migrate-cancel before libvirt's job existed
                    await self.cancel_migration()
                try:
                    info = await self.host._call(lambda conn: self._domain(conn).jobStats())
                except MtevmError:
                    continue
                stats = _job_stats(info, spec.config.memory)
                total = info.get("data_total") or spec.config.memory
                await report_progress(progress, min(0.99, (info.get("data_processed") or 0) / total), stats)
            job.result()
        except MtevmError as e:
            self._stopping = self._cancel_wanted = False
            raise MigrationError(str(e)) from None
        except BaseException:
            self._stopping = self._cancel_wanted = False
            if not job.done():
                try:
                    await self.host._call(lambda conn: self._domain(conn).abortJob())
                except MtevmError:
                    pass
            raise
        if self.host.vms.get(self.name) is self:
            del self.host.vms[self.name]
        try:
            await self.host._call(_delete_volumes, self.name)
        except MtevmError:
            pass
        await self.close_channels()      # the source domain is gone: its console session with it
        target = dst._attach(spec)
        target._take_history(self)
        stats.update(status="completed", total_time_ms=round((time.monotonic() - started) * 1000),
                     tags="migrated with RAM (TCG mach-virt.tag block)" if spec.config.mte else "none",
                     with_tags=with_tags, ram_total=spec.config.memory)
        await report_progress(progress, 1.0, stats)
        return target


def _job_stats(info: dict, memory: int) -> dict:
    """virDomainGetJobStats' typed parameters as the migration stats (query-migrate's RAM names)."""
    ram = {"total": info.get("memory_total", memory), "transferred": info.get("memory_processed", 0),
           "remaining": info.get("memory_remaining", 0), "duplicate": info.get("memory_constant", 0),
           "normal": info.get("memory_normal", 0), "page-size": info.get("memory_page_size", 4096)}
    return {"status": "active", **ram_stats(ram), "downtime_ms": info.get("downtime")}
