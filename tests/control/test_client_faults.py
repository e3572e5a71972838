"""A daemon that does not answer, a socket that vanished, and input that used to crash a reader
(issue 11, item 8): each is one clear line, and nothing is lost."""
from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from backend.errors import ConfigError


def one_line(r) -> str:
    assert r.stdout == "" and r.stderr.startswith("mtevm: error: "), (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip().removeprefix("mtevm: error: ")


def test_a_stopped_daemon_fails_a_command_in_time_with_one_line(mtevm_daemon, run_mtevm, tmp_path):
    assert run_mtevm("create", "kept").returncode == 0
    os.kill(mtevm_daemon, signal.SIGSTOP)
    try:
        r = run_mtevm("list", env={"MTEVM_TIMEOUT": "2"})
        assert r.returncode == 1
        err = one_line(r)
        assert err.startswith(f"the mtevm daemon (pid {mtevm_daemon}) did not answer within 2 s")
        assert "--timeout" in err and "mtevm daemon stop" in err
        assert "within 1.5 s" in one_line(run_mtevm("--timeout", "1.5", "list"))    # the flag wins
        config = tmp_path / "config.toml"
        config.write_text("timeout = 1\n")
        assert "within 1 s" in one_line(run_mtevm("list", env={"MTEVM_CONFIG": str(config)}))
        r = run_mtevm("list", env={"MTEVM_TIMEOUT": "soon"})
        assert r.returncode == 2 and "MTEVM_TIMEOUT: 'soon' is not a number of seconds" in one_line(r)
    finally:
        os.kill(mtevm_daemon, signal.SIGCONT)
    assert [v["name"] for v in json.loads(run_mtevm("list", "--json").stdout)] == ["kept"]   # nothing lost


def test_a_deleted_socket_is_named_with_the_way_back(mtevm_daemon, mtevm_paths, run_mtevm):
    assert run_mtevm("create", "kept").returncode == 0
    os.unlink(mtevm_paths.socket)
    r = run_mtevm("list")
    assert r.returncode == 1
    err = one_line(r)
    assert err.startswith(f"the mtevm daemon (pid {mtevm_daemon}) is running, but its socket "
                          f"{mtevm_paths.socket} is gone")
    assert "'mtevm daemon stop'" in err and "already running" not in err
    assert run_mtevm("daemon", "stop").returncode == 0          # the way back it names works
    assert [v["name"] for v in json.loads(run_mtevm("list", "--json").stdout)] == ["kept"]


def _raw_request(path: str, method: str, target: str, body: bytes) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(f"{method} {target} HTTP/1.1\r\nHost: mtevm\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data.decode(errors="replace")


def test_deeply_nested_json_is_a_400_that_says_why(mtevm_daemon, mtevm_paths, run_mtevm):
    answer = _raw_request(mtevm_paths.socket, "POST", "/v1/vms", b"[" * 100_000 + b"]" * 100_000)
    assert answer.startswith("HTTP/1.1 400")
    assert "nested too deeply (more than 64 levels)" in answer and "RecursionError" not in answer
    nested_config = b'{"name": "n", "workload": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert _raw_request(mtevm_paths.socket, "POST", "/v1/vms", nested_config).startswith("HTTP/1.1 400")
    assert run_mtevm("list", "--json").stdout.strip() == "[]"                   # the daemon is fine


@pytest.mark.parametrize("key", ["uaf_rate", "overflow_rate", "wild_rate", "seed", "rate", "heap_size"])
async def test_booleans_are_not_numbers_in_a_workload(inproc_client, key):
    with pytest.raises(ConfigError, match=f"workload {key}: True is not"):
        await inproc_client.create({"name": "b", "workload": {key: True}})
    assert await inproc_client.list() == []


def test_slow_operations_are_awaited_as_long_as_the_daemon_lets_them_run():
    """The client's timeout is for a daemon that does not answer, not for an operation that rightly
    takes long: each such route waits at least as long as the daemon allows the operation."""
    from backend.daemon import vm_operations
    from backend.daemon.api import ROUTES
    from backend.hosts import local
    assert ROUTES["snapshot_save"].may_take >= local.SAVE_TIMEOUT
    assert ROUTES["snapshot_restore"].may_take >= local.SAVE_TIMEOUT
    assert ROUTES["shutdown"].may_take >= vm_operations.SHUTDOWN_TIMEOUT
    assert ROUTES["reboot"].may_take >= vm_operations.REBOOT_TIMEOUT
