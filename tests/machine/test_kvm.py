"""KVM: the real /dev/kvm answers through ioctls; the simulated arm64 kernel keeps Linux's MTE rules."""
import errno

import numpy as np
import pytest

from backend.machine import KVM_CAP_ARM_MTE, RealKvmDevice, SimulatedArm64Kvm
from backend.machine import kvm as kvmmod

PAGE = 4096
RAM = 0x4000_0000


# --- ioctl numbers and argument packing, checked against include/uapi/linux/kvm.h values --------

def test_ioctl_numbers_match_the_uapi_headers():
    assert kvmmod.KVM_GET_API_VERSION == 0xAE00
    assert kvmmod.KVM_CREATE_VM == 0xAE01
    assert kvmmod.KVM_CHECK_EXTENSION == 0xAE03
    assert kvmmod.KVM_CREATE_VCPU == 0xAE41
    assert kvmmod.KVM_SET_USER_MEMORY_REGION == 0x4020AE46     # _IOW(KVMIO, 0x46, 32 bytes)
    assert kvmmod.KVM_ENABLE_CAP == 0x4068AEA3                 # _IOW(KVMIO, 0xa3, 104 bytes)
    assert kvmmod.KVM_ARM_MTE_COPY_TAGS == 0x8030AEB4          # _IOR(KVMIO, 0xb4, 48 bytes)
    assert KVM_CAP_ARM_MTE == 205


def test_pack_enable_cap_layout():
    raw = kvmmod.pack_enable_cap(KVM_CAP_ARM_MTE, (7,))
    assert len(raw) == 104                                     # u32 cap, u32 flags, u64 args[4], u8 pad[64]
    assert int.from_bytes(raw[0:4], "little") == 205
    assert int.from_bytes(raw[4:8], "little") == 0
    assert int.from_bytes(raw[8:16], "little") == 7
    assert raw[16:] == bytes(104 - 16)
    with pytest.raises(ValueError):
        kvmmod.pack_enable_cap(1, (1, 2, 3, 4, 5))


def test_pack_user_memory_region_layout():
    raw = kvmmod.pack_user_memory_region(slot=3, gpa=RAM, size=256 << 20, userspace_addr=0x7F00_0000_1000, flags=1)
    assert len(raw) == 32
    words = [int.from_bytes(raw[i:i + 4], "little") for i in (0, 4)]
    quads = [int.from_bytes(raw[i:i + 8], "little") for i in (8, 16, 24)]
    assert words == [3, 1] and quads == [RAM, 256 << 20, 0x7F00_0000_1000]


def test_pack_copy_mte_tags_layout():
    raw = kvmmod.pack_copy_mte_tags(RAM + PAGE, 2 * PAGE, 0xDEAD000, to_guest=False)
    assert len(raw) == 48
    quads = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 48, 8)]
    assert quads == [RAM + PAGE, 2 * PAGE, 0xDEAD000, kvmmod.KVM_ARM_TAGS_FROM_GUEST, 0, 0]
    assert int.from_bytes(kvmmod.pack_copy_mte_tags(0, PAGE, 0, to_guest=True)[24:32], "little") == 0


# --- the real /dev/kvm on this machine ------------------------------------------------------------

def test_real_kvm_reads_this_hosts_values():
    """Whatever this host is, the device answers with real values (x86 here: API 12, no ARM MTE cap)."""
    dev = RealKvmDevice("/dev/kvm")
    try:
        if not dev.present:
            assert dev.error and dev.error.startswith("/dev/kvm: ")
            with pytest.raises(OSError):
                dev.api_version()
            return
        assert dev.api_version() == 12
        cap = dev.check_extension(KVM_CAP_ARM_MTE)
        if dev.arch == "x86_64":
            assert cap == 0
            with pytest.raises(OSError) as e:
                dev.create_vm()
            assert "cannot run aarch64 guests" in str(e.value)
        assert dev.check_extension(kvmmod.KVM_CAP_USER_MEMORY) == 1
    finally:
        dev.close()


def test_missing_device_is_reported_not_raised(tmp_path):
    dev = RealKvmDevice(str(tmp_path / "kvm"))
    assert not dev.present
    assert dev.error == f"{tmp_path / 'kvm'}: No such file or directory"
    with pytest.raises(OSError) as e:
        dev.check_extension(KVM_CAP_ARM_MTE)
    assert e.value.errno == errno.ENODEV


def test_unopenable_device_is_reported(tmp_path):
    path = tmp_path / "kvm"
    path.write_text("")
    path.chmod(0)
    dev = RealKvmDevice(str(path))
    # root may open a mode-0 file; a plain file is then not a KVM device, so the ioctl fails cleanly.
    if dev.present:
        with pytest.raises(OSError):
            dev.api_version()
        dev.close()
    else:
        assert dev.error == f"{path}: Permission denied"


# --- the simulated arm64 kernel -------------------------------------------------------------------

def make_vm(host_mte=True):
    return SimulatedArm64Kvm(host_mte=host_mte).create_vm()


def test_simulated_kernel_caps():
    assert SimulatedArm64Kvm(True).api_version() == 12
    assert SimulatedArm64Kvm(True).check_extension(KVM_CAP_ARM_MTE) == 1
    assert SimulatedArm64Kvm(False).check_extension(KVM_CAP_ARM_MTE) == 0
    assert SimulatedArm64Kvm(True).check_extension(99999) == 0


