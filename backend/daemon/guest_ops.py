"""The Service's guest operations: QEMU command line, serial console, exec in the guest.

Kept apart from backend/daemon/service.py (which mixes ``GuestOps`` in) so the VM lifecycle stays
readable there. Everything here works on the Service's records (``self._vm``) and the local
host's VMs (backend.hosts.local / backend.hosts.linux).
"""
from __future__ import annotations

import asyncio
import os
import shutil
from typing import TYPE_CHECKING, AsyncIterator

from backend.errors import ConfigError, MtevmError, StateError
from backend.guests.definition import GuestConfig
from backend.qemu.console import read_log

if TYPE_CHECKING:
    from backend.hosts.base import Host

AGENT_WAIT = 120.0          # seconds exec waits for a booting guest's agent (TCG boot: 5-10 s, more under load)
MAX_LOG_LINES = 100_000


def parse_guest(value, host: "Host") -> GuestConfig:
    """The ``guest`` of a create request, checked (files, arm64 Image magic, the Linux image built)."""
    guest = GuestConfig.from_dict(value)
    if guest.kind == "custom" and host.kind == "libvirt":
        raise ConfigError(f"--guest custom needs --host local (host {host.name} is libvirt: mtevm runs its "
                          "builtin guest and its Linux image there)")
    if guest.kind != "builtin" and host.kind not in ("local", "libvirt"):
        raise ConfigError(f"--guest {guest.kind} needs --host local or a libvirt host (host {host.name} is "
                          f"{host.kind}: it runs no QEMU to boot a kernel in)")
    guest.validate(check_files=True)
    if guest.kind == "linux":
        from backend.hosts.linux import linux_image_files
        linux_image_files()
    return guest


def guest_detail(guest: GuestConfig, running) -> dict:
    """The VmDetail fields of the guest: its definition, what it says about itself, the
    per-process fault table and the QEMU command line of a running VM."""
    return {"guest": guest.to_dict(),
            "guest_facts": running.guest_facts() if running is not None and hasattr(running, "guest_facts") else None,
            "processes": running.processes() if running is not None and hasattr(running, "processes") else []}


def remove_console_log(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class ConsoleSession:
    """One user attached to a VM's console: ``await read()`` gives output (None: it ended),
    ``await write(data)`` types."""

    def __init__(self, console):
        self._console = console
        self._queue = console.subscribe()

    async def read(self) -> bytes | None:
        return await self._queue.get()

    async def write(self, data: bytes) -> None:
        await self._console.write(data)

    async def close(self) -> None:
        self._console.unsubscribe(self._queue)


class GuestOps:
    """Mixed into backend.daemon.service.Service."""

    def _running_vm(self, name: str):
        rec = self._vm(name)
        running = rec.running
        if running is None or rec.state not in ("running", "migrating"):
            raise StateError(f"VM {rec.name!r} is {rec.state}, not running")
        return rec, running

    def _local_vm(self, name: str):
        rec, running = self._running_vm(name)
        if not hasattr(running, "console"):
            raise StateError(f"VM {rec.name!r} runs on host {rec.host}, which has no serial console for mtevm")
        return rec, running

    async def argv(self, name: str) -> list[str]:
        """QEMU's command line: the running VM's, else the one ``start`` would run now."""
        rec = self._vm(name)
        if rec.running is not None and hasattr(rec.running, "argv"):
            return rec.running.argv()
        host = self.hosts[rec.host]
        if not hasattr(host, "preview_argv"):
            raise StateError(f"VM {rec.name!r} is on host {rec.host} ({host.kind}): it runs no QEMU command line")
        return await asyncio.to_thread(host.preview_argv, self._spec(rec))

    async def console_log(self, name: str, lines: int = 100) -> dict:
        """The last ``lines`` lines of the VM's console log (kept while the VM is stopped too)."""
        rec = self._vm(name)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 0 <= lines <= MAX_LOG_LINES:
            raise ConfigError(f"lines must be a number of lines 0..{MAX_LOG_LINES}, not {lines!r}")
        path = os.path.join(self._log_dir(rec.name), "console.log")
        return {"name": rec.name, "log": path, "lines": await asyncio.to_thread(read_log, self._log_dir(rec.name), lines)}

    def console_session(self, name: str) -> ConsoleSession:
        """Attach to a running VM's console (``mtevm console``, the app)."""
        _, running = self._local_vm(name)
        return ConsoleSession(running.console)

    def exec(self, name: str, args: list | None = None, program: str | None = None, data: str | None = None,
             path: str | None = None, cwd: str | None = None) -> AsyncIterator[dict]:
        """Run a program in a Linux guest through its agent: ``data`` (base64 of a static aarch64
        ELF) named ``program``, or a ``path`` already in the guest. Yields the agent's exec-started,
        exec-output (base64 ``data``) and exec-exit messages; exec-exit carries the process's
        tag-check faults (``faults``: sync, async). Errors raise before the first message."""
        _, running = self._running_vm(name)    # local or libvirt: the agent client is the same
        if not hasattr(running, "require_agent"):
            raise StateError(f"VM {name!r} runs the builtin guest (a bare-metal program): it has no mtevm "
                             "agent; exec needs a VM made with --guest linux")
        agent = running.require_agent()
        if args is None:
            args = []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError("args must be a list of strings")
        if (data is None) == (path is None):
            raise ConfigError("exec: give a program (data and its name) or a path in the guest")
        return self._exec(running, agent, args, program, data, path, cwd)

    async def _exec(self, running, agent, args, program, data, path, cwd) -> AsyncIterator[dict]:
        """The stream's errors travel as a last ``{"type": "failed", "class", "message"}`` message
        (an NDJSON stream has sent its HTTP status already); the client raises them."""
        try:
            async for msg in self._exec_messages(agent, args, program, data, path, cwd):
                yield msg
        except MtevmError as e:
            yield {"type": "failed", "class": type(e).__name__, "message": str(e)}

    async def _exec_messages(self, agent, args, program, data, path, cwd) -> AsyncIterator[dict]:
        import base64
        import binascii
        await agent.wait_ready(AGENT_WAIT)
        if data is not None:
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("exec: data is not base64") from None
            stream = agent.exec(data=raw, name=os.path.basename(program or "program"), args=args, cwd=cwd)
        else:
            stream = agent.exec(path=path, args=args, cwd=cwd)
        pid = None
        async for msg in stream:
            if msg["type"] == "exec-started":
                pid = msg.get("pid")
            elif msg["type"] == "exec-output":
                msg = {**msg, "data": base64.b64encode(msg["data"]).decode()}
            elif msg["type"] == "exec-exit":
                proc = agent.state.processes.get(msg.get("pid", pid)) or {}
                msg = {**msg, "pid": msg.get("pid", pid),
                       "faults": {"sync": proc.get("sync", 0), "async": proc.get("async", 0)}}
            yield msg


__all__ = ["GuestOps", "ConsoleSession", "parse_guest", "guest_detail", "remove_console_log", "MtevmError"]
