"""The app follows a libvirt host's connection live: the hosts screen shows it go unreachable with
libvirt's reason, its VM turn unknown in the VM list, and both come back when libvirtd does."""
from __future__ import annotations

import asyncio

import pytest

from backend.client import connect
from tests.tui.pilot_helpers import FROZEN_TIME, screen_text, wait_for
from tui.app import MtevmApp

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


async def test_hosts_screen_and_vm_list_follow_a_host_that_goes_and_comes_back(libvirt_env, tmp_path):
    h = libvirt_env

    async def factory():
        return await connect(in_process=True, state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path / "run"))
    app = MtevmApp(factory, clock=lambda: FROZEN_TIME, connection_label="in-process")
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: app.screen.id == "vm-list", "the VM list")
        await app.client.host_add("hosta", h.uri_a)
        await app.client.create({"name": "v1", "host": "hosta", "vcpus": 1})
        await app.refresh_model()
        await wait_for(pilot, lambda: "v1" in screen_text(app), "v1 listed")
        await pilot.press("h")
        await wait_for(pilot, lambda: app.screen.id == "hosts" and "connected" in screen_text(app),
                       "hosta connected on the hosts screen")
        await asyncio.to_thread(h.a.stop_libvirtd)
        text = await wait_for(pilot, lambda: "unreachable" in (t := screen_text(app)) and t, "hosta unreachable")
        line = next(x for x in text.splitlines() if "hosta" in x)
        assert "no: " in line, line            # libvirt's reason in the available column
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen.id == "vm-list" and "unknown" in screen_text(app),
                       "v1 unknown in the VM list")
        await asyncio.to_thread(h.a.start_libvirtd)
        await wait_for(pilot, lambda: "unknown" not in screen_text(app) and "stopped" in screen_text(app),
                       "v1 stopped again once hosta is back", timeout=60)


async def test_the_app_follows_virsh_and_keeps_libvirt_snapshots(libvirt_env, tmp_path):
    """A libvirt VM in the app: `virsh suspend` shows as paused in the VM list at once (libvirt's
    lifecycle events), and the snapshots screen saves, lists (virsh's snapshot too), restores and
    deletes libvirt domain snapshots by its keys."""
    import subprocess

    from tests.tui.pilot_helpers import open_detail, save_first_snapshot
    from tui.screens.confirm import ConfirmScreen
    from tui.screens.snapshots import SnapshotsScreen

    uri = libvirt_env.uri_a

    def virsh(*args):
        r = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr

    async def factory():
        return await connect(in_process=True, state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path / "run"))
    app = MtevmApp(factory, clock=lambda: FROZEN_TIME, connection_label="in-process")
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: app.screen.id == "vm-list", "the VM list")
        try:
            await app.client.host_add("hosta", uri)
            await app.client.create({"name": "v1", "host": "hosta", "vcpus": 1, "memory": "128M"})
            await app.client.start("v1")
            await wait_for(pilot, lambda: app.model.vms.get("v1", {}).get("state") == "running", "v1 running")
            await asyncio.to_thread(virsh, "suspend", "v1")
            await wait_for(pilot, lambda: app.model.vms["v1"]["state"] == "paused" and "paused" in screen_text(app),
                           "virsh suspend shown as paused")
            await asyncio.to_thread(virsh, "resume", "v1")
            await wait_for(pilot, lambda: app.model.vms["v1"]["state"] == "running", "virsh resume shown")

            await open_detail(pilot, app)
            await save_first_snapshot(pilot, app, "t1")
            assert "saved with RAM (mach-virt.tag block)" in screen_text(app)
            await asyncio.to_thread(virsh, "snapshot-create-as", "v1", "theirs", "--memspec",
                                    "file=/var/lib/libvirt/mtevm/v1-theirs.mem,snapshot=external")
            await pilot.press("escape", "S")     # opened again: listed from libvirt, virsh's snapshot too
            await wait_for(pilot, lambda: isinstance(app.screen, SnapshotsScreen) and
                           app.screen.query_one("#snapshot-table").row_count == 2, "virsh's snapshot listed too")
            cells = app.screen.query_one("#snapshot-table").get_row("theirs")
            assert cells[4:6] == ["-", "-"], cells              # no mtevm counters in virsh's snapshot
            await pilot.press("r")                              # the cursor is on t1 (oldest first)
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the restore question")
            await pilot.press("y")
            message = lambda: str(app.screen.query_one("#snapshot-message").render())   # noqa: E731
            await wait_for(pilot, lambda: "restored v1 to t1: running" in message(), "restored")
            await pilot.press("d")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete question")
            await pilot.press("y")                              # t1 is current and has a child: libvirt's text
            await wait_for(pilot, lambda: "delete refused: unsupported configuration: deletion of active external "
                           "snapshot that is not a leaf snapshot is not supported" in message(), "libvirt's refusal")
            assert app.model.vms["v1"]["state"] == "running"
        finally:
            for vm in await app.client.list():
                if vm["state"] in ("running", "paused") and vm["host"] == "hosta":
                    await app.client.stop(vm["name"])
