"""One status line: which daemon (and whether it is lost), how fast counters refresh, how many VMs,
and the app clock's time."""
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
        lost = getattr(app, "daemon_lost", None)
        self.set_class(lost is not None, "-lost")
        where = f"{app.connection_label} LOST, reconnecting" if lost else app.connection_label
        vms = len(app.model.vms)
        self.set(f" {where} │ {app.rate_hz:g} Hz │ "
                 f"{vms} VM{'' if vms == 1 else 's'} │ {fmt.clock_time(app.clock())} UTC")


def screen_bottom() -> ComposeResult:
    """The two bottom lines of every full screen: the status line and the key footer."""
    yield StatusBar()
    yield Footer(compact=True)
