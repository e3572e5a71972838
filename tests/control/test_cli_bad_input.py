"""The real ``mtevm`` CLI in subprocesses against one real daemon (started once for this module).

- Hypothesis-generated bad argv for every command that takes arguments: each gives exit 1 or 2,
  exactly one ``mtevm: error: ...`` line on stderr, nothing on stdout, and the store (read
  read-only, row by row) does not change.
- A listing whose reader goes away (``mtevm show X --json | head -c 100``) exits quietly: no
  traceback, status 141 as a shell reports a writer killed by SIGPIPE.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import string
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.paths import Paths
from tests.conftest import stop_daemon_by_pid

RUNNING, STOPPED = "keep", "idle"          # the VMs the daemon holds while bad input rains on it
EXISTING = (RUNNING, STOPPED, "wide")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A real daemon with a running MTE VM, two stopped ones and one migration in its history."""
    base = tmp_path_factory.mktemp("cli-bad-input")
    paths = Paths(str(base / "run"), str(base / "state"))
    env = {**os.environ, "MTEVM_RUNTIME_DIR": paths.runtime_dir, "MTEVM_STATE_DIR": paths.state_dir,
           "COLUMNS": "200"}

    def run(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, stdout=stdout,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=60)

    try:
        for args in (("daemon",), ("create", RUNNING), ("start", RUNNING), ("create", STOPPED, "--no-mte"),
                     ("create", "wide", "--vcpus", "64"), ("migrate", RUNNING, "--to", "sim-nomte")):
            r = run(*args)
            assert r.returncode == (1 if args[0] == "migrate" else 0), (args, r.stderr)   # MTE: blocked
        yield run, paths, env
    finally:
        stop_daemon_by_pid(paths)


def store_rows(paths: Paths) -> dict:
    """Every row of every table of the daemon's store, read without writing anything."""
    db = sqlite3.connect(f"file:{paths.store}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("vms", "pending", "runtime", "migrations")}
    finally:
        db.close()


# -- bad argv -----------------------------------------------------------------------------------
# Text an argv can carry (no NUL, no lone surrogates) that does not look like an option.
any_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12).filter(
    lambda s: not s.startswith("-"))
unknown_vm = any_text.filter(lambda s: s not in EXISTING)
unknown_host = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=10).filter(
    lambda s: s not in ("local", "sim-mte", "sim-nomte") and not s.startswith("-"))
good_name = st.from_regex(r"n[a-z0-9]{0,8}", fullmatch=True).filter(lambda s: s not in EXISTING)
bad_name = st.one_of(st.sampled_from(["", "UPPER", "a b", "a/b", "_x", ".x", "x" * 33]),
                     any_text.filter(lambda s: not s or not (s[0].isascii() and s[0].isalnum())))
not_int = st.sampled_from(["x", "1.5", "", "0x", "one", "1e3"])


def create_argv() -> st.SearchStrategy:
    """``create`` with exactly the kind of mistake a user makes; everything else valid."""
    mistakes = st.one_of(
        bad_name.map(lambda n: ["create", n]),
        st.just(["create", RUNNING]),                                            # exists already
        st.tuples(good_name, st.integers(max_value=0) | st.integers(min_value=513)).map(
            lambda t: ["create", t[0], "--vcpus", str(t[1])]),
        st.tuples(good_name, not_int).map(lambda t: ["create", t[0], "--vcpus", t[1]]),
        st.tuples(good_name, st.sampled_from(["12Q", "0", "-1M", "abc", "1.5.5G", "2T", "16M", "4097"])).map(
            lambda t: ["create", t[0], "--memory=" + t[1]]),
        st.tuples(good_name, st.text(string.ascii_lowercase, min_size=1, max_size=8).filter(
            lambda c: c not in ("max", "host") and not c.startswith("cortex") and not c.startswith("neoverse"))).map(
            lambda t: ["create", t[0], "--cpu", t[1]]),
        st.tuples(good_name, unknown_host).map(lambda t: ["create", t[0], "--host", t[1]]),
        st.tuples(good_name, st.sampled_from(["sim-mte", "sim-nomte"])).map(   # sims run no QEMU
            lambda t: ["create", t[0], "--host", t[1], "--qemu-arg=-device ivshmem-plain,memdev=shm"]),
        st.tuples(good_name, st.sampled_from(["-drive file=x", "-device", "-object a b", "'unclosed"])).map(
            lambda t: ["create", t[0], "--host", "local", "--qemu-arg=" + t[1]]),
        st.tuples(good_name, st.sampled_from(["fast", "sync,x", ""])).map(lambda t: ["create", t[0], "--tcf", t[1]]),
        st.tuples(good_name, st.sampled_from(["-1", "x"])).map(lambda t: ["create", t[0], "--rate=" + t[1]]),
        st.tuples(good_name, st.sampled_from(["1.5", "-0.1", "nan"])).map(
            lambda t: ["create", t[0], "--uaf-rate=" + t[1]]),
        st.tuples(good_name, st.sampled_from(["x", "seed", "=3", "seed=3,,bogus=1"])).map(
            lambda t: ["create", t[0], "--workload", t[1]]),
        st.tuples(good_name, st.sampled_from(["xen", "hvf", "KVM"])).map(
            lambda t: ["create", t[0], "--accel", t[1]]),
    )
    return mistakes


