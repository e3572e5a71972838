"""The app on a real QEMU VM whose ivshmem device blocks migration: the user reads QEMU's own
blocker text on the VM's detail screen and, after trying to migrate, in the migrations screen.

The app runs on the real in-process service (tests/tui/conftest.py) with the real ``local`` host:
a real qemu-system-aarch64 process, stopped by the test and checked gone by PID at the end.
"""
from __future__ import annotations


import pytest

from backend.qemu.driver import kill_strays
from tests.tui.pilot_helpers import create_vm, migrate_via_dialog, open_detail, screen_text, started, wait_for

pytestmark = pytest.mark.qemu
IVSHMEM_BLOCKER = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"
SIZE = (160, 50)     # wide enough that the blocker text is on one line


@pytest.fixture
async def shm_args(tmp_path):
    # memfd shared memory: no host file, so the VM needs no --allow-host-files
    yield ["-object", "memory-backend-memfd,id=shm,size=1M,share=on", "-device", "ivshmem-plain,memdev=shm"]
    left = await kill_strays(str(tmp_path))
    assert left == [], f"the test left QEMU processes running: {left}"


async def test_a_real_qemu_blocker_is_shown_verbatim(make_app, shm_args):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "shared", host="local", vcpus=1, memory="128M", qemu_args=shm_args, start=True)
        try:
            await open_detail(pilot, app)
            await wait_for(pilot, lambda: IVSHMEM_BLOCKER in screen_text(app), "the blocker on the detail screen")
            # The service asks QEMU for blocked-reasons before anything else, so QEMU's blocker is
            # what refuses the attempt, even to a host that could take the VM (its own).
            table = await migrate_via_dialog(pilot, app, "local")
            await wait_for(pilot, lambda: table.row_count == 1, "the attempt recorded")
            row = [str(c) for c in table.get_row_at(0)]
            assert row[1] == "shared" and row[4] == "blocked"
            await wait_for(pilot, lambda: f"reason: {IVSHMEM_BLOCKER}" in screen_text(app),
                           "the blocker as the migration's reason")
            assert (await app.client.show("shared"))["state"] == "running"
        finally:
            await app.client.stop("shared")


@pytest.fixture
async def no_strays(tmp_path):
    yield
    assert await kill_strays(str(tmp_path)) == [], "the test left QEMU processes running"


async def test_a_real_local_to_local_migration_from_the_app_completes(make_app, no_strays):
    # `mtevm migrate NAME --to local` from the dialog: a second QEMU with -incoming on this machine.
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "mig", host="local", vcpus=1, memory="128M", start=True)
        try:
            table = await migrate_via_dialog(pilot, app, "local")
            await wait_for(pilot, lambda: table.row_count == 1 and str(table.get_row_at(0)[4]) == "completed",
                           f"the migration completed ({app.model.migrations})", timeout=60)
            assert str(table.get_row_at(0)[2]) == "local → local"
            stats = app.model.migrations[1]["stats"]       # QEMU's query-migrate figures
            assert stats["ram_normal"] > 0 and stats["ram_total"] >= 128 << 20
            await wait_for(pilot, lambda: f"normal {stats['ram_normal']} pages" in screen_text(app),
                           "QEMU's RAM figures in the detail pane")
            vm = await app.client.show("mig")
            assert (vm["host"], vm["state"]) == ("local", "running")
        finally:
            await app.client.stop("mig")
