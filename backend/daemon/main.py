"""The daemon process: pid lock, Unix socket, signals, and detaching into the background.

``python -m backend.daemon [--background] [--runtime-dir D] [--state-dir D]``; users run it as
``mtevm daemon [--foreground]`` and clients start it on demand (backend.daemon.launch).
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import Callable

from aiohttp import web

from backend.daemon.server import build_app
from backend.daemon.service import open_service
from backend.errors import MtevmError, StateError, StoreError, error_payload
from backend.store import check_writable
from backend.paths import Paths, bind_private_socket, open_private_file, private_dir

log = logging.getLogger("mtevm.daemon")

PID_LOCK_PATIENCE = 1.0  # a client probing the pid lock holds it for microseconds; a daemon forever
SHUTDOWN_TIMEOUT = 5.0   # requests still running when SIGTERM arrives get this long

Report = Callable[[dict], None]


def acquire_pid_lock(paths: Paths) -> int:
    """Lock the pid file for the daemon's lifetime; StateError if another daemon holds it.

    Opened relative to the checked runtime dir, never through a symlink (backend.paths)."""
    with private_dir(paths.runtime_dir, what="runtime directory") as rt:
        fd = open_private_file(rt, os.path.basename(paths.pid_file))
    deadline = time.monotonic() + PID_LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise StateError(f"an mtevm daemon is already running (pid {pid}, socket {paths.socket})") from None
            time.sleep(0.02)


async def serve(paths: Paths, pid_fd: int, report: Report) -> None:
    """Serve until SIGTERM/SIGINT, then stop cleanly (see Service.close for what happens to VMs)."""
    service = await open_service(paths)
    runner = None
    try:
        # We hold the pid lock, so no live daemon owns a socket file that is there: it is stale.
        with private_dir(paths.runtime_dir, what="runtime directory") as rt:
            sock = bind_private_socket(rt, os.path.basename(paths.socket))
        runner = web.AppRunner(build_app(service), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        os.ftruncate(pid_fd, 0)
        os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(pid_fd)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("mtevm daemon %d serving %s (store %s)", os.getpid(), paths.socket, paths.store)
        report({"ok": True, "pid": os.getpid(), "socket": paths.socket})
        await stop.wait()
        log.info("stopping")
    finally:
        service.bus.close()          # end event streams first, so the runner need not wait for them
        if runner is not None:
            await runner.cleanup()
        await service.close()
        try:
            with private_dir(paths.runtime_dir, create=False, what="runtime directory") as rt:
                os.unlink(os.path.basename(paths.socket), dir_fd=rt)
        except (OSError, MtevmError):
            pass           # already gone (a user removed it) or the directory went away
        log.info("stopped")


def run_daemon(paths: Paths, report: Report) -> int:
    """Run a daemon in this process; ``report`` gets the readiness or the startup error."""
    os.umask(0o077)
    try:
        paths.ensure_runtime_dir()
        paths.ensure_state_dir()
        pid_fd = acquire_pid_lock(paths)
    except MtevmError as e:
        report(error_payload(e))
        return 1
    ready = False

    def report_once(msg: dict) -> None:
        nonlocal ready
        ready = True
        report(msg)

    try:
        asyncio.run(serve(paths, pid_fd, report_once))
        return 0
    except MtevmError as e:
        log.error("%s", e)
        if not ready:
            report(error_payload(e))
        return 1
    finally:
        # Emptied, not unlinked: a daemon starting now must lock the same file we release.
        os.ftruncate(pid_fd, 0)
        os.close(pid_fd)  # releases the lock last: until here no second daemon can start


def run_background(paths: Paths) -> int:
    """Detach (fork, setsid, fork) and print the daemon's readiness or startup error as JSON."""
    os.umask(0o077)
    try:
        paths.ensure_runtime_dir()
        paths.ensure_state_dir()
        check_writable(paths.store)     # a read-only or immutable store: say so here, not in a log
        try:
            with private_dir(paths.state_dir, what="state directory") as st:   # never through a symlink
                logfd = open_private_file(st, os.path.basename(paths.log_file), os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise StoreError(f"cannot write the daemon log {paths.log_file}: {e.strerror}") from None
    except MtevmError as e:
        print(json.dumps(error_payload(e)), flush=True)
        return 1
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked processes
        code = 1
        try:
            os.close(r)
            os.setsid()
            if os.fork():
                os._exit(0)
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            os.close(null)
            os.close(logfd)
            _setup_logging()

            def report(msg: dict) -> None:
                os.write(w, json.dumps(msg).encode() + b"\n")
                os.close(w)

            code = run_daemon(paths, report)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    os.close(logfd)
    os.waitpid(child, 0)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read().decode(errors="replace").strip()
    if not data:
        err = MtevmError(f"the mtevm daemon exited during startup; see {paths.log_file}")
        print(json.dumps(error_payload(err)), flush=True)
        return 1
    print(data, flush=True)
    return 0 if '"ok"' in data else 1


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.daemon", description="the mtevm daemon")
    parser.add_argument("--background", action="store_true", help="detach and report readiness as JSON")
    parser.add_argument("--runtime-dir")
    parser.add_argument("--state-dir")
    args = parser.parse_args(argv)
    paths = Paths.resolve(args.runtime_dir, args.state_dir)
    if args.background:
        return run_background(paths)
    _setup_logging()

    def report(msg: dict) -> None:
        if "error" in msg:
            print(f"mtevm: error: {msg['error']['message']}", file=sys.stderr, flush=True)
        else:
            print(f"mtevm daemon: pid {msg['pid']}, listening on {msg['socket']}", file=sys.stderr, flush=True)

    return run_daemon(paths, report)
