"""One status line: which daemon, how fast counters refresh, and the app clock's time."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer

from tui import format as fmt
from tui.components.cells import Cell


class StatusBar(Cell):
    """Redrawn once a second at most, and only when its text changes (a Cell: no layout pass)."""

    DEFAULT_CSS = "StatusBar { width: 1fr; }"

    def on_mount(self) -> None:
        self.tick(force=True)
        self.set_interval(1.0, self.tick)

    def tick(self, force: bool = False) -> None:
        if not (force or self.app.screen is self.screen):
            return          # Textual repaints a hidden screen's change through the visible one
        app = self.app
        self.set(f" {app.connection_label} │ {app.rate_hz:g} Hz │ "
                 f"{len(app.model.vms)} VMs │ {fmt.clock_time(app.clock())} UTC")


def screen_bottom() -> ComposeResult:
    """The two bottom lines of every full screen: the status line and the key footer."""
    yield StatusBar()
    yield Footer(compact=True)
