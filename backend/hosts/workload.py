"""Parameters of the guest workload: a tagged heap with injected memory-safety bugs.

The same parameters drive the simulated vCPUs (backend.hosts.sim) and the real bare-metal
guest (backend.qemu.guest, through its parameter block), so both report comparable counters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from backend.errors import ConfigError
from backend.jsonvalues import is_int, is_number

TCF_NAMES = ("none", "sync", "async", "asymm")


@dataclass
class WorkloadConfig:
    seed: int = 1
    tcf: list[str] = field(default_factory=lambda: ["sync"])  # per vCPU; the last entry repeats
    uaf_rate: float = 0.001       # probability that an access uses a freed object
    overflow_rate: float = 0.001  # probability that an access runs past its object
    wild_rate: float = 0.0005     # probability that an access uses a random-tag pointer
    rate: int = 20000             # checked accesses per second per vCPU; 0 = flat out
    heap_size: int = 1 << 20      # bytes of guest RAM the heap spans

    def tcf_for(self, vcpu: int) -> str:
        return self.tcf[min(vcpu, len(self.tcf) - 1)]

    def validate(self) -> None:
        if not self.tcf:
            raise ConfigError("workload tcf: give at least one mode (none, sync, async, asymm)")
        for t in self.tcf:
            if t not in TCF_NAMES:
                raise ConfigError(f"workload tcf: {t!r} is not one of none, sync, async, asymm")
        for name in ("uaf_rate", "overflow_rate", "wild_rate"):
            v = getattr(self, name)
            if not is_number(v) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"workload {name}: {v!r} is not a probability between 0 and 1")
        if not is_int(self.rate) or self.rate < 0:
            raise ConfigError(f"workload rate: {self.rate!r} is not a number of accesses per second >= 0")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"workload seed: {self.seed!r} is not an integer in 0..2^63-1")
        if not is_int(self.heap_size) or not 4096 <= self.heap_size <= 1 << 30 or self.heap_size % 4096:
            raise ConfigError(f"workload heap_size: {self.heap_size!r} is not a multiple of 4096 in 4K..1G")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "WorkloadConfig":
        if d is not None and not isinstance(d, dict):    # [] or "" is not "the defaults"
            raise ConfigError(f"workload must be a JSON object of parameters, not {type(d).__name__}")
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"workload: unknown parameter(s) {', '.join(sorted(unknown))}")
        if isinstance(d.get("tcf"), str):
            d["tcf"] = [t.strip() for t in d["tcf"].split(",")]
        w = cls(**d)
        w.validate()
        return w
