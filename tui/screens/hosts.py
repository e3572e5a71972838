"""Hosts and their capability probe: each fact with where it was read, and verdicts in plain words.

The probe is the daemon's (``client.probe(host)``): for "local" it is the real /dev/kvm, cpuinfo
and qemu binary of the daemon's machine, nothing here is assumed. libvirt hosts (``mtevm host
add``) show their connection (connected, or unreachable with libvirt's reason) and the libvirt and
QEMU versions they report; the table follows their connection as it changes (host events).
"""
from __future__ import annotations

from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static

from backend.errors import MtevmError
from tui import format as fmt
from tui import keymap
from tui.components.status import screen_bottom
from tui.live import HostChanged

VERDICT_STYLE = {"ok": ("✔", "$success"), "warn": ("!", "$warning"), "error": ("✘", "$error")}


def _value(v) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, bool):
        return fmt.yes_no(v)
    return str(v)


def probe_summary(report: dict) -> Content:
    """Verdicts first (what the user can do), then KVM, QEMU and CPU in one line each."""
    lines: list[Content] = [Content.from_markup(f"[b]probe of {escape(str(report.get('host', '?')))}[/b]")]
    for verdict in report.get("verdicts", []):
        icon, style = VERDICT_STYLE.get(verdict.get("level"), ("·", "$foreground"))
        lines.append(Content.from_markup(f"[{style}]{icon} {escape(str(verdict.get('text', '')))}[/]"))
    kvm = report.get("kvm") or {}
    lines.append(Content(
        f"KVM   {kvm.get('path', '/dev/kvm')}: present {_value(kvm.get('present'))}, "
        f"API version {_value(kvm.get('api_version'))}, KVM_CAP_ARM_MTE {_value(kvm.get('cap_arm_mte'))}"))
    qemu = report.get("qemu") or {}
    usable = "usable for MTE" if qemu.get("usable_for_mte") else f"not usable for MTE: {qemu.get('reason') or '?'}"
    lines.append(Content(
        f"QEMU  {qemu.get('binary') or 'not found'} {qemu.get('version') or ''} "
        f"(accels {', '.join(qemu.get('accels') or []) or '-'}, MTE {_value(qemu.get('mte'))}); {usable}"))
    cpu = report.get("cpu") or {}
    lines.append(Content(f"CPU   {cpu.get('arch', '?')}, MTE {_value(cpu.get('mte'))} (from {cpu.get('source', '?')})"))
    return Content("\n").join(lines)


def facts_table(report: dict) -> Table:
    table = Table(box=None, expand=True, pad_edge=False, header_style="bold")
    table.add_column("fact", ratio=3, overflow="fold")
    table.add_column("value", ratio=1, overflow="fold")
    table.add_column("source", ratio=2, overflow="fold")
    for fact in report.get("facts", []):
        table.add_row(str(fact.get("name")), _value(fact.get("value")), str(fact.get("source", "")))
    return table


def host_versions(host: dict) -> str:
    """"11.3.0/10.0.2" for a connected libvirt host, "-" otherwise."""
    if host.get("libvirt_version"):
        return f"{host['libvirt_version']}/{host.get('qemu_version') or '?'}"
    return "-"


class HostsScreen(Screen):
    BINDINGS = keymap.bindings(keymap.BACK_KEYS)
    TITLE = "Hosts"

    def __init__(self) -> None:
        super().__init__(id="hosts")
        self.hosts: list[dict] = []
        self.shown: str | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        table = DataTable(id="host-table", cursor_type="row")
        for key, label in (("name", "host"), ("kind", "kind"), ("arch", "arch"), ("kvm_mte", "KVM MTE"),
                           ("connection", "connection"), ("versions", "libvirt/QEMU"), ("available", "available")):
            table.add_column(label, key=key)
        yield table
        with VerticalScroll(id="probe-body"):
            yield Static("select a host to see its probe", id="probe-summary")
            yield Static("", id="probe-facts")
        yield from screen_bottom()

    def on_mount(self) -> None:
        self.query_one("#host-table").focus()
        self.load_hosts()

    @work(exclusive=True, group="hosts")
    async def load_hosts(self) -> None:
        try:
            self.hosts = await self.app.client.hosts()
        except MtevmError as e:
            self.app.notify(str(e), severity="error")
            return
        table = self.query_one("#host-table", DataTable)
        table.clear()
        for h in self.hosts:
            available = "yes" if h.get("available") else f"no: {h.get('reason') or '?'}"
            table.add_row(h["name"], h.get("kind", ""), h.get("arch", ""), fmt.yes_no(h.get("kvm_mte")),
                          h.get("state", "built in"), host_versions(h), available, key=h["name"])
        if self.hosts:
            names = [h["name"] for h in self.hosts]
            shown = self.shown if self.shown in names else names[0]
            if shown != names[0]:
                table.move_cursor(row=names.index(shown))
            self.show_probe(shown)

    def on_host_changed(self, message: HostChanged) -> None:
        """A libvirt host connected, went away or was added/removed: show it as it is now."""
        self.load_hosts()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value != self.shown:
            self.show_probe(event.row_key.value)

    def select_host(self, name: str) -> None:
        """Move the cursor to ``name`` (its probe follows)."""
        names = [h["name"] for h in self.hosts]
        self.query_one("#host-table", DataTable).move_cursor(row=names.index(name))

    @work(exclusive=True, group="probe")
    async def show_probe(self, name: str) -> None:
        self.shown = name
        self.query_one("#probe-summary", Static).update(f"probing {name}…")
        self.query_one("#probe-facts", Static).update("")
        try:
            reports = await self.app.client.probe(name)
        except MtevmError as e:
            self.query_one("#probe-summary", Static).update(Content(f"probe of {name} failed: {e}"))
            return
        if self.shown != name or not reports:
            return
        self.query_one("#probe-summary", Static).update(probe_summary(reports[0]))
        self.query_one("#probe-facts", Static).update(facts_table(reports[0]))

    async def action_back(self) -> None:
        await self.app.switch_mode("vms")