def test_enable_mte_before_vcpus():
    vm = make_vm()
    vm.enable_cap(KVM_CAP_ARM_MTE)
    assert vm.mte_enabled
    vm.create_vcpu(0)


def test_enable_mte_after_a_vcpu_is_einval():
    vm = make_vm()
    vm.create_vcpu(0)
    with pytest.raises(OSError) as e:
        vm.enable_cap(KVM_CAP_ARM_MTE)
    assert e.value.errno == errno.EINVAL
    assert not vm.mte_enabled


def test_enable_mte_without_host_mte_is_einval():
    vm = make_vm(host_mte=False)
    with pytest.raises(OSError) as e:
        vm.enable_cap(KVM_CAP_ARM_MTE)
    assert e.value.errno == errno.EINVAL


def test_vcpu_rules():
    vm = make_vm()
    vm.create_vcpu(0)
    with pytest.raises(OSError) as e:
        vm.create_vcpu(0)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        vm.create_vcpu(512)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("backing", ["anonymous", "memfd", "tmpfs"])
def test_mte_memslots_accept_tag_capable_backing(backing):
    vm = make_vm()
    vm.enable_cap(KVM_CAP_ARM_MTE)
    vm.set_user_memory_region(0, RAM, 64 << 20, backing)
    assert vm.ram.tags is not None and vm.ram.base == RAM


def test_mte_memslot_on_file_backing_is_einval_and_fine_without_mte():
    vm = make_vm()
    vm.enable_cap(KVM_CAP_ARM_MTE)
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(0, RAM, 64 << 20, "file")
    assert e.value.errno == errno.EINVAL
    assert vm.ram is None
    plain = make_vm()
    plain.set_user_memory_region(0, RAM, 64 << 20, "file")
    assert plain.ram.tags is None


def test_memslot_alignment_overlap_and_delete():
    vm = make_vm()
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(0, RAM + 1, 64 << 20, "anonymous")
    assert e.value.errno == errno.EINVAL
    vm.set_user_memory_region(0, RAM, 64 << 20, "anonymous")
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(1, RAM + PAGE, PAGE, "anonymous")
    assert e.value.errno == errno.EEXIST
    vm.set_user_memory_region(0, RAM, 0, "anonymous")
    assert vm.ram is None
    with pytest.raises(ValueError, match="unknown memslot backing 'hugepages'"):
        vm.set_user_memory_region(0, RAM, PAGE, "hugepages")


def mte_vm_with_ram():
    vm = make_vm()
    vm.enable_cap(KVM_CAP_ARM_MTE)
    vm.set_user_memory_region(0, RAM, 64 << 20, "anonymous")
    return vm


def test_copy_tags_round_trip_one_tag_per_byte():
    vm = mte_vm_with_ram()
    vm.ram.tags.stg(RAM + PAGE + 32, 0xA)
    buf = np.zeros(2 * PAGE // 16, dtype=np.uint8)
    assert vm.mte_copy_tags(RAM, 2 * PAGE, buf, to_guest=False) == 2 * PAGE
    assert buf[PAGE // 16 + 2] == 0xA and buf.sum() == 0xA
    new = np.arange(PAGE // 16, dtype=np.uint8) % 16
    assert vm.mte_copy_tags(RAM + 3 * PAGE, PAGE, new, to_guest=True) == PAGE
    assert vm.ram.tags.ldg(RAM + 3 * PAGE + 16 * 5) == 5


def test_copy_tags_to_guest_keeps_low_four_bits():
    vm = mte_vm_with_ram()
    buf = np.full(PAGE // 16, 0xF3, dtype=np.uint8)
    vm.mte_copy_tags(RAM, PAGE, buf, to_guest=True)
    assert vm.ram.tags.ldg(RAM) == 3


@pytest.mark.parametrize("ipa,length", [(RAM + 16, PAGE), (RAM, PAGE + 16), (RAM + 1, 1)])
def test_copy_tags_needs_page_alignment(ipa, length):
    vm = mte_vm_with_ram()
    with pytest.raises(OSError) as e:
        vm.mte_copy_tags(ipa, length, np.zeros(1024, dtype=np.uint8), to_guest=False)
    assert e.value.errno == errno.EINVAL


def test_copy_tags_other_errors():
    vm = mte_vm_with_ram()
    with pytest.raises(OSError) as e:
        vm.mte_copy_tags(RAM, 2 * PAGE, np.zeros(10, dtype=np.uint8), to_guest=False)
    assert e.value.errno == errno.EFAULT
    with pytest.raises(OSError) as e:
        vm.mte_copy_tags(0x1000, PAGE, np.zeros(256, dtype=np.uint8), to_guest=False)
    assert e.value.errno == errno.EFAULT
    plain = make_vm()
    plain.set_user_memory_region(0, RAM, 64 << 20, "anonymous")
    with pytest.raises(OSError) as e:
        plain.mte_copy_tags(RAM, PAGE, np.zeros(256, dtype=np.uint8), to_guest=False)
    assert e.value.errno == errno.EINVAL


def test_closed_vm_refuses_everything():
    vm = mte_vm_with_ram()
    vm.close()
    for call in (lambda: vm.create_vcpu(0), lambda: vm.enable_cap(KVM_CAP_ARM_MTE),
                 lambda: vm.set_user_memory_region(0, RAM, PAGE, "anonymous")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF
