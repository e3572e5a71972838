"""What a local VM boots: its guest (``builtin``, ``linux`` or ``custom``), part of its definition.

- ``builtin``: mtevm's bare-metal test program (backend/qemu/guest), the default;
- ``linux``: mtevm's Linux MTE guest image (``mtevm image build linux``: kernel, initramfs with the
  agent, the workload, ``mte-faults`` and the kernel's MTE selftests);
- ``custom``: the user's own arm64 kernel ``Image`` (``--kernel``), optionally an initrd, a
  kernel command line and disks (raw or qcow2, on virtio-blk).

Files are checked when the definition is made and again at each start (a file may have gone
since), with errors that say what is wrong and how to fix it. Paths are stored absolute: the
daemon does not share the CLI's working directory.

Fault addresses (``fault_address``, linux only) are **on** by default: the agent reads them from
the SIGSEGV's ``si_addr`` in its BPF program, so they cost no more per fault than counting without
them (benchmarks/bench_linux_guest.py). A linux definition is stored with the key explicit (true or
false), so it keeps its meaning if the default changes again. A linux definition stored before
addresses were on by default has no key: it takes the default (on), like a new VM. Those VMs
were made when the off default was the only cheap choice, not because their users asked for
fewer facts; ``--no-fault-address`` at create turns addresses off. (Should the default ever go
back to off, give the stored rows without the key an upgrade step in backend/store.py first.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from backend.errors import ConfigError

GUEST_KINDS = ("builtin", "linux", "custom")
DEFAULT_GUEST = "builtin"
# Documentation/arch/arm64/booting.rst: the Image header's magic "ARM\x64" at offset 56.
ARM64_IMAGE_MAGIC = b"ARM\x64"
ARM64_IMAGE_MAGIC_OFFSET = 56
QCOW2_MAGIC = b"QFI\xfb"
MAX_DISKS = 8
MAX_APPEND = 2048           # COMMAND_LINE_SIZE on arm64
FAULT_ADDRESS_DEFAULT = True   # linux guests: sync faults' address + pointer tag unless --no-fault-address


def _readable(path: str, what: str) -> str:
    """The absolute path of a readable regular file, else ConfigError naming the file and the problem."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what}: give a file name")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror})") from None
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path}: not a regular file")
    return path


def check_arm64_image(path: str) -> None:
    """Refuse anything that is not a raw arm64 kernel Image (gzip'd vmlinuz, an ELF vmlinux, x86 ...)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[ARM64_IMAGE_MAGIC_OFFSET:ARM64_IMAGE_MAGIC_OFFSET + 4] != ARM64_IMAGE_MAGIC:
        hint = ""
        if head[:2] == b"\x1f\x8b":
            hint = " (it is gzip-compressed: give the uncompressed Image, e.g. `zcat vmlinuz > Image`)"
        elif head[:4] == b"\x7fELF":
            hint = " (it is an ELF file such as vmlinux: give arch/arm64/boot/Image)"
        raise ConfigError(f"kernel {path}: not an arm64 kernel Image (no 'ARMd' magic at offset "
                          f"{ARM64_IMAGE_MAGIC_OFFSET}){hint}")


def disk_format(path: str) -> str:
    """``qcow2`` if the file starts with qcow2's magic, else ``raw``."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


