"""Create a VM (or edit one's MTE and TCF), validated as the user types.

Every change asks the daemon for a dry run (``client.create(cfg, validate_only=True)``; the edit
form adds ``existing=True``), which runs the seed's decision tree on the chosen host. One rule, the
daemon's, for both forms and ``mtevm create``: a malformed definition is an error (✘, not saved);
one that can never start on its host is accepted with QEMU's text as a warning (⚠ "MTE requested,
but not supported by KVM"): the user may move it. The form only checks that numbers are numbers.
ctrl+s never fails silently: what stops it is on the verdict line and in a notification.

This is one of mtevm's deliberate departures from QEMU 9.2: QEMU prints these messages and exits
(or aborts, where the seed passes &error_abort), ending every VM of the process; mtevm turns them
into a per-VM error, shown here before the VM even exists, and the manager keeps running.
"""
from __future__ import annotations

import asyncio
import os
import shlex

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Header, Input, Label, Select, Static

from backend.definition import split_qemu_args
from backend.guests.definition import FAULT_ADDRESS_DEFAULT, GUEST_KINDS
from backend.errors import MtevmError
from tui import keymap
from tui.components.onoff import OnOffCheckbox
from tui.components.status import screen_bottom
from tui.screens.leave_once import LeaveOnce

CPU_SUGGESTIONS = ["max", "host", "cortex-a710", "neoverse-n2", "cortex-a57", "cortex-a72", "cortex-a76"]
TCF_CHOICES = ["sync", "async", "asymm", "none"]
VALIDATE_DELAY = 0.15      # seconds of quiet typing before asking the daemon


class FormError(Exception):
    """A field the form itself can reject (not a number); the daemon judges everything else."""


def _int_field(value: str, what: str) -> int:
    try:
        return int(value.strip(), 0)
    except ValueError:
        raise FormError(f"{what}: {value.strip()!r} is not a whole number") from None


