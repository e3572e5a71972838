"""SVG snapshots of every screen at 80x24 and 160x50 (pytest-textual-snapshot, Textual pinned).

Deterministic by construction: the real simulated hosts, but with their vCPUs paused
(``SimHost.start(run=False)``) and stepped a fixed, seeded number of accesses; no live feed
(``live=False``), so counters are frozen at that sample; a frozen clock for every displayed time
(fault ages read 0s because the faults are newer than the clock); the probe shown is the
simulated host's, whose facts are the same on every machine; no cursor blink.
Regenerate with ``pytest tests/tui/test_snapshots.py --snapshot-update``.
"""
from __future__ import annotations

import pytest
from textual.widgets import Input

from backend.client import connect
from backend.errors import MigrationError
from backend.hosts.sim import SimHost
from tests.tui.pilot_helpers import screen_text, wait_for
from tui.app import MtevmApp

SIZES = [(80, 24), (160, 50)]
SNAPSHOT_CLOCK = 1_600_000_000.0          # 2020-09-13 12:26:40 UTC, before any fault's time
BUGGY = {"seed": 42, "uaf_rate": 0.01, "overflow_rate": 0.005, "wild_rate": 0.002}
CLEAN = {"seed": 1, "uaf_rate": 0.0, "overflow_rate": 0.0, "wild_rate": 0.0}


class PausedSimHost(SimHost):
    """The real simulated host; its vCPUs run only when the test steps them."""

    async def start(self, spec, *, run: bool = False):
        return await super().start(spec, run=False)


@pytest.fixture
def snapshot_app(tmp_path):
    hosts = {"sim-mte": PausedSimHost("sim-mte", True), "sim-nomte": PausedSimHost("sim-nomte", False)}

    async def factory():
        return await connect(in_process=True, state_dir=str(tmp_path / "state"),
                             runtime_dir=str(tmp_path / "run"), hosts=hosts)
    app = MtevmApp(factory, clock=lambda: SNAPSHOT_CLOCK, live=False, connection_label="in-process")
    return app, hosts


def step_all(hosts, accesses: int) -> None:
    for host in hosts.values():
        for vm in sorted(host.vms, key=lambda v: v.spec.config.name):
            vm.step(accesses)


async def settle(pilot) -> None:
    """No blinking cursors, nothing left to draw."""
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False
    await pilot.pause(0.3)


async def fleet(pilot, hosts) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.screen.id == "vm-list", "the VM list")
    c = app.client
    await c.create({"name": "web1", "host": "sim-mte", "workload": CLEAN})
    await c.create({"name": "web2", "host": "sim-mte", "vcpus": 4, "workload": CLEAN})
    await c.create({"name": "tcg1", "host": "sim-mte", "accel": "tcg", "cpu": "max", "workload": CLEAN})
    await c.create({"name": "db1", "host": "sim-nomte", "mte": False, "memory": "1G", "workload": CLEAN})
    for name in ("web1", "web2", "tcg1"):
        await c.start(name)
    await c.set_mte("web2", False)
    step_all(hosts, 2000)
    await app.refresh_model()
    await wait_for(pilot, lambda: app.screen.rows.keys == ["db1", "tcg1", "web1", "web2"]
                   and "sim-nomte" in screen_text(app), "the fleet listed, columns sized")


async def one_buggy_vm(pilot, hosts) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.screen.id == "vm-list", "the VM list")
    await app.client.create({"name": "web1", "host": "sim-mte", "workload": BUGGY})
    await app.client.start("web1")
    step_all(hosts, 40_000)          # counters above 10,000: the k unit is on screen (item 9)
    await app.refresh_model()
    await wait_for(pilot, lambda: app.screen.rows.keys == ["web1"] and "running" in screen_text(app),
                   "web1 listed, columns sized")


