"""One test per user story of the issue, each driving the real app (Pilot) on the real service."""
from __future__ import annotations

import fcntl
import os

from textual.widgets import DataTable

from tests.tui.pilot_helpers import (create_vm, form_message, migrate_via_dialog, open_detail, open_form_and_name,
                                     screen_text, started, wait_for)
from tui.components.counters import VcpuTable
from tui.screens.vm_form import VmFormScreen
from tui.screens.vm_list import VmListScreen

SIZE = (80, 24)


def vm_cells(app, name: str) -> list[str]:
    """The VM's row in the list as shown ([] while it is not listed)."""
    table = app.screen.query_one("#vms", DataTable)
    return [str(c) for c in table.get_row(name)] if name in app.screen.rows.keys else []


def vcpu_column(app, column: str) -> list[str]:
    table = app.screen.query_one(VcpuTable)
    return [table.rows[i].cells[column].value for i in sorted(table.rows)]


async def test_create_mte_vm_on_sim_mte_and_see_kvm_mte_on_every_vcpu(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "web1")
        await wait_for(pilot, lambda: "ready to create" in form_message(app), "the dry run to accept it")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen) and "web1" in app.model.vms, "web1 listed")
        await pilot.press("s")
        await wait_for(pilot, lambda: vm_cells(app, "web1")[2:3] == ["running"], "web1 running")
        await open_detail(pilot, app)
        await wait_for(pilot, lambda: vcpu_column(app, "kvm_mte") == ["yes", "yes"], "kvm_mte on both vCPUs")
        assert "MTE on" in screen_text(app)


