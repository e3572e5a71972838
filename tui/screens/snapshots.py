"""One VM's snapshots: its whole state (RAM, devices and, under TCG, the ``mach-virt.tag`` block with
the MTE tags) saved by the daemon, restored over the running VM, deleted. Restore and delete ask
first. Where the VM cannot be saved (a KVM MTE VM: QEMU's "Live migration disabled due to MTE
enabled"), the daemon's refusal is shown here in its own words."""
from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static

from backend.errors import MtevmError
from backend.hosts.disk_snapshots import summary as disks_summary
from tui import format as fmt
from tui import keymap
from tui.components.status import screen_bottom
from tui.screens.confirm import ConfirmScreen
from tui.screens.name_prompt import NamePrompt
from tui.screens.leave_once import LeaveOnce

COLUMNS = ("tag", "taken", "VM was", "size", "checked", "faults", "tags", "disks")


def row(s: dict, now: float) -> tuple:
    c = s.get("counters") or {}
    return (s["tag"], f"{fmt.age(s.get('created'), now)} ago", s.get("vm_state", "?"), fmt.size(s.get("bytes")),
            fmt.count(c.get("checked")), fmt.count(c["sync_faults"] + c["async_faults"] if c else None),
            s.get("tags", ""), disks_summary(s))


class SnapshotsScreen(LeaveOnce, Screen):
    BINDINGS = keymap.bindings(keymap.SNAPSHOT_KEYS, keymap.BACK_KEYS)
    TITLE = "Snapshots"

    def __init__(self, name: str) -> None:
        super().__init__(id="snapshots")
        self.vm_name = name
        self.snapshots: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("", id="snapshot-message")
        yield DataTable(id="snapshot-table", cursor_type="row", zebra_stripes=True)
        yield from screen_bottom()

    def on_mount(self) -> None:
        self.sub_title = self.vm_name
        table = self.query_one(DataTable)
        table.add_columns(*COLUMNS)
        table.focus()
        self.reload()

    @work(exclusive=True, group="snapshots-load")
    async def reload(self, message: str | None = None, error: bool = False) -> None:
        try:
            self.snapshots = await self.app.client.snapshot_list(self.vm_name)
        except MtevmError as e:
            message, error = str(e), True
            self.snapshots = []
        table = self.query_one(DataTable)
        table.clear()
        now = self.app.clock()
        for s in self.snapshots:
            table.add_row(*row(s, now), key=s["tag"])
        if message is None:
            message = (f"{len(self.snapshots)} snapshot(s) of {self.vm_name}" if self.snapshots else
                       f"no snapshots of {self.vm_name} yet: press {self._key('snapshot_save')} to save one")
        self.show(message, error)

    def show(self, text: str, error: bool = False) -> None:
        box = self.query_one("#snapshot-message", Static)
        box.set_class(error, "error")
        box.update(escape(text))

    def _key(self, binding_id: str) -> str:
        spec = next(k for k in keymap.ALL_KEYS if k.id == binding_id)
        return keymap.display_key(spec, getattr(self.app, "user_keymap", {}))

    def selected(self) -> dict | None:
        """The snapshot under the cursor (None, said on screen, when there is none)."""
        table = self.query_one(DataTable)
        if not self.snapshots or table.cursor_row is None or table.cursor_row >= len(self.snapshots):
            self.show("no snapshot selected", error=True)
            return None
        return self.snapshots[table.cursor_row]

    # -- actions -------------------------------------------------------------------------------
    def action_save_snapshot(self) -> None:
        def answered(tag: str | None) -> None:
            if tag is not None:
                self.run_op("save", lambda: self.app.client.snapshot_save(self.vm_name, tag or None),
                            lambda s: f"saved snapshot {s['tag']} of {self.vm_name} ({fmt.size(s['bytes'])})")
        self.app.push_screen(NamePrompt(f"Save a snapshot of {self.vm_name}: its tag (empty: the time)",
                                        placeholder="e.g. before-test", ok_label="Save", allow_empty=True), answered)

    def action_restore_snapshot(self) -> None:
        if (snap := self.selected()) is not None:
            tag = snap["tag"]
            lost = ("Its current state and what its disks hold now are lost." if snap.get("disks")
                    else "Its current state is lost.")
            self._confirm(f"Restore VM {self.vm_name!r} to snapshot {tag!r}? {lost}", "Restore",
                          lambda: self.run_op("restore", lambda: self.app.client.snapshot_restore(self.vm_name, tag),
                                              lambda v: f"restored {self.vm_name} to {tag}: {v['state']}"))

    def action_delete_snapshot(self) -> None:
        if (snap := self.selected()) is not None:
            tag = snap["tag"]
            self._confirm(f"Delete snapshot {tag!r} of VM {self.vm_name!r}?", "Delete",
                          lambda: self.run_op("delete", lambda: self.app.client.snapshot_delete(self.vm_name, tag),
                                              lambda s: f"deleted snapshot {tag}"))

    def _confirm(self, question: str, yes: str, then) -> None:
        self.app.push_screen(ConfirmScreen(question, yes), lambda ok: then() if ok else None)

    def run_op(self, verb: str, call, done) -> None:
        async def op() -> None:
            self.show(f"{verb}…")
            try:
                result = await call()
            except MtevmError as e:
                self.reload(f"{verb} refused: {e}", True)
                return
            await self.app.refresh_model()
            self.reload(done(result))
        self.run_worker(op(), group="snapshot-op", exclusive=True)

    def action_back(self) -> None:
        self.dismiss()
