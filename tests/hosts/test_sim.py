"""Simulated hosts: VMs realized by the seed's decision tree, live counters, blockers and migration."""
import asyncio

import numpy as np
import pytest

from backend.errors import ConfigError, MigrationError, RealizeError, StateError
from backend.hosts.base import VmSpec
from backend.hosts.sim import SimHost
from backend.hosts.workload import WorkloadConfig
from backend.machine import VirtMachineConfig

MTE_BLOCKER = "Live migration disabled due to MTE enabled"
COUNTERS = ("checked", "unchecked", "sync_faults", "async_faults")
NO_BUGS = {"uaf_rate": 0.0, "overflow_rate": 0.0, "wild_rate": 0.0}


def spec(name="vm", *, accel="kvm", mte=True, vcpus=2, memory=64 << 20, only_migratable=False, **workload):
    config = VirtMachineConfig(name, vcpus=vcpus, memory=memory, accel=accel, mte=mte,
                               only_migratable=only_migratable)
    return VmSpec(config=config, workload=WorkloadConfig(**workload))


def totals(vm) -> dict:
    return {k: sum(v[k] for v in vm.vcpus()) for k in COUNTERS}


def counters_only(vm) -> list[dict]:
    return [{k: v for k, v in info.items() if k != "last_fault"} for info in vm.vcpus()]


async def wait_for(condition, what: str, timeout: float = 20.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def hosts():
    made = {"sim-mte": SimHost("sim-mte", host_mte=True), "sim-mte-2": SimHost("sim-mte-2", host_mte=True),
            "sim-nomte": SimHost("sim-nomte", host_mte=False)}
    yield made
    for host in made.values():
        await host.close()
        assert host.vms == set()


def tags_snapshot(vm) -> dict[int, np.ndarray]:
    tags = vm.machine.ram.tags
    return {addr: tags.get_tags(addr, 4096) for addr in tags.pages()}


# --- hosts -------------------------------------------------------------------------------------------

def test_host_info_and_probe(hosts):
    info = hosts["sim-mte"].info()
    assert info == {"name": "sim-mte", "kind": "simulated", "arch": "aarch64", "kvm_mte": True, "available": True,
                    "reason": None, "description": "simulated arm64 host whose KVM has KVM_CAP_ARM_MTE"}
    assert hosts["sim-nomte"].info()["kvm_mte"] is False
    assert hosts["sim-mte"].probe()["kvm"]["cap_arm_mte"] == 1
    assert hosts["sim-nomte"].probe()["kvm"]["cap_arm_mte"] == 0


def test_check_config_is_the_seeds_decision_tree(hosts):
    hosts["sim-mte"].check_config(spec(accel="kvm").config)
    with pytest.raises(RealizeError, match=r"^MTE requested, but not supported by KVM$"):
        hosts["sim-nomte"].check_config(spec(accel="kvm").config)
    hosts["sim-nomte"].check_config(spec(accel="tcg").config)


# --- start / stop / counters -----------------------------------------------------------------------

async def test_start_runs_and_stop_releases_everything(hosts):
    host = hosts["sim-mte"]
    vm = await host.start(spec(rate=20000))
    assert vm.state == "running" and host.vms == {vm}
    infos = vm.vcpus()
    assert [v["index"] for v in infos] == [0, 1]
    assert all(v["kvm_mte"] and v["tcf"] == "sync" for v in infos)
    assert await vm.blocked_reasons() == [MTE_BLOCKER]
    await wait_for(lambda: totals(vm)["checked"] > 0, "the vCPUs to run")
    kvm_vm, worker = vm.machine.kvm_vm, vm.worker
    assert worker is not None and worker.vms == {id(vm): vm}    # the vCPUs run in a worker process
    await vm.stop()
    assert vm.worker is None and worker.vms == {} and kvm_vm.closed and host.vms == set()
    assert vm.machine.migration.query_migrate() == {}
    frozen = totals(vm)
    await asyncio.sleep(0.2)
    assert totals(vm) == frozen


async def test_counters_move_and_faults_are_reported(hosts):
    vm = await hosts["sim-mte"].start(spec(rate=50000, uaf_rate=0.02, overflow_rate=0.02, wild_rate=0.01))
    await wait_for(lambda: totals(vm)["sync_faults"] > 0, "a sync fault")
    first = totals(vm)["checked"]
    await wait_for(lambda: totals(vm)["checked"] > first, "the workload to go on after sync faults")
    faults = vm.last_faults()
    assert faults and set(faults[0]) == {"vcpu", "kind", "addr", "ptr_tag", "mem_tag", "access", "size", "time"}
    assert faults[0]["kind"] == "sync" and faults[0]["addr"].startswith("0x")
    assert faults[0]["ptr_tag"] != faults[0]["mem_tag"]
    assert any(v["last_fault"] for v in vm.vcpus())
    first_sample = await vm.sample()
    await asyncio.sleep(0.1)
    second_sample = await vm.sample()
    assert [v["index"] for v in second_sample] == [0, 1]
    assert all(b[k] >= a[k] for a, b in zip(first_sample, second_sample) for k in COUNTERS)
    await vm.stop()


async def test_rate_zero_runs_flat_out_without_starving_the_loop(hosts):
    vm = await hosts["sim-mte"].start(spec(rate=0))
    ticks = 0
    for _ in range(20):                  # the event loop keeps turning while the VM runs flat out
        await asyncio.sleep(0.005)
        ticks += 1
    await wait_for(lambda: totals(vm)["checked"] > 0, "flat-out batches")
    assert ticks == 20
    await vm.stop()


async def test_deterministic_under_a_seed(hosts):
    runs = []
    for seed in (7, 7, 8):
        vm = await hosts["sim-mte"].start(spec(f"d{len(runs)}", rate=0, seed=seed, uaf_rate=0.01, overflow_rate=0.01,
                                               wild_rate=0.01, tcf=["sync", "async"]), run=False)
        for _ in range(5):
            vm.step(2000)
        runs.append(counters_only(vm))
        await vm.stop()
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0][0]["sync_faults"] > 0 and runs[0][1]["async_faults"] > 0 and runs[0][1]["sync_faults"] == 0


