"""The guest commands of ``mtevm`` (backend/cli.py wires them): the guest options of ``create``,
``show --argv``, ``console``, ``exec`` and ``selftest``.

``exec`` exits with the program's own status (128 + N when a signal N killed it), as ssh and
docker exec do, so scripts can use mtevm exec like running the program.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from backend.errors import ConfigError, MtevmError

EXIT_FAILED = 1


def add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guest", choices=["builtin", "linux", "custom"],
                   help="local host: what the VM boots: builtin (mtevm's bare-metal test program, the "
                        "default), linux (mtevm's Linux MTE image: 'mtevm image build linux'), custom (--kernel)")
    p.add_argument("--kernel", metavar="IMAGE", help="--guest custom: a raw arm64 kernel Image")
    p.add_argument("--initrd", metavar="FILE", help="--guest custom: an initramfs")
    p.add_argument("--append", metavar="CMDLINE", help="linux/custom: kernel command line (linux: added to mtevm's)")
    addresses = p.add_mutually_exclusive_group()
    addresses.add_argument("--fault-address", dest="fault_address", action="store_true", default=None,
                           help="linux: report each sync fault's address and pointer tag, and more of the "
                                "recent faults (up to 64 per vCPU per batch instead of 8); the default")
    addresses.add_argument("--no-fault-address", dest="fault_address", action="store_false",
                           help="linux: no fault addresses, a sample of 8 recent faults per vCPU per batch "
                                "(counts stay exact; a little less JSON for the guest to build and send)")
    p.add_argument("--disk", dest="disks", action="append", metavar="FILE",
                   help="linux/custom, repeatable: a raw or qcow2 disk on virtio-blk")


def guest_from_args(args) -> dict | None:
    """The ``guest`` of a create request (paths made absolute here: the daemon has another cwd)."""
    kind = args.guest
    files = {k: getattr(args, k) for k in ("kernel", "initrd", "append")}
    if kind is None and not any(files.values()) and not args.disks and args.fault_address is None:
        return None
    guest: dict = {"kind": kind or ("custom" if args.kernel else "builtin")}
    for key in ("kernel", "initrd"):
        if files[key]:
            guest[key] = os.path.abspath(os.path.expanduser(files[key]))
    if args.append is not None:
        guest["append"] = args.append
    if args.fault_address is not None:     # --no-fault-address on builtin/custom: what they have anyway
        guest["fault_address"] = args.fault_address
    if args.disks:
        guest["disks"] = [os.path.abspath(os.path.expanduser(d)) for d in args.disks]
    return guest


def add_commands(add, as_json) -> None:
    """``add(name, help, *parents)`` makes a sub-command parser (backend/cli.py's)."""
    p = add("console", "attach this terminal to a VM's serial console (detach: ctrl+])", as_json)
    p.add_argument("name")
    p.add_argument("--log", action="store_true", help="print the console log instead of attaching")
    p.add_argument("--lines", type=int, default=100, metavar="N", help="with --log: the last N lines (default 100)")
    p = add("exec", "run a static aarch64 program in a Linux guest: mtevm exec NAME -- PROGRAM [ARGS...]", as_json)
    p.add_argument("name")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")
    p = add("selftest", "run the kernel's arm64 MTE selftests in a Linux guest", as_json)
    p.add_argument("name")
    p.add_argument("tests", nargs="*", metavar="TEST", help="only these (slow ones run only when named)")
    p.add_argument("--list", action="store_true", help="list the guest's selftests and exit")


def print_guest(vm: dict, row) -> None:
    """Rows of ``show`` for the guest (row(label, value) adds one)."""
    g = vm.get("guest") or {"kind": "builtin"}
    text = g["kind"]
    if g.get("kernel"):
        text += f", kernel {g['kernel']}"
    if g.get("initrd"):
        text += f", initrd {g['initrd']}"
    if g.get("append"):
        text += f", append {g['append']!r}"
    for d in g.get("disks") or []:
        text += f", disk {d}"
    if g["kind"] == "linux":
        text += ", fault addresses " + ("on" if g.get("fault_address") else "off")
    row("guest", text)
    facts = vm.get("guest_facts")
    if facts:
        hw = ", ".join(n for n, k in (("MTE", "hwcap2_mte"), ("MTE3", "hwcap2_mte3")) if facts.get(k)) or "none"
        prefs = ", ".join(f"cpu{c['cpu']} {c['mte_tcf_preferred']}" for c in facts.get("cpus") or [])
        row("guest kernel", f"{facts.get('kernel') or '?'} (agent {facts.get('agent')})")
        row("guest HWCAP2", hw)
        row("mte_tcf_preferred", prefs)
        if facts.get("tracing") is False:
            row("fault counting", f"off: {facts.get('tracing_error')}")
        row("fault addresses", "yes (sync faults)" if facts.get("fault_address")
            else f"no: {facts.get('fault_address_why')}")


async def run(client, args, out) -> int | None:
    """Handle a guest command; None if ``args.command`` is not one of them."""
    cmd = args.command
    if cmd == "console":
        if args.log:
            log = await client.console_log(args.name, args.lines)
            out(log, lambda d: print("\n".join(d["lines"])))
            return 0
        if args.json:
            raise ConfigError("--json goes with --log (an attached console is not JSON)")
        from backend.guests.terminal import attach
        await attach(client, args.name)
        return 0
    if cmd == "exec":
        return await _exec(client, args)
    if cmd == "selftest":
        return await _selftest(client, args)
    return None


async def _exec(client, args) -> int:
    from backend.guests.elf import check_static_aarch64
    argv = list(args.argv)
    if "--" in argv:      # options given after NAME but before "--" (argparse leaves them in the remainder)
        before, argv = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        for opt in before:
            if opt != "--json":
                raise ConfigError(f"exec: unknown option {opt!r} (usage: mtevm exec NAME [--json] -- PROGRAM [ARGS...])")
            args.json = True
    if not argv:
        raise ConfigError("give the program to run: mtevm exec NAME -- PROGRAM [ARGS...]")
    data = check_static_aarch64(argv[0])
    name = os.path.basename(argv[0])
    result = {"status": None, "signal": None, "pid": None, "stdout": "", "stderr": "",
              "faults": {"sync": 0, "async": 0}}
    out = {"stdout": bytearray(), "stderr": bytearray()}
    async for msg in client.exec(args.name, argv[1:], program=name, data=data):
        if msg["type"] == "exec-started":
            result["pid"] = msg.get("pid")
        elif msg["type"] == "exec-output":
            stream = msg.get("stream", "stdout")
            if args.json:
                out[stream] += msg["data"]
            else:
                f = sys.stdout if stream == "stdout" else sys.stderr
                f.buffer.write(msg["data"])
                f.flush()
        elif msg["type"] == "exec-exit":
            result.update(status=msg.get("status"), signal=msg.get("signal"), pid=msg.get("pid", result["pid"]),
                          faults=msg.get("faults", result["faults"]))
    if result["status"] is None:
        raise MtevmError("the program's exit status never came (the connection to the guest agent was lost)")
    if args.json:
        result["stdout"] = out["stdout"].decode(errors="replace")
        result["stderr"] = out["stderr"].decode(errors="replace")
        print(json.dumps(result, indent=2))
    if result["signal"]:
        return 128 + int(result["signal"])
    return int(result["status"])


async def _selftest(client, args) -> int:
    from backend.guests.selftest import choose, list_tests, run_tests
    available = await list_tests(client, args.name)
    if args.list:
        data = [{"name": t.name, "slow": t.slow} for t in available]
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for t in available:
                print(t.name + (f"  (opt-in, slow: {t.slow})" if t.slow else ""))
        return 0
    names = choose(available, list(args.tests))
    results = []
    async for kind, r, case in run_tests(client, args.name, names):
        if args.json:
            if kind == "done":
                results.append(r.to_dict())
            continue
        if kind == "case":
            print(f"  {r.name}: {case['result']:4}  {case['number']} {case['description']}", flush=True)
        else:
            print(f"{r.result.upper():4}  {r.name}  ({r.passed} pass, {r.failed} fail, {r.skipped} skip, "
                  f"{r.seconds:.1f} s)", flush=True)
            results.append(r.to_dict())
    totals = {k: sum(1 for r in results if r["result"] == k) for k in ("pass", "fail", "skip")}
    if args.json:
        print(json.dumps({"vm": args.name, "tests": results, "totals": totals}, indent=2))
    else:
        print(f"{totals['pass']} passed, {totals['fail']} failed, {totals['skip']} skipped")
    return EXIT_FAILED if totals["fail"] else 0


def argv_text(argv: list[str]) -> str:
    return shlex.join(argv)
