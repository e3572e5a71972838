"""The app's own behaviour: keys, remapping, palette, confirmations, filter, bulk actions, colours, sizes."""
from __future__ import annotations

import pytest
from rich.color import ColorType
from textual.widgets import Button, DataTable

from backend.config import UserConfig
from backend.errors import ConfigError, MigrationError
from tests.tui.pilot_helpers import (create_vm, form_message, migrate_via_dialog, open_detail,
                                     open_form_and_name, screen_rows, screen_text, started, wait_for)
from tui.screens.confirm import ConfirmScreen
from tui.screens.help import HelpScreen
from tui.screens.hosts import HostsScreen
from tui.screens.migrations import MigrationsScreen
from tui.screens.vm_detail import VmDetailScreen
from tui.screens.vm_form import VmFormScreen
from tui.screens.vm_list import VmListScreen

SIZE = (80, 24)


def rows(app) -> list[str]:
    return list(app.screen.rows.keys)


async def only_vm_under_the_cursor(pilot, app, name: str, **create) -> None:
    """Create ``name`` (the only VM) and wait until the list shows it under the cursor."""
    await create_vm(app, name, **create)
    await wait_for(pilot, lambda: rows(app) == [name] and app.screen.cursor_vm() == name, f"{name} listed")


async def test_stop_asks_first_and_no_keeps_the_vm_running(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", mte=False, start=True)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert "Stop VM 'web1'?" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "back to the list")
        await pilot.pause(0.2)
        assert (await app.client.show("web1"))["state"] == "running"
        await pilot.press("x", "y")
        await wait_for(pilot, lambda: app.model.vms["web1"]["state"] == "stopped", "web1 stopped")


async def test_delete_of_a_running_vm_offers_stop_and_delete_before_asking(make_app):
    """Issue 11 item 14: no question that the daemon then refuses. A running VM gets one question
    that says it is running and offers stop-and-delete; no keeps it; yes stops and deletes it."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await only_vm_under_the_cursor(pilot, app, "web1", mte=False, start=True)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert "VM 'web1' is running. Stop and delete" in screen_text(app)
        assert "Stop and delete (y)" in str(app.screen.query_one("#yes", Button).label)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "back to the list")
        await pilot.pause(0.2)
        assert (await app.client.show("web1"))["state"] == "running"
        await pilot.press("d", "y")
        await wait_for(pilot, lambda: "web1" not in app.model.vms and rows(app) == [], "web1 stopped and deleted")
        assert not any("stop it first" in str(n.message) for n in app._notifications)


async def test_delete_of_a_stopped_vm_asks_plainly(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await only_vm_under_the_cursor(pilot, app, "web1", mte=False)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert "Delete VM 'web1'?" in screen_text(app) and "running" not in screen_text(app)
        await pilot.press("y")
        await wait_for(pilot, lambda: "web1" not in app.model.vms and rows(app) == [], "web1 deleted")


async def test_filter_sort_and_bulk_start(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        for name in ("web1", "web2", "db1"):
            await create_vm(app, name, mte=False)
        await wait_for(pilot, lambda: rows(app) == ["db1", "web1", "web2"], "three VMs sorted by name")
        await pilot.press("slash", *"web")
        await wait_for(pilot, lambda: rows(app) == ["web1", "web2"], "the filter applied")
        await pilot.press("enter")                     # keep the filter, back to the table
        assert app.screen.focused.id == "vms"
        await pilot.press("space", "down", "space", "s")
        await wait_for(pilot, lambda: all(app.model.vms[n]["state"] == "running" for n in ("web1", "web2")),
                       "both selected VMs started")
        assert app.model.vms["db1"]["state"] == "stopped"
        await pilot.press("escape")                    # clears the filter
        await wait_for(pilot, lambda: rows(app) == ["db1", "web1", "web2"], "the filter cleared")
        await pilot.press("o")                         # sort by state: running before stopped
        await wait_for(pilot, lambda: rows(app) == ["web1", "web2", "db1"], "sorted by state")


async def test_remapped_keys_from_the_config_are_used_and_shown(make_app):
    app = make_app(config=UserConfig(keymap={"vm_new": "N", "app_help": "f1"}))
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("n")
        await pilot.pause(0.2)
        assert isinstance(app.screen, VmListScreen)         # the old key does nothing
        await pilot.press("N")
        await wait_for(pilot, lambda: isinstance(app.screen, VmFormScreen), "the form via the new key")
        await pilot.press("escape", "f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help via f1")
        table = app.screen.query_one("#help-keys", DataTable)
        shown = {str(table.get_row_at(i)[2]): str(table.get_row_at(i)[0]) for i in range(table.row_count)}
        assert shown["vm_new"] == "N" and shown["app_help"] == "f1" and shown["vm_start"] == "s"


def test_unknown_binding_ids_are_refused_before_start(make_app):
    with pytest.raises(ConfigError, match="vm_nwe"):
        make_app(config=UserConfig(keymap={"vm_nwe": "N"}))


@pytest.mark.parametrize("opener", [["ctrl+p"], ["colon"]])
async def test_command_palette_runs_actions(make_app, opener):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press(*opener)
        await wait_for(pilot, lambda: app.screen.__class__.__name__ == "CommandPalette", "the palette")
        await pilot.press(*"probe")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, HostsScreen), "the hosts screen from the palette")


async def test_palette_offers_every_action_of_the_screen(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        ids = {c.help.split()[-1] for c in app.get_system_commands(app.screen)}
        assert {"vm_new", "vm_start", "vm_stop", "vm_delete", "vm_toggle_mte", "vm_migrate", "vm_filter",
                "vm_select", "app_hosts", "app_migrations", "app_help", "app_quit"} <= ids


async def test_navigation_and_help(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("h")
        await wait_for(pilot, lambda: isinstance(app.screen, HostsScreen), "hosts")
        await pilot.press("M")
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "migrations")
        assert "no migrations yet" in screen_text(app)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        await pilot.press("escape", "escape")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "back to the VM list")


def non_ansi_colours(app) -> set[str]:
    """Every colour on screen that is not one of the 16 ANSI colours (or the terminal default)."""
    bad = set()
    for row in screen_rows(app):
        for seg in row:
            for color in (seg.style.color, seg.style.bgcolor) if seg.style else ():
                if color is None or color.type in (ColorType.DEFAULT, ColorType.STANDARD):
                    continue
                if color.type == ColorType.EIGHT_BIT and color.number < 16:
                    continue
                bad.add(f"{color.name}@{seg.text!r}")
    return bad


async def test_sixteen_colours_on_every_screen(make_app):
    app = make_app(ansi_color=True)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        assert app.native_ansi_color and app.current_theme.ansi
        await create_vm(app, "web1", start=True)
        seen = {}
        seen["list"] = non_ansi_colours(app)
        await open_detail(pilot, app)
        seen["detail"] = non_ansi_colours(app)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirm")
        seen["confirm"] = non_ansi_colours(app)
        await pilot.press("n", "escape", "n")
        await wait_for(pilot, lambda: isinstance(app.screen, VmFormScreen), "form")
        await pilot.press(*"x1")
        await wait_for(pilot, lambda: app.screen.verdict, "the form's verdict")
        seen["form"] = non_ansi_colours(app)
        await pilot.press("escape", "h")
        await wait_for(pilot, lambda: isinstance(app.screen, HostsScreen) and app.screen.shown, "hosts")
        seen["hosts"] = non_ansi_colours(app)
        await pilot.press("M")
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "migrations")
        seen["migrations"] = non_ansi_colours(app)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        seen["help"] = non_ansi_colours(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "back on the migrations")
        await pilot.press("v")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "the VM list")
        app.set_daemon_lost("event stream lost")            # the status bar's alarm, the dimmed table
        await pilot.pause(0.1)
        seen["daemon lost"] = non_ansi_colours(app)
        app.set_daemon_lost(None)
        assert seen == {k: set() for k in seen}


@pytest.mark.parametrize("size", [(80, 24), (200, 60)])
async def test_no_layout_breaks(make_app, size):
    """Every screen keeps its status line and footer on the last two rows, and nothing overflows."""
    app = make_app()
    width, height = size
    async with app.run_test(size=size) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        for keys, cls in ([], VmListScreen), (["enter"], VmDetailScreen), (["escape", "n"], VmFormScreen), \
                (["escape", "h"], HostsScreen), (["M"], MigrationsScreen), (["question_mark"], HelpScreen):
            await pilot.press(*keys)
            await wait_for(pilot, lambda: isinstance(app.screen, cls), cls.__name__)
            await wait_for(pilot, lambda: "help" in screen_text(app).split("\n")[-1]
                           or "back" in screen_text(app).split("\n")[-1], f"{cls.__name__}: the footer")
            lines = screen_text(app).split("\n")
            assert len(lines) == height and all(len(line) == width for line in lines)
            assert "UTC" in lines[-2], f"{cls.__name__}: status line not above the footer"
            for widget in app.screen.children:
                region = widget.region
                if widget.display and region.area:
                    assert region.right <= width and region.bottom <= height, f"{widget!r} outside the screen"


async def test_edit_form_changes_tcf_of_a_running_vm(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        await open_detail(pilot, app)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, VmFormScreen), "the edit form")
        assert app.screen.query_one("#name").disabled and app.screen.focused.id == "tcf"
        await pilot.press("enter", "down", "enter", "ctrl+s")        # sync -> async
        await wait_for(pilot, lambda: isinstance(app.screen, VmDetailScreen), "back on the detail")
        await wait_for(pilot, lambda: [v["tcf"] for v in app.screen.detail["vcpus"]] == ["async", "async"],
                       "both vCPUs in async mode")
        table = app.screen.query_one("#vcpus")
        await wait_for(pilot, lambda: [table.rows[i].cells["tcf"].value for i in (0, 1)] == ["async", "async"],
                       "the vCPU table shows async")


async def test_the_migrate_dialog_greys_out_impossible_targets_with_the_reason(make_app):
    """Issue 11 item 14: a simulated VM can never go to the local QEMU host: the dialog lists it
    greyed out, with the daemon's reason, after the possible ones, and it cannot be chosen."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "plain1", mte=False, start=True)
        await pilot.press("g")
        await wait_for(pilot, lambda: app.screen.query("#destinations") and
                       app.screen.query_one("#destinations").option_count == 3, "the destinations")
        options = app.screen.query_one("#destinations")
        listed = [options.get_option_at_index(i) for i in range(options.option_count)]
        assert [(o.id, o.disabled) for o in listed] == [("sim-nomte", False), ("sim-mte", False), ("local", True)]
        assert "✘ cannot migrate from a simulated host to a local host" in str(listed[2].prompt)
        await pilot.press("end", "enter")          # the cursor never lands on the greyed-out host
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "the migrations screen")
        assert app.model.migrations and all(m["dst"] != "local" for m in app.model.migrations.values())


