"""What the app knows between events: the VMs, their counter samples and rates, migrations.

The app feeds every event from ``client.events(rate_hz)`` into one ``LiveModel`` and then posts
a message to the screens; screens read what they show from here. Rates (accesses and faults per
second) are derived from consecutive samples using the samples' own timestamps, so a late
sample does not make a spike, and short histories feed the sparklines.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from textual.message import Message

HISTORY = 60          # samples kept for a sparkline
RATE_WINDOW = 1.0     # seconds of samples a rate is computed over
LIVE_STATES = ("running", "migrating", "paused")   # these VMs have vCPUs, counters and rates
BIG_FLEET = 100       # VMs: above this the feed carries per-vCPU figures only for the VM on screen,
                      # and the list hears of new samples once per tick (CountersBatch), not per VM


def is_live(vm: dict | None) -> bool:
    """Whether ``vm`` (a summary) has live figures at all: a stopped or crashed VM has no vCPUs,
    no kvm_mte flag and no faults/s, whatever was sampled before it stopped."""
    return vm is not None and vm.get("state") in LIVE_STATES


def faults_of(c: dict) -> int:
    return int(c.get("sync_faults", 0)) + int(c.get("async_faults", 0))


def mte_at_next_start(vm: dict) -> bool | None:
    """The MTE setting a VM (summary or definition) will have when it next starts: its pending
    change if a running VM has one, else what it has now."""
    return (vm.get("pending") or {}).get("mte", vm.get("mte"))


@dataclass
class Rates:
    """Per-second rates of one counter set over the last ``RATE_WINDOW`` seconds, plus the faults/s history.

    A window rather than the last two samples: the simulated vCPUs run in ticks of their own, so
    two samples close together may straddle zero or two ticks and a per-sample rate would flicker.
    """

    checked_per_s: float = 0.0
    faults_per_s: float = 0.0
    faults_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    _samples: deque = field(default_factory=deque)     # (time, checked, faults), oldest first

    def add(self, t: float, counters: dict) -> None:
        checked, faults = int(counters.get("checked", 0)), faults_of(counters)
        if self._samples and (checked < self._samples[-1][1] or faults < self._samples[-1][2]):
            self._samples.clear()                      # the VM restarted: counters began again
            self.checked_per_s = self.faults_per_s = 0.0
        if self._samples and t <= self._samples[-1][0]:
            return                                     # a repeated or late sample adds nothing
        self._samples.append((t, checked, faults))
        while len(self._samples) > 2 and t - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        if len(self._samples) >= 2:
            t0, c0, f0 = self._samples[0]
            self.checked_per_s = (checked - c0) / (t - t0)
            self.faults_per_s = (faults - f0) / (t - t0)
            self.faults_history.append(self.faults_per_s)


@dataclass
class VmLive:
    """Everything live about one VM: its last counters sample and rates (VM total and per vCPU)."""

    counters: dict | None = None
    vm_rates: Rates = field(default_factory=Rates)
    vcpu_rates: dict[int, Rates] = field(default_factory=dict)

    def add_sample(self, counters: dict) -> None:
        t = float(counters.get("time", 0.0))
        self.counters = counters
        self.vm_rates.add(t, counters.get("vm", {}))
        for v in counters.get("vcpus", []):
            self.vcpu_rates.setdefault(int(v["index"]), Rates()).add(t, v)


class LiveModel:
    """The app's picture of the daemon, kept current by events."""

    def __init__(self) -> None:
        self.vms: dict[str, dict] = {}           # name -> VmSummary
        self.live: dict[str, VmLive] = {}        # name -> counters + rates
        self.migrations: dict[int, dict] = {}    # id -> Migration

    def vm_live(self, name: str) -> VmLive:
        live = self.live.get(name)
        if live is None:               # not setdefault: a VmLive per sample (4,000/s) is not free
            live = self.live[name] = VmLive()
        return live

    def set_vms(self, summaries: list[dict]) -> None:
        self.vms = {s["name"]: s for s in summaries}
        self._forget_stale()

    def _forget_stale(self) -> None:
        """Live figures exist only for live VMs: the one rule every screen reads them through."""
        for name in [n for n in self.live if not is_live(self.vms.get(n))]:
            del self.live[name]

    def sample(self, name: str) -> VmLive | None:
        """The VM's live counters and rates, or None when it is not live or has no sample yet."""
        live = self.live.get(name)
        return live if live is not None and live.counters is not None and is_live(self.vms.get(name)) else None

    def faults_per_s(self, name: str) -> float | None:
        """The faults/s a user sees for ``name``: the rate of its live samples (the daemon's summary
        figure until the first one), None when it is not live. The list shows it and sorts by it."""
        vm = self.vms.get(name)
        if not is_live(vm):
            return None
        live = self.sample(name)
        return live.vm_rates.faults_per_s if live is not None else float(vm.get("faults_per_s") or 0.0)

    def set_migrations(self, migrations: list[dict]) -> None:
        self.migrations = {m["id"]: m for m in migrations}

    def fold_counters(self, event: dict) -> bool:
        """Fold a counters event into the model; False when it is stale (sampled before its VM
        stopped, delivered after). ``apply`` without the message: a big fleet's feed folds 4,000 a second."""
        name = event["vm"]
        vm = self.vms.get(name)
        if vm is not None and not is_live(vm):
            return False
        self.vm_live(name).add_sample(event["counters"])
        return True

    def apply(self, event: dict) -> Message | None:
        """Fold one event into the model; return the message the screens should get (or None)."""
        kind = event.get("type")
        if kind == "vm":
            if "deleted" in event:
                name = event["deleted"]
                self.vms.pop(name, None)
                self.live.pop(name, None)
                return VmDeleted(name)
            summary = event["vm"]
            self.vms[summary["name"]] = summary
            self._forget_stale()
            return VmChanged(summary)
        if kind == "counters":
            return CountersSampled(event["vm"]) if self.fold_counters(event) else None
        if kind == "migration":
            m = event["migration"]
            self.migrations[m["id"]] = m
            return MigrationChanged(m)
        if kind == "host":
            return HostChanged(event)
        return None


class ModelRefreshed(Message):
    """The app re-read VMs and migrations (after an operation); screens re-sync what they show."""


class VmChanged(Message):
    """A VM's summary changed (state, MTE, pending...)."""

    def __init__(self, summary: dict) -> None:
        super().__init__()
        self.summary = summary


class VmDeleted(Message):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class CountersSampled(Message):
    """A new counters sample for ``name`` is in the LiveModel."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class CountersBatch(Message):
    """New samples arrived for ``names`` since the last batch (a big fleet: one message per tick
    instead of one per VM, so 1,000 VMs at 4 Hz are 4 messages a second, not 4,000)."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names


class MigrationChanged(Message):
    def __init__(self, migration: dict) -> None:
        super().__init__()
        self.migration = migration


class HostChanged(Message):
    def __init__(self, event: dict) -> None:
        super().__init__()
        self.event = event