def vm_command_argv() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.sampled_from(["show", "start", "stop", "counters"]), unknown_vm).map(list),
        st.tuples(unknown_vm).map(lambda t: ["delete", t[0], "--yes"]),
        st.just(["start", RUNNING]), st.just(["stop", STOPPED]), st.just(["delete", RUNNING, "--yes"]),
        st.tuples(unknown_vm, st.sampled_from(["on", "off"])).map(lambda t: ["mte", t[0], t[1]]),
        st.tuples(st.sampled_from(EXISTING), any_text.filter(lambda s: s not in ("on", "off"))).map(
            lambda t: ["mte", t[0], t[1]]),
        st.tuples(unknown_vm, st.sampled_from(["none", "sync", "async", "asymm"])).map(
            lambda t: ["tcf", t[0], t[1]]),
        st.tuples(st.sampled_from(EXISTING), any_text.filter(lambda s: s not in ("none", "sync", "async", "asymm"))
                  ).map(lambda t: ["tcf", t[0], t[1]]),
        st.tuples(st.integers(min_value=2) | st.integers(max_value=-1)).map(
            lambda t: ["tcf", RUNNING, "sync", f"--vcpu={t[0]}"]),
        st.tuples(unknown_vm, st.sampled_from(["sim-mte", "sim-nomte", "local"])).map(
            lambda t: ["migrate", t[0], "--to", t[1]]),
        st.tuples(st.sampled_from([RUNNING, STOPPED]), unknown_host).map(lambda t: ["migrate", t[0], "--to", t[1]]),
        st.just(["migrate", STOPPED, "--to", "sim-mte"]),
        st.just(["migrate", RUNNING]),                                            # --to is required
        unknown_host.map(lambda h: ["probe", "--host", h]),
        st.sampled_from(["show", "start", "stop", "delete", "mte", "tcf", "counters", "migrate"]).map(lambda c: [c]),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.filter_too_much])
@given(argv=st.one_of(create_argv(), vm_command_argv()), as_json=st.booleans())
def test_bad_input_through_the_cli_is_one_clear_error_and_changes_nothing(daemon, argv, as_json):
    run, paths, _ = daemon
    before = store_rows(paths)
    r = run(*argv, *(["--json"] if as_json else []))
    assert r.returncode in (1, 2), (argv, r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", (argv, r.stdout)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtevm: error: ") and len(lines[0]) > len("mtevm: error: "), \
        (argv, r.stderr)
    assert store_rows(paths) == before, argv


def test_a_listing_cut_short_by_its_reader_exits_quietly(daemon):
    """``mtevm show wide --json | head -c 100``, with a real pipe made small so the output cannot fit."""
    _, _, env = daemon
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "show", "wide", "--json"], env=env,
                            stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(write_end)
    head = b""
    while len(head) < 100:
        chunk = os.read(read_end, 100 - len(head))
        if not chunk:
            break
        head += chunk
    os.close(read_end)                       # what `head -c 100` does once it has its bytes
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert head.startswith(b"{") and len(head) == 100
    assert err == b"", err.decode()
    assert proc.returncode == 141

    # The same command with a reader that takes everything: whole, valid JSON with all 64 vCPUs.
    r = subprocess.run([sys.executable, "-m", "backend.cli", "show", "wide", "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(json.loads(r.stdout)["vcpus"]) == 64
