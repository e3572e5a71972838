"""The qemu-system-aarch64 command line for one VM, built as a list (never a shell string).

One function owns the argv so that a VM, its migration destination (the same argv plus
``-incoming``) and the start-up benchmark all run exactly the same QEMU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

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


def validate_extra_args(extra_args: Sequence[str] | None) -> list[str]:
    """Check user-supplied extra QEMU arguments: pairs of ``-object``/``-device`` and a value."""
    if extra_args is None:
        return []
    if isinstance(extra_args, str) or not isinstance(extra_args, (list, tuple)):
        raise ConfigError("extra_args: give a list of arguments, e.g. [\"-device\", \"ivshmem-plain,memdev=shm\"]")
    args = list(extra_args)
    if len(args) % 2:
        raise ConfigError(f"extra_args: {args[-1]!r} has no value (give option/value pairs)")
    for opt, value in zip(args[0::2], args[1::2]):
        if opt not in EXTRA_OPTIONS:
            raise ConfigError(f"extra_args: {opt!r} is not allowed (only {', '.join(EXTRA_OPTIONS)})")
        if not isinstance(value, str) or not value or value.startswith("-") or any(
                c in value for c in "\0\n"):
            raise ConfigError(f"extra_args: {opt} needs a value like 'driver,prop=value', got {value!r}")
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
        argv += ["-drive", f"file={quote_option(path)},format={fmt},if=none,id=disk{i}",
                 "-device", f"virtio-blk-device,drive=disk{i}"]
    return argv


def build_argv(config: "VirtMachineConfig", files: LaunchFiles, *, qemu: str = QEMU_BINARY,
               extra_args: Sequence[str] = (), incoming: str | None = None) -> list[str]:
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
    argv += validate_extra_args(extra_args)
    if incoming:
        argv += ["-incoming", incoming]
    return argv
