"""The everyday operations driven through the real app, by their keys (remappable ids), on the real
in-process service: pause/resume, shutdown and clone on a simulated VM; snapshots and the
migrations screen's cancel on a real QEMU VM. Destructive keys ask first."""
from __future__ import annotations

import asyncio

import pytest

from backend.qemu.driver import kill_strays
from tests.tui.pilot_helpers import create_vm, open_detail, save_first_snapshot, screen_text, started, wait_for
from tui.screens.confirm import ConfirmScreen
from tui.screens.name_prompt import NamePrompt
from tui.screens.snapshots import SnapshotsScreen

SIZE = (120, 36)


def state(app, name: str) -> str:
    return app.model.vms[name]["state"]


async def test_pause_shutdown_and_clone_by_key(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        await pilot.press("p")
        await wait_for(pilot, lambda: state(app, "web1") == "paused", "paused")
        assert "paused" in screen_text(app)
        await pilot.press("p")                                   # the same key resumes
        await wait_for(pilot, lambda: state(app, "web1") == "running", "running again")

        await pilot.press("C")
        await wait_for(pilot, lambda: isinstance(app.screen, NamePrompt), "the clone's name")
        await pilot.press(*"web2", "enter")                      # typed over the proposed "web1-clone"
        await wait_for(pilot, lambda: "web2" in app.model.vms, "the clone listed")
        assert state(app, "web2") == "stopped"

        await pilot.press("X")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the shutdown question")
        await pilot.press("n")                                    # no: nothing happens
        await pilot.pause(0.2)
        assert state(app, "web1") == "running"
        await pilot.press("X")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the shutdown question")
        await pilot.press("y")
        await wait_for(pilot, lambda: state(app, "web1") == "stopped", "shut down")
        await wait_for(pilot, lambda: any("no agent" in str(n.message) for n in app._notifications),
                       "says it stopped the VM instead")


@pytest.mark.qemu
async def test_snapshots_and_migration_cancel_of_a_real_vm(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        try:
            await create_vm(app, "q1", host="local", vcpus=1, accel="tcg", cpu="max", memory="128M",
                            workload={"rate": 0}, start=True)
            await open_detail(pilot, app)
            table = await save_first_snapshot(pilot, app, "t1")
            assert "saved with RAM (mach-virt.tag block)" in screen_text(app)
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the restore question")
            await pilot.press("y")
            await wait_for(pilot, lambda: "restored q1 to t1: running" in
                           str(app.screen.query_one("#snapshot-message").render()), "restored")
            await pilot.press("d")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete question")
            await pilot.press("y")
            await wait_for(pilot, lambda: isinstance(app.screen, SnapshotsScreen) and table.row_count == 0,
                           "the snapshot gone")
            assert await app.client.snapshot_list("q1") == []

            # A migration slowed by QEMU's own bandwidth limit, cancelled from the migrations screen.
            await app.client.monitor("q1", 'migrate-set-parameters {"max-bandwidth": 65536}')
            await app.client.migrate("q1", "local")
            await app.refresh_model()
            await pilot.press("escape", "escape", "M")
            await wait_for(pilot, lambda: app.screen.id == "migrations" and
                           any(m["state"] == "active" for m in app.model.migrations.values()), "active")
            await pilot.press("c")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the cancel question")
            await pilot.press("y")
            await wait_for(pilot, lambda: [m["state"] for m in app.model.migrations.values()] == ["cancelled"],
                           "cancelled")
            assert state(app, "q1") == "running"
        finally:
            for vm in await app.client.list():
                if vm["state"] in ("running", "paused"):
                    await app.client.stop(vm["name"])
    assert await kill_strays(str(tmp_path)) == []
