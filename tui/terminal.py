"""Leave promptly when the terminal goes away (ssh dropped, tmux killed, browser tab closed).

Three signs: SIGHUP; SIGTERM; and stdin/stdout reporting hang-up or error (POLLHUP/POLLERR/
POLLNVAL), which is what a pty shows once its master side closed, or a pipe once its other end
did. Textual alone would keep running or spin on EOF. On any of them the app exits normally:
it closes its connection to the daemon and the VMs keep running there.
"""
from __future__ import annotations

import select
import signal
import sys

CHECK_PERIOD = 0.5     # seconds between hang-up checks
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def terminal_gone(fds: list[int]) -> bool:
    """True when any of ``fds`` reports hang-up or error (never blocks)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, 0)          # hang-up and errors are always reported
    return any(mask & _GONE for _fd, mask in poller.poll(0))


class TerminalWatch:
    def __init__(self, app) -> None:
        self.app = app
        self.fds: list[int] = []
        for stream in (sys.__stdin__, sys.__stdout__):
            try:
                if stream is not None:
                    self.fds.append(stream.fileno())
            except (ValueError, OSError):
                pass

    def install(self) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.leave, f"signal {signal.Signals(sig).name}")
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if self.fds:
            self.app.set_interval(CHECK_PERIOD, self.check, name="terminal-watch")

    def check(self) -> None:
        if terminal_gone(self.fds):
            self.leave("terminal hung up")

    def leave(self, why: str) -> None:
        # The terminal is gone: nothing can be drawn or read; exit normally so the client closes.
        self.app.exit(return_code=0)
