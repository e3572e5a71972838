"""One VM: its configuration, pending changes, migration blockers, vCPUs and live counters.

The definition is fetched (``client.show``) when the screen opens and whenever the daemon says
the VM changed; counters come from the app's event feed. The last faults start from the VM's
own list and are extended with each vCPU's newest fault from the samples.
"""
from __future__ import annotations

import shlex

from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Header, Static

from backend.errors import MtevmError, NotFoundError
from tui import format as fmt
from tui import keymap
from tui.components.counters import FAULT_ROWS, FaultList, VcpuTable
from tui.components.status import screen_bottom
from tui.live import CountersSampled, Rates, VmChanged, VmDeleted, is_live
from tui.screens.vm_actions import VmActions
from tui.screens.vm_list import mte_text


def describe(vm: dict) -> str:
    """The configuration block, in Rich markup, with what needs the user's attention highlighted."""
    cfg = vm.get("config", {})
    lines = [
        f"[b]{vm['name']}[/b]  {vm.get('state', '?')} on {vm.get('host', '?')}   "
        f"accel {cfg.get('accel', vm.get('accel'))}  cpu {cfg.get('cpu', vm.get('cpu'))}  "
        f"vCPUs {cfg.get('vcpus', vm.get('vcpus'))}  memory {fmt.size(cfg.get('memory', vm.get('memory')))}",
        f"MTE {mte_text(vm)}  secure {fmt.yes_no(cfg.get('secure'))}  "
        f"only-migratable {fmt.yes_no(cfg.get('only_migratable'))}",
    ]
    if vm.get("qemu_args"):
        lines.append(f"QEMU args {escape(shlex.join(vm['qemu_args']))}"
                     + ("  [$warning](host files allowed: QEMU reads and writes them as you)[/]"
                        if vm.get("allow_host_files") else ""))
    live = is_live(vm)              # tag memory and blockers belong to a running machine
    tags = vm.get("tag_memory")
    if tags and live:
        lines[-1] += f"  tag memory {fmt.size(tags.get('bytes'))} ({tags.get('tagged_pages', 0)} pages)"
    pending = vm.get("pending") or {}
    if pending:
        changes = ", ".join(f"{k} → {'on' if v is True else 'off' if v is False else v}" for k, v in pending.items())
        lines.append(f"[$warning]pending (applied at next start): {changes}[/]")
    for reason in (vm.get("blocked_reasons") or []) if live else []:
        lines.append(f"[$warning]migration blocked: {escape(reason)}[/]")
    for warning in vm.get("warnings") or []:      # the daemon's dry run of the next start (QEMU's text)
        lines.append(f"[$warning]cannot start on {escape(str(vm.get('host')))}: {escape(warning)}[/]")
    if vm.get("last_error"):
        lines.append(f"[$error]last error: {escape(vm['last_error'])}[/]")
    return "\n".join(lines)


def fault_key(f: dict) -> tuple:
    return (f.get("vcpu"), f.get("time"), f.get("addr"), f.get("kind"))


