"""``mtevm``: the command line. With no command it opens the Textual app.

Every command is a thin client of backend.client (the daemon, started on demand, or the Service
in-process with ``--no-daemon``). Listings print rich tables, or JSON with ``--json``; errors go to
stderr as one ``mtevm: error: <message>`` line (QEMU's own text where QEMU has one; usage errors
too) so stdout stays parseable. Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad
input, 141 stdout's reader went away (``mtevm list --json | head``: no traceback, as a shell
reports a writer stopped by SIGPIPE).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from typing import Any

from backend import cli_guests
from backend.definition import split_qemu_args
from backend.errors import ConfigError, MtevmError, StateError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

COMMANDS = ("probe", "hosts", "host", "list", "show", "create", "start", "stop", "delete", "mte", "tcf", "counters",
            "migrate", "migrations", "daemon", "tagcheck", "serve", "image", "console", "exec", "selftest",
            "pause", "resume", "reboot", "shutdown", "edit", "clone", "snapshot", "migrate-cancel", "monitor")
# Options of the app (tui.app) and of the CLI that take a value: needed to find the command word.
_VALUE_OPTIONS = {"--runtime-dir", "--state-dir", "--rate", "--config", "--colors", "--timeout"}


class UsageError(MtevmError):
    """Bad command-line usage that argparse cannot see (e.g. delete without a terminal or --yes)."""


# -- argument parsing -----------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``mtevm: error: ...`` line on stderr (exit 2), like every
    other mtevm error, so scripts can read it the same way."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"mtevm: error: {message} (see '{self.prog} --help')\n")


def _dir_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--runtime-dir", default=default,
                        help="where the daemon's socket and pid file live (env MTEVM_RUNTIME_DIR)")
    parser.add_argument("--state-dir", default=default,
                        help="where VM definitions and the daemon log are kept (env MTEVM_STATE_DIR)")
    parser.add_argument("--no-daemon", action="store_true", default=default,
                        help="run the service in this process instead of talking to the daemon")



def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mtevm", description=(
        "A terminal VM manager for Arm64 virt machines with the Memory Tagging Extension (MTE). "
        "Without a command, opens the app."))
    _dir_options(parser, None)
    from tui.options import add_app_options, add_version   # argparse only: no Textual for --help
    add_version(parser)
    app_group = parser.add_argument_group("the app's options (mtevm without a COMMAND opens the app)")
    parser.set_defaults(app_options=add_app_options(app_group, dest_prefix="app_"))
    # Before the command word only: `shutdown --timeout` is the guest's grace period.
    parser.add_argument("--timeout", dest="daemon_timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait for each answer of the daemon (default 60; env MTEVM_TIMEOUT, "
                             "config.toml 'timeout')")
    # The same options after the command word; SUPPRESS keeps them from resetting the ones given before it.
    common = OneLineParser(add_help=False)
    _dir_options(common, argparse.SUPPRESS)
    as_json = OneLineParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, *parents) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common, *parents])

    p = add("probe", "what each host can do for MTE (KVM, QEMU, CPU) and the verdicts", as_json)
    p.add_argument("--host", help="probe only this host")
    add("hosts", "the hosts VMs can run on", as_json)
    p = add("host", "add or remove a libvirt host: 'host add NAME URI', 'host remove NAME'")
    actions = p.add_subparsers(dest="host_action", metavar="ACTION", required=True)
    a = actions.add_parser("add", parents=[common, as_json], help="add a libvirt host by URI", description=(
        "add a libvirt host by URI: qemu:///system, qemu+ssh://user@host/system, "
        "qemu+unix:///system?socket=PATH (needs libvirt-python: pip install -e '.[libvirt]')"))
    a.add_argument("name")
    a.add_argument("uri")
    a = actions.add_parser("remove", parents=[common, as_json], help="forget a libvirt host (it has no mtevm VMs)")
    a.add_argument("name")
    add("list", "all VMs", as_json)
    p = add("show", "one VM: config, vCPUs, counters, blockers, pending changes", as_json)
    p.add_argument("name")
    p.add_argument("--argv", action="store_true", help="print the VM's QEMU command line")

    p = add("create", "define a VM (it starts stopped)", as_json)
    p.add_argument("name")
    p.add_argument("--host", help="sim-mte (default), sim-nomte or local")
    p.add_argument("--accel", choices=["kvm", "tcg"], help="default: kvm on simulated hosts, tcg on local")
    p.add_argument("--cpu", metavar="MODEL", help="default: host with kvm, max with tcg")
    p.add_argument("--vcpus", type=int, metavar="N", help="default 2")
    p.add_argument("--memory", metavar="SIZE", help="e.g. 256M (default), 1G")
    mte = p.add_mutually_exclusive_group()
    mte.add_argument("--mte", dest="mte", action="store_true", default=None, help="MTE on (default)")
    mte.add_argument("--no-mte", dest="mte", action="store_false", help="MTE off")
    p.add_argument("--secure", action="store_true", default=None, help="EL3 with secure tag memory")
    p.add_argument("--only-migratable", action="store_true", default=None,
                   help="refuse anything that blocks migration (QEMU's -only-migratable)")
    p.add_argument("--workload", metavar="K=V,...", help="workload parameters, e.g. seed=3,tcf=sync,async,rate=0")
    p.add_argument("--seed", type=int)
    p.add_argument("--tcf", metavar="MODE[,MODE...]", help="none, sync, async or asymm, per vCPU")
    p.add_argument("--rate", type=int, help="checked accesses per second per vCPU (0 = flat out)")
    p.add_argument("--uaf-rate", type=float)
    p.add_argument("--overflow-rate", type=float)
    p.add_argument("--wild-rate", type=float)
    p.add_argument("--heap-size", type=int)
    p.add_argument("--qemu-arg", dest="qemu_args", action="append", metavar="ARGS",
                   help="local host only, repeatable: extra QEMU arguments, -object/-device and a value, "
                        "split like a shell would, e.g. --qemu-arg='-device ivshmem-plain,memdev=shm' "
                        "(or one word per --qemu-arg=...); kept with the VM and used at every start. "
                        "QEMU runs as you: arguments that name host files (mem-path=, file=, romfile=, dir=, "
                        "...) could read or overwrite any file you can, and are refused without "
                        "--allow-host-files")
    p.add_argument("--allow-host-files", action="store_true", default=None,
                   help="let this VM's --qemu-arg options name host files and devices (e.g. "
                        "memory-backend-file,mem-path=/dev/shm/x or loader,file=...); QEMU can then read "
                        "and write them with your rights. Kept with the VM and shown by 'mtevm show'")
    cli_guests.add_create_options(p)

    for name, help_ in (("start", "boot a VM"), ("stop", "power a VM off")):
        add(name, help_, as_json).add_argument("name")
    p = add("delete", "delete a stopped VM's definition", as_json)
    p.add_argument("name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p = add("mte", "turn MTE on or off (a running VM: at its next start)", as_json)
    p.add_argument("name")
    p.add_argument("state", choices=["on", "off"])
    p = add("tcf", "set the tag check fault mode of a VM's workload", as_json)
    p.add_argument("name")
    p.add_argument("mode", choices=["none", "sync", "async", "asymm"])
    p.add_argument("--vcpu", type=int, help="only this vCPU (default: all)")
    p = add("counters", "tag-check counters of a VM", as_json)
    p.add_argument("name")
    p.add_argument("--watch", action="store_true", help="keep printing samples until Ctrl+C")
    p.add_argument("--rate", type=float, default=1.0, help="samples per second with --watch (default 1)")
    p = add("migrate", "live-migrate a running VM to another host", as_json)
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="HOST")
    p.add_argument("--with-tags", action="store_true", help="also copy the MTE tags (KVM_ARM_MTE_COPY_TAGS)")
    p.add_argument("--no-wait", action="store_true", help="return once the migration has started")
    add("migrations", "the migration history, newest first", as_json)
    cli_guests.add_commands(add, as_json)
    _add_operations(add, as_json)
    p = add("daemon", "run the daemon (in the background unless --foreground), or 'daemon stop'", as_json)
    p.add_argument("action", nargs="?", choices=["stop"], help="stop the running daemon")
    p.add_argument("--foreground", action="store_true", help="stay attached and log to stderr")
    from backend.guests import image_cli
    image_cli.add_parser(sub, [common])
    p = sub.add_parser("tagcheck", help="tag-check tools: 'mtevm tagcheck replay TRACE'", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("serve", help="the app in a web browser (textual-serve)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_operations(add, as_json) -> None:
    """The everyday operations: pause, resume, reboot, shutdown, edit, clone, snapshot, migrate-cancel, monitor."""
    for name, help_ in (("pause", "pause a running VM (QMP stop): its counters hold still"),
                        ("resume", "resume a paused VM (QMP cont)"),
                        ("reboot", "reboot a VM: the guest agent's clean reboot, else a reset (QMP system_reset)"),
                        ("migrate-cancel", "cancel a VM's running migration (QMP migrate_cancel); it stays here")):
        add(name, help_, as_json).add_argument("name")
    p = add("shutdown", "power a VM off gracefully (guest agent); without an agent, or after --timeout, stop it",
            as_json)
    p.add_argument("name")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="how long the guest gets (default 30)")
    p = add("edit", "change a VM's definition (a running VM: at its next start, as pending changes)", as_json)
    p.add_argument("name")
    p.add_argument("--vcpus", type=int, metavar="N")
    p.add_argument("--memory", metavar="SIZE", help="e.g. 256M, 1G")
    p.add_argument("--cpu", metavar="MODEL")
    p.add_argument("--accel", choices=["kvm", "tcg"])
    for flag, dest, help_ in (("mte", "mte", "MTE"), ("secure", "secure", "EL3 with secure tag memory"),
                              ("only-migratable", "only_migratable", "QEMU's -only-migratable")):
        group = p.add_mutually_exclusive_group()
        group.add_argument(f"--{flag}", dest=dest, action="store_true", default=None, help=f"{help_} on")
        group.add_argument(f"--no-{flag}", dest=dest, action="store_false", help=f"{help_} off")
    p.add_argument("--qemu-args", "--qemu-arg", dest="qemu_args", action="append", metavar="ARGS",
                   help="the VM's extra QEMU arguments (replace the old ones; repeatable, shell-split, "
                        "-object/-device and a value); --no-qemu-args removes them")
    p.add_argument("--no-qemu-args", action="store_true", help="remove the VM's extra QEMU arguments")
    host_files = p.add_mutually_exclusive_group()
    host_files.add_argument("--allow-host-files", dest="allow_host_files", action="store_true", default=None,
                            help="let its QEMU arguments name host files (QEMU reads and writes them as you)")
    host_files.add_argument("--no-allow-host-files", dest="allow_host_files", action="store_false",
                            help="refuse host files in its QEMU arguments again")
    p.add_argument("--workload", metavar="K=V,...", help="workload parameters to change, e.g. seed=3,tcf=async")
    p.add_argument("--tcf", metavar="MODE[,MODE...]")
    p.add_argument("--seed", type=int)
    p.add_argument("--rate", type=int)
    p = add("clone", "copy a VM's definition (and its disks, where it has any) to a new stopped VM", as_json)
    p.add_argument("name")
    p.add_argument("new_name", metavar="NEW")
    p = add("snapshot", "save, restore, list or delete a VM's snapshots (its whole state, MTE tags included)",
            as_json)
    p.add_argument("name")
    p.add_argument("action", choices=["save", "restore", "list", "delete"])
    p.add_argument("tag", nargs="?", help="save: default the time; restore: default the newest; delete: required")
    p.add_argument("--yes", "-y", action="store_true", help="delete / restore over a running VM without asking")
    p = add("monitor", "pass one QMP (JSON) or HMP command to the VM's QEMU, through mtevm's connection", as_json)
    p.add_argument("name")
    p.add_argument("--hmp", action="store_true", help="an HMP command line (e.g. 'info mtree'), not QMP")
    p.add_argument("words", nargs="+", metavar="COMMAND",
                   help='QMP: query-status, or query-status {"arg": 1}, or {"execute": ...}; HMP: info mtree '
                        "(put -- before a command with options of its own)")


def edit_changes(args) -> dict:
    """The edit command's options as an edit() request."""
    changes = {k: getattr(args, k) for k in ("vcpus", "memory", "cpu", "accel", "mte", "secure", "only_migratable",
                                             "allow_host_files")
               if getattr(args, k) is not None}
    if args.no_qemu_args and args.qemu_args:
        raise ConfigError("--no-qemu-args and --qemu-args: give one of them")
    if args.no_qemu_args:
        changes["qemu_args"] = []
    elif args.qemu_args:
        changes["qemu_args"] = split_qemu_args(args.qemu_args)
    workload = parse_workload(args.workload)
    for key in ("tcf", "seed", "rate"):
        if getattr(args, key) is not None:
            workload[key] = getattr(args, key)
    if workload:
        changes["workload"] = workload
    if not changes:
        raise ConfigError("edit: nothing to change (see 'mtevm edit --help')")
    return changes


