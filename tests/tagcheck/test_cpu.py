"""TagCheckCpu: IRG/ADDG/SUBG, checked loads and stores under every TCF, TCMA, TCO, FAR, counters.

Each rule is checked on the per-access path and on the batch path.
"""
import numpy as np
import pytest

from backend.tagcheck import TCF, GuestRam, OutsideRamError, TagCheckCpu

BASE = 0x40000000
PAGE = 4096


def tagged(addr, tag, upper=False):
    """A pointer to physical ``addr`` with logical ``tag`` (upper half: canonical 0xFF in 55:48)."""
    return (tag << 56) | ((0xFF << 48) if upper else 0) | addr


@pytest.fixture
def ram():
    r = GuestRam(BASE, 1 << 20, mte=True)
    for g in range(0, 2 * PAGE, 16):          # first two pages: tag 5 everywhere ...
        r.tags.stg(BASE + g, 5)
    r.tags.stg(BASE + 0x40, 9)                # ... except granule 0x40 and the first of page 2
    r.tags.stg(BASE + PAGE, 9)
    return r


def both_paths(ram, ptr, size, is_store, **state):
    """(fault from load/store, fault from a 1-access batch), checking they agree."""
    a, b = TagCheckCpu(ram, **state), TagCheckCpu(ram, **state)
    fa = (a.store if is_store else a.load)(ptr, size)
    res = b.run_batch(np.array([ptr], dtype=np.uint64), np.array([size]), np.array([is_store]))
    fb = res.record(0) if res.faults else None
    assert a.counters.to_dict() | {"last_fault": None} == b.counters.to_dict() | {"last_fault": None}
    assert a.tfsr == b.tfsr
    if fa is None:
        assert fb is None
    else:
        assert (fa.kind, fa.addr, fa.ptr_tag, fa.mem_tag, fa.access, fa.size) == \
            (fb.kind, fb.addr, fb.ptr_tag, fb.mem_tag, fb.access, fb.size)
        assert fb.index == 0
    return fa, a


# ---- IRG / ADDG / SUBG -----------------------------------------------------------------------
def test_irg_never_returns_an_excluded_tag_and_keeps_the_address():
    cpu = TagCheckCpu(GuestRam(BASE, 1 << 20, mte=True), seed=3, gcr_exclude=0x0001)
    seen = set()
    for _ in range(400):
        p = cpu.irg(tagged(BASE + 0x120, 0xF), exclude=0x8000)
        assert p & ((1 << 56) - 1) == BASE + 0x120
        seen.add(p >> 56)
    assert seen == set(range(1, 15))             # 0 (GCR) and 15 (operand) never come out


def test_irg_with_every_tag_excluded_gives_tag_zero():
    cpu = TagCheckCpu(GuestRam(BASE, 1 << 20, mte=True), seed=1, gcr_exclude=0xFF00)
    assert cpu.irg(tagged(BASE, 7), exclude=0x00FF) == BASE
    assert cpu.irg(tagged(BASE, 7), exclude=0xFFFF) == BASE


def test_irg_is_deterministic_under_a_seed():
    r = GuestRam(BASE, 1 << 20, mte=True)
    a, b, c = TagCheckCpu(r, seed=42), TagCheckCpu(r, seed=42), TagCheckCpu(r, seed=43)
    sa = [a.irg(BASE) >> 56 for _ in range(50)]
    assert sa == [b.irg(BASE) >> 56 for _ in range(50)]
    assert sa != [c.irg(BASE) >> 56 for _ in range(50)]


def test_addg_subg_step_the_tag_over_excluded_tags():
    cpu = TagCheckCpu(GuestRam(BASE, 1 << 20, mte=True), gcr_exclude=(1 << 15) | (1 << 0) | (1 << 2))
    p = tagged(BASE + 0x100, 14)
    assert cpu.addg(p, 0x20, 1) == tagged(BASE + 0x120, 1)     # 15, 0 excluded
    assert cpu.addg(p, 0, 2) == tagged(BASE + 0x100, 3)        # 1, then (2 excluded) 3
    assert cpu.addg(p, 0x3F0, 0) == tagged(BASE + 0x4F0, 14)   # offset 0: tag kept
    assert cpu.subg(p, 0x100, 1) == tagged(BASE, 1)            # SUBG also steps the tag upwards
    cpu.gcr_exclude = 0xFFFF
    assert cpu.addg(p, 16, 3) == tagged(BASE + 0x110, 0)
    with pytest.raises(ValueError):
        cpu.addg(p, 16, 16)


