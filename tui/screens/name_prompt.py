"""A one-line question (a clone's name, a snapshot's tag): enter answers, esc cancels."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from tui import keymap
from tui.screens.leave_once import LeaveOnce


class NamePrompt(LeaveOnce, ModalScreen[str | None]):
    """Dismisses with the text typed (stripped; may be "" when ``allow_empty``), or None on cancel."""

    BINDINGS = keymap.bindings(keymap.BACK_KEYS)

    def __init__(self, question: str, value: str = "", *, placeholder: str = "", ok_label: str = "OK",
                 allow_empty: bool = False) -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.value = value
        self.placeholder = placeholder
        self.ok_label = ok_label
        self.allow_empty = allow_empty

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, id="prompt-question")
            yield Input(self.value, placeholder=self.placeholder, id="prompt-input")
            yield Static("", id="prompt-error")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.ok_label} (enter)", id="ok", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#prompt-input", Input).focus()

    def _answer(self) -> None:
        text = self.query_one("#prompt-input", Input).value.strip()
        if not text and not self.allow_empty:
            self.query_one("#prompt-error", Static).update("give a name")
            return
        self.dismiss(text)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._answer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._answer()
        else:
            self.dismiss(None)

    def action_back(self) -> None:
        self.dismiss(None)