def _confirm(question: str, refusal: str) -> bool:
    """Ask on a terminal; without one, refuse with ``refusal`` (pass --yes)."""
    if not sys.stdin.isatty():
        raise UsageError(refusal)
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def print_snapshots(snaps: list[dict]) -> None:
    """A libvirt snapshot made with virsh has no mtevm counters (and maybe no size): shown as '-'."""
    from backend.hosts.disk_snapshots import summary as disks_summary

    def row(s):
        c = s.get("counters")
        return [s["tag"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"])), s["vm_state"],
                _size(s["bytes"]) if s.get("bytes") is not None else "-", c["checked"] if c else "-",
                c["sync_faults"] + c["async_faults"] if c else "-", s["tags"], disks_summary(s)]
    _table(None, ["TAG", "CREATED", "VM STATE", "SIZE", "CHECKED", "FAULTS", "TAGS", "DISKS"], [row(s) for s in snaps])
    for s in snaps:
        for d in s.get("disks") or []:
            if d.get("problem"):
                print(f"snapshot {s['tag']}: {d['problem']}: it cannot be restored", file=sys.stderr)


async def _dispatch_operation(client, args, out) -> int | None:
    """The everyday operations; None if ``args.command`` is not one of them."""
    cmd, name = args.command, getattr(args, "name", None)
    if cmd in ("pause", "resume"):
        vm = await (client.pause if cmd == "pause" else client.resume)(name)
        out(vm, lambda v: print(f"VM {v['name']}: {v['state']}"))
    elif cmd in ("reboot", "shutdown"):
        vm = await (client.reboot(name) if cmd == "reboot" else client.shutdown(name, args.timeout))
        out(vm, lambda v: print(v["outcome"]["message"]))
    elif cmd == "migrate-cancel":
        m = await client.migrate_cancel(name)
        out(m, lambda m: print(f"migration {m['id']} of VM {m['vm']} to {m['dst']}: cancel requested; "
                               "the VM keeps running on " + m["src"]))
    elif cmd == "edit":
        vm = await client.edit(name, edit_changes(args))
        _warn_start(vm)
        out(vm, lambda v: print(f"VM {v['name']}: pending at its next start: {_pending(v['pending'])}"
                                if v["pending"] else f"VM {v['name']}: definition changed"))
    elif cmd == "clone":
        vm = await client.clone(name, args.new_name)
        _warn_start(vm)
        out(vm, lambda v: print(f"cloned VM {name} to {v['name']} on {v['host']}"
                                + (f" (copied {', '.join(v['copied'])})" if v["copied"] else "")
                                + (f"; the copies dropped VM {name}'s disk snapshots {', '.join(v['dropped_snapshots'])}"
                                   if v.get("dropped_snapshots") else "")))
    elif cmd == "snapshot":
        return await _snapshot(client, args, out)
    elif cmd == "monitor":
        command = " ".join(args.words)
        reply = await client.monitor(name, command, hmp=args.hmp)
        out(reply, lambda r: print(r["return"].rstrip("\n") if args.hmp else json.dumps(r["return"], indent=2)))
    else:
        return None
    return 0


async def _snapshot(client, args, out) -> int:
    name, tag, action = args.name, args.tag, args.action
    if action == "list":
        out(await client.snapshot_list(name), print_snapshots)
        return 0
    if action == "save":
        snap = await client.snapshot_save(name, tag)
        out(snap, lambda s: print(f"VM {name}: saved snapshot {s['tag']} "
                                  f"({_size(s['bytes']) if s.get('bytes') is not None else 'size unknown'}, tags: {s['tags']})"))
        return 0
    if action == "delete" and tag is None:
        raise UsageError("snapshot delete: give the TAG to delete (see 'mtevm snapshot NAME list')")
    if not args.yes:
        vm = await client.show(name) if action == "restore" else {}
        running = action == "restore" and vm["state"] not in ("stopped", "crashed")
        disks = action == "restore" and bool((vm.get("guest") or {}).get("disks"))   # reverted, even stopped
        if action == "delete" or running or disks:
            what = (f"Delete snapshot {tag!r} of VM {name!r}?" if action == "delete" else
                    f"Restore VM {name!r} to snapshot {tag or '(newest)'}? Its current state"
                    + (" and what its disks hold now are" if disks else " is") + " lost.")
            if not _confirm(what, f"refusing to {action} a snapshot of VM {name!r} without confirmation: pass --yes"):
                print(f"not {action}d", file=sys.stderr)
                return EXIT_FAILED
    if action == "delete":
        snap = await client.snapshot_delete(name, tag)
        out(snap, lambda s: print(f"VM {name}: deleted snapshot {s['tag']}"))
    else:
        vm = await client.snapshot_restore(name, tag)
        out(vm, lambda v: print(f"VM {name}: restored snapshot {v['snapshot']['tag']}, {v['state']}"))
    return 0


def _command_word(argv: list[str]) -> str | None:
    """The first word that is not an option or an option's value (None: open the app)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
        elif arg in ("-h", "--help"):
            return arg
    return None


# -- output ---------------------------------------------------------------------------------------
def counted(n: int, noun: str) -> str:
    """"1 vCPU", "2 vCPUs": every count the CLI prints goes through here."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _console(stderr: bool = False):
    from rich.console import Console
    width = None if sys.stdout.isatty() else 200  # no terminal: don't wrap at 80 columns
    return Console(stderr=stderr, width=width, highlight=False)


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table
    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    _console().print(t)


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _size(n: int) -> str:
    from backend.machine.config import format_size
    return format_size(n)


def _pending(p: dict) -> str:
    return ", ".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in p.items())


