"""What `mtevm --help` and `--version` promise, and counts in the user's grammar (issue 11, item 15)."""
from __future__ import annotations

import re
from importlib.metadata import version


def test_version(run_mtevm):
    for args in (("--version",), ("--no-daemon", "--version")):
        r = run_mtevm(*args)
        assert (r.returncode, r.stdout.strip(), r.stderr) == (0, f"mtevm {version('mtevm')}", "")


def test_help_lists_every_option_the_app_takes(run_mtevm):
    from tui.app import parse_args
    r = run_mtevm("--help")
    assert r.returncode == 0
    listed = set(re.findall(r"(?m)^\s+(--[a-z-]+)", r.stdout))
    assert {"--keys", "--rate", "--config", "--colors", "--timeout", "--version"} <= listed
    # every option of the app's own parser is in the one help text users read
    import argparse
    import contextlib
    import io
    app_help = io.StringIO()
    with contextlib.redirect_stdout(app_help), contextlib.suppress(SystemExit):
        parse_args(["--help"])
    app_options = set(re.findall(r"(?m)^\s+(--[a-z-]+)", app_help.getvalue()))
    assert app_options - listed == set(), app_options - listed
    assert isinstance(parse_args(["--keys", "--rate", "2", "--colors", "16"]), argparse.Namespace)


def test_an_app_option_with_a_command_is_one_clear_error(run_mtevm):
    r = run_mtevm("--rate", "3", "list")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith("mtevm: error: --rate is an option of the app (mtevm without a command), "
                                       "not of 'list'")


def test_counts_are_singular_for_one(run_mtevm):
    r = run_mtevm("--no-daemon", "create", "solo", "--vcpus", "1")
    assert r.returncode == 0, r.stderr
    assert "1 vCPU," in r.stdout and "1 vCPUs" not in r.stdout
    shown = run_mtevm("--no-daemon", "show", "solo").stdout
    assert "1 vCPU," in shown and "1 vCPUs" not in shown
    r = run_mtevm("--no-daemon", "create", "duo", "--vcpus", "2")
    assert "2 vCPUs," in r.stdout
