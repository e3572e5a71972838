"""Choose where a VM goes. The daemon decides: a blocked migration comes back with QEMU's reason
(e.g. "Live migration disabled due to MTE enabled") and is recorded; the app then shows the
migrations screen, where every attempt is listed with its outcome.

Hosts the VM can never go to (``migration_targets`` of its detail: e.g. local <-> simulated) are
listed greyed out with the reason and cannot be chosen. The VM's own host is offered too (last of
the possible ones, marked "same host"): like QEMU migrating to localhost,
the daemon runs a real migration within a host (a second QEMU on ``local``; a re-realize plus
RAM/tag copy on a simulated host)."""
from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, OptionList, Static
from textual.widgets.option_list import Option

from backend.errors import MtevmError
from tui import keymap
from tui.components.onoff import OnOffCheckbox
from tui.screens.leave_once import LeaveOnce


async def migrate(app, name: str, dst: str, with_tags: bool) -> None:
    """Ask the daemon to migrate, then show the migrations screen (refusals are recorded there too)."""
    try:
        await app.client.migrate(name, dst, with_tags=with_tags)
    except MtevmError as e:
        app.notify(str(e), title=f"migration of {name} refused", severity="error", timeout=10)
    await app.refresh_model()
    await app.switch_mode("migrations")


class MigrateScreen(LeaveOnce, ModalScreen[None]):
    BINDINGS = keymap.bindings(keymap.BACK_KEYS) + [Binding("ctrl+s", "submit", "migrate", id="form_submit")]

    def __init__(self, vm: dict) -> None:
        super().__init__(classes="dialog-screen")
        self.vm = vm

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"Migrate [b]{self.vm['name']}[/b] from {self.vm.get('host', '?')} to:")
            yield OptionList(id="destinations")
            yield Static("", id="no-target")
            yield OnOffCheckbox("copy MTE tags (KVM_ARM_MTE_COPY_TAGS)", id="with-tags")
            with Horizontal(classes="buttons"):
                yield Button("Migrate (ctrl+s)", id="migrate", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#no-target").display = False
        self.query_one(OptionList).focus()
        self.load_hosts()

    @work(exclusive=True, group="migrate-hosts")
    async def load_hosts(self) -> None:
        """Possible destinations first (the VM's own host last of them), then, greyed out and not
        selectable, the hosts it can never go to, each with the daemon's reason."""
        try:
            hosts = await self.app.client.hosts()
            targets = (await self.app.client.show(self.vm["name"])).get("migration_targets", {})
        except MtevmError as e:
            self.app.notify(str(e), title=f"migrate {self.vm['name']}", severity="error")
            self.dismiss()
            return
        options = self.query_one(OptionList)
        own = self.vm.get("host")

        def why_not(h: dict) -> str | None:
            if targets.get(h["name"]):
                return targets[h["name"]]
            return None if h.get("available", True) else f"unavailable: {h.get('reason')}"

        for h in sorted(hosts, key=lambda h: (why_not(h) is not None, h["name"] == own)):
            reason = why_not(h)
            same = "  (same host)" if h["name"] == own else ""
            # an impossible target shows why instead of what it is: the reason is what the user needs
            text = f"{h['name']}  ✘ {reason}" if reason else f"{h['name']}{same}  {h.get('description', '')}"
            options.add_option(Option(text, id=h["name"], disabled=reason is not None))
        first = next((i for i in range(options.option_count) if not options.get_option_at_index(i).disabled), None)
        options.highlighted = first
        if first is None:
            note = self.query_one("#no-target", Static)
            note.update("No host can take this VM (reasons above).")
            note.display = True

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "migrate":
            self.action_submit()
        else:
            self.dismiss()

    def action_submit(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            self.app.notify("Choose a destination host", severity="warning")
            return
        option = options.get_option_at_index(options.highlighted)
        if option.disabled:
            self.app.notify("That host cannot take this VM", severity="warning")
            return
        dst = option.id
        with_tags = self.query_one("#with-tags", Checkbox).value
        self.dismiss()
        self.app.run_worker(migrate(self.app, self.vm["name"], dst, with_tags), group="migrate")

    def action_back(self) -> None:
        self.dismiss()
