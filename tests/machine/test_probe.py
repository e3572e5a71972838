"""The probe: real facts of this machine with their sources, and verdicts for real and simulated hosts."""
import os
import shutil
import subprocess

import pytest

from backend.machine import probe_local, probe_simulated
from backend.machine.kvm import host_arch
from backend.machine.probe import parse_qemu_version, read_hwcap2

REAL_QEMU = shutil.which("qemu-system-aarch64")


def fact(report, name):
    values = [f for f in report["facts"] if f["name"] == name]
    assert values, f"no fact {name!r} in {[f['name'] for f in report['facts']]}"
    return values[0]


def fake_qemu(tmp_path, version_line, *, mte=True, accels=("tcg",), fail=False, name="qemu-system-aarch64"):
    """A real executable that answers like a QEMU binary of another version; counts its runs."""
    script = tmp_path / name
    counter = tmp_path / f"{name}.runs"
    machine_help = "  mte=<bool>             - Set on/off to enable/disable emulating MTE\\n" if mte else ""
    script.write_text(f"""#!/bin/sh
echo run >> {counter}
{'echo "qemu: broken" >&2; exit 1' if fail else ''}
case "$1" in
  --version) printf '%s\\nCopyright (c) 2003-2022 Fabrice Bellard\\n' "{version_line}" ;;
  -machine) printf 'virt-7.2 options:\\n  gic-version=<string>   - Set GIC version\\n{machine_help}' ;;
  -accel) printf 'Accelerators supported in QEMU binary:\\n{chr(10).join(accels)}\\n' ;;
esac
""")
    script.chmod(0o755)
    return script, counter


# --- this machine, for real ---------------------------------------------------------------------------

def test_local_probe_reads_this_machines_kvm():
    r = probe_local().to_dict()
    assert r["host"] == "local"
    assert fact(r, "arch")["value"] == host_arch() and r["cpu"]["arch"] == host_arch()
    if not os.path.exists("/dev/kvm"):
        assert not r["kvm"]["present"]
        assert any(v["text"].startswith("no /dev/kvm") for v in r["verdicts"])
        return
    assert r["kvm"]["present"] and r["kvm"]["path"] == "/dev/kvm"
    assert r["kvm"]["api_version"] == 12
    assert fact(r, "KVM_GET_API_VERSION") == {"name": "KVM_GET_API_VERSION", "value": 12, "source": "ioctl /dev/kvm"}
    mte_cap = fact(r, "KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE=205)")
    assert mte_cap["source"] == "ioctl /dev/kvm" and mte_cap["value"] == r["kvm"]["cap_arm_mte"]
    fact(r, "KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPUS=66)")
    if host_arch() == "x86_64":
        assert r["kvm"]["cap_arm_mte"] == 0
        assert {"level": "warn", "text": "KVM cannot run aarch64 guests on this x86_64 host: MTE VMs use TCG here "
                "(QEMU >= 9.2 and an arm64 host with KVM_CAP_ARM_MTE are needed for KVM MTE)"} in r["verdicts"]
        assert r["cpu"] == {"arch": "x86_64", "mte": False, "source": "uname"}


def test_local_probe_reads_the_cpu():
    r = probe_local().to_dict()
    hwcap2 = read_hwcap2()
    assert hwcap2 is not None                       # Linux always gives AT_HWCAP2 on arm64 and x86_64
    assert fact(r, "AT_HWCAP2") == {"name": "AT_HWCAP2", "value": f"0x{hwcap2:x}", "source": "/proc/self/auxv"}
    with open("/proc/cpuinfo") as f:
        assert ("mte" in f.read().split()) == fact(r, "cpuinfo mte flag")["value"]


