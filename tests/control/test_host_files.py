"""The host-files opt-in (issue 11, item 3) through every way a definition changes: create, edit,
clone, and a daemon restart."""
from __future__ import annotations

import pytest

from backend.errors import ConfigError

LOADER = ["-device", "loader,file=/etc/hostname,addr=0x48000000,force-raw=on"]


async def test_edit_and_clone_keep_the_opt_in_and_check_against_it(inproc_client):
    c = inproc_client
    await c.create({"name": "q", "host": "local", "vcpus": 1, "memory": "128M"})
    with pytest.raises(ConfigError, match=r"file=/etc/hostname \(a host file\).*--allow-host-files"):
        await c.edit("q", {"qemu_args": LOADER})
    vm = await c.edit("q", {"qemu_args": LOADER, "allow_host_files": True})
    assert (vm["qemu_args"], vm["allow_host_files"]) == (LOADER, True)
    clone = await c.clone("q", "q2")
    assert (clone["qemu_args"], clone["allow_host_files"]) == (LOADER, True)     # the clone can start as well
    with pytest.raises(ConfigError, match="--allow-host-files"):                 # withdrawn while still used
        await c.edit("q", {"allow_host_files": False})
    assert (await c.show("q"))["allow_host_files"] is True                       # refused: nothing changed
    vm = await c.edit("q", {"qemu_args": [], "allow_host_files": False})
    assert (vm["qemu_args"], vm["allow_host_files"]) == ([], False)
    with pytest.raises(ConfigError, match="allow_host_files must be true or false"):
        await c.edit("q", {"allow_host_files": "yes"})


def test_the_cli_edits_the_opt_in_and_it_survives_a_restart(run_mtevm):
    import json
    assert run_mtevm("create", "q", "--host", "local", "--vcpus", "1", "--memory", "128M").returncode == 0
    r = run_mtevm("edit", "q", "--qemu-arg=" + " ".join(LOADER), "--allow-host-files", "--json")
    assert r.returncode == 0, r.stderr
    assert run_mtevm("daemon", "stop").returncode == 0
    shown = json.loads(run_mtevm("show", "q", "--json").stdout)
    assert (shown["qemu_args"], shown["allow_host_files"]) == (LOADER, True)
