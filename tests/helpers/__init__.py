"""Test helpers that start real outside programs (sshd, tmux, mtevm) and stop them by PID."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def mtevm_executable() -> str:
    """This checkout's `mtevm` console script (pip -e installs it next to the interpreter)."""
    beside = Path(sys.executable).with_name("mtevm")
    found = str(beside) if beside.exists() else shutil.which("mtevm")
    assert found, "the mtevm console script is not installed: pip install -e ."
    return found