async def test_set_tcf_live(hosts):
    vm = await hosts["sim-mte"].start(spec(rate=0, seed=3, uaf_rate=0.05), run=False)
    vm.set_tcf(1, "async")
    assert [v["tcf"] for v in vm.vcpus()] == ["sync", "async"]
    vm.step(3000)
    infos = vm.vcpus()
    assert infos[1]["sync_faults"] == 0 and infos[1]["async_faults"] > 0 and infos[0]["sync_faults"] > 0
    vm.set_tcf(None, "none")
    before = counters_only(vm)
    vm.step(1000)
    after = counters_only(vm)
    assert all(a["checked"] == b["checked"] and a["unchecked"] > b["unchecked"] for a, b in zip(after, before))
    with pytest.raises(ConfigError, match=r"^tcf 'strict' is not one of none, sync, async, asymm$"):
        vm.set_tcf(0, "strict")
    with pytest.raises(ConfigError, match=r"^VM 'vm' has vCPUs 0 to 1: there is no vCPU 5$"):
        vm.set_tcf(5, "sync")
    await vm.stop()


async def test_tag_memory_is_reported_for_mte_vms_only(hosts):
    vm = await hosts["sim-mte"].start(spec(rate=0), run=False)
    vm.step(100)
    tm = vm.tag_memory()
    assert tm["tagged_pages"] > 0 and tm["bytes"] > 0
    plain = await hosts["sim-mte"].start(spec("plain", mte=False), run=False)
    assert plain.tag_memory() is None
    await vm.stop()
    await plain.stop()


# --- realize on simulated hosts ------------------------------------------------------------------------

async def test_kvm_mte_on_a_host_without_mte_fails_and_leaves_nothing(hosts):
    host = hosts["sim-nomte"]
    with pytest.raises(RealizeError) as e:
        await host.start(spec())
    assert str(e.value) == "MTE requested, but not supported by KVM"
    assert host.vms == set()


async def test_only_migratable_kvm_mte_vm_fails_cleanly(hosts):
    host = hosts["sim-mte"]
    with pytest.raises(RealizeError) as e:
        await host.start(spec(only_migratable=True))
    assert str(e.value) == ("disallowing migration blocker (--only-migratable) for: "
                            "Live migration disabled due to MTE enabled")
    assert host.vms == set()
    other = await host.start(spec("other"))           # the host and other VMs carry on
    assert await other.blocked_reasons() == [MTE_BLOCKER]


