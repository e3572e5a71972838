"""The host's end of the mtevm guest agent (docs/agent-protocol.md): guest-wide MTE fault counters,
the guest's facts, running programs, powering off.

QEMU serves the agent's virtio-serial port on a Unix socket; this client connects, says ``hello``
and keeps reading JSON lines. It reconnects whenever the connection drops (a new daemon, a
migration to a new QEMU): the agent keeps cumulative counts (per vCPU, per process) and sends
them in every ``faults`` message, so counters continue exactly where they were.

``AgentState`` is the pure part (messages in, counters out) so it can be checked line by line;
``AgentClient`` adds the socket.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import itertools
import json
import logging
import time
from collections import deque
from typing import AsyncIterator, Awaitable, Callable

from backend.errors import MtevmError, StateError
from backend.guests.definition import FAULT_ADDRESS_DEFAULT

log = logging.getLogger("mtevm.agent")

SEGV_MTEAERR = 8    # asynchronous tag-check fault (si_code)
SEGV_MTESERR = 9    # synchronous tag-check fault
FAULT_KINDS = {SEGV_MTESERR: "sync", SEGV_MTEAERR: "async"}
INTERVAL_MS = 100   # the agent's batch period we ask for (the protocol's default is 250 ms)
MAX_EXEC_BYTES = 32 << 20
LAST_FAULTS = 200
MAX_PROCESSES = 4096
MAX_LINE = 64 << 20  # an exec with a 32 MiB program is ~43 MiB of base64


class AgentState:
    """Everything the agent told us, folded into the shapes the rest of mtevm shows."""

    def __init__(self, vcpus: int):
        self.vcpus = vcpus
        self.facts: dict | None = None              # the last hello
        self.cpu_faults: dict[int, dict] = {}       # cpu -> {"sync", "async"} (cumulative, from the agent)
        self.workload: dict[int, dict] = {}         # cpu -> the workload's own counters
        self.processes: dict[int, dict] = {}        # pid -> {"pid","comm","sync","async"}
        self.totals = {"sync": 0, "async": 0}
        self.dropped_total = 0
        self.last_faults: deque[dict] = deque(maxlen=LAST_FAULTS)
        self.boot_time: float | None = None         # host time of the guest's CLOCK_MONOTONIC zero
        self.bye: str | None = None
        self.updates = 0                            # bumps with every faults/workload message
        self.boots = 0                              # guest boots seen (a reboot starts the counts anew)
        self._uptime = -1.0

    def apply(self, msg: dict) -> None:
        """Fold one guest -> host message in; unknown types are ignored (forward compatibility)."""
        kind = msg.get("type")
        if kind == "hello":
            uptime = msg.get("uptime")
            if isinstance(uptime, (int, float)) and uptime < self._uptime:
                self._new_boot()            # the guest rebooted: its agent counts from zero again
            if self.boots == 0 or self.bye:
                self.boots += 1
                self.bye = None
            self.facts = msg
            self._clock(msg)
        elif kind == "faults":
            self._faults(msg)
        elif kind == "workload":
            for c in msg.get("cpus") or []:
                if isinstance(c, dict) and isinstance(c.get("cpu"), int):
                    self.workload[c["cpu"]] = c
            self.updates += 1
        elif kind == "bye":
            self.bye = msg.get("reason") or "poweroff"

    def _new_boot(self) -> None:
        self.cpu_faults, self.workload, self.processes = {}, {}, {}
        self.totals = {"sync": 0, "async": 0}
        self.dropped_total = 0
        self.last_faults.clear()
        self.bye = self.bye or "reboot"

    def _clock(self, msg: dict) -> None:
        uptime = msg.get("uptime")
        if isinstance(uptime, (int, float)):
            self._uptime = uptime
            self.boot_time = time.time() - uptime

    def _faults(self, msg: dict) -> None:
        self._clock(msg)
        totals = msg.get("totals") or {}
        self.totals = {"sync": int(totals.get("sync", 0)), "async": int(totals.get("async", 0))}
        self.dropped_total = int(msg.get("dropped_total", self.dropped_total) or 0)
        for c in msg.get("cpus") or []:
            if isinstance(c, dict) and isinstance(c.get("cpu"), int):
                self.cpu_faults[c["cpu"]] = {"sync": int(c.get("sync", 0)), "async": int(c.get("async", 0))}
        for p in msg.get("processes") or []:
            if isinstance(p, dict) and isinstance(p.get("pid"), int):
                self.processes[p["pid"]] = {"pid": p["pid"], "comm": str(p.get("comm", "")),
                                            "sync": int(p.get("sync", 0)), "async": int(p.get("async", 0))}
        while len(self.processes) > MAX_PROCESSES:
            self.processes.pop(next(iter(self.processes)))
        for e in msg.get("events") or []:
            fault = self.fault_info(e)
            if fault is not None:
                self.last_faults.appendleft(fault)
        self.updates += 1

    def fault_info(self, e: dict) -> dict | None:
        """A trace event as a FaultInfo (docs/contracts.md) plus pid and comm. The address and
        pointer tag come with the agent's sync-fault events when it has them; an async fault
        has no address (the hardware records none), and the memory tag is not known."""
        kind = FAULT_KINDS.get(e.get("code")) if isinstance(e, dict) else None
        if kind is None:
            return None
        t = e.get("t")
        when = self.boot_time + t if self.boot_time is not None and isinstance(t, (int, float)) else time.time()
        addr = e.get("addr")
        return {"vcpu": e.get("cpu"), "kind": kind, "addr": f"{addr:#x}" if isinstance(addr, int) else None,
                "ptr_tag": e.get("ptr_tag"), "mem_tag": e.get("mem_tag"), "access": None, "size": None,
                "time": when, "pid": e.get("pid"), "comm": e.get("comm")}

    def vcpu_info(self, index: int, tcf: str, kvm_mte: bool) -> dict:
        """VcpuInfo for vCPU ``index``: the guest-wide faults taken on it (every process) and the
        checked accesses of the workload pinned to it."""
        faults = self.cpu_faults.get(index, {})
        work = self.workload.get(index, {})
        last = next((f for f in self.last_faults if f["vcpu"] == index), None)
        return {"index": index, "kvm_mte": kvm_mte, "tcf": work.get("tcf") or tcf,
                "checked": int(work.get("checked", 0)), "unchecked": 0,
                "sync_faults": int(faults.get("sync", 0)), "async_faults": int(faults.get("async", 0)),
                "last_fault": last}

    def guest_facts(self) -> dict | None:
        """Kernel, HWCAP2 MTE/MTE3, each CPU's mte_tcf_preferred, tracing, fault addresses."""
        f = self.facts
        if f is None:
            return None
        return {"kernel": f.get("kernel"), "machine": f.get("machine"), "hwcap2_mte": f.get("hwcap2_mte"),
                "hwcap2_mte3": f.get("hwcap2_mte3"),
                "cpus": [{"cpu": c.get("cpu"), "mte_tcf_preferred": c.get("mte_tcf_preferred")}
                         for c in f.get("cpus") or [] if isinstance(c, dict)],
                "tracing": f.get("tracing"), "tracing_error": f.get("tracing_error"),
                "fault_address": f.get("fault_address"), "fault_address_why": f.get("fault_address_why"),
                "faults_dropped": self.dropped_total}

    def process_table(self) -> list[dict]:
        """Per process: pid, comm, sync and async tag-check faults; most faults first."""
        return sorted((dict(p) for p in self.processes.values()), key=lambda p: (-(p["sync"] + p["async"]), p["pid"]))