@dataclass
class GuestConfig:
    """The guest of one VM. Only ``custom`` takes a kernel and an initrd; ``linux`` and ``custom``
    take extra kernel arguments (``append``) and disks; ``builtin`` takes nothing."""

    kind: str = DEFAULT_GUEST
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: list[str] = field(default_factory=list)
    # linux: the agent sends sync faults' address + pointer tag, and more events. None (not given):
    # the kind's default, FAULT_ADDRESS_DEFAULT for linux, off for the guests without an agent.
    fault_address: bool | None = None

    def __post_init__(self) -> None:
        if self.fault_address is None:
            self.fault_address = FAULT_ADDRESS_DEFAULT if self.kind == "linux" else False

    @property
    def has_agent(self) -> bool:
        """Only mtevm's Linux image runs the mtevm agent (exec, selftests, guest-wide fault counters)."""
        return self.kind == "linux"

    def validate(self, check_files: bool = True) -> "GuestConfig":
        """Check the definition (and, with ``check_files``, that its files are there and usable);
        returns self with paths made absolute."""
        if self.kind not in GUEST_KINDS:
            raise ConfigError(f"guest {self.kind!r} is not one of {', '.join(GUEST_KINDS)}")
        if self.kind != "custom":
            for opt, value in (("--kernel", self.kernel), ("--initrd", self.initrd)):
                if value:
                    raise ConfigError(f"{opt} is only for --guest custom (the {self.kind} guest brings its own)")
        if self.kind == "builtin" and (self.append or self.disks):
            raise ConfigError("--append and --disk need a Linux guest (--guest linux or custom); "
                              "the builtin guest is a bare-metal program with no kernel command line or disks")
        if not isinstance(self.fault_address, bool):
            raise ConfigError(f"fault_address must be true or false, not {self.fault_address!r}")
        if self.fault_address and self.kind != "linux":   # off is what builtin/custom have anyway: fine
            raise ConfigError("--fault-address needs --guest linux (the mtevm agent reports the addresses)")
        if self.kind == "custom" and not self.kernel:
            raise ConfigError("--guest custom needs --kernel IMAGE (a raw arm64 kernel Image)")
        if self.append is not None:
            if not isinstance(self.append, str) or any(c in self.append for c in "\0\n"):
                raise ConfigError("--append: give the kernel command line as one line of text")
            if len(self.append) > MAX_APPEND:
                raise ConfigError(f"--append: {len(self.append)} characters, more than the kernel's {MAX_APPEND}")
        if not isinstance(self.disks, list) or len(self.disks) > MAX_DISKS:
            raise ConfigError(f"--disk: give at most {MAX_DISKS} disk files")
        if check_files:
            if self.kernel:
                self.kernel = _readable(self.kernel, "kernel")
                check_arm64_image(self.kernel)
            if self.initrd:
                self.initrd = _readable(self.initrd, "initrd")
            self.disks = [_readable(d, "disk") for d in self.disks]
            for d in self.disks:
                if not os.access(d, os.W_OK):
                    raise ConfigError(f"disk {d}: not writable by you (QEMU opens disks read-write)")
        return self

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind}
        for key in ("kernel", "initrd", "append"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.disks:
            d["disks"] = list(self.disks)
        if self.kind == "linux":        # explicit: a stored definition keeps its meaning (module docstring)
            d["fault_address"] = self.fault_address
        return d

    @classmethod
    def from_dict(cls, d: dict | str | None) -> "GuestConfig":
        """From the stored/wire form; a plain string is the kind (``"linux"``). Files are not checked."""
        if d is None or d == {}:
            return cls()
        if isinstance(d, str):
            d = {"kind": d}
        if not isinstance(d, dict):
            raise ConfigError(f"guest must be one of {', '.join(GUEST_KINDS)} or an object, not {d!r}")
        unknown = set(d) - {"kind", "kernel", "initrd", "append", "disks", "fault_address"}
        if unknown:
            raise ConfigError(f"guest: unknown setting(s) {', '.join(sorted(unknown))} "
                              "(known: kind, kernel, initrd, append, disks, fault_address)")
        disks = d.get("disks") or []
        if isinstance(disks, str) or not isinstance(disks, list) or not all(isinstance(x, str) for x in disks):
            raise ConfigError("guest disks: give a list of file names")
        for key in ("kernel", "initrd", "append"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ConfigError(f"guest {key}: give a string, not {d[key]!r}")
        g = cls(kind=d.get("kind") or DEFAULT_GUEST, kernel=d.get("kernel") or None, initrd=d.get("initrd") or None,
                append=d.get("append"), disks=list(disks), fault_address=d.get("fault_address"))
        g.validate(check_files=False)
        return g

    def describe(self) -> str:
        """One line for people: ``linux (mtevm image)``, ``custom: /k/Image, initrd ..., 1 disk``."""
        if self.kind == "builtin":
            return "builtin (mtevm's bare-metal test program)"
        parts = ["linux (mtevm's Linux MTE image)" if self.kind == "linux" else f"custom: kernel {self.kernel}"]
        if self.initrd:
            parts.append(f"initrd {self.initrd}")
        if self.append:
            parts.append(f"append {self.append!r}")
        if self.disks:
            parts.append("disks " + ", ".join(self.disks))
        return ", ".join(parts)
