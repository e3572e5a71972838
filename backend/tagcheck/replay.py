"""``mtevm tagcheck replay TRACE.jsonl``: run a trace of MTE operations through the tag-check core.

The same trace can be run by the real QEMU guest (the conformance suite), so both must agree.

Trace: JSON Lines, one op per line; integers are JSON ints or "0x..." strings.
  {"op":"config","tcf":"none|sync|async|asymm","tcma":false,"tco":false}   any subset of the
      three; the state starts as tcf sync, tcma false, tco false. ``tcma`` is TCMA0 (lower half).
  {"op":"stg"|"st2g"|"stzg","addr":A,"tag":T}     tag stores (A 16-aligned, T 0..15)
  {"op":"ldg","addr":A}                           reports the granule's tag
  {"op":"load"|"store","ptr":P,"size":S}          checked access, S in 1, 2, 4, 8, 16
Tag-op addresses may carry a tag in bits 63:56 (ignored). Blank lines are skipped (they still
count in line numbers). Unknown ops or fields, wrong types and values are errors.

Rules of the output:
* ``i`` is the 0-based line number of the op.
* A sync fault is reported at its op with ``addr`` = FAR with bits 63:56 cleared.
* Async faults: one per load/store op whose access set TFSR. The replayer then clears TFSR,
  as the real guest does after each op it sees set (so a later faulting op is reported
  again, even though TFSR is sticky in hardware). ``addr`` is null (the hardware gives none).
* ``--json`` prints {"faults":[{"i","kind","addr"}],"ldg":[{"i","tag"}],"counters":{...}}.

Errors: a malformed line, or an op the architecture refuses (misaligned tag store, address
outside RAM), stops the replay with "line N: what is wrong" on stderr (N counted from 1, as
editors show it) and exit status 2; nothing is printed on stdout then.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from backend import jsonvalues
from backend.errors import ConfigError, MtevmError
from backend.jsonvalues import is_int
from backend.tagcheck.cpu import TagCheckCpu
from backend.tagcheck.pointers import LOW56, physical
from backend.tagcheck.ram import GuestRam
from backend.tagcheck.tcf import TCF

DEFAULT_RAM_BASE = 0x40000000
DEFAULT_RAM_SIZE = 256 << 20
ACCESS_SIZES = (1, 2, 4, 8, 16)
_FIELDS = {
    "config": ((), ("tcf", "tcma", "tco")),
    "stg": (("addr", "tag"), ()), "st2g": (("addr", "tag"), ()), "stzg": (("addr", "tag"), ()),
    "ldg": (("addr",), ()),
    "load": (("ptr", "size"), ()), "store": (("ptr", "size"), ()),
}

_OP_COUNTER = {"stg": "tag_stores", "st2g": "tag_stores", "stzg": "tag_stores", "ldg": "ldg",
               "load": "loads", "store": "stores"}


class TraceError(MtevmError):
    """A trace line that cannot be replayed; ``line_no`` counts from 1."""

    def __init__(self, line_no: int, message: str):
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no
        self.detail = message


@dataclass
class ReplayResult:
    faults: list[dict] = field(default_factory=list)    # {"i", "kind", "addr": "0x..." | None}
    ldg: list[dict] = field(default_factory=list)       # {"i", "tag"}
    counters: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"faults": self.faults, "ldg": self.ldg, "counters": self.counters}


def _int(value, name: str) -> int:
    if is_int(value):
        n = value
    elif isinstance(value, str) and value[:2].lower() == "0x":
        try:
            n = int(value[2:], 16)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not a hexadecimal number") from None
    else:
        raise ValueError(f"{name}: {json.dumps(value)} is not an integer (a JSON int or a \"0x...\" string)")
    if not 0 <= n < 1 << 64:
        raise ValueError(f"{name}: {value!r} is not a 64-bit unsigned value")
    return n


def _parse(text: str) -> dict:
    """One trace line as a checked op dict; ValueError saying what is wrong."""
    try:
        op = jsonvalues.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:              # nested too deeply, a number too long to convert
        raise ValueError(f"not usable JSON ({e})") from None
    if not isinstance(op, dict):
        raise ValueError("an op must be a JSON object")
    name = op.get("op")
    if name not in _FIELDS:
        raise ValueError(f"unknown op {json.dumps(name)} (expected one of {', '.join(_FIELDS)})"
                         if "op" in op else "missing \"op\"")
    required, optional = _FIELDS[name]
    missing = [f for f in required if f not in op]
    if missing:
        raise ValueError(f"{name}: missing field {', '.join(missing)}")
    unknown = sorted(set(op) - {"op", *required, *optional})
    if unknown:
        raise ValueError(f"{name}: unknown field {', '.join(unknown)}")
    out = {"op": name}
    for f in ("addr", "ptr"):
        if f in op:
            out[f] = _int(op[f], f)
    if "tag" in op:
        out["tag"] = _int(op["tag"], "tag")
        if out["tag"] > 15:
            raise ValueError(f"tag: {out['tag']} is not 0..15")
    if "size" in op:
        out["size"] = _int(op["size"], "size")
        if out["size"] not in ACCESS_SIZES:
            raise ValueError(f"size: {out['size']} is not one of 1, 2, 4, 8, 16")
    if "tcf" in op:
        if not isinstance(op["tcf"], str) or op["tcf"] not in ("none", "sync", "async", "asymm"):
            raise ValueError(f"tcf: {json.dumps(op['tcf'])} is not one of none, sync, async, asymm")
        out["tcf"] = TCF.parse(op["tcf"])
    for f in ("tcma", "tco"):
        if f in op:
            if not isinstance(op[f], bool):
                raise ValueError(f"{f}: {json.dumps(op[f])} is not true or false")
            out[f] = op[f]
    return out


def replay(lines: Iterable[str], ram_base: int = DEFAULT_RAM_BASE,
           ram_size: int = DEFAULT_RAM_SIZE) -> ReplayResult:
    """Run a trace on a fresh MTE VM's RAM and one vCPU. Raises TraceError on a bad line."""
    ram = GuestRam(ram_base, ram_size, mte=True)
    cpu = TagCheckCpu(ram, tcf=TCF.SYNC)
    result = ReplayResult()
    n = {"ops": 0, "loads": 0, "stores": 0, "tag_stores": 0, "ldg": 0}
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            op = _parse(text)
            name = op["op"]
            if name == "config":
                if "tcf" in op:
                    cpu.tcf = op["tcf"]
                cpu.tcma0 = op.get("tcma", cpu.tcma0)
                cpu.tco = op.get("tco", cpu.tco)
            elif name == "stg":
                ram.tags.stg(physical(op["addr"]), op["tag"])
            elif name == "st2g":
                ram.tags.st2g(physical(op["addr"]), op["tag"])
            elif name == "stzg":
                ram.stzg(physical(op["addr"]), op["tag"])
            elif name == "ldg":
                result.ldg.append({"i": i, "tag": ram.tags.ldg(physical(op["addr"]))})
            else:
                fault = (cpu.store if name == "store" else cpu.load)(op["ptr"], op["size"])
                if fault is not None and fault.kind == "sync":
                    result.faults.append({"i": i, "kind": "sync", "addr": f"{fault.addr & LOW56:#x}"})
                if cpu.tfsr:
                    result.faults.append({"i": i, "kind": "async", "addr": None})
                    cpu.tfsr = 0
        except (ValueError, MtevmError) as e:
            raise TraceError(i + 1, str(e)) from None
        n["ops"] += 1
        if name in _OP_COUNTER:
            n[_OP_COUNTER[name]] += 1
    c = cpu.counters
    result.counters = {"sync_faults": c.sync_faults, "async_faults": c.async_faults, "checked": c.checked,
                       "unchecked": c.unchecked, **n}
    return result


