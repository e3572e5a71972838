"""The qemu-system-aarch64 command line for one VM, built as a list (never a shell string).

One function owns the argv so that a VM, its migration destination (the same argv plus
``-incoming``) and the start-up benchmark all run exactly the same QEMU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from backend.errors import ConfigError, RealizeError

if TYPE_CHECKING:
    from backend.machine import VirtMachineConfig

QEMU_BINARY = "qemu-system-aarch64"
MIB = 1 << 20

# Options a user may add to a real VM (e.g. an ivshmem device that blocks migration).
# Everything that decides how mtevm talks to QEMU (-qmp, -incoming, -kernel, -daemonize ...)
# stays mtevm's, so extra arguments cannot break the driver.
EXTRA_OPTIONS = ("-object", "-device")


def find_qemu(binary: str | None = None) -> str:
    """The QEMU binary to run (as the probe finds it: argument, $MTEVM_QEMU, PATH), or
    RealizeError telling the user how to install it."""
    from backend.machine.probe import find_qemu as probe_find_qemu
    path = probe_find_qemu(binary)
    if path is None:
        raise RealizeError(f"{binary or QEMU_BINARY} not found: install QEMU >= 8.0 with "
                           "`bash scripts/install-deps.sh` (see docs/real-vms.md)")
    return path


# Properties of -object/-device values that make QEMU open a file, directory, socket or device of
# the host by name (found with `qemu-system-aarch64 -object TYPE,help` / `-device DRIVER,help`).
# QEMU runs as the user, so each could read or overwrite any file the user can: refused unless the
# VM opts in with allow_host_files (`mtevm create --allow-host-files`).
HOST_FILE_PROPERTIES = {
    "mem-path": "host file",      # memory-backend-file: mapped (share=on: written) and grown
    "file": "host file",          # loader, secret: read; filter-dump: written
    "filename": "host file",      # rng-random, authz-list-file: read
    "dir": "host directory",      # tls-creds-*, tls-cipher-suites: certificates and keys read
    "evdev": "host device",       # input-linux, virtio-input-host: grabbed
    "path": "host socket",        # pr-manager-helper: connected to
    "log": "host file",           # qtest: written
    "romfile": "host file",       # any PCI device: its option ROM is read (romfile= empty: no ROM)
    "kernel": "host file", "initrd": "host file",     # guest-loader: read
    "jsonfile": "host file",      # uefi-vars: read and written
    "rootdir": "host directory",  # usb-mtp: exported to the guest
    "pcap": "host file",          # USB devices: traffic written
    "cdat": "host file",          # CXL devices: read
    "hostdevice": "host device", "hostport": "host device",   # usb-host
    "hidraw": "host device",      # u2f-passthru
    "sysfsdev": "host device", "vhostdev": "host device",     # VFIO, vhost-vdpa
    "db": "host directory", "cert1": "host file", "cert2": "host file", "cert3": "host file",  # ccid-card-emulated
    "fd": "file descriptor", "vhostfd": "file descriptor",
}
# Types that open host devices or files whatever their properties say.
HOST_FILE_TYPES = {"memory-backend-file", "usb-host", "iommufd", "input-linux", "u2f-passthru", "usb-mtp"}
HOST_FILE_TYPE_PREFIXES = ("vfio-", "vhost-vdpa", "virtio-input-host")
# Property name fragments that always mean a host path (catches properties added by later QEMUs).
_PATH_WORDS = ("file", "path")
# Properties that are host paths only for some types.
_TYPED_PROPERTIES = {("dbus-vmstate", "addr"): "host socket", ("vfio", "host"): "host device"}

def split_option(value: str) -> tuple[str, list[tuple[str, str]]]:
    """QEMU's ``type,key=value,...`` (``,,`` is a literal comma) or its JSON form -> (type, items).

    The type is the implied first word (``-device loader,...``) or ``driver``/``qom-type``; item keys
    keep QEMU's dotted form (``a.b.file``) and JSON values are flattened the same way.
    """
    if value.lstrip().startswith("{"):
        try:
            tree = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"qemu_args: {value!r} is not valid JSON: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"qemu_args: {value!r} must be a JSON object")
        items = list(_flatten(tree, ""))
        return str(tree.get("qom-type") or tree.get("driver") or ""), items
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    kind = ""
    items = []
    for n, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if not eq and n == 0:
            kind = part
        elif key in ("driver", "qom-type"):
            kind = val
        else:
            items.append((key, val if eq else "on"))
    return kind, items


def _flatten(tree, prefix: str) -> Iterator[tuple[str, str]]:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, val in items:
        name = f"{prefix}{key}"
        if isinstance(val, (dict, list)):
            yield from _flatten(val, name + ".")
        else:
            yield name, "" if val is None else str(val)


def host_file_uses(value: str) -> list[str]:
    """What in the -object/-device ``value`` makes QEMU open something of the host by name ([] when
    nothing does), e.g. ``["mem-path=/dev/shm/x (a host file)"]``."""
    kind, items = split_option(value)
    found = []
    for key, val in items:
        prop = key.rsplit(".", 1)[-1]
        what = HOST_FILE_PROPERTIES.get(prop) or next(
            (w for (t, p), w in _TYPED_PROPERTIES.items() if p == prop and kind.startswith(t)), None)
        if what is None and any(word in prop for word in _PATH_WORDS):
            what = "host file"
        if what is not None and not (prop == "romfile" and val == ""):     # romfile= means no ROM
            found.append(f"{key}={val} (a {what})")
    if not found and (kind in HOST_FILE_TYPES or kind.startswith(HOST_FILE_TYPE_PREFIXES)):
        found.append(f"{kind} (opens host files or devices)")
    return found


def validate_extra_args(extra_args: Sequence[str] | None, *, allow_host_files: bool = False) -> list[str]:
    """Check user-supplied extra QEMU arguments: pairs of ``-object``/``-device`` and a value, none
    naming a host file unless ``allow_host_files`` (see HOST_FILE_PROPERTIES)."""
    if extra_args is None:
        return []
    if isinstance(extra_args, str) or not isinstance(extra_args, (list, tuple)):
        raise ConfigError("qemu_args: give a list of arguments, e.g. [\"-device\", \"ivshmem-plain,memdev=shm\"]")
    args = list(extra_args)
    if len(args) % 2:
        raise ConfigError(f"qemu_args: {args[-1]!r} has no value (give option/value pairs)")
    for opt, value in zip(args[0::2], args[1::2]):
        if opt not in EXTRA_OPTIONS:
            raise ConfigError(f"qemu_args: {opt!r} is not allowed (only {', '.join(EXTRA_OPTIONS)})")
        if not isinstance(value, str) or not value or value.startswith("-") or any(
                c in value for c in "\0\n"):
            raise ConfigError(f"qemu_args: {opt} needs a value like 'driver,prop=value', got {value!r}")
        uses = host_file_uses(value)
        if uses and not allow_host_files:
            raise ConfigError(f"qemu_args: {opt} {value} makes QEMU open a file or device of this host: "
                              f"{'; '.join(uses)}. QEMU runs as you and could read or overwrite any file "
                              "you can; if that is what you want, create the VM with --allow-host-files")
    return args


def quote_option(value: str) -> str:
    """A path inside a QEMU ``key=value,...`` option: commas are doubled, as QEMU expects."""
    return value.replace(",", ",,")


def format_memory(size: int) -> str:
    """QEMU's -m syntax: whole MiB as ``256M``, anything else in bytes."""
    return f"{size // MIB}M" if size % MIB == 0 else f"{size}B"