def test_local_probe_reads_the_real_qemu(monkeypatch):
    assert REAL_QEMU, "scripts/install-deps.sh installs qemu-system-aarch64"
    monkeypatch.delenv("MTEVM_QEMU", raising=False)
    first_line = subprocess.run([REAL_QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    r = probe_local().to_dict()
    q = r["qemu"]
    assert q["binary"] == REAL_QEMU
    assert q["version"] == ".".join(map(str, parse_qemu_version(first_line)))
    assert fact(r, "QEMU version") == {"name": "QEMU version", "value": first_line, "source": f"{REAL_QEMU} --version"}
    assert q["mte"] is True and "tcg" in q["accels"]
    if host_arch() == "x86_64":
        assert q["accels"] == ["tcg"]
    assert q["usable_for_mte"] and q["reason"] is None
    assert {"level": "ok", "text": f"QEMU {q['version']} runs MTE VMs with TCG "
            f"(-machine virt,mte=on -cpu max -accel tcg)"} in r["verdicts"]


def test_missing_kvm_device_is_a_verdict(tmp_path):
    r = probe_local(kvm_path=str(tmp_path / "kvm")).to_dict()
    assert r["kvm"] == {"present": False, "api_version": None, "cap_arm_mte": None, "path": str(tmp_path / "kvm")}
    assert any(v["text"].startswith(f"no {tmp_path / 'kvm'}: KVM is not available here") for v in r["verdicts"])


def test_a_file_that_is_not_a_kvm_device_is_a_verdict(tmp_path):
    path = tmp_path / "kvm"
    path.write_text("")
    r = probe_local(kvm_path=str(path)).to_dict()
    assert r["kvm"]["present"] is False and r["kvm"]["api_version"] is None
    assert fact(r, "kvm") == {"name": "kvm", "value": f"{path}: Inappropriate ioctl for device",
                              "source": f"ioctl {path}"}
    assert {"level": "warn", "text": f"{path}: Inappropriate ioctl for device: KVM cannot be used; "
            "MTE VMs use TCG here"} in r["verdicts"]


# --- QEMU versions through a real stand-in executable --------------------------------------------------

def test_qemu_7_2_is_not_usable_for_mte(tmp_path, monkeypatch):
    script, _ = fake_qemu(tmp_path, "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u7)")
    monkeypatch.setenv("MTEVM_QEMU", str(script))
    r = probe_local().to_dict()
    assert r["qemu"]["binary"] == str(script) and r["qemu"]["version"] == "7.2.15"
    assert r["qemu"]["usable_for_mte"] is False
    assert r["qemu"]["reason"] == "QEMU 7.2 stores MTE tags incorrectly: use 8.0 or newer"
    assert {"level": "error", "text": "QEMU 7.2 stores MTE tags incorrectly: use 8.0 or newer"} in r["verdicts"]
    assert fact(r, "QEMU binary")["source"] == "$MTEVM_QEMU"


def test_qemu_8_0_is_usable(tmp_path):
    script, _ = fake_qemu(tmp_path, "QEMU emulator version 8.0.0")
    q = probe_local(str(script)).to_dict()["qemu"]
    assert q["usable_for_mte"] and q["version"] == "8.0.0" and q["accels"] == ["tcg"]


def test_qemu_without_mte_property(tmp_path):
    script, _ = fake_qemu(tmp_path, "QEMU emulator version 9.0.1", mte=False)
    q = probe_local(str(script)).to_dict()["qemu"]
    assert not q["usable_for_mte"] and q["mte"] is False
    assert q["reason"] == f"QEMU 9.0.1 at {script} does not offer the virt machine's mte property"


def test_broken_qemu_binary(tmp_path):
    script, _ = fake_qemu(tmp_path, "", fail=True)
    q = probe_local(str(script)).to_dict()["qemu"]
    assert not q["usable_for_mte"] and q["reason"] == f"{script} could not be queried: qemu: broken"


def test_no_qemu_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MTEVM_QEMU", raising=False)
    r = probe_local().to_dict()
    assert r["qemu"]["binary"] is None and not r["qemu"]["usable_for_mte"]
    assert r["qemu"]["reason"] == ("no qemu-system-aarch64 found: install qemu-system-arm (QEMU >= 8.0) "
                                   "or set $MTEVM_QEMU to its path")


def test_qemu_answers_are_cached_until_the_binary_changes(tmp_path):
    script, counter = fake_qemu(tmp_path, "QEMU emulator version 8.2.2", name="qemu-cached")
    probe_local(str(script))
    runs = counter.read_text().count("run")
    assert runs == 3                                   # --version, -machine virt,help, -accel help
    probe_local(str(script))
    assert counter.read_text().count("run") == runs
    script.write_text(script.read_text().replace("8.2.2", "9.2.0"))
    st = os.stat(script)
    os.utime(script, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert probe_local(str(script)).to_dict()["qemu"]["version"] == "9.2.0"
    assert counter.read_text().count("run") == runs + 3


# --- simulated hosts ------------------------------------------------------------------------------------

def test_simulated_mte_host():
    r = probe_simulated("sim-mte", host_mte=True).to_dict()
    assert r["host"] == "sim-mte" and r["cpu"] == {"arch": "aarch64", "mte": True, "source": "simulated"}
    assert r["kvm"] == {"present": True, "api_version": 12, "cap_arm_mte": 1, "path": "/dev/kvm"}
    assert fact(r, "KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE=205)") == {
        "name": "KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE=205)", "value": 1, "source": "simulated ioctl"}
    assert r["qemu"]["usable_for_mte"] and set(r["qemu"]["accels"]) == {"kvm", "tcg"}
    assert [v["level"] for v in r["verdicts"]] == ["ok", "ok"]
    assert "KVM MTE available (KVM_CAP_ARM_MTE = 1)" in r["verdicts"][1]["text"]


def test_simulated_host_without_mte():
    r = probe_simulated("sim-nomte", host_mte=False).to_dict()
    assert r["kvm"]["cap_arm_mte"] == 0 and r["cpu"]["mte"] is False
    assert r["verdicts"][1] == {"level": "warn", "text": (
        "this host's KVM has no KVM_CAP_ARM_MTE (CPU or kernel without MTE): KVM VMs with mte=on fail with "
        "'MTE requested, but not supported by KVM'; use accel tcg for MTE")}


def test_simulated_x86_host():
    r = probe_simulated("sim-x86", arch="x86_64", host_mte=True).to_dict()
    assert r["cpu"]["mte"] is False and r["kvm"]["cap_arm_mte"] == 0
    assert r["verdicts"][1]["text"].startswith("KVM cannot run aarch64 guests on this x86_64 host")


@pytest.mark.parametrize("text,version", [
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0, 2)),
    ("QEMU emulator version 7.2.15", (7, 2, 15)), ("QEMU emulator version 9.2", (9, 2)), ("nonsense", None)])
def test_parse_qemu_version(text, version):
    assert parse_qemu_version(text) == version