async def test_migrating_a_stopped_vm_is_refused_before_the_dialog(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await only_vm_under_the_cursor(pilot, app, "plain1", mte=False)
        await pilot.press("g")
        await wait_for(pilot, lambda: any("only a running VM can be migrated" in str(n.message)
                                          for n in app._notifications), "the refusal")
        assert isinstance(app.screen, VmListScreen) and not app.model.migrations


async def test_a_failed_migration_is_listed_with_its_reason(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "plain1", mte=False, start=True)
        with pytest.raises(MigrationError):
            await app.client.migrate("plain1", "local")      # as `mtevm migrate` would: refused, recorded
        await app.refresh_model()
        await pilot.press("M")
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "the migrations screen")
        table = app.screen.query_one("#migration-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1, "the attempt recorded")
        assert str(table.get_row_at(0)[4]) == "failed"
        reason = app.model.migrations[1]["reason"]
        assert reason and f"reason: {reason}" in screen_text(app)


async def test_the_migrations_cursor_follows_a_new_migration(make_app):
    """Issue 11 item 14: after a new migration the cursor is on its row, not on an older one."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "plain1", mte=False, start=True)
        table = await migrate_via_dialog(pilot, app, "sim-nomte")
        await wait_for(pilot, lambda: app.model.vms["plain1"]["host"] == "sim-nomte"
                       and app.model.vms["plain1"]["state"] == "running", "the first migration done")
        await pilot.press("escape")                # back to the VMs, migrate again
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "the VM list")
        table = await migrate_via_dialog(pilot, app, "sim-mte")
        await wait_for(pilot, lambda: table.row_count == 2, "both migrations listed")
        assert app.screen.rows.cursor_key() == "2"
        assert "migration #2: plain1 from sim-nomte to sim-mte" in screen_text(app)


async def test_refresh_rate_keys(make_app):
    app = make_app(rate_hz=4)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("plus")
        assert app.rate_hz == 8 and "8 Hz" in screen_text(app)
        await pilot.press("minus", "minus", "minus", "minus", "minus")
        assert app.rate_hz == 0.5                 # never below the slowest rate
        with pytest.raises(ConfigError):
            app.set_rate(100)


async def test_only_the_visible_screen_is_updated_live(make_app):
    """Textual repaints a hidden screen's changes through the visible one: the VM list must stay
    still while the detail is open, and catch up when it is shown again."""
    app = make_app(rate_hz=10)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True, workload={"uaf_rate": 0.05})
        vm_list = app.screen
        await wait_for(pilot, lambda: vm_list.rows.keys == ["web1"], "web1 listed")
        detail = await open_detail(pilot, app)
        before = vm_list.rows.cell_updates
        total = detail.query_one("#vcpus").total
        seen = total.cells["checked"].updates
        await wait_for(pilot, lambda: total.cells["checked"].updates >= seen + 3, "three samples on the detail")
        assert vm_list.rows.cell_updates == before
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is vm_list, "back on the list")
        live = app.model.live["web1"].vm_rates.faults_per_s
        assert vm_list.row_values(app.model.vms["web1"])["faults"] == vm_list.rows._cells[("web1", "faults")]
        assert live > 0


async def test_a_remapped_confirm_yes_answers_the_stop_question(make_app):
    app = make_app(config=UserConfig(keymap={"confirm_yes": "j"}))
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await create_vm(app, "web1", start=True)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the stop question")
        assert "Stop (j)" in str(app.screen.query_one("#yes", Button).label)
        await pilot.press("y")                        # the old key no longer answers
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        assert (await app.client.show("web1"))["state"] == "running"
        await pilot.press("j")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "the question answered")
        await wait_for(pilot, lambda: app.model.vms["web1"]["state"] == "stopped", "web1 stopped")


async def test_qemu_args_for_a_local_vm_are_split_like_the_cli_and_kept(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "shm1")
        row = app.screen.query_one("#qemu-args-row")
        assert not row.display                                  # a simulated host runs no QEMU
        hosts = [h["name"] for h in await app.client.hosts()]
        await pilot.press("tab", "enter", *["down"] * (hosts.index("local") - hosts.index("sim-mte")), "enter")
        await wait_for(pilot, lambda: app.screen.query_one("#host").value == "local", "host local")
        await wait_for(pilot, lambda: row.display, "the QEMU args field for host local")
        app.screen.query_one("#qemu_args").focus()
        await pilot.press(*"-object 'memory-backend-ram,id=m,size=1M")
        await wait_for(pilot, lambda: "No closing quotation" in form_message(app), "the unbalanced quote refused")
        await pilot.press(*"' -device")
        await wait_for(pilot, lambda: "'-device' has no value" in form_message(app), "the daemon's pair check")
        await pilot.press(*" ivshmem-plain,memdev=m")
        await wait_for(pilot, lambda: "ready to create" in form_message(app), "valid QEMU args")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen) and "shm1" in app.model.vms, "shm1 made")
        vm = await app.client.show("shm1")
        assert vm["qemu_args"] == ["-object", "memory-backend-ram,id=m,size=1M", "-device", "ivshmem-plain,memdev=m"]


async def test_checkbox_state_is_readable_in_sixteen_colours(make_app):
    app = make_app(ansi_color=True)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "web1")

        def checks_line() -> str:
            return next((line for line in screen_text(app).splitlines() if "secure" in line), "")
        await wait_for(pilot, lambda: "secure" in checks_line(), "the form's checkboxes drawn")
        before = checks_line()
        assert "MTE: on" in before and "secure: off" in before and "only-migratable: off" in before
        app.screen.query_one("#mte").focus()
        await pilot.press("space")
        app.screen.query_one("#name").focus()                   # same focus as before: only the state differs
        await wait_for(pilot, lambda: "MTE: off" in checks_line(), "MTE shown off")
        assert not app.screen.query_one("#mte").value and checks_line() != before
        assert non_ansi_colours(app) == set()


async def test_qemu_args_naming_a_host_file_need_the_forms_opt_in_and_the_detail_says_so(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_form_and_name(pilot, app, "loader1")
        hosts = [h["name"] for h in await app.client.hosts()]
        await pilot.press("tab", "enter", *["down"] * (hosts.index("local") - hosts.index("sim-mte")), "enter")
        await wait_for(pilot, lambda: app.screen.query_one("#host-files-row").display, "the host-files opt-in")
        app.screen.query_one("#qemu_args").focus()
        await pilot.press(*"-device loader,file=/etc/hostname,addr=0x48000000")
        await wait_for(pilot, lambda: "file=/etc/hostname (a host file)" in form_message(app)
                       and "--allow-host-files" in form_message(app), "the host file refused")
        app.screen.query_one("#allow_host_files").value = True
        await wait_for(pilot, lambda: "ready to create" in form_message(app), "allowed once opted in")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen) and "loader1" in app.model.vms, "made")
        assert (await app.client.show("loader1"))["allow_host_files"] is True
        assert list(app.model.vms) == ["loader1"]
        await open_detail(pilot, app)
        await wait_for(pilot, lambda: "host files allowed" in " ".join(screen_text(app).split()),
                       "the detail naming the opt-in")


async def test_a_key_queued_twice_closes_a_screen_once(make_app):
    """esc esc or y y over a slow link can both reach a screen before the first is handled: it
    must leave once (no second callback, no ScreenStackError ending the app)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("M")
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "migrations")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        help_screen = app.screen
        help_screen.action_back()
        help_screen.action_back()                  # the second esc, already queued on the help screen
        await pilot.pause(0.2)
        assert app.is_running and isinstance(app.screen, MigrationsScreen)

        await pilot.press("v")
        await wait_for(pilot, lambda: isinstance(app.screen, VmListScreen), "the VM list")
        await only_vm_under_the_cursor(pilot, app, "web1", mte=False, start=True)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the stop question")
        confirm = app.screen
        confirm.action_answer(True)
        confirm.action_answer(True)                # y y: one stop, not a second one refused
        await wait_for(pilot, lambda: app.model.vms["web1"]["state"] == "stopped", "web1 stopped")
        await pilot.pause(0.3)
        assert app.is_running and isinstance(app.screen, VmListScreen)
        assert not [n for n in app._notifications if n.severity == "error"]
