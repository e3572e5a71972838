"""The CPU models a virt machine can use, and how much MTE each implements (ID_AA64PFR1_EL1.MTE).

Data, not code: 0 = no MTE, 2 = FEAT_MTE2 (full MTE, tag storage), 3 = FEAT_MTE3 (adds asymmetric
checking). QEMU gives a CPU the "tag-memory" link property only when it has MTE, which is what
machvirt_init tests before wiring up the tag RAM (see ../shared/reference/mte-facts.md section 6).
"""
from __future__ import annotations

from backend.errors import ConfigError

HOST_FOLLOWS_KVM = -1   # "host": the guest sees the host CPU, so MTE follows what the host's KVM offers

CPU_MODELS: dict[str, int] = {
    "max": 3,             # aarch64_max_initfn: ID_AA64PFR1.MTE = 3 (FEAT_MTE3)
    "cortex-a710": 2,     # ID_AA64PFR1 = 0x221 (QEMU 8.2)
    "neoverse-n2": 2,     # ID_AA64PFR1 = 0x221 (QEMU 8.2)
    "cortex-a35": 0,
    "cortex-a53": 0,
    "cortex-a55": 0,
    "cortex-a57": 0,
    "cortex-a72": 0,
    "cortex-a76": 0,
    "neoverse-n1": 0,     # ID_AA64PFR1 = 0x20
    "neoverse-v1": 0,     # ID_AA64PFR1 = 0x20 (QEMU 8.1)
    "a64fx": 0,
    "host": HOST_FOLLOWS_KVM,
}

# The first QEMU release that has a model (all others predate QEMU 7.2), for real-QEMU hosts.
CPU_SINCE_QEMU: dict[str, tuple[int, int]] = {
    "cortex-a710": (8, 2),
    "neoverse-n2": (8, 2),
    "neoverse-v1": (8, 1),
}

# The smallest ID_AA64PFR1.MTE level for which QEMU adds the CPU's "tag-memory" property (FEAT_MTE2).
TAG_MEMORY_MIN_LEVEL = 2


def known_cpu_models() -> str:
    """The model names for error messages, in table order."""
    return ", ".join(CPU_MODELS)


def cpu_mte_level(model: str) -> int:
    """The model's MTE level (0, 2, 3), or -1 for "host". Unknown models raise ConfigError."""
    try:
        return CPU_MODELS[model]
    except KeyError:
        raise ConfigError(f"unknown CPU model {model!r}: use one of {known_cpu_models()}") from None


def cpu_has_tag_memory(model: str) -> bool:
    """Whether QEMU's TCG CPU of this model offers the "tag-memory" link (i.e. can run with mte=on)."""
    return cpu_mte_level(model) >= TAG_MEMORY_MIN_LEVEL