def test_addg_offset_zero_with_excluded_start_tag_keeps_it():
    # ChooseNonExcludedTag with offset 0 still moves off an excluded start tag (QEMU and Arm ARM).
    cpu = TagCheckCpu(GuestRam(BASE, 1 << 20, mte=True), gcr_exclude=1 << 4)
    assert cpu.addg(tagged(BASE, 4), 0, 0) >> 56 == 5


# ---- checked accesses -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 17, 32, 100, 5000])
def test_every_size_checks_every_granule_it_touches(size):
    ram = GuestRam(BASE, 1 << 20, mte=True)
    ram.tags.set_tags(BASE, np.full(3 * 256, 5, dtype=np.uint8))
    fault, cpu = both_paths(ram, tagged(BASE + 0x13, 5), size, False)
    assert fault is None and cpu.counters.checked == 1
    last = (0x13 + size - 1) & ~15                       # the access's last granule
    ram.tags.stg(BASE + last, 6)
    fault, _ = both_paths(ram, tagged(BASE + 0x13, 5), size, False)
    assert fault.addr == (tagged(BASE + 0x13, 5) if last == 0x10 else tagged(BASE + last, 5))
    assert fault.mem_tag == 6 and fault.size == size


def test_first_granule_mismatch_reports_the_pointer_as_given(ram):
    p = tagged(BASE + 0x47, 5) | (0xA << 60)                  # junk in 63:60 is not reported
    fault, cpu = both_paths(ram, p, 8, False)
    assert fault.kind == "sync" and fault.addr == tagged(BASE + 0x47, 5)
    assert (fault.ptr_tag, fault.mem_tag, fault.access, fault.size) == (5, 9, "load", 8)
    assert cpu.counters.sync_faults == 1 and cpu.counters.checked == 1


def test_later_granule_mismatch_reports_that_granules_aligned_base(ram):
    fault, _ = both_paths(ram, tagged(BASE + 0x3B, 5), 8, True)      # 0x3B..0x42: 2nd granule is 0x40
    assert fault.addr == tagged(BASE + 0x40, 5) and fault.access == "store"
    fault, _ = both_paths(ram, tagged(BASE + 0x21, 5), 40, False)    # 0x21..0x48: 3rd granule
    assert fault.addr == tagged(BASE + 0x40, 5)


def test_page_crossing_access_reports_the_next_pages_first_granule(ram):
    fault, _ = both_paths(ram, tagged(BASE + PAGE - 4, 5), 8, False)
    assert fault.addr == tagged(BASE + PAGE, 5) and fault.mem_tag == 9


def test_big_block_access_finds_its_first_mismatch(ram):
    fault, _ = both_paths(ram, tagged(BASE + 0x50, 5), PAGE, False)   # runs into page 2's granule 0
    assert fault.addr == tagged(BASE + PAGE, 5)
    fault, _ = both_paths(ram, tagged(BASE + 0x50, 5), PAGE - 0x50, False)
    assert fault is None
    fault, _ = both_paths(ram, tagged(BASE + PAGE + 16, 5), 3 * PAGE, False)  # into untagged page 3
    assert fault.addr == tagged(BASE + 2 * PAGE, 5) and fault.mem_tag == 0


def test_untouched_memory_has_tag_zero_and_is_still_checked():
    ram = GuestRam(BASE, 1 << 20, mte=True)
    assert both_paths(ram, tagged(BASE + 0x8000, 0), 8, False)[0] is None
    fault, cpu = both_paths(ram, tagged(BASE + 0x8000, 3), 8, False)
    assert fault.mem_tag == 0 and cpu.counters.checked == 1


@pytest.mark.parametrize("tcf,is_store,kind", [
    (TCF.SYNC, False, "sync"), (TCF.SYNC, True, "sync"),
    (TCF.ASYNC, False, "async"), (TCF.ASYNC, True, "async"),
    (TCF.ASYMM, False, "sync"), (TCF.ASYMM, True, "async")])
def test_tcf_decides_sync_or_async(ram, tcf, is_store, kind):
    fault, cpu = both_paths(ram, tagged(BASE + 0x40, 5), 4, is_store, tcf=tcf)
    assert fault.kind == kind
    c = cpu.counters
    assert (c.sync_faults, c.async_faults) == ((1, 0) if kind == "sync" else (0, 1))
    assert cpu.tfsr == (1 if kind == "async" else 0)


