"""The VM definition a front end sends to ``create()``: helpers the command line and the app share.

Here, below both front ends, so the app never imports the command-line module (and the CLI never the
app): ``mtevm create --qemu-arg`` and the app's "QEMU args" field split their text the same way.
"""
from __future__ import annotations

import shlex

from backend.errors import ConfigError


def split_qemu_args(values: list[str]) -> list[str]:
    """The --qemu-arg values (or the form's field), each split with shell rules, as one argument list."""
    out: list[str] = []
    for value in values:
        try:
            out += shlex.split(value)
        except ValueError as e:
            raise ConfigError(f"--qemu-arg {value!r}: {e}") from None
    return out