def _onoff(b: bool | None) -> str:
    return "on" if b else "off"


def _yes_no(b: bool | None) -> str:
    return "unknown" if b is None else "yes" if b else "no"


def print_hosts(hosts: list[dict]) -> None:
    _table(None, ["NAME", "KIND", "ARCH", "KVM MTE", "AVAILABLE", "DESCRIPTION"],
           [[h["name"], h["kind"], h["arch"], "yes" if h["kvm_mte"] else "no",
             "yes" if h["available"] else f"no: {h['reason']}", h["description"]] for h in hosts])


def print_probe(reports: list[dict]) -> None:
    for r in reports:
        kvm, qemu, cpu = r["kvm"], r["qemu"], r["cpu"]
        _table(f"host {r['host']}", ["WHAT", "VALUE"], [
            ["KVM", f"{'present' if kvm['present'] else 'absent'} ({kvm.get('path')}), API version "
                    f"{kvm.get('api_version')}, KVM_CAP_ARM_MTE = {kvm.get('cap_arm_mte')}"],
            ["QEMU", f"{qemu.get('binary') or '-'} {qemu.get('version') or ''}, mte property "
                     f"{_yes_no(qemu.get('mte'))}, accels {', '.join(qemu.get('accels') or []) or '-'}, "
                     f"usable for MTE {_yes_no(qemu.get('usable_for_mte'))}"
                     + (f" ({qemu['reason']})" if qemu.get("reason") else "")],
            ["CPU", f"{cpu['arch']}, MTE {'yes' if cpu['mte'] else 'no'} ({cpu['source']})"],
            *[[f["name"], f"{f['value']}  ({f['source']})"] for f in r.get("facts", [])],
            *[[v["level"].upper(), v["text"]] for v in r["verdicts"]]])


