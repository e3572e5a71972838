"""Waiting for a real VM (QEMU runs the guest in TCG time; Linux boots in seconds) without timing
assertions: poll until a condition holds, and fail saying what never happened."""
from __future__ import annotations

import asyncio


async def until(what: str, check, timeout: float = 30.0, period: float = 0.05):
    """Await ``check()`` until it returns something true (returned); AssertionError naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(period)
    return value
