"""mtevm's Linux guest on a real libvirt host reached over qemu+ssh: the kernel and initramfs go
into the host's pool through libvirt's storage API, libvirt boots them with the same command line
as the local host, and the guest agent is reached through the domain's virtio-serial channel
(virDomainOpenChannel, inside the ssh-tunnelled libvirt connection) by the same agent client the
local host uses. Counters, guest facts, exec with exact fault counts, the serial console, a
daemon restart, a live migration to the other libvirt host (the agent reconnects there, counts
continue), a libvirt snapshot reverted with the agent back, clean poweroff; then a second boot
that panics (crashed, domain destroyed) and a third whose agent misses shutdown's timeout
(destroyed, said so)."""
from __future__ import annotations

import asyncio
import subprocess
import xml.etree.ElementTree as ET

import pytest

from backend.client import connect
from backend.errors import ConfigError
from backend.guests.linux import image
from tests.helpers.polling import until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def linux_image() -> image.BuiltImage:
    image.build()      # seconds when it is up to date
    return image.linux_image()


def virsh(uri: str, *args: str) -> str:
    r = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


async def agent_ready(c):
    vm = await c.show("lx")
    return vm if vm["state"] == "running" and (vm.get("guest_facts") or {}).get("agent") == "connected" else None


def vm_faults(vm: dict) -> tuple[int, int]:
    return (sum(c["sync_faults"] for c in vm["vcpus"]), sum(c["async_faults"] for c in vm["vcpus"]))


