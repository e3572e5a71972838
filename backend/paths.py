"""Where mtevm keeps its files: a runtime dir (socket, pid, locks), a state dir (store, logs) and a
cache dir (guest images, downloaded packages; see cache_dir()).

Both follow the XDG rules through platformdirs, can be moved with ``MTEVM_RUNTIME_DIR`` /
``MTEVM_STATE_DIR`` (or ``--runtime-dir`` / ``--state-dir``), and are created private (0700)
because the socket in the runtime dir gives full control over the user's VMs.

Files are never created by path string in a directory someone else could change. The rule:
- ``open_private_dir(path)`` walks the path one component at a time without letting the kernel
  follow links (``O_NOFOLLOW``/``lstat``). Every directory on the way must belong to root or to us
  and, if others may write to it, be sticky (like /tmp); every symlink on the way must belong to
  root or to us (a link another user owns could be flipped between two checks). The last directory
  must be ours and writable by nobody else; its owner and mode are checked on the open descriptor.
- Files inside are opened relative to that descriptor with ``open_private_file`` (``O_NOFOLLOW``,
  ``O_EXCL`` when new), so a symlink planted or flipped in their place is never followed.
The other modules (daemon, console sockets, logs, pid files) use these helpers; see docs/contracts.md.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import platformdirs

from backend.errors import ConfigError

APP = "mtevm"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/mtevm, or /tmp/mtevm-<uid> when there is no XDG runtime dir (root in CI, cron)."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return platformdirs.user_runtime_dir(APP)
    return f"/tmp/{APP}-{os.getuid()}"


def default_state_dir() -> str:
    return platformdirs.user_state_dir(APP)


def cache_dir() -> str:
    """Downloaded packages and built guest images: ``MTEVM_CACHE_DIR``, else the XDG cache dir.
    Everything there can be rebuilt (``mtevm image build``), so it may be deleted at any time."""
    return os.path.abspath(os.environ.get("MTEVM_CACHE_DIR") or platformdirs.user_cache_dir(APP))


@dataclass(frozen=True)
class Paths:
    """The files of one mtevm installation (one daemon)."""

    runtime_dir: str
    state_dir: str

    @classmethod
    def resolve(cls, runtime_dir: str | None = None, state_dir: str | None = None) -> "Paths":
        """Flags win over environment variables, which win over the XDG defaults."""
        rt = runtime_dir or os.environ.get("MTEVM_RUNTIME_DIR") or default_runtime_dir()
        st = state_dir or os.environ.get("MTEVM_STATE_DIR") or default_state_dir()
        return cls(os.path.abspath(rt), os.path.abspath(st))

    @property
    def socket(self) -> str:
        return os.path.join(self.runtime_dir, "mtevm.sock")

    @property
    def pid_file(self) -> str:
        """Holds the daemon's pid; the daemon keeps an flock on it for as long as it lives."""
        return os.path.join(self.runtime_dir, "mtevm.pid")

    @property
    def start_lock(self) -> str:
        """Taken by a client that starts the daemon on demand, so two racing clients start one."""
        return os.path.join(self.runtime_dir, "start.lock")

    @property
    def vm_runtime_root(self) -> str:
        return os.path.join(self.runtime_dir, "vms")

    @property
    def store(self) -> str:
        return os.path.join(self.state_dir, "mtevm.sqlite3")

    @property
    def log_file(self) -> str:
        return os.path.join(self.state_dir, "daemon.log")

    def ensure_runtime_dir(self) -> None:
        """Create the runtime dir 0700 and refuse one that others could write to or that is not ours."""
        os.close(self.open_runtime_dir())

    def open_runtime_dir(self) -> int:
        """The checked runtime dir as an O_DIRECTORY descriptor (the caller closes it): create the
        files in it with ``open_private_file(fd, name)``."""
        if len(self.socket.encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"runtime directory {self.runtime_dir} is too long for a Unix socket path "
                              f"({len(self.socket.encode())} > {MAX_SOCKET_PATH} bytes): "
                              "choose a shorter MTEVM_RUNTIME_DIR or --runtime-dir")
        return open_private_dir(self.runtime_dir, what="runtime directory")

    def ensure_state_dir(self) -> None:
        os.close(self.open_state_dir())

    def open_state_dir(self) -> int:
        return open_private_dir(self.state_dir, what="state directory")



