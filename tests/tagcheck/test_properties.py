"""Property tests: the core (per-access and batch paths) against an obviously-correct model.

The model keeps a dict granule -> tag and checks each access with plain loops, straight from
the rules in docs (mte-facts.md, qemu-tcg-mte-notes.md). Traces mix configuration changes,
tag stores, and loads/stores of every size at random (often unaligned, granule- and
page-crossing) addresses, with pointers in both address halves.
"""
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.tagcheck import TCF, GuestRam, TagCheckCpu
from backend.tagcheck.pointers import choose_nonexcluded_tag, choose_nonexcluded_tags

BASE = 0x40000000
RAM = 3 * 4096            # three pages: plenty of page crossings
LOW56 = (1 << 56) - 1


@dataclass
class Model:
    tags: dict = field(default_factory=dict)       # granule number -> tag
    tcf: str = "sync"
    tcma0: bool = False
    tcma1: bool = False
    tco: bool = False
    tfsr: int = 0
    checked: int = 0
    unchecked: int = 0
    sync: int = 0
    async_: int = 0

    def access(self, ptr, size, is_store):
        """The fault (kind, FAR, ptr tag, mem tag) of one access, or None; updates counters."""
        upper = (ptr >> 55) & 1
        top5 = (ptr >> 55) & 0x1F
        if (self.tcf == "none" or self.tco or (self.tcma0 and top5 == 0)
                or (self.tcma1 and top5 == 0x1F)):
            self.unchecked += 1
            return None
        self.checked += 1
        ptag = (ptr >> 56) & 0xF
        addr = ptr & ((1 << 48) - 1)
        for g in range(addr // 16, (addr + size - 1) // 16 + 1):
            mem = self.tags.get(g, 0)
            if mem != ptag:
                if g == addr // 16:
                    far = ptr & ((1 << 60) - 1)
                else:
                    far = (ptag << 56) | ((0xFF << 48) if upper else 0) | (g * 16)
                sync = self.tcf == "sync" or (self.tcf == "asymm" and not is_store)
                if sync:
                    self.sync += 1
                else:
                    self.async_ += 1
                    self.tfsr |= 1 << upper
                return ("sync" if sync else "async", far, ptag, mem)
        return None


granule_addr = st.integers(0, RAM // 16 - 1).map(lambda g: BASE + 16 * g)
config = st.fixed_dictionaries({}, optional={
    "tcf": st.sampled_from(["none", "sync", "async", "asymm"]),
    "tcma0": st.booleans(), "tcma1": st.booleans(), "tco": st.booleans()}).map(lambda d: ("config", d))
tag_store = st.tuples(st.sampled_from(["stg", "st2g"]), granule_addr, st.integers(0, 15))
# Tags near the TCMA match-all patterns (0, 0xF, and the ones differing in bit 59) often.
ptr_tag = st.one_of(st.sampled_from([0, 15, 7, 8]), st.sampled_from(range(16)))
size = st.one_of(st.sampled_from([1, 2, 4, 8, 16]), st.integers(1, 100))


@st.composite
def access(draw):
    sz = draw(size)
    addr = BASE + draw(st.integers(0, RAM - sz))
    tag = draw(ptr_tag)
    upper = draw(st.booleans())
    ptr = (tag << 56) | ((0xFF << 48) if upper else 0) | addr
    return ("access", ptr, sz, draw(st.booleans()))


trace = st.lists(st.one_of(config, tag_store, tag_store, access(), access(), access(), access()),
                 min_size=1, max_size=80)


def apply_tag_op(ram, model, op):
    _, addr, tag = op
    count = 2 if op[0] == "st2g" else 1
    if addr + 16 * count > BASE + RAM:
        return
    getattr(ram.tags, op[0])(addr, tag)
    for k in range(count):
        model.tags[(addr - BASE) // 16 + BASE // 16 + k] = tag


def apply_config(cpu, model, d):
    for k, v in d.items():
        setattr(cpu, k, TCF.parse(v) if k == "tcf" else v)
        setattr(model, k, v)


def counters(cpu):
    c = cpu.counters
    return (c.checked, c.unchecked, c.sync_faults, c.async_faults, cpu.tfsr)


def model_counters(m):
    return (m.checked, m.unchecked, m.sync, m.async_, m.tfsr)


def run_batch_against_model(cpu, model, accesses, sizes, is_store):
    """Run ``accesses`` ((ptr, size, is_store) each) as one batch, compare every fault field with
    the model run access by access, and return the batch's result."""
    ptrs = np.array([p for p, _, _ in accesses], dtype=np.uint64)
    res = cpu.run_batch(ptrs, sizes, is_store)
    expected = [(i, model.access(*a)) for i, a in enumerate(accesses)]
    expected = [(i, f) for i, f in expected if f is not None]
    got = [(int(res.fault_index[j]), (("sync", "async")[res.fault_kind[j]], int(res.fault_addr[j]),
                                      int(res.fault_ptr_tag[j]), int(res.fault_mem_tag[j])))
           for j in range(res.faults)]
    assert got == expected
    assert list(res.fault_size) == [accesses[i][1] for i, _ in expected]
    assert list(res.fault_is_store) == [accesses[i][2] for i, _ in expected]
    return res


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(trace)
def test_per_access_path_matches_the_model(ops):
    ram = GuestRam(BASE, RAM, mte=True)
    cpu, model = TagCheckCpu(ram), Model()
    for op in ops:
        if op[0] == "config":
            apply_config(cpu, model, op[1])
        elif op[0] in ("stg", "st2g"):
            apply_tag_op(ram, model, op)
        else:
            _, ptr, sz, is_store = op
            fault = (cpu.store if is_store else cpu.load)(ptr, sz)
            expected = model.access(ptr, sz, is_store)
            got = None if fault is None else (fault.kind, fault.addr, fault.ptr_tag, fault.mem_tag)
            assert got == expected, (hex(ptr), sz, is_store)
        assert counters(cpu) == model_counters(model)


@SETTINGS
@given(trace)
def test_batch_path_matches_the_model(ops):
    """Runs of accesses between config changes and tag stores go through run_batch at once."""
    ram = GuestRam(BASE, RAM, mte=True)
    cpu, model = TagCheckCpu(ram), Model()
    pending = []

    def flush():
        if not pending:
            return
        res = run_batch_against_model(cpu, model, pending, np.array([s for _, s, _ in pending]),
                                      np.array([w for _, _, w in pending]))
        assert res.checked + res.unchecked == len(pending)
        pending.clear()

    for op in ops:
        if op[0] == "access":
            pending.append(op[1:])
            continue
        flush()
        if op[0] == "config":
            apply_config(cpu, model, op[1])
        else:
            apply_tag_op(ram, model, op)
    flush()
    assert counters(cpu) == model_counters(model)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4 * 256 - 1), st.integers(0, 15)), max_size=60),
       st.lists(st.tuples(st.integers(0, 4 * 4096 - 1), st.integers(1, 40)), min_size=1, max_size=200))
