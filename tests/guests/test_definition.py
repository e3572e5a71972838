"""Guests on a VM definition: builtin (default), linux, custom; their checks, persistence and the
QEMU command line they give (through the real CLI and daemon store; no QEMU is started here)."""
from __future__ import annotations

import gzip
import json

import pytest

from backend.errors import ConfigError
from backend.guests.definition import GuestConfig, check_arm64_image


def arm64_image(path, size=4096) -> str:
    """A file with an arm64 Image header (the 'ARMd' magic at offset 56), as the kernel's own."""
    data = bytearray(size)
    data[0:2] = b"MZ"
    data[56:60] = b"ARM\x64"
    path.write_bytes(bytes(data))
    return str(path)


def ok(run_mtevm, *args):
    r = run_mtevm(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def error_of(r) -> str:
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    return r.stderr.strip().removeprefix("mtevm: error: ")


def test_kernel_images_are_told_apart_by_their_magic(tmp_path):
    check_arm64_image(arm64_image(tmp_path / "Image"))
    gz = tmp_path / "vmlinuz"
    gz.write_bytes(gzip.compress(b"x" * 100))
    with pytest.raises(ConfigError, match="gzip-compressed"):
        check_arm64_image(str(gz))
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(ConfigError, match=r"not an arm64 kernel Image \(no 'ARMd' magic at offset 56\).*ELF"):
        check_arm64_image(str(elf))


def test_guest_options_that_do_not_fit_the_guest_are_refused(tmp_path):
    image = arm64_image(tmp_path / "Image")
    with pytest.raises(ConfigError, match="--guest custom needs --kernel"):
        GuestConfig("custom").validate()
    with pytest.raises(ConfigError, match="--kernel is only for --guest custom"):
        GuestConfig("linux", kernel=image).validate()
    with pytest.raises(ConfigError, match="--append and --disk need a Linux guest"):
        GuestConfig("builtin", append="quiet").validate()
    with pytest.raises(ConfigError, match="guest 'windows' is not one of builtin, linux, custom"):
        GuestConfig.from_dict({"kind": "windows"})
    with pytest.raises(ConfigError, match="unknown setting"):
        GuestConfig.from_dict({"kind": "custom", "kernal": image})


def test_custom_guest_errors_name_the_file_and_the_problem(run_mtevm, tmp_path):
    r = run_mtevm("create", "a", "--host", "local", "--guest", "custom", "--kernel", str(tmp_path / "nope"))
    assert error_of(r) == f"kernel {tmp_path / 'nope'}: no such file"
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 20)
    r = run_mtevm("create", "a", "--host", "local", "--guest", "custom", "--kernel", str(text))
    assert error_of(r) == f"kernel {text}: not an arm64 kernel Image (no 'ARMd' magic at offset 56)"
    unreadable = tmp_path / "Image.secret"
    arm64_image(unreadable)
    unreadable.chmod(0)
    r = run_mtevm("create", "a", "--host", "local", "--guest", "custom", "--kernel", str(unreadable))
    if r.returncode == 2:   # root reads anything: then the file is accepted
        assert error_of(r) == f"kernel {unreadable}: cannot read it (Permission denied)"
    r = run_mtevm("create", "b", "--host", "sim-mte", "--guest", "linux")
    assert "--guest linux needs --host local" in error_of(r)
    assert ok(run_mtevm, "list") == [] or all(v["name"] != "b" for v in ok(run_mtevm, "list"))


def test_a_linux_guest_before_its_image_is_built_says_how_to_build_it(run_mtevm, tmp_path):
    r = run_mtevm("create", "lx", "--host", "local", "--guest", "linux", env={"MTEVM_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("mtevm: error: the Linux guest image is not built") and \
        "build it with 'mtevm image build linux'" in r.stderr
    assert json.loads(run_mtevm("list", "--json").stdout) == []      # nothing was defined


def test_a_custom_guest_is_persisted_shown_and_gives_its_command_line(run_mtevm, tmp_path, monkeypatch):
    image = arm64_image(tmp_path / "Image")
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(b"cpio"))
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(1 << 16))
    qcow = tmp_path / "root,1.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(1020))
    monkeypatch.chdir(tmp_path)     # relative paths are made absolute by the CLI
    vm = ok(run_mtevm, "create", "k", "--host", "local", "--guest", "custom", "--kernel", "Image",
            "--initrd", str(initrd), "--append", "console=ttyAMA0 root=/dev/vda rw", "--disk", "data.raw",
            "--disk", str(qcow), "--vcpus", "1")
    want = {"kind": "custom", "kernel": image, "initrd": str(initrd), "append": "console=ttyAMA0 root=/dev/vda rw",
            "disks": [str(raw), str(qcow)]}
    assert vm["guest"] == want
    assert ok(run_mtevm, "show", "k")["guest"] == want          # a new CLI process: read back from the store

    argv = ok(run_mtevm, "show", "k", "--argv")
    assert argv[argv.index("-kernel") + 1] == image
    assert argv[argv.index("-initrd") + 1] == str(initrd)
    assert argv[argv.index("-append") + 1] == "console=ttyAMA0 root=/dev/vda rw"
    assert "-nodefaults" in argv and argv[argv.index("-nic") + 1] == "none"
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"     # TCG's fast pointer authentication
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [f"file={raw},format=raw,if=none,id=disk0",
                      f"file={str(qcow).replace(',', ',,')},format=qcow2,if=none,id=disk1"]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "virtio-blk" in argv[i + 1]] == [
        "virtio-blk-device,drive=disk0", "virtio-blk-device,drive=disk1"]
    serial = argv[argv.index("-serial") + 1]
    assert serial == "chardev:serial0" and any(a.startswith("socket,id=serial0,path=") for a in argv)
    assert "org.mtevm.agent.0" not in " ".join(argv)    # a custom kernel has no mtevm agent

    human = run_mtevm("show", "k", "--argv")
    assert human.stdout.startswith("/") and "-kernel " + image in human.stdout

    # the default guest is still the builtin one
    b = ok(run_mtevm, "create", "b", "--host", "local")
    assert b["guest"] == {"kind": "builtin"}
    bargv = ok(run_mtevm, "show", "b", "--argv")
    assert bargv[bargv.index("-kernel") + 1].endswith("mtevm-guest.elf") and "-append" not in bargv
    assert bargv[bargv.index("-cpu") + 1] == "max"


