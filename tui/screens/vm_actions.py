"""The VM operations shared by the list and the detail screen (start, stop, delete, MTE, migrate).

Each runs in a worker so the screen stays responsive; a refusal from the daemon (QEMU's text) is
shown as a notification and changes nothing. Stop and delete ask first.
"""
from __future__ import annotations

from backend.errors import MtevmError
from tui.live import mte_at_next_start
from tui.screens.confirm import ConfirmScreen


class VmActions:
    """Mixin for a Screen that knows which VM(s) the user means (``target_vms``)."""

    def target_vms(self) -> list[str]:          # pragma: no cover - each screen overrides
        raise NotImplementedError

    def _names(self) -> list[str] | None:
        names = self.target_vms()
        if not names:
            self.app.notify("No VM selected", severity="warning")
            return None
        return names

    async def _each(self, verb: str, names: list[str], call) -> None:
        for name in names:
            try:
                await call(name)
            except MtevmError as e:
                self.app.notify(str(e), title=f"{verb} {name}", severity="error", timeout=10)
        await self.app.refresh_model()

    def _run(self, verb: str, names: list[str], call) -> None:
        self.run_worker(self._each(verb, names, call), group="vm-ops")

    def action_start_vm(self) -> None:
        if names := self._names():
            self._run("start", names, self.app.client.start)

    def action_stop_vm(self) -> None:
        if names := self._names():
            self._confirm(f"Stop {_listing(names)}? The guest is powered off.", "Stop",
                          lambda: self._run("stop", names, self.app.client.stop))

    def action_delete_vm(self) -> None:
        if names := self._names():
            self._confirm(f"Delete {_listing(names)}? Its definition is removed.", "Delete",
                          lambda: self._run("delete", names, self.app.client.delete))

    def action_toggle_mte(self) -> None:
        if names := self._names():
            async def toggle(name: str) -> None:
                vm = self.app.model.vms.get(name) or await self.app.client.show(name)
                await self.app.client.set_mte(name, not mte_at_next_start(vm))
            self._run("toggle MTE of", names, toggle)

    def action_migrate_vm(self) -> None:
        if names := self._names():
            from tui.screens.migrate import MigrateScreen
            vm = self.app.model.vms.get(names[0], {"name": names[0], "host": ""})
            self.app.push_screen(MigrateScreen(vm))

    def action_new_vm(self) -> None:
        from tui.screens.vm_form import VmFormScreen
        self.app.push_screen(VmFormScreen())

    def _confirm(self, question: str, yes: str, then) -> None:
        def answered(ok: bool | None) -> None:
            if ok:
                then()
        self.app.push_screen(ConfirmScreen(question, yes), answered)


def _listing(names: list[str]) -> str:
    return f"VM {names[0]!r}" if len(names) == 1 else f"{len(names)} VMs ({', '.join(names)})"
