"""Seeded tag-check traces for the conformance suite (QEMU guest vs `mtevm tagcheck replay`).

Each trace is a list of ops in the replay's JSON Lines format, confined to the QEMU guest's trace
arena (guest_abi.TRACE_ARENA_BASE): tag stores (stg/st2g/stzg), ldg, loads and stores of every size,
and config changes. Accesses cluster around granule and page boundaries so multi-granule and
page-crossing checks (and their fault addresses) are exercised; pointer tags are taken from the tags
the trace stored half of the time, so both matches and mismatches occur. Trace k starts in TCF
mode MODES[k % 4], with TCMA on for half of them; TCO and further mode changes happen inside.

``python tests/qemu/traces.py OUTDIR`` writes them as .jsonl files (to replay by hand).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from backend.qemu.guest_abi import TRACE_ARENA_BASE

MODES = ("none", "sync", "async", "asymm")
SIZES = (1, 2, 4, 8, 16)
PAGE = 4096
PAGES = 4                       # the traces use the first 4 pages of the arena
BASE_SEED = 20251125
COUNT = 40
OPS_PER_TRACE = 80


def _hex(v: int) -> str:
    return f"{v:#x}"


def _granule(rng: random.Random) -> int:
    """A granule address, biased to the ends of pages (where accesses cross pages)."""
    page = TRACE_ARENA_BASE + rng.randrange(PAGES) * PAGE
    if rng.random() < 0.4:
        return page + PAGE - 16 * rng.randrange(1, 3)
    if rng.random() < 0.2 and page > TRACE_ARENA_BASE:
        return page
    return page + 16 * rng.randrange(PAGE // 16)


def generate(index: int, n_ops: int = OPS_PER_TRACE) -> list[dict]:
    """Trace number ``index`` (deterministic)."""
    rng = random.Random(BASE_SEED + index)
    mode, tcma = MODES[index % len(MODES)], bool((index // len(MODES)) % 2)
    high_bits = index % 8 == 7           # some traces set pointer bits 63:60, which TBI ignores
    ops: list[dict] = [{"op": "config", "tcf": mode, "tcma": tcma}]
    stored: dict[int, int] = {}          # granule -> last tag this trace stored (to aim pointers)
    while len(ops) < n_ops:
        r = rng.random()
        if r < 0.05:
            cfg = {}
            if rng.random() < 0.5:
                cfg["tcf"] = rng.choice(MODES)
            if rng.random() < 0.4:
                cfg["tco"] = rng.random() < 0.5
            if rng.random() < 0.3:
                cfg["tcma"] = rng.random() < 0.5
            ops.append({"op": "config", **cfg})
        elif r < 0.30:
            kind = rng.choice(("stg", "stg", "st2g", "stzg"))
            g = _granule(rng)
            tag = rng.choice((0, rng.randrange(16), rng.randrange(1, 4)))
            ops.append({"op": kind, "addr": _hex(g), "tag": tag})
            for k in range(2 if kind == "st2g" else 1):
                stored[g + 16 * k] = tag
        elif r < 0.38:
            ops.append({"op": "ldg", "addr": _hex(_granule(rng) + rng.randrange(16))})
        else:
            size = rng.choice(SIZES)
            g = _granule(rng)
            addr = g + rng.randrange(16)
            if rng.random() < 0.5:
                tag = stored.get(g, 0)
            else:
                tag = rng.choice((0, rng.randrange(16)))
            ptr = addr | tag << 56
            if high_bits and rng.random() < 0.5:
                ptr |= rng.randrange(1, 16) << 60
            ops.append({"op": rng.choice(("load", "store")), "ptr": _hex(ptr), "size": size})
    return ops


def all_traces(count: int = COUNT) -> list[list[dict]]:
    return [generate(i) for i in range(count)]


def to_jsonl(ops: list[dict]) -> str:
    return "".join(json.dumps(op) + "\n" for op in ops)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for i, trace in enumerate(all_traces()):
        (out / f"trace-{i:02d}.jsonl").write_text(to_jsonl(trace))