@dataclass(frozen=True)
class LaunchFiles:
    """The per-QEMU files the argv names (all in the VM's runtime directory)."""

    qmp_socket: str
    kernel: str | None = None          # the guest ELF; None runs QEMU with no guest (tests, benchmarks)
    params_file: str | None = None     # the guest's parameter block, loaded at param_addr
    param_addr: int = 0
    serial_socket: str | None = None   # the PL011 serial console, a Unix socket QEMU listens on
    agent_socket: str | None = None    # the mtevm agent's virtio-serial port (Linux guest)
    initrd: str | None = None          # Linux guests: -initrd
    append: str | None = None          # Linux guests: the kernel command line
    disks: tuple[tuple[str, str], ...] = ()   # (path, "raw" | "qcow2"), each on virtio-blk


AGENT_PORT = "org.mtevm.agent.0"       # docs/agent-protocol.md


def drive_id(index: int) -> str:
    """The QEMU drive (BlockBackend) id of a guest's disk ``index``: what QMP block commands name."""
    return f"disk{index}"


def chardev_socket(chardev_id: str, path: str) -> list[str]:
    """A chardev QEMU serves on a Unix socket; it drops output while no client is connected
    (wait=off: the guest never blocks on a missing reader)."""
    return ["-chardev", f"socket,id={chardev_id},path={quote_option(path)},server=on,wait=off"]


def guest_devices(files: LaunchFiles) -> list[str]:
    """The console, agent channel, initrd, command line and disks of ``files`` (empty for a bare
    QEMU). Virtio devices are virtio-mmio ones (``-device virtio-*-device``): the Linux guest
    loads virtio_mmio.ko, and every arm64 kernel has it."""
    argv: list[str] = []
    if files.initrd:
        argv += ["-initrd", files.initrd]
    if files.append:
        argv += ["-append", files.append]
    if files.serial_socket:
        argv += chardev_socket("serial0", files.serial_socket) + ["-serial", "chardev:serial0"]
    if files.agent_socket:
        argv += chardev_socket("agent", files.agent_socket) + [
            "-device", "virtio-serial-device",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"]
    for i, (path, fmt) in enumerate(files.disks):
        argv += ["-drive", f"file={quote_option(path)},format={fmt},if=none,id={drive_id(i)}",
                 "-device", f"virtio-blk-device,drive={drive_id(i)}"]
    return argv


def build_argv(config: "VirtMachineConfig", files: LaunchFiles, *, qemu: str = QEMU_BINARY,
               extra_args: Sequence[str] = (), incoming: str | None = None,
               allow_host_files: bool = False) -> list[str]:
    """The argv for ``config``: virt with MTE, TCG (or KVM with ``-cpu host``), QMP on a Unix socket.

    ``-nodefaults`` and ``-nic none``: no default devices at all, in particular no default NIC
    (Debian's arm64 QEMU lacks the ``efi-virtio.rom`` it wants and would exit at once)."""
    machine = "virt,mte=" + ("on" if config.mte else "off")
    if config.secure:
        machine += ",secure=on"
    argv = [qemu, "-M", machine, "-cpu", config.cpu, "-accel", config.accel,
            "-nodefaults", "-nic", "none", "-display", "none",
            "-smp", str(config.vcpus), "-m", format_memory(config.memory)]
    if files.kernel:
        argv += ["-kernel", files.kernel]   # a plain path, not an option list
    argv += ["-qmp", f"unix:{quote_option(files.qmp_socket)},server=on,wait=off"]
    if files.params_file:
        argv += ["-device", f"loader,file={quote_option(files.params_file)},addr={files.param_addr:#x},force-raw=on"]
    argv += guest_devices(files)
    if config.only_migratable:
        argv.append("-only-migratable")
    argv += validate_extra_args(extra_args, allow_host_files=allow_host_files)
    if incoming:
        argv += ["-incoming", incoming]
    return argv