async def test_a_linux_guest_on_a_libvirt_host_over_ssh(libvirt_env, mtevm_paths, linux_image):
    uri = libvirt_env.uri_b
    c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    try:
        await c.host_add("hostb", uri)
        with pytest.raises(ConfigError, match="--guest custom needs --host local"):
            await c.create({"name": "cx", "host": "hostb", "guest": {"kind": "custom", "kernel": linux_image.kernel}})
        vm = await c.create({"name": "lx", "host": "hostb", "vcpus": 2, "memory": "256M",
                             "workload": {"tcf": "none", "rate": 2000},
                             "guest": {"kind": "linux", "fault_address": True}})
        assert vm["guest"] == {"kind": "linux", "fault_address": True}
        await c.start("lx")

        # The domain libvirt runs: the image's kernel and initramfs from mtevm's pool, the local
        # host's command line (workload parameters), the agent's virtio-serial channel.
        dom = ET.fromstring(virsh(uri, "dumpxml", "lx"))
        assert dom.findtext("os/kernel") == "/var/lib/libvirt/mtevm/lx.Image"
        assert dom.findtext("os/initrd") == "/var/lib/libvirt/mtevm/lx.initrd"
        assert "mtevm.tcf=none,none" in dom.findtext("os/cmdline")
        assert dom.find("devices/channel/target[@name='org.mtevm.agent.0']") is not None
        assert {"lx.Image", "lx.initrd"} <= {ln.split()[0] for ln in virsh(uri, "vol-list", "mtevm").splitlines()[2:]
                                             if ln.split()}

        async def agent_and_workload():
            vm = await c.show("lx")
            ready = (vm.get("guest_facts") or {}).get("agent") == "connected"
            return vm if ready and all(v["checked"] > 0 for v in vm["vcpus"]) else None
        vm = await until("the guest agent to connect and the workload to count", agent_and_workload, timeout=180)
        facts = vm["guest_facts"]
        # started paused, resumed once mtevm read the console: the log has the guest's first line
        # (with `quiet` the kernel prints nothing before the initramfs' own) right after mtevm's mark
        log = (await c.console_log("lx", 400))["lines"]
        mark = max(i for i, line in enumerate(log) if line.startswith("-- mtevm: domain lx started"))
        assert [line for line in log[mark + 1:] if line][:1] == ["mtevm: init ready"], log
        assert facts["kernel"] == linux_image.kernel_release
        assert facts["hwcap2_mte"] is True and [x["cpu"] for x in facts["cpus"]] == [0, 1]
        assert all(v["tcf"] == "none" for v in vm["vcpus"])
        checked = (await c.counters("lx"))["vm"]["checked"]

        async def rising():
            n = (await c.counters("lx"))["vm"]["checked"]
            return n if n > checked else None
        await until("the counters to rise", rising, timeout=60)

        # exec through the same agent client: exact per-process and guest-wide counts
        before = vm_faults(await c.show("lx"))
        with open(linux_image.program("mte-faults"), "rb") as f:
            program = f.read()
        msgs = [m async for m in c.exec("lx", ["37", "23"], program="mte-faults", data=program)]
        exit_msg = msgs[-1]
        assert exit_msg["type"] == "exec-exit" and exit_msg["status"] == 0
        assert exit_msg["faults"] == {"sync": 37, "async": 23}
        out = b"".join(m["data"] for m in msgs if m["type"] == "exec-output")
        assert b"sync 37/37 async 23/23" in out

        async def counted():
            vm = await c.show("lx")
            return vm if vm_faults(vm) == (before[0] + 37, before[1] + 23) else None
        vm = await until("the guest-wide counters to take the program's faults", counted, timeout=30)
        [proc] = [p for p in vm["processes"] if p["pid"] == exit_msg["pid"]]
        assert proc == {"pid": exit_msg["pid"], "comm": "mte-faults", "sync": 37, "async": 23}

        # the serial console (the PL011 on a pty, read through virDomainOpenConsole): type into the
        # guest's shell, read the answer; the daemon's console log has it too
        async with c.console("lx") as con:
            await con.write(b"echo hello-$((6*7))\r")
            seen = b""
            while b"hello-42" not in seen:
                chunk = await asyncio.wait_for(con.read(), 30)
                assert chunk is not None, seen
                seen += chunk
        assert any("hello-42" in line for line in (await c.console_log("lx", 50))["lines"])

        # a new daemon: the domain is picked up by name, the channel taken over (FORCE), same counts
        await c.close()
        c = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)

        async def agent_back():
            vm = await c.show("lx")
            ready = vm["state"] == "running" and (vm.get("guest_facts") or {}).get("agent") == "connected"
            return vm if ready and vm_faults(vm) == (before[0] + 37, before[1] + 23) else None
        vm = await until("the agent to answer the new daemon", agent_back, timeout=60)

        # a live migration to the other host (ssh -> unix): the kernel and initramfs go to its pool
        # first, the new domain's channel is opened there, the agent's cumulative counts continue
        await c.host_add("hosta", libvirt_env.uri_a)
        moved = vm_faults(vm)
        m = await c.migrate("lx", "hosta")

        async def migrated():
            return next((x for x in await c.migrations() if x["id"] == m["id"] and x["state"] in
                         ("completed", "failed", "blocked")), None)
        record = await until("the migration to end", migrated, timeout=120)
        assert record["state"] == "completed", record

        async def agent_on_hosta():
            vm = await c.show("lx")
            ready = vm["host"] == "hosta" and (vm.get("guest_facts") or {}).get("agent") == "connected"
            return vm if ready and vm_faults(vm) == moved else None
        await until("the agent to answer on hosta with the same counts", agent_on_hosta, timeout=60)
        msgs = [m async for m in c.exec("lx", ["3", "0"], program="mte-faults", data=program)]
        assert msgs[-1]["type"] == "exec-exit" and msgs[-1]["faults"] == {"sync": 3, "async": 0}
        assert "lx" not in virsh(uri, "list", "--all", "--name").split()

        # a libvirt snapshot of the running Linux guest comes back with its agent: the reverted
        # domain's channel is opened anew and exec works again; the guest did not boot again
        await c.snapshot_save("lx", "up")
        assert (await c.snapshot_restore("lx", "up"))["state"] == "running"
        await until("the agent after the revert", lambda: agent_ready(c), timeout=60)
        out = [m["data"] async for m in c.exec("lx", ["-c", "echo restored"], path="/bin/sh")
               if m.get("type") == "exec-output"]
        assert b"".join(out) == b"restored\n"

        # stop = the agent's poweroff: libvirt sees the guest shut itself down
        vm = await c.shutdown("lx")
        assert vm["state"] == "stopped" and vm["outcome"]["how"] == "agent"
        assert virsh(libvirt_env.uri_a, "domstate", "lx") == "shut off"

        # a guest kernel panic seen on the console: the VM is crashed with the panic as its last
        # error, and the hung domain is destroyed
        await c.start("lx")
        await until("the agent after a second boot", lambda: agent_ready(c), timeout=180)
        async with c.console("lx") as con:
            await con.write(b"echo c > /proc/sysrq-trigger\r")

        async def crashed():
            vm = await c.show("lx")
            return vm if vm["state"] == "crashed" else None
        vm = await until("the VM to be crashed", crashed, timeout=60)
        assert vm["last_error"] == "guest kernel panic: Kernel panic - not syncing: sysrq triggered crash"
        await until("libvirt to shut the domain off",
                    lambda: asyncio.sleep(0, virsh(libvirt_env.uri_a, "domstate", "lx") == "shut off" or None),
                    timeout=30)

        # an agent that does not power the guest off within shutdown's timeout: destroyed, said so
        await c.start("lx")
        await until("the agent after a third boot", lambda: agent_ready(c), timeout=180)
        vm = await c.shutdown("lx", timeout=0.001)
        assert vm["state"] == "stopped" and vm["outcome"]["how"] == "stop"
        assert vm["outcome"]["message"] == ("VM lx: the guest did not power off within 0.001 s: "
                                            "stopped it instead (virDomainDestroy)")
        assert virsh(libvirt_env.uri_a, "domstate", "lx") == "shut off"
    finally:
        for vm in await c.list():
            if vm["state"] in ("running", "paused") and vm["host"] in ("hosta", "hostb"):
                await c.stop(vm["name"])
        await c.close()
