"""Reading a real pty in tests (the console attach tests type into and read from one)."""
from __future__ import annotations

import os
import select
import subprocess
import time


def read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    """Read ``fd`` until ``needle`` has been seen; fail with the tail of what came instead."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen; got {seen[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    assert needle in seen, seen
    return seen


def reap(master: int, proc: subprocess.Popen) -> None:
    """Kill the attached process if it is still there (by PID) and close the pty."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    os.close(master)
