"""One status line: which daemon, how fast counters refresh, and the app clock's time."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer, Static

from tui import format as fmt


class StatusBar(Static):
    """Redrawn once a second at most, and only when its text changes."""

    def on_mount(self) -> None:
        self._text = ""
        self.tick()
        self.set_interval(1.0, self.tick)

    def tick(self) -> None:
        app = self.app
        text = (f" {app.connection_label} │ {app.rate_hz:g} Hz │ "
                f"{len(app.model.vms)} VMs │ {fmt.clock_time(app.clock())} UTC")
        if text != self._text:
            self._text = text
            self.update(text)


def screen_bottom() -> ComposeResult:
    """The two bottom lines of every full screen: the status line and the key footer."""
    yield StatusBar()
    yield Footer(compact=True)