_MAX_LINKS = 40      # as the kernel's MAXSYMLINKS: a loop of links ends with a clear error
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _owner(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def open_private_dir(path: str, *, create: bool = True, what: str = "directory") -> int:
    """Open ``path`` as a private directory of ours and return its O_DIRECTORY descriptor.

    Walks the path from / one component at a time, never letting the kernel follow a link: see
    the module docstring for what is trusted. ``create``: make missing directories (0700) on the
    way, as mkdir -p; else a missing one raises FileNotFoundError. Anything unsafe raises
    ConfigError saying what was refused and what to do. The caller closes the descriptor.
    """
    me = os.getuid()
    shown = path
    path = os.path.abspath(path)
    pending = [c for c in path.split("/") if c][::-1]      # a stack: next component on top
    stack = [os.open("/", _DIR_FLAGS)]                      # the directories walked so far
    where = ["/"]
    links = 0

    def refuse(message: str) -> ConfigError:
        return ConfigError(f"{what} {shown}: {message}")

    try:
        while pending:
            name = pending.pop()
            here = os.path.join(where[-1], name)
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    where.pop()
                continue
            try:
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), here) from None
                try:
                    os.mkdir(name, 0o700, dir_fd=stack[-1])
                except FileExistsError:
                    pass                      # made by someone else meanwhile: checked below
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid not in (0, me):
                    raise refuse(f"{here} is a symlink owned by {_owner(st.st_uid)}, not by you or root: "
                                 "refusing to follow it, because its owner can point it anywhere at any "
                                 "moment. Remove it, or choose another directory "
                                 "(--runtime-dir/--state-dir or MTEVM_RUNTIME_DIR/MTEVM_STATE_DIR)")
                links += 1
                if links > _MAX_LINKS:
                    raise refuse(f"too many levels of symbolic links at {here}")
                target = os.readlink(name, dir_fd=stack[-1])
                pending.extend([c for c in target.split("/") if c][::-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                        where.pop()
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise refuse(f"{here} is not a directory")
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=stack[-1])
            except OSError as e:      # swapped for a link or a file since the lstat, or no access
                raise refuse(f"cannot open {here}: {e.strerror}") from None
            stack.append(fd)
            where.append(here)
            st = os.fstat(fd)
            if pending:
                _check_passage(st, here, refuse)
        _check_final(os.fstat(stack[-1]), where[-1])
        fd = stack.pop()
        return fd
    except FileNotFoundError:
        raise
    except OSError as e:
        raise refuse(f"{e.strerror}") from None
    finally:
        for fd in stack:
            os.close(fd)


def _check_passage(st: os.stat_result, here: str, refuse) -> None:
    """A directory on the way: nobody but root or us may rename or replace what is in it."""
    me = os.getuid()
    if st.st_uid not in (0, me):
        raise refuse(f"{here} belongs to {_owner(st.st_uid)}, who could replace what lies under it: "
                     "choose a directory on a path that only you and root control")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise refuse(f"{here} is writable by other users and not sticky (mode {stat.S_IMODE(st.st_mode):o}), "
                     "so they could replace what lies under it")


def _check_final(st: os.stat_result, here: str) -> None:
    """The directory itself: ours, and nobody else may add, remove or swap files in it."""
    me = os.getuid()
    if st.st_uid != me:
        raise ConfigError(f"directory {here} belongs to uid {st.st_uid}, not to you (uid {me})")
    if st.st_mode & 0o022:
        raise ConfigError(f"directory {here} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                          f"run 'chmod 700 {here}'")


def ensure_private_dir(path: str) -> None:
    """mkdir -p with mode 0700, checked as open_private_dir checks it."""
    os.close(open_private_dir(path))


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")


def open_private_file(dirfd: int, name: str, flags: int = os.O_RDWR, *, mode: int = 0o600,
                      create: bool = True, exclusive: bool = False) -> int:
    """Open (``create``: or create, 0600) the file ``name`` in the directory ``dirfd`` (from
    open_private_dir), never following a symlink; ``exclusive``: it must be new (O_EXCL).

    The file must be a regular file of ours: anything else (a symlink, a fifo, a hard link to
    someone's file) raises ConfigError naming it; a missing one with ``create=False`` raises
    FileNotFoundError. Returns a descriptor (O_CLOEXEC).
    """
    _check_name(name)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    if create:
        flags |= os.O_CREAT | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(name, flags | os.O_NONBLOCK, mode, dir_fd=dirfd)   # O_NONBLOCK: a fifo cannot hang us
    except FileNotFoundError:
        raise
    except OSError as e:
        where = _fd_dir(dirfd)
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{os.path.join(where, name)} is a symbolic link: refusing to follow it") from None
        if e.errno == errno.EEXIST:
            raise ConfigError(f"{os.path.join(where, name)} already exists") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):     # a fifo with no reader, a socket, a directory
            raise _not_private(dirfd, name) from None
        raise ConfigError(f"cannot open {os.path.join(where, name)}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink > 1:
        os.close(fd)
        raise _not_private(dirfd, name)
    if not flags & os.O_NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def _not_private(dirfd: int, name: str) -> ConfigError:
    return ConfigError(f"{os.path.join(_fd_dir(dirfd), name)} is not a private regular file of yours: "
                       "refusing to use it (remove it)")


def open_private_path(path: str, flags: int = os.O_RDWR, **kw) -> int:
    """``open_private_file`` for a path: its directory is checked (and made) by open_private_dir."""
    dirfd = open_private_dir(os.path.dirname(os.path.abspath(path)))
    try:
        return open_private_file(dirfd, os.path.basename(path), flags, **kw)
    finally:
        os.close(dirfd)


def open_private_subdir(dirfd: int, name: str, *, create: bool = True) -> int:
    """A private directory ``name`` inside ``dirfd`` (made 0700 when missing), never a link."""
    _check_name(name)
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dirfd)
        except FileExistsError:
            pass
    here = os.path.join(_fd_dir(dirfd), name)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except OSError as e:
        what = "is a symbolic link: refusing to follow it" if e.errno in (errno.ELOOP, errno.ENOTDIR) \
            and os.path.islink(here) else e.strerror
        raise ConfigError(f"directory {here}: {what}") from None
    try:
        _check_final(os.fstat(fd), here)
    except ConfigError:
        os.close(fd)
        raise
    return fd


def fd_path(dirfd: int, name: str = "") -> str:
    """A path that reaches ``name`` through the open directory ``dirfd`` (/proc/self/fd/N/name),
    for the calls that only take a path (bind a Unix socket): no component of the original path
    is looked up again, so nothing can be swapped under it. Valid in this process only."""
    if name:
        _check_name(name)
    return f"/proc/self/fd/{dirfd}/{name}" if name else f"/proc/self/fd/{dirfd}"


def bind_private_socket(dirfd: int, name: str) -> socket.socket:
    """A listening Unix socket ``name`` in ``dirfd``, mode 0600; a stale one there is replaced.

    The caller must own the name (e.g. hold the daemon's pid lock): a live socket is replaced too.
    """
    _check_name(name)
    try:
        os.unlink(name, dir_fd=dirfd)       # unlinkat: removes a link itself, never its target
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(fd_path(dirfd, name))
        os.chmod(fd_path(dirfd, name), 0o600)   # in our private dir: nobody can swap it meanwhile
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


@contextmanager
def private_dir(path: str, *, create: bool = True, what: str = "directory") -> Iterator[int]:
    """``with private_dir(path) as fd:`` open_private_dir, closed afterwards."""
    fd = open_private_dir(path, create=create, what=what)
    try:
        yield fd
    finally:
        os.close(fd)


def _fd_dir(dirfd: int) -> str:
    """The directory's path, for messages only."""
    try:
        return os.readlink(f"/proc/self/fd/{dirfd}")
    except OSError:
        return f"<fd {dirfd}>"
