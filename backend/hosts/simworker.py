"""A worker process that runs simulated vCPUs: ``python -m backend.hosts.simworker FD``.

The daemon (backend.hosts.workers) starts one per core and talks to it over the socket FD with
pickled tuples (multiprocessing.connection). The worker maps each VM's shared segment
(backend.hosts.simshared) and steps its vCPUs (backend.hosts.simvcpus); counters and faults
go straight into the segment, so nothing is sent per sample.

Messages in:  ("start", req, vm_id, shm_name, layout_dict, workload_dict, state|None)
              ("detach", req, vm_id)    -> the VM's state (the daemon pauses it / moves it)
              ("stop", req, vm_id)      ("exit",)
Messages out: ("ready", pid), ("reply", req, ok, payload|error text), ("crashed", vm_id, reason)

Scheduling: a paced VM (workload rate > 0) is stepped TICKS times a second with what it is owed
(``rate / TICKS`` accesses per vCPU, at most MAX_BATCH per batch, at most MAX_CATCH_UP_S of
arrears); VMs at rate 0 (flat out) share whatever time is left, one batch each in turn, with
the command socket polled between batches. The worker runs at a lower priority (nice) than the
daemon, so the control plane is served first when the cores are busy. It exits when the daemon
goes away (the socket closes; on Linux also PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import time
from collections import deque
from multiprocessing.connection import Connection

from backend.errors import MtevmError
from backend.hosts.simshared import VmLayout, VmShared
from backend.hosts.simvcpus import SimVcpus
from backend.hosts.workload import WorkloadConfig

MIN_PACED_BATCH = 5000        # a paced vCPU's batches hold at least this many accesses (fewer ticks) ...
MAX_TICKS_PER_S = 10          # ... ticking 1..10 times a second: each batch has a fixed cost (~0.2 ms)
MAX_BATCH = 16384             # accesses per vCPU per batch: also what one flat-out turn runs
MAX_CATCH_UP_S = 0.5          # after a stall, at most this much missed work is made up
WORKER_NICE = 5               # below the daemon: the control plane never waits for the simulation
IDLE_POLL_S = 1.0


def ticks_per_s(rate: int) -> int:
    """How often a VM at ``rate`` accesses per second per vCPU is stepped."""
    return max(1, min(MAX_TICKS_PER_S, rate // MIN_PACED_BATCH))


class _Vm:
    def __init__(self, vm_id: int, shared: VmShared, vcpus: SimVcpus, rate: int):
        self.id, self.shared, self.vcpus, self.rate = vm_id, shared, vcpus, rate
        self.period = 1.0 / ticks_per_s(rate) if rate else 0.0
        now = time.monotonic()
        self.last = now
        self.due = now + self.period
        self.owed = 0.0

    def run_due(self, now: float) -> None:
        """A paced VM's tick: the accesses it is owed since the last one."""
        self.owed += self.rate * min(now - self.last, MAX_CATCH_UP_S)
        self.last = now
        self.due = max(self.due + self.period, now)
        n = int(self.owed)
        self.owed -= n
        while n > 0:
            batch = min(n, MAX_BATCH)
            self.vcpus.step(batch)
            n -= batch


class Worker:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.vms: dict[int, _Vm] = {}
        self.flat: deque[int] = deque()

    def send(self, *msg) -> None:
        self.conn.send(msg)

    def handle(self, msg: tuple) -> bool:
        """One command; False when the worker should exit."""
        op = msg[0]
        if op == "exit":
            return False
        req = msg[1]
        try:
            if op == "start":
                _, _, vm_id, shm_name, layout, workload, state = msg
                self._start(vm_id, shm_name, VmLayout(**layout), WorkloadConfig.from_dict(workload), state)
                payload = None
            elif op == "detach":
                payload = self._drop(msg[2], keep_state=True)
            elif op == "stop":
                self._drop(msg[2])
                payload = None
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception as e:
            self.send("reply", req, False, str(e) if isinstance(e, MtevmError) else f"{type(e).__name__}: {e}")
        else:
            self.send("reply", req, True, payload)
        return True

    def _start(self, vm_id, shm_name, layout, workload, state) -> None:
        shared = VmShared.attach(shm_name, layout)
        try:
            vm = _Vm(vm_id, shared, SimVcpus(shared, workload, state), workload.rate)
        except BaseException:
            shared.detach()
            raise
        self.vms[vm_id] = vm
        if not vm.rate:
            self.flat.append(vm_id)

    def _drop(self, vm_id: int, *, keep_state: bool = False) -> dict | None:
        """Stop running a VM and let go of its segment; its vCPUs' state if asked."""
        vm = self.vms.pop(vm_id)
        if vm_id in self.flat:
            self.flat.remove(vm_id)
        state = vm.vcpus.export_state() if keep_state else None
        vm.vcpus = None                  # no view on the segment may outlive the mapping
        vm.shared.detach()
        return state

    def crashed(self, vm: _Vm, error: BaseException) -> None:
        """A bug in the simulation crashes this VM, not the worker or the daemon."""
        self._drop(vm.id)
        self.send("crashed", vm.id, f"simulated vCPUs stopped: {type(error).__name__}: {error}")

    def serve(self) -> None:
        self.send("ready", os.getpid())
        while True:
            now = time.monotonic()
            next_due = math.inf
            for vm in list(self.vms.values()):
                if vm.rate:
                    if now >= vm.due:
                        try:
                            vm.run_due(now)
                        except Exception as e:
                            self.crashed(vm, e)
                            continue
                    next_due = min(next_due, vm.due)
            timeout = 0.0 if self.flat else min(IDLE_POLL_S, max(0.0, next_due - time.monotonic()))
            if self.conn.poll(timeout):
                while True:
                    if not self.handle(self.conn.recv()):
                        return
                    if not self.conn.poll(0):
                        break
            elif self.flat:
                vm = self.vms[self.flat[0]]
                self.flat.rotate(-1)
                try:
                    vm.vcpus.step(MAX_BATCH)
                except Exception as e:
                    self.crashed(vm, e)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the daemon dies, even if it never reads its socket again."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)           # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent or len(argv) != 1:
        return 1
    try:
        os.nice(WORKER_NICE)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a ^C in the daemon's terminal is the daemon's
    conn = Connection(int(argv[0]))
    try:
        Worker(conn).serve()
    except (EOFError, OSError, KeyboardInterrupt):
        pass                                          # the daemon went away: so do we
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
