"""What a VM running mtevm's bare-metal guest reports: its status block turned into VcpuInfo dicts.

The guest keeps per-vCPU counters in a status block (backend.qemu.guest_abi) that a host driver
reads with HMP ``xp``: the ``local`` host over its own QMP socket, the ``libvirt`` host through
libvirt's monitor passthrough. Both keep the same view of it (counters, the fault history, tag
memory, the guest's own error), so it lives here once.
"""
from __future__ import annotations

import time
from collections import deque

from backend.errors import MtevmError, StateError
from backend.hosts.base import VmSpec
from backend.machine.migration import PAGE
from backend.qemu import guest_abi

TAG_RAM_RATIO = 32          # QEMU stores 2 tags per byte for 16-byte granules: RAM/32 bytes of tags
FAULT_HISTORY = 200


class GuestStatusView:
    """Mixin for a RunningVm whose counters come from the guest's status block."""

    spec: VmSpec

    def _init_status(self) -> None:
        self._vcpus: list[dict] = [self._vcpu_info(i, {}) for i in range(self.spec.config.vcpus)]
        self._faults: deque[dict] = deque(maxlen=FAULT_HISTORY)
        self._guest: dict = {}

    def _vcpu_info(self, index: int, status: dict) -> dict:
        kvm_mte = self.spec.config.accel == "kvm" and self.spec.config.mte
        info = {"index": index, "kvm_mte": kvm_mte, "tcf": self.spec.workload.tcf_for(index),
                "checked": 0, "unchecked": 0, "sync_faults": 0, "async_faults": 0, "last_fault": None,
                "up": False, "boot_tags": None, "boot_tag_checks": 0}
        if status.get("up"):   # before the guest is up its status block holds nothing meaningful
            info.update({k: v for k, v in status.items() if k in info and k not in ("index", "kvm_mte")})
        return info

    def guest_status(self) -> dict:
        """The guest's status header from the last sample (up, state, vcpus_up, error)."""
        return dict(self._guest)

    def vcpus(self) -> list[dict]:
        return [dict(v) for v in self._vcpus]

    def _parse_xp(self, text: str) -> bytes:
        try:
            return guest_abi.parse_xp(text)
        except ValueError:
            raise MtevmError(f"QEMU could not read the guest's status block: {text.strip()[:200]}") from None

    def _apply_status(self, raw: bytes, cpu_indexes: list[int]) -> list[dict]:
        """Take a fresh status block (QEMU's vCPU indexes say which records exist)."""
        statuses = guest_abi.parse_status(raw, self.spec.config.vcpus)
        self._guest = guest_abi.parse_status_header(raw)
        now = time.time()
        fresh = []
        for i in cpu_indexes:
            info = self._vcpu_info(i, statuses[i] if i < len(statuses) else {})
            self._note_fault(info, self._vcpus[i] if i < len(self._vcpus) else None, now)
            fresh.append(info)
        self._vcpus = fresh
        return self.vcpus()

    def _note_fault(self, info: dict, before: dict | None, now: float) -> None:
        fault = info.get("last_fault")
        if not fault:
            return
        fault = {**fault, "vcpu": info["index"], "time": now}
        old = (before or {}).get("last_fault")
        faults_before = sum((before or {}).get(k, 0) for k in ("sync_faults", "async_faults"))
        faults_now = info["sync_faults"] + info["async_faults"]
        if old is None or faults_now != faults_before or {**old, "time": 0} != {**fault, "time": 0}:
            self._faults.appendleft(fault)
        else:
            fault["time"] = old["time"]   # the same fault as last sample: keep when it was first seen
        info["last_fault"] = fault

    def last_faults(self, limit: int = 20) -> list[dict]:
        return list(self._faults)[:limit]

    def _take_history(self, other: "GuestStatusView") -> None:
        """A migrated VM keeps its counters and fault history."""
        self._vcpus, self._faults = other._vcpus, other._faults

    def guest_error_lines(self) -> list[str]:
        error = self._guest.get("error")
        if error:   # the guest took an exception it does not handle (it reports, then parks)
            return ["guest error: ESR {esr:#x} at ELR {elr:#x}, FAR {far:#x}".format(**error)]
        return []

    def tag_memory(self) -> dict | None:
        """Under TCG QEMU keeps RAM/32 bytes of tags (the ``mach-virt.tag`` RAM block). The pages
        that hold non-zero tags are the ones the guest tags: each vCPU's heap and boot-tag page."""
        config = self.spec.config
        if not config.mte or config.accel != "tcg":
            return None
        per_vcpu = (self.spec.workload.heap_size + guest_abi.BOOT_TAG_SIZE) // PAGE
        return {"bytes": config.memory // TAG_RAM_RATIO, "tagged_pages": self._guest.get("vcpus_up", 0) * per_vcpu}

    def set_tcf(self, vcpu: int | None, tcf: str) -> None:
        raise StateError(f"VM '{self.spec.config.name}' runs real QEMU: its TCF is a boot parameter of "
                         "the guest; stop the VM, change the workload's tcf and start it again")
