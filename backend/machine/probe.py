"""What can this host do for MTE VMs? Facts with their sources, and verdicts a user can act on.

probe_local() reads the real machine: /dev/kvm through ioctls (API version, KVM_CHECK_EXTENSION
values), /proc/cpuinfo and AT_HWCAP2 from /proc/self/auxv for the CPU, and the QEMU binary
(``$MTEVM_QEMU`` or qemu-system-aarch64 on PATH): its --version, whether ``-machine virt,help``
offers ``mte``, and ``-accel help``. The daemon probes often, so QEMU's answers are cached per
binary path + mtime + size. probe_simulated() describes a simulated arm64 host the same way.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field

from backend.machine.kvm import (KVM_API_VERSION, KVM_CAP_ARM_MTE, PROBED_CAPS, RealKvmDevice,
                                 SimulatedArm64Kvm, host_arch)

AT_HWCAP2 = 26
HWCAP2_MTE = 1 << 18                # arm64 asm/hwcap.h
QEMU_MIN_MTE = (8, 0)               # 7.2 stores tags wrongly (fixed by 28fb921f02ef, first in 8.0)
QEMU_MIN_KVM_MTE = (9, 2)           # "arm/kvm: add support for MTE" (pull-target-arm-20241029)
QEMU_TIMEOUT_S = 10
QEMU_ENV = "MTEVM_QEMU"


@dataclass
class ProbeReport:
    host: str
    facts: list[dict] = field(default_factory=list)
    kvm: dict = field(default_factory=dict)
    qemu: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    verdicts: list[dict] = field(default_factory=list)

    def fact(self, name: str, value, source: str) -> None:
        self.facts.append({"name": name, "value": value, "source": source})

    def verdict(self, level: str, text: str) -> None:
        self.verdicts.append({"level": level, "text": text})

    def to_dict(self) -> dict:
        return {"host": self.host, "facts": [dict(f) for f in self.facts], "kvm": dict(self.kvm),
                "qemu": {**self.qemu, "accels": list(self.qemu.get("accels", []))}, "cpu": dict(self.cpu),
                "verdicts": [dict(v) for v in self.verdicts]}


# --- the CPU -------------------------------------------------------------------------------------

def read_hwcap2(auxv_path: str = "/proc/self/auxv") -> int | None:
    """AT_HWCAP2 from the auxiliary vector (pairs of native unsigned longs), None if unreadable."""
    try:
        with open(auxv_path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    word = struct.calcsize("L")
    for key, value in struct.iter_unpack(f"={'Q' if word == 8 else 'I'}{'Q' if word == 8 else 'I'}",
                                         data[:len(data) - len(data) % (2 * word)]):
        if key == AT_HWCAP2:
            return value
        if key == 0:
            break
    return None


def read_cpuinfo_features(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags ("Features" on arm64, "flags" on x86) of the first CPU."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("Features", "flags"):
                    return set(value.split())
    except OSError:
        return None
    return set()


def _probe_cpu(report: ProbeReport, arch: str) -> None:
    report.fact("arch", arch, "uname")
    features = read_cpuinfo_features()
    cpuinfo_mte = features is not None and "mte" in features
    if features is not None:
        report.fact("cpuinfo mte flag", cpuinfo_mte, "/proc/cpuinfo")
    hwcap2 = read_hwcap2()
    if hwcap2 is not None:
        report.fact("AT_HWCAP2", f"0x{hwcap2:x}", "/proc/self/auxv")
    hwcap_mte = arch == "aarch64" and hwcap2 is not None and bool(hwcap2 & HWCAP2_MTE)
    if arch == "aarch64" and hwcap2 is not None:
        report.fact("HWCAP2_MTE", hwcap_mte, "/proc/self/auxv")
    if arch == "aarch64":
        mte = hwcap_mte or cpuinfo_mte
        source = "/proc/self/auxv" if hwcap2 is not None else "/proc/cpuinfo"
    else:
        mte, source = False, "uname"        # MTE is an Arm feature: no other architecture has it
    report.cpu = {"arch": arch, "mte": mte, "source": source}


# --- KVM -----------------------------------------------------------------------------------------

def _probe_kvm(report: ProbeReport, kvm, source: str, error: str | None) -> str | None:
    """Fill report.kvm and the ioctl facts; returns why KVM cannot be used (None if it can)."""
    report.kvm = {"present": kvm.present, "api_version": None, "cap_arm_mte": None, "path": kvm.path}
    try:
        if not kvm.present:
            raise OSError(error or f"no {kvm.path}")
        report.kvm["api_version"] = kvm.api_version()
        report.fact("KVM_GET_API_VERSION", report.kvm["api_version"], source)
        for name, cap in PROBED_CAPS.items():
            value = kvm.check_extension(cap)
            if cap == KVM_CAP_ARM_MTE:
                report.kvm["cap_arm_mte"] = value
            report.fact(f"KVM_CHECK_EXTENSION({name}={cap})", value, source)
    except OSError as e:           # absent, unreadable, or not a KVM device: a fact, not a crash
        reason = f"{kvm.path}: {e.strerror}" if e.strerror else str(e)
        report.kvm.update(present=False, api_version=None, cap_arm_mte=None)
        report.fact("kvm", reason, source)
        return reason
    return None


def _kvm_verdicts(report: ProbeReport, arch: str, kvm_error: str | None,
                  qemu_version: tuple[int, ...] | None, simulated: bool) -> None:
    """The KVM half of the verdicts, the same for real and simulated hosts."""
    kvm = report.kvm
    if not kvm["present"]:
        if kvm_error is None or "No such file" in kvm_error:
            report.verdict("warn", f"no {kvm['path']}: KVM is not available here (kvm module not loaded, "
                                   f"or a container/VM without nested virtualisation); MTE VMs use TCG here")
        elif "Permission denied" in kvm_error:
            report.verdict("warn", f"{kvm_error}: add your user to the kvm group to use KVM; "
                                   f"MTE VMs use TCG here")
        else:
            report.verdict("warn", f"{kvm_error}: KVM cannot be used; MTE VMs use TCG here")
        return
    if kvm["api_version"] != KVM_API_VERSION:
        report.verdict("error", f"{kvm['path']} reports KVM API {kvm['api_version']}, not {KVM_API_VERSION}: "
                                f"KVM cannot be used")
        return
    if arch != "aarch64":
        report.verdict("warn", f"KVM cannot run aarch64 guests on this {arch} host: MTE VMs use TCG here "
                               f"(QEMU >= 9.2 and an arm64 host with KVM_CAP_ARM_MTE are needed for KVM MTE)")
        return
    if not kvm["cap_arm_mte"]:
        report.verdict("warn", "this host's KVM has no KVM_CAP_ARM_MTE (CPU or kernel without MTE): "
                               "KVM VMs with mte=on fail with 'MTE requested, but not supported by KVM'; "
                               "use accel tcg for MTE")
        return
    if not simulated and (qemu_version is None or qemu_version < QEMU_MIN_KVM_MTE):
        report.verdict("warn", "QEMU >= 9.2 and an arm64 host with KVM_CAP_ARM_MTE are needed for KVM MTE: "
                               "this host has the capability, upgrade QEMU")
        return
    report.verdict("ok", f"KVM MTE available (KVM_CAP_ARM_MTE = {kvm['cap_arm_mte']}): accel kvm with mte=on "
                         f"works; such VMs cannot migrate ('Live migration disabled due to MTE enabled') "
                         f"unless tags are migrated (with_tags)")


# --- QEMU ----------------------------------------------------------------------------------------

_qemu_cache: dict[tuple, dict] = {}


def find_qemu(qemu_binary: str | None = None) -> str | None:
    """The QEMU to use: the argument, then $MTEVM_QEMU, then qemu-system-aarch64 on PATH."""
    candidate = qemu_binary or os.environ.get(QEMU_ENV) or "qemu-system-aarch64"
    return shutil.which(candidate) or (candidate if os.path.isfile(candidate) else None)


def parse_qemu_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def _run_qemu(binary: str, *args: str) -> str:
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=QEMU_TIMEOUT_S,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"`{' '.join(args)}` exited with {out.returncode}")
    return out.stdout


def query_qemu(binary: str) -> dict:
    """version, mte offered, accelerators of one binary; cached per path + mtime + size."""
    st = os.stat(binary)
    key = (os.path.realpath(binary), st.st_mtime_ns, st.st_size)
    if key not in _qemu_cache:
        info: dict = {"version_text": None, "version": None, "mte": None, "accels": [], "error": None}
        try:
            info["version_text"] = _run_qemu(binary, "--version").splitlines()[0].strip()
            info["version"] = parse_qemu_version(info["version_text"])
            machine_help = _run_qemu(binary, "-machine", "virt,help")
            info["mte"] = bool(re.search(r"^\s*mte=", machine_help, re.MULTILINE))
            accel_help = _run_qemu(binary, "-accel", "help")
            info["accels"] = [line.strip() for line in accel_help.splitlines()[1:] if line.strip()]
        except (OSError, subprocess.SubprocessError, RuntimeError, IndexError) as e:
            info["error"] = f"{binary} could not be queried: {e}"
        _qemu_cache[key] = info
    return _qemu_cache[key]


def _probe_qemu(report: ProbeReport, qemu_binary: str | None) -> tuple[int, ...] | None:
    binary = find_qemu(qemu_binary)
    qemu = {"binary": binary, "version": None, "mte": None, "accels": [], "usable_for_mte": False, "reason": None}
    report.qemu = qemu
    if binary is None:
        qemu["reason"] = (f"no qemu-system-aarch64 found: install qemu-system-arm (QEMU >= 8.0) "
                          f"or set ${QEMU_ENV} to its path")
        report.verdict("error", qemu["reason"])
        return None
    info = query_qemu(binary)
    version = info["version"]
    qemu.update(mte=info["mte"], accels=list(info["accels"]),
                version=".".join(map(str, version)) if version else None)
    report.fact("QEMU binary", binary, "$" + QEMU_ENV if os.environ.get(QEMU_ENV) and not qemu_binary else "PATH")
    if info["version_text"]:
        report.fact("QEMU version", info["version_text"], f"{binary} --version")
    if info["mte"] is not None:
        report.fact("virt offers mte", info["mte"], f"{binary} -machine virt,help")
        report.fact("accelerators", ", ".join(info["accels"]), f"{binary} -accel help")
    if info["error"]:
        qemu["reason"] = info["error"]
    elif version is None:
        qemu["reason"] = f"{binary} --version printed no version: {info['version_text']!r}"
    elif version < QEMU_MIN_MTE:
        qemu["reason"] = f"QEMU {version[0]}.{version[1]} stores MTE tags incorrectly: use 8.0 or newer"
    elif not info["mte"]:
        qemu["reason"] = f"QEMU {qemu['version']} at {binary} does not offer the virt machine's mte property"
    elif "tcg" not in info["accels"] and "kvm" not in info["accels"]:
        qemu["reason"] = f"QEMU {qemu['version']} at {binary} has neither tcg nor kvm"
    if qemu["reason"]:
        report.verdict("error", qemu["reason"])
    else:
        qemu["usable_for_mte"] = True
        report.verdict("ok", f"QEMU {qemu['version']} runs MTE VMs with TCG "
                             f"(-machine virt,mte=on -cpu max -accel tcg)")
    return version


# --- entry points --------------------------------------------------------------------------------

def probe_local(qemu_binary: str | None = None, kvm_path: str = "/dev/kvm") -> ProbeReport:
    """Probe this machine for real (nothing simulated, nothing assumed)."""
    arch = host_arch()
    report = ProbeReport(host="local")
    _probe_cpu(report, arch)
    kvm = RealKvmDevice(kvm_path)
    try:
        kvm_error = _probe_kvm(report, kvm, f"ioctl {kvm_path}", kvm.error)
    finally:
        kvm.close()
    version = _probe_qemu(report, qemu_binary)
    _kvm_verdicts(report, arch, kvm_error, version, simulated=False)
    return report


SIMULATED_QEMU_VERSION = "9.2.0"


def probe_simulated(name: str, *, arch: str = "aarch64", host_mte: bool) -> ProbeReport:
    """The report of a simulated host: an arm64 kernel with (or without) KVM_CAP_ARM_MTE."""
    report = ProbeReport(host=name)
    source = "simulated"
    report.fact("arch", arch, source)
    mte = host_mte and arch == "aarch64"
    if arch == "aarch64":
        report.fact("HWCAP2_MTE", mte, source)
    report.cpu = {"arch": arch, "mte": mte, "source": source}
    kvm = SimulatedArm64Kvm(host_mte=mte)
    kvm.arch = arch
    _probe_kvm(report, kvm, f"{source} ioctl", None)
    # The simulated host models the seed's QEMU (9.2, the first release with KVM MTE): there is
    # no binary, but the behaviour is that version's, so say so rather than "not found".
    report.qemu = {"binary": "(simulated)", "version": SIMULATED_QEMU_VERSION, "mte": True,
                   "accels": ["kvm", "tcg"], "usable_for_mte": True, "reason": None}
    report.fact("QEMU", f"{SIMULATED_QEMU_VERSION} behaviour (machvirt_init + kvm_arm_enable_mte)", source)
    report.verdict("ok", "simulated virt machines run MTE with TCG (cpu max, cortex-a710, neoverse-n2)")
    _kvm_verdicts(report, arch, None, None, simulated=True)
    return report
