#!/usr/bin/env python3
"""Make screenshots/*.png from the real app: every screen, with live simulated VMs.

Why a script and not hand-made images: the pictures in the README must be what the app really
shows. This runs the real ``MtevmApp`` headless (Textual's ``run_test``) on the real in-process
service, seeded with simulated VMs that run their workloads (so counters, sparklines and faults
are live), presses the keys a user would, saves each screen as SVG (``App.save_screenshot``) and
converts it to PNG with ``rsvg-convert`` (Debian: librsvg2-bin).

    python scripts/screenshots.py [--out screenshots] [--size 120x36] [--keep-svg]
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIVE_SECONDS = 3.0     # let counters and sparklines fill before the first picture

# The fleet in the pictures: MTE VMs on a KVM host with MTE, TCG, a host without MTE, and one VM
# whose start failed with the seed's message ("MTE requested, but not supported by KVM").
FLEET = [
    {"name": "build-03", "host": "sim-mte", "accel": "tcg", "cpu": "max", "vcpus": 2, "memory": "512M",
     "workload": {"seed": 3, "tcf": ["async"]}},
    {"name": "db-02", "host": "sim-mte", "accel": "kvm", "vcpus": 8, "memory": "4G",
     "workload": {"seed": 2, "tcf": ["sync", "async", "asymm", "none", "sync", "async", "sync", "asymm"],
                  "uaf_rate": 0.004}},
    {"name": "legacy-04", "host": "sim-nomte", "accel": "kvm", "vcpus": 2, "memory": "1G", "mte": True},
    {"name": "nomte-05", "host": "sim-nomte", "accel": "kvm", "vcpus": 2, "memory": "1G", "mte": False},
    {"name": "web-01", "host": "sim-mte", "accel": "kvm", "vcpus": 4, "memory": "2G",
     "workload": {"seed": 1, "tcf": ["sync"]}},
]
STAY_STOPPED = {"legacy-04"}          # started once so its error shows, then left stopped
MIGRATIONS = [
    ("web-01", "sim-nomte", False),   # refused: KVM MTE adds the blocker "Live migration disabled ..."
    ("build-03", "sim-mte", True),    # TCG MTE, tags copied and verified
    ("nomte-05", "sim-mte", False),   # no MTE, nothing blocks it
]


@dataclass
class Shot:
    name: str          # screenshots/<name>.png
    keys: list[str]    # pressed from the VM list (cursor on the first VM by name)
    about: str         # one line for the README


SHOTS = [
    Shot("vm-list", [], "VM list: state, host, accel, MTE, vCPUs, faults/s"),
    Shot("vm-detail", ["down", "enter"], "VM detail: config, vCPUs with kvm_mte and TCF, live counters, last faults"),
    Shot("vm-detail-error", ["down", "down", "enter"], "A VM whose start failed, with QEMU's message"),
    Shot("vm-form", ["n"], "Create form: validated while typing; the seed's text warns of a host it cannot start on"),
    Shot("confirm-stop", ["down"] * 4 + ["x"], "A destructive action asks first"),
    Shot("migrate", ["down"] * 4 + ["g"], "Migrate dialog: possible destinations, the others greyed out with the reason"),
    Shot("hosts", ["h"], "Hosts and their MTE capability probe"),
    Shot("migrations", ["M"], "Migrations: blocked (with QEMU's reason), running, done"),
    Shot("help", ["question_mark"], "Help: every key and what it does"),
    Shot("command-palette", ["ctrl+p"], "Command palette: every action by name"),
    Shot("vm-edit", ["down", "enter", "e"], "Edit form: every field of the create form; a running VM's changes wait for its next start"),
    Shot("snapshots-refused", ["down"] * 4 + ["S", "s", "enter"],
         "Snapshots of a KVM MTE VM: the save refused with QEMU's own text"),
]


async def seed(client) -> None:
    from backend.errors import MtevmError

    for config in FLEET:
        await client.create(config)
        try:
            await client.start(config["name"])
        except MtevmError:
            if config["name"] not in STAY_STOPPED:
                raise
    for name, dst, with_tags in MIGRATIONS:
        try:
            await client.migrate(name, dst, with_tags=with_tags)
        except MtevmError:
            pass          # the refusal is recorded as a blocked migration: that is the picture


async def back_to_list(app, pilot) -> None:
    """Every shot starts from the VM list with the cursor on the first VM."""
    from textual.widgets import DataTable
    from tui.screens.vm_list import VmListScreen

    while len(app.screen_stack) > 1:
        app.pop_screen()
        await pilot.pause()
    await app.switch_mode("vms")
    while not isinstance(app.screen, VmListScreen):
        await pilot.pause(0.05)
    app.screen.query_one(DataTable).move_cursor(row=0)
    await pilot.pause()


@dataclass
class Pass:
    """One run of the app: a terminal size and colour mode, and the shots taken in it."""
    size: tuple[int, int]
    ansi: bool = False          # 16 colours (what `mtevm --colors 16` and TERM=linux give)
    suffix: str = ""            # added to each file name
    shots: tuple[str, ...] = () # empty: all of SHOTS


# Besides every screen at the chosen size: the small, 16-colour terminal the app also supports.
SMALL_16_COLOURS = Pass((80, 24), ansi=True, suffix="-80x24-16colours", shots=("vm-list", "vm-detail"))


async def take_all(out: Path, run: Pass, keep_svg: bool, only: set[str]) -> list[Path]:
    from backend.client import connect
    from tui.app import MtevmApp

    made = []
    with tempfile.TemporaryDirectory(prefix="mtevm-shots-") as state:
        client = await connect(in_process=True, state_dir=state)
        await seed(client)

        async def factory():
            return client
        app = MtevmApp(factory, rate_hz=4.0, connection_label="in-process", ansi_color=run.ansi or None)
        try:
            async with app.run_test(size=run.size) as pilot:
                await back_to_list(app, pilot)
                await pilot.pause(LIVE_SECONDS)
                for shot in SHOTS:
                    if (only and shot.name not in only) or (run.shots and shot.name not in run.shots):
                        continue
                    await back_to_list(app, pilot)
                    await pilot.press(*shot.keys)
                    await pilot.pause(1.0)          # a few live samples on the new screen
                    await pilot.wait_for_scheduled_animations()
                    svg = out / f"{shot.name}{run.suffix}.svg"
                    app.save_screenshot(filename=svg.name, path=str(out))
                    made.append(to_png(svg, keep_svg))
                    shown = made[-1].relative_to(ROOT) if made[-1].is_relative_to(ROOT) else made[-1]
                    print(f"{shown}: {shot.about}")
        finally:
            if app.client is not None:      # the app closes its client when it unmounts
                await client.close()
    return made


# Glyphs Textual uses that DejaVu Sans Mono (Debian's monospace) lacks, and a look-alike it has.
GLYPH_FALLBACK = {"\u2b58": "\u25cb"}     # the header's circle icon


def prepare_svg(text: str) -> str:
    """Make Textual's SVG render in rsvg as in a browser: keep runs of spaces, use glyphs we have."""
    # Without xml:space="preserve" rsvg drops the leading spaces of each text run, gluing columns.
    text = text.replace("<svg ", '<svg xml:space="preserve" ', 1)
    for missing, present in GLYPH_FALLBACK.items():
        text = text.replace(missing, present)
    return text


