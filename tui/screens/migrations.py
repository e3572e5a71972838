"""Migrations, newest first: blocked, running with progress, completed and failed, each with why."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static

from backend.errors import MtevmError
from tui import format as fmt
from tui import keymap
from tui.components.live_table import LiveDataTable, LiveRows
from tui.components.status import screen_bottom
from tui.live import ModelRefreshed, MigrationChanged

COLUMNS = [("id", "#"), ("vm", "VM"), ("route", "from → to"), ("tags", "tags"), ("state", "state"),
           ("progress", "progress"), ("reason", "reason")]


def row_values(m: dict) -> dict[str, str]:
    return {"id": str(m["id"]), "vm": m.get("vm", ""), "route": f"{m.get('src', '?')} → {m.get('dst', '?')}",
            "tags": "yes" if m.get("with_tags") else "no", "state": m.get("state", "?"),
            "progress": fmt.progress_bar(m.get("progress", 0.0), 6), "reason": m.get("reason") or ""}


def explain(m: dict) -> str:
    """The full story of one migration for the pane under the table."""
    text = (f"migration #{m['id']}: {m.get('vm')} from {m.get('src')} to {m.get('dst')}"
            f"{' with tags' if m.get('with_tags') else ''} is {m.get('state')}")
    if m.get("state") in ("setup", "active"):
        text += f" ({(m.get('progress') or 0) * 100:.0f}%)"
    if m.get("reason"):
        text += f"\nreason: {m['reason']}"
    stats = m.get("stats") or {}
    if "ram_total" in stats:
        text += "\n" + ram_figures(stats)
    else:          # a record without query-migrate's figures: what was moved
        moved = [f"{stats[k]} {label}" for k, label in (("pages", "RAM pages"), ("tag_pages", "tagged pages"))
                 if stats.get(k)]
        if stats.get("bytes"):
            moved.append(fmt.size(stats["bytes"]))
        if moved:
            text += "\nmoved " + ", ".join(moved)
    counts = ""
    if m.get("with_tags") and (stats.get("tag_pages") or stats.get("tags_verified")):
        counts = (f"{stats.get('tag_pages', 0)} tagged pages copied, "
                  f"{stats.get('tags_verified', 0)} granule tags verified")
    if stats.get("tags") and m.get("state") == "completed":
        text += f"\ntags: {stats['tags']}" + (f" ({counts})" if counts else "")
    elif counts:
        text += f"\ntags: {counts}"
    return text


def ram_figures(stats: dict) -> str:
    """The RAM figures as ``info migrate`` words them: sizes in bytes, zero ("duplicate") pages
    counted but not sent, normal pages sent."""
    return (f"RAM: total {fmt.size(stats['ram_total'])}, transferred {fmt.size(stats.get('ram_transferred', 0))}, "
            f"remaining {fmt.size(stats.get('ram_remaining', 0))}; "
            f"duplicate {stats.get('ram_duplicate', 0)} pages, normal {stats.get('ram_normal', 0)} pages "
            f"of {fmt.size(stats.get('ram_page_size', 4096))}")

class MigrationsScreen(Screen):
    BINDINGS = keymap.bindings(keymap.MIGRATION_KEYS, keymap.BACK_KEYS)
    TITLE = "Migrations"

    def __init__(self) -> None:
        super().__init__(id="migrations")
        self.newest_id: int | None = None     # the newest migration the table has shown

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        table = LiveDataTable(id="migration-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="migration-detail")
        yield from screen_bottom()

    def on_mount(self) -> None:
        self.rows = LiveRows(self.query_one("#migration-table", DataTable), COLUMNS, {"state": len("completed")})
        self.query_one("#migration-table").focus()
        self.sync_rows()

    def on_screen_resume(self) -> None:
        self.sync_rows()

    def sync_rows(self) -> None:
        """Show the migrations, newest first; a migration newer than any shown takes the cursor
        (the user just started it, or wants to see the one that just began)."""
        migrations = sorted(self.app.model.migrations.values(), key=lambda m: -m["id"])
        self.rows.sync([(str(m["id"]), row_values(m)) for m in migrations])
        newest = migrations[0]["id"] if migrations else None
        if newest is not None and self.newest_id is not None and newest > self.newest_id:
            self.rows.table.move_cursor(row=0)
        self.newest_id = newest
        self.show_detail()

    def show_detail(self) -> None:
        key = self.rows.cursor_key()
        detail = self.query_one("#migration-detail", Static)
        if key is None:
            detail.update("no migrations yet: open a VM and press g to migrate it")
        else:
            detail.update(explain(self.app.model.migrations[int(key)]))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_detail()

    def on_model_refreshed(self, message: ModelRefreshed) -> None:
        self.sync_rows()

    def on_migration_changed(self, message: MigrationChanged) -> None:
        self.sync_rows()

    def action_cancel_migration(self) -> None:
        """QMP migrate_cancel for the selected migration, after a yes: the VM keeps running where it was."""
        key = self.rows.cursor_key()
        m = self.app.model.migrations.get(int(key)) if key is not None else None
        if m is None or m.get("state") not in ("setup", "active"):
            self.app.notify("Select a running migration to cancel", severity="warning")
            return
        from tui.screens.confirm import ConfirmScreen

        async def cancel() -> None:
            try:
                await self.app.client.migrate_cancel(m["vm"])
            except MtevmError as e:
                self.app.notify(str(e), title=f"cancel migration #{m['id']}", severity="error", timeout=10)
            await self.app.refresh_model()

        self.app.push_screen(ConfirmScreen(f"Cancel migration #{m['id']} of VM {m['vm']!r} to {m['dst']}? "
                                           f"It keeps running on {m['src']}.", "Cancel migration"),
                             lambda ok: self.run_worker(cancel(), group="migration-cancel") if ok else None)

    async def action_back(self) -> None:
        await self.app.switch_mode("vms")
