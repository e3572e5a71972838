"""A private apt for Debian's arm64 packages: the machine's own mirrors, none of its state.

The guest image is made of Debian arm64 packages (kernel, busybox, kernel source). apt can fetch
them without ``dpkg --add-architecture`` and without touching the system: given its own sources
list, lists and cache directories, ``Dir::State::status=/dev/null`` and ``APT::Architecture=arm64``,
``apt-get update`` and ``apt-get download`` work as any user and leave the system as it was.

The sources are derived from the machine's apt configuration (``/etc/apt/sources.list`` and
``/etc/apt/sources.list.d/*.list|*.sources``) so mtevm names no mirror of its own; only ``deb``
entries of the Debian archive are taken (Signed-By keeps each source's key).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from dataclasses import dataclass

from backend.errors import MtevmError

ARCH = "arm64"
LISTS_MAX_AGE = 3600   # seconds: package lists younger than this are reused


class AptError(MtevmError):
    """apt could not give us a package (no sources, network, a version that left the archive)."""


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str
    components: tuple[str, ...]
    signed_by: str | None = None

    def line(self) -> str:
        opts = f"arch={ARCH}" + (f" signed-by={self.signed_by}" if self.signed_by else "")
        return f"deb [{opts}] {self.uri} {self.suite} {' '.join(self.components)}"


@dataclass(frozen=True)
class PackageInfo:
    """One version of a package as the archive describes it."""

    package: str
    version: str
    arch: str
    sha256: str
    size: int
    filename: str      # pool path, e.g. pool/main/b/busybox/busybox-static_..._arm64.deb

    @property
    def deb_name(self) -> str:
        """apt's own name for the downloaded file (the epoch's ':' escaped as %3a)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _deb822_sources(text: str) -> list[Source]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        comps = tuple(fields.get("components", "main").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append(Source(uri.rstrip("/"), suite, comps, fields.get("signed-by") or None))
    return out


def _one_line_sources(text: str) -> list[Source]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        signed_by = None
        m = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        if m:
            for opt in m.group(1).split():
                k, _, v = opt.partition("=")
                if k == "signed-by":
                    signed_by = v
            rest = m.group(2).split()
        else:
            rest = line.split()[1:]
        if len(rest) >= 3:
            out.append(Source(rest[0].rstrip("/"), rest[1], tuple(rest[2:]), signed_by))
    return out


def system_sources(etc_apt: str = "/etc/apt") -> list[Source]:
    """The Debian archive suites this machine's apt is configured with (deb entries only)."""
    found: list[Source] = []
    legacy = os.path.join(etc_apt, "sources.list")
    if os.path.isfile(legacy):
        found += _one_line_sources(open(legacy, encoding="utf-8", errors="replace").read())
    for path in sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*"))):
        text = open(path, encoding="utf-8", errors="replace").read() if os.path.isfile(path) else ""
        if path.endswith(".sources"):
            found += _deb822_sources(text)
        elif path.endswith(".list"):
            found += _one_line_sources(text)
    # Only the Debian archive (its arm64 packages are what we pin); keep each suite once.
    seen, out = set(), []
    for s in found:
        if "/debian" not in s.uri or (s.uri, s.suite) in seen:
            continue
        seen.add((s.uri, s.suite))
        out.append(Source(s.uri, s.suite, tuple(c for c in s.components if c == "main") or ("main",), s.signed_by))
    return out


class PrivateApt:
    """apt-get/apt-cache on a private state directory (lists, archives) for arm64 packages."""

    def __init__(self, state_dir: str, sources: list[Source] | None = None):
        self.dir = state_dir
        self.sources = system_sources() if sources is None else sources
        self._updated = False     # lists fetched by this instance
        self._fresh = False       # lists checked (fetched, or recent enough) by this instance

    def _options(self) -> list[str]:
        d = self.dir
        opts = {
            "Dir::Etc::sourcelist": os.path.join(d, "sources.list"),
            "Dir::Etc::sourceparts": os.path.join(d, "sources.list.d"),
            "Dir::Etc::preferencesparts": os.path.join(d, "preferences.d"),
            "Dir::Etc::preferences": os.path.join(d, "preferences"),
            "Dir::State": os.path.join(d, "state"),
            "Dir::State::Lists": os.path.join(d, "lists"),
            "Dir::State::status": "/dev/null",
            "Dir::Cache": os.path.join(d, "cache"),
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            # The directory is private to this user; apt's _apt sandbox user could not write there.
            "APT::Sandbox::User": "root" if os.getuid() == 0 else os.environ.get("USER", "nobody"),
            "Acquire::Languages": "none",
        }
        out = []
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        return out

    def _run(self, tool: str, *args: str, cwd: str | None = None) -> str:
        try:
            r = subprocess.run([tool, *self._options(), *args], capture_output=True, text=True, cwd=cwd,
                               env={**os.environ, "LC_ALL": "C.UTF-8"}, timeout=900)
        except FileNotFoundError:
            raise AptError(f"{tool} not found: building the Linux guest image needs Debian's apt") from None
        if r.returncode != 0:
            err = "; ".join(line for line in r.stderr.splitlines() if line.startswith(("E:", "W:"))) or r.stderr.strip()
            raise AptError(f"{tool} {' '.join(args)} failed: {err}")
        return r.stdout

    def update(self, force: bool = False) -> None:
        """Fetch the package lists of the machine's suites for arm64 (about 10 MB, seconds); lists
        fetched in the last hour from the same sources are reused unless ``force``."""
        if self._updated or (self._fresh and not force):
            return
        if not self.sources:
            raise AptError("no Debian archive found in this machine's apt sources (/etc/apt/sources.list, "
                           "/etc/apt/sources.list.d/): the Linux guest image is built from Debian's arm64 packages")
        for sub in ("sources.list.d", "preferences.d", "state", "lists/partial", "cache/archives/partial"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        text = ("# derived from this machine's apt sources by mtevm (arm64 only)\n"
                + "".join(s.line() + "\n" for s in self.sources))
        sources_list = os.path.join(self.dir, "sources.list")
        stamp = os.path.join(self.dir, "updated")
        same = os.path.exists(sources_list) and open(sources_list).read() == text
        fresh = os.path.exists(stamp) and time.time() - os.path.getmtime(stamp) < LISTS_MAX_AGE
        if force or not (same and fresh):
            with open(sources_list, "w") as f:
                f.write(text)
            self._run("apt-get", "-q", "update")
            with open(stamp, "w"):
                pass
            self._updated = True
        self._fresh = True

    def refresh(self) -> None:
        """Fetch the lists now (before saying that a version is not in the archive)."""
        self.update(force=True)

    def versions(self, package: str) -> list[PackageInfo]:
        """Every version of PACKAGE (arm64 or all) the archive has now, newest (candidate order) first."""
        self.update()
        try:
            text = self._run("apt-cache", "show", f"{package}:{ARCH}")
        except AptError:
            return []
        infos = []
        for stanza in text.split("\n\n"):
            f = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(" "):
                    k, _, v = line.partition(":")
                    f[k.strip()] = v.strip()
            if f.get("Package") == package and "SHA256" in f:
                infos.append(PackageInfo(package, f["Version"], f.get("Architecture", ARCH), f["SHA256"],
                                         int(f.get("Size", 0)), f.get("Filename", "")))
        return infos

    def candidate(self, package: str) -> PackageInfo | None:
        """The version apt would install now (policy order), or None if the archive has no such package."""
        self.update()
        out = self._run("apt-cache", "policy", f"{package}:{ARCH}")
        m = re.search(r"Candidate:\s*(\S+)", out)
        if not m or m.group(1) == "(none)":
            return None
        return next((i for i in self.versions(package) if i.version == m.group(1)), None)

    def depends(self, package: str) -> list[str]:
        """Names PACKAGE's candidate directly depends on (e.g. linux-image-arm64 -> linux-image-6.1.0-N-arm64)."""
        self.update()
        out = self._run("apt-cache", "depends", "--no-recommends", "--no-suggests", f"{package}:{ARCH}")
        return [line.split(":", 1)[1].strip().split(":")[0] for line in out.splitlines()
                if line.strip().startswith("Depends:")]

    def download(self, info: PackageInfo, dest_dir: str) -> str:
        """Download exactly this version into dest_dir; apt checks it against the signed index."""
        self.update()
        os.makedirs(dest_dir, exist_ok=True)
        self._run("apt-get", "-q", "download", f"{info.package}:{info.arch}={info.version}", cwd=dest_dir)
        for name in os.listdir(dest_dir):
            if name.startswith(info.package + "_") and name.endswith(".deb"):
                return os.path.join(dest_dir, name)
        raise AptError(f"apt-get download {info.package}={info.version} left no .deb in {dest_dir}")