async def test_two_kvm_mte_vms_on_one_host_both_get_kvm_mte(hosts):
    a = await hosts["sim-mte"].start(spec("a"), run=False)
    b = await hosts["sim-mte"].start(spec("b"), run=False)
    assert all(v["kvm_mte"] for v in a.vcpus() + b.vcpus())


async def test_tcg_mte_vm_has_no_blocker(hosts):
    vm = await hosts["sim-nomte"].start(spec(accel="tcg"), run=False)
    assert await vm.blocked_reasons() == [] and not any(v["kvm_mte"] for v in vm.vcpus())


# --- migration -------------------------------------------------------------------------------------------

async def test_migrating_a_non_mte_vm_keeps_counters(hosts):
    src = await hosts["sim-mte"].start(spec(mte=False, rate=0, seed=5, uaf_rate=0.05), run=False)
    for _ in range(3):
        src.step(2000)
    before, faults_before = counters_only(src), src.last_faults()
    assert before[0]["checked"] + before[0]["unchecked"] > 0
    seen = []
    dst = await src.migrate_to(hosts["sim-nomte"], src.spec, False, lambda f, stats: seen.append((f, stats)))
    assert counters_only(dst) == before and dst.last_faults() == faults_before
    assert dst.host is hosts["sim-nomte"] and hosts["sim-nomte"].vms == {dst} and hosts["sim-mte"].vms == set()
    assert src.machine.kvm_vm is None                   # the source was stopped
    fractions = [f for f, _ in seen]
    assert len(fractions) > 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[-1][1]["status"] == "completed"
    dst.step(2000)
    after = counters_only(dst)
    assert all(a["unchecked"] > b["unchecked"] for a, b in zip(after, before))  # counters continue


async def test_running_vm_migrates_and_keeps_running(hosts):
    src = await hosts["sim-mte"].start(spec(accel="tcg", rate=20000))
    await wait_for(lambda: totals(src)["checked"] > 0, "the vCPUs to run")
    dst = await src.migrate_to(hosts["sim-mte-2"], src.spec, False, lambda f, s: None)
    moved = totals(dst)["checked"]
    assert moved >= totals(src)["checked"] > 0
    await wait_for(lambda: totals(dst)["checked"] > moved, "the destination to continue")
    assert src.worker is None and dst.worker is not None and dst.state == "running"


async def test_migration_within_one_host(hosts):
    """As QEMU migrates to localhost: a second machine on the same host takes over."""
    host = hosts["sim-mte"]
    src = await host.start(spec(rate=0, seed=4, **NO_BUGS), run=False)
    src.step(1000)
    before = counters_only(src)
    dst = await src.migrate_to(host, src.spec, True, lambda f, s: None)
    assert host.vms == {dst} and counters_only(dst) == before
    assert dst.machine.kvm_vm is not None and src.machine.kvm_vm is None


async def test_kvm_mte_vm_is_blocked_with_qemus_text(hosts):
    src = await hosts["sim-mte"].start(spec(rate=0), run=False)
    with pytest.raises(MigrationError) as e:
        await src.migrate_to(hosts["sim-mte-2"], src.spec, False, lambda f, s: None)
    assert str(e.value) == "Live migration disabled due to MTE enabled"
    assert hosts["sim-mte-2"].vms == set() and hosts["sim-mte"].vms == {src}
    assert src.machine.migration.query_migrate() == {"blocked-reasons": [MTE_BLOCKER]}


