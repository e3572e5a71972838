"""VirtMachineConfig: what a user asks for when defining an Arm64 virt machine, validated up front.

Validation here catches what is wrong with the definition itself (a bad name, an impossible vCPU
count, a size that is not a size). Whether the machine can actually be built on a given host (MTE
with this CPU, this accelerator, this KVM) is decided later by realize(), with QEMU's messages.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from backend.errors import ConfigError
from backend.machine.cpu_models import HOST_FOLLOWS_KVM, cpu_mte_level

MIB = 1 << 20
NAME_RULE = "1-32 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}\Z")
_ACCEL_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")

MAX_VCPUS = 512            # virt with GICv3 (the GICv3 redistributor regions hold 512 vCPUs)
MIN_MEMORY = 32 * MIB      # enough for firmware/kernel; QEMU itself would accept less
MAX_MEMORY = 1 << 40       # 1 TiB: mtevm's limit for one virt machine
MEMORY_ALIGN = 4096        # guest RAM is made of 4 KiB pages

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*\Z", re.IGNORECASE)


def parse_size(value: str | int, what: str = "memory") -> int:
    """A size in bytes from an int or a string such as "512M", "1G", "1.5G", "2TiB" (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a size: use a number with K, M, G or T, e.g. 512M")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} {value} is not a size: it is negative")
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{what} {value!r} is not a size: use a number with K, M, G or T, e.g. 512M")
    number, unit = m.group(1), m.group(2).upper()
    scale = _UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * scale
        denominator = 10 ** len(frac)
        if numerator % denominator:
            raise ConfigError(f"{what} {value!r} is not a whole number of bytes")
        return numerator // denominator
    return int(number) * scale


def format_size(n: int) -> str:
    """The shortest exact form ("256M", "1536M", "1T"); sizes that are not a whole unit get one decimal."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}"
    return str(n)


@dataclass
class VirtMachineConfig:
    """One virt machine's definition. ``memory`` is in bytes."""

    name: str
    vcpus: int = 2
    memory: int = 256 * MIB
    cpu: str = "max"
    accel: str = "tcg"            # "kvm", "tcg", or any other QEMU accelerator name (e.g. "hvf")
    mte: bool = True
    secure: bool = False
    only_migratable: bool = False

    def validate(self) -> None:
        """Raise ConfigError with a message that says what is allowed."""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"name {self.name!r} is not valid: use {NAME_RULE}")
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool):
            raise ConfigError(f"vcpus {self.vcpus!r} is not a whole number: use 1 to {MAX_VCPUS}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus {self.vcpus} is out of range: a virt machine has 1 to {MAX_VCPUS} "
                              f"vCPUs (the limit with GICv3)")
        memory = parse_size(self.memory)
        if memory < MIN_MEMORY:
            raise ConfigError(f"memory {format_size(memory)} is too small: use at least {format_size(MIN_MEMORY)}")
        if memory > MAX_MEMORY:
            raise ConfigError(f"memory {format_size(memory)} is too large: use at most {format_size(MAX_MEMORY)}")
        if memory % MEMORY_ALIGN:
            raise ConfigError(f"memory {memory} is not a whole number of 4K pages: e.g. use "
                              f"{format_size(memory - memory % MIB or MIB)}")
        mte_level = cpu_mte_level(self.cpu)          # ConfigError for an unknown model
        if not isinstance(self.accel, str) or not _ACCEL_RE.match(self.accel):
            raise ConfigError(f"accel {self.accel!r} is not an accelerator name: use kvm or tcg")
        if mte_level == HOST_FOLLOWS_KVM and self.accel not in ("kvm", "hvf"):
            # QEMU's own text (target/arm/cpu64.c, aarch64_host_initfn / the "host" type check).
            raise ConfigError("The 'host' CPU type can only be used with KVM or HVF")
        for flag in ("mte", "secure", "only_migratable"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} {getattr(self, flag)!r} is not true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VirtMachineConfig":
        """Build and validate a config from JSON-like data; memory may be "256M", "1G" or bytes."""
        if not isinstance(d, dict):
            raise ConfigError(f"a machine definition must be a mapping, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}: "
                              f"use {', '.join(f.name for f in fields(cls))}")
        if "name" not in d:
            raise ConfigError(f"a machine needs a name: {NAME_RULE}")
        d = dict(d)
        if "memory" in d:
            d["memory"] = parse_size(d["memory"])
        config = cls(**d)
        config.validate()
        return config
