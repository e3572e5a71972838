"""The daemon's side of the simulated-vCPU worker processes: start them, place VMs, watch them die.

Simulated vCPUs run in worker processes (backend.hosts.simworker), never on the daemon's event
loop, so ``list`` and the event stream stay fast however busy the simulation is. There are as
many workers as the machine has cores (``MTEVM_SIM_WORKERS`` overrides it), started when the first
VM needs one, each running whole VMs (a VM's vCPUs share its tag memory). A VM goes to the worker
with the least work.

Capacity: a paced vCPU (workload rate r > 0) needs about ``ticks * BATCH_COST_S + r * CHECK_COST_S``
vCPU-seconds per second (measured on the reference machine, see benchmarks/README.md); the pool has
one vCPU-second per second per worker, and a VM that would take it past that is refused with both
figures. Flat-out VMs (rate 0) reserve nothing: they use what the paced ones leave.

A worker that dies (killed, out of memory, a bug) takes only its VMs down: each becomes a crashed
VM whose reason says which worker died and how; the next VM gets a new worker. Workers stop when
the hosts close (the daemon exits), and die with the daemon if it is killed.
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Callable

from backend.errors import ConfigError, MtevmError, StateError
from backend.hosts.simshared import remove_orphans
from backend.hosts.simworker import MAX_BATCH, ticks_per_s

log = logging.getLogger("mtevm.workers")

BATCH_COST_S = 200e-6         # fixed cost of one heap-workload batch (reference machine)
CHECK_COST_S = 45e-9          # cost of one checked access in a large batch (reference machine)
CALL_TIMEOUT_S = 30.0         # a worker that does not answer a command in this long is stopped
STOP_TIMEOUT_S = 3.0
WORKERS_ENV = "MTEVM_SIM_WORKERS"
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_worker_count() -> int:
    """``MTEVM_SIM_WORKERS`` if set, else the cores this process may run on."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= 256:
            raise ConfigError(f"{WORKERS_ENV}={value!r}: give a number of worker processes from 1 to 256")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def vcpu_seconds(rate: int, vcpus: int) -> float:
    """vCPU-seconds per second that ``vcpus`` simulated vCPUs at ``rate`` need (0 for flat out)."""
    if not rate:
        return 0.0
    batches = max(ticks_per_s(rate), -(-rate // MAX_BATCH))
    return vcpus * (batches * BATCH_COST_S + rate * CHECK_COST_S)


def _describe_exit(pid: int, returncode: int | None) -> str:
    if returncode is None:
        how = "stopped answering"
    elif returncode < 0:
        try:
            how = f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    return f"simulated vCPU worker (pid {pid}) died: {how}"


class SimWorker:
    """One worker process, its socket, and a thread that reads its replies."""

    def __init__(self, pool: "WorkerPool"):
        self.pool = pool
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "backend.hosts.simworker", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)   # a ^C at the daemon's terminal is the daemon's
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.conn = Connection(ours.detach())
        self.vms: dict[int, object] = {}          # vm_id -> SimVm placed here
        self.alive = True
        self.death: str | None = None             # why it died, once it has
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"sim-worker-{self.pid}", daemon=True)
        self._reader.start()

    @property
    def load(self) -> float:
        """Reserved vCPU-seconds per second, counting a flat-out vCPU as one (for placement only)."""
        return sum(vm.demand or vm.spec.config.vcpus for vm in self.vms.values())

    # ---- commands ------------------------------------------------------------------------------
    async def call(self, op: str, *args, timeout: float = CALL_TIMEOUT_S):
        """Send a command and wait for its reply; MtevmError if it fails or the worker dies."""
        if not self.alive:
            raise MtevmError(self.death or _describe_exit(self.pid, self.proc.poll()))
        loop = asyncio.get_running_loop()
        req = next(self._ids)
        fut = loop.create_future()
        self._pending[req] = fut
        try:
            with self._send_lock:
                self.conn.send((op, req, *args))
            return await asyncio.wait_for(fut, timeout)
        except (OSError, ValueError):
            raise MtevmError(self.death or _describe_exit(self.pid, self.proc.poll())) from None
        except TimeoutError:
            log.error("simulated vCPU worker %d: no answer to %s in %.0f s: stopping it", self.pid, op, timeout)
            self.kill()
            raise MtevmError(f"simulated vCPU worker (pid {self.pid}) did not answer in {timeout:.0f} s "
                             "and was stopped") from None
        finally:
            self._pending.pop(req, None)

    def _read(self) -> None:
        """Reader thread: replies resolve their futures; a crash or EOF is reported to the VMs."""
        try:
            while True:
                msg = self.conn.recv()
                if msg[0] == "reply":
                    _, req, ok, payload = msg
                    fut = self._pending.get(req)
                    if fut is not None:
                        _call_in_loop(fut.get_loop(), _resolve, fut, ok, payload)
                elif msg[0] == "crashed":
                    _, vm_id, reason = msg
                    vm = self.vms.pop(vm_id, None)
                    if vm is not None:
                        vm.worker_lost(reason)
        except (EOFError, OSError):
            pass
        except Exception:               # a bad message: treat the worker as lost
            log.exception("simulated vCPU worker %d: bad message", self.pid)
            self.kill()
        self.alive = False
        try:
            returncode = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            returncode = self.proc.wait()
        self.death = _describe_exit(self.pid, returncode)
        if not self.pool.stopping:
            log.error("%s", self.death)
        for vm in list(self.vms.values()):
            vm.worker_lost(self.death)
        self.vms.clear()
        for fut in list(self._pending.values()):
            _call_in_loop(fut.get_loop(), _resolve, fut, False, self.death)
        self.pool.forget(self)

    # ---- life ----------------------------------------------------------------------------------
    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Ask the worker to exit, then SIGKILL it if it does not; wait for it (no zombie left)."""
        try:
            with self._send_lock:
                self.conn.send(("exit",))
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        if threading.current_thread() is not self._reader:
            self._reader.join(STOP_TIMEOUT_S)
        self.conn.close()


def _resolve(fut: asyncio.Future, ok: bool, payload) -> None:
    if not fut.done():
        if ok:
            fut.set_result(payload)
        else:
            fut.set_exception(MtevmError(payload))


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:          # that loop is closed: nobody waits for the answer any more
        pass


class WorkerPool:
    """The worker processes of one daemon (shared by its simulated hosts: they share the cores)."""

    def __init__(self, size: int | None = None):
        self.size = size if size is not None else default_worker_count()
        self.workers: list[SimWorker] = []
        self.stopping = False
        self._lock = threading.Lock()

    @property
    def capacity(self) -> float:
        """vCPU-seconds per second the simulated hosts can give: one per worker."""
        return float(self.size)

    def demand(self) -> float:
        with self._lock:
            return sum(vm.demand for w in self.workers for vm in w.vms.values())

    def check_room(self, host: str, vm_name: str, rate: int, vcpus: int) -> float:
        """The vCPU-seconds per second the VM needs, or StateError naming both figures if it does not fit."""
        asks = vcpu_seconds(rate, vcpus)
        used = self.demand()
        if asks and used + asks > self.capacity + 1e-9:
            raise StateError(
                f"host {host} is full: it has {self.capacity:g} vCPU-seconds per second for simulated vCPUs "
                f"({self.size} worker processes), {used:.3f} are in use, and VM '{vm_name}' asks for {asks:.3f} "
                f"({vcpus} vCPUs at {rate} accesses/s); stop a VM or lower its workload rate")
        return asks

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self.workers if w.alive]

    def place(self) -> SimWorker:
        """The worker for a new VM: a fresh one while there are fewer than ``size`` and all are busy,
        else the one with the least work."""
        with self._lock:
            live = [w for w in self.workers if w.alive]
            if len(live) < self.size and all(w.vms for w in live):
                self.stopping = False
                worker = SimWorker(self)
                self.workers.append(worker)
                return worker
            return min(live, key=lambda w: (w.load, len(w.vms)))

    def forget(self, worker: SimWorker) -> None:
        with self._lock:
            if worker in self.workers:
                self.workers.remove(worker)

    def shutdown(self) -> None:
        """Stop every worker (by PID, waited for)."""
        self.stopping = True
        with self._lock:
            workers, self.workers = list(self.workers), []
        for worker in workers:
            worker.stop()

    def shutdown_if_idle(self) -> None:
        with self._lock:
            busy = any(w.vms for w in self.workers)
        if not busy:
            self.shutdown()


_pool: WorkerPool | None = None


def shared_pool() -> WorkerPool:
    """The process's pool (the simulated hosts of one daemon share the machine's cores)."""
    global _pool
    if _pool is None:
        removed = remove_orphans()
        if removed:
            log.info("removed %d shared-memory segments of daemons that were killed", len(removed))
        _pool = WorkerPool()
        atexit.register(_pool.shutdown)
    return _pool


def layout_dict(layout) -> dict:
    return asdict(layout)
