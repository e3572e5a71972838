"""mtevm's Linux MTE guest image: built from pinned Debian arm64 packages, kept in the user's cache.

``mtevm image build linux`` makes two files a ``linux`` VM boots with ``-kernel``/``-initrd``:

- ``Image``: the raw arm64 kernel of ``linux-image-<abi>-arm64`` (MTE built in), copied as is;
- ``initramfs.cpio.gz``: busybox (``busybox-static``), the virtio modules the host channel needs
  (from the same kernel package), mtevm's guest programs (``guest/``: agent, tagged-heap workload,
  ``mte-faults``, cross-compiled static), the kernel's own ``tools/testing/selftests/arm64/mte``
  built static from ``linux-source-<x.y>``, and ``/init``; written by backend.guests.linux.cpio.

Pinned: ``image.lock.json`` beside this file names each package's version and sha256. A build
uses exactly those (a cached .deb is re-checked, a missing one is downloaded by backend.guests.
linux.apt and checked); ``--update-lock`` re-pins to what the archive has now. Reproducible: the
same lock, sources and cross compiler give byte-identical files. Verified: ``manifest.json``
holds the sha256 of each file; ``linux_image()`` re-checks them before a VM boots.

Cache layout (``backend.paths.cache_dir()``): ``debs/`` (checked .debs), ``apt/`` (the private apt
state), ``src/`` (the selftests' sources, extracted once per linux-source version, ~10 s),
``images/linux/`` (Image, initramfs.cpio.gz, manifest.json, and programs/ with copies of the guest
programs for ``mtevm exec``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from backend.errors import ConfigError, MtevmError
from backend.guests.linux import cpio
from backend.guests.linux.apt import AptError, PackageInfo, PrivateApt
from backend.paths import cache_dir, ensure_private_dir

NAME = "linux"
HERE = Path(__file__).resolve().parent
LOCK_PATH = HERE / "image.lock.json"
GUEST_SRC = HERE / "guest"
FORMAT = 1                      # of manifest.json and the lock
CROSS_CC = "aarch64-linux-gnu-gcc"
# -ffile-prefix-map: assert() and friends embed source paths; the build dir is a temp dir.
CFLAGS = ["-static", "-O2", "-march=armv8.5-a+memtag", "-Wall"]
GUEST_PROGRAMS = {"mtevm-agent": "agent.c", "mtevm-workload": "workload.c", "mte-faults": "mte-faults.c"}
MODULES = ("virtio_mmio", "virtio_console", "virtio_blk")
# The metapackage whose dependency names the kernel to pin (its ABI name changes with updates).
KERNEL_META = "linux-image-arm64"
SELFTEST_DIR = "tools/testing/selftests/arm64/mte"
# Default-run order (fast, measured under TCG); tests not named here run after them, by name.
SELFTEST_ORDER = ("check_buffer_fill", "check_tags_inclusion", "check_mmap_options", "check_child_memory",
                  "check_prctl", "check_ksm_options", "check_hugetlb_options")
# Opt-in only: too slow under TCG to run by default (figures from linux-mte-guest-notes.md).
SELFTEST_SLOW = {
    "check_user_mem": "64 cases of user memory access through syscalls, ~14 s under TCG",
    "check_gcr_el1_cswitch": "forks and context-switches in a loop to check GCR_EL1 survives, ~130 s "
                             "under TCG; prints its TAP plan ~1000 times (stdio duplicated by fork)",
}
BUILD_TOOLS_HINT = "install them with 'bash scripts/install-deps.sh'"

Progress = Callable[[str], None]


class ImageError(MtevmError):
    """The guest image cannot be built, is missing, or failed its checksum."""


class PinnedVersionGone(ImageError):
    """A version in the lock file is no longer in the archive (and not in the cache)."""


def build_command(update_lock: bool = False) -> str:
    return "mtevm image build linux" + (" --update-lock" if update_lock else "")


# -- the lock --------------------------------------------------------------------------------------
ROLES = ("kernel", "busybox", "source")


@dataclass
class Lock:
    packages: dict[str, PackageInfo]   # role -> pinned package

    @classmethod
    def load(cls, path: Path = LOCK_PATH) -> "Lock":
        try:
            data = json.loads(Path(path).read_text())
            pk = {role: PackageInfo(**data["packages"][role]) for role in ROLES}
        except FileNotFoundError:
            raise ImageError(f"lock file {path} not found: create it with '{build_command(True)}'") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ImageError(f"lock file {path} is not valid ({e}): re-create it with '{build_command(True)}'") from None
        return cls(pk)

    def to_dict(self) -> dict:
        return {"format": FORMAT,
                "comment": "Debian arm64 packages of mtevm's Linux guest image; re-pin with "
                           f"'{build_command(True)}'",
                "packages": {role: asdict(self.packages[role]) for role in ROLES}}

    def save(self, path: Path = LOCK_PATH) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @property
    def kernel_release(self) -> str:
        """6.1.0-57-arm64 from linux-image-6.1.0-57-arm64."""
        return self.packages["kernel"].package.removeprefix("linux-image-")


def resolve_lock(apt: PrivateApt) -> Lock:
    """What the archive has now: the kernel linux-image-arm64 depends on, its linux-source at the
    same version (so the selftests match the kernel), and busybox-static."""
    kernels = [d for d in apt.depends(KERNEL_META) if re.fullmatch(r"linux-image-[\d.]+-\d+-arm64", d)]
    if not kernels:
        raise ImageError(f"the archive's {KERNEL_META} depends on no linux-image-*-arm64 package")
    kernel = apt.candidate(kernels[0])
    busybox = apt.candidate("busybox-static")
    if kernel is None or busybox is None:
        raise ImageError(f"the archive has no {'busybox-static' if kernel else kernels[0]} for arm64")
    major_minor = ".".join(kernel.version.split(".")[:2])
    src_pkg = f"linux-source-{major_minor}"
    sources = apt.versions(src_pkg)
    source = next((s for s in sources if s.version == kernel.version), None) or apt.candidate(src_pkg)
    if source is None:
        raise ImageError(f"the archive has no {src_pkg} (the kernel's selftests come from it)")
    return Lock({"kernel": kernel, "busybox": busybox, "source": source})


# -- packages --------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Packages:
    """The pinned .debs: from the cache if their sha256 matches the lock, else from the archive."""

    def __init__(self, root: Path, progress: Progress):
        self.debs = root / "debs"
        self.root = root
        self.progress = progress
        self._apt: PrivateApt | None = None

    @property
    def apt(self) -> PrivateApt:
        if self._apt is None:
            self._apt = PrivateApt(str(self.root / "apt"))
        return self._apt

    def get(self, info: PackageInfo, lock_path: Path) -> Path:
        path = self.debs / info.deb_name
        if path.exists():
            if sha256_file(path) == info.sha256:
                return path
            path.unlink()   # a corrupted or foreign file: fetch it again
        self.progress(f"downloading {info.package} {info.version} ({info.size / 1e6:.1f} MB)")
        available = self.apt.versions(info.package)
        if not any(v.version == info.version for v in available):
            self.apt.refresh()     # lists up to an hour old may predate the lock: look again
            available = self.apt.versions(info.package)
        if not any(v.version == info.version for v in available):
            raise PinnedVersionGone(self._gone_message(info, available, lock_path))
        with tempfile.TemporaryDirectory(dir=self.root, prefix="download-") as tmp:
            got = Path(self.apt.download(info, tmp))
            digest = sha256_file(got)
            if digest != info.sha256:
                raise ImageError(f"{got.name} from the archive has sha256 {digest}, but {lock_path} pins "
                                 f"{info.sha256}: the archive changed this version; check your mirror, or "
                                 f"re-pin with '{build_command(True)}'")
            self.debs.mkdir(parents=True, exist_ok=True)
            os.replace(got, path)
        return path

    def _gone_message(self, info: PackageInfo, available: list[PackageInfo], lock_path: Path) -> str:
        if info.package.startswith("linux-image-"):
            try:
                now = resolve_lock(self.apt).packages["kernel"]
                has = f"the archive's current kernel is {now.package} {now.version}"
            except (ImageError, AptError) as e:
                has = f"no current kernel found ({e})"
        else:
            has = ("the archive has " + ", ".join(v.version for v in available)) if available else \
                  f"the archive has no {info.package} at all"
        return (f"{info.package} {info.version} (pinned in {lock_path}) is no longer in the archive and not in "
                f"the cache ({self.debs}); {has}. Re-pin to what the archive has now with "
                f"'{build_command(True)}' (this rewrites the lock file; commit it)")


def _deb_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a .deb's data whose path (without './') passes ``wanted``."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    out = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                name = m.name.removeprefix("./")
                if m.isfile() and wanted(name):
                    out[name] = tar.extractfile(m).read()
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise ImageError(f"dpkg-deb could not read {deb}")
    return out


def selftest_sources(root: Path, deb: Path, info: PackageInfo, progress: Progress) -> Path:
    """The extracted tools/testing/selftests/{kselftest.h,arm64/mte} of this linux-source, once."""
    dest = root / "src" / f"{info.package}_{info.version}"
    done = dest / ".complete"
    if done.exists() and done.read_text() == info.sha256:
        return dest
    progress(f"extracting the arm64/mte selftests from {info.package} (decodes the whole source, ~10 s)")
    shutil.rmtree(dest, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="src-"))
    try:
        tarball = f"./usr/src/{info.package}.tar.xz"
        top = info.package
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        inner = subprocess.Popen(["tar", "-xO", tarball], stdin=fsys.stdout, stdout=subprocess.PIPE)
        fsys.stdout.close()
        untar = subprocess.run(["tar", "-xJ", "-C", str(tmp), "--strip-components=1",
                                f"{top}/{SELFTEST_DIR}", f"{top}/tools/testing/selftests/kselftest.h"],
                               stdin=inner.stdout, capture_output=True, text=True)
        inner.stdout.close()
        if inner.wait() != 0 or fsys.wait() != 0 or untar.returncode != 0:
            raise ImageError(f"cannot extract {SELFTEST_DIR} from {deb.name}: {untar.stderr.strip()}")
        (tmp / ".complete").write_text(info.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- compiling -------------------------------------------------------------------------------------
def _compile(args: list[str], cwd: Path, what: str) -> None:
    try:
        r = subprocess.run([CROSS_CC, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise ImageError(f"{CROSS_CC} not found: the guest programs need gcc-aarch64-linux-gnu and "
                         f"libc6-dev-arm64-cross; {BUILD_TOOLS_HINT}") from None
    if r.returncode != 0:
        hint = (f" (libc6-dev-arm64-cross is missing: {BUILD_TOOLS_HINT})"
                if "libc-header-start.h" in r.stderr or "stdio.h: No such file" in r.stderr else "")
        raise ImageError(f"compiling {what} failed{hint}:\n{r.stderr.strip()[-2000:]}")


def compile_guest_programs(out: Path) -> dict[str, bytes]:
    programs = {}
    for prog, src in GUEST_PROGRAMS.items():
        dst = out / prog
        _compile([*CFLAGS, f"-ffile-prefix-map={GUEST_SRC}=.", "-o", str(dst), src], GUEST_SRC, prog)
        programs[prog] = dst.read_bytes()
    return programs


def compile_selftests(src: Path, out: Path, progress: Progress) -> dict[str, bytes]:
    mte = src / SELFTEST_DIR
    names = sorted(p.stem for p in mte.glob("check_*.c"))
    flags = [*CFLAGS, "-std=gnu99", "-I.", "-I../..", "-pthread", f"-ffile-prefix-map={src}=."]
    # The shared helpers as named objects: compiled in one gcc call with each test, the .S would be
    # assembled under a random temp name that ends up in the symbol table (not reproducible).
    objs = []
    for helper in ("mte_common_util.c", "mte_helper.S"):
        obj = out / (Path(helper).stem + ".o")
        _compile([*flags, "-c", "-o", str(obj), helper], mte, f"selftest helper {helper}")
        objs.append(str(obj))
    tests = {}
    for i, name in enumerate(names, 1):
        progress(f"compiling selftest {name} ({i}/{len(names)})")
        dst = out / name
        _compile([*flags, "-o", str(dst), f"{name}.c", *objs], mte, f"selftest {name}")
        tests[name] = dst.read_bytes()
    return tests


def selftest_list(names: list[str], source: PackageInfo) -> str:
    fast = [n for n in SELFTEST_ORDER if n in names] + sorted(
        n for n in names if n not in SELFTEST_ORDER and n not in SELFTEST_SLOW)
    lines = [f"# The kernel's {SELFTEST_DIR} tests, from {source.package} {source.version}, in default-run order.",
             "# A line with '# slow' is opt-in: run it by name (mtevm selftest VM NAME); the reason follows."]
    lines += fast
    lines += [f"{n}  # slow: {SELFTEST_SLOW[n]}" for n in sorted(SELFTEST_SLOW) if n in names]
    return "\n".join(lines) + "\n"


# -- the initramfs ---------------------------------------------------------------------------------
def initramfs_entries(busybox: bytes, modules: dict[str, bytes], programs: dict[str, bytes],
                      selftests: dict[str, bytes], selftests_list: str, init: bytes, release: str) -> list:
    E = cpio.Entry
    dirs = ["bin", "dev", "etc", "lib", "lib/modules", "lib/modules/mtevm", "opt", "opt/mtevm", "opt/mtevm/bin",
            "opt/mtevm/selftests", "proc", "root", "run", "sys", "tmp"]
    entries = [E.dir(d) for d in dirs]
    entries += [E.chardev("dev/console", 5, 1), E.chardev("dev/null", 1, 3, 0o666),
                E.file("init", init, 0o755), E.file("bin/busybox", busybox, 0o755),
                E.symlink("bin/sh", "busybox"),
                E.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
                E.file("etc/group", b"root:x:0:\n"),
                E.file("etc/profile", b"export PATH=/bin:/opt/mtevm/bin PS1='mtevm# '\n"),
                E.file("etc/mtevm-release", f"kernel {release}\n".encode())]
    entries += [E.file(f"lib/modules/mtevm/{m}.ko", data) for m, data in sorted(modules.items())]
    entries += [E.file(f"opt/mtevm/bin/{p}", data, 0o755) for p, data in sorted(programs.items())]
    entries += [E.file(f"opt/mtevm/selftests/{t}", data, 0o755) for t, data in sorted(selftests.items())]
    entries.append(E.file("opt/mtevm/selftests/list", selftests_list.encode()))
    return entries


# -- the build -------------------------------------------------------------------------------------
def inputs_digest(lock: Lock) -> str:
    """What the image is made from: the lock, mtevm's guest sources, this recipe and the compiler.
    The same digest means the same bytes, so an image with it needs no rebuild."""
    h = hashlib.sha256(json.dumps(lock.to_dict()["packages"], sort_keys=True).encode())
    for path in sorted(GUEST_SRC.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    for module in (Path(__file__), Path(cpio.__file__)):
        h.update(module.read_bytes())
    try:
        h.update(subprocess.run([CROSS_CC, "--version"], capture_output=True, text=True).stdout.encode())
    except FileNotFoundError:
        pass
    return h.hexdigest()


def images_root() -> Path:
    return Path(cache_dir()) / "images"


def image_dir(name: str = NAME) -> Path:
    return images_root() / name


@contextlib.contextmanager
def _build_lock(root: Path):
    """One build at a time per cache (a second waits), so two builds never mix their files."""
    ensure_private_dir(str(root))
    with open(root / "build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build(progress: Progress = lambda _msg: None, update_lock: bool = False, lock_path: Path | str = LOCK_PATH,
          out_dir: Path | str | None = None, force: bool = False) -> dict:
    """Build (or confirm up to date) the Linux guest image; returns its manifest (plus 'up_to_date')."""
    root = Path(cache_dir())
    lock_path = Path(lock_path)
    out = Path(out_dir) if out_dir else image_dir()
    with _build_lock(root):
        pk = Packages(root, progress)
        if update_lock:
            progress("resolving the newest kernel, busybox and kernel source in the archive")
            pk.apt.refresh()
            old = Lock.load(lock_path).to_dict()["packages"] if lock_path.exists() else None
            lock = resolve_lock(pk.apt)
            if lock.to_dict()["packages"] != old:
                lock.save(lock_path)
                progress(f"re-pinned {lock_path}: " + ", ".join(
                    f"{i.package} {i.version}" for i in lock.packages.values()))
        lock = Lock.load(lock_path)
        digest = inputs_digest(lock)
        if not force:
            current = _read_manifest(out)
            if current and current.get("inputs") == digest and not verify(out, current):
                return {**current, "up_to_date": True}
        t0 = time.monotonic()
        debs = {role: pk.get(info, lock_path) for role, info in lock.packages.items()}
        with tempfile.TemporaryDirectory(dir=root, prefix="build-") as tmp:
            work = Path(tmp)
            progress(f"unpacking {lock.packages['kernel'].package}")
            release = lock.kernel_release
            kfiles = _deb_members(debs["kernel"], lambda n: n == f"boot/vmlinuz-{release}" or any(
                n.endswith(f"/{m}.ko") and n.startswith(f"lib/modules/{release}/") for m in MODULES))
            kernel = kfiles.get(f"boot/vmlinuz-{release}")
            if kernel is None:
                raise ImageError(f"{debs['kernel'].name} holds no boot/vmlinuz-{release}")
            if kernel[:2] != b"MZ" or kernel[0x38:0x3c] != b"ARM\x64":
                raise ImageError(f"boot/vmlinuz-{release} is not a raw arm64 Image (no ARM\\x64 magic)")
            modules = {Path(n).stem: d for n, d in kfiles.items() if n.endswith(".ko")}
            missing = [m for m in MODULES if m not in modules]
            if missing:
                raise ImageError(f"{debs['kernel'].name} has no {', '.join(missing)} module(s)")
            progress(f"unpacking {lock.packages['busybox'].package}")
            busybox = _deb_members(debs["busybox"], lambda n: n == "bin/busybox").get("bin/busybox")
            if busybox is None:
                raise ImageError(f"{debs['busybox'].name} holds no bin/busybox")
            src = selftest_sources(root, debs["source"], lock.packages["source"], progress)
            progress("compiling the guest agent, workload and mte-faults")
            programs = compile_guest_programs(work)
            selftests = compile_selftests(src, work, progress)
            listing = selftest_list(list(selftests), lock.packages["source"])
            progress("writing the initramfs")
            entries = initramfs_entries(busybox, modules, programs, selftests, listing,
                                        (GUEST_SRC / "init").read_bytes(), release)
            initrd = cpio.gzip_bytes(cpio.newc(entries))
            # The guest programs also on the host side, e.g. 'mtevm exec VM -- .../programs/mte-faults 10 5'.
            files = {"Image": kernel, "initramfs.cpio.gz": initrd,
                     **{f"programs/{p}": data for p, data in programs.items()}}
            manifest = {
                "format": FORMAT, "name": NAME, "kernel_release": release,
                "packages": {role: asdict(info) for role, info in lock.packages.items()},
                "selftests": listing.splitlines()[2:],
                "files": {f: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for f, d in files.items()},
                "inputs": digest,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1),
            }
            _install(out, files, manifest)
        progress(f"built {out} in {manifest['build_seconds']} s")
        return {**manifest, "up_to_date": False}


def _install(out: Path, files: dict[str, bytes], manifest: dict) -> None:
    """Replace the image directory as a whole: a crash leaves the old image or the new, never a mix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-new-"))
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
        if name.startswith("programs/"):
            (staging / name).chmod(0o755)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    old = out.parent / f".{out.name}-old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _read_manifest(d: Path) -> dict | None:
    try:
        m = json.loads((d / "manifest.json").read_text())
        return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def verify(d: Path, manifest: dict) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    for name, meta in manifest["files"].items():
        path = d / name
        if not path.exists():
            return f"{name} is missing"
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            return f"{name} has sha256 {digest[:16]}..., the manifest says {str(meta.get('sha256'))[:16]}..."
    return None