def test_batch_equals_per_access_on_a_sparse_large_vm(tag_writes, probes):
    """A 4 GiB VM (sparse directory index) gives the same results on both paths."""
    size = 4 << 30
    ram = GuestRam(BASE, size, mte=True)
    far_page = BASE + size - 4 * 4096            # near the end: another index chunk
    for g, t in tag_writes:
        ram.tags.stg(far_page + 16 * g, t)
    ptrs = [(t << 56) | (far_page + min(off, 4 * 4096 - sz)) for (off, sz), t in
            zip(probes, [g % 16 for g in range(len(probes))])]
    sizes = [sz for _, sz in probes]
    a, b = TagCheckCpu(ram), TagCheckCpu(ram)
    per_access = [a.load(p, s) for p, s in zip(ptrs, sizes)]
    res = b.run_batch(np.array(ptrs, dtype=np.uint64), np.array(sizes), False)
    assert [i for i, f in enumerate(per_access) if f] == list(res.fault_index)
    assert [f.addr for f in per_access if f] == [int(x) for x in res.fault_addr]
    assert counters(a) == counters(b)


def model_choose(tag, offset, exclude):
    """Arm ARM ChooseNonExcludedTag, written out."""
    if exclude & 0xFFFF == 0xFFFF:
        return 0
    if offset == 0:
        while (exclude >> tag) & 1:
            tag = (tag + 1) % 16
    while offset:
        tag = (tag + 1) % 16
        while (exclude >> tag) & 1:
            tag = (tag + 1) % 16
        offset -= 1
    return tag


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15), st.integers(0, 0xFFFF)), min_size=1, max_size=30))
def test_tag_choice_matches_the_architecture_scalar_and_vectorised(cases):
    for tag, offset, exclude in cases:
        assert choose_nonexcluded_tag(tag, offset, exclude) == model_choose(tag, offset, exclude)
    tags = np.array([t for t, _, _ in cases])
    excl = np.array([e for _, _, e in cases])
    assert list(choose_nonexcluded_tags(tags, excl)) == [model_choose(t, 0, e) for t, _, e in cases]
