"""A QMP connection to one QEMU process, on top of qemu.qmp's asyncio ``QMPClient``.

It adds what the driver needs and QMPClient leaves to its caller: waiting for a QEMU that is
still starting (its socket may not exist yet) while giving up as soon as that QEMU has exited,
QMP errors as mtevm errors with QEMU's text, and HMP for the ``xp`` memory dump.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from backend.errors import MtevmError

# QMPClient logs every failed connection attempt and hang-up at WARNING; while QEMU starts
# or after it quits those are expected, and mtevm reports the real outcome itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

POLL_INTERVAL = 0.005   # seconds between connection attempts while QEMU starts


class QmpError(MtevmError):
    """A QMP command failed (``str`` is QEMU's own ``desc``) or QEMU went away."""

    def __init__(self, message: str, error_class: str | None = None):
        super().__init__(message)
        self.error_class = error_class


class QmpGone(QmpError):
    """The connection to QEMU is lost (QEMU exited or was killed)."""


class QmpConnection:
    """One negotiated QMP session; ``execute`` returns the command's ``return`` value."""

    def __init__(self, socket_path: str, name: str = "mtevm"):
        self.socket_path = socket_path
        self._client = QMPClient(name)

    async def connect(self, alive: Callable[[], bool], timeout: float) -> None:
        """Connect once QEMU listens; QmpGone as soon as ``alive()`` is false, or after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                # Bounded: a QEMU whose one QMP connection is taken accepts but never greets.
                await asyncio.wait_for(self._client.connect(self.socket_path),
                                       max(deadline - loop.time(), POLL_INTERVAL))
                return
            except (ConnectError, asyncio.TimeoutError) as e:
                if not alive():
                    raise QmpGone("QEMU exited before its QMP monitor was ready") from e
                if loop.time() >= deadline:
                    raise QmpGone(f"QEMU's QMP socket {self.socket_path} did not answer within "
                                  f"{timeout:g} s{': ' + str(e) if str(e) else ''}") from e
            await asyncio.sleep(POLL_INTERVAL)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as e:
            raise QmpError(str(e), e.error_class) from e
        except (ExecInterruptedError, QMPError, OSError, EOFError) as e:
            raise QmpGone(f"lost the QMP connection to QEMU ({command}): {e or type(e).__name__}") from e

    async def hmp(self, command_line: str) -> str:
        """An HMP command through QMP (``human-monitor-command``); returns its text output."""
        return await self.execute("human-monitor-command", {"command-line": command_line})

    async def close(self) -> None:
        """Drop the connection (QEMU keeps running). Never raises: QEMU may already be gone."""
        try:
            await self._client.disconnect()
        except Exception:   # the hang-up QMPClient reports when QEMU exited first
            pass
