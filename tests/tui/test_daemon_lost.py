"""When the daemon goes away the app says so and does not pass frozen figures off as live (issue 11
item 11): the status bar shows the lost daemon, live figures are dimmed, and the app starts the
daemon again as the CLI does, then shows what the new daemon says.

A real daemon (the ``mtevm_daemon`` fixture) killed by PID with SIGKILL; the daemon the app starts
again is stopped by PID by the ``mtevm_paths`` fixture.
"""
from __future__ import annotations

import os
import signal

from backend.client import connect
from backend.daemon.launch import daemon_pid
from tests.tui.pilot_helpers import create_vm, screen_rows, started, wait_for
from tui.app import STALL_SECONDS, MtevmApp
from tui.components.status import StatusBar

BUGGY = {"seed": 7, "uaf_rate": 0.02, "overflow_rate": 0.01, "wild_rate": 0.0}


def status(app) -> str:
    return app.screen.query_one(StatusBar).value


def row_colours(app, text: str) -> list:
    """The foreground colours of the screen row that shows ``text`` (Textual draws CSS ``dim`` by
    blending the text towards its background, so dimmed text has other, darker colours)."""
    for row in screen_rows(app):
        if text in "".join(seg.text for seg in row):
            return [seg.style.color for seg in row if seg.text.strip() and seg.style is not None]
    raise AssertionError(f"{text!r} is not on the screen")


async def test_a_killed_daemon_is_shown_lost_dimmed_and_started_again(mtevm_paths, mtevm_daemon):
    async def factory():
        return await connect(runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    app = MtevmApp(factory, rate_hz=8)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True, workload=BUGGY)
        await wait_for(pilot, lambda: (app.model.faults_per_s("web1") or 0) > 0, "web1's live faults/s")
        assert status(app).startswith(" daemon │")
        live_colours = row_colours(app, "web1")

        os.kill(mtevm_daemon, signal.SIGKILL)
        await wait_for(pilot, lambda: "daemon LOST" in status(app), "the lost daemon in the status bar")
        assert app.screen.query_one(StatusBar).has_class("-lost")
        assert app.screen.query_one("#vms").rich_style.dim
        await wait_for(pilot, lambda: row_colours(app, "web1") != live_colours, "the frozen figures dimmed")

        await wait_for(pilot, lambda: daemon_pid(mtevm_paths) not in (None, 0, mtevm_daemon),
                       "a new daemon started by the app")
        await wait_for(pilot, lambda: status(app).startswith(" daemon │"), "the status bar back to normal")
        assert not app.has_class("-daemon-lost") and not app.screen.query_one("#vms").rich_style.dim
        await wait_for(pilot, lambda: row_colours(app, "web1") == live_colours, "the figures no longer dimmed")
        shown = app.model.vms["web1"]["state"]
        assert shown == (await app.client.show("web1"))["state"], "the list shows what the new daemon says"
        assert shown != "running" or (app.model.faults_per_s("web1") is not None)


async def test_a_hung_daemon_is_shown_lost_until_it_answers_again(mtevm_paths, mtevm_daemon):
    """A daemon that stops answering (SIGSTOP) while nothing runs: the stream's heartbeats stop, so
    the app shows it lost; after SIGCONT it is back. No second daemon is started meanwhile."""
    async def factory():
        return await connect(runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    app = MtevmApp(factory)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, app)
        await create_vm(app, "idle1")                      # stopped: no counters, only heartbeats flow
        await pilot.pause(STALL_SECONDS + 1)
        assert status(app).startswith(" daemon │"), "an idle daemon is not taken for a hung one"
        os.kill(mtevm_daemon, signal.SIGSTOP)
        try:
            await wait_for(pilot, lambda: "daemon LOST" in status(app), "the hung daemon in the status bar")
        finally:
            os.kill(mtevm_daemon, signal.SIGCONT)
        await wait_for(pilot, lambda: status(app).startswith(" daemon │"), "the daemon answering again")
        assert daemon_pid(mtevm_paths) == mtevm_daemon
        assert "idle1" in app.model.vms