async def test_mte_on_sim_nomte_warns_with_the_kvm_error_and_creates_on_ctrl_s(make_app):
    """Issue 11 item 13, one rule with the CLI: a definition that can never start on its host is
    accepted, with QEMU's text as a warning, in the form and after ctrl+s."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "db1")
        await pilot.press("tab", "enter", "down", "enter")          # host: sim-mte -> sim-nomte
        await wait_for(pilot, lambda: app.screen.query_one("#host").value == "sim-nomte", "host sim-nomte")
        await wait_for(pilot, lambda: "⚠ MTE requested, but not supported by KVM" in form_message(app),
                       "the seed's KVM error in the form, as a warning")
        assert "MTE requested, but not supported by KVM" in screen_text(app)
        assert app.screen.verdict == {"ok": True, "error": None, "warnings": ["MTE requested, but not supported by KVM"]}
        app.screen.query_one("#host").focus()
        await pilot.press(*["tab"] * 7, "space")                   # host ... seed, then untick MTE
        assert app.screen.focused.id == "mte"
        await wait_for(pilot, lambda: "ready to create" in form_message(app), "valid without MTE, no warning")
        await pilot.press("space")                                  # MTE on again: the warning is back
        await wait_for(pilot, lambda: "⚠ MTE requested" in form_message(app), "the warning again")
        await pilot.press("ctrl+s")                                 # accepted: the user may move it
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen) and "db1" in app.model.vms, "db1 created")
        assert any("cannot start on sim-nomte: MTE requested, but not supported by KVM" in str(n.message)
                   for n in app._notifications)


async def test_the_edit_form_warns_like_the_create_form(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "db1", host="sim-nomte", mte=False)
        await open_detail(pilot, app)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, VmFormScreen), "the edit form")
        await wait_for(pilot, lambda: "ready to save" in form_message(app), "no warning without MTE")
        app.screen.query_one("#mte").focus()
        await pilot.press("space")                                  # MTE on, on a host without KVM MTE
        await wait_for(pilot, lambda: "⚠ MTE requested, but not supported by KVM" in form_message(app),
                       "the same warning as the create form and the CLI")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, VmFormScreen), "saved")
        assert (await app.client.show("db1"))["config"]["mte"] is True
        assert any("cannot start on sim-nomte" in str(n.message) for n in app._notifications)


async def test_ctrl_s_never_fails_silently(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "db1")
        await open_form_and_name(pilot, app, "db1")                 # a name that exists: an error
        await wait_for(pilot, lambda: "already exists" in form_message(app), "the error on the verdict line")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any(n.title == "not saved" and "already exists" in str(n.message)
                                          for n in app._notifications), "ctrl+s says why it did not save")
        assert isinstance(app.screen, VmFormScreen) and app.screen.query_one("#name").value == "db1"


async def test_cortex_a57_with_tcg_shows_the_guest_cpu_error(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "old1")
        await pilot.press("tab", "tab", "enter", "down", "enter")   # accel: kvm -> tcg
        await wait_for(pilot, lambda: app.screen.query_one("#accel").value == "tcg", "accel tcg")
        await pilot.press("tab", *"cortex-a57")
        await wait_for(pilot, lambda: "MTE requested, but not supported by the guest CPU" in form_message(app),
                       "the seed's guest CPU error in the form")


async def test_toggle_mte_on_a_running_vm_shows_the_pending_change(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        await wait_for(pilot, lambda: vm_cells(app, "web1")[5:6] == ["on"], "web1 listed with MTE on")
        await pilot.press("m")
        await wait_for(pilot, lambda: vm_cells(app, "web1")[5:6] == ["on→off"], "the pending MTE change in the list")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "pending (applied at next start): mte → off" in screen_text(app),
                       "the pending change in the detail")
        assert vcpu_column(app, "kvm_mte") == ["yes", "yes"]      # still on until the next start


async def test_counters_rise_and_only_changed_cells_repaint(make_app):
    app = make_app(rate_hz=10)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True, workload={"seed": 7, "uaf_rate": 0.01})
        await open_detail(pilot, app)
        table = app.screen.query_one(VcpuTable)
        await wait_for(pilot, lambda: app.model.live.get("web1") and app.model.live["web1"].counters, "a sample")
        first = app.model.live["web1"].counters["vm"]["checked"]
        await wait_for(pilot, lambda: app.model.live["web1"].counters["vm"]["checked"] > first, "checked rising")
        await wait_for(pilot, lambda: table.total.cells["checked"].updates >= 2, "the VM checked cell repainting")
        shown = table.total.cells["checked"].value
        assert shown not in ("", "0")
        # static facts did not repaint on every sample
        assert table.rows[0].cells["kvm_mte"].updates == 1 and table.rows[0].cells["index"].updates == 1
        await wait_for(pilot, lambda: table.total.cells["sync"].value not in ("", "0"), "faults counted")
        await wait_for(pilot, lambda: app.screen.query_one("#faults").rows[0].cells["addr"].value.startswith("0x"),
                       "the last faults listed")


async def test_migrating_an_mte_vm_is_blocked_with_the_reason(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        await open_detail(pilot, app)
        await wait_for(pilot, lambda: "Live migration disabled due to MTE enabled" in screen_text(app),
                       "the blocker on the detail screen")
        table = await migrate_via_dialog(pilot, app)
        await wait_for(pilot, lambda: table.row_count == 1, "the attempt recorded")
        row = [str(c) for c in table.get_row_at(0)]
        assert row[1] == "web1" and row[4] == "blocked"
        assert "reason: Live migration disabled due to MTE enabled" in screen_text(app)
        assert (await app.client.show("web1"))["host"] == "sim-mte"


async def test_migrating_a_non_mte_vm_completes(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "plain1", mte=False, start=True)
        table = await migrate_via_dialog(pilot, app, "sim-nomte")
        await wait_for(pilot, lambda: table.row_count == 1 and str(table.get_row_at(0)[4]) == "completed",
                       f"the migration completed ({app.model.migrations})")
        assert "100%" in str(table.get_row_at(0)[5])
        await pilot.press("v")
        await wait_for(pilot, lambda: vm_cells(app, "plain1")[3:4] == ["sim-nomte"], "the VM on its new host")


def kvm_ioctl(request: int, arg: int = 0) -> int:
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        return fcntl.ioctl(fd, request, arg)
    finally:
        os.close(fd)


async def test_probe_screen_shows_the_real_kvm_api_version_and_mte_cap(make_app):
    # What this machine's /dev/kvm says, read here independently of mtevm's probe.
    try:
        expected = (f"API version {kvm_ioctl(0xAE00)}, "              # KVM_GET_API_VERSION
                    f"KVM_CAP_ARM_MTE {kvm_ioctl(0xAE03, 205)}")       # KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE)
    except FileNotFoundError:
        expected = "/dev/kvm: present no"                              # a machine without KVM says so
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot, app)
        await pilot.press("h")
        await wait_for(pilot, lambda: app.screen.id == "hosts" and app.screen.hosts, "the host list")
        await pilot.press(*["down"] * [h["name"] for h in app.screen.hosts].index("local"))
        await wait_for(pilot, lambda: "probe of local" in screen_text(app), "the local probe")
        assert expected in screen_text(app)


async def test_migrating_an_mte_vm_to_its_own_host_with_tags_completes(make_app):
    # Like QEMU to localhost: the dialog offers the VM's own host; on a simulated host the daemon
    # re-realizes the machine and copies RAM and tags (KVM_ARM_MTE_COPY_TAGS), lifting the MTE blocker.
    app = make_app()
    async with app.run_test(size=(120, 30)) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        await pilot.press("g")
        await wait_for(pilot, lambda: app.screen.query("#destinations") and
                       app.screen.query_one("#destinations").option_count > 0, "the destinations")
        options = app.screen.query_one("#destinations")
        names = [options.get_option_at_index(i).id for i in range(options.option_count)
                 if not options.get_option_at_index(i).disabled]          # the possible destinations
        assert names[-1] == "sim-mte" and "same host" in str(options.get_option_at_index(len(names) - 1).prompt)
        await pilot.press(*["down"] * (len(names) - 1), "tab", "space")     # own host, tick "copy MTE tags"
        assert app.screen.query_one("#with-tags").value
        await wait_for(pilot, lambda: "copy MTE tags (KVM_ARM_MTE_COPY_TAGS): on" in screen_text(app), "tags: on")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen.id == "migrations", "the migrations screen")
        table = app.screen.query_one("#migration-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1 and str(table.get_row_at(0)[4]) == "completed",
                       f"the migration completed ({app.model.migrations})")
        row = [str(c) for c in table.get_row_at(0)]
        assert row[1:4] == ["web1", "sim-mte → sim-mte", "yes"]
        text = screen_text(app)
        assert "RAM: total 256M, transferred" in text
        tag_pages = app.model.migrations[1]["stats"]["tag_pages"]
        assert tag_pages > 0 and f"({tag_pages} tagged pages copied, {tag_pages * 256} granule tags verified)" in text
        vm = await app.client.show("web1")
        assert (vm["host"], vm["state"]) == ("sim-mte", "running")
        await app.client.stop("web1")