def to_png(svg: Path, keep_svg: bool) -> Path:
    """SVG -> PNG with rsvg-convert (fonts: the system monospace, DejaVu Sans Mono on Debian)."""
    png = svg.with_suffix(".png")
    svg.write_text(prepare_svg(svg.read_text()))
    subprocess.run(["rsvg-convert", "--format", "png", "--output", str(png), str(svg)], check=True)
    if not keep_svg:
        svg.unlink()
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "screenshots"), help="directory for the PNGs")
    p.add_argument("--size", default="120x36", help="terminal size, COLSxROWS")
    p.add_argument("--keep-svg", action="store_true", help="keep the SVGs next to the PNGs")
    p.add_argument("--only", action="append", default=[], help="only this shot (repeatable)")
    args = p.parse_args(argv)
    if shutil.which("rsvg-convert") is None:
        print("screenshots: rsvg-convert is missing: apt-get install librsvg2-bin", file=sys.stderr)
        return 2
    try:
        cols, rows = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"screenshots: bad --size {args.size!r}: use COLSxROWS, e.g. 120x36", file=sys.stderr)
        return 2
    unknown = set(args.only) - {s.name for s in SHOTS}
    if unknown:
        print(f"screenshots: unknown shot(s) {', '.join(sorted(unknown))}; "
              f"known: {', '.join(s.name for s in SHOTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in (Pass((cols, rows)), SMALL_16_COLOURS):
        asyncio.run(take_all(out, run, args.keep_svg, set(args.only)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
