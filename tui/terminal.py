"""Leave promptly when the terminal goes away (ssh dropped, tmux killed, browser tab closed).

Three signs: SIGHUP; SIGTERM; and stdin/stdout reporting hang-up or error (POLLHUP/POLLERR/
POLLNVAL), which is what a pty shows once its master side closed, or a pipe once its other end
did. Textual alone would keep running or spin on EOF. On any of them the app exits normally:
it closes its connection to the daemon and the VMs keep running there.

Exiting must also finish when the terminal died very early: ``HangupSafeDriver`` (below) keeps
Textual's output thread from turning a dead terminal into a hang.
"""
from __future__ import annotations

import select
import signal
import sys

from textual.drivers._writer_thread import WriterThread
from textual.drivers.linux_driver import LinuxDriver

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


class HangupSafeWriter(WriterThread):
    """Textual's output thread (8.2.8, pinned), made safe for a terminal that is gone.

    Textual's thread ends at the first failed write (EIO once a pty's master side closed); the
    app's next writes then fill its 30-slot queue and the one after, or ``stop()``'s final put,
    waits forever. So an app whose terminal died in its first fraction of a second (while it was
    still drawing, before any hang-up check ran) never exited. Here a failed write means "the
    terminal is gone": the thread goes on taking (and dropping) output until ``stop()``, so no
    write and no stop can block, and the app leaves in bounded time.
    """

    terminal_gone = False

    def run(self) -> None:
        try:
            super().run()
        except (OSError, ValueError):          # EIO/EPIPE, or a closed file: nobody to draw for
            self.terminal_gone = True
            while self._queue.get() is not None:
                pass


class HangupSafeDriver(LinuxDriver):
    """Textual's Linux driver with ``HangupSafeWriter`` as its output thread.

    LinuxDriver makes its thread in ``start_application_mode`` and keeps it in ``_writer_thread``;
    this property swaps the new, not yet started thread for a HangupSafeWriter on the same file,
    so the rest of the driver is Textual's own code.
    """

    @property
    def _writer_thread(self) -> WriterThread | None:
        return self.__dict__.get("_hangup_safe_writer")

    @_writer_thread.setter
    def _writer_thread(self, thread: WriterThread | None) -> None:
        if thread is not None and not isinstance(thread, HangupSafeWriter):
            thread = HangupSafeWriter(thread._file)
        self.__dict__["_hangup_safe_writer"] = thread
