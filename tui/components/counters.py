"""The live counter panes of the VM detail: one row per vCPU plus the VM total, and the last faults.

Every value is its own ``Cell`` and each sample only repaints the cells whose text changed, so a
4 Hz feed on a 64-vCPU VM costs a handful of small repaints, not a redrawn screen.
"""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical

from tui import format as fmt
from tui.components.cells import Cell, Trend
from tui.live import Rates

VCPU_COLUMNS = [("index", "vCPU"), ("kvm_mte", "kvm_mte"), ("tcf", "TCF"), ("checked", "checked"),
                ("unchecked", "unchkd"), ("sync", "sync"), ("async", "async"), ("fps", "faults/s")]
FAULT_COLUMNS = [("vcpu", "vCPU"), ("kind", "kind"), ("addr", "address"), ("ptr_tag", "ptr"),
                 ("mem_tag", "mem"), ("access", "access"), ("size", "size"), ("age", "age")]
FAULT_ROWS = 8


class _Row(Horizontal):
    """One line of cells keyed by column, plus an optional trend sparkline."""

    def __init__(self, columns, *, trend: bool, header: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.columns = columns
        self.cells = {key: Cell(label if header else "", classes=f"c-{key}") for key, label in columns}
        self.trend = Trend(classes="trend") if trend and not header else None
        self._header_trend = header and trend

    def compose(self) -> ComposeResult:
        yield from self.cells.values()
        if self.trend is not None:
            yield self.trend
        elif self._header_trend:
            yield Cell("faults/s trend", classes="trend")

    def set(self, values: dict[str, str]) -> None:
        for key, text in values.items():
            self.cells[key].set(text)


def counter_values(c: dict, rates: Rates) -> dict[str, str]:
    return {"checked": fmt.count(c.get("checked", 0)), "unchecked": fmt.count(c.get("unchecked", 0)),
            "sync": fmt.count(c.get("sync_faults", 0)), "async": fmt.count(c.get("async_faults", 0)),
            "fps": fmt.rate(rates.faults_per_s)}


class VcpuTable(Vertical):
    """kvm_mte, TCF and live counters per vCPU, and the VM's totals on the last row."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows: dict[int, _Row] = {}
        self.total = _Row(VCPU_COLUMNS, trend=True, classes="vrow total")

    def compose(self) -> ComposeResult:
        yield _Row(VCPU_COLUMNS, trend=True, header=True, classes="vrow header")
        yield self.total

    def set_vcpus(self, vcpus: list[dict]) -> None:
        """Static per-vCPU facts (kvm_mte, TCF); adds rows for vCPUs not seen yet."""
        for v in vcpus:
            i = int(v["index"])
            if i not in self.rows:
                self.rows[i] = _Row(VCPU_COLUMNS, trend=True, classes="vrow")
                self.mount(self.rows[i], before=self.total)
                self.rows[i].set({"index": str(i)})
            self.rows[i].set({"kvm_mte": fmt.yes_no(v.get("kvm_mte")), "tcf": str(v.get("tcf", "-"))})
        self.total.set({"index": "VM", "kvm_mte": "", "tcf": ""})

    def set_idle(self, vcpus: list[dict]) -> None:
        """A VM that is not live: no kvm_mte, no counters, no faults/s (a "-" each), no trend."""
        self.set_vcpus(vcpus)
        idle = {key: "-" for key, _ in VCPU_COLUMNS if key not in ("index", "tcf")}
        for row in [*self.rows.values(), self.total]:
            row.set(idle if row is not self.total else {**idle, "kvm_mte": ""})
            row.trend.show(())

    def set_sample(self, counters: dict, vm_rates: Rates, vcpu_rates: dict[int, Rates]) -> None:
        vcpus = counters.get("vcpus", [])
        self.set_vcpus(vcpus)
        for v in vcpus:
            row, rates = self.rows[int(v["index"])], vcpu_rates.get(int(v["index"]), Rates())
            row.set(counter_values(v, rates))
            row.trend.show(rates.faults_history)
        self.total.set(counter_values(counters.get("vm", {}), vm_rates))
        self.total.trend.show(vm_rates.faults_history)


class FaultList(Vertical):
    """The newest faults (address, pointer tag, memory tag...), newest first, in fixed rows."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows = [_Row(FAULT_COLUMNS, trend=False, classes="frow") for _ in range(FAULT_ROWS)]

    def compose(self) -> ComposeResult:
        yield _Row(FAULT_COLUMNS, trend=False, header=True, classes="frow header")
        yield from self.rows

    def set_faults(self, faults: list[dict], now: float) -> None:
        for row, f in zip(self.rows, faults + [None] * FAULT_ROWS):
            if f is None:
                row.set({k: "" for k, _ in FAULT_COLUMNS})
            else:
                row.set({"vcpu": str(f.get("vcpu", "")), "kind": f.get("kind", ""), "addr": f.get("addr") or "-",
                         "ptr_tag": _hex(f.get("ptr_tag")), "mem_tag": _hex(f.get("mem_tag")),
                         "access": f.get("access") or "-", "size": str(f.get("size") or "-"),
                         "age": fmt.age(f.get("time"), now)})


def _hex(tag: int | None) -> str:
    """A tag in hex; '-' where it is not known (a Linux guest reports no memory tag, and no address
    or pointer tag for an async fault)."""
    return "-" if tag is None else f"{tag:x}"