def test_tcf_none_leaves_accesses_unchecked(ram):
    fault, cpu = both_paths(ram, tagged(BASE + 0x40, 5), 4, False, tcf=TCF.NONE)
    assert fault is None and (cpu.counters.checked, cpu.counters.unchecked) == (0, 1)


def test_async_sets_tf0_for_lower_and_tf1_for_upper_half_pointers(ram):
    _, cpu = both_paths(ram, tagged(BASE + 0x40, 5, upper=True), 4, True, tcf=TCF.ASYNC)
    assert cpu.tfsr == 2
    cpu.load(tagged(BASE + 0x40, 5), 1)
    assert cpu.tfsr == 3 and cpu.counters.async_faults == 2


def test_async_fault_is_counted_per_access_while_tfsr_stays_set(ram):
    cpu = TagCheckCpu(ram, tcf=TCF.ASYNC)
    for _ in range(3):
        assert cpu.store(tagged(BASE + 0x40, 1), 8).kind == "async"
    assert cpu.counters.async_faults == 3 and cpu.tfsr == 1


def test_upper_half_pointers_reach_the_same_ram(ram):
    assert both_paths(ram, tagged(BASE + 0x50, 5, upper=True), 8, False)[0] is None
    fault, _ = both_paths(ram, tagged(BASE + 0x3C, 5, upper=True), 8, False)
    assert fault.addr == tagged(BASE + 0x40, 5, upper=True)


@pytest.mark.parametrize("ptr_tag,upper,tcma0,tcma1,unchecked", [
    (0, False, True, False, True),      # TCMA0: bits 59:55 all 0
    (0, False, False, True, False),     # TCMA1 does not cover the lower half
    (0xF, True, False, True, True),     # TCMA1: bits 59:55 all 1
    (0xF, True, True, False, False),
    (0xF, False, True, True, False),    # tag 0xF with bit 55 = 0: not a match-all
    (0, True, True, True, False),       # tag 0 with bit 55 = 1: not a match-all
])
def test_tcma_makes_only_match_all_pointers_unchecked(ram, ptr_tag, upper, tcma0, tcma1, unchecked):
    fault, cpu = both_paths(ram, tagged(BASE + 0x40, ptr_tag, upper), 8, False, tcma0=tcma0, tcma1=tcma1)
    assert (fault is None) == unchecked
    assert cpu.counters.unchecked == int(unchecked)


def test_tcma0_still_checks_non_zero_tags_into_tag_zero_memory():
    ram = GuestRam(BASE, 1 << 20, mte=True)
    fault, _ = both_paths(ram, tagged(BASE, 3), 8, False, tcma0=True)
    assert fault is not None and fault.mem_tag == 0


def test_tco_disables_all_checks(ram):
    for tcf in TCF:
        fault, cpu = both_paths(ram, tagged(BASE + 0x40, 5), 8, True, tcf=tcf, tco=True)
        assert fault is None and cpu.counters.unchecked == 1 and cpu.tfsr == 0


def test_vm_without_mte_checks_nothing():
    ram = GuestRam(BASE, 1 << 20, mte=False)
    fault, cpu = both_paths(ram, tagged(BASE, 7), 16, False)
    assert fault is None and cpu.counters.unchecked == 1


def test_accesses_outside_ram_raise_and_count_nothing(ram):
    cpu = TagCheckCpu(ram)
    for ptr, size in [(BASE - 8, 8), (BASE + (1 << 20) - 4, 8), (0x1234, 1),
                      (tagged(BASE, 5) | (1 << 50), 8),            # non-canonical lower half
                      ((5 << 56) | (0xFE << 48) | BASE, 8),   # non-canonical upper half
                      (tagged(BASE, 5), (1 << 20) + 16), (tagged(BASE, 5), 1 << 63)]:   # longer than RAM
        with pytest.raises(OutsideRamError, match="outside guest RAM"):
            cpu.load(ptr, size)
        with pytest.raises(OutsideRamError, match="access 1: .*outside guest RAM"):
            cpu.run_batch(np.array([tagged(BASE, 5), ptr], dtype=np.uint64), np.array([8, size]), False)
    assert cpu.counters.to_dict() == TagCheckCpu(ram).counters.to_dict()


