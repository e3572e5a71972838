"""Widgets that repaint only their own cells, only on change: the units of the live counter panes."""
from __future__ import annotations

from textual.content import Content
from textual.widget import Widget


class Cell(Widget):
    """One value on screen. ``set`` repaints only this cell, and only when the text changed.

    Not a Static: ``Static.update`` asks for a new layout, and a layout pass makes Textual send
    the whole screen again; a Cell has a fixed size (CSS) so a change is a repaint of its own region.
    """

    DEFAULT_CSS = "Cell { height: 1; width: 8; }"

    def __init__(self, text: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self._value = text
        self.updates = 0          # how many times the cell really repainted (for tests/benchmarks)

    def render(self) -> Content:
        return Content(self._value)

    def set(self, text: str) -> None:
        if text != self._value:
            self._value = text
            self.updates += 1
            self.refresh()

    @property
    def value(self) -> str:
        return self._value


class Trend(Widget):
    """A one-line sparkline of a history deque, newest on the right, in a single colour.

    Not Textual's Sparkline: that one blends a colour per bar, so each bar carries its own escape
    sequence and a 60-bar row costs ~1.5 KB per redraw; one colour makes the row one short run.
    """

    DEFAULT_CSS = "Trend { height: 1; color: $error; }"
    BARS = "▁▂▃▄▅▆▇█"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data: list[float] = []
        self._stamp: tuple = ()

    def show(self, history) -> None:
        stamp = (len(history), history[-1] if history else None, history[0] if history else None)
        if stamp != self._stamp:
            self._stamp = stamp
            self.data = list(history)
            self.refresh()

    def render(self) -> Content:
        data = self.data[-self.size.width:] if self.size.width else self.data
        top = max(data, default=0.0)
        if top <= 0:
            return Content(self.BARS[0] * len(data))
        last = len(self.BARS) - 1
        return Content("".join(self.BARS[min(last, int(v / top * last + 0.5))] for v in data))
