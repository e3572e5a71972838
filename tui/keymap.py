"""Every key binding of the app, as data.

Each action has a stable binding id; users remap it in config.toml (``[keymap] vm_start = "S"``)
and the app applies that with Textual's ``App.set_keymap``. The same id is used on every screen
that offers the action, so one remapping changes it everywhere. The command palette and the help
screen are built from this table, so nothing can be bound without being listed.
"""
from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class KeySpec:
    id: str            # the binding id users put in [keymap]
    key: str           # default key(s), Textual syntax, comma-separated
    action: str        # Textual action name on the screen/app that owns it
    description: str   # short footer label
    help: str          # one line for the help screen and the command palette
    show: bool = True  # shown in the footer (at 80 columns only the main keys fit; the rest are in
                       # the help screen, the command palette and the VM list's hint line)


APP_KEYS = [
    KeySpec("app_help", "question_mark", "help", "help", "Show every key and what it does"),
    KeySpec("app_commands", "ctrl+p,colon", "command_palette", "cmds", "Open the command palette",
            show=False),   # the footer shows it on its right edge
    KeySpec("app_hosts", "h", "hosts", "hosts", "Hosts and their MTE capability probe", show=False),
    KeySpec("app_migrations", "M", "migrations", "migrations", "Migrations: blocked, running, done, failed",
            show=False),
    KeySpec("app_vms", "v", "vms", "VMs", "The list of VMs", show=False),
    KeySpec("app_faster", "plus", "rate_faster", "faster", "Refresh live counters twice as often", show=False),
    KeySpec("app_slower", "minus", "rate_slower", "slower", "Refresh live counters half as often", show=False),
    KeySpec("app_quit", "q", "quit", "quit", "Quit the app (VMs keep running in the daemon)"),
]

VM_KEYS = [
    KeySpec("vm_new", "n", "new_vm", "new", "Create a VM"),
    KeySpec("vm_start", "s", "start_vm", "start", "Start the VM(s)"),
    KeySpec("vm_stop", "x", "stop_vm", "stop", "Stop the VM(s) (asks first)"),
    KeySpec("vm_delete", "d", "delete_vm", "delete", "Delete the VM(s) (asks first)", show=False),
    KeySpec("vm_toggle_mte", "m", "toggle_mte", "MTE", "Toggle MTE (pending until restart if running)"),
    KeySpec("vm_migrate", "g", "migrate_vm", "migrate", "Migrate the VM to another host"),
    KeySpec("vm_edit", "e", "edit_vm", "edit", "Edit the VM's definition", show=False),
    # the everyday operations (backend.daemon.vm_operations)
    KeySpec("vm_pause", "p", "pause_vm", "pause", "Pause the VM(s) (QMP stop), or resume them if paused",
            show=False),
    KeySpec("vm_reboot", "R", "reboot_vm", "reboot", "Reboot the VM(s): the guest agent's, else a reset (asks first)",
            show=False),
    KeySpec("vm_shutdown", "X", "shutdown_vm", "shutdown", "Shut the VM(s) down gracefully, else stop (asks first)",
            show=False),
    KeySpec("vm_clone", "C", "clone_vm", "clone", "Clone the VM's definition to a new stopped VM", show=False),
    KeySpec("vm_snapshots", "S", "snapshots", "snapshots", "The VM's snapshots: save, restore, delete", show=False),
]

SNAPSHOT_KEYS = [   # the snapshots screen of one VM
    KeySpec("snapshot_save", "s", "save_snapshot", "save", "Save a snapshot: the VM's whole state, MTE tags too"),
    KeySpec("snapshot_restore", "r", "restore_snapshot", "restore", "Restore the selected snapshot (asks first)"),
    KeySpec("snapshot_delete", "d", "delete_snapshot", "delete", "Delete the selected snapshot (asks first)"),
]

MIGRATION_KEYS = [  # the migrations screen
    KeySpec("migration_cancel", "c", "cancel_migration", "cancel",
            "Cancel the selected running migration; the VM stays (asks first)"),
]

GUEST_KEYS = [   # the VM detail screen of a local VM (serial console, Linux guests)
    KeySpec("vm_console", "c", "console", "console",
            "Attach to the VM's serial console (the app comes back on ctrl+])", show=False),
    KeySpec("vm_selftests", "t", "selftests", "selftests",
            "Run the kernel's MTE selftests in the VM's Linux guest", show=False),
]

LIST_KEYS = [
    KeySpec("vm_open", "enter", "open_vm", "open", "Open the VM's detail", show=False),
    KeySpec("vm_filter", "slash", "filter", "filter", "Filter the list by name, host or state"),
    KeySpec("vm_sort", "o", "sort", "sort", "Cycle the sort column", show=False),
    KeySpec("vm_select", "space", "select", "select", "Select / unselect the VM for bulk start/stop", show=False),
]

FORM_KEYS = [
    KeySpec("form_submit", "ctrl+s", "submit", "save", "Create the VM / apply the form"),
]

CONFIRM_KEYS = [   # the yes/no question before stop and delete
    KeySpec("confirm_yes", "y", "answer(True)", "yes", "Answer yes to a stop/delete question"),
    KeySpec("confirm_no", "n,escape", "answer(False)", "no", "Answer no to a stop/delete question"),
]

BACK_KEYS = [
    KeySpec("back", "escape", "back", "back", "Go back"),
]

ALL_KEYS: list[KeySpec] = (APP_KEYS + VM_KEYS + GUEST_KEYS + LIST_KEYS + FORM_KEYS + CONFIRM_KEYS + BACK_KEYS
                           + SNAPSHOT_KEYS + MIGRATION_KEYS)
BINDING_IDS = frozenset(k.id for k in ALL_KEYS)


def bindings(*groups: list[KeySpec], hide: tuple[str, ...] = ()) -> list[Binding]:
    """Textual Bindings (with ids) for the given groups of the table; ``hide``: ids kept out of the footer."""
    return [Binding(k.key, k.action, k.description, show=k.show and k.id not in hide, id=k.id, tooltip=k.help)
            for group in groups for k in group]


def check_keymap(keymap: dict[str, str]) -> None:
    """Reject binding ids the app does not have, so a typo in config.toml is not silently ignored."""
    from backend.errors import ConfigError
    unknown = sorted(set(keymap) - BINDING_IDS)
    if unknown:
        raise ConfigError(f"keymap: unknown binding id(s) {', '.join(unknown)}; "
                          f"known ids: {', '.join(sorted(BINDING_IDS))}")


def display_key(spec: KeySpec, keymap: dict[str, str]) -> str:
    """The key a user presses for ``spec`` after their remapping, as shown in help and palette."""
    keys = keymap.get(spec.id, spec.key)
    names = {"question_mark": "?", "slash": "/", "colon": ":", "space": "space", "escape": "esc",
             "plus": "+", "minus": "-"}
    return ", ".join(names.get(k.strip(), k.strip()) for k in keys.split(","))
