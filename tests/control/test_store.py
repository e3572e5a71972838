"""The SQLite store: round trips, durability under kill -9, and refusing bad files without touching them."""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from backend.errors import StoreError
from backend.store import _HOSTS_TABLE, SCHEMA_VERSION, Store, VmRow


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def sidecars(path) -> list[str]:
    return [p for p in (str(path) + "-wal", str(path) + "-shm", str(path) + "-journal") if os.path.exists(p)]


def test_definitions_pending_runtime_and_migrations_round_trip(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = Store(str(path))
    s.add_vm(VmRow("a", "sim-mte", {"name": "a", "vcpus": 2}, {"seed": 3}))
    s.add_vm(VmRow("b", "local", {"name": "b"}, {}))
    s.update_vm("a", pending={"mte": False})
    s.set_state("b", "running", runtime={"pid": 42})
    mid = s.add_migration({"vm": "a", "src": "sim-mte", "dst": "sim-nomte", "with_tags": True, "state": "blocked",
                           "reason": "Live migration disabled due to MTE enabled", "progress": 0.0,
                           "started": 1.0, "finished": 1.0, "stats": {}})
    s.close()

    s = Store(str(path))
    vms = {r.name: r for r in s.load_vms()}
    assert vms["a"].config == {"name": "a", "vcpus": 2} and vms["a"].workload == {"seed": 3}
    assert vms["a"].pending == {"mte": False} and vms["a"].state == "stopped"
    assert vms["b"].state == "running" and vms["b"].runtime == {"pid": 42}
    [m] = s.load_migrations()
    assert m["id"] == mid and m["with_tags"] is True and m["reason"] == "Live migration disabled due to MTE enabled"
    s.delete_vm("a")
    assert [r.name for r in s.load_vms()] == ["b"]
    # deleting a VM takes its pending changes with it (a new VM of that name starts clean)
    s.add_vm(VmRow("a", "sim-mte", {"name": "a"}, {}))
    assert {r.name: r.pending for r in s.load_vms()}["a"] == {}
    s.close()


def test_store_is_wal_with_full_sync_and_versioned(tmp_path):
    path = tmp_path / "s.sqlite3"
    Store(str(path)).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_failed_change_leaves_nothing_behind(tmp_path):
    s = Store(str(tmp_path / "s.sqlite3"))
    s.add_vm(VmRow("a", "sim-mte", {"name": "a"}, {}))
    with pytest.raises(sqlite3.IntegrityError):
        s.add_vm(VmRow("a", "local", {"name": "a", "other": 1}, {}))
    with pytest.raises(sqlite3.IntegrityError):  # pending of an unknown VM: the whole change is rolled back
        s.update_vm("nosuch", host="x", pending={"mte": True})
    [row] = s.load_vms()
    assert row.host == "sim-mte" and row.config == {"name": "a"}
    s.close()


@pytest.mark.parametrize("content", [
    b"this is not a database at all\n" * 10,
    b"SQLite format 3\x00" + b"\xff" * 4080,
])
def test_corrupted_store_is_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(content)
    with pytest.raises(StoreError) as e:
        Store(str(path))
    assert str(path) in str(e.value) and "untouched" in str(e.value)
    assert path.read_bytes() == content
    assert sidecars(path) == []


def test_store_with_a_damaged_page_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = Store(str(path))
    for i in range(200):
        s.add_vm(VmRow(f"vm{i}", "sim-mte", {"name": f"vm{i}", "pad": "x" * 200}, {}))
    s.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 5 * 4096
    data[3 * 4096:3 * 4096 + 200] = b"\x42" * 200  # scribble over a b-tree page
    path.write_bytes(bytes(data))
    before = digest(path)
    with pytest.raises(StoreError, match="corrupted"):
        Store(str(path))
    assert digest(path) == before


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "s.sqlite3"
    Store(str(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    before = digest(path)
    with pytest.raises(StoreError) as e:
        Store(str(path))
    assert "newer" in str(e.value) and str(path) in str(e.value)
    assert digest(path) == before and sidecars(path) == []


def test_someone_elses_database_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.commit()
    db.close()
    before = digest(path)
    with pytest.raises(StoreError, match="not an mtevm store"):
        Store(str(path))
    assert digest(path) == before


WRITER = """
import sys
from backend.store import Store, VmRow
s = Store(sys.argv[1])
i = 0
while True:
    s.add_vm(VmRow(f"vm{i}", "sim-mte", {"name": f"vm{i}"}, {}))
    print(f"vm{i}", flush=True)   # only after add_vm returned: the user has been told
    i += 1
"""


def test_every_acknowledged_definition_survives_kill_9(tmp_path):
    path = tmp_path / "s.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = [proc.stdout.readline().strip() for _ in range(40)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = Store(str(path))
    names = {r.name for r in s.load_vms()}
    s.close()
    assert set(acknowledged) <= names


# The vms table as mtevm wrote it with schema version 1 (before qemu_args), verbatim.
_V1_SCHEMA = """
CREATE TABLE vms (name TEXT PRIMARY KEY, host TEXT NOT NULL, config TEXT NOT NULL, workload TEXT NOT NULL,
                  state TEXT NOT NULL DEFAULT 'stopped', last_error TEXT, created REAL NOT NULL);
CREATE TABLE pending (vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE, key TEXT NOT NULL,
                      value TEXT NOT NULL, PRIMARY KEY (vm, key));
CREATE TABLE runtime (vm TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE, info TEXT NOT NULL);
CREATE TABLE migrations (id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, src TEXT NOT NULL,
                         dst TEXT NOT NULL, with_tags INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT,
                         progress REAL NOT NULL DEFAULT 0, started REAL NOT NULL, finished REAL,
                         stats TEXT NOT NULL DEFAULT '{}');
PRAGMA user_version=1;
"""


def test_a_version_1_store_opens_and_is_upgraded_keeping_everything(tmp_path):
    """A store written before qemu_args existed: its VMs, pending changes and history are kept and
    its VMs get no extra QEMU arguments; new VMs can carry them."""
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.execute("INSERT INTO vms VALUES ('old', 'sim-mte', '{\"name\": \"old\"}', '{}', 'stopped', NULL, 1.0)")
    db.execute("INSERT INTO pending VALUES ('old', 'mte', 'false')")
    db.execute("INSERT INTO migrations (vm, src, dst, with_tags, state, reason, started) "
               "VALUES ('old', 'sim-mte', 'sim-nomte', 0, 'blocked', 'why', 2.0)")
    db.commit()
    db.close()
    s = Store(str(path))
    [old] = s.load_vms()
    assert (old.name, old.config, old.pending, old.qemu_args) == ("old", {"name": "old"}, {"mte": False}, [])
    assert old.allow_host_files is False          # older VMs never opted in to host files
    assert [m["reason"] for m in s.load_migrations()] == ["why"]
    s.add_vm(VmRow("new", "local", {"name": "new"}, {}, qemu_args=["-device", "ivshmem-plain,memdev=shm"],
                   allow_host_files=True))
    s.close()
    s = Store(str(path))
    assert {r.name: r.qemu_args for r in s.load_vms()} == {"old": [], "new": ["-device", "ivshmem-plain,memdev=shm"]}
    assert {r.name: r.allow_host_files for r in s.load_vms()} == {"old": False, "new": True}
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    db.close()


def test_added_hosts_persist_and_an_upgraded_store_starts_with_none(tmp_path):
    """`mtevm host add` rows survive a reopen; a store from before hosts existed (version 1 or 2)
    gains the table, empty, and keeps everything else."""
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.execute("INSERT INTO vms VALUES ('old', 'sim-mte', '{\"name\": \"old\"}', '{}', 'stopped', NULL, 1.0)")
    db.commit()
    db.close()
    s = Store(str(path))
    assert s.load_hosts() == [] and [r.name for r in s.load_vms()] == ["old"]
    s.add_host("lab1", "libvirt", "qemu+ssh://root@lab1/system")
    s.add_host("lab2", "libvirt", "qemu:///system")
    s.close()
    s = Store(str(path))
    assert s.load_hosts() == [{"name": "lab1", "kind": "libvirt", "uri": "qemu+ssh://root@lab1/system"},
                              {"name": "lab2", "kind": "libvirt", "uri": "qemu:///system"}]
    with pytest.raises(sqlite3.IntegrityError):
        s.add_host("lab1", "libvirt", "qemu:///session")
    s.delete_host("lab1")
    s.close()
    s = Store(str(path))
    assert [h["name"] for h in s.load_hosts()] == ["lab2"]
    s.close()


def test_a_version_3_store_gets_guests_and_its_vms_boot_the_builtin_one(tmp_path):
    """A store written before Linux guests existed (schema 3): its VMs load with the builtin guest
    ({}), and a Linux guest's definition is kept across a reopen."""
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA.replace("PRAGMA user_version=1;", ""))
    db.execute("ALTER TABLE vms ADD COLUMN qemu_args TEXT NOT NULL DEFAULT '[]'")
    db.execute(_HOSTS_TABLE)
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO vms VALUES ('old', 'local', '{\"name\": \"old\"}', '{}', 'stopped', NULL, 1.0, '[]')")
    db.commit()
    db.close()
    s = Store(str(path))
    s.add_vm(VmRow("lx", "local", {"name": "lx"}, {}, guest={"kind": "linux", "append": "loglevel=7"}))
    s.close()
    s = Store(str(path))
    assert {r.name: r.guest for r in s.load_vms()} == {"old": {}, "lx": {"kind": "linux", "append": "loglevel=7"}}
    s.close()
