"""Live figures tell the truth (issue 11 items 11 and 12): a stopped VM shows no live figures at
once, and sorting by faults ranks by the rate the column shows.

The real app on the real in-process service with its simulated hosts running (live feed on).
"""
from __future__ import annotations

from tests.tui.pilot_helpers import create_vm, open_detail, screen_text, started, wait_for
from tui.components.counters import VcpuTable
from tui.screens.vm_list import VmListScreen

SIZE = (100, 30)
BUGGY = {"seed": 7, "uaf_rate": 0.02, "overflow_rate": 0.01, "wild_rate": 0.0}
CLEAN = {"seed": 1, "uaf_rate": 0.0, "overflow_rate": 0.0, "wild_rate": 0.0}


def vcpu_column(app, column: str) -> list[str]:
    """What one column of the detail's vCPU table shows, per vCPU and the VM total."""
    table = app.screen.query_one(VcpuTable)
    return [row.cells[column].value for row in [*table.rows.values(), table.total]]


async def test_a_stopped_vm_detail_shows_stopped_at_once(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True, workload=BUGGY)
        await open_detail(pilot, app)
        await wait_for(pilot, lambda: vcpu_column(app, "kvm_mte")[:2] == ["yes", "yes"]
                       and vcpu_column(app, "fps")[-1] not in ("", "-", "0.0"), "live kvm_mte and faults/s")
        await pilot.press("x", "y")
        await wait_for(pilot, lambda: app.model.vms["web1"]["state"] == "stopped", "web1 stopped")
        await pilot.pause(0.05)                  # one message round: no new fetch from the daemon needed
        assert "yes" not in vcpu_column(app, "kvm_mte")
        assert set(vcpu_column(app, "fps")) == {"-"}
        assert "stopped on sim-mte" in screen_text(app)
        await pilot.pause(1.0)                   # counters sampled before the stop must not bring them back
        assert "yes" not in vcpu_column(app, "kvm_mte") and set(vcpu_column(app, "fps")) == {"-"}


async def test_sort_by_faults_ranks_by_the_live_rate_shown(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "a-idle", workload=BUGGY)                 # stopped
        await create_vm(app, "b-quiet", start=True, workload=CLEAN)                    # running, clean workload
        await create_vm(app, "c-busy", start=True, workload=BUGGY)     # running, faulting
        await wait_for(pilot, lambda: (app.model.faults_per_s("c-busy") or 0) > 0, "c-busy's live faults/s")
        for _ in range(3):                                             # name -> state -> host -> faults
            await pilot.press("o")
        assert isinstance(app.screen, VmListScreen) and app.screen.sort_key == "faults"
        await wait_for(pilot, lambda: app.screen.rows.keys == ["c-busy", "b-quiet", "a-idle"],
                       "running VMs by their live faults/s, the stopped one last")
        shown = {key: app.screen.rows._cells[(key, "faults")] for key in app.screen.rows.keys}
        assert shown["a-idle"] == "-" and float(shown["c-busy"].rstrip("kMG")) > 0
