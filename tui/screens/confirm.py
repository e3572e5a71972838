"""A yes/no modal for destructive actions (stop, delete): nothing happens without a clear yes."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tui import keymap
from tui.screens.leave_once import LeaveOnce


class ConfirmScreen(LeaveOnce, ModalScreen[bool]):
    """Dismisses with True only on confirm_yes ("y") / the Yes button; confirm_no (esc, "n") and No
    cancel. The keys come from the key table, so a [keymap] remapping changes them and the buttons."""

    BINDINGS = keymap.bindings(keymap.CONFIRM_KEYS)

    def __init__(self, question: str, yes_label: str = "Yes") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes_label = yes_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, id="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes_label} ({self._key('confirm_yes')})", id="yes", variant="error")
                yield Button(f"No ({self._key('confirm_no')})", id="no")

    def _key(self, binding_id: str) -> str:
        """The first key the user has for ``binding_id`` (after remapping), for the button label."""
        spec = next(k for k in keymap.CONFIRM_KEYS if k.id == binding_id)
        return keymap.display_key(spec, getattr(self.app, "user_keymap", {})).split(", ")[0]

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()     # the safe choice has the focus

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
