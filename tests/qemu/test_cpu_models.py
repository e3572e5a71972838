"""mtevm's builtin guest boots on every aarch64 CPU model QEMU offers, with MTE and without.

A user who creates a local VM with ``--no-mte`` (or a CPU model without MTE, such as cortex-a57)
gets a VM whose vCPUs all come up and count their accesses, all unchecked and with no tag faults;
with MTE on an MTE CPU model the same guest takes real tag-check faults. The list of models is
QEMU's own (``-cpu help``): a model that QEMU can run an AArch64 kernel on must be one mtevm knows.
"""
from __future__ import annotations

import asyncio
import re
import subprocess

import pytest

from backend.hosts.base import VmSpec
from backend.hosts.local import GUEST_ELF, LocalHost
from backend.hosts.workload import WorkloadConfig
from backend.machine import CPU_MODELS, VirtMachineConfig, cpu_has_tag_memory
from backend.qemu.argv import find_qemu
from backend.qemu.driver import kill_strays

pytestmark = pytest.mark.qemu
MIB = 1 << 20
MODELS = sorted(m for m in CPU_MODELS if m != "host")     # "host" needs KVM on an arm64 host
BUGGY = {"uaf_rate": 0.01, "overflow_rate": 0.01, "wild_rate": 0.01}   # faults, if anything checked


def runs_an_aarch64_kernel(model: str) -> bool:
    """Whether QEMU's virt machine boots an AArch64 ELF on ``model`` (started paused, then quit)."""
    r = subprocess.run([find_qemu(), "-M", "virt", "-cpu", model, "-nodefaults", "-display", "none", "-S",
                        "-kernel", GUEST_ELF, "-qmp", "stdio"],
                       input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return True
    assert "Invalid CPU model" in r.stderr or "incompatible architecture" in r.stderr, (model, r.stderr)
    return False


def test_mtevm_offers_every_aarch64_cpu_model_qemu_has():
    listed = subprocess.run([find_qemu(), "-cpu", "help"], capture_output=True, text=True, check=True).stdout
    qemu_models = [m.group(1) for m in re.finditer(r"^\s+(\S+)", listed, re.M) if "deprecated" not in m.group(0)]
    assert "cortex-a57" in qemu_models and "max" in qemu_models
    assert sorted(m for m in qemu_models if runs_an_aarch64_kernel(m)) == MODELS


@pytest.fixture
async def host(tmp_path):
    yield LocalHost(str(tmp_path / "rt"))
    assert await kill_strays(str(tmp_path)) == [], "the test left QEMU processes running"


async def boot_and_count(host: LocalHost, tmp_path, model: str, mte: bool) -> list[dict]:
    """Start a 2-vCPU VM of ``model``; sample until both vCPUs are up and have made 5000 accesses."""
    spec = VmSpec(VirtMachineConfig(name=f"{model}-{mte}", vcpus=2, memory=128 * MIB, cpu=model, mte=mte),
                  WorkloadConfig(seed=7, tcf=["sync", "async"], rate=20000, heap_size=64 << 10, **BUGGY),
                  str(tmp_path / "rt" / f"{model}-{mte}"))
    vm = await host.start(spec)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            vcpus = await vm.sample()
            assert vm.guest_status().get("error") is None, vm.stderr_tail()
            if all(v["up"] and v["checked"] + v["unchecked"] >= 5000 for v in vcpus):
                return vcpus
            assert loop.time() < deadline, f"{model}: the vCPUs never came up and counted: {vcpus}"
            await asyncio.sleep(0.1)
    finally:
        await vm.stop()


@pytest.mark.parametrize("model", MODELS)
async def test_the_guest_runs_without_mte_on_every_model(host, tmp_path, model):
    vcpus = await boot_and_count(host, tmp_path, model, mte=False)
    for v in vcpus:
        assert v["checked"] == 0 and v["unchecked"] >= 5000          # nothing is checked without MTE
        assert v["sync_faults"] == v["async_faults"] == 0 and v["last_fault"] is None
        assert v["boot_tags"] is None                                  # no tags to verify
        assert v["kvm_mte"] is False


@pytest.mark.parametrize("model", [m for m in MODELS if cpu_has_tag_memory(m)])
async def test_the_guest_takes_tag_faults_with_mte_on_every_mte_model(host, tmp_path, model):
    sync_cpu, async_cpu = await boot_and_count(host, tmp_path, model, mte=True)
    assert sync_cpu["checked"] >= 5000 and sync_cpu["sync_faults"] > 0 and sync_cpu["boot_tags"] is True
    assert async_cpu["checked"] >= 5000 and async_cpu["async_faults"] > 0 and async_cpu["boot_tags"] is True
