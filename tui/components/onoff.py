"""A checkbox whose label says its state ("MTE: on" / "MTE: off").

Textual's Checkbox draws "▐X▌" for both states and tells them apart by colour only; in 16 colours
(TERM=linux) and through tmux the two look the same, so the words carry the state instead.
"""
from __future__ import annotations

from textual.widgets import Checkbox


class OnOffCheckbox(Checkbox):
    def __init__(self, name: str, value: bool = False, **kwargs) -> None:
        self.setting = name                    # the label without its state
        super().__init__(self._text(name, value), value, **kwargs)

    @staticmethod
    def _text(name: str, value: bool) -> str:
        return f"{name}: {'on' if value else 'off'}"

    def watch_value(self) -> None:
        self.label = self._text(self.setting, self.value)
        super().watch_value()