def scenario(name):
    """run_before for each screen: the set-up, then the keys a user presses."""
    async def vm_list(pilot, hosts):
        await fleet(pilot, hosts)
        await pilot.press("down", "space", "down")

    async def vm_detail(pilot, hosts):
        await one_buggy_vm(pilot, hosts)
        await pilot.press("enter")
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "detail", None), "the VM detail")

    async def vm_form(pilot, hosts):
        await wait_for(pilot, lambda: pilot.app.screen.id == "vm-list", "the VM list")
        await pilot.press("n")
        await wait_for(pilot, lambda: pilot.app.screen.query("#host") and
                       pilot.app.screen.query_one("#host").value == "sim-mte", "the form with its hosts")
        await pilot.press(*"db2", "tab", "enter", "down", "enter")
        await wait_for(pilot, lambda: "not supported by KVM" in str(pilot.app.screen.verdict), "the KVM error")

    async def hosts_screen(pilot, hosts):
        await wait_for(pilot, lambda: pilot.app.screen.id == "vm-list", "the VM list")
        await pilot.press("h")
        await wait_for(pilot, lambda: pilot.app.screen.id == "hosts" and
                       "probe of sim-mte" in str(pilot.app.screen.query_one("#probe-summary").render()),
                       "the sim-mte probe")

    async def migrations(pilot, hosts):
        await fleet(pilot, hosts)
        app, c = pilot.app, pilot.app.client
        await c.create({"name": "plain1", "host": "sim-mte", "mte": False, "workload": CLEAN})
        await c.start("plain1")
        await c.migrate("plain1", "sim-nomte")
        while (await c.migrations())[0]["state"] != "completed":
            await pilot.pause(0.05)
        with pytest.raises(MigrationError):
            await c.migrate("web1", "sim-nomte")          # blocked: the newest row, its reason below
        await app.refresh_model()
        await pilot.press("M")
        await wait_for(pilot, lambda: app.screen.id == "migrations", "the migrations")

    async def confirm(pilot, hosts):
        await fleet(pilot, hosts)
        await pilot.press("x")
        await wait_for(pilot, lambda: pilot.app.screen.focused is not None and pilot.app.screen.focused.id == "no",
                       "the confirmation, its safe answer focused")

    async def migrate_dialog(pilot, hosts):
        await one_buggy_vm(pilot, hosts)
        await pilot.press("g")
        await wait_for(pilot, lambda: pilot.app.screen.query("#destinations") and
                       pilot.app.screen.query_one("#destinations").option_count, "the destinations")

    async def daemon_lost(pilot, hosts):
        # How the list looks while the daemon is gone: the status bar says so, the figures are dimmed
        # (the loss itself, with a real daemon killed by PID, is in test_daemon_lost.py).
        await fleet(pilot, hosts)
        pilot.app.set_daemon_lost("event stream lost")

    async def help_screen(pilot, hosts):
        await wait_for(pilot, lambda: pilot.app.screen.id == "vm-list", "the VM list")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: pilot.app.screen.query("#help-keys") and
                       pilot.app.screen.query_one("#help-keys").row_count, "the help table")

    async def palette(pilot, hosts):
        await wait_for(pilot, lambda: pilot.app.screen.id == "vm-list", "the VM list")
        await pilot.press("colon", *"migr")
        await wait_for(pilot, lambda: pilot.app.screen.query("CommandList") and
                       pilot.app.screen.query_one("CommandList").option_count == 3, "the matching commands")

    async def snapshots_refused(pilot, hosts):
        # The snapshots of a KVM MTE VM: saving is refused with QEMU's own blocker text.
        await one_buggy_vm(pilot, hosts)
        await pilot.press("S")
        await wait_for(pilot, lambda: pilot.app.screen.id == "snapshots", "the snapshots screen")
        await pilot.press("s")
        await wait_for(pilot, lambda: pilot.app.screen.query("#prompt-input"), "the tag question")
        await pilot.press(*"before", "enter")
        await wait_for(pilot, lambda: pilot.app.screen.id == "snapshots" and "MTE enabled" in
                       str(pilot.app.screen.query_one("#snapshot-message").render()), "the refusal")

    async def clone_prompt(pilot, hosts):
        await one_buggy_vm(pilot, hosts)
        await pilot.press("C")
        await wait_for(pilot, lambda: pilot.app.screen.query("#prompt-input"), "the clone's name question")

    async def edit_form(pilot, hosts):
        # Every field of the create form, the VM's pending changes shown as the values it boots with next.
        await one_buggy_vm(pilot, hosts)
        await pilot.app.client.edit("web1", {"vcpus": 4, "memory": "512M"})
        await pilot.press("enter")
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "detail", None), "the VM detail")
        await pilot.press("e")
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "verdict", None), "the edit form's verdict")

    return locals()[name]


SCREENS = ["vm_list", "vm_detail", "vm_form", "hosts_screen", "migrations", "confirm", "migrate_dialog",
           "help_screen", "palette", "daemon_lost", "snapshots_refused", "clone_prompt", "edit_form"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("screen", SCREENS)
def test_screen(snap_compare, snapshot_app, screen, size):
    app, hosts = snapshot_app
    play = scenario(screen)

    async def run_before(pilot):
        await play(pilot, hosts)
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)