def print_list(vms: list[dict]) -> None:
    _table(None, ["NAME", "HOST", "STATE", "ACCEL", "CPU", "VCPUS", "MEMORY", "MTE", "FAULTS/S", "PENDING",
                  "LAST ERROR"],
           [[v["name"], v["host"], v["state"], v["accel"], v["cpu"], v["vcpus"], _size(v["memory"]),
             _onoff(v["mte"]), f"{v['faults_per_s']:.1f}", _pending(v["pending"]), v["last_error"]] for v in vms])


def _vcpu_rows(vcpus: list[dict]) -> list[list]:
    rows = []
    for c in vcpus:
        f = c.get("last_fault")
        rows.append([c["index"], "yes" if c["kvm_mte"] else "no", c["tcf"], c["checked"], c["unchecked"],
                     c["sync_faults"], c["async_faults"],
                     f and " ".join(str(x) for x in (f["kind"], f["access"], f["addr"]) if x is not None)
                     + f" ptr {_tag(f['ptr_tag'])} mem {_tag(f['mem_tag'])}"])
    return rows


_VCPU_COLUMNS = ["VCPU", "KVM_MTE", "TCF", "CHECKED", "UNCHECKED", "SYNC", "ASYNC", "LAST FAULT"]


def _tag(value: int | None) -> str:
    """A tag in hex, or '-' where it is not known (a Linux guest's async fault has no address)."""
    return "-" if value is None else f"{value:x}"


