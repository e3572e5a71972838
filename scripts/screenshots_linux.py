#!/usr/bin/env python3
"""Make screenshots/vm-detail-linux.png and selftests.png from the real app and a real Linux guest.

Separate from scripts/screenshots.py (simulated hosts, seconds) because this one boots mtevm's
Linux MTE image under TCG (``mtevm image build linux`` first): the VM detail of a running Linux VM
(guest facts, per-process faults from ``mte-faults`` run with exec, the live serial console, QEMU's
command line) and its selftests screen. Everything runs in a private runtime/state dir; the VM is
stopped at the end.

    python scripts/screenshots_linux.py [--out screenshots] [--size 120x50]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.screenshots import to_png  # noqa: E402


async def take(out: Path, size: tuple[int, int]) -> list[Path]:
    from textual.widgets import DataTable

    from backend.client import connect
    from backend.guests.linux.image import linux_image
    from tui.app import MtevmApp
    from tui.screens.vm_detail import VmDetailScreen
    img = linux_image()
    with tempfile.TemporaryDirectory(prefix="mtevm-shots-") as tmp:
        dirs = {"runtime_dir": f"{tmp}/run", "state_dir": f"{tmp}/state"}
        client = await connect(in_process=True, **dirs)
        await client.create({"name": "linux-01", "host": "local", "vcpus": 2, "memory": "512M",
                             "guest": {"kind": "linux", "fault_address": True},
                             "workload": {"tcf": ["sync", "async"], "rate": 500}})
        await client.start("linux-01")
        try:
            for _ in range(600):
                if ((await client.show("linux-01")).get("guest_facts") or {}).get("agent") == "connected":
                    break
                await asyncio.sleep(0.1)
            async for _ in client.exec("linux-01", ["40", "25"], program="mte-faults",
                                       data=open(img.program("mte-faults"), "rb").read()):
                pass
            shots = []

            async def factory():
                return client

            app = MtevmApp(factory)
            async with app.run_test(size=size) as pilot:
                await pilot.pause(1)
                await app.push_screen(VmDetailScreen("linux-01"))
                await pilot.pause(4)
                app.save_screenshot(filename="vm-detail-linux.svg", path=str(out))
                shots.append(out / "vm-detail-linux.svg")
                await pilot.press("t")
                for _ in range(600):
                    await pilot.pause(0.1)
                    table = app.screen.query(DataTable)
                    if table and table.first().row_count and all(
                            table.first().get_row_at(i)[1] in ("pass", "fail", "skip")
                            for i in range(table.first().row_count)):
                        break
                app.save_screenshot(filename="selftests.svg", path=str(out))
                shots.append(out / "selftests.svg")
                await client.stop("linux-01")      # before the app closes the client with it
        finally:
            from backend.qemu.driver import kill_strays
            await kill_strays(dirs["runtime_dir"])   # only if something above failed half-way
            await client.close()
    return [to_png(s, keep_svg=False) for s in shots]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "screenshots"))
    p.add_argument("--size", default="120x50", help="terminal size, COLSxROWS")
    args = p.parse_args(argv)
    cols, rows = (int(x) for x in args.size.split("x"))
    for png in asyncio.run(take(Path(args.out), (cols, rows))):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
