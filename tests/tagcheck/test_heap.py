"""The simulated guest's tagged-heap workload (backend/hosts/heap.py)."""
import numpy as np
import pytest

from backend.errors import ConfigError
from backend.hosts.heap import TaggedHeapWorkload
from backend.hosts.workload import WorkloadConfig
from backend.tagcheck import GuestRam, TagCheckCpu

BASE = 0x40000000
STEPS, N = 10, 2048


def run(tcf="sync", seed=7, vcpu=0, mte=True, steps=STEPS, n=N, **rates):
    cfg = WorkloadConfig(seed=seed, tcf=["sync", tcf] if vcpu else [tcf], heap_size=64 << 10,
                         **{"uaf_rate": 0.0, "overflow_rate": 0.0, "wild_rate": 0.0, **rates})
    ram = GuestRam(BASE, 64 << 20, mte=mte)
    cpu = TagCheckCpu(ram, vcpu)
    heap = TaggedHeapWorkload(cpu, ram, cfg, vcpu)
    results = [heap.step(n) for _ in range(steps)]
    return heap, cpu, results


@pytest.mark.parametrize("tcf", ["sync", "async", "asymm"])
def test_without_bugs_every_access_is_checked_and_none_faults(tcf):
    heap, cpu, _ = run(tcf)
    c = cpu.counters
    assert (c.checked, c.unchecked, c.sync_faults, c.async_faults) == (STEPS * N, 0, 0, 0)
    assert cpu.tfsr == 0
    assert heap.frees > heap.nslots and heap.allocations > 2 * heap.nslots     # churn beyond the start-up
    assert heap.live_objects > 0


@pytest.mark.parametrize("bug", ["uaf_rate", "overflow_rate"])
def test_every_use_after_free_and_overflow_access_faults_synchronously(bug):
    _, cpu, results = run("sync", **{bug: 1.0})
    c = cpu.counters
    assert c.sync_faults == c.checked == STEPS * N and c.async_faults == 0
    assert all(set(r.fault_size) == {8} for r in results)


def test_overflow_faults_point_just_past_an_object():
    heap, _, results = run("sync", overflow_rate=1.0, steps=1)
    r = results[0]
    in_slot = (r.fault_addr & np.uint64((1 << 56) - 1)) - np.uint64(heap.heap_base)
    assert ((in_slot % np.uint64(heap.slot_size)) >= 16).all()          # never the object's first granule
    assert (r.fault_addr % np.uint64(16) == 0).all()


def test_wild_pointers_fault_unless_their_random_tag_happens_to_match():
    _, cpu, _ = run("sync", wild_rate=1.0)
    assert 0.8 * STEPS * N < cpu.counters.sync_faults < STEPS * N


@pytest.mark.parametrize("tcf,sync,async_", [("sync", True, False), ("async", False, True),
                                             ("asymm", True, True), ("none", False, False)])
def test_bug_rates_give_faults_of_the_kind_the_tcf_says(tcf, sync, async_):
    _, cpu, _ = run(tcf, uaf_rate=0.01, overflow_rate=0.01, wild_rate=0.01)
    c = cpu.counters
    assert (c.sync_faults > 0) == sync and (c.async_faults > 0) == async_
    assert (cpu.tfsr != 0) == async_
    if tcf == "none":
        assert c.unchecked == STEPS * N and c.checked == 0
    else:
        assert c.checked == STEPS * N
        assert 0.02 * STEPS * N < c.sync_faults + c.async_faults < 0.04 * STEPS * N


def test_same_seed_gives_identical_counters_and_faults():
    rates = {"uaf_rate": 0.01, "overflow_rate": 0.005, "wild_rate": 0.005}
    _, a, ra = run("asymm", seed=11, **rates)
    _, b, rb = run("asymm", seed=11, **rates)
    _, c, _ = run("asymm", seed=12, **rates)
    assert a.counters.to_dict() == b.counters.to_dict()
    assert all(np.array_equal(x.fault_addr, y.fault_addr) and np.array_equal(x.fault_index, y.fault_index)
               for x, y in zip(ra, rb))
    assert a.counters.to_dict() != c.counters.to_dict()


def test_each_vcpu_has_its_own_heap_slice_and_tcf():
    heap0, _, _ = run(steps=1)
    heap1, cpu1, _ = run("async", vcpu=1, steps=1)
    assert heap1.heap_base == heap0.heap_base + (64 << 10)
    assert str(cpu1.tcf) == "async"
    assert heap0.heap_base == BASE + 0x0100_0000          # where the real guest's heap starts


def test_a_heap_that_does_not_fit_in_ram_is_a_config_error():
    ram = GuestRam(BASE, 32 << 20, mte=True)
    with pytest.raises(ConfigError, match="does not fit"):
        TaggedHeapWorkload(TagCheckCpu(ram), ram, WorkloadConfig(heap_size=32 << 20), 0)


def test_vm_without_mte_runs_unchecked():
    _, cpu, _ = run(mte=False, uaf_rate=0.1)
    assert cpu.counters.unchecked == STEPS * N and cpu.counters.sync_faults == 0


def test_sync_faults_do_not_stop_the_workload():
    heap, cpu, results = run("sync", uaf_rate=0.05, steps=3)
    assert all(r.sync_faults > 0 and r.checked == N for r in results)
    assert heap.step(100).checked == 100
