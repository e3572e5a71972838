"""The ``local`` host: real qemu-system-aarch64 VMs on this machine, driven over QMP.

Each VM is one QEMU process (backend.qemu.driver) running mtevm's bare-metal guest, which takes
real tag-check faults and keeps per-vCPU counters in a status block that this module reads over
QMP. Under TCG (any host) QEMU keeps the tags in its ``mach-virt.tag`` RAM block; with KVM (an
arm64 host with MTE) the hardware does and ``kvm_mte`` is true.

Where QEMU 9.2 aborts (KVM MTE with ``-only-migratable`` hits ``&error_abort``), mtevm checks the
config with backend.machine.realize first and fails that one VM's start with the error text
instead: a deliberate departure from QEMU, as everywhere in mtevm.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shlex
import shutil
import socket
import tempfile
from dataclasses import replace
from typing import Sequence

from backend.errors import ConfigError, MigrationError, RealizeError, StateError
from backend.hosts import disk_snapshots
from backend.hosts.base import Host, ProgressCallback, Recovery, RunningVm, VmSpec, report_progress
from backend.hosts.guest_status import GuestStatusView
from backend.machine import VirtMachineConfig
from backend.machine.migration import ram_stats
from backend.paths import open_private_path
from backend.qemu import guest_abi
from backend.guests.definition import disk_format
from backend.qemu.argv import LaunchFiles, build_argv, find_qemu, validate_extra_args
from backend.qemu.console import ConsoleLog, SerialConsole
from backend.qemu.driver import (REATTACH_TIMEOUT, QemuFiles, QemuProcess, kill_pid, marked_processes,
                                 read_records)
from backend.qemu.qmp import QmpError, QmpGone

GUEST_ENV = "MTEVM_GUEST"     # another guest ELF (a development build), like $MTEVM_QEMU for QEMU
GUEST_ELF = str(guest_abi.GUEST_ELF)
MIGRATION_POLL = 0.02       # seconds between query-migrate polls while a migration runs
MIGRATION_TIMEOUT = 120.0   # a stalled migration is cancelled after this long
SAVE_TIMEOUT = 120.0        # writing or loading a snapshot's state file
PAUSED_STATUSES = ("paused", "postmigrate", "prelaunch", "suspended", "debug", "io-error", "watchdog",
                   "guest-panicked", "internal-error", "shutdown")
LOOPBACK = "127.0.0.1"
CONSOLE_CONNECT_TIMEOUT = 5.0   # seconds a paused QEMU waits for the daemon to attach its console

log = logging.getLogger("mtevm.local")


def free_tcp_port() -> int:
    """A TCP port on loopback nobody listens on now (QEMU binds it a moment later; a lost race
    shows as QEMU's own "Address already in use" and is retried once)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalHost(Host):
    """This machine. Its probe is real; its VMs are QEMU processes that outlive the daemon."""

    kind = "local"
    reattach_timeout = REATTACH_TIMEOUT   # seconds a found QEMU gets to answer on QMP

    def __init__(self, runtime_dir: str | None = None, *, name: str = "local",
                 qemu_binary: str | None = None, guest_elf: str | None = None):
        self.name = name
        self.description = "this machine: real qemu-system-aarch64 VMs (TCG, or KVM on an arm64 host with MTE)"
        self.runtime_dir = runtime_dir   # None: a private temporary directory, made when first needed
        self.qemu_binary = qemu_binary
        self.guest_elf = guest_elf or os.environ.get(GUEST_ENV) or GUEST_ELF
        self._probe: dict | None = None
        self.vms: set[LocalVm] = set()

    # ------------------------------------------------------------------------- capability
    def probe(self) -> dict:
        """backend.machine.probe_local(): QEMU's version, mte and accelerators, /dev/kvm, the CPU."""
        from backend.machine import probe_local
        self._probe = probe_local(self.qemu_binary).to_dict()
        return self._probe

    def _facts(self) -> dict:
        return self._probe if self._probe is not None else self.probe()

    def _unavailable_reason(self) -> str | None:
        qemu = self._facts()["qemu"]
        if not qemu.get("binary"):
            return qemu.get("reason") or "qemu-system-aarch64 not found: run `bash scripts/install-deps.sh`"
        if not qemu.get("usable_for_mte"):
            return qemu.get("reason") or f"QEMU {qemu.get('version')} cannot run MTE guests (needs >= 8.0)"
        return self._guest_missing()

    def _guest_missing(self) -> str | None:
        """Why the guest ELF cannot be booted (not built), or None."""
        if not os.path.exists(self.guest_elf):
            return f"the mtevm guest is not built ({self.guest_elf}): run `make -C backend/qemu/guest`"
        return None

    def info(self) -> dict:
        facts = self._facts()
        reason = self._unavailable_reason()
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "arch": facts["cpu"].get("arch") or platform.machine(),
                "kvm_mte": bool(facts["kvm"].get("present") and facts["kvm"].get("cap_arm_mte")
                                and facts["cpu"].get("mte")),
                "available": reason is None, "reason": reason}

    def check_config(self, config: VirtMachineConfig) -> None:
        """The seed's decision tree for ``config`` here, without starting QEMU: TCG rules through
        backend.machine.dry_run (KVM ones against the real /dev/kvm), QEMU's own text when this
        QEMU has no such accelerator, and the guest's limits."""
        from backend.machine import RealKvmDevice, dry_run
        config.validate()
        if config.vcpus > guest_abi.MAX_VCPUS:
            raise ConfigError(f"the mtevm guest runs on 1 to {guest_abi.MAX_VCPUS} vCPUs, not {config.vcpus}")
        qemu = self._facts()["qemu"]
        binary = os.path.basename(find_qemu(self.qemu_binary))
        if config.mte and not qemu.get("usable_for_mte"):
            raise RealizeError(qemu.get("reason") or f"QEMU {qemu.get('version')} cannot run MTE guests")
        if config.accel not in (qemu.get("accels") or []):
            raise RealizeError(f"{binary}: -accel {config.accel}: invalid accelerator {config.accel}")
        kvm = RealKvmDevice() if config.accel == "kvm" else None
        try:
            dry_run(config, kvm)
        finally:
            if kvm is not None:
                kvm.close()

    def check_extra_args(self, extra_args, *, allow_host_files: bool = False) -> list[str]:
        """``-object``/``-device`` pairs for QEMU's command line (e.g. an ivshmem device); none may
        name a host file unless ``allow_host_files``."""
        return validate_extra_args(extra_args, allow_host_files=allow_host_files)

    # ----------------------------------------------------------------------------- VMs
    def _vm_dir(self, spec: VmSpec) -> str:
        if spec.runtime_dir:
            return spec.runtime_dir
        if self.runtime_dir is None:
            self.runtime_dir = tempfile.mkdtemp(prefix="mtevm-local-")
        return os.path.join(self.runtime_dir, "vms", spec.config.name)

    async def start(self, spec: VmSpec, extra_args: list[str] | None = None) -> "LocalVm":
        """Boot ``spec`` in a new QEMU. ``extra_args`` (``-object``/``-device`` pairs; by default
        ``spec.extra_args``, the definition's qemu_args) go on QEMU's command line."""
        if extra_args is None:
            extra_args = spec.extra_args
        return await self._launch(spec, validate_extra_args(extra_args, allow_host_files=spec.allow_host_files))

    async def _launch(self, spec: VmSpec, extra_args: list[str], incoming_port: int | None = None,
                      incoming: str | None = None) -> "LocalVm":
        config = spec.config
        if config.accel != "tcg":
            self.check_config(config)    # per-VM error where QEMU would abort (see module doc)
        qemu = find_qemu(self.qemu_binary)
        if spec.guest.kind == "builtin":
            missing = self._guest_missing()
            if missing:
                raise RealizeError(missing)
        else:
            spec.guest.validate()   # its files may have gone or changed since the VM was defined
        spec.workload.validate()
        files = QemuFiles.new(self._vm_dir(spec))
        argv, params = self.launch_argv(spec, files, extra_args, incoming_port, qemu=qemu, incoming=incoming)
        try:
            proc = await QemuProcess.launch(argv, files, record={"extra_args": extra_args, "params": params})
        except BaseException:
            _remove(params)
            raise
        vm = vm_class(spec)(self, spec, proc, extra_args, params)
        if incoming_port is None and incoming is None:
            vm.console.log.mark(f"QEMU pid {proc.pid} started")
            try:   # QEMU waits (-S) until the console is connected: the log has the guest's first line
                await vm.run_after_console()
            except BaseException:
                await vm.stop()
                raise
        self.vms.add(vm)
        return vm

    def launch_argv(self, spec: VmSpec, files: QemuFiles, extra_args: Sequence[str] = (),
                    incoming_port: int | None = None, *, qemu: str | None = None,
                    incoming: str | None = None) -> tuple[list[str], str | None]:
        """QEMU's argv for ``spec`` and the guest parameter file it loads (written here; None for a
        Linux guest): the one recipe a VM, its migration destination and the start-up benchmark all run."""
        argv, params, block = self._argv(spec, files, extra_args, incoming_port, qemu, incoming)
        if params:
            with os.fdopen(open_private_path(params, os.O_WRONLY | os.O_TRUNC), "wb") as f:
                f.write(block)
        return argv, params

    def preview_argv(self, spec: VmSpec, extra_args: Sequence[str] | None = None) -> list[str]:
        """The command line ``start`` would run now (``mtevm show --argv`` of a stopped VM): the
        per-launch names are shown as ``LAUNCH``, and nothing is written."""
        files = QemuFiles(self._vm_dir(spec), "LAUNCH", os.path.join(self._vm_dir(spec), "qmp-LAUNCH.sock"),
                          os.path.join(self._vm_dir(spec), "qemu-LAUNCH.log"))
        return self._argv(spec, files, spec.extra_args if extra_args is None else extra_args, None, None)[0]

    def _argv(self, spec: VmSpec, files: QemuFiles, extra_args: Sequence[str], incoming_port: int | None,
              qemu: str | None, incoming: str | None = None) -> tuple[list[str], str | None, bytes]:
        config, guest = spec.config, spec.guest
        launch = LaunchFiles(files.qmp_socket, serial_socket=files.socket("serial"))
        params, block = None, b""
        if guest.kind == "builtin":
            params = files.path("params") + ".bin"
            block = guest_abi.pack_params(spec.workload, config.vcpus, ram_size=config.memory)
            launch = replace(launch, kernel=self.guest_elf, params_file=params, param_addr=guest_abi.PARAM_ADDR)
        else:
            kernel, initrd, append = linux_boot(spec)
            launch = replace(launch, kernel=kernel, initrd=initrd, append=append,
                             agent_socket=files.socket("agent") if guest.has_agent else None,
                             disks=tuple((d, disk_format(d)) for d in guest.disks))
        argv = build_argv(config, launch, qemu=qemu or find_qemu(self.qemu_binary), extra_args=extra_args,
                          incoming=f"tcp:{LOOPBACK}:{incoming_port}" if incoming_port else incoming,
                          allow_host_files=spec.allow_host_files)
        if guest.kind != "builtin" and config.accel == "tcg" and config.cpu == "max":
            # Linux signs return addresses with pointer authentication; TCG's architected QARMA
            # is slow, QEMU's implementation-defined algorithm is not (a guest-visible choice of
            # -cpu max, made for kernels only: the builtin guest does not use PAC).
            argv[argv.index("-cpu") + 1] = "max,pauth-impdef=on"
        if not incoming_port and not incoming:
            argv.append("-S")   # start paused; LocalVm.run_after_console lets it run
        return argv, params, block

    async def start_incoming(self, spec: VmSpec, extra_args: list[str]) -> tuple["LocalVm", int]:
        """A migration destination: the same argv plus ``-incoming tcp:127.0.0.1:PORT``."""
        for attempt in range(2):
            port = free_tcp_port()
            try:
                return await self._launch(spec, extra_args, incoming_port=port), port
            except RealizeError as e:
                if attempt or "Address already in use" not in str(e):
                    raise
        raise AssertionError("unreachable")

    def clone_storage(self, src: VmSpec, dst: VmSpec) -> list[str]:
        """Copy each disk of ``src`` beside it as ``<name>-<clone><ext>``: a new file (never over an
        existing one), made through the checked helper (a directory others can write to is refused,
        as everywhere mtevm creates files). Returns the copies in order, or removes them all and raises."""
        made: list[str] = []
        try:
            for disk in src.guest.disks:
                root, ext = os.path.splitext(disk)
                copy = f"{root}-{dst.config.name}{ext}"
                with open(disk, "rb") as fin:
                    fd = open_private_path(copy, os.O_WRONLY, exclusive=True)
                    made.append(copy)
                    with os.fdopen(fd, "wb") as fout:
                        shutil.copyfileobj(fin, fout, 1 << 20)
        except ConfigError as e:
            _remove_all(made)
            raise ConfigError(f"clone: {e}; move it away or clone under another name" if "already exists" in str(e)
                              else f"clone: {e}") from None
        except OSError as e:
            _remove_all(made)
            raise ConfigError(f"clone: cannot copy disk {e.filename}: {e.strerror}") from None
        return made

    # ------------------------------------------------------------------------- snapshots
    def snapshot_refusal(self) -> str | None:
        return None     # QEMU writes the whole state, the mach-virt.tag block included, to a file

    def state_uri(self, path: str, *, write: bool) -> str:
        """The migration URI that writes/reads ``path``: ``file:`` (QEMU >= 8.2), else ``exec:cat``."""
        version = self._facts()["qemu"].get("version") or "0"
        major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
        if major_minor >= (8, 2) and "," not in path:
            return f"file:{path}"
        return f"exec:cat {'> ' if write else ''}{shlex.quote(path)}"

    async def restore(self, spec: VmSpec, state_file: str, *, paused: bool) -> "LocalVm":
        """A new QEMU with the same argv plus ``-incoming`` reading ``state_file``. The state was
        saved with the vCPUs stopped, so QEMU stays paused after loading it; ``cont`` unless the
        snapshot was of a paused VM."""
        vm = await self._launch(spec, validate_extra_args(spec.extra_args, allow_host_files=spec.allow_host_files),
                                incoming=self.state_uri(state_file, write=False))
        vm.console.log.mark(f"QEMU pid {vm.proc.pid} started from a snapshot")
        try:
            await vm.wait_loaded(SAVE_TIMEOUT)
            if not paused:
                await vm.resume()
            else:
                vm.paused = True
                if spec.guest.disks:    # QEMU >= 10 leaves an incoming VM's disks inactive until cont
                    await vm._reactivate_disks()
        except BaseException:
            await vm.stop()
            raise
        return vm

    def disk_snapshot_refusal(self, spec: VmSpec) -> str | None:
        return disk_snapshots.raw_refusal(spec.config.name, spec.guest.disks)

    async def snapshot_disks(self, spec: VmSpec, tag: str, running: "LocalVm") -> list[dict]:
        return await disk_snapshots.take(running.proc.qmp, spec.guest.disks, tag) if spec.guest.disks else []

    async def disk_inventory(self, spec: VmSpec, running: "LocalVm | None") -> dict[str, dict]:
        if running is not None:     # QEMU has them open (and locked): ask it
            try:
                return await disk_snapshots.qmp_inventory(running.proc.qmp, spec.guest.disks)
            except QmpGone:         # it died a moment ago (not yet seen as crashed): its locks went with it
                await running.proc.wait(2.0)
        return await disk_snapshots.file_inventory(spec.guest.disks)

    async def revert_disks(self, spec: VmSpec, saved: list[dict], tag: str) -> None:
        await disk_snapshots.revert_files(saved, tag)

    async def delete_disk_snapshots(self, spec: VmSpec, saved: list[dict], tag: str,
                                    running: "LocalVm | None") -> None:
        if running is not None:
            try:
                return await disk_snapshots.delete_live(running.proc.qmp, saved, spec.guest.disks, tag)
            except QmpGone:
                await running.proc.wait(2.0)
        await disk_snapshots.delete_files(saved, tag)

    async def reattach(self, spec: VmSpec, runtime: dict) -> "LocalVm | None":
        """Find the QEMU an earlier daemon left running (checked by pid and start time)."""
        proc = await QemuProcess.reattach(runtime, self.reattach_timeout)
        if proc is None:
            _remove(runtime.get("params"))
            return None
        if proc.unreachable:
            # A QEMU mtevm cannot talk to is of no use and must not run on unseen: stop it.
            await proc.stop()
            _remove(runtime.get("params"))
            raise StateError(f"QEMU pid {proc.pid} did not answer on QMP ({proc.unreachable}); it was stopped")
        vm = vm_class(spec)(self, spec, proc, list(runtime.get("extra_args", [])), runtime.get("params"))
        vm.console.log.mark(f"reattached to QEMU pid {proc.pid} by a new mtevm daemon")
        self.vms.add(vm)
        await vm.refresh_run_state()    # it may have been paused
        return vm

    async def recover(self, spec: VmSpec, runtime: dict, *, want_running: bool) -> Recovery:
        """Find out from QEMU itself what became of this VM while no daemon watched it.

        Every QEMU of the VM is found by its launch record (pid + start time, written before the
        launch returned) or the saved ``runtime``; one launched but never recorded (a daemon killed
        within microseconds of the fork) by mtevm's mark on its command line, and killed. Each is
        asked ``query-status``; a source whose outgoing migration still runs is given
        SETTLE_TIMEOUT to finish, then cancelled. The QEMU that really runs the guest is adopted
        (a completed migration's destination, else the source) and every other one is stopped,
        so one VM never has two QEMUs and a stopped VM has none."""
        vm_dir = self._vm_dir(spec)
        source_pid = runtime.get("pid") if runtime else None
        records = read_records(vm_dir)
        if runtime and all(r["pid"] != source_pid for r in records):
            records.insert(0, runtime)
        found: list[tuple[dict, QemuProcess]] = []
        for record in records:
            try:
                proc = await QemuProcess.reattach(record, self.reattach_timeout)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("VM %s: cannot reattach pid %s: %s", spec.config.name, record.get("pid"), e)
                proc = None
            if proc is None:
                _remove(record.get("params"))
                _remove(QemuFiles.from_dict(record["files"]).record)
            else:
                found.append((record, proc))
        stopped = []
        known = {proc.pid for _, proc in found}
        for pid, start in marked_processes(vm_dir).items():
            if pid not in known and await kill_pid(pid, start):
                stopped.append(pid)
        statuses = {}
        if want_running:
            for _, proc in found:
                statuses[proc.pid] = await _settled_status(proc)
            if "postmigrate" in statuses.values():   # a completed migration: its destination starts running
                for _, proc in found:
                    if statuses[proc.pid] == "inmigrate":
                        statuses[proc.pid] = await _left_inmigrate(proc)
        if found or stopped:
            log.info("VM %s: found %s; killed unrecorded %s", spec.config.name,
                     {p.pid: statuses.get(p.pid, "-") for _, p in found}, stopped)
        # The one to adopt: a QEMU running the guest (two running, never seen: the source wins), else
        # one a start left paused (-S) before it let the guest run ("prelaunch": it runs once adopted).
        # A VM the user paused is adopted paused.
        order = ("running", "paused", "prelaunch")
        running = [(r, p) for r, p in found if statuses.get(p.pid) in order]
        running.sort(key=lambda rp: (order.index(statuses[rp[1].pid]), rp[1].pid != source_pid))
        adopted = running[0] if running else None
        for record, proc in found:
            if adopted is None or proc is not adopted[1]:
                await proc.stop()
                _remove(record.get("params"))
                stopped.append(proc.pid)
        if adopted is None:
            seen = ", ".join(f"pid {p.pid} {statuses[p.pid]}" for _, p in found if p.pid in statuses)
            return Recovery(None, stopped=stopped,
                            reason=f"no QEMU of the VM was running the guest ({seen})" if seen else None)
        record, proc = adopted
        vm = vm_class(spec)(self, spec, proc, list(record.get("extra_args", [])), record.get("params"))
        vm.console.log.mark(f"QEMU pid {proc.pid} adopted by a new mtevm daemon")
        if statuses[proc.pid] == "prelaunch":
            try:
                await vm.run_after_console()
            except RealizeError:
                await vm.stop()
                return Recovery(None, stopped=stopped + [proc.pid], reason="QEMU did not start the guest")
        self.vms.add(vm)
        await vm.refresh_run_state()    # paused by the user: it stays paused
        moved = source_pid is not None and proc.pid != source_pid
        return Recovery(vm, stopped=stopped, moved=moved, others=len(found) > 1)

    async def reap(self) -> list[int]:
        """Kill every QEMU this host launched (mtevm's mark under its runtime root) that no VM
        adopted: a deleted VM's, or one whose daemon died before it could tell anyone."""
        if self.runtime_dir is None:
            return []
        adopted = {vm.proc.pid for vm in self.vms}
        killed = []
        for pid, start in marked_processes(self.runtime_dir).items():
            if pid not in adopted and await kill_pid(pid, start):
                killed.append(pid)
        return killed

    def forget(self, spec: VmSpec) -> None:
        """The VM is deleted: remove its runtime directory (QEMU logs, stale records) too."""
        shutil.rmtree(self._vm_dir(spec), ignore_errors=True)

    async def close(self) -> None:
        """The daemon exits: drop QMP, console and agent connections, leave QEMU running for the
        next daemon (which reconnects all three)."""
        for vm in list(self.vms):
            await vm.close_channels()
            await vm.proc.detach()
        self.vms.clear()


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        _remove(path)


