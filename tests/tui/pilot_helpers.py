"""Helpers for the Pilot tests: wait for a condition, read the screen, set up VMs via the real client."""
from __future__ import annotations

import asyncio

FROZEN_TIME = 1_767_225_600.0     # 2026-01-01 00:00:00 UTC: every displayed time in tests


async def wait_for(pilot, condition, what: str, timeout: float = 30.0):
    """Let the app run until ``condition()`` is truthy; fail saying ``what`` never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await pilot.pause(0.05)


def screen_rows(app) -> list[list]:
    """The terminal right now as rows of Rich segments (what the driver would write)."""
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    return [[seg for strip in row for seg in strip] for row in update.strips]


def screen_text(app) -> str:
    """The characters on the terminal right now, one line per row (what the user reads)."""
    return "\n".join("".join(seg.text for seg in row) for row in screen_rows(app))


async def started(pilot, app):
    """Wait until the app has connected and shows its first screen."""
    from tui.screens.vm_list import VmListScreen
    await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "the VM list")


async def create_vm(app, name: str, *, host: str = "sim-mte", mte: bool = True, start: bool = False,
                    vcpus: int = 2, **extra) -> dict:
    """Set-up through the app's own client (the real service); the stories drive the UI."""
    cfg = {"name": name, "host": host, "mte": mte, "vcpus": vcpus, **extra}
    vm = await app.client.create(cfg)
    if start:
        vm = await app.client.start(name)
    await app.refresh_model()
    return vm


async def open_form_and_name(pilot, app, name: str):
    """n, wait for the form and its hosts (sim-mte chosen), type ``name``."""
    from tui.screens.vm_form import VmFormScreen
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(app.screen, VmFormScreen), "the create form")
    await wait_for(pilot, lambda: app.screen.query_one("#host").value == "sim-mte", "hosts loaded")
    await pilot.press(*name)


def form_message(app) -> str:
    """The form's verdict line (the dry run's answer, or what the form itself refuses)."""
    return str(app.screen.query_one("#form-error").render())


async def open_detail(pilot, app):
    """enter on the list's current row; returns the VM detail screen once its definition is loaded."""
    from tui.screens.vm_detail import VmDetailScreen
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(app.screen, VmDetailScreen) and app.screen.detail, "the VM detail")
    await pilot.pause(0.1)
    assert [type(s).__name__ for s in app.screen_stack][-2:] == ["VmListScreen", "VmDetailScreen"]
    return app.screen


async def migrate_via_dialog(pilot, app, to: str | None = None):
    """g, choose ``to`` (default: the first destination), enter; returns the migrations table."""
    from textual.widgets import DataTable
    from tui.screens.migrations import MigrationsScreen
    await pilot.press("g")
    await wait_for(pilot, lambda: app.screen.query("#destinations") and
                   app.screen.query_one("#destinations").option_count > 0, "the destinations")
    options = app.screen.query_one("#destinations")
    names = [options.get_option_at_index(i).id for i in range(options.option_count)]
    assert not options.get_option_at_index(names.index(to) if to else 0).disabled, f"{to} is greyed out"
    await pilot.press(*["down"] * (names.index(to) if to else 0), "enter")
    await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "the migrations screen")
    return app.screen.query_one("#migration-table", DataTable)


async def save_first_snapshot(pilot, app, tag: str):
    """From a VM's detail screen: S opens its snapshots screen, s saves a snapshot named ``tag``;
    returns the snapshots table once that snapshot is its one row."""
    from tui.screens.name_prompt import NamePrompt
    from tui.screens.snapshots import SnapshotsScreen
    await pilot.press("S")
    await wait_for(pilot, lambda: isinstance(app.screen, SnapshotsScreen), "the snapshots screen")
    await pilot.press("s")
    await wait_for(pilot, lambda: isinstance(app.screen, NamePrompt), "the tag question")
    await pilot.press(*tag, "enter")
    table = app.screen.query_one("#snapshot-table")
    await wait_for(pilot, lambda: isinstance(app.screen, SnapshotsScreen) and table.row_count == 1,
                   "the snapshot listed")
    return table
