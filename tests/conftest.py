"""Shared fixtures for every test directory.

- ``mtevm_paths``: a private runtime dir and state dir under tmp_path, also exported as
  MTEVM_RUNTIME_DIR / MTEVM_STATE_DIR; any daemon started in them (by a test or on demand by a
  client) is stopped by PID at teardown.
- ``run_mtevm(*args, input=None, env=None, timeout=60)``: run the real ``mtevm`` CLI in a subprocess
  on those dirs; returns subprocess.CompletedProcess (text).
- ``mtevm_daemon``: a real background daemon on those dirs (its pid); stopped at teardown.
- ``inproc_client``: an in-process backend.client.Client on those dirs (closed at teardown).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from backend.paths import Paths


def stop_daemon_by_pid(paths: Paths, timeout: float = 20.0) -> None:
    """SIGTERM the daemon holding ``paths``' pid lock; SIGKILL it if it does not stop in time."""
    from backend.daemon.launch import daemon_pid
    pid = daemon_pid(paths)
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while daemon_pid(paths) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if daemon_pid(paths) is None:
            return


@pytest.fixture
def mtevm_paths(tmp_path, monkeypatch) -> Paths:
    paths = Paths(str(tmp_path / "run"), str(tmp_path / "state"))
    monkeypatch.setenv("MTEVM_RUNTIME_DIR", paths.runtime_dir)
    monkeypatch.setenv("MTEVM_STATE_DIR", paths.state_dir)
    yield paths
    stop_daemon_by_pid(paths)


@pytest.fixture
def run_mtevm(mtevm_paths):
    def run(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 60,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "MTEVM_RUNTIME_DIR": mtevm_paths.runtime_dir,
                    "MTEVM_STATE_DIR": mtevm_paths.state_dir, "COLUMNS": "200", **(env or {})}
        cmd = [*(prefix or []), sys.executable, "-m", "backend.cli", *args]
        return subprocess.run(cmd, input=input, env=full_env, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    return run


@pytest.fixture
def mtevm_daemon(mtevm_paths, run_mtevm) -> int:
    import json
    r = run_mtevm("daemon", "--json")
    assert r.returncode == 0, r.stderr
    yield json.loads(r.stdout)["pid"]
    stop_daemon_by_pid(mtevm_paths)


@pytest.fixture
async def inproc_client(mtevm_paths):
    from backend.client import connect
    client = await connect(in_process=True, runtime_dir=mtevm_paths.runtime_dir, state_dir=mtevm_paths.state_dir)
    yield client
    await client.close()