class AgentClient:
    """Connects to one QEMU's agent socket and stays connected while that QEMU lives."""

    def __init__(self, socket_path: str, vcpus: int, alive: Callable[[], bool], *,
                 fault_address: bool = FAULT_ADDRESS_DEFAULT,
                 connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] | None = None):
        self.socket_path = socket_path
        # how the port is reached: QEMU's Unix socket (local host), or e.g. a libvirt channel stream
        # bridged to a socket pair (backend.hosts.libvirt_linux); OSError = not there yet, try again
        self._connect = connect or (lambda: asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE))
        self.fault_address = fault_address
        self.alive = alive
        self.state = AgentState(vcpus)
        self.ready = asyncio.Event()          # set once the agent said hello on this connection
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._execs: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()

    def start(self) -> "AgentClient":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while self.alive():
            try:
                reader, writer = await self._connect()
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, None):
                    raise
                await asyncio.sleep(0.05 if e.errno is not None else 0.5)
                continue
            self._writer = writer
            try:
                # hello may be lost while the guest has not opened its port yet: say it again
                # until the agent answers.
                hello = asyncio.get_running_loop().create_task(self._say_hello())
                while line := await reader.readline():
                    if self._line(line):
                        await self._configure()
            except (OSError, ValueError):
                pass
            finally:
                hello.cancel()
                self._writer = None
                self.ready.clear()
                writer.close()
                self._fail_execs("the connection to the guest agent was lost")
            await asyncio.sleep(0.05)

    async def _say_hello(self) -> None:
        while not self.ready.is_set():
            await self._configure()
            try:
                await asyncio.wait_for(self.ready.wait(), 1.0)
            except TimeoutError:
                pass

    async def _configure(self) -> None:
        """This VM's config, then a hello. Config first: the agent answers the hello after applying
        it, so the guest's facts say what this VM asked for (e.g. fault addresses off), not the
        agent's own defaults."""
        await self.send({"type": "config", "interval_ms": INTERVAL_MS, "fault_address": self.fault_address})
        await self.send({"type": "hello"})

    def _line(self, line: bytes) -> bool:
        """Fold one line in; True when the agent needs this VM's config again."""
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("agent %s: not JSON: %r", self.socket_path, line[:200])
            return False
        if not isinstance(msg, dict):
            return False
        self.state.apply(msg)
        kind = msg.get("type")
        if kind == "hello":
            # A hello with the agent's own batch interval on a connection already configured: a new
            # agent (the guest rebooted; the virtio-serial socket stays connected), running with
            # its defaults until it is told this VM's config again. (Loop-free: once configured it
            # says INTERVAL_MS, which is within its limits.)
            stale = self.ready.is_set() and "interval_ms" in msg and msg["interval_ms"] != INTERVAL_MS
            self.ready.set()
            return stale
        if kind in ("faults", "workload"):
            self._changed.set()
        if kind in ("exec-started", "exec-output", "exec-exit", "error") and msg.get("id") is not None:
            q = self._execs.get(str(msg["id"]))
            if q is not None:
                q.put_nowait(msg)
        return False

    def _fail_execs(self, message: str) -> None:
        for q in self._execs.values():
            q.put_nowait({"type": "error", "message": message})

    async def send(self, msg: dict) -> None:
        writer = self._writer
        if writer is None:
            raise StateError("the guest agent is not connected")
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()

    async def wait_ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            raise StateError(f"the guest agent did not answer within {timeout:.0f} s (is the guest still "
                             "booting? see 'mtevm console NAME --log')") from None

    async def exec(self, *, data: bytes | None = None, name: str | None = None, path: str | None = None,
                   args: list[str] = (), cwd: str | None = None) -> AsyncIterator[dict]:
        """Run a program in the guest; yields the agent's exec-started / exec-output (data decoded
        to bytes) / exec-exit messages; an agent error raises MtevmError."""
        exec_id = f"x{next(self._ids)}"
        msg: dict = {"type": "exec", "id": exec_id, "args": list(args)}
        if data is not None:
            if len(data) > MAX_EXEC_BYTES:
                raise MtevmError(f"the program is {len(data)} bytes; the agent takes at most {MAX_EXEC_BYTES}")
            msg.update(name=name, data=base64.b64encode(data).decode())
        else:
            msg["path"] = path
        if cwd:
            msg["cwd"] = cwd
        q: asyncio.Queue = asyncio.Queue()
        self._execs[exec_id] = q
        try:
            await self.send(msg)
            while True:
                m = await q.get()
                if m["type"] == "error":
                    raise MtevmError(f"guest agent: {m.get('message')}")
                if m["type"] == "exec-output":
                    m = {**m, "data": base64.b64decode(m.get("data") or "")}
                yield m
                if m["type"] == "exec-exit":
                    return
        finally:
            del self._execs[exec_id]

    async def changed(self, timeout: float) -> None:
        """Wait until the next faults/workload message (or the timeout)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_execs("the VM stopped")
