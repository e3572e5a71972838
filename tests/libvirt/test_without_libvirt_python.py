"""Without libvirt-python, the libvirt host kind says what to install and the rest of mtevm works.

The CLI runs with a ``libvirt`` module on its path that fails to import, exactly what Python does
when the package is not installed (the real libvirt-python stays installed for the other tests).
"""
from __future__ import annotations

import json

from backend.hosts.libvirt import INSTALL_HINT
from backend.paths import Paths
from backend.store import Store


def _without_libvirt(tmp_path) -> dict:
    shadow = tmp_path / "no-libvirt"
    shadow.mkdir()
    for module in ("libvirt", "libvirt_qemu", "libvirtaio"):
        (shadow / f"{module}.py").write_text(f"raise ImportError(\"No module named '{module}'\")\n")
    return {"PYTHONPATH": str(shadow)}


def test_host_add_says_what_to_install_and_stores_nothing(tmp_path, run_mtevm):
    env = _without_libvirt(tmp_path)
    r = run_mtevm("--no-daemon", "host", "add", "lab", "qemu:///system", env=env)
    assert r.returncode == 1 and INSTALL_HINT in r.stderr, r.stderr
    r = run_mtevm("--no-daemon", "hosts", "--json", env=env)
    assert r.returncode == 0 and "lab" not in [h["name"] for h in json.loads(r.stdout)]


def test_a_stored_libvirt_host_shows_why_and_other_hosts_work(tmp_path, mtevm_paths: Paths, run_mtevm):
    env = _without_libvirt(tmp_path)
    mtevm_paths.ensure_state_dir()
    store = Store(mtevm_paths.store)
    store.add_host("lab", "libvirt", "qemu:///system")   # added earlier, by an mtevm with libvirt-python
    store.close()
    r = run_mtevm("--no-daemon", "hosts", "--json", env=env)
    assert r.returncode == 0, r.stderr
    lab = next(h for h in json.loads(r.stdout) if h["name"] == "lab")
    assert lab["kind"] == "libvirt" and not lab["available"] and lab["reason"] == INSTALL_HINT
    r = run_mtevm("--no-daemon", "create", "s1", env=env)
    assert r.returncode == 0, r.stderr
    r = run_mtevm("--no-daemon", "create", "v1", "--host", "lab", env=env)
    assert r.returncode == 1 and INSTALL_HINT in r.stderr, r.stderr
