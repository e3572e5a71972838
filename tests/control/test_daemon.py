"""The daemon as a process: on-demand start, never twice, permissions, peer uid, stale socket,
stop by SIGTERM, bad stores. Real daemons, driven through the real CLI in subprocesses."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from backend.daemon.launch import daemon_pid
from backend.paths import Paths
from backend.store import SCHEMA_VERSION, Store
from tests.conftest import stop_daemon_by_pid


def serving_lines(paths) -> int:
    """How many daemons ever started serving with this state dir (each logs one line)."""
    if not os.path.exists(paths.log_file):
        return 0
    return sum(" serving " in line for line in open(paths.log_file))


def test_first_client_starts_the_daemon_privately(mtevm_paths, run_mtevm):
    assert daemon_pid(mtevm_paths) is None
    r = run_mtevm("list", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    pid = daemon_pid(mtevm_paths)
    assert pid and pid != os.getpid()
    assert int(open(mtevm_paths.pid_file).read()) == pid
    assert stat.S_IMODE(os.stat(mtevm_paths.runtime_dir).st_mode) == 0o700
    sock = os.stat(mtevm_paths.socket)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    # detached (double fork + setsid): a new session it does not lead, so it never gets a terminal
    assert os.getsid(pid) != os.getsid(0) and os.getsid(pid) != pid
    assert serving_lines(mtevm_paths) == 1


def test_a_second_daemon_refuses_and_says_so(mtevm_paths, run_mtevm, mtevm_daemon):
    for args in (("daemon",), ("daemon", "--foreground")):
        r = run_mtevm(*args)
        assert r.returncode == 1
        assert f"already running (pid {mtevm_daemon}" in r.stderr
    assert daemon_pid(mtevm_paths) == mtevm_daemon
    assert serving_lines(mtevm_paths) == 1


def test_racing_clients_start_one_daemon(mtevm_paths, run_mtevm):
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "backend.cli", "hosts", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1] for o in outs]
    assert all({h["name"] for h in json.loads(o[0])} == {"sim-mte", "sim-nomte", "local"} for o in outs)
    assert serving_lines(mtevm_paths) == 1


def test_a_stale_socket_is_replaced(mtevm_paths, run_mtevm):
    os.makedirs(mtevm_paths.runtime_dir, mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(mtevm_paths.socket)   # a socket file with nobody listening: what a crashed daemon leaves
    s.close()
    r = run_mtevm("list")
    assert r.returncode == 0, r.stderr
    assert daemon_pid(mtevm_paths)


def test_daemon_stop_sends_sigterm_and_waits(mtevm_paths, run_mtevm, mtevm_daemon):
    r = run_mtevm("daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert f"pid {mtevm_daemon}" in r.stdout
    assert daemon_pid(mtevm_paths) is None
    assert not os.path.exists(mtevm_paths.socket)
    assert "stopped" in open(mtevm_paths.log_file).read().splitlines()[-1]
    r = run_mtevm("daemon", "stop")
    assert r.returncode == 1 and "no mtevm daemon is running" in r.stderr


def test_foreground_daemon_serves_and_stops_on_sigterm(mtevm_paths, run_mtevm):
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "daemon", "--foreground"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stderr.readline() or "listening on" in proc.stderr.readline()
        r = run_mtevm("create", "fg1", "--json")
        assert r.returncode == 0, r.stderr
        assert daemon_pid(mtevm_paths) == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    r = run_mtevm("--no-daemon", "list", "--json")
    assert [v["name"] for v in json.loads(r.stdout)] == ["fg1"]


def test_flags_move_both_directories(tmp_path, run_mtevm):
    rt, st = str(tmp_path / "rt2"), str(tmp_path / "st2")
    r = run_mtevm("--runtime-dir", rt, "create", "moved", "--state-dir", st)
    assert r.returncode == 0, r.stderr
    try:
        assert os.path.exists(os.path.join(rt, "mtevm.sock"))
        assert os.path.exists(os.path.join(st, "mtevm.sqlite3"))
    finally:
        run_mtevm("daemon", "stop", "--runtime-dir", rt, "--state-dir", st)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("damage", ["garbage", "newer"])
def test_bad_store_gives_a_clear_error_and_stays_untouched(mtevm_paths, run_mtevm, damage):
    os.makedirs(mtevm_paths.state_dir, mode=0o700)
    if damage == "garbage":
        with open(mtevm_paths.store, "wb") as f:
            f.write(b"\x00garbage" * 1000)
    else:
        Store(mtevm_paths.store).close()
        import sqlite3
        db = sqlite3.connect(mtevm_paths.store)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
        db.execute("PRAGMA journal_mode=DELETE")
        db.close()
    before = _digest(mtevm_paths.store)
    for args in (("list",), ("--no-daemon", "list"), ("daemon",)):
        r = run_mtevm(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("mtevm: error: ") and mtevm_paths.store in r.stderr
        assert ("newer" if damage == "newer" else "not an SQLite database") in r.stderr
        assert r.stdout == ""
        assert daemon_pid(mtevm_paths) is None
    assert _digest(mtevm_paths.store) == before


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid (nobody)")

RAW_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/vms HTTP/1.1\\r\\nHost: mtevm\\r\\n\\r\\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
"""


@needs_root
def test_a_client_of_another_uid_is_refused(mtevm_paths, run_mtevm):
    # pytest's tmp dirs sit in a 0700 dir nobody cannot enter: this daemon's runtime dir is elsewhere.
    rt = tempfile.mkdtemp(prefix="mtevm-peer-")
    env = {"MTEVM_RUNTIME_DIR": rt}
    paths = Paths(rt, mtevm_paths.state_dir)
    try:
        assert run_mtevm("create", "secret", env=env).returncode == 0
        # Open the way for the test (a real setup keeps 0700/0600): only SO_PEERCRED is left to refuse.
        os.chmod(rt, 0o755)
        os.chmod(paths.socket, 0o666)
        as_nobody = [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        # /usr/bin/python3 (not this venv's, which may sit under /root) with the stdlib only: a raw HTTP client.
        r = subprocess.run([*as_nobody, "/usr/bin/python3", "-c", RAW_CLIENT, paths.socket],
                           capture_output=True, text=True, timeout=30, cwd="/")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("HTTP/1.1 403")
        assert "refuses clients of uid 65534" in r.stdout and "secret" not in r.stdout
        # the daemon itself is unharmed
        assert json.loads(run_mtevm("list", "--json", env=env).stdout)[0]["name"] == "secret"
    finally:
        stop_daemon_by_pid(paths)
        shutil.rmtree(rt, ignore_errors=True)
