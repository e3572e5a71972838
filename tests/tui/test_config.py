"""The user's config.toml: refresh rate and key remapping; a broken file is a clear error."""
from __future__ import annotations

import pytest

from backend.config import DEFAULT_REFRESH_RATE, load_config
from backend.errors import ConfigError
from tui import keymap
from tui.app import parse_args, run_app, wants_16_colours


def write(tmp_path, text: str):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_missing_file_means_defaults(tmp_path):
    cfg = load_config(tmp_path / "nope.toml")
    assert cfg.refresh_rate == DEFAULT_REFRESH_RATE and cfg.keymap == {} and cfg.path is None


def test_reads_rate_and_keymap(tmp_path):
    cfg = load_config(write(tmp_path, 'refresh_rate = 10\n[keymap]\nvm_start = "S"\nvm_stop = " X,ctrl+x "\n'))
    assert cfg.refresh_rate == 10.0
    assert cfg.keymap == {"vm_start": "S", "vm_stop": "X,ctrl+x"}


def test_environment_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MTEVM_CONFIG", str(write(tmp_path, "refresh_rate = 2\n")))
    assert load_config().refresh_rate == 2.0


@pytest.mark.parametrize("text, words", [
    ("refresh_rate = \n", "not valid TOML"),
    ("refresh_rate = 0\n", "outside 0.5..30"),
    ("refresh_rate = 'fast'\n", "not a number"),
    ("refresh = 4\n", "unknown setting(s) refresh"),
    ("keymap = 3\n", "[keymap] must be a table"),
    ("[keymap]\nvm_start = 5\n", "keymap.vm_start must be a key string"),
])
def test_broken_config_is_a_clear_error_and_is_kept(tmp_path, text, words):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert words in str(e.value) and str(p) in str(e.value)
    assert p.read_text() == text        # never rewritten


def test_not_utf8(tmp_path):
    p = tmp_path / "config.toml"
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_unknown_binding_id_is_rejected_with_the_known_ids():
    with pytest.raises(ConfigError) as e:
        keymap.check_keymap({"vm_strat": "S"})
    assert "vm_strat" in str(e.value) and "vm_start" in str(e.value)


def test_every_binding_has_a_unique_id():
    ids = [spec.id for spec in keymap.ALL_KEYS]
    assert len(ids) == len(set(ids))
    assert all(b.id for b in keymap.bindings(keymap.APP_KEYS, keymap.VM_KEYS, keymap.LIST_KEYS))


def test_issue_keys_are_the_defaults():
    want = {"app_help": "?", "vm_filter": "/", "app_quit": "q", "vm_open": "enter", "back": "esc",
            "vm_new": "n", "vm_start": "s", "vm_stop": "x", "vm_delete": "d", "vm_toggle_mte": "m",
            "vm_migrate": "g", "app_hosts": "h", "app_migrations": "M", "vm_select": "space",
            "app_commands": "ctrl+p, :"}
    specs = {spec.id: spec for spec in keymap.ALL_KEYS}
    assert {i: keymap.display_key(specs[i], {}) for i in want} == want


def test_run_app_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    p = write(tmp_path, "[keymap]\nnot_a_binding = 'z'\n")
    assert run_app(["--config", str(p)]) == 2
    assert "not_a_binding" in capsys.readouterr().err


def test_run_app_rejects_a_bad_rate(tmp_path, capsys):
    assert run_app(["--config", str(tmp_path / "none.toml"), "--rate", "100"]) == 2
    assert "--rate" in capsys.readouterr().err


def test_keys_lists_remapped_keys(tmp_path, capsys):
    p = write(tmp_path, "[keymap]\nvm_start = 'S'\n")
    assert run_app(["--config", str(p), "--keys"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("vm_start"))
    assert line.split()[1] == "S"


def test_sixteen_colours_detected_from_term():
    assert wants_16_colours({"TERM": "linux"})
    assert wants_16_colours({"TERM": "xterm-16color"})
    assert not wants_16_colours({"TERM": "xterm-256color"})
    assert parse_args(["--colors", "16"]).colors == "16"