def print_detail(vm: dict) -> None:
    c = vm["config"]
    guest_rows: list[list] = []
    cli_guests.print_guest(vm, lambda label, value: guest_rows.append([label, value]))
    _table(f"VM {vm['name']}", ["", ""], [
        ["host", vm["host"]], ["state", vm["state"]],
        ["machine", f"virt, accel {c['accel']}, cpu {c['cpu']}, {counted(c['vcpus'], 'vCPU')}, {_size(c['memory'])}"],
        ["mte", _onoff(c["mte"]) + (f"  (pending: {_pending(vm['pending'])}, at next start)" if vm["pending"] else "")],
        ["secure", _onoff(c["secure"])], ["only-migratable", _onoff(c["only_migratable"])],
        ["qemu args", shlex.join(vm.get("qemu_args") or [])],
        ["host files", "allowed (qemu args may name host files: QEMU reads and writes them as you)"
         if vm.get("allow_host_files") else "refused in qemu args"],
        ["workload", ", ".join(f"{k}={v}" for k, v in vm["workload"].items())],
        ["faults/s", f"{vm['faults_per_s']:.1f}"],
        ["tag memory", vm["tag_memory"] and f"{vm['tag_memory']['tagged_pages']} tagged pages, "
                                           f"{vm['tag_memory']['bytes']} bytes"],
        ["migration", "; ".join(vm["blocked_reasons"]) or "allowed" if vm["state"] == "running" else ""],
        ["last error", vm["last_error"]],
        ["cannot start", "; ".join(vm.get("warnings") or [])],
        *guest_rows])
    _table("vCPUs", _VCPU_COLUMNS, _vcpu_rows(vm["vcpus"]))
    if vm["last_faults"]:
        _table("last faults", ["VCPU", "KIND", "ACCESS", "ADDR", "PTR TAG", "MEM TAG", "SIZE", "PROCESS"],
               [[f["vcpu"], f["kind"], f["access"], f["addr"], _tag(f["ptr_tag"]), _tag(f["mem_tag"]), f["size"],
                 f.get("comm") and f"{f['comm']} ({f.get('pid')})"] for f in vm["last_faults"]])
    if vm.get("processes"):
        _table("processes (tag-check faults)", ["PID", "COMM", "SYNC", "ASYNC"],
               [[p["pid"], p["comm"], p["sync"], p["async"]] for p in vm["processes"]])
    if vm["stderr"]:
        _table("stderr", ["LINE"], [[line] for line in vm["stderr"]])


