"""Fixtures of the control-plane tests (a real daemon through the real CLI)."""
from __future__ import annotations

import json

import pytest


@pytest.fixture
def mtevm(run_mtevm):
    """Run a command that must succeed; parse its --json output."""
    def ok(*args: str):
        r = run_mtevm(*args, "--json")
        assert r.returncode == 0, f"mtevm {' '.join(args)}: {r.stderr}"
        return json.loads(r.stdout)
    return ok