async def test_with_tags_migration_moves_every_tag(hosts):
    src = await hosts["sim-mte"].start(spec(rate=0, seed=11, **NO_BUGS), run=False)
    for _ in range(4):
        src.step(3000)
    assert totals(src)["checked"] > 0 and totals(src)["sync_faults"] == 0
    tags = tags_snapshot(src)
    assert tags
    progress = []
    dst = await src.migrate_to(hosts["sim-mte-2"], src.spec, True, lambda f, stats: progress.append(stats))
    stats = progress[-1]
    assert stats["with_tags"] is True and stats["tags_verified"] == len(tags) * 256
    assert stats["tags"] == "copied with KVM_ARM_MTE_COPY_TAGS and verified"
    moved = tags_snapshot(dst)
    assert moved.keys() == tags.keys()
    assert all(np.array_equal(moved[a], t) for a, t in tags.items())
    assert await dst.blocked_reasons() == [MTE_BLOCKER]        # a KVM MTE VM again on its new host
    before = totals(dst)
    for _ in range(4):
        dst.step(3000)
    # The heap's live objects still match their tags: a bug-free workload still takes no fault.
    assert totals(dst)["checked"] > before["checked"] and totals(dst)["sync_faults"] == 0


async def test_with_tags_to_a_host_without_mte_is_refused(hosts):
    src = await hosts["sim-mte"].start(spec(rate=20000))
    with pytest.raises(MigrationError) as e:
        await src.migrate_to(hosts["sim-nomte"], src.spec, True, lambda f, s: None)
    assert str(e.value) == "destination sim-nomte has no KVM_CAP_ARM_MTE: cannot migrate MTE tags"
    assert hosts["sim-nomte"].vms == set() and src.state == "running"
    now = totals(src)["checked"]
    await wait_for(lambda: totals(src)["checked"] > now, "the source to keep running")


async def test_tcg_mte_vm_tags_travel_with_ram_even_to_a_host_without_mte(hosts):
    src = await hosts["sim-mte"].start(spec(accel="tcg", rate=0, seed=2, **NO_BUGS), run=False)
    src.step(3000)
    tags = tags_snapshot(src)
    dst = await src.migrate_to(hosts["sim-nomte"], src.spec, False, lambda f, s: None)
    moved = tags_snapshot(dst)
    assert moved.keys() == tags.keys() and all(np.array_equal(moved[a], t) for a, t in tags.items())
    dst.step(3000)
    assert totals(dst)["sync_faults"] == 0


async def test_destination_that_cannot_realize_fails_the_migration(hosts):
    src = await hosts["sim-mte"].start(spec(mte=True, accel="kvm", rate=0), run=False)
    src.machine.migration.remove_blocker(MTE_BLOCKER)    # as if nothing blocked it
    with pytest.raises(MigrationError) as e:
        await src.migrate_to(hosts["sim-nomte"], src.spec, False, lambda f, s: None)
    assert str(e.value) == "cannot start VM 'vm' on sim-nomte: MTE requested, but not supported by KVM"
    assert hosts["sim-nomte"].vms == set() and hosts["sim-mte"].vms == {src}


async def test_migration_to_another_kind_of_host_is_refused(hosts, tmp_path):
    from backend.hosts.local import LocalHost
    src = await hosts["sim-mte"].start(spec(mte=False), run=False)
    with pytest.raises(MigrationError, match=r"^cannot migrate from a simulated host to a local host$"):
        await src.migrate_to(LocalHost(str(tmp_path)), src.spec, False, lambda f, s: None)


async def test_stopped_vm_cannot_migrate(hosts):
    src = await hosts["sim-mte"].start(spec(mte=False), run=False)
    await src.stop()
    with pytest.raises(StateError, match=r"^VM 'vm' is not running$"):
        await src.migrate_to(hosts["sim-nomte"], src.spec, False, lambda f, s: None)


async def test_async_progress_callbacks_are_awaited(hosts):
    src = await hosts["sim-mte"].start(spec(mte=False, rate=0), run=False)
    src.step(500)
    calls = []

    async def progress(fraction, stats):
        await asyncio.sleep(0)
        calls.append(fraction)

    await src.migrate_to(hosts["sim-nomte"], src.spec, False, progress)
    assert calls and calls[-1] == 1.0


async def test_a_simulated_host_refuses_extra_qemu_arguments(hosts):
    """There is no QEMU process on a simulated host to pass them to: a clear error, nothing started."""
    host = hosts["sim-mte"]
    s = spec()
    s.extra_args = ["-device", "ivshmem-plain,memdev=shm"]
    with pytest.raises(ConfigError, match=r"^qemu_args: host sim-mte is simulated: it runs no QEMU process"):
        await host.start(s)
    assert host.vms == set()
    assert host.check_extra_args([]) == [] and host.check_extra_args(None) == []
