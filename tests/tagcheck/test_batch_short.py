"""The batch path's route for short accesses (no access longer than a 16-byte granule).

Such an access touches at most two granules, and the batch reads the second one's tag from
the tag byte it already loaded (granule with address bit 4 = 0), from the byte after it (bit
4 = 1), or through the page index again (the page's last granule). These tests push accesses
onto granule and page edges, over tagged and never-tagged pages, in the dense (<= 1 GiB) and
sparse index, with one size for the whole batch (the benchmark's case) or one per access,
and compare every fault field and counter with the model of test_properties.
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.tagcheck import TCF, GuestRam, TagCheckCpu
from tests.tagcheck.test_properties import Model, counters, model_counters, run_batch_against_model

BASE = 0x40000000
PAGES = 3                   # accesses land in the last PAGES pages of RAM
UPPER = 0xFF << 48


def tagged_ram(size: int, page_tags: list[np.ndarray | None]) -> tuple[GuestRam, Model, int]:
    """RAM of ``size`` whose last len(page_tags) pages get those tags (None: never tagged),
    the model holding the same tags, and the first of those pages' address. Pages are tagged
    last one first, so a page's tag block is not followed by the next page's in the pool."""
    ram = GuestRam(BASE, size, mte=True)
    model = Model()
    first = BASE + size - len(page_tags) * 4096
    for p, tags in reversed(list(enumerate(page_tags))):
        if tags is None:
            continue
        ram.tags.set_tags(first + p * 4096, tags)
        for g, t in enumerate(tags):
            model.tags[(first + p * 4096) // 16 + g] = int(t)
    return ram, model, first


def check_against_model(cpu: TagCheckCpu, model: Model, accesses, sizes, is_store) -> None:
    """Run one batch and compare it, fault by fault and then its counters, with the model."""
    run_batch_against_model(cpu, model, accesses, sizes, is_store)
    assert counters(cpu) == model_counters(model)


# Offsets in a page, mostly on the edges where the second granule's tag comes from elsewhere:
# each 32-byte pair's two granules, and the page's first and last granules.
edge_granule = st.one_of(st.sampled_from([0, 1, 2, 3, 254, 255]), st.integers(0, 255))
# Where in its granule an access starts: anywhere, or so that it ends on the granule's last
# byte ("flush") or on the next granule's first byte ("over"), the edges of crossing.
in_granule = st.one_of(st.integers(0, 15), st.sampled_from(["flush", "over"]))
short_size = st.one_of(st.sampled_from([1, 2, 4, 8, 16]), st.integers(1, 16))


@st.composite
def short_batch(draw):
    """(page tags, accesses as (ptr, size, is_store), sizes for run_batch, is_store for it, config)."""
    palette = draw(st.lists(st.integers(0, 15), min_size=1, max_size=3))    # few tags: accesses
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))          # often pass granule 0
    page_tags = [None if draw(st.booleans()) else np.array(palette, np.uint8)[rng.integers(0, len(palette), 256)]
                 for _ in range(PAGES)]
    one_size = draw(st.booleans())
    size = draw(short_size)
    one_kind = draw(st.sampled_from([None, False, True]))
    accesses = []
    for _ in range(draw(st.integers(1, 40))):
        sz = size if one_size else draw(short_size)
        start = draw(in_granule)
        start = {"flush": 16 - sz, "over": (17 - sz) % 16}.get(start, start)
        off = min(draw(st.integers(0, PAGES - 1)) * 4096 + 16 * draw(edge_granule) + start,
                  PAGES * 4096 - sz)
        tag = draw(st.one_of(st.sampled_from(palette), st.integers(0, 15)))
        upper = draw(st.booleans())
        store = one_kind if one_kind is not None else draw(st.booleans())
        accesses.append((tag, upper, off, sz, store))
    config = {"tcf": draw(st.sampled_from(["sync", "async", "asymm"])),
              "tcma0": draw(st.booleans()), "tcma1": draw(st.booleans())}
    return page_tags, accesses, (size if one_size else None), one_kind, config


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(short_batch(), st.booleans())
def test_short_access_batches_match_the_model(batch, sparse):
    page_tags, raw, one_size, one_kind, config = batch
    ram, model, first = tagged_ram((4 << 30) if sparse else PAGES * 4096, page_tags)
    cpu = TagCheckCpu(ram, tcf=TCF.parse(config["tcf"]), tcma0=config["tcma0"], tcma1=config["tcma1"])
    for k, v in config.items():
        setattr(model, k, v)
    accesses = [((tag << 56) | (UPPER if upper else 0) | (first + off), sz, store)
                for tag, upper, off, sz, store in raw]
    sizes = one_size if one_size is not None else np.array([sz for _, sz, _ in accesses])
    is_store = one_kind if one_kind is not None else np.array([s for _, _, s in accesses])
    check_against_model(cpu, model, accesses, sizes, is_store)


def test_crossing_out_of_the_last_granule_of_never_tagged_ram():
    """No page tagged: every page shares the one zero block and the tag pool is that block
    alone, so the byte after a page's last tag byte is past the pool's end."""
    ram, model, first = tagged_ram(PAGES * 4096, [None] * PAGES)
    ends = [first + 4096 - 8, first + 4096 - 1, first + 2 * 4096 - 4]
    accesses = [((3 << 56) | p, 8, False) for p in ends] + [(p, 8, False) for p in ends]
    check_against_model(TagCheckCpu(ram), model, accesses, 8, False)
    res = TagCheckCpu(ram).run_batch(np.array([(3 << 56) | ends[0]], np.uint64), 8, False)
    assert res.fault_addr[0] == (3 << 56) | (first + 4096 - 8)    # granule 0 already differs


def test_crossing_from_the_newest_tagged_page_into_an_older_one():
    """The page tagged last owns the pool's last block; its last granule's successor is the
    next page's first granule (tag 5, in an older block), not the spare byte after the pool."""
    ram, model, first = tagged_ram(PAGES * 4096, [None, np.full(256, 7, np.uint8), np.full(256, 5, np.uint8)])
    last = first + 2 * 4096 - 16
    accesses = [((7 << 56) | (last + k), 16, False) for k in range(16)]
    check_against_model(TagCheckCpu(ram), model, accesses, 16, False)
    res = TagCheckCpu(ram).run_batch(np.array([(7 << 56) | (last + 4)], np.uint64), 16, False)
    assert res.faults == 1 and res.fault_mem_tag[0] == 5
    assert res.fault_addr[0] == (7 << 56) | (first + 2 * 4096)   # the next page's first granule


def test_a_benchmark_sized_batch_equals_the_per_access_path():
    """64k unaligned 8-byte loads over 64 pages of random tags, one size for all (the
    benchmark's batch), give the per-access path's faults, record for record."""
    rng = np.random.default_rng(7)
    ram = GuestRam(BASE, 64 * 4096, mte=True)
    ram.tags.set_tags(BASE, rng.integers(0, 4, 64 * 256, dtype=np.uint8))
    addrs = BASE + rng.integers(0, 64 * 4096 - 8, 1 << 16, dtype=np.uint64)
    tags = ram.tags.tags_of_granules(addrs).astype(np.uint64)
    wrong = rng.random(len(addrs)) < 0.05
    tags[wrong] ^= np.uint64(1)
    ptrs = addrs | (tags << np.uint64(56))
    batch = TagCheckCpu(ram).run_batch(ptrs, 8, False)
    single = TagCheckCpu(ram)
    per_access = [dict(f.to_dict(), index=i) for i, f in enumerate(single.load(int(p), 8) for p in ptrs) if f]
    assert batch.faults > len(addrs) // 10          # granule-crossing mismatches, not only the 5%
    assert per_access == [f.to_dict() for f in batch.records()]
