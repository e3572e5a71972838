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
import subprocess
import sys

import pytest

from backend.paths import Paths


def stop_daemon_by_pid(paths: Paths, timeout: float = 20.0) -> None:
    """SIGTERM the daemon holding ``paths``' pid lock; SIGKILL it if it does not stop in time."""
    from backend.daemon.launch import stop_daemon
    from backend.errors import NotFoundError
    try:
        stop_daemon(paths, timeout, kill_after_timeout=True)
    except NotFoundError:
        pass  # no daemon (or one still starting, with no pid to signal yet)


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


# --- The skip policy -------------------------------------------------------------------------
# A skip hides a missing install step: on a fresh machine `scripts/test.sh` installs QEMU, the
# cross compiler, sshd and tmux, so a test that finds one missing must fail, not pass quietly.
# The only hardware that cannot exist on the machines this runs on is an arm64 host whose KVM has
# KVM_CAP_ARM_MTE; tests that need it carry the marker below and are the only ones allowed to skip.
NEEDS_ARM64_KVM_MTE = "needs_arm64_kvm_mte"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{NEEDS_ARM64_KVM_MTE}: needs an arm64 host whose /dev/kvm has KVM_CAP_ARM_MTE "
        "(the only reason a test may skip)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not item.get_closest_marker(NEEDS_ARM64_KVM_MTE) \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped for a reason other than missing arm64 KVM MTE hardware: {reason}\n"
                           "run `bash scripts/test.sh`, which installs what the tests need")