def test_bad_sizes_are_refused(ram):
    cpu = TagCheckCpu(ram)
    for bad in (0, -8, 8.0, True, "8"):
        with pytest.raises(ValueError, match="whole number >= 1"):
            cpu.load(tagged(BASE, 5), bad)
    with pytest.raises(ValueError, match="access 1: size 0"):
        cpu.run_batch(np.array([BASE, BASE], dtype=np.uint64), np.array([8, 0]), False)
    with pytest.raises(ValueError):
        cpu.run_batch(np.array([BASE, BASE], dtype=np.uint64), np.array([8]), False)
    assert cpu.counters.checked == 0


def test_numpy_scalars_work_on_the_per_access_path(ram):
    fault = TagCheckCpu(ram).load(np.uint64(tagged(BASE + 0x3C, 5)), np.int64(8))
    assert fault.addr == tagged(BASE + 0x40, 5) and type(fault.addr) is int


def test_tcf_accepts_names_and_rejects_others(ram):
    cpu = TagCheckCpu(ram, tcf="asymm")
    assert cpu.tcf is TCF.ASYMM and str(cpu.tcf) == "asymm"
    assert TCF.parse("Sync") is TCF.SYNC and TCF.parse(2) is TCF.ASYNC
    with pytest.raises(ValueError, match="none, sync, async, asymm"):
        cpu.tcf = "strict"


# ---- batches -----------------------------------------------------------------------------------
def test_batch_reports_faults_in_order_and_updates_counters(ram):
    cpu = TagCheckCpu(ram, tcf=TCF.ASYMM, tcma0=True)
    ptrs = np.array([tagged(BASE + 0x50, 5), tagged(BASE + 0x40, 5), tagged(BASE + 0x40, 0),
                     tagged(BASE + 0x3C, 5), tagged(BASE + PAGE - 8, 5)], dtype=np.uint64)
    res = cpu.run_batch(ptrs, np.array([8, 8, 8, 8, 16]), np.array([False, True, False, False, True]))
    assert (res.checked, res.unchecked, res.sync_faults, res.async_faults) == (4, 1, 1, 2)
    assert list(res.fault_index) == [1, 3, 4]
    assert list(res.fault_kind) == [1, 0, 1]
    assert [hex(a) for a in res.fault_addr] == [hex(tagged(BASE + 0x40, 5)), hex(tagged(BASE + 0x40, 5)),
                                                hex(tagged(BASE + PAGE, 5))]
    assert list(res.fault_mem_tag) == [9, 9, 9] and list(res.fault_ptr_tag) == [5, 5, 5]
    assert list(res.fault_is_store) == [True, False, True] and list(res.fault_size) == [8, 8, 16]
    assert cpu.tfsr == 1
    assert cpu.counters.checked == 4 and cpu.counters.last_fault == res.record(2)
    assert cpu.counters.last_fault.to_dict() == {"index": 4, "kind": "async", "addr": hex(tagged(BASE + PAGE, 5)),
                                                 "ptr_tag": 5, "mem_tag": 9, "access": "store", "size": 16}


def test_batch_accepts_scalar_size_and_store_flag(ram):
    cpu = TagCheckCpu(ram)
    res = cpu.run_batch([tagged(BASE + 0x3C, 5), tagged(BASE + 0x60, 5)], 8, True)
    assert list(res.fault_index) == [0] and list(res.fault_size) == [8] and list(res.fault_is_store) == [True]
    assert res.fault_addr[0] == tagged(BASE + 0x40, 5)


def test_batch_takes_the_contracts_dtypes(ram):
    """uint64 pointers, uint8 sizes, bool is_store (docs/contracts.md)."""
    cpu = TagCheckCpu(ram)
    res = cpu.run_batch(np.array([tagged(BASE + 0x3C, 5), tagged(BASE + 0x60, 5)], dtype=np.uint64),
                        np.array([8, 200], dtype=np.uint8), np.array([False, True]))
    assert list(res.fault_index) == [0] and res.checked == 2
    assert cpu.run_batch(np.array([tagged(BASE + 0x50, 5)], dtype=np.uint64),
                         np.array([255], dtype=np.uint8), np.array([True])).faults == 0


def test_empty_batch_counts_nothing(ram):
    res = TagCheckCpu(ram).run_batch(np.zeros(0, dtype=np.uint64), 8, False)
    assert (res.checked, res.unchecked, res.faults) == (0, 0, 0)


def test_counters_to_dict_shape(ram):
    cpu = TagCheckCpu(ram)
    assert cpu.counters.to_dict() == {"checked": 0, "unchecked": 0, "sync_faults": 0, "async_faults": 0,
                                      "last_fault": None}
