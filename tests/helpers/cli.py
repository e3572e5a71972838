"""Reading the real CLI's answers in tests: ``--json`` output of a command that must succeed, and
the one error line of a command that must fail."""
from __future__ import annotations

import json


def ok(run_mtevm, *args: str):
    r = run_mtevm(*args, "--json")
    assert r.returncode == 0, f"mtevm {' '.join(args)}: {r.stderr}"
    return json.loads(r.stdout)


def error_of(r) -> str:
    """The one error line of a failed command (stdout stays empty)."""
    assert r.stdout == "" and r.stderr.startswith("mtevm: error: "), (r.stdout, r.stderr)
    return r.stderr.strip().removeprefix("mtevm: error: ")
