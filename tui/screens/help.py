"""Every key of the app, with the user's remappings applied, and where keys can be changed."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static

from tui import keymap
from tui.components.status import screen_bottom
from tui.screens.leave_once import LeaveOnce

SECTIONS = [
    ("Everywhere", keymap.APP_KEYS),
    ("VMs (list and detail)", keymap.VM_KEYS),
    ("VM list", keymap.LIST_KEYS),
    ("Snapshots of a VM", keymap.SNAPSHOT_KEYS),
    ("Migrations", keymap.MIGRATION_KEYS),
    ("Forms", keymap.FORM_KEYS),
    ("Stop/delete questions", keymap.CONFIRM_KEYS),
    ("Other screens", keymap.BACK_KEYS),
]


class HelpScreen(LeaveOnce, Screen):
    BINDINGS = keymap.bindings(keymap.BACK_KEYS)
    TITLE = "Help"

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with VerticalScroll(id="help-body"):
            yield Static(
                "mtevm manages Arm64 virt VMs with MTE. VMs live in the daemon: quitting the app "
                "never stops them. Remap any key in config.toml: [keymap] <id> = \"key\".",
                classes="intro")
            yield DataTable(id="help-keys", cursor_type="row", zebra_stripes=False)
        yield from screen_bottom()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "action", "id")
        user_keymap = self.app.user_keymap
        for title, specs in SECTIONS:
            table.add_row(f"[b]{title}[/b]", "", "")
            for spec in specs:
                table.add_row(keymap.display_key(spec, user_keymap), spec.help, spec.id)
        table.focus()

    def action_back(self) -> None:
        self.dismiss()
