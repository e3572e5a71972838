"""The VM list: state, host, accel, MTE, vCPUs, faults/s; filter, sort, multi-select, bulk start/stop.

Live values change single cells (``LiveRows``: one cell repainted) and only when their text changed;
the rows are rebuilt only when the set or order of visible VMs changes (filter, sort, add, delete).
"""
from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Header, Input, Static

from tui import format as fmt
from tui import keymap
from tui.components.live_table import LiveDataTable, LiveRows
from tui.components.status import screen_bottom
from tui.live import ModelRefreshed, CountersBatch, CountersSampled, VmChanged, VmDeleted, mte_at_next_start
from tui.screens.vm_actions import VmActions

COLUMNS = [("sel", " "), ("name", "name"), ("state", "state"), ("host", "host"), ("accel", "accel"),
           ("mte", "MTE"), ("vcpus", "vCPUs"), ("faults", "faults/s")]
SORTS = ["name", "state", "host", "faults"]


def mte_text(vm: dict) -> str:
    """"on"/"off", and the pending value when a running VM will change at its next start."""
    now = "on" if vm.get("mte") else "off"
    wanted = mte_at_next_start(vm)
    if wanted != vm.get("mte"):
        return f"{now}→{'on' if wanted else 'off'}"
    return now


class VmListScreen(VmActions, Screen):
    BINDINGS = keymap.bindings(keymap.LIST_KEYS, keymap.VM_KEYS, keymap.BACK_KEYS, hide=("back",))
    TITLE = "VMs"

    def __init__(self) -> None:
        super().__init__(id="vm-list")
        self.selected: set[str] = set()
        self.filter_text = ""
        self.sort_key = "name"

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Input(placeholder="filter: name, host or state (enter to keep, esc to clear)", id="filter")
        table = LiveDataTable(id="vms", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="list-hint")
        yield from screen_bottom()

    def on_mount(self) -> None:
        table = self.query_one("#vms", LiveDataTable)
        self.rows = LiveRows(table, COLUMNS, {"state": len("migrating"), "mte": len("on→off"), "faults": 6})
        table.on_scrolled = lambda: self.rows.update_visible(self.values_of)
        self.query_one("#filter").display = False
        self.sync_rows()
        self.query_one("#vms").focus()

    def on_screen_resume(self) -> None:
        self.sync_rows()

    # -- what is shown -------------------------------------------------------------------------
    def row_values(self, vm: dict) -> dict[str, str]:
        faults = self.app.model.faults_per_s(vm["name"])
        # a libvirt domain mtevm did not make: listed, but nothing here acts on it
        name = vm["name"] + (" (read-only)" if vm.get("read_only") else "")
        return {"sel": "●" if vm["name"] in self.selected else " ", "name": name,
                "state": vm.get("state", "?"), "host": vm.get("host", ""), "accel": vm.get("accel", ""),
                "mte": mte_text(vm), "vcpus": str(vm.get("vcpus", "")),
                "faults": fmt.rate(faults)}

    def visible_vms(self) -> list[dict]:
        needle = self.filter_text.lower()
        vms = [vm for vm in self.app.model.vms.values()
               if not needle or any(needle in str(vm.get(k, "")).lower() for k in ("name", "host", "state"))]
        if self.sort_key == "faults":     # by the figure the column shows; VMs without one last
            def shown_rate(vm: dict) -> tuple:
                rate = self.app.model.faults_per_s(vm["name"])
                return (rate is None, -(rate or 0.0), vm["name"])
            return sorted(vms, key=shown_rate)
        return sorted(vms, key=lambda vm: (str(vm.get(self.sort_key, "")), vm["name"]))

    def sync_rows(self) -> None:
        """Rebuild rows if the visible VMs changed, else update only the cells whose text changed
        (of the rows in view: the others catch up when scrolled to, so 1,000 VMs cost what a
        screenful does)."""
        self.rows.sync_keys([vm["name"] for vm in self.visible_vms()], self.values_of)
        self.update_hint()

    def values_of(self, name: str) -> dict[str, str] | None:
        vm = self.app.model.vms.get(name)
        return None if vm is None else self.row_values(vm)

    def update_hint(self) -> None:
        parts = [f"sorted by {self.sort_key}"]
        if self.filter_text:
            parts.append(f"filter {self.filter_text!r}: {len(self.rows.keys)} of {len(self.app.model.vms)}")
        if self.selected:
            parts.append(f"{len(self.selected)} selected")
        if not self.app.model.vms:
            parts.append("no VMs yet: press n to create one")
        else:
            parts.append(self.app.key_hint("vm_delete", "vm_select", "app_hosts", "app_migrations"))
        self.query_one("#list-hint", Static).update(" " + " │ ".join(parts))

    # -- live updates --------------------------------------------------------------------------
    def on_vm_changed(self, message: VmChanged) -> None:
        self.sync_rows()

    def on_model_refreshed(self, message: ModelRefreshed) -> None:
        self.sync_rows()

    def on_vm_deleted(self, message: VmDeleted) -> None:
        self.selected.discard(message.name)
        self.sync_rows()

    def on_counters_sampled(self, message: CountersSampled) -> None:
        if self.sort_key == "faults":
            # the order follows the rates: rows rebuilt only if it changed, else changed cells only
            self.rows.sync([(vm["name"], self.row_values(vm)) for vm in self.visible_vms()])
            return
        vm = self.app.model.vms.get(message.name)
        if vm is not None:
            self.rows.update(vm["name"], self.row_values(vm))

    def on_counters_batch(self, message: CountersBatch) -> None:
        """A big fleet's tick: one message for every VM sampled since the last; only rows in view are touched."""
        if self.sort_key == "faults":
            self.sync_rows()               # the order follows the rates (rebuilt only if it changed)
        else:
            self.rows.update_visible(self.values_of, only=message.names)

    # -- actions -------------------------------------------------------------------------------
    def cursor_vm(self) -> str | None:
        return self.rows.cursor_key()

    def target_vms(self) -> list[str]:
        if self.selected:
            return [n for n in self.rows.keys if n in self.selected]
        current = self.cursor_vm()
        return [current] if current else []

    def action_open_vm(self) -> None:
        if name := self.cursor_vm():
            from tui.screens.vm_detail import VmDetailScreen
            self.app.push_screen(VmDetailScreen(name))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open_vm()

    def action_select(self) -> None:
        if name := self.cursor_vm():
            self.selected ^= {name}
            self.rows.update(name, self.row_values(self.app.model.vms[name]))
            self.update_hint()

    def action_sort(self) -> None:
        self.sort_key = SORTS[(SORTS.index(self.sort_key) + 1) % len(SORTS)]
        self.rows.invalidate()     # rebuild in the new order
        self.sync_rows()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value.strip()
            self.sync_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            if not self.filter_text:
                event.input.display = False
            self.query_one("#vms").focus()

    def action_back(self) -> None:
        """esc: clear the filter, then the selection."""
        box = self.query_one("#filter", Input)
        if box.display or self.filter_text:
            box.value = ""
            box.display = False
            self.filter_text = ""
            self.sync_rows()
            self.query_one("#vms").focus()
        elif self.selected:
            self.selected.clear()
            self.sync_rows()