def print_migrations(ms: list[dict]) -> None:
    _table(None, ["ID", "VM", "FROM", "TO", "TAGS", "STATE", "PROGRESS", "STARTED", "REASON"],
           [[m["id"], m["vm"], m["src"], m["dst"], "yes" if m["with_tags"] else "no", m["state"],
             f"{m['progress'] * 100:.0f}%", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["started"])),
             m["reason"]] for m in ms])


def print_counters(c: dict) -> None:
    vm = c["vm"]
    _table(f"VM {c['name']}: checked {vm['checked']}, unchecked {vm['unchecked']}, "
           f"sync faults {vm['sync_faults']}, async faults {vm['async_faults']}", _VCPU_COLUMNS, _vcpu_rows(c["vcpus"]))


# -- commands -------------------------------------------------------------------------------------
def _number(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_workload(text: str | None) -> dict:
    """"seed=3,tcf=sync,async,rate=0" -> {"seed": 3, "tcf": "sync,async", "rate": 0}.

    A piece without "=" continues the previous value, so per-vCPU TCF lists need no quoting.
    """
    out: dict = {}
    key = None
    for piece in (text or "").split(","):
        if "=" in piece:
            key, value = piece.split("=", 1)
            key = key.strip().replace("-", "_")
            if not key:
                raise ConfigError(f"--workload: {piece!r} has no parameter name (use k=v,...)")
            out[key] = value.strip()
        elif key is not None and piece.strip():
            out[key] += "," + piece.strip()
        elif piece.strip():
            raise ConfigError(f"--workload: {piece!r} is not k=v")
    return {k: v if k == "tcf" else _number(v) for k, v in out.items()}


def definition_from_args(args) -> dict:
    config: dict = {"name": args.name}
    for key in ("host", "accel", "cpu", "vcpus", "memory", "mte", "secure", "only_migratable", "allow_host_files"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    workload = parse_workload(args.workload)
    for key in ("seed", "tcf", "rate", "uaf_rate", "overflow_rate", "wild_rate", "heap_size"):
        if getattr(args, key) is not None:
            workload[key] = getattr(args, key)
    if workload:
        config["workload"] = workload
    if args.qemu_args:
        config["qemu_args"] = split_qemu_args(args.qemu_args)
    guest = cli_guests.guest_from_args(args)
    if guest is not None:
        config["guest"] = guest
    return config


async def _watch_counters(client, args) -> int:
    last: tuple[float, int] | None = None
    async for event in client.events(rate_hz=args.rate):
        if event["type"] == "vm" and event.get("deleted") == args.name:
            return 0
        if event["type"] != "counters" or event["vm"] != args.name:
            continue
        c = event["counters"]
        if args.json:
            print(json.dumps({**c, "skipped": event.get("skipped", 0)}), flush=True)
            continue
        faults = c["vm"]["sync_faults"] + c["vm"]["async_faults"]
        rate = (faults - last[1]) / (c["time"] - last[0]) if last and c["time"] > last[0] else 0.0
        last = (c["time"], faults)
        print(counters_line(c, rate, event.get("skipped", 0)), flush=True)
    return 0


def counters_line(c: dict, faults_per_s: float, skipped: int = 0) -> str:
    """One ``counters --watch`` line; a client that fell behind is told how many samples it missed
    (the daemon coalesces them: the line shows the latest counters)."""
    line = (f"{time.strftime('%H:%M:%S', time.localtime(c['time']))}  checked {c['vm']['checked']}  "
            f"unchecked {c['vm']['unchecked']}  sync {c['vm']['sync_faults']}  async {c['vm']['async_faults']}  "
            f"faults/s {faults_per_s:.1f}")
    if skipped:
        line += f"  (skipped {skipped} sample{'s' if skipped != 1 else ''}: this terminal fell behind)"
    return line


async def _wait_migration(client, migration: dict, show_progress: bool) -> dict:
    """Follow a migration to its end by events; re-read the history when they go quiet (an event
    sent before our stream was subscribed is not lost that way)."""
    updates: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        async for event in client.events(rate_hz=1.0):
            if event["type"] == "migration" and event["migration"]["id"] == migration["id"]:
                updates.put_nowait(event["migration"])

    pumping = asyncio.get_running_loop().create_task(pump())
    m = migration
    progress = None
    if show_progress:
        from rich.progress import Progress
        progress = Progress(console=_console(stderr=True), transient=True)
        task = progress.add_task(f"migrating {m['vm']} to {m['dst']}", total=1.0)
        progress.start()
    try:
        while m["state"] in ("setup", "active"):
            try:
                m = await asyncio.wait_for(updates.get(), 1.0)
            except TimeoutError:
                m = next(x for x in await client.migrations() if x["id"] == m["id"])
            if progress is not None:
                progress.update(task, completed=m["progress"])
    finally:
        if progress is not None:
            progress.stop()
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
    return m


async def run_command(args) -> int:
    from backend.client import connect
    from backend.paths import Paths
    paths = Paths.resolve(args.runtime_dir, args.state_dir)
    if args.no_daemon:
        from backend.daemon.launch import daemon_pid
        pid = daemon_pid(paths)
        if pid is not None:
            raise UsageError(f"an mtevm daemon is running (pid {pid}) for {paths.runtime_dir}: "
                             "drop --no-daemon, or stop it with 'mtevm daemon stop'")
    from backend.config import resolve_timeout
    timeout = resolve_timeout(args.daemon_timeout)
    client = await connect(in_process=args.no_daemon, runtime_dir=paths.runtime_dir, state_dir=paths.state_dir,
                           timeout=timeout)
    async with client:
        if args.command == "delete" and not args.yes and not await _confirm_delete(client, args.name):
            print("not deleted", file=sys.stderr)
            return EXIT_FAILED
        return await _dispatch(client, args)


async def _confirm_delete(client, name: str) -> bool:
    """Ask before deleting, but only a question that can be answered yes: an unknown or running VM
    is refused first (as the app does), never after the user said yes."""
    vm = await client.show(name)
    if vm["state"] not in ("stopped", "crashed"):
        raise StateError(f"VM {vm['name']!r} is {vm['state']}: stop it first")
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to delete VM {name!r} without confirmation: pass --yes")
    answer = input(f"Delete VM {name!r}? This cannot be undone. [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _warn_start(vm: dict) -> None:
    """The daemon's warnings (QEMU's text): the definition is stored but cannot start on its host.
    The same rule and words as the app's forms; on stderr, so --json output stays one document."""
    for text in vm.get("warnings") or []:
        print(f"mtevm: warning: VM {vm['name']} cannot start on {vm['host']}: {text}", file=sys.stderr)


async def _dispatch(client, args) -> int:
    cmd = args.command
    as_json = getattr(args, "json", False)

    def out(data, human) -> None:
        _json(data) if as_json else human(data)

    if cmd == "hosts":
        out(await client.hosts(), print_hosts)
    elif cmd == "host" and args.host_action == "add":
        out(await client.host_add(args.name, args.uri), lambda h: print(
            f"added host {h['name']}: {h['description']}" + ("" if h["available"] else f"; unreachable: {h['reason']}")))
    elif cmd == "host":
        await client.host_remove(args.name)
        out({"removed": args.name}, lambda d: print(f"removed host {args.name}"))
    elif cmd == "probe":
        out(await client.probe(args.host), print_probe)
    elif cmd == "list":
        out(await client.list(), print_list)
    elif cmd == "show" and args.argv:
        out(await client.argv(args.name), lambda a: print(cli_guests.argv_text(a)))
    elif cmd == "show":
        out(await client.show(args.name), print_detail)
    elif cmd == "create":
        vm = await client.create(definition_from_args(args))
        out(vm, lambda v: print(f"created VM {v['name']} on {v['host']}: accel {v['config']['accel']}, "
                                f"cpu {v['config']['cpu']}, {counted(v['config']['vcpus'], 'vCPU')}, "
                                f"{_size(v['config']['memory'])}, MTE {_onoff(v['config']['mte'])}"))
        _warn_start(vm)
    elif cmd == "start":
        out(await client.start(args.name), lambda v: print(f"started VM {v['name']} on {v['host']}"))
    elif cmd == "stop":
        out(await client.stop(args.name), lambda v: print(f"stopped VM {v['name']}"))
    elif cmd == "delete":
        await client.delete(args.name)
        out({"deleted": args.name}, lambda d: print(f"deleted VM {args.name}"))
    elif cmd == "mte":
        vm = await client.set_mte(args.name, args.state == "on")
        out(vm, lambda v: print(
            f"VM {v['name']}: MTE {args.state} at its next start (pending)" if "mte" in v["pending"]
            else f"VM {v['name']}: MTE {_onoff(v['config']['mte'])}"))
        _warn_start(vm)
    elif cmd == "tcf":
        vm = await client.set_tcf(args.name, args.vcpu, args.mode)
        out(vm, lambda v: print(f"VM {v['name']}: TCF {', '.join(v['workload']['tcf'])}"))
    elif cmd == "counters":
        if args.watch:
            return await _watch_counters(client, args)
        out(await client.counters(args.name), print_counters)
    elif cmd == "migrate":
        m = await client.migrate(args.name, args.to, with_tags=args.with_tags)
        if not args.no_wait:
            m = await _wait_migration(client, m, show_progress=not as_json and sys.stderr.isatty())
        out(m, lambda m: print(f"migration {m['id']} of VM {m['vm']} from {m['src']} to {m['dst']}: {m['state']}"
                               + (f" ({m['reason']})" if m["reason"] else "")))
        if m["state"] == "failed":
            print(f"mtevm: error: {m['reason']}", file=sys.stderr)
            return EXIT_FAILED
    elif cmd == "migrations":
        out(await client.migrations(), print_migrations)
    elif cmd in ("console", "exec", "selftest"):
        return await cli_guests.run(client, args, out)
    else:
        return await _dispatch_operation(client, args, out) or 0
    return 0


def run_daemon_command(args) -> int:
    from backend.daemon import launch
    from backend.daemon.main import run_daemon
    from backend.paths import Paths
    paths = Paths.resolve(args.runtime_dir, args.state_dir)
    if args.action == "stop":
        pid = launch.stop_daemon(paths)
        print(json.dumps({"stopped": pid}) if args.json else f"mtevm daemon (pid {pid}) stopped")
        return 0
    pid = launch.daemon_pid(paths)
    if pid is not None:
        raise MtevmError(f"an mtevm daemon is already running (pid {pid or '?'}, socket {paths.socket})")
    if args.foreground:
        def report(msg: dict) -> None:
            if "error" in msg:
                print(f"mtevm: error: {msg['error']['message']}", file=sys.stderr, flush=True)
            else:
                print(f"mtevm daemon: pid {msg['pid']}, listening on {msg['socket']}", file=sys.stderr, flush=True)
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_daemon(paths, report)
    pid = launch.start_background(paths)
    print(json.dumps({"pid": pid, "socket": paths.socket}) if args.json
          else f"mtevm daemon started (pid {pid}), listening on {paths.socket}; log: {paths.log_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    word = _command_word(argv)
    if word is None:
        from tui.app import run_app
        return run_app(argv)
    parser = build_parser()
    if word == "tagcheck" or word == "serve":
        # Their own argument parsers handle everything after the word (including --help).
        rest = argv[argv.index(word) + 1:]
        if word == "serve":
            from tui.serve import main as serve_main
            return serve_main(rest)
        if not rest or rest[0] != "replay":
            print("usage: mtevm tagcheck replay [options] TRACE  (see 'mtevm tagcheck replay --help')",
                  file=sys.stderr)
            return EXIT_USAGE
        from backend.tagcheck.replay import main as replay_main
        return replay_main(rest[1:])
    args = parser.parse_args(argv)  # exits 2 with a one-line error on bad usage
    given = [f"--{dest.removeprefix('app_')}" for dest in args.app_options if getattr(args, dest, None) is not None]
    if given:
        parser.error(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of the app "
                     f"(mtevm without a command), not of '{args.command}'")
    try:
        if args.command == "daemon":
            code = run_daemon_command(args)
        elif args.command == "image":
            from backend.guests import image_cli
            code = image_cli.run(args)
        else:
            code = asyncio.run(run_command(args))
        sys.stdout.flush()   # inside the try: a reader that went away shows up here at the latest
        return code
    except BrokenPipeError:
        # `mtevm list --json | head -c 100`: the reader has what it wanted. Python would print a
        # traceback when it flushes stdout at exit, so point stdout at /dev/null and go quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except MtevmError as e:
        print(f"mtevm: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (ConfigError, UsageError)) else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
