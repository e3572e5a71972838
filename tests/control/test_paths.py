"""Where mtevm keeps its files: XDG defaults, the /tmp fallback, overrides, private directories."""
from __future__ import annotations

import os
import stat

import pytest

from backend.errors import ConfigError
from backend.paths import Paths


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