class VmDetailScreen(VmActions, Screen):
    BINDINGS = keymap.bindings(keymap.VM_KEYS, keymap.BACK_KEYS)
    TITLE = "VM"

    def __init__(self, name: str) -> None:
        super().__init__(classes="vm-detail")
        self.vm_name = name
        self.detail: dict | None = None
        self.faults: list[dict] = []
        self._last_summary: dict | None = None
        self._config_text = ""

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with VerticalScroll(id="detail-body"):
            yield Static("loading…", id="vm-config")
            yield Static("vCPUs", classes="section")
            yield VcpuTable(id="vcpus")
            yield Static("last faults", classes="section")
            yield FaultList(id="faults")
        yield from screen_bottom()

    def on_mount(self) -> None:
        self.sub_title = self.vm_name
        self.query_one("#detail-body").focus()
        self.app.set_vcpu_focus(self.vm_name)      # a big fleet's feed carries this VM's vCPUs
        self.reload()

    def on_unmount(self) -> None:
        if self.app.vcpu_focus == self.vm_name:
            self.app.set_vcpu_focus(None)

    def on_screen_resume(self) -> None:
        if self.detail is not None:
            self.reload()          # catch up: live messages only go to the visible screen

    def target_vms(self) -> list[str]:
        return [self.vm_name]

    @work(exclusive=True, group="detail-reload")
    async def reload(self) -> None:
        """Fetch the definition again (after open or a VM change event)."""
        try:
            vm = await self.app.client.show(self.vm_name)
        except NotFoundError:
            self.app.notify(f"VM {self.vm_name!r} no longer exists")
            self.dismiss()
            return
        except MtevmError as e:
            self.app.notify(str(e), severity="error")
            return
        self.detail = vm
        self.show_config()
        self.merge_faults(vm.get("last_faults", []))
        self.show_sample()

    def current(self) -> dict:
        """The definition as last fetched, with the newest summary from the event feed on top: a
        state change shows at once, before the definition is fetched again."""
        summary = {k: v for k, v in self.app.model.vms.get(self.vm_name, {}).items() if k != "vcpus"}
        return {**(self.detail or {}), **summary}      # (a summary's "vcpus" is a count, the detail's a list)

    def show_config(self) -> None:
        text = describe(self.current())
        if text != self._config_text:          # a Static update means a new layout: only on change
            self._config_text = text
            self.query_one("#vm-config", Static).update(text)

    def merge_faults(self, new: list[dict]) -> None:
        known = {fault_key(f) for f in self.faults}
        fresh = [f for f in new if f and fault_key(f) not in known]
        if fresh or not self.faults:
            self.faults = sorted(self.faults + fresh, key=lambda f: f.get("time") or 0.0, reverse=True)[:FAULT_ROWS]
        self.query_one(FaultList).set_faults(self.faults, self.app.clock())

    def show_sample(self) -> None:
        """The vCPU table from the live model; a VM that is not live shows none of its old figures."""
        if self.detail is None:
            return
        table = self.query_one(VcpuTable)
        vcpus = self.detail.get("vcpus", [])
        if not is_live(self.current()):
            table.set_idle(vcpus)
            return
        live = self.app.model.sample(self.vm_name)
        if live is None:                       # running, no sample from the feed yet: the fetched one
            table.set_sample({"vcpus": vcpus, "vm": _sum(vcpus)}, Rates(), {})
            return
        table.set_sample(live.counters, live.vm_rates, live.vcpu_rates)
        self.merge_faults([v.get("last_fault") for v in live.counters.get("vcpus", [])])

    def on_counters_sampled(self, message: CountersSampled) -> None:
        if message.name == self.vm_name:
            self.show_sample()

    def on_vm_changed(self, message: VmChanged) -> None:
        """Fetch the definition again, unless only the faults/s figure moved (the daemon says so
        every second; this screen computes its own rates from the samples)."""
        if message.summary.get("name") != self.vm_name:
            return
        summary = {k: v for k, v in message.summary.items() if k != "faults_per_s"}
        if summary != self._last_summary:
            self.show_config()                 # the new state at once; the fetch fills in the rest
            self.show_sample()
            self._last_summary = summary
            self.reload()

    def on_vm_deleted(self, message: VmDeleted) -> None:
        if message.name == self.vm_name:
            self.dismiss()

    def action_back(self) -> None:
        self.dismiss()

    def action_edit_vm(self) -> None:
        from tui.screens.vm_form import VmFormScreen
        if self.detail:
            self.app.push_screen(VmFormScreen(existing=self.detail))


def _sum(vcpus: list[dict]) -> dict:
    keys = ("checked", "unchecked", "sync_faults", "async_faults")
    return {k: sum(int(v.get(k, 0)) for v in vcpus) for k in keys}
