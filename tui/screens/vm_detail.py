"""One VM: its configuration, pending changes, migration blockers, vCPUs and live counters.

The definition is fetched (``client.show``) when the screen opens and whenever the daemon says
the VM changed; counters come from the app's event feed. The last faults start from the VM's
own list and are extended with each vCPU's newest fault from the samples.
"""
from __future__ import annotations

import re
import shlex

from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Header, Log, Static

from backend.errors import MtevmError, NotFoundError
from tui import format as fmt
from tui import keymap
from tui.components.counters import FAULT_ROWS, FaultList, VcpuTable
from tui.components.status import screen_bottom
from tui.live import CountersSampled, Rates, VmChanged, VmDeleted, is_live
from tui.screens.vm_actions import VmActions
from tui.screens.vm_list import mte_text
from tui.screens.leave_once import LeaveOnce


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
    lines += guest_lines(vm)
    if vm.get("last_error"):
        lines.append(f"[$error]last error: {escape(vm['last_error'])}[/]")
    return "\n".join(lines)


def guest_lines(vm: dict) -> list[str]:
    """What a local VM boots and, for a running Linux guest, what it says about itself."""
    g = vm.get("guest") or {}
    if not g or g.get("kind") == "builtin":
        return []
    text = f"guest {g['kind']}"
    if g.get("kernel"):
        text += f"  kernel {escape(g['kernel'])}"
    if g.get("append"):
        text += f"  append {escape(g['append'])}"
    if g.get("disks"):
        text += f"  disks {escape(', '.join(g['disks']))}"
    if g.get("kind") == "linux":
        text += "  fault addresses " + ("on (sync faults)" if g.get("fault_address") else "off (--no-fault-address)")
    lines = [text]
    facts = vm.get("guest_facts") if is_live(vm) else None
    if facts:
        hw = " ".join(n for n, k in (("MTE", "hwcap2_mte"), ("MTE3", "hwcap2_mte3")) if facts.get(k)) or "no MTE"
        prefs = " ".join(f"cpu{c['cpu']}={c['mte_tcf_preferred']}" for c in facts.get("cpus") or [])
        lines.append(f"Linux {escape(str(facts.get('kernel') or '?'))}  HWCAP2 {hw}  mte_tcf_preferred {prefs}"
                     f"  agent {facts.get('agent')}")
        if not facts.get("fault_address") and facts.get("fault_address_why"):
            lines.append(f"fault addresses: {escape(facts['fault_address_why'])}")
    elif g.get("kind") == "linux" and is_live(vm):
        lines.append("Linux guest booting: waiting for the mtevm agent…")
    return lines


def process_table(processes: list[dict]) -> str:
    """The per-process tag-check fault table of a Linux guest."""
    rows = [f"{'pid':>7}  {'comm':16}  {'sync':>9}  {'async':>9}"]
    rows += [f"{p['pid']:>7}  {escape(p['comm'][:16]):16}  {p['sync']:>9}  {p['async']:>9}" for p in processes[:12]]
    return "\n".join(rows)


CONSOLE_LINES = 300
GUEST_REFRESH = 2.0      # seconds between re-reads of a running Linux guest's facts and processes
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _clean(text: str) -> str:
    """Console text for the log widget: no carriage returns, no terminal control sequences."""
    return _ANSI.sub("", text)


def fault_key(f: dict) -> tuple:
    return (f.get("vcpu"), f.get("time"), f.get("addr"), f.get("kind"))


