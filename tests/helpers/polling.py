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


async def resume_and_check_boot_tags(client, vm: str, timeout: float = 30.0) -> dict:
    """Resume a paused (e.g. just restored) built-in guest and wait until it has checked the tags
    it stored at boot once more (LDG of each granule); its vCPU 0 then. Whether they all still
    matched is ``boot_tags``: the caller asserts it."""
    checks = (await client.vcpus(vm))[0]["boot_tag_checks"]
    await client.resume(vm)

    async def checked_again():
        v = (await client.vcpus(vm))[0]
        return v if v["boot_tag_checks"] > checks else None
    return await until("the boot tags to be verified again", checked_again, timeout)
