"""The app's command-line options, without importing Textual: ``mtevm --help`` (backend/cli.py) lists
them from here, and the app (tui/app.py) parses them from here, so the two lists cannot differ."""
from __future__ import annotations

import argparse


def version_text() -> str:
    """``mtevm 0.1.0`` (the installed package's version)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"mtevm {version('mtevm')}"
    except PackageNotFoundError:        # run from a checkout that was never installed
        return "mtevm (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_text(), help="print the version and exit")


def add_app_options(parser, dest_prefix: str = "") -> list[str]:
    """--rate, --config, --colors, --keys (``dest_prefix`` keeps them apart from a command's own
    options of the same name, e.g. ``counters --rate``); returns their dests."""
    d = dest_prefix
    parser.add_argument("--rate", dest=f"{d}rate", type=float, default=None, metavar="HZ",
                        help="live counter refreshes per second (default: config refresh_rate, else 4)")
    parser.add_argument("--config", dest=f"{d}config", default=None, metavar="FILE",
                        help="config.toml to read (default: the user config, or $MTEVM_CONFIG)")
    parser.add_argument("--colors", dest=f"{d}colors", choices=["auto", "16", "full"], default=None,
                        help="16: ANSI colours only (automatic for TERM=linux); default auto")
    parser.add_argument("--keys", dest=f"{d}keys", action="store_true", default=None,
                        help="print every key binding's id and key (for [keymap] in config.toml), then exit")
    return [f"{d}{name}" for name in ("rate", "config", "colors", "keys")]
