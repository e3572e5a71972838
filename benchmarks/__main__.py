"""Run every ``benchmarks/bench_<area>.py``'s ``main()`` in turn, or only the named areas.

    python -m benchmarks                   # all of them
    python -m benchmarks tagcheck control  # bench_tagcheck.py and bench_control.py

A benchmark that fails is reported and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Area names, from the bench_<area>.py files present."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def run(area: str) -> bool:
    module = importlib.import_module(f"benchmarks.bench_{area}")
    main = getattr(module, "main", None)
    if main is None:
        print(f"benchmarks/bench_{area}.py has no main()", file=sys.stderr)
        return False
    # Some main()s parse their own argv: give them none of ours.
    params = inspect.signature(main).parameters
    main(*([[]] if params else []))
    return True


def main(argv: list[str] | None = None) -> int:
    areas = available()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("areas", nargs="*", metavar="AREA", help=f"any of: {', '.join(areas)} (default: all)")
    args = p.parse_args(argv)
    unknown = [a for a in args.areas if a not in areas]
    if unknown:
        p.error(f"no benchmark named {', '.join(unknown)} (have: {', '.join(areas)})")
    failed = []
    for area in args.areas or areas:
        print(f"\n=== {area} ({HERE.name}/bench_{area}.py) ===", flush=True)
        start = time.perf_counter()
        try:
            ok = run(area)
        except Exception:
            traceback.print_exc()
            ok = False
        print(f"--- {area}: {'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s", flush=True)
        if not ok:
            failed.append(area)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