def test_a_clone_keeps_the_guest_but_not_shared_disks(run_mtevm, tmp_path):
    image = arm64_image(tmp_path / "Image")
    ok(run_mtevm, "create", "k", "--host", "local", "--guest", "custom", "--kernel", image, "--append", "quiet")
    assert ok(run_mtevm, "clone", "k", "k2")["guest"] == {"kind": "custom", "kernel": image, "append": "quiet"}
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4096))
    ok(run_mtevm, "create", "d", "--host", "local", "--guest", "custom", "--kernel", image, "--disk", str(disk))
    # issue 12: the clone gets its own copy of each disk (beside it), never the same image
    d2 = ok(run_mtevm, "clone", "d", "d2")
    assert d2["guest"]["disks"] == [str(tmp_path / "d-d2.raw")] == d2["copied"]
    assert (tmp_path / "d-d2.raw").read_bytes() == disk.read_bytes()


def test_fault_addresses_are_on_by_default_for_linux_and_stored_explicitly():
    # Nothing said: on for linux (the agent reads si_addr at no extra cost per fault), off elsewhere.
    assert GuestConfig("linux").fault_address is True and GuestConfig().fault_address is False
    assert GuestConfig("linux").to_dict() == {"kind": "linux", "fault_address": True}
    assert GuestConfig("linux", fault_address=False).to_dict() == {"kind": "linux", "fault_address": False}
    # What is stored reads back the same; a linux guest stored before this default has no key: on.
    for stored in ({"kind": "linux", "fault_address": False}, {"kind": "linux", "fault_address": True}):
        assert GuestConfig.from_dict(stored).to_dict() == stored
    assert GuestConfig.from_dict({"kind": "linux"}).fault_address is True
    assert GuestConfig.from_dict("linux").fault_address is True
    # Off on a guest with no agent is what it has anyway: accepted, not stored; on is refused as before.
    assert GuestConfig.from_dict({"kind": "builtin", "fault_address": False}).to_dict() == {"kind": "builtin"}
    with pytest.raises(ConfigError, match=r"^--fault-address needs --guest linux \(the mtevm agent reports"):
        GuestConfig.from_dict({"kind": "custom", "kernel": "/k", "fault_address": True})
    with pytest.raises(ConfigError, match="fault_address must be true or false"):
        GuestConfig.from_dict({"kind": "linux", "fault_address": "yes"})


def test_fault_address_options_of_create(run_mtevm, linux_image, mtevm_paths):
    from backend.store import Store, VmRow
    # A VM stored before addresses were on by default (its guest without the key): shown as on.
    mtevm_paths.ensure_state_dir()
    store = Store(mtevm_paths.store)
    store.add_vm(VmRow("old", "local", {"name": "old"}, {}, guest={"kind": "linux"}))
    store.close()
    assert ok(run_mtevm, "show", "old")["guest"] == {"kind": "linux", "fault_address": True}

    assert ok(run_mtevm, "create", "on", "--host", "local", "--guest", "linux")["guest"] == \
        {"kind": "linux", "fault_address": True}
    assert ok(run_mtevm, "create", "off", "--host", "local", "--guest", "linux", "--no-fault-address")["guest"] == \
        {"kind": "linux", "fault_address": False}
    assert ok(run_mtevm, "show", "off")["guest"] == {"kind": "linux", "fault_address": False}   # from the store
    assert "│ linux, fault addresses on " in run_mtevm("show", "on").stdout
    assert "│ linux, fault addresses off " in run_mtevm("show", "off").stdout

    # --no-fault-address on the builtin guest is what it has anyway; --fault-address still needs linux.
    assert ok(run_mtevm, "create", "b", "--host", "local", "--no-fault-address")["guest"] == {"kind": "builtin"}
    r = run_mtevm("create", "b2", "--host", "local", "--fault-address")
    assert error_of(r) == "--fault-address needs --guest linux (the mtevm agent reports the addresses)"
    r = run_mtevm("create", "b2", "--host", "local", "--guest", "linux", "--fault-address", "--no-fault-address")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    assert {v["name"] for v in ok(run_mtevm, "list")} == {"old", "on", "off", "b"}