MIGRATING = ("setup", "active", "device", "pre-switchover", "wait-unplug", "cancelling",
             "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup")
SETTLE_TIMEOUT = 10.0       # a migration nobody watched gets this long to end by itself, then is cancelled


async def _settled_status(proc: QemuProcess) -> str:
    """The QEMU's run state once any outgoing migration it runs has ended (finished or cancelled)."""
    if proc.unreachable or not proc.alive():
        return "unreachable"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    cancelled = False
    try:
        while True:
            status = (await proc.qmp.execute("query-status"))["status"]
            if status == "inmigrate":
                return status     # a destination: it follows its source
            migration = (await proc.qmp.execute("query-migrate")).get("status")
            if migration not in MIGRATING:
                return status
            if loop.time() > deadline and not cancelled:
                await proc.qmp.execute("migrate_cancel")
                cancelled, deadline = True, loop.time() + SETTLE_TIMEOUT
            elif loop.time() > deadline:
                return status
            await asyncio.sleep(MIGRATION_POLL)
    except QmpError as e:
        return f"unreachable ({e})"


async def _left_inmigrate(proc: QemuProcess, timeout: float = 3.0) -> str:
    """A destination's run state once it has loaded what its (completed) source sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            status = (await proc.qmp.execute("query-status"))["status"]
            if status != "inmigrate" or loop.time() > deadline:
                return status
            await asyncio.sleep(MIGRATION_POLL)
    except QmpError as e:
        return f"unreachable ({e})"


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


class LocalVm(GuestStatusView, RunningVm):
    """One real VM. Counters come from the guest's status block, read when the daemon samples."""

    def __init__(self, host: LocalHost, spec: VmSpec, proc: QemuProcess, extra_args: list[str],
                 params_file: str | None):
        self.host = host
        self.spec = spec
        self.proc = proc
        self.extra_args = extra_args
        self.params_file = params_file
        self._init_status()
        self._cpu_indexes: list[int] | None = None   # from query-cpus-fast, once: vCPUs don't change
        self._cancel_wanted = False     # the user cancelled this VM's outgoing migration
        self.console = SerialConsole(proc.files.socket("serial"), ConsoleLog(spec.log_dir or self.host._vm_dir(spec)),
                                     proc.alive).start()
        proc.on_exit(self._on_exit)

    # ------------------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        if self.proc.alive():
            return "running"
        return "stopped" if self.proc.stopping else "crashed"

    def _on_exit(self, proc: QemuProcess) -> None:
        if not proc.stopping:
            self.host.vms.discard(self)
            _remove(self.params_file)
            self.console.log.mark(f"QEMU exited: {proc.exit_reason()}")

    async def run_after_console(self, timeout: float = CONSOLE_CONNECT_TIMEOUT) -> None:
        """Let a QEMU started with -S run once the daemon reads its console (so no boot output is
        lost: QEMU drops serial output while nobody is connected)."""
        try:
            await asyncio.wait_for(self.console.connected.wait(), timeout)
        except TimeoutError:
            pass   # run anyway: a VM without its first console lines beats a VM that does not start
        try:
            await self.proc.qmp.execute("cont")
        except QmpError as e:
            raise RealizeError(f"QEMU did not start the guest: {e}") from None

    async def close_channels(self) -> None:
        """Stop reading the console (and, for Linux guests, the agent)."""
        await self.console.close()

    def argv(self) -> list[str]:
        """The QEMU command line this VM runs."""
        return list(self.proc.argv)

    def guest_facts(self) -> dict | None:
        """What the guest says about itself (Linux guests with the agent); None for the others."""
        return None

    def processes(self) -> list[dict]:
        """Per-process tag-check faults (Linux guests with the agent); [] for the others."""
        return []

    def stderr_tail(self) -> list[str]:
        lines = self.proc.stderr_tail() + self.guest_error_lines()
        if not self.proc.alive() and not self.proc.stopping:
            lines.append(self.proc.exit_reason())
        return lines

    def runtime_info(self) -> dict:
        if not self.proc.alive():
            return {}
        return {**self.proc.runtime_info(), "qmp_socket": self.proc.files.qmp_socket,
                "extra_args": self.extra_args, "params": self.params_file}

    # --------------------------------------------------------------------------- counters
    async def read_status(self) -> bytes:
        """The guest's raw status block, read over QMP (``xp``: works running, paused or migrated)."""
        text = await self.proc.qmp.hmp(guest_abi.xp_command(self.spec.config.vcpus))
        return self._parse_xp(text)

    async def sample(self) -> list[dict]:
        if not self.proc.alive():
            return self.vcpus()
        try:
            if self._cpu_indexes is None:   # QEMU's own vCPU list, asked once (not per sample)
                cpus = await self.proc.qmp.execute("query-cpus-fast")
                self._cpu_indexes = sorted(c["cpu-index"] for c in cpus)
            raw = await self.read_status()
        except QmpError:
            return self.vcpus()     # QEMU went away: the exit watch marks the VM crashed
        return self._apply_status(raw, self._cpu_indexes)

    # ------------------------------------------------------------------------ lifecycle
    async def blocked_reasons(self) -> list[str]:
        if not self.proc.alive():
            return []
        reply = await self.proc.qmp.execute("query-migrate")
        return list(reply.get("blocked-reasons", []))

    async def stop(self) -> None:
        await self.proc.stop()
        await self.close_channels()
        _remove(self.params_file)
        self.host.vms.discard(self)

    async def migrate_to(self, dst: Host, spec: VmSpec, with_tags: bool,
                         progress: ProgressCallback) -> "LocalVm":
        """Live migration to a second local QEMU over loopback TCP. Under TCG the tags travel as
        QEMU's ``mach-virt.tag`` RAM block, so they move whether or not ``with_tags`` is set."""
        if not isinstance(dst, LocalHost):
            raise MigrationError(self.host.can_migrate_to(dst) or f"cannot migrate a real VM to host {dst.name}")
        if not self.proc.alive():
            raise StateError(f"VM '{self.spec.config.name}' is not running")
        blockers = await self.blocked_reasons()
        if blockers:
            raise MigrationError(blockers[0])
        target, port = await dst.start_incoming(spec, self.extra_args)
        try:
            stats = await self._run_migration(target, port, progress)
        except BaseException:
            await target.stop()
            try:   # a failed or cancelled migration leaves the source running
                await self.proc.qmp.execute("migrate_cancel")
            except QmpError:
                pass
            self._cancel_wanted = False     # a cancel that came late must not hit the next migration
            raise
        stats["tags"] = "migrated with RAM (TCG mach-virt.tag block)" if self.spec.config.mte else "none"
        stats["with_tags"] = with_tags
        target._take_history(self)   # the VM's counters and faults go with it
        await LocalVm.stop(self)   # the source QEMU is paused for good: quit it (no guest poweroff)
        await report_progress(progress, 1.0, stats)
        return target

    async def _run_migration(self, target: "LocalVm", port: int, progress: ProgressCallback) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATION_TIMEOUT
        stats = await self._migrate(f"tcp:{LOOPBACK}:{port}", MIGRATION_TIMEOUT, progress)
        await target.wait_running(deadline - loop.time())
        return stats

    async def _migrate(self, uri: str, timeout: float, progress: ProgressCallback | None) -> dict:
        """QMP ``migrate`` to ``uri`` and follow query-migrate to completion: its figures, or
        MigrationError with QEMU's text (``error-desc``) when it fails or is cancelled. A cancel
        asked for before QEMU's migration began (``cancel_migration``) is sent once it has."""
        try:
            if self._cancel_wanted:
                raise MigrationError("migration cancelled")
            try:
                await self.proc.qmp.execute("migrate", {"uri": uri})
            except QmpError as e:
                raise MigrationError(str(e)) from None
            return await self._follow_migration(timeout, progress)
        finally:
            self._cancel_wanted = False

    async def _follow_migration(self, timeout: float, progress: ProgressCallback | None) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.proc.qmp.execute("query-migrate")
            status = info.get("status", "none")
            if self._cancel_wanted and status in ("setup", "active", "pre-switchover", "device"):
                await self.proc.qmp.execute("migrate_cancel")
            ram = info.get("ram", {})
            stats = {"status": status, **ram_stats(ram),
                     "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime")}
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise MigrationError(info.get("error-desc") or f"migration {status}")
            if loop.time() > deadline:
                raise MigrationError(f"migration did not complete within {timeout:.0f} s")
            total = stats["ram_total"] or 1
            await report_progress(progress, min(0.99, stats["ram_transferred"] / total), stats)
            await asyncio.sleep(MIGRATION_POLL)
        return stats

    async def wait_loaded(self, timeout: float) -> None:
        """Wait until this QEMU has loaded its ``-incoming`` state (it is then paused or running);
        RealizeError with QEMU's own text if the load failed (QEMU exits)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                status = (await self.proc.qmp.execute("query-status"))["status"]
            except QmpError:
                await self.proc.wait(2.0)
                raise RealizeError("QEMU could not load the saved state: "
                                   + " / ".join(self.proc.stderr_tail()[-3:] or [self.proc.exit_reason()])) from None
            if status in ("paused", "running"):
                self.paused = status == "paused"
                return
            if status != "inmigrate" or loop.time() > deadline:
                raise RealizeError(f"QEMU is {status} after loading the saved state: "
                                   + " / ".join(self.stderr_tail()[-3:]))
            await asyncio.sleep(MIGRATION_POLL)

    # ------------------------------------------------------------------- everyday operations
    async def pause(self) -> None:
        await self.proc.qmp.execute("stop")
        self.paused = True

    async def resume(self) -> None:
        await self.proc.qmp.execute("cont")
        self.paused = False

    async def refresh_run_state(self) -> None:
        if self.proc.alive() and not self.proc.unreachable:
            try:
                status = await self.proc.qmp.execute("query-status")
            except QmpError:
                return
            self.paused = status.get("status") in PAUSED_STATUSES

    async def reset(self) -> None:
        """QMP ``system_reset``: the guest boots again from its ELF; its counters begin again."""
        await self.proc.qmp.execute("system_reset")
        self._faults.clear()

    async def cancel_migration(self) -> None:
        self._cancel_wanted = True      # _migrate sends migrate_cancel as soon as QEMU migrates
        await self.proc.qmp.execute("migrate_cancel")

    async def monitor(self, command: str, *, hmp: bool):
        """One command through mtevm's QMP connection: an HMP line (QEMU's text back), or a QMP
        command object as JSON text (``{"return": ...}`` back; QEMU's error as QmpError)."""
        if hmp:
            reply = await self.proc.qmp.hmp(command)
        else:
            obj = json.loads(command)
            reply = {"return": await self.proc.qmp.execute(obj["execute"], obj.get("arguments"))}
        await self.refresh_run_state()
        return reply

    async def save_state(self, state_file: str, progress: ProgressCallback | None = None) -> dict:
        """Migrate to ``state_file`` with the vCPUs stopped (one pass, a consistent state, tags
        in their ``mach-virt.tag`` RAM block), then let the VM go on as it was."""
        if (await self.proc.qmp.execute("query-status"))["status"] == "postmigrate":
            # QEMU keeps a VM it saved while paused in "postmigrate", and will not migrate it again
            # until it has run: said in QEMU's words, with the way out.
            raise StateError(f"VM '{self.spec.config.name}' was saved while paused and has not run since: QEMU says "
                             "\"Can't migrate the vm that was paused due to previous migration\": resume it, then save")
        was_paused = self.paused
        if not was_paused:
            await self.pause()
        try:
            stats = await self._migrate(self.host.state_uri(state_file, write=True), SAVE_TIMEOUT, progress)
            if self.spec.guest.disks:
                await self._reactivate_disks()
        finally:
            if not was_paused:
                await self.resume()
        return {"bytes": os.path.getsize(state_file), "total_time_ms": stats.get("total_time_ms")}

    async def _reactivate_disks(self) -> None:
        """A completed migration hands the disks over (QEMU marks them inactive); this QEMU goes on
        with them, so take them back at once: a paused VM's disks must take its snapshot deletions
        (QEMU asserts on a write to an inactive disk). ``blockdev-set-active`` is QEMU >= 10.0;
        before it, ``cont`` is what activates them again (the VM's next resume)."""
        try:
            await self.proc.qmp.execute("blockdev-set-active", {"active": True})
        except QmpError as e:
            if e.error_class != "CommandNotFound":
                raise
            log.warning("VM %s: QEMU has no blockdev-set-active: its disks stay inactive until it resumes",
                        self.spec.config.name)

    async def wait_running(self, timeout: float) -> None:
        """Wait until this (destination) QEMU has loaded the incoming state and runs the guest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 1.0)
        while True:
            status = (await self.proc.qmp.execute("query-status"))["status"]
            if status == "running":
                return
            if status not in ("inmigrate", "prelaunch", "paused", "postmigrate", "finish-migrate", "restore-vm"):
                raise MigrationError(f"the destination QEMU is {status}: " + " / ".join(self.stderr_tail()[-3:]))
            if loop.time() > deadline:
                raise MigrationError(f"the destination QEMU is still {status} after the migration")
            await asyncio.sleep(MIGRATION_POLL)



def vm_class(spec: VmSpec) -> type[LocalVm]:
    """The builtin guest reports through its status block (LocalVm); Linux guests through the
    agent, or not at all for a custom kernel (backend.hosts.linux.LinuxVm)."""
    if spec.guest.kind == "builtin":
        return LocalVm
    from backend.hosts.linux import LinuxVm
    return LinuxVm


def linux_boot(spec: VmSpec) -> tuple[str, str | None, str]:
    """-kernel, -initrd and -append of a Linux guest (from backend.hosts.linux)."""
    from backend.hosts.linux import linux_boot as boot
    return boot(spec)
