"""The VM operations shared by the list and the detail screen (start, stop, delete, MTE, migrate).

Each runs in a worker so the screen stays responsive; a refusal from the daemon (QEMU's text) is
shown as a notification and changes nothing. Stop and delete ask first; delete decides what it
can do before it asks, so a question is never followed by a refusal.
"""
from __future__ import annotations

from backend.errors import MtevmError
from tui.live import mte_at_next_start
from tui.screens.confirm import ConfirmScreen

DELETABLE = ("stopped", "crashed")     # the states the daemon deletes in (Service.delete)


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
        """Decide before asking: a VM in transition is refused at once; a running one is offered
        stop-and-delete (one question, naming what will be powered off); stopped ones just delete."""
        if not (names := self._names()):
            return
        states = {n: (self.app.model.vms.get(n) or {}).get("state", "stopped") for n in names}
        busy = [n for n in names if states[n] not in DELETABLE + LIVE]
        if busy:
            self.app.notify(f"VM {busy[0]!r} is {states[busy[0]]}: wait until it has finished, then delete it",
                            title=f"delete {busy[0]}", severity="error", timeout=10)
            return
        running = [n for n in names if states[n] in LIVE]
        if not running:
            self._confirm(f"Delete {_listing(names)}? Its definition is removed.", "Delete",
                          lambda: self._run("delete", names, self.app.client.delete))
            return

        async def stop_and_delete(name: str) -> None:
            if name in running:
                await self.app.client.stop(name)
            await self.app.client.delete(name)
        self._confirm(f"{_listing(running)} {'is' if len(running) == 1 else 'are'} running. "
                      f"Stop and delete {_listing(names)}? The guest is powered off and its definition removed.",
                      "Stop and delete", lambda: self._run("delete", names, stop_and_delete))

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
            if vm.get("state", "running") != "running":      # decided before the dialog, as delete does
                self.app.notify(f"VM {vm['name']!r} is {vm['state']}: only a running VM can be migrated",
                                title=f"migrate {vm['name']}", severity="error", timeout=10)
                return
            self.app.push_screen(MigrateScreen(vm))

    # -- the everyday operations (backend.daemon.vm_operations) --------------------------------
    def _state(self, name: str) -> str:
        return (self.app.model.vms.get(name) or {}).get("state", "?")

    def action_pause_vm(self) -> None:
        """Pause running VMs, resume paused ones (one key, as a media player's)."""
        if names := self._names():
            async def toggle(name: str) -> None:
                await (self.app.client.resume if self._state(name) == "paused" else self.app.client.pause)(name)
            self._run("pause/resume", names, toggle)

    def _with_outcome(self, call):
        """Run ``call(name)`` and tell the user how it went (e.g. "no agent: reset it instead")."""
        async def run(name: str) -> None:
            answer = await call(name)
            self.app.notify(answer["outcome"]["message"], timeout=8)
        return run

    def action_reboot_vm(self) -> None:
        if names := self._names():
            self._confirm(f"Reboot {_listing(names)}? A guest without an agent is reset.", "Reboot",
                          lambda: self._run("reboot", names, self._with_outcome(self.app.client.reboot)))

    def action_shutdown_vm(self) -> None:
        if names := self._names():
            self._confirm(f"Shut down {_listing(names)}? A guest without an agent is stopped.", "Shut down",
                          lambda: self._run("shut down", names, self._with_outcome(self.app.client.shutdown)))

    def action_clone_vm(self) -> None:
        if names := self._names():
            from tui.screens.name_prompt import NamePrompt
            name = names[0]

            def answered(new: str | None) -> None:
                if new:
                    async def clone(_: str) -> None:
                        await self.app.client.clone(name, new)
                        self.app.notify(f"cloned VM {name!r} to {new!r}")
                    self._run("clone", [name], clone)
            self.app.push_screen(NamePrompt(f"Clone VM {name!r} (its definition, and its disks) as:", f"{name}-clone",
                                            ok_label="Clone"), answered)

    def action_snapshots(self) -> None:
        if names := self._names():
            from tui.screens.snapshots import SnapshotsScreen
            self.app.push_screen(SnapshotsScreen(names[0]))

    def action_new_vm(self) -> None:
        from tui.screens.vm_form import VmFormScreen
        self.app.push_screen(VmFormScreen())

    def _confirm(self, question: str, yes: str, then) -> None:
        def answered(ok: bool | None) -> None:
            if ok:
                then()
        self.app.push_screen(ConfirmScreen(question, yes), answered)


LIVE = ("running", "paused")       # a QEMU (or simulated vCPUs) exists: stop powers it off


def _listing(names: list[str]) -> str:
    return f"VM {names[0]!r}" if len(names) == 1 else f"{len(names)} VMs ({', '.join(names)})"
