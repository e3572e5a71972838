"""TagMemory and GuestRam: the sparse 2-tags-per-byte storage, tag stores, bulk copies, errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.errors import MtevmError
from backend.tagcheck import GuestRam, NoTagStorageError, OutsideRamError, TagAlignmentError, TagMemory

BASE = 0x40000000
MiB = 1 << 20


def test_untouched_memory_reads_tag_zero_and_costs_no_blocks():
    tm = TagMemory(BASE, 16 * MiB)
    assert tm.ldg(BASE) == 0 and tm.ldg(BASE + 16 * MiB - 1) == 0
    assert tm.tagged_pages == 0
    assert list(tm.pages()) == []
    assert not tm.get_tags(BASE, 8192).any()


def test_stg_sets_only_its_granule_and_ldg_reads_any_address_in_it():
    tm = TagMemory(BASE, MiB)
    tm.stg(BASE + 0x30, 0xA)
    assert [tm.ldg(BASE + 0x30 + i) for i in (0, 7, 15)] == [0xA] * 3
    assert tm.ldg(BASE + 0x20) == 0 and tm.ldg(BASE + 0x40) == 0
    assert tm.tagged_pages == 1 and list(tm.pages()) == [BASE]


def test_two_tags_per_byte_low_nibble_for_address_bit4_clear():
    tm = TagMemory(BASE, MiB)
    tm.stg(BASE, 0x3)            # address bit 4 = 0 -> low nibble
    tm.stg(BASE + 0x10, 0xA)     # bit 4 = 1 -> high nibble of the same byte
    tm.stg(BASE + 0xFF0, 0x7)    # last granule of the page: high nibble of byte 127
    packed = tm.packed(BASE, 4096)
    assert len(packed) == 128
    assert packed[0] == 0xA3 and packed[127] == 0x70 and not packed[1:127].any()


def test_restoring_one_nibble_keeps_its_neighbour():
    tm = TagMemory(BASE, MiB)
    tm.stg(BASE, 0x5)
    tm.stg(BASE + 0x10, 0xC)
    tm.stg(BASE, 0x0)
    assert (tm.ldg(BASE), tm.ldg(BASE + 0x10)) == (0, 0xC)


def test_st2g_on_last_granule_of_a_page_tags_first_granule_of_next_page():
    tm = TagMemory(BASE, MiB)
    tm.st2g(BASE + 4096 - 16, 0x9)
    assert tm.ldg(BASE + 4096 - 16) == 9 and tm.ldg(BASE + 4096) == 9
    assert tm.ldg(BASE + 4096 + 16) == 0
    assert list(tm.pages()) == [BASE, BASE + 4096]


@pytest.mark.parametrize("addr", [BASE + 1, BASE + 8, BASE + 0x1F])
def test_misaligned_tag_store_is_an_alignment_fault(addr):
    tm = TagMemory(BASE, MiB)
    with pytest.raises(TagAlignmentError, match="not 16-byte aligned"):
        tm.stg(addr, 1)
    with pytest.raises(TagAlignmentError):
        tm.st2g(addr, 1)
    assert tm.tagged_pages == 0


@pytest.mark.parametrize("addr", [BASE - 16, BASE + MiB, 0, 1 << 47])
def test_tag_ops_outside_ram_raise_and_change_nothing(addr):
    tm = TagMemory(BASE, MiB)
    for op in (lambda: tm.stg(addr, 1), lambda: tm.st2g(addr, 1), lambda: tm.ldg(addr),
               lambda: tm.tags_of_granules(np.array([addr], dtype=np.uint64))):
        with pytest.raises(OutsideRamError, match="outside guest RAM"):
            op()
    assert tm.tagged_pages == 0


def test_st2g_whose_second_granule_is_past_ram_end_changes_nothing():
    tm = TagMemory(BASE, MiB)
    with pytest.raises(OutsideRamError):
        tm.st2g(BASE + MiB - 16, 4)
    assert tm.ldg(BASE + MiB - 16) == 0


def test_bad_tag_values_are_rejected():
    tm = TagMemory(BASE, MiB)
    for bad in (16, -1, 1.5, "3"):
        with pytest.raises(ValueError, match="0..15"):
            tm.stg(BASE, bad)
    with pytest.raises(ValueError, match="0..15"):
        tm.set_tags(BASE, np.full(256, 16, dtype=np.int64))


def test_errors_are_user_errors_with_their_message():
    tm = TagMemory(BASE, MiB)
    with pytest.raises(MtevmError) as e:
        tm.stg(BASE + 3, 1)
    assert str(e.value).startswith("tag store address 0x40000003")


def test_get_set_tags_roundtrip_in_copy_tags_layout():
    tm = TagMemory(BASE, MiB)
    rng = np.random.default_rng(5)
    tags = rng.integers(0, 16, 3 * 256, dtype=np.uint8)
    tm.set_tags(BASE + 4096, tags)
    assert np.array_equal(tm.get_tags(BASE + 4096, 3 * 4096), tags)
    # one tag per byte, granule order: tag k belongs to address +16k
    assert [tm.ldg(BASE + 4096 + 16 * k) for k in range(5)] == list(tags[:5])
    assert not tm.get_tags(BASE, 4096).any()


def test_bulk_copy_must_be_page_aligned_and_in_ram():
    tm = TagMemory(BASE, MiB)
    with pytest.raises(TagAlignmentError, match="page-aligned"):
        tm.get_tags(BASE + 16, 4096)
    with pytest.raises(TagAlignmentError, match="page-aligned"):
        tm.get_tags(BASE, 100)
    with pytest.raises(TagAlignmentError, match="whole pages"):
        tm.set_tags(BASE, np.zeros(100, dtype=np.uint8))
    with pytest.raises(OutsideRamError):
        tm.get_tags(BASE + MiB - 4096, 8192)
    with pytest.raises(OutsideRamError):
        tm.set_tags(BASE + MiB, np.ones(256, dtype=np.uint8))
    assert tm.tagged_pages == 0


def test_zero_tags_into_untouched_pages_allocate_nothing():
    tm = TagMemory(BASE, MiB)
    tm.stg(BASE, 0)
    tm.set_tags(BASE, np.zeros(4 * 256, dtype=np.uint8))
    assert tm.tagged_pages == 0
    tm.stg(BASE, 5)
    tm.set_tags(BASE, np.zeros(256, dtype=np.uint8))    # a tagged page is really cleared
    assert tm.ldg(BASE) == 0 and tm.tagged_pages == 1


def test_tags_of_granules_matches_ldg_across_pages_and_chunks():
    size = 8 * MiB         # several 2 MiB index chunks
    tm = TagMemory(BASE, size)
    rng = np.random.default_rng(1)
    addrs = BASE + rng.integers(0, size // 16, 500) * 16
    for a, t in zip(addrs, rng.integers(0, 16, 500)):
        tm.stg(int(a), int(t))
    probe = np.concatenate([addrs, addrs + 7, BASE + rng.integers(0, size, 200)]).astype(np.uint64)
    assert list(tm.tags_of_granules(probe)) == [tm.ldg(int(a)) for a in probe]


@pytest.mark.parametrize("size", [64 * MiB, 4 << 30])     # dense index and sparse (directory) index
def test_bytes_used_is_one_128_byte_block_per_tagged_page_plus_index(size):
    tm = TagMemory(BASE, size)
    empty = tm.bytes_used
    n = 300
    tm.set_tags(BASE, np.full(n * 256, 7, dtype=np.uint8))
    assert tm.tagged_pages == n
    grown = tm.bytes_used - empty
    assert n * 128 <= grown <= n * 128 + 64 * 1024 + (n // 8 + 16) * 128
    assert list(tm.pages()) == [BASE + 4096 * i for i in range(n)]


def test_a_64_gib_vm_takes_a_few_hundred_kib_of_index():
    ram = GuestRam(0x40000000, 64 << 30, mte=True)
    assert ram.bytes_used < 1 * MiB
    assert ram.tags.ldg(0x40000000 + (64 << 30) - 16) == 0
    ram.tags.stg(0x40000000 + (63 << 30), 3)
    assert ram.tags.ldg(0x40000000 + (63 << 30)) == 3
    assert ram.bytes_used < 1 * MiB


@pytest.mark.parametrize("base,size", [(BASE + 1, MiB), (BASE, 0), (BASE, 1000), (-4096, MiB), (1 << 48, 4096)])
def test_impossible_ram_regions_are_refused(base, size):
    with pytest.raises(ValueError):
        GuestRam(base, size, mte=True)


def test_guest_ram_data_is_sparse_and_reads_back():
    ram = GuestRam(BASE, 16 * MiB, mte=False)
    assert ram.read(BASE + 100, 8) == bytes(8)
    ram.write(BASE + 4090, b"abcdefghij")            # crosses a page
    assert ram.read(BASE + 4088, 14) == b"\0\0abcdefghij\0\0"
    assert list(ram.pages()) == [BASE, BASE + 4096]
    ram.write(BASE + 8 * 4096, bytes(100))           # zeros into a fresh page: nothing held
    assert list(ram.pages()) == [BASE, BASE + 4096]
    assert ram.tags is None and ram.bytes_used == 2 * 4096
    with pytest.raises(OutsideRamError):
        ram.write(BASE + 16 * MiB - 2, b"abc")
    with pytest.raises(OutsideRamError):
        ram.read(BASE - 1, 2)


def test_stzg_tags_and_zeroes_one_granule_stz2g_two():
    ram = GuestRam(BASE, MiB, mte=True)
    ram.write(BASE + 4096 - 32, b"\xff" * 64)
    ram.stzg(BASE + 4096 - 32, 6)
    assert ram.read(BASE + 4096 - 32, 32) == bytes(16) + b"\xff" * 16
    ram.stz2g(BASE + 4096 - 16, 2)                   # across the page boundary
    assert ram.read(BASE + 4096 - 32, 64) == bytes(48) + b"\xff" * 16
    assert [ram.tags.ldg(BASE + 4096 + k) for k in (-32, -16, 0, 16)] == [6, 2, 2, 0]
    with pytest.raises(TagAlignmentError):
        ram.stzg(BASE + 8, 1)
    assert ram.read(BASE + 4096 + 16, 16) == b"\xff" * 16


def test_stzg_without_mte_is_refused():
    ram = GuestRam(BASE, MiB, mte=False)
    with pytest.raises(NoTagStorageError, match="no MTE"):
        ram.stzg(BASE, 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * 256 - 1), st.integers(0, 15)), max_size=300))
def test_stg_many_equals_one_stg_after_another(writes):
    one, many = TagMemory(BASE, MiB), TagMemory(BASE, MiB)
    for g, t in writes:
        one.stg(BASE + 16 * g, t)
    many.stg_many(np.array([BASE + 16 * g for g, _ in writes], dtype=np.uint64),
                  np.array([t for _, t in writes], dtype=np.uint8))
    assert np.array_equal(one.get_tags(BASE, 3 * 4096), many.get_tags(BASE, 3 * 4096))
    assert many.tagged_pages <= one.tagged_pages     # a page whose tags end up 0 needs no block


def test_stg_many_checks_everything_before_writing():
    tm = TagMemory(BASE, MiB)
    with pytest.raises(TagAlignmentError):
        tm.stg_many(np.array([BASE, BASE + 8], dtype=np.uint64), 1)
    with pytest.raises(OutsideRamError):
        tm.stg_many(np.array([BASE, BASE + MiB], dtype=np.uint64), 1)
    with pytest.raises(ValueError):
        tm.stg_many(np.array([BASE, BASE + 16], dtype=np.uint64), np.array([1, 16]))
    assert tm.tagged_pages == 0
