"""The ``local`` host with real qemu-system-aarch64 VMs running mtevm's MTE guest under TCG.

What a user relies on: the probe and the create-form check tell the truth about this machine,
a started VM shows live per-vCPU counters of real tag-check faults, QEMU's own errors reach the
user, a killed QEMU shows as crashed without touching other VMs, and a new daemon finds running
VMs again. Every QEMU a test starts is stopped and verified gone by PID.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import signal

import pytest

from backend.errors import ConfigError, RealizeError, StateError
from backend.hosts.base import VmSpec
from backend.hosts.local import LocalHost
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig
from backend.qemu.driver import kill_strays, proc_start_time, qemus_mentioning

pytestmark = pytest.mark.qemu
MIB = 1 << 20


@pytest.fixture
async def host(tmp_path):
    """A LocalHost for the test; afterwards no QEMU of its VMs may be left (killed by PID if so)."""
    yield LocalHost(str(tmp_path / "rt"))
    assert await kill_strays(str(tmp_path)) == [], "the test left QEMU processes running"


def spec_for(tmp_path, name="vm1", *, vcpus=1, memory=128 * MIB, cpu="max", **workload) -> VmSpec:
    workload.setdefault("rate", 0)   # flat out: counters move fast
    return VmSpec(VirtMachineConfig(name=name, vcpus=vcpus, memory=memory, cpu=cpu),
                  WorkloadConfig(**workload), str(tmp_path / "rt" / name))


async def sample_until(vm, predicate, timeout=20.0):
    """Sample until ``predicate(vcpus)`` holds (the guest boots and counts in TCG time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        vcpus = await vm.sample()
        if predicate(vcpus):
            return vcpus
        assert loop.time() < deadline, f"guest counters never satisfied the test: {vcpus}"
        await asyncio.sleep(0.1)


def test_info_and_probe_describe_this_machine():
    h = LocalHost()
    report = h.probe()
    assert report["host"] == "local"
    assert report["qemu"]["mte"] is True and "tcg" in report["qemu"]["accels"]
    assert int(report["qemu"]["version"].split(".")[0]) >= 8 and report["qemu"]["usable_for_mte"]
    info = h.info()
    assert info["name"] == "local" and info["kind"] == "local"
    assert info["arch"] == platform.machine()
    assert info["available"] is True, info["reason"]
    assert info["kvm_mte"] == bool(report["kvm"]["cap_arm_mte"] and report["cpu"]["mte"])


def test_check_config_applies_the_seed_rules_without_starting_qemu():
    h = LocalHost()
    h.check_config(VirtMachineConfig(name="ok", vcpus=2))
    with pytest.raises(RealizeError) as err:
        h.check_config(VirtMachineConfig(name="a57", cpu="cortex-a57"))
    assert str(err.value) == "MTE requested, but not supported by the guest CPU"
    h.check_config(VirtMachineConfig(name="nomte", cpu="cortex-a57", mte=False))
    with pytest.raises(ConfigError, match="1 to 8 vCPUs"):
        h.check_config(VirtMachineConfig(name="big", vcpus=9))


async def test_without_qemu_the_host_says_how_to_get_it(tmp_path):
    h = LocalHost(str(tmp_path), qemu_binary="/nonexistent/qemu-system-aarch64")
    info = h.info()
    assert info["available"] is False and "install" in info["reason"]
    with pytest.raises(RealizeError, match="install QEMU >= 8.0 with `bash scripts/install-deps.sh`"):
        h.check_config(VirtMachineConfig(name="x"))
    with pytest.raises(RealizeError, match="not found"):
        await h.start(spec_for(tmp_path))


def test_check_config_says_in_qemus_words_whether_kvm_can_run_here():
    config = VirtMachineConfig(name="k", accel="kvm", cpu="host", mte=False)
    if platform.machine() == "aarch64" and os.path.exists("/dev/kvm"):
        LocalHost().check_config(config)            # an arm64 host with KVM: a plain KVM VM is fine
        return
    with pytest.raises(RealizeError) as err:
        LocalHost().check_config(config)
    assert str(err.value) == "qemu-system-aarch64: -accel kvm: invalid accelerator kvm"


async def test_a_real_vm_counts_tag_check_faults_per_vcpu(host, tmp_path):
    spec = spec_for(tmp_path, vcpus=2, tcf=["sync", "async"], uaf_rate=0.01)
    vm = await host.start(spec)
    assert vm.state == "running"
    first = await sample_until(vm, lambda v: all(c["checked"] > 0 for c in v))
    # The guest publishes `checked` once per batch and faults as they happen: wait for both.
    later = await sample_until(vm, lambda v: v[0]["sync_faults"] > first[0]["sync_faults"]
                               and v[1]["async_faults"] > first[1]["async_faults"]
                               and v[0]["checked"] > first[0]["checked"])
    assert [c["index"] for c in later] == [0, 1]
    assert [c["tcf"] for c in later] == ["sync", "async"]
    assert all(c["kvm_mte"] is False for c in later)          # TCG: QEMU keeps the tags
    assert later[0]["async_faults"] == 0 and later[1]["sync_faults"] == 0
    assert later[0]["last_fault"]["kind"] == "sync" and later[0]["last_fault"]["vcpu"] == 0
    assert later[0]["last_fault"]["ptr_tag"] != later[0]["last_fault"]["mem_tag"]
    assert vm.last_faults(5) and vm.last_faults(5)[0]["kind"] in ("sync", "async")
    assert vm.tag_memory()["bytes"] == 128 * MIB // 32       # QEMU's mach-virt.tag block
    assert await vm.blocked_reasons() == []                  # TCG MTE does not block migration
    with pytest.raises(StateError, match="boot parameter"):
        vm.set_tcf(0, "async")
    pid = vm.proc.pid
    await vm.stop()
    assert vm.state == "stopped"
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(vm.params_file)


async def test_a_secure_vm_boots_and_counts(host, tmp_path):
    spec = spec_for(tmp_path, "sec")
    spec.config.secure = True                                # -M virt,mte=on,secure=on: the guest starts at EL3
    vm = await host.start(spec)
    assert "virt,mte=on,secure=on" in vm.proc.argv
    vcpus = await sample_until(vm, lambda v: v[0]["checked"] > 0 and v[0]["boot_tags"] is True)
    assert vcpus[0]["up"] is True
    await vm.stop()


async def test_qemus_start_error_reaches_the_user_and_nothing_is_left(host, tmp_path):
    spec = spec_for(tmp_path, cpu="cortex-a57")
    with pytest.raises(RealizeError) as err:
        await host.start(spec)
    assert str(err.value) == "qemu-system-aarch64: MTE requested, but not supported by the guest CPU"
    assert host.vms == set()
    leftovers = [f for f in os.listdir(spec.runtime_dir) if not f.endswith(".log")]
    assert leftovers == []


async def test_bad_extra_args_are_refused_before_qemu_starts(host, tmp_path):
    with pytest.raises(ConfigError, match="'-incoming' is not allowed"):
        await host.start(spec_for(tmp_path), extra_args=["-incoming", "defer"])
    assert host.vms == set()


async def test_a_killed_qemu_shows_as_crashed_and_others_run_on(host, tmp_path):
    victim = await host.start(spec_for(tmp_path, "victim"))
    other = await host.start(spec_for(tmp_path, "other"))
    os.kill(victim.proc.pid, signal.SIGKILL)
    assert await victim.proc.wait(10)
    assert victim.state == "crashed"
    assert victim.stderr_tail()[-1] == "QEMU was killed by SIGKILL"
    assert victim.runtime_info() == {}
    await victim.sample()                                    # sampling a crashed VM does not fail
    assert other.state == "running"
    before = (await other.sample())[0]["checked"]
    await sample_until(other, lambda v: v[0]["checked"] > before)
    await other.stop()
    await victim.stop()                                      # stopping a crashed VM just tidies up


async def test_a_new_daemon_reattaches_a_running_vm(host, tmp_path):
    spec = spec_for(tmp_path)
    vm = await host.start(spec)
    seen = await sample_until(vm, lambda v: v[0]["checked"] > 0)
    runtime = vm.runtime_info()
    await host.close()                                       # the daemon exits; QEMU runs on
    assert proc_start_time(runtime["pid"]) == runtime["start_time"]

    new_daemon = LocalHost(host.runtime_dir)
    stale = dict(runtime, start_time=runtime["start_time"] + 1)
    assert await new_daemon.reattach(spec, stale) is None    # a reused pid is not our QEMU
    again = await new_daemon.reattach(spec, runtime)
    assert again is not None and again.state == "running"
    await sample_until(again, lambda v: v[0]["checked"] > seen[0]["checked"])   # the same guest, still counting
    await again.stop()
    assert not os.path.exists(f"/proc/{runtime['pid']}")
    assert await LocalHost(host.runtime_dir).reattach(spec, runtime) is None


async def test_a_qemu_that_does_not_answer_on_reattach_is_stopped_not_left_running(host, tmp_path):
    from qemu.qmp import QMPClient
    spec = spec_for(tmp_path)
    vm = await host.start(spec)
    runtime = vm.runtime_info()
    await host.close()
    squatter = QMPClient("someone-else")                     # takes QEMU's one QMP connection
    await squatter.connect(runtime["qmp_socket"])
    try:
        new_daemon = LocalHost(host.runtime_dir)
        new_daemon.reattach_timeout = 0.5
        with pytest.raises(StateError, match=rf"QEMU pid {runtime['pid']} did not answer on QMP .*it was stopped"):
            await new_daemon.reattach(spec, runtime)
        assert proc_start_time(runtime["pid"]) is None
    finally:
        try:
            await squatter.disconnect()
        except EOFError:
            pass


@pytest.mark.slow
def test_a_real_vm_outlives_its_daemon_and_the_next_daemon_takes_it_back(run_mtevm, mtevm_paths):
    """Through the real CLI and daemon: start a local VM, stop the daemon, and find the VM still
    running (and counting) from a new daemon, which can then stop it."""
    assert run_mtevm("create", "--host", "local", "--memory", "128M", "--vcpus", "1", "--rate", "0",
                     "keeper").returncode == 0
    started = run_mtevm("start", "keeper")
    assert started.returncode == 0, started.stderr
    first = json.loads(run_mtevm("counters", "keeper", "--json").stdout)
    assert run_mtevm("daemon", "stop").returncode == 0
    assert qemus_mentioning(mtevm_paths.runtime_dir), "QEMU did not outlive the daemon"

    listed = json.loads(run_mtevm("list", "--json").stdout)        # a new daemon starts on demand
    assert [(v["name"], v["state"]) for v in listed] == [("keeper", "running")]
    later = json.loads(run_mtevm("counters", "keeper", "--json").stdout)
    assert later["vm"]["checked"] > first["vm"]["checked"]             # the same guest, still counting
    assert run_mtevm("stop", "keeper").returncode == 0
    assert asyncio.run(kill_strays(mtevm_paths.runtime_dir)) == []

