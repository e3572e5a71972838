"""Where mtevm keeps its files: XDG defaults, the /tmp fallback, overrides, private directories."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from backend.daemon.main import acquire_pid_lock
from backend.errors import ConfigError
from backend.paths import Paths, open_private_file, private_dir
from tests.conftest import stop_daemon_by_pid
from tests.helpers.sshd import stop_pid


def test_runtime_dir_follows_xdg_and_falls_back_to_tmp(monkeypatch, tmp_path):
    monkeypatch.delenv("MTEVM_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("MTEVM_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    p = Paths.resolve()
    assert p.runtime_dir == str(tmp_path / "xdg" / "mtevm")
    assert p.state_dir == str(tmp_path / "state-home" / "mtevm")
    monkeypatch.delenv("XDG_RUNTIME_DIR")          # root in CI, cron, a bare ssh session
    assert Paths.resolve().runtime_dir == f"/tmp/mtevm-{os.getuid()}"


def test_flags_win_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MTEVM_RUNTIME_DIR", str(tmp_path / "env-run"))
    monkeypatch.setenv("MTEVM_STATE_DIR", str(tmp_path / "env-state"))
    assert Paths.resolve() == Paths(str(tmp_path / "env-run"), str(tmp_path / "env-state"))
    flagged = Paths.resolve(str(tmp_path / "flag-run"), "relative-state")
    assert flagged.runtime_dir == str(tmp_path / "flag-run")
    assert flagged.state_dir == os.path.abspath("relative-state")


def test_directories_are_created_private_and_others_are_refused(tmp_path):
    p = Paths(str(tmp_path / "a" / "run"), str(tmp_path / "a" / "state"))
    p.ensure_runtime_dir()
    p.ensure_state_dir()
    assert stat.S_IMODE(os.stat(p.runtime_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(p.state_dir).st_mode) == 0o700
    os.chmod(p.runtime_dir, 0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        p.ensure_runtime_dir()


def test_a_runtime_dir_too_long_for_a_socket_is_refused_clearly(tmp_path):
    p = Paths(str(tmp_path / ("x" * 120)), str(tmp_path / "state"))
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        p.ensure_runtime_dir()


# --- the runtime dir cannot be redirected (issue 11, item 2) ----------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid (nobody)")
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

# The attacker: flips its symlink between a private dir of the victim's (which passes every check)
# and a dir of its own holding `mtevm.pid -> the victim's file`, atomically (rename over), until killed.
FLIPPER = r"""
import os, sys
link, good, evil, victim = sys.argv[1:5]
os.mkdir(evil, 0o755)
os.symlink(victim, os.path.join(evil, "mtevm.pid"))
tmp = link + ".new"
os.symlink(good, link)
print("ready", flush=True)
while True:
    for target in (evil, good):
        os.symlink(target, tmp)
        os.replace(tmp, link)
"""


@pytest.fixture
def public_tmp():
    """A sticky world-writable directory like /tmp, that both we and `nobody` can use."""
    d = tempfile.mkdtemp(prefix="mtevm-pub-")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_a_flipping_symlink_of_another_user_never_redirects_the_daemon(tmp_path, public_tmp, run_mtevm):
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    good = tmp_path / "private-run"
    good.mkdir(mode=0o700)
    link = os.path.join(public_tmp, "mtevm-0")      # what the /tmp fallback of XDG_RUNTIME_DIR names
    flipper = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c", FLIPPER, link, str(good),
                                os.path.join(public_tmp, "evil"), str(victim)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert flipper.stdout.readline().strip() == "ready", flipper.stderr.read()
        paths = Paths(link, str(tmp_path / "state"))
        for _ in range(300):           # each attempt is refused, whichever way the link points now
            with pytest.raises(ConfigError, match="is a symlink owned by uid 65534 .*not by you or root"):
                paths.ensure_runtime_dir()            # as the daemon starts: the dir, then its pid file
                os.close(acquire_pid_lock(paths))
        # The real daemon, started by a command, says so in one line and writes nothing.
        r = run_mtevm("daemon", env={"MTEVM_RUNTIME_DIR": link})
        assert r.returncode == 2
        assert r.stderr.startswith(f"mtevm: error: runtime directory {link}: {link} is a symlink owned by uid 65534")
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        stop_pid(flipper.pid)
        flipper.wait()
    assert victim.read_text() == "precious\n"
    assert os.listdir(good) == []


def test_a_symlink_of_ours_is_followed_and_the_daemon_lives_in_its_target(tmp_path, run_mtevm):
    real = tmp_path / "real-run"
    link = tmp_path / "run-link"
    os.symlink(real, link)                     # the user's own link (e.g. to a shorter path)
    try:
        r = run_mtevm("daemon", "--json", env={"MTEVM_RUNTIME_DIR": str(link)})
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(real)) == ["mtevm.pid", "mtevm.sock"]
        assert stat.S_IMODE(os.stat(real).st_mode) == 0o700
    finally:
        stop_daemon_by_pid(Paths(str(link), str(tmp_path / "state")))


def test_a_planted_symlink_in_place_of_the_pid_file_is_not_followed(tmp_path):
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    paths = Paths(str(tmp_path / "run"), str(tmp_path / "state"))
    paths.ensure_runtime_dir()
    os.symlink(victim, paths.pid_file)
    with pytest.raises(ConfigError, match=r"mtevm.pid is a symbolic link: refusing to follow it"):
        acquire_pid_lock(paths)
    assert victim.read_text() == "precious\n"


def test_a_directory_others_may_write_on_the_way_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                     # anyone could rename our runtime dir away and replace it
    with pytest.raises(ConfigError, match="writable by other users and not sticky"):
        Paths(str(shared / "run"), str(tmp_path / "state")).ensure_runtime_dir()
    os.chmod(shared, 0o1777)                    # sticky, as /tmp: only the owner may rename an entry
    Paths(str(shared / "run"), str(tmp_path / "state")).ensure_runtime_dir()


def test_private_files_are_created_relative_to_the_checked_directory(tmp_path):
    with private_dir(str(tmp_path / "d")) as d:
        fd = open_private_file(d, "new.log", os.O_WRONLY, exclusive=True)
        os.write(fd, b"x")
        os.close(fd)
        assert stat.S_IMODE(os.stat(tmp_path / "d" / "new.log").st_mode) == 0o600
        with pytest.raises(ConfigError, match="already exists"):
            open_private_file(d, "new.log", os.O_WRONLY, exclusive=True)
        os.mkfifo(tmp_path / "d" / "fifo")          # never blocks, never used
        for flags in (os.O_WRONLY, os.O_RDONLY):
            with pytest.raises(ConfigError, match="not a private regular file"):
                open_private_file(d, "fifo", flags)
        with pytest.raises(FileNotFoundError):
            open_private_file(d, "missing", os.O_RDONLY, create=False)
        with pytest.raises(ValueError):
            open_private_file(d, "../escape")
