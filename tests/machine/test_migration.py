"""Migration: QEMU's blocker texts and query-migrate shapes, and RAM + tag migration verified tag by tag."""
import numpy as np
import pytest

from backend.errors import MigrationError
from backend.machine import (MTE_MIGRATION_BLOCKER, MigrationState, RamMigration, SimulatedArm64Kvm,
                             VirtMachineConfig, migrate_ram, realize)
from backend.machine.kvm import SimulatedKvmVm

PAGE = 4096
RAM = 0x4000_0000


# --- MigrationState: blockers and query-migrate ------------------------------------------------------

def test_query_migrate_is_empty_before_anything():
    assert MigrationState().query_migrate() == {}


def test_blocked_reasons_newest_first_and_migrate_reports_the_newest():
    s = MigrationState()
    s.add_blocker("State blocked by non-migratable device 'ivshmem'")
    s.add_blocker(MTE_MIGRATION_BLOCKER)
    assert s.query_migrate() == {"blocked-reasons": [MTE_MIGRATION_BLOCKER,
                                                     "State blocked by non-migratable device 'ivshmem'"]}
    with pytest.raises(MigrationError) as e:
        s.check_can_migrate()
    assert str(e.value) == "Live migration disabled due to MTE enabled"
    s.remove_blocker(MTE_MIGRATION_BLOCKER)
    with pytest.raises(MigrationError, match=r"^State blocked by non-migratable device 'ivshmem'$"):
        s.check_can_migrate()
    s.remove_blocker("State blocked by non-migratable device 'ivshmem'")
    s.remove_blocker("never added")
    s.check_can_migrate()
    assert s.query_migrate() == {}


def test_tag_migration_can_lift_only_the_mte_blocker():
    s = MigrationState()
    s.add_blocker(MTE_MIGRATION_BLOCKER)
    s.check_can_migrate(lifted=(MTE_MIGRATION_BLOCKER,))
    s.add_blocker("State blocked by non-migratable device 'ivshmem'")
    s.remove_blocker(MTE_MIGRATION_BLOCKER)
    s.add_blocker(MTE_MIGRATION_BLOCKER)
    with pytest.raises(MigrationError, match=r"^State blocked by non-migratable device 'ivshmem'$"):
        s.check_can_migrate(lifted=(MTE_MIGRATION_BLOCKER,))
    assert s.query_migrate()["blocked-reasons"][0] == MTE_MIGRATION_BLOCKER


def test_only_migratable_refuses_blockers():
    s = MigrationState(only_migratable=True)
    with pytest.raises(MigrationError) as e:
        s.add_blocker(MTE_MIGRATION_BLOCKER)
    assert str(e.value) == ("disallowing migration blocker (--only-migratable) for: "
                            "Live migration disabled due to MTE enabled")
    assert s.blockers == []


@pytest.mark.parametrize("status", ["setup", "active", "postcopy-active", "device", "cancelling"])
def test_blocker_refused_while_migrating(status):
    s = MigrationState()
    s.status = status
    with pytest.raises(MigrationError) as e:
        s.add_blocker("x")
    assert str(e.value) == "disallowing migration blocker (migration/snapshot in progress) for: x"
    with pytest.raises(MigrationError, match=r"^There's a migration process in progress$"):
        s.check_can_migrate()


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_blockers_allowed_after_a_migration(status):
    s = MigrationState()
    s.status = status
    s.add_blocker("x")
    assert s.blockers == ["x"]


# --- RAM and tag migration ---------------------------------------------------------------------------

def tcg(name="vm", mte=True, memory=64 << 20):
    return realize(VirtMachineConfig(name, memory=memory, mte=mte), None, MigrationState())


def kvm_machine(name="vm", host_mte=True, mte=True, kernel=None):
    kernel = kernel or SimulatedArm64Kvm(host_mte=host_mte)
    return realize(VirtMachineConfig(name, memory=64 << 20, accel="kvm", mte=mte), kernel, MigrationState())


