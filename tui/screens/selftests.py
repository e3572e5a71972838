"""The kernel's arm64 MTE selftests of one Linux VM, run through its guest agent, live.

The same runner as ``mtevm selftest`` (backend.guests.selftest): the default tests one after the
other, each row filling in as its TAP lines arrive; the output of the selected test below.
"""
from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Header, Log, Static

from backend.errors import MtevmError
from tui import keymap
from tui.components.status import screen_bottom
from tui.screens.leave_once import LeaveOnce

COLUMNS = [("test", "test"), ("result", "result"), ("pass", "pass"), ("fail", "fail"), ("skip", "skip"),
           ("time", "time")]


class SelftestScreen(LeaveOnce, Screen):
    BINDINGS = keymap.bindings(keymap.BACK_KEYS)
    TITLE = "MTE selftests"

    def __init__(self, vm: str) -> None:
        super().__init__(classes="selftests")
        self.vm_name = vm
        self.outputs: dict[str, list[str]] = {}

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static(f"the kernel's tools/testing/selftests/arm64/mte in VM {self.vm_name}: starting…", id="st-status")
        table = DataTable(id="st-table", cursor_type="row")
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Log(id="st-output", max_lines=400)
        yield from screen_bottom()

    def on_mount(self) -> None:
        self.sub_title = self.vm_name
        self.run_tests()

    @work(exclusive=True, group="selftests")
    async def run_tests(self) -> None:
        from backend.guests.selftest import choose, list_tests, run_tests
        status = self.query_one("#st-status", Static)
        table = self.query_one(DataTable)
        try:
            available = await list_tests(self.app.client, self.vm_name)
            names = choose(available, [])
            slow = [t.name for t in available if t.slow]
            for name in names:
                table.add_row(name, "waiting", "", "", "", "", key=name)
            status.update(f"running {len(names)} tests in VM {self.vm_name}"
                          + (f" (opt-in, not run here: {', '.join(slow)}; 'mtevm selftest {self.vm_name} NAME')"
                             if slow else ""))
            totals = {"pass": 0, "fail": 0, "skip": 0}
            async for kind, r, _ in run_tests(self.app.client, self.vm_name, names):
                self.outputs[r.name] = r.output
                result = r.result if kind == "done" else "running"
                for key, value in (("result", result), ("pass", r.passed), ("fail", r.failed), ("skip", r.skipped),
                                   ("time", f"{r.seconds:.1f} s" if kind == "done" else "")):
                    table.update_cell(r.name, key, str(value))
                if kind == "done":
                    totals[r.result] = totals.get(r.result, 0) + 1
                    self._show_output(r.name)
            status.update(f"{totals['pass']} passed, {totals['fail']} failed, {totals['skip']} skipped "
                          f"in VM {self.vm_name}")
        except MtevmError as e:
            status.update(f"[$error]{e}[/]")

    def _show_output(self, name: str) -> None:
        log = self.query_one(Log)
        log.clear()
        log.write_lines(self.outputs.get(name, [])[-400:])

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value in self.outputs:
            self._show_output(event.row_key.value)

    def action_back(self) -> None:
        self.dismiss()
