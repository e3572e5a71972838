"""The user's own settings: the app's refresh rate and key remappings.

Read from ``config.toml`` in platformdirs' ``user_config_dir("mtevm")`` (``$MTEVM_CONFIG`` names
another file). A missing file means defaults; a broken one is a ConfigError naming the file and
what is wrong, and the file is never rewritten by mtevm. Example::

    refresh_rate = 4          # live counter updates per second (0.5 .. 30)
    timeout = 60              # seconds a command waits for the daemon's answer (1 .. 3600);
                              # $MTEVM_TIMEOUT and `mtevm --timeout` override it

    [keymap]                  # binding id = key(s); the ids are listed by `mtevm --keys`
    vm_start = "S"
    vm_stop = "X,ctrl+x"
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from backend.errors import ConfigError

DEFAULT_REFRESH_RATE = 4.0
MIN_REFRESH_RATE = 0.5
MAX_REFRESH_RATE = 30.0
CONFIG_ENV = "MTEVM_CONFIG"
TIMEOUT_ENV = "MTEVM_TIMEOUT"
# How long a client waits for one answer from the daemon. Starting or stopping a real QEMU takes
# seconds (its QMP start-up limit is 20 s, a stop escalates over 11 s); a stopped or wedged
# daemon must not hold a command for minutes.
DEFAULT_TIMEOUT = 60.0
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 3600.0
_KNOWN_KEYS = {"refresh_rate", "keymap", "timeout"}


def default_config_path() -> Path:
    """Where the user's config lives: ``$MTEVM_CONFIG`` or the platform's config directory."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir("mtevm")) / "config.toml"


def check_refresh_rate(value: object, where: str = "refresh rate") -> float:
    """A refresh rate in Hz within the range the app can honour, or a ConfigError saying why not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {value!r} is not a number of updates per second")
    rate = float(value)
    if not MIN_REFRESH_RATE <= rate <= MAX_REFRESH_RATE:
        raise ConfigError(f"{where}: {value!r} is outside {MIN_REFRESH_RATE:g}..{MAX_REFRESH_RATE:g} updates per second")
    return rate


def check_timeout(value: object, where: str = "timeout") -> float:
    """Seconds to wait for the daemon, within MIN_TIMEOUT..MAX_TIMEOUT, or a ConfigError saying why not."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{where}: {value!r} is not a number of seconds")
    if not MIN_TIMEOUT <= value <= MAX_TIMEOUT:
        raise ConfigError(f"{where}: {value:g} is outside {MIN_TIMEOUT:g}..{MAX_TIMEOUT:g} seconds")
    return float(value)


def resolve_timeout(flag: object = None, config: "UserConfig | None" = None) -> float:
    """The daemon timeout: ``--timeout``, else $MTEVM_TIMEOUT, else the config's ``timeout``, else 60 s."""
    if flag is not None:
        return check_timeout(flag, "--timeout")
    if os.environ.get(TIMEOUT_ENV):
        return check_timeout(os.environ[TIMEOUT_ENV], TIMEOUT_ENV)
    return (config or load_config()).timeout


@dataclass
class UserConfig:
    """Settings the user chose. ``keymap`` maps a binding id to a key string (Textual's syntax)."""

    refresh_rate: float = DEFAULT_REFRESH_RATE
    keymap: dict[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT   # seconds a client waits for one answer from the daemon
    path: Path | None = None       # the file it came from (None: defaults only)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "UserConfig":
        unknown = set(data) - _KNOWN_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(_KNOWN_KEYS))})")
        rate = check_refresh_rate(data.get("refresh_rate", DEFAULT_REFRESH_RATE), f"{where}: refresh_rate")
        keymap = data.get("keymap", {})
        if not isinstance(keymap, dict):
            raise ConfigError(f"{where}: [keymap] must be a table of binding_id = \"key\"")
        for binding_id, keys in keymap.items():
            if not isinstance(keys, str) or not keys.strip():
                raise ConfigError(f"{where}: keymap.{binding_id} must be a key string such as \"ctrl+s\", got {keys!r}")
        timeout = check_timeout(data.get("timeout", DEFAULT_TIMEOUT), f"{where}: timeout")
        return cls(refresh_rate=rate, keymap={k: v.strip() for k, v in keymap.items()}, timeout=timeout)


def load_config(path: str | os.PathLike | None = None) -> UserConfig:
    """Read the user's config (defaults when the file does not exist)."""
    p = Path(path) if path is not None else default_config_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return UserConfig(path=None)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    cfg = UserConfig.from_dict(data, where=str(p))
    cfg.path = p
    return cfg
