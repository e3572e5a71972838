"""A reproducible initramfs: the kernel's ``newc`` cpio format, written in Python, gzip-compressed.

Debian machines have no ``cpio`` by default, and GNU cpio would record the build's mtimes, inode
numbers and owners. Here every entry has uid/gid 0, one fixed mtime, inode numbers in order, and
entries sorted by path, and gzip gets mtime 0 and no file name: the same inputs give the same bytes.
Format: Documentation/driver-api/early-userspace/buffer-format.rst (magic 070701, 13 hex fields).
"""
from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One file system object of the archive. ``path`` has no leading slash (e.g. 'bin/busybox')."""

    path: str
    mode: int                 # full st_mode, type bits included
    data: bytes = b""         # file contents, or the link target of a symlink
    rdev: tuple[int, int] = (0, 0)   # (major, minor) of a device node

    @classmethod
    def dir(cls, path: str, perm: int = 0o755) -> "Entry":
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> "Entry":
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> "Entry":
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> "Entry":
        return cls(path, stat.S_IFCHR | perm, b"", (major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def newc(entries: list[Entry], mtime: int = 0) -> bytes:
    """The uncompressed archive. Parent directories must be listed (the kernel creates no missing ones)."""
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"initramfs: duplicate paths {dup}")
    out = io.BytesIO()
    for ino, e in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        name = e.path.strip("/").encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        out.write(_header(ino, e.mode, nlink, mtime, len(e.data), e.rdev, len(name)))
        out.write(name + _pad4(110 + len(name)))
        out.write(e.data + _pad4(len(e.data)))
    name = TRAILER.encode() + b"\0"
    out.write(_header(0, 0, 1, 0, 0, (0, 0), len(name)) + name + _pad4(110 + len(name)))
    return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name in the header, so the output depends on the data only."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()
