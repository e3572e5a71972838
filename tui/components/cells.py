"""A text cell that repaints only when its value changes: the unit of the live counter panes."""
from __future__ import annotations

from textual.widgets import Sparkline, Static


class Cell(Static):
    """A Static whose ``set`` is a no-op for an unchanged value (no refresh, no layout)."""

    def __init__(self, text: str = "", **kwargs) -> None:
        super().__init__(text, **kwargs)
        self._value = text
        self.updates = 0          # how many times the cell really repainted (for tests/benchmarks)

    def set(self, text: str) -> None:
        if text != self._value:
            self._value = text
            self.updates += 1
            self.update(text)

    @property
    def value(self) -> str:
        return self._value


class Trend(Sparkline):
    """A sparkline fed from a history deque; reassigns its data only when the history moved."""

    def __init__(self, **kwargs) -> None:
        super().__init__([], summary_function=max, **kwargs)
        self._stamp: tuple = ()

    def show(self, history) -> None:
        stamp = (len(history), history[-1] if history else None, history[0] if history else None)
        if stamp != self._stamp:
            self._stamp = stamp
            self.data = list(history)
