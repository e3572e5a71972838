"""Snapshots of the app with libvirt hosts: the hosts screen (a connected host with its versions
and probe, a host that is gone with libvirt's reason) and the VM list and detail (an mtevm VM on a
libvirt host, a domain mtevm did not make shown read-only, a VM of the lost host shown unknown).

Deterministic: the VMs are stopped (no live counters), the test hosts have fixed hostnames and
UUIDs, the lost host's socket path is fixed, the clock is frozen and there is no live feed.
Regenerate with ``pytest tests/libvirt/test_libvirt_snapshots.py --snapshot-update``.
"""
from __future__ import annotations

import subprocess

import pytest

from backend.client import connect
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig
from backend.paths import Paths
from backend.store import Store, VmRow
from tests.tui.pilot_helpers import screen_text, wait_for
from tests.tui.test_snapshots import SNAPSHOT_CLOCK, PausedSimHost, settle
from tui.app import MtevmApp

GONE_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
THEIRS = ("<domain type='qemu'><name>theirs</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
          "<os><type arch='aarch64' machine='virt'>hvm</type></os></domain>")


@pytest.fixture
def libvirt_app(tmp_path, libvirt_env):
    """The app on an in-process service whose store already knows hosta (connected) and gone
    (a host that went away, with one VM), plus a domain on hosta that mtevm did not make."""
    paths = Paths(str(tmp_path / "run"), str(tmp_path / "state"))
    paths.ensure_state_dir()
    store = Store(paths.store)
    store.add_host("hosta", "libvirt", libvirt_env.uri_a)
    store.add_host("gone", "libvirt", GONE_URI)
    store.add_vm(VmRow("old", "gone", VirtMachineConfig(name="old", vcpus=1).to_dict(), WorkloadConfig().to_dict()))
    store.close()
    subprocess.run(["virsh", "-c", libvirt_env.uri_a, "define", "/dev/stdin"], input=THEIRS, check=True,
                   capture_output=True, text=True, timeout=60)
    hosts = {"sim-mte": PausedSimHost("sim-mte", True)}

    async def factory():
        return await connect(in_process=True, state_dir=paths.state_dir, runtime_dir=paths.runtime_dir, hosts=hosts)
    return MtevmApp(factory, clock=lambda: SNAPSHOT_CLOCK, live=False, connection_label="in-process")


async def _fleet(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.screen.id == "vm-list", "the VM list")
    hosts = {}
    while hosts.get("hosta", {}).get("state") != "connected" or "gone" not in hosts:
        await pilot.pause(0.1)
        hosts = {h["name"]: h for h in await app.client.hosts()}
    await app.client.create({"name": "v1", "host": "hosta", "vcpus": 2, "memory": "256M"})
    await app.refresh_model()
    await wait_for(pilot, lambda: "hosta/theirs" in screen_text(app) and "v1" in screen_text(app),
                   "the libvirt VMs listed")


@pytest.mark.parametrize("screen", ["hosts", "vm_list", "vm_detail"])
def test_libvirt_screens(snap_compare, libvirt_app, screen):
    async def run_before(pilot):
        await _fleet(pilot)
        app = pilot.app
        if screen == "hosts":
            await pilot.press("h")
            await wait_for(pilot, lambda: app.screen.id == "hosts" and app.screen.hosts, "the hosts")
            app.screen.select_host("hosta")
            await wait_for(pilot, lambda: "probe of hosta" in str(app.screen.query_one("#probe-summary").render()),
                           "hosta's probe")
        elif screen == "vm_detail":
            await pilot.press("down")
            await pilot.press("enter")
            await wait_for(pilot, lambda: getattr(app.screen, "detail", None), "the VM detail")
        await settle(pilot)
    assert snap_compare(libvirt_app, terminal_size=(120, 36), run_before=run_before)
