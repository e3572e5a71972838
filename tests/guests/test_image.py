"""``mtevm image build linux`` / ``image list``: pinned, reproducible, verified.

What a user relies on: two builds from the same lock give byte-identical files; a version pinned
in the lock that has left the archive fails with an error naming the package, the pinned version,
what the archive has now and the command that re-pins; a corrupted image is reported by
``image list`` and by the VM-facing lookup, and ``image build`` replaces it; a corrupted cached
.deb is fetched again. Real apt (the machine's own sources), real cross compiler, no mocks.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backend.guests.linux import image


@pytest.fixture
def private_cache(tmp_path, monkeypatch, linux_image):
    """A cache dir of its own that shares the real cache's checked .debs and extracted sources."""
    real = Path(image.cache_dir())
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    for deb in (real / "debs").iterdir():
        os.symlink(deb, cache / "debs" / deb.name)
    os.symlink(real / "src", cache / "src")
    os.symlink(real / "apt", cache / "apt")      # the package lists (tests run one at a time)
    monkeypatch.setenv("MTEVM_CACHE_DIR", str(cache))
    return cache


def test_a_rebuild_is_byte_identical(tmp_path, linux_image):
    """A forced build from the same lock and sources gives the bytes of the image the tests boot
    (built by scripts/test.sh or the fixture, from the same inputs: its manifest says which)."""
    assert linux_image.manifest["inputs"] == image.inputs_digest(image.Lock.load())
    a = image.build(out_dir=tmp_path / "a", force=True)
    assert a["files"] == linux_image.manifest["files"]
    for name in a["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (Path(linux_image.kernel).parent / name).read_bytes(), name
    assert a["kernel_release"] == image.Lock.load().kernel_release


def test_up_to_date_build_does_nothing(linux_image, run_mtevm):
    r = run_mtevm("image", "build", "linux", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["up_to_date"] is True and m["files"] == linux_image.manifest["files"]


def test_a_pinned_version_that_left_the_archive_is_a_clear_error(tmp_path, private_cache, run_mtevm):
    lock = json.loads(image.LOCK_PATH.read_text())
    lock["packages"]["busybox"]["version"] = "1:0.1-gone"
    lock["packages"]["busybox"]["sha256"] = "0" * 64
    path = tmp_path / "old.lock.json"
    path.write_text(json.dumps(lock))
    r = run_mtevm("image", "build", "linux", "--lock", str(path), env={"MTEVM_CACHE_DIR": str(private_cache)},
                  timeout=300)
    assert r.returncode == 1
    err = r.stderr
    assert "busybox-static 1:0.1-gone" in err and str(path) in err and "no longer in the archive" in err
    current = image.Lock.load().packages["busybox"].version
    assert f"the archive has {current}" in err
    assert "mtevm image build linux --update-lock" in err
    assert "Traceback" not in err and [l for l in err.splitlines() if "error" in l] == [err.splitlines()[-1]]
    # nothing was built and the lock file is untouched
    assert not (private_cache / "images" / "linux").exists()
    assert json.loads(path.read_text()) == lock


def test_a_gone_kernel_names_the_archives_current_kernel(tmp_path, private_cache, run_mtevm):
    lock = json.loads(image.LOCK_PATH.read_text())
    lock["packages"]["kernel"]["package"] = "linux-image-6.1.0-1-arm64"
    lock["packages"]["kernel"]["version"] = "6.1.4-1"
    path = tmp_path / "old.lock.json"
    path.write_text(json.dumps(lock))
    r = run_mtevm("image", "build", "linux", "--lock", str(path), timeout=300)
    assert r.returncode == 1
    assert "linux-image-6.1.0-1-arm64 6.1.4-1" in r.stderr
    assert "the archive's current kernel is linux-image-" in r.stderr
    assert "--update-lock" in r.stderr


def test_update_lock_repins_to_the_archive(tmp_path, private_cache, run_mtevm, linux_image):
    """--update-lock on an outdated lock file writes what the archive has now, then builds from it
    (here: the repo's lock is current, so the re-pinned lock equals it and the copied image is up to date)."""
    shutil.copytree(Path(linux_image.kernel).parent, private_cache / "images" / "linux")
    lock = json.loads(image.LOCK_PATH.read_text())
    lock["packages"]["busybox"]["version"] = "1:0.1-gone"
    path = tmp_path / "old.lock.json"
    path.write_text(json.dumps(lock))
    r = run_mtevm("image", "build", "linux", "--lock", str(path), "--update-lock", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "re-pinned" in r.stderr
    new = json.loads(path.read_text())["packages"]
    assert new["busybox"]["version"] != "1:0.1-gone" and len(new["busybox"]["sha256"]) == 64
    assert new == image.resolve_lock(image.Packages(private_cache, print).apt).to_dict()["packages"]
    assert json.loads(r.stdout)["packages"]["busybox"]["version"] == new["busybox"]["version"]


def test_a_corrupted_image_is_detected_and_rebuilt(private_cache, run_mtevm, linux_image):
    shutil.copytree(Path(linux_image.kernel).parent, private_cache / "images" / "linux")
    initrd = private_cache / "images" / "linux" / "initramfs.cpio.gz"
    data = bytearray(initrd.read_bytes())
    data[1000] ^= 0xFF
    initrd.write_bytes(bytes(data))

    r = run_mtevm("image", "list", "--json")
    assert r.returncode == 0
    [entry] = json.loads(r.stdout)
    assert entry["state"].startswith("corrupted: initramfs.cpio.gz has sha256")
    r = run_mtevm("image", "list")
    assert r.returncode == 1 and "corrupted" in r.stdout
    with pytest.raises(image.ImageError, match=r"corrupted .*rebuild it with 'mtevm image build linux'"):
        image.linux_image()

    r = run_mtevm("image", "build", "linux", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "built" in r.stdout and "compiling" in r.stderr      # progress on stderr
    assert image.linux_image().manifest["files"] == linux_image.manifest["files"]


def test_missing_image_says_how_to_build_it(tmp_path, monkeypatch, run_mtevm):
    monkeypatch.setenv("MTEVM_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(image.ImageError, match="not built .*build it with 'mtevm image build linux'"):
        image.linux_image()
    r = run_mtevm("image", "list", env={"MTEVM_CACHE_DIR": str(tmp_path / "empty")})
    assert r.returncode == 0 and "no guest image built yet" in r.stdout


def test_a_corrupted_cached_deb_is_fetched_again(private_cache, linux_image):
    info = image.Lock.load().packages["busybox"]
    deb = private_cache / "debs" / info.deb_name
    deb.unlink()                              # the symlink to the shared cache
    deb.write_bytes(b"not a deb")
    got = image.Packages(private_cache, print).get(info, image.LOCK_PATH)
    assert got == deb and image.sha256_file(deb) == info.sha256


def test_image_list_shows_versions_and_sizes(linux_image, run_mtevm):
    r = run_mtevm("image", "list", "--json")
    [entry] = [i for i in json.loads(r.stdout) if i["name"] == "linux"]
    lock = image.Lock.load()
    assert entry["state"] == "ok"
    assert entry["kernel_release"] == lock.kernel_release
    assert entry["packages"]["kernel"] == {"package": lock.packages["kernel"].package,
                                           "version": lock.packages["kernel"].version}
    assert entry["size"] == sum(f["size"] for f in entry["files"].values()) > 30_000_000
    assert "check_prctl" in entry["selftests"]
    assert linux_image.stale is None


def test_an_image_from_other_inputs_is_stale_but_boots(private_cache, linux_image, run_mtevm):
    """An image built by another mtevm (other lock, guest sources or compiler) still verifies and
    boots; list and the VM-facing lookup say it is stale and how to rebuild it."""
    d = private_cache / "images" / "linux"
    shutil.copytree(Path(linux_image.kernel).parent, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["inputs"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(manifest))
    img = image.linux_image()
    assert img.stale and "mtevm image build linux" in img.stale
    [entry] = json.loads(run_mtevm("image", "list", "--json").stdout)
    assert entry["state"].startswith("stale: built from other inputs")
