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