class VmFormScreen(LeaveOnce, Screen):
    BINDINGS = keymap.bindings(keymap.FORM_KEYS, keymap.BACK_KEYS)
    TITLE = "New VM"

    def __init__(self, existing: dict | None = None) -> None:
        super().__init__(classes="vm-form")
        self.existing = existing
        self.verdict: dict | None = None     # the last dry-run answer, {"ok","error","warnings"}
        self.host_kinds: dict[str, str] = {}
        self.auto_accel = "kvm"               # the accel the form chose itself (follows the host)

    def compose(self) -> ComposeResult:
        e = self.existing or {}
        pending = e.get("pending") or {}
        # editing: the definition the VM will boot with next (its pending changes shown as values)
        cfg = {**e.get("config", {}), **{k: v for k, v in pending.items() if k not in ("workload", "qemu_args")}}
        workload = {**e.get("workload", {}), **(pending.get("workload") or {})}
        qemu_args = pending.get("qemu_args", e.get("qemu_args") or [])
        editing = self.existing is not None
        yield Header(show_clock=False)
        yield Static("", id="form-error")
        with VerticalScroll(id="form-body"):
            yield from self._row("name", Input(e.get("name", ""), placeholder="e.g. web1", id="name",
                                               disabled=editing, compact=True))
            yield from self._row("host", Select([], id="host", prompt="loading hosts…", compact=True)
                                 if not editing else Input(e.get("host", ""), id="host", disabled=True, compact=True))
            yield from self._row("accel", Select([("kvm", "kvm"), ("tcg", "tcg")], id="accel", allow_blank=False,
                                                 value=cfg.get("accel", "kvm"), compact=True))
            yield from self._row("cpu", Input(cfg.get("cpu", ""), placeholder="default: host (kvm), max (tcg)",
                                              suggester=SuggestFromList(CPU_SUGGESTIONS), id="cpu",
                                              compact=True))
            yield from self._row("vCPUs", Input(str(cfg.get("vcpus", 2)), id="vcpus", type="integer", compact=True))
            yield from self._row("memory", Input(_mem(cfg.get("memory")), id="memory", compact=True))
            yield from self._row("TCF", Select([(t, t) for t in TCF_CHOICES], id="tcf", allow_blank=False,
                                               value=(workload.get("tcf") or ["sync"])[0], compact=True))
            yield from self._row("seed", Input(str(workload.get("seed", 1)), id="seed", type="integer", compact=True))
            guest = e.get("guest") or {}      # what the VM boots; fixed once made (edit leaves it)
            yield from self._row("guest", Select([(k, k) for k in GUEST_KINDS], id="guest", allow_blank=False,
                                                 value=guest.get("kind", "builtin"), disabled=editing, compact=True),
                                 row_id="guest-row")
            yield from self._row("kernel", Input(guest.get("kernel") or "", id="kernel", disabled=editing, compact=True,
                                                 placeholder="custom guest: a raw arm64 kernel Image"),
                                 row_id="kernel-row")
            yield from self._row("append", Input(guest.get("append") or "", id="append", disabled=editing, compact=True,
                                                 placeholder="kernel command line (linux: added to mtevm's)"),
                                 row_id="append-row")
            with Horizontal(classes="checks", id="fault-address-row"):
                # linux only: the agent sends sync faults' address and pointer tag (--no-fault-address)
                yield OnOffCheckbox("fault addresses", guest.get("fault_address", FAULT_ADDRESS_DEFAULT),
                                    id="fault_address", disabled=editing)
            yield from self._row("QEMU args", Input(shlex.join(qemu_args), id="qemu_args",
                                                    placeholder="-device ivshmem-plain,memdev=shm (shell quoting)",
                                                    compact=True), row_id="qemu-args-row")
            with Horizontal(classes="checks", id="host-files-row"):
                # QEMU runs as the user: QEMU args naming host files need this opt-in (as --allow-host-files)
                yield OnOffCheckbox("QEMU args may use host files", e.get("allow_host_files", False),
                                    id="allow_host_files", disabled=editing)
            with Horizontal(classes="checks"):
                yield OnOffCheckbox("MTE", cfg.get("mte", True), id="mte")
                yield OnOffCheckbox("secure", cfg.get("secure", False), id="secure")
                yield OnOffCheckbox("only-migratable", cfg.get("only_migratable", False), id="only_migratable")
            if editing:
                yield Static("A running VM takes these changes at its next start (pending), as MTE; "
                             "a simulated VM's TCF changes at once.", classes="hint")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)" if editing else "Create (ctrl+s)", id="submit", variant="primary",
                             compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield from screen_bottom()

    @staticmethod
    def _row(label: str, widget, row_id: str | None = None) -> ComposeResult:
        with Horizontal(classes="field", id=row_id):
            yield Label(label, classes="field-label")
            yield widget

    def on_mount(self) -> None:
        self.show_qemu_args(self.existing.get("host") if self.existing else None)
        self.initial = self.config() if self.existing else None   # what an edit compares against
        if self.existing:
            self.title = "Edit VM"
            self.sub_title = self.existing["name"]
            self.query_one("#tcf").focus()
        else:
            self.query_one("#name").focus()
            self.load_hosts()

    @work(exclusive=True, group="form-hosts")
    async def load_hosts(self) -> None:
        hosts = await self.app.client.hosts()
        self.host_kinds = {h["name"]: h.get("kind", "") for h in hosts}
        select = self.query_one("#host", Select)
        select.set_options([(h["name"], h["name"]) for h in hosts])
        names = [h["name"] for h in hosts]
        select.value = "sim-mte" if "sim-mte" in names else names[0]
        self.validate()

    # -- reading the form -------------------------------------------------------------------------
    def config(self) -> dict:
        """The create() request the form describes (FormError when a number is not a number)."""
        q = self.query_one
        cfg = {"name": q("#name", Input).value.strip(), "host": q("#host").value,
               "accel": q("#accel", Select).value, "vcpus": _int_field(q("#vcpus", Input).value, "vCPUs"),
               "memory": q("#memory", Input).value.strip() or None,
               "mte": q("#mte", Checkbox).value, "secure": q("#secure", Checkbox).value,
               "only_migratable": q("#only_migratable", Checkbox).value,
               "workload": {"seed": _int_field(q("#seed", Input).value, "seed"), "tcf": [q("#tcf", Select).value]}}
        cpu = q("#cpu", Input).value.strip()
        if cpu:
            cfg["cpu"] = cpu
        if self.takes_qemu_args(cfg["host"]):
            # the CLI's own --qemu-arg splitting (shell rules), so the form and `mtevm create` agree
            qemu_args = split_qemu_args([q("#qemu_args", Input).value])
            if qemu_args:
                cfg["qemu_args"] = qemu_args
            if q("#allow_host_files", Checkbox).value:
                cfg["allow_host_files"] = True
            guest = {"kind": q("#guest", Select).value}
            for key in ("kernel", "append"):
                value = q(f"#{key}", Input).value.strip()
                if value:
                    guest[key] = os.path.abspath(os.path.expanduser(value)) if key == "kernel" else value
            if guest["kind"] == "linux":      # explicit, as the daemon stores it
                guest["fault_address"] = q("#fault_address", Checkbox).value
            if guest != {"kind": "builtin"}:
                cfg["guest"] = guest
        return cfg

    def takes_qemu_args(self, host) -> bool:
        """Only a host that runs a real QEMU (kind ``local``) takes extra QEMU arguments."""
        return self.host_kinds.get(host) == "local" or (self.existing is not None and host == "local")

    def show_qemu_args(self, host) -> None:
        """The rows only a local host's VMs have: QEMU args, what the VM boots (its guest) and, for a
        linux guest, its fault-address switch."""
        for row in ("#qemu-args-row", "#host-files-row", "#guest-row", "#kernel-row", "#append-row"):
            self.query_one(row).display = self.takes_qemu_args(host)
        self.query_one("#fault-address-row").display = (self.takes_qemu_args(host)
                                                       and self.query_one("#guest", Select).value == "linux")

    def show_verdict(self, ok: bool, text: str, warnings: list[str] | None = None) -> None:
        """The verdict line: ✔ ok, ⚠ ok but cannot start on this host (QEMU's text), ✘ error."""
        warnings = list(warnings or []) if ok else []
        self.verdict = {"ok": ok, "error": None if ok else text, "warnings": warnings}
        box = self.query_one("#form-error", Static)
        box.set_class(not ok, "error")
        box.set_class(ok and not warnings, "ok")
        box.set_class(bool(warnings), "warning")
        if warnings:
            text = f"{'; '.join(warnings)} (it can be saved, but will not start on {self.host_name()})"
        box.update(Content(("⚠ " if warnings else "✔ " if ok else "✘ ") + text))

    def host_name(self) -> str:
        host = self.query_one("#host").value
        return host if isinstance(host, str) else "this host"

    # -- validation as you type -------------------------------------------------------------------
    def on_input_changed(self, event: Input.Changed) -> None:
        self.validate()

    def on_select_changed(self, event: Select.Changed) -> None:
        accel = self.query_one("#accel", Select)
        if event.select.id == "host":
            self.show_qemu_args(event.value)
        if event.select.id == "guest":      # the fault-address switch is a linux guest's
            self.show_qemu_args(self.query_one("#host").value)
        if event.select.id == "host" and event.value in self.host_kinds and accel.value == self.auto_accel:
            # the daemon's default, until the user picks one: KVM on the simulated arm64 hosts, TCG here
            self.auto_accel = "kvm" if self.host_kinds[event.value] == "simulated" else "tcg"
            accel.value = self.auto_accel
        self.validate()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.validate()

    @work(exclusive=True, group="form-validate")
    async def validate(self) -> None:
        await asyncio.sleep(VALIDATE_DELAY)      # a newer keystroke cancels this one (exclusive)
        if not self.is_current:                   # the form was closed meanwhile
            return
        try:
            try:
                cfg = self.config()
            except NoMatches:                     # closed while this ran: its fields are going away
                return
            if not cfg["name"]:
                raise FormError("name: give the VM a name")
            if cfg["host"] is Select.BLANK:
                raise FormError("host: loading hosts…")
            answer = await self.app.client.create(cfg, validate_only=True, existing=self.existing is not None)
        except (FormError, MtevmError) as e:      # MtevmError: the daemon's verdict, or unbalanced quotes
            self.show_verdict(False, str(e))
            return
        ready = "ready to save" if self.existing else "valid: ready to create"
        self.show_verdict(bool(answer.get("ok")), ready if answer.get("ok") else answer["error"],
                          answer.get("warnings"))

    # -- submit -----------------------------------------------------------------------------------
    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "submit":
            self.action_submit()
        else:
            self.dismiss()

    def action_submit(self) -> None:
        self.submit()

    @work(exclusive=True, group="form-submit")
    async def submit(self) -> None:
        client = self.app.client
        try:
            if self.existing:
                name = self.existing["name"]
                vm = await self.save_edit(client, name)
            else:
                vm = await client.create(self.config())
                name = vm["name"]
        except (FormError, MtevmError) as e:
            self.refused(str(e))
            return
        except Exception as e:                    # never silent, and no crash that loses the input
            self.log.error("submit failed", e)
            self.refused(f"not saved: {type(e).__name__}: {e}")
            return
        await self.app.refresh_model()
        done = f"VM {name!r} {'saved' if self.existing else 'created'}"
        if vm.get("warnings"):
            self.app.notify(f"{done}, but it cannot start on {vm.get('host')}: {'; '.join(vm['warnings'])}",
                            severity="warning", timeout=10)
        else:
            self.app.notify(done)
        self.dismiss()

    async def save_edit(self, client, name: str) -> dict:
        """Send what the user changed: ``edit`` (a running VM: pending until its next start), but a
        TCF change of a VM that can take it live (a simulated one) through ``set_tcf`` at once."""
        now, before = self.config(), self.initial
        changes = {k: now[k] for k in ("accel", "cpu", "vcpus", "memory", "mte", "secure", "only_migratable")
                   if now.get(k) != before.get(k)}
        if now.get("qemu_args", []) != before.get("qemu_args", []):
            changes["qemu_args"] = now.get("qemu_args", [])
        workload = {k: v for k, v in now["workload"].items() if v != before["workload"].get(k)}
        vm = self.existing
        if "tcf" in workload and self.existing.get("state") in ("running", "paused"):
            try:
                vm = await client.set_tcf(name, None, workload["tcf"][0])
                del workload["tcf"]
            except MtevmError:
                pass       # a real VM's TCF is a boot parameter: it becomes a pending change below
        if workload:
            changes["workload"] = workload
        if changes:
            vm = await client.edit(name, changes)
        return vm

    def refused(self, text: str) -> None:
        """ctrl+s did not save: say why on the verdict line and in a notification; keep the input."""
        self.show_verdict(False, text)
        self.app.notify(text, title="not saved", severity="error", timeout=10)

    def action_back(self) -> None:
        self.dismiss()


def _mem(value) -> str:
    if not value:
        return "256M"
    if isinstance(value, int) and value % (1 << 20) == 0:
        return f"{value >> 20}M"
    return str(value)
