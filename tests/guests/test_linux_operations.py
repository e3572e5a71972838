"""snapshot, reboot and shutdown of a real Linux MTE guest: its agent is back after a restore; the
agent's clean reboot and power-off (docs/agent-protocol.md "reboot"/"poweroff"), not a reset or
QEMU's quit; an agent too slow for --timeout: stopped, said so. One 1-vCPU VM (booted twice);
every QEMU is checked gone by PID at the end."""
from __future__ import annotations

import pytest

from backend.client import connect
from backend.qemu.driver import kill_strays
from tests.helpers.polling import until

pytestmark = pytest.mark.qemu


async def test_the_agent_reboots_and_powers_the_guest_off_cleanly(linux_image, mtevm_paths):
    c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    try:
        # --no-fault-address (addresses are on by default): the agent is told so on every connect
        await c.create({"name": "lx", "host": "local", "memory": "512M", "vcpus": 1,
                        "guest": {"kind": "linux", "fault_address": False}})
        await c.start("lx")

        async def agent_up():
            return ((await c.show("lx")).get("guest_facts") or {}).get("agent") == "connected"

        async def boots() -> int:
            return sum("mtevm: init ready" in line for line in (await c.console_log("lx", 2000))["lines"])
        await until("the guest agent", agent_up, timeout=120)
        assert await boots() == 1

        async def addresses_off():
            facts = (await c.show("lx")).get("guest_facts") or {}
            why = facts.get("fault_address_why") or ""
            return facts.get("fault_address") is False and "turned off by the host" in why
        await until("the guest's facts to say fault addresses are off, as asked", addresses_off, timeout=10)

        # A snapshot of the running Linux guest comes back with its agent (exec works again).
        await c.snapshot_save("lx", "up")
        assert (await c.snapshot_restore("lx", "up"))["state"] == "running"
        await until("the guest agent after the restore", agent_up, timeout=60)
        out = [m["data"] async for m in c.exec("lx", ["-c", "echo restored"], path="/bin/sh")
               if m.get("type") == "exec-output"]
        assert b"".join(out) == b"restored\n"
        assert await boots() == 1                                    # restored, not booted again

        vm = await c.reboot("lx")
        assert vm["outcome"] == {"how": "agent", "message": "VM lx: the guest's agent rebooted it"}
        assert vm["state"] == "running" and await boots() == 2      # the same QEMU, the guest booted again
        assert await agent_up()
        await until("fault addresses still off in the rebooted guest", addresses_off, timeout=10)

        vm = await c.shutdown("lx", timeout=60)
        assert vm["outcome"] == {"how": "agent", "message": "VM lx: the guest's agent powered it off"}
        assert vm["state"] == "stopped" and vm["last_error"] is None
        assert any("reboot: Power down" in line for line in (await c.console_log("lx", 2000))["lines"])

        # An agent that does not finish within the timeout: mtevm stops the VM and says so.
        await c.start("lx")
        await until("the guest agent", agent_up, timeout=120)
        vm = await c.shutdown("lx", timeout=0.001)
        assert vm["state"] == "stopped" and vm["outcome"]["how"] == "stop"
        assert vm["outcome"]["message"] == ("VM lx: the guest did not power off within 0.001 s: "
                                            "stopped it instead (QMP quit)")
    finally:
        await c.close()
        assert await kill_strays(mtevm_paths.runtime_dir) == [], "a QEMU was left running"