@dataclass(frozen=True)
class BuiltImage:
    """A verified Linux guest image: what a VM passes to QEMU's -kernel and -initrd."""

    kernel: str
    initrd: str
    kernel_release: str
    manifest: dict
    stale: str | None = None    # why it is not what this mtevm would build now (it still boots)

    def program(self, name: str) -> str:
        """The host-side copy of a guest program (mtevm-agent, mtevm-workload, mte-faults)."""
        return str(Path(self.kernel).parent / "programs" / name)


def linux_image(name: str = NAME, directory: Path | str | None = None) -> BuiltImage:
    """The built image after checking every file's sha256; a clear error says how to (re)build it."""
    d = Path(directory) if directory else image_dir(name)
    manifest = _read_manifest(d)
    if manifest is None:
        raise ImageError(f"the Linux guest image is not built (no {d}/manifest.json): "
                         f"build it with '{build_command()}'")
    problem = verify(d, manifest)
    if problem:
        raise ImageError(f"the Linux guest image in {d} is corrupted ({problem}): "
                         f"rebuild it with '{build_command()}'")
    return BuiltImage(str(d / "Image"), str(d / "initramfs.cpio.gz"), manifest.get("kernel_release", "?"), manifest,
                      _staleness(d, manifest))


def _staleness(d: Path, manifest: dict) -> str | None:
    """Why an image differs from what this mtevm builds (another lock, guest sources or compiler),
    or None. A stale image still boots; its agent may lack what this mtevm's has."""
    if d.name != NAME:
        return None
    try:
        if manifest.get("inputs") == inputs_digest(Lock.load()):
            return None
    except ImageError:
        return None
    return f"built from other inputs than this mtevm's (lock, guest programs or compiler): '{build_command()}' rebuilds it"