def read_lines(f) -> Iterator[str]:
    """The lines of a binary file, decoded one at a time (a trace is never read whole)."""
    for n, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise TraceError(n, "not UTF-8 text") from None


def parse_size(text: str) -> int:
    """Bytes from "256M", "1G", "4096" (the machine definitions' size rule) or "0x10000000"."""
    from backend.machine.config import parse_size as parse_machine_size   # only when --ram-size is given

    try:
        if text.strip()[:2].lower() == "0x":
            return int(text, 16)
        return parse_machine_size(text, "--ram-size")
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M, 1G or 0x10000000") from None


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address like 0x40000000") from None


def _print_table(result: ReplayResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result.faults:
        t = Table(title="Tag-check faults")
        for col in ("line (i)", "kind", "address"):
            t.add_column(col)
        for f in result.faults:
            t.add_row(str(f["i"]), f["kind"], f["addr"] or "-")
        console.print(t)
    else:
        console.print("No tag-check faults.")
    if result.ldg:
        t = Table(title="LDG results")
        t.add_column("line (i)")
        t.add_column("tag")
        for r in result.ldg:
            t.add_row(str(r["i"]), f"{r['tag']:#x}")
        console.print(t)
    t = Table(title="Counters")
    t.add_column("counter")
    t.add_column("value", justify="right")
    for k, v in result.counters.items():
        t.add_row(k, str(v))
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtevm tagcheck replay",
                                description="Replay a JSON Lines trace of MTE ops through the tag-check core.")
    p.add_argument("trace", metavar="TRACE", help="the trace file (JSON Lines), or - for stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--ram-base", type=_address, default=DEFAULT_RAM_BASE, help="guest RAM base (default 0x40000000)")
    p.add_argument("--ram-size", type=parse_size, default=DEFAULT_RAM_SIZE, help="guest RAM size (default 256M)")
    args = p.parse_args(argv)
    try:
        f = sys.stdin.buffer if args.trace == "-" else open(args.trace, "rb")
    except OSError as e:
        print(f"mtevm tagcheck replay: cannot read {args.trace}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        with f:
            result = replay(read_lines(f), args.ram_base, args.ram_size)   # streamed: one line in memory
    except OSError as e:
        print(f"mtevm tagcheck replay: cannot read {args.trace}: {e.strerror}", file=sys.stderr)
        return 2
    except TraceError as e:
        print(f"mtevm tagcheck replay: {args.trace}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:          # a RAM region that cannot exist
        print(f"mtevm tagcheck replay: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