class VmDetailScreen(LeaveOnce, VmActions, Screen):
    BINDINGS = keymap.bindings(keymap.VM_KEYS, keymap.GUEST_KEYS, keymap.BACK_KEYS)
    TITLE = "VM"

    def __init__(self, name: str) -> None:
        super().__init__(classes="vm-detail")
        self.vm_name = name
        self.detail: dict | None = None
        self.faults: list[dict] = []
        self._last_summary: dict | None = None
        self._config_text = ""
        self._console_fed: str | None = None       # the state the console feed was started for
        self._guest_timer = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with VerticalScroll(id="detail-body"):
            yield Static("loading…", id="vm-config")
            yield Static("vCPUs", classes="section")
            yield VcpuTable(id="vcpus")
            yield Static("last faults", classes="section")
            yield FaultList(id="faults")
            yield Static("processes (tag-check faults)", classes="section guest-part", id="procs-title")
            yield Static("", id="procs", classes="guest-part")
            yield Static("serial console  (c: attach, ctrl+] comes back)", classes="section local-part",
                         id="console-title")
            yield Log(id="console", max_lines=CONSOLE_LINES, classes="local-part")
            yield Static("", id="argv", classes="local-part")
        yield from screen_bottom()

    def on_mount(self) -> None:
        for part in self.query(".guest-part, .local-part"):
            part.display = False            # shown once the VM turns out to be local / a Linux guest
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
        self.show_guest(vm)

    def show_guest(self, vm: dict) -> None:
        """The per-process table (Linux guests), the live serial console and the QEMU command line
        (local VMs)."""
        processes = vm.get("processes") or []
        for w in self.query(".guest-part"):
            w.display = bool(processes)
        if processes:
            self.query_one("#procs", Static).update(process_table(processes))
        if (vm.get("guest") or {}).get("kind") == "linux" and self._guest_timer is None:
            # a Linux guest's facts and per-process table are not in the counter samples: re-read
            self._guest_timer = self.set_interval(GUEST_REFRESH, self._refresh_guest)
        local = vm.get("host") == "local"
        for w in self.query(".local-part"):
            w.display = local
        if local and self._console_fed != vm.get("state"):
            self._console_fed = vm.get("state")
            self.feed_console(is_live(vm))

    def _refresh_guest(self) -> None:
        if self.is_current and is_live(self.current()):
            self.reload()

    @work(exclusive=True, group="detail-console")
    async def feed_console(self, live: bool) -> None:
        """The console log's end, then (running) what the guest prints, as it prints it."""
        log = self.query_one("#console", Log)
        client = self.app.client
        try:
            argv = await client.argv(self.vm_name)
            self.query_one("#argv", Static).update("QEMU: " + escape(shlex.join(argv)))
            history = await client.console_log(self.vm_name, CONSOLE_LINES)
            log.clear()
            log.write_lines([_clean(line) for line in history["lines"]])
            if not live:
                return
            async with client.console(self.vm_name) as console:
                while (chunk := await console.read()) is not None:
                    log.write(_clean(chunk.decode(errors="replace")))
        except MtevmError:
            return

    def action_console(self) -> None:
        """Attach this terminal to the VM's console (``mtevm console``) while the app is suspended."""
        import subprocess
        import sys
        client = self.app.client
        paths = getattr(client, "paths", None)
        if client is None or client.in_process or paths is None:
            self.app.notify("the interactive console needs the mtevm daemon (the app runs without one)",
                            severity="error")
            return
        if not is_live(self.current()):
            self.app.notify(f"VM {self.vm_name} is not running: its console log is shown below", severity="warning")
            return
        try:
            with self.app.suspend():
                subprocess.run([sys.executable, "-m", "backend.cli", "--runtime-dir", paths.runtime_dir,
                                "--state-dir", paths.state_dir, "console", self.vm_name])
        except Exception as e:     # e.g. a web browser session (textual-serve) cannot suspend
            self.app.notify(f"cannot attach here: {e}; run 'mtevm console {self.vm_name}' in a terminal",
                            severity="error")

    def action_selftests(self) -> None:
        from tui.screens.selftests import SelftestScreen
        g = (self.detail or {}).get("guest") or {}
        if g.get("kind") != "linux":
            self.app.notify("selftests run in a VM made with --guest linux (they use its agent)", severity="warning")
            return
        self.app.push_screen(SelftestScreen(self.vm_name))

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