def list_images() -> list[dict]:
    """Every built image: name, kernel, package versions, file sizes and sha256, and its state
    (ok, corrupted: ..., or stale: built from another lock/sources than this mtevm's)."""
    out = []
    root = images_root()
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _read_manifest(d)
        if m is None:
            out.append({"name": d.name, "path": str(d), "state": "corrupted: no readable manifest.json",
                        "kernel_release": None, "packages": {}, "files": {}, "size": 0, "built": None})
            continue
        problem = verify(d, m)
        stale = None if problem else _staleness(d, m)
        state = f"corrupted: {problem}" if problem else f"stale: {stale}" if stale else "ok"
        out.append({"name": m.get("name", d.name), "path": str(d), "state": state,
                    "kernel_release": m.get("kernel_release"),
                    "packages": {r: {"package": p["package"], "version": p["version"]}
                                 for r, p in m.get("packages", {}).items()},
                    "files": m["files"], "size": sum(f.get("size", 0) for f in m["files"].values()),
                    "selftests": m.get("selftests", []), "built": m.get("built")})
    return out


def check_build_inputs() -> None:
    """Fail early, naming what to install, when the build tools are missing."""
    missing = [t for t in (CROSS_CC, "dpkg-deb", "apt-get", "tar") if shutil.which(t) is None]
    if missing:
        raise ConfigError(f"building the Linux guest image needs {', '.join(missing)}: {BUILD_TOOLS_HINT}")