def fill(machine, pages=20, seed=3):
    """Write data and tags into a pseudo-random set of pages; returns the expected tags per page."""
    rng = np.random.default_rng(seed)
    expected = {}
    for p in sorted(rng.choice(machine.ram.size // PAGE, size=pages, replace=False)):
        addr = RAM + int(p) * PAGE
        machine.ram.write(addr + 8, rng.integers(1, 255, 64, dtype=np.uint8).tobytes())
        if machine.ram.tags is not None:
            tags = rng.integers(0, 16, PAGE // 16, dtype=np.uint8)
            machine.ram.tags.set_tags(addr, tags)
            expected[addr] = tags
    return expected


def assert_same_data(src, dst):
    pages = list(src.ram.pages())
    assert pages and pages == list(dst.ram.pages())
    for addr in pages:
        assert dst.ram.read(addr, PAGE) == src.ram.read(addr, PAGE)


def test_tcg_migration_with_tags_copies_and_verifies_everything():
    src, dst = tcg("a"), tcg("a")
    expected = fill(src)
    seen = []
    stats = migrate_ram(src, dst, with_tags=True, progress=lambda done, total: seen.append((done, total)))
    assert_same_data(src, dst)
    for addr, tags in expected.items():
        assert np.array_equal(dst.ram.tags.get_tags(addr, PAGE), tags)
    assert stats["pages"] == 20 and stats["tag_pages"] == 20 and stats["tags_verified"] == 20 * 256
    assert seen[-1][0] == seen[-1][1] == 20 + 2 * 20
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    info = src.migration.query_migrate()
    assert info["status"] == "completed"
    assert info["ram"]["transferred"] == 20 * PAGE and info["ram"]["remaining"] == 0
    assert info["ram"]["normal"] == 20 and info["ram"]["page-size"] == PAGE
    assert "blocked-reasons" not in info and info["total-time"] >= 0


def test_kvm_migration_moves_tags_through_copy_tags():
    src, dst = kvm_machine("a"), kvm_machine("a")
    expected = fill(src, pages=12)
    stats = migrate_ram(src, dst, with_tags=True)
    assert stats["tag_pages"] == 12
    for addr, tags in expected.items():
        buf = np.zeros(PAGE // 16, dtype=np.uint8)
        assert dst.kvm_vm.mte_copy_tags(addr, PAGE, buf, to_guest=False) == PAGE
        assert np.array_equal(buf, tags)
    # The blocker is the caller's business: a KVM MTE source keeps its own until it is closed.
    assert src.migration.query_migrate()["blocked-reasons"] == [MTE_MIGRATION_BLOCKER]


def test_kvm_to_tcg_migration_with_tags():
    src, dst = kvm_machine("a"), tcg("a")
    expected = fill(src, pages=5)
    migrate_ram(src, dst, with_tags=True)
    for addr, tags in expected.items():
        assert np.array_equal(dst.ram.tags.get_tags(addr, PAGE), tags)


def test_migration_without_tags_moves_data_only():
    src, dst = tcg("a"), tcg("a")
    fill(src, pages=4)
    stats = migrate_ram(src, dst, with_tags=False)
    assert_same_data(src, dst)
    assert stats["tag_pages"] == 0 and dst.ram.tags.tagged_pages == 0


def test_non_mte_migration():
    src, dst = tcg("a", mte=False), tcg("a", mte=False)
    fill(src, pages=3)
    migrate_ram(src, dst, with_tags=False)
    assert_same_data(src, dst)


def test_with_tags_needs_tag_storage_on_both_sides():
    with pytest.raises(MigrationError, match=r"^cannot migrate MTE tags: the destination of 'a' has no MTE tag storage$"):
        RamMigration(tcg("a"), kvm_machine("a", host_mte=False, mte=False), with_tags=True)
    with pytest.raises(MigrationError, match=r"^cannot migrate MTE tags: VM 'a' has no MTE tag storage$"):
        RamMigration(tcg("a", mte=False), tcg("a"), with_tags=True)


def test_ram_size_must_match():
    with pytest.raises(MigrationError, match="does not match source RAM"):
        RamMigration(tcg("a"), tcg("a", memory=128 << 20), with_tags=False)


class LossyKvmVm(SimulatedKvmVm):
    """A destination whose tag store drops the top bit of every tag (a broken host)."""

    def mte_copy_tags(self, ipa, length, buf, to_guest):
        if to_guest:
            buf = buf & 0x7
        return super().mte_copy_tags(ipa, length, buf, to_guest)


class LossyKernel(SimulatedArm64Kvm):
    def create_vm(self):
        return LossyKvmVm(self)


def test_tag_mismatch_fails_the_migration_with_a_clear_reason():
    src = tcg("a")
    src.ram.tags.stg(RAM + 5 * PAGE + 48, 0xC)
    dst = kvm_machine("a", kernel=LossyKernel(True))
    with pytest.raises(MigrationError) as e:
        migrate_ram(src, dst, with_tags=True)
    assert str(e.value) == (f"tag mismatch after migration at 0x{RAM + 5 * PAGE + 48:x}: source tag 12, "
                            f"destination tag 4 (1 of 256 granules differ in that page)")
    info = src.migration.query_migrate()
    assert info["status"] == "failed" and info["error-desc"] == str(e.value)


def test_steps_let_a_caller_interleave_and_a_second_migration_is_refused_meanwhile():
    src, dst = tcg("a"), tcg("a")
    fill(src, pages=130)
    job = RamMigration(src, dst, with_tags=True, chunk_pages=64)
    steps = job.steps()
    assert next(steps) == (64, 130 * 3)
    assert src.migration.status == "active"
    assert src.migration.query_migrate()["ram"]["transferred"] == 64 * PAGE
    with pytest.raises(MigrationError, match="There's a migration process in progress"):
        src.migration.check_can_migrate()
    with pytest.raises(MigrationError, match=r"^There's a migration process in progress$"):
        next(RamMigration(src, tcg("a"), with_tags=False).steps())
    rest = list(steps)
    assert rest[-1] == (390, 390) and job.stats["tags_verified"] == 130 * 256
    assert src.migration.status == "completed"


def test_abandoned_migration_is_cancelled():
    src, dst = tcg("a"), tcg("a")
    fill(src, pages=130)
    steps = RamMigration(src, dst, with_tags=False, chunk_pages=64).steps()
    next(steps)
    steps.close()
    assert src.migration.status == "cancelled"
    src.migration.check_can_migrate()
