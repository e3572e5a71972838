"""The KVM side of a virt machine: the real /dev/kvm and a simulated arm64 kernel, one interface.

``RealKvmDevice`` issues the ioctls of include/uapi/linux/kvm.h through fcntl.ioctl. On this
project's x86_64 machines it can only answer questions (API version, KVM_CHECK_EXTENSION): an
x86 KVM cannot run aarch64 guests, so creating a VM is refused there with a clear error.

``SimulatedArm64Kvm`` is an arm64 kernel with Linux's rules for MTE (arch/arm64/kvm/arm.c and
mmu.c): KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) fails with EINVAL once a vCPU exists or when the host has
no MTE; with MTE enabled, memslots must be backed by memory that can hold tags (anonymous, memfd,
tmpfs) else EINVAL; KVM_ARM_MTE_COPY_TAGS needs page-aligned ranges. Its VM memory is a GuestRam
whose tags play the part of the hardware's tag storage.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct
from typing import Protocol

import numpy as np

from backend.tagcheck import GuestRam
from backend.tagcheck.layout import GRANULE, PAGE

# --- ioctl encoding (asm-generic/ioctl.h, used by both arm64 and x86_64) -------------------------
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


KVMIO = 0xAE

# struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; }
ENABLE_CAP_STRUCT = struct.Struct("=II4Q64x")
# struct kvm_userspace_memory_region { __u32 slot, flags; __u64 guest_phys_addr, memory_size, userspace_addr; }
USER_MEMORY_REGION_STRUCT = struct.Struct("=IIQQQ")
# arm64 struct kvm_arm_copy_mte_tags { __u64 guest_ipa, length; void *addr; __u64 flags; __u64 reserved[2]; }
COPY_MTE_TAGS_STRUCT = struct.Struct("=QQQQ2Q")

KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_CREATE_VCPU = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, KVMIO, 0x46, USER_MEMORY_REGION_STRUCT.size)
KVM_ENABLE_CAP = _ioc(_IOC_WRITE, KVMIO, 0xA3, ENABLE_CAP_STRUCT.size)
KVM_ARM_MTE_COPY_TAGS = _ioc(_IOC_READ, KVMIO, 0xB4, COPY_MTE_TAGS_STRUCT.size)
KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1

KVM_API_VERSION = 12

# Capabilities worth showing for an arm64 guest (numbers from include/uapi/linux/kvm.h).
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_ARM_PMU_V3 = 126
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_ARM_SVE = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS = 171
KVM_CAP_ARM_PTRAUTH_GENERIC = 172
KVM_CAP_ARM_MTE = 205

PROBED_CAPS: dict[str, int] = {
    "KVM_CAP_ARM_MTE": KVM_CAP_ARM_MTE,
    "KVM_CAP_NR_VCPUS": KVM_CAP_NR_VCPUS,
    "KVM_CAP_MAX_VCPUS": KVM_CAP_MAX_VCPUS,
    "KVM_CAP_ARM_PSCI_0_2": KVM_CAP_ARM_PSCI_0_2,
    "KVM_CAP_ARM_PMU_V3": KVM_CAP_ARM_PMU_V3,
    "KVM_CAP_ARM_SVE": KVM_CAP_ARM_SVE,
    "KVM_CAP_ARM_PTRAUTH_ADDRESS": KVM_CAP_ARM_PTRAUTH_ADDRESS,
    "KVM_CAP_ARM_PTRAUTH_GENERIC": KVM_CAP_ARM_PTRAUTH_GENERIC,
    "KVM_CAP_ARM_VM_IPA_SIZE": KVM_CAP_ARM_VM_IPA_SIZE,
}

# Memslot backings whose VMAs Linux marks VM_MTE_ALLOWED (anonymous, shmem/memfd, tmpfs).
MTE_CAPABLE_BACKINGS = ("anonymous", "memfd", "tmpfs")
BACKINGS = MTE_CAPABLE_BACKINGS + ("file",)


def host_arch() -> str:
    """The machine architecture as QEMU and Debian's aarch64 tools name it ("aarch64", "x86_64")."""
    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def _oserror(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


def pack_enable_cap(cap: int, args: tuple[int, ...] = (), flags: int = 0) -> bytes:
    """struct kvm_enable_cap for KVM_ENABLE_CAP (up to four u64 arguments)."""
    if len(args) > 4:
        raise ValueError("kvm_enable_cap holds at most 4 arguments")
    return ENABLE_CAP_STRUCT.pack(cap, flags, *(tuple(args) + (0,) * (4 - len(args))))


def pack_user_memory_region(slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0) -> bytes:
    """struct kvm_userspace_memory_region for KVM_SET_USER_MEMORY_REGION."""
    return USER_MEMORY_REGION_STRUCT.pack(slot, flags, gpa, size, userspace_addr)


def pack_copy_mte_tags(ipa: int, length: int, buffer_addr: int, to_guest: bool) -> bytes:
    """struct kvm_arm_copy_mte_tags for KVM_ARM_MTE_COPY_TAGS (reserved words zero, as the kernel demands)."""
    flags = KVM_ARM_TAGS_TO_GUEST if to_guest else KVM_ARM_TAGS_FROM_GUEST
    return COPY_MTE_TAGS_STRUCT.pack(ipa, length, buffer_addr, flags, 0, 0)


def check_copy_tags_range(ipa: int, length: int, buf: np.ndarray) -> None:
    """The kernel's argument checks for KVM_ARM_MTE_COPY_TAGS: page-aligned range, big enough buffer."""
    if ipa % PAGE or length % PAGE:
        raise _oserror(errno.EINVAL, "KVM_ARM_MTE_COPY_TAGS: guest_ipa and length must be page-aligned")
    if buf.dtype != np.uint8 or buf.size < length // GRANULE:
        raise _oserror(errno.EFAULT, "KVM_ARM_MTE_COPY_TAGS: the buffer needs one uint8 per 16-byte granule")


class KvmVm(Protocol):
    mte_enabled: bool
    ram: object          # GuestRam of the first memslot (simulated), None for a real VM

    def enable_cap(self, cap: int, arg: int = 0) -> None: ...
    def create_vcpu(self, index: int) -> None: ...
    def set_user_memory_region(self, slot: int, gpa: int, size: int, backing: str) -> None: ...
    def mte_copy_tags(self, ipa: int, length: int, buf: np.ndarray, to_guest: bool) -> int: ...
    def close(self) -> None: ...


class KvmDevice(Protocol):
    present: bool
    path: str
    arch: str

    def api_version(self) -> int: ...
    def check_extension(self, cap: int) -> int: ...
    def create_vm(self) -> KvmVm: ...


# --- the real /dev/kvm ---------------------------------------------------------------------------

class RealKvmDevice:
    """The host's /dev/kvm through ioctls. ``error`` says why it cannot be used (absent, no permission)."""

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        self.arch = host_arch()
        self.error: str | None = None
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            self.error = f"{path}: {e.strerror}"
        self.present = self._fd is not None

    def _device_fd(self) -> int:
        if self._fd is None:
            raise _oserror(errno.ENODEV, self.error or f"{self.path} is closed")
        return self._fd

    def api_version(self) -> int:
        return fcntl.ioctl(self._device_fd(), KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self._device_fd(), KVM_CHECK_EXTENSION, cap)

    def create_vm(self) -> "RealKvmVm":
        if self.arch != "aarch64":
            raise OSError(errno.ENOTSUP, f"KVM on this {self.arch} host cannot run aarch64 guests", self.path)
        return RealKvmVm(fcntl.ioctl(self._device_fd(), KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class RealKvmVm:
    """A VM file descriptor on an arm64 host. Only reachable where KVM runs aarch64 guests."""

    ram = None

    def __init__(self, fd: int):
        self.fd = fd
        self.mte_enabled = False
        self._vcpu_fds: list[int] = []
        self._maps: list[mmap.mmap] = []

    def enable_cap(self, cap: int, arg: int = 0) -> None:
        fcntl.ioctl(self.fd, KVM_ENABLE_CAP, pack_enable_cap(cap, (arg,)))
        if cap == KVM_CAP_ARM_MTE:
            self.mte_enabled = True

    def create_vcpu(self, index: int) -> None:
        self._vcpu_fds.append(fcntl.ioctl(self.fd, KVM_CREATE_VCPU, index))

    def set_user_memory_region(self, slot: int, gpa: int, size: int, backing: str) -> None:
        if backing != "anonymous":
            raise OSError(errno.ENOTSUP, "the real KVM path maps anonymous memory only", backing)
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._maps.append(area)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
        fcntl.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, pack_user_memory_region(slot, gpa, size, addr))

    def mte_copy_tags(self, ipa: int, length: int, buf: np.ndarray, to_guest: bool) -> int:
        check_copy_tags_range(ipa, length, buf)
        return fcntl.ioctl(self.fd, KVM_ARM_MTE_COPY_TAGS,
                           pack_copy_mte_tags(ipa, length, buf.ctypes.data, to_guest))

    def close(self) -> None:
        for fd in self._vcpu_fds + ([self.fd] if self.fd >= 0 else []):
            os.close(fd)
        self._vcpu_fds, self.fd = [], -1
        for area in self._maps:
            area.close()
        self._maps = []


# --- the simulated arm64 kernel ------------------------------------------------------------------

class SimulatedArm64Kvm:
    """/dev/kvm of an arm64 host running Linux >= 6.2, with or without MTE in its CPUs."""

    arch = "aarch64"
    present = True

    def __init__(self, host_mte: bool, *, max_vcpus: int = 512, path: str = "/dev/kvm"):
        self.host_mte = host_mte
        self.max_vcpus = max_vcpus
        self.path = path
        self.caps = {
            KVM_CAP_USER_MEMORY: 1,
            KVM_CAP_NR_VCPUS: min(max_vcpus, 8),
            KVM_CAP_MAX_VCPUS: max_vcpus,
            KVM_CAP_ARM_PSCI_0_2: 1,
            KVM_CAP_ARM_PMU_V3: 1,
            KVM_CAP_ARM_VM_IPA_SIZE: 48,
            KVM_CAP_ARM_SVE: 0,
            KVM_CAP_ARM_PTRAUTH_ADDRESS: 1,
            KVM_CAP_ARM_PTRAUTH_GENERIC: 1,
            KVM_CAP_ARM_MTE: 1 if host_mte else 0,
        }

    def api_version(self) -> int:
        return KVM_API_VERSION

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def create_vm(self) -> "SimulatedKvmVm":
        return SimulatedKvmVm(self)


class SimulatedKvmVm:
    """One VM of the simulated kernel: its vCPUs, memslots and (when enabled) MTE tag storage."""

    def __init__(self, kernel: SimulatedArm64Kvm):
        self.kernel = kernel
        self.mte_enabled = False
        self.vcpus: set[int] = set()
        self.memslots: dict[int, object] = {}     # slot -> GuestRam
        self.closed = False

    @property
    def ram(self):
        """The guest memory of the lowest memslot (a virt machine has one RAM slot)."""
        return self.memslots[min(self.memslots)] if self.memslots else None

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise _oserror(errno.EBADF, what)

    def enable_cap(self, cap: int, arg: int = 0) -> None:
        self._check_open("KVM_ENABLE_CAP")
        if cap != KVM_CAP_ARM_MTE:
            raise _oserror(errno.EINVAL, f"KVM_ENABLE_CAP: capability {cap} cannot be enabled")
        # arch/arm64/kvm/arm.c: if (!system_supports_mte() || kvm->created_vcpus) r = -EINVAL;
        if not self.kernel.host_mte or self.vcpus:
            raise _oserror(errno.EINVAL, "KVM_ENABLE_CAP(KVM_CAP_ARM_MTE)")
        self.mte_enabled = True

    def create_vcpu(self, index: int) -> None:
        self._check_open("KVM_CREATE_VCPU")
        if not 0 <= index < self.kernel.max_vcpus:
            raise _oserror(errno.EINVAL, f"KVM_CREATE_VCPU: index {index}")
        if index in self.vcpus:
            raise _oserror(errno.EEXIST, f"KVM_CREATE_VCPU: vCPU {index} exists")
        self.vcpus.add(index)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, backing: str) -> None:
        self._check_open("KVM_SET_USER_MEMORY_REGION")
        if backing not in BACKINGS:
            raise ValueError(f"unknown memslot backing {backing!r}: use one of {', '.join(BACKINGS)}")
        if gpa % PAGE or size % PAGE:
            raise _oserror(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION: guest_phys_addr and size must be page-aligned")
        if size == 0:                      # memory_size 0 deletes the slot
            self.memslots.pop(slot, None)
            return
        # arch/arm64/kvm/mmu.c kvm_arch_prepare_memory_region: MTE needs VM_MTE_ALLOWED mappings.
        if self.mte_enabled and backing not in MTE_CAPABLE_BACKINGS:
            raise _oserror(errno.EINVAL, f"KVM_SET_USER_MEMORY_REGION: {backing} memory cannot hold MTE tags")
        for other_slot, ram in self.memslots.items():
            if other_slot != slot and gpa < ram.base + ram.size and ram.base < gpa + size:
                raise _oserror(errno.EEXIST, "KVM_SET_USER_MEMORY_REGION: overlaps another memslot")
        self.memslots[slot] = GuestRam(gpa, size, mte=self.mte_enabled)

    def _ram_for(self, ipa: int, length: int):
        for ram in self.memslots.values():
            if ram.base <= ipa and ipa + length <= ram.base + ram.size:
                return ram
        raise _oserror(errno.EFAULT, f"KVM_ARM_MTE_COPY_TAGS: 0x{ipa:x}+0x{length:x} is not guest RAM")

    def mte_copy_tags(self, ipa: int, length: int, buf: np.ndarray, to_guest: bool) -> int:
        """Copy one tag per 16-byte granule between ``buf`` and the guest; returns the bytes covered."""
        self._check_open("KVM_ARM_MTE_COPY_TAGS")
        if not self.mte_enabled:
            raise _oserror(errno.EINVAL, "KVM_ARM_MTE_COPY_TAGS: MTE is not enabled for this VM")
        check_copy_tags_range(ipa, length, buf)
        ram = self._ram_for(ipa, length)
        n = length // GRANULE
        if to_guest:
            ram.tags.set_tags(ipa, buf[:n] & 0xF)     # the kernel's STG keeps the low 4 bits
        else:
            buf[:n] = ram.tags.get_tags(ipa, length)
        return length

    def close(self) -> None:
        self.closed = True
        self.vcpus.clear()
        self.memslots.clear()
