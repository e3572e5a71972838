"""A big fleet (more than BIG_FLEET VMs): the list opens, filters and scrolls, only the rows in view
are drawn each tick, rows catch up as they scroll into view, and the event feed carries per-vCPU
figures only for the VM whose detail is open. Real app, real in-process service, real workers."""
from __future__ import annotations

from tests.tui.pilot_helpers import started, wait_for
from tui.live import BIG_FLEET
from tui.screens.vm_detail import VmDetailScreen

N = BIG_FLEET + 20
FAULTY = {"rate": 500, "uaf_rate": 0.2, "heap_size": 65536}


def name(i: int) -> str:
    return f"vm{i:03d}"


def shown(app, key: str) -> dict[str, str]:
    """The cells the list last drew for ``key``."""
    rows = app.screen.rows
    return {c: rows._cells[(key, c)] for c in rows.columns}


async def test_a_big_fleet_list_draws_only_the_rows_in_view(make_app):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, app)
        for i in range(N):
            await app.client.create({"name": name(i), "vcpus": 1, "workload": FAULTY})
        await app.refresh_model()
        for i in range(N):
            await app.client.start(name(i))
        await wait_for(pilot, lambda: app.feed_vcpus == "none", "the feed to carry VM totals only")
        rows = app.screen.rows
        assert rows.keys == [name(i) for i in range(N)]
        in_view = rows.visible_keys()
        assert name(0) in in_view and name(N - 1) not in in_view

        # Rows in view follow the model; a row out of view is not drawn (still as it was built).
        first, last = name(0), name(N - 1)
        await wait_for(pilot, lambda: shown(app, first) == app.screen.values_of(first)
                       and shown(app, first)["state"] == "running" and shown(app, first)["faults"] not in ("", "–", "-"),
                       "the first row's live figures")
        await wait_for(pilot, lambda: app.model.vms[last]["state"] == "running", "the last VM running")
        assert shown(app, last)["state"] == "stopped"      # drawn when it was built, not since

        # Scrolled into view, it catches up at once.
        await pilot.press("ctrl+end")
        await wait_for(pilot, lambda: last in rows.visible_keys() and shown(app, last)["state"] == "running",
                       "the last row drawn once in view")

        # The filter narrows 120 rows to the ten that match.
        await pilot.press("slash", *"vm11", "enter")
        await wait_for(pilot, lambda: rows.keys == [name(i) for i in range(110, 120)], "the filtered rows")

        # The detail of one VM: the feed now carries that VM's vCPUs (and only its).
        app.screen.query_one("#vms").move_cursor(row=3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, VmDetailScreen), "the detail screen")
        await wait_for(pilot, lambda: app.feed_vcpus == name(113), "the feed to follow the VM on screen")
        await wait_for(pilot, lambda: (s := app.model.sample(name(113))) is not None and s.counters.get("vcpus"),
                       "per-vCPU counters of the VM on screen")
        other = app.model.sample(name(0))
        assert other is not None and "vcpus" not in other.counters
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.feed_vcpus == "none", "the feed back to VM totals only")
        for i in range(N):
            await app.client.stop(name(i))
