"""The daemon's persistent state: VM definitions, pending changes, runtime info, migration history.

SQLite (stdlib) in the state dir, WAL + synchronous=FULL and one transaction per change, so a
definition the user was told about survives ``kill -9`` of the daemon at any moment.

A store that is corrupted or was written by a newer mtevm is never "repaired": it is checked
read-only first and refused with a StoreError naming the file, which stays byte-for-byte as it was.
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from backend.errors import StoreError, StoreWriteError

SCHEMA_VERSION = 5
SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE vms (
    name       TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    config     TEXT NOT NULL,            -- VirtMachineConfig.to_dict() as JSON
    workload   TEXT NOT NULL,            -- WorkloadConfig.to_dict() as JSON
    state      TEXT NOT NULL DEFAULT 'stopped',
    last_error TEXT,
    created    REAL NOT NULL,
    qemu_args  TEXT NOT NULL DEFAULT '[]', -- extra QEMU arguments (local host), a JSON list
    guest      TEXT NOT NULL DEFAULT '{}', -- what a local VM boots: GuestConfig.to_dict() ({} = builtin)
    allow_host_files INTEGER NOT NULL DEFAULT 0 -- may qemu_args name host files (--allow-host-files)
);
CREATE TABLE pending (                   -- changes to apply at the next start, e.g. {"mte": true}
    vm    TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (vm, key)
);
CREATE TABLE runtime (                   -- what a later daemon needs to reattach a VM that outlived it
    vm   TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
    info TEXT NOT NULL
);
CREATE TABLE migrations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    vm        TEXT NOT NULL,
    src       TEXT NOT NULL,
    dst       TEXT NOT NULL,
    with_tags INTEGER NOT NULL,
    state     TEXT NOT NULL,
    reason    TEXT,
    progress  REAL NOT NULL DEFAULT 0,
    started   REAL NOT NULL,
    finished  REAL,
    stats     TEXT NOT NULL DEFAULT '{}'
);
"""
# Hosts the user added (libvirt, by URI); the built-in ones are not stored. New in version 3.
_HOSTS_TABLE = "CREATE TABLE hosts (name TEXT PRIMARY KEY, kind TEXT NOT NULL, uri TEXT NOT NULL, created REAL NOT NULL)"
_SCHEMA += _HOSTS_TABLE + ";\n"
_TABLES = {"vms", "pending", "runtime", "migrations"}   # in every version (hosts: from 3)
# How to bring a store of version N-1 to N, applied in order in one transaction when it is opened.
# (Version 1 stores, written before qemu_args existed, still open: their VMs get no extra arguments.)
_UPGRADES = {
    2: ["ALTER TABLE vms ADD COLUMN qemu_args TEXT NOT NULL DEFAULT '[]'"],
    3: [_HOSTS_TABLE],
    # Version 3 stores, written before Linux guests existed: their VMs boot the builtin guest.
    4: ["ALTER TABLE vms ADD COLUMN guest TEXT NOT NULL DEFAULT '{}'"],
    # Version 4 stores: no VM opted in to host files in its qemu_args.
    5: ["ALTER TABLE vms ADD COLUMN allow_host_files INTEGER NOT NULL DEFAULT 0"],
}


@dataclass
class VmRow:
    """One stored VM definition (config and workload as plain dicts)."""

    name: str
    host: str
    config: dict
    workload: dict
    state: str = "stopped"
    last_error: str | None = None
    created: float = 0.0
    pending: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    qemu_args: list = field(default_factory=list)
    guest: dict = field(default_factory=dict)
    allow_host_files: bool = False     # qemu_args may name host files (the user opted in)


def check_writable(path: str) -> None:
    """Refuse, before SQLite maps anything, a store mtevm could not write: one on a read-only file
    system, or whose file or -wal/-shm sidecar cannot be opened for writing (immutable, not ours).
    SQLite would open such a store read-only and fail at the first change (or, with an unwritable
    -shm it maps read-only, worse); the daemon instead says at start-up what to fix."""
    directory = os.path.dirname(path) or "."
    try:
        readonly = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError as e:
        raise StoreError(f"cannot use the mtevm state directory {directory}: {e.strerror}") from None
    if readonly:
        raise StoreError(f"the mtevm store {path} is on a read-only file system: mtevm must write it; "
                         "remount it read-write or choose another --state-dir / MTEVM_STATE_DIR")
    for name in (path, path + "-wal", path + "-shm"):
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as e:
            hint = " (immutable? see lsattr; chattr -i)" if e.errno == errno.EPERM else ""
            raise StoreError(f"the mtevm store file {name} cannot be written: {e.strerror}{hint}; "
                             "the store was left untouched") from None
        os.close(fd)


def _check_existing(path: str) -> None:
    """Read-only checks of an existing store; raise StoreError and touch nothing if it is not usable."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise StoreError(f"cannot read the mtevm store {path}: {e.strerror}") from None
    if head == b"":
        return  # an empty file is an empty database (SQLite's own rule): nothing to lose
    if head != SQLITE_MAGIC:
        raise StoreError(f"the mtevm store {path} is not an SQLite database (corrupted?); "
                         "it was left untouched: move it away to start with an empty store")
    try:
        # immutable=1: SQLite creates no -wal/-shm files and takes no locks, so nothing on disk changes.
        # It is only safe when no writer is active, which holds here: we run before opening read-write,
        # and a daemon on the same store would hold the pid lock. With a -wal file present we must let
        # SQLite read it, so fall back to mode=ro (which may create a -shm index but never writes the db).
        has_wal = os.path.exists(path + "-wal") and os.path.getsize(path + "-wal") > 0
        uri = f"file:{path}?mode=ro" if has_wal else f"file:{path}?immutable=1"
        conn = sqlite3.connect(uri, uri=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"the mtevm store {path} has schema version {version}, newer than this "
                                 f"mtevm understands ({SCHEMA_VERSION}): upgrade mtevm; the file was left untouched")
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StoreError(f"the mtevm store {path} is corrupted ({'; '.join(problems[:3])}); "
                                 "it was left untouched: move it away to start with an empty store")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version >= 1 and not _TABLES <= tables:
                raise StoreError(f"the mtevm store {path} lacks tables {sorted(_TABLES - tables)} "
                                 "(corrupted?); it was left untouched")
            if version == 0 and tables - {"sqlite_sequence"}:
                raise StoreError(f"{path} is an SQLite database but not an mtevm store "
                                 f"(tables: {', '.join(sorted(tables))}); it was left untouched")
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"the mtevm store {path} is corrupted ({e}); "
                         "it was left untouched: move it away to start with an empty store") from None


def _write_definition(db: sqlite3.Connection, name: str, *, host: str | None = None, config: dict | None = None,
                      workload: dict | None = None, qemu_args: list | None = None,
                      pending: dict | None = None, allow_host_files: bool | None = None) -> None:
    """The given parts of a VM's definition (None: unchanged), inside the caller's transaction."""
    if allow_host_files is not None:
        db.execute("UPDATE vms SET allow_host_files=? WHERE name=?", (int(allow_host_files), name))
    if host is not None:
        db.execute("UPDATE vms SET host=? WHERE name=?", (host, name))
    for column, value in (("config", config), ("workload", workload), ("qemu_args", qemu_args)):
        if value is not None:
            db.execute(f"UPDATE vms SET {column}=? WHERE name=?", (json.dumps(value), name))
    if pending is not None:
        _replace_pending(db, name, pending)


def _replace_pending(db: sqlite3.Connection, name: str, pending: dict) -> None:
    db.execute("DELETE FROM pending WHERE vm=?", (name,))
    db.executemany("INSERT INTO pending (vm, key, value) VALUES (?, ?, ?)",
                   [(name, k, json.dumps(v)) for k, v in pending.items()])


class Store:
    """All reads and writes of the state database. Each mutating method is one transaction."""

    def __init__(self, path: str):
        self.path = path
        check_writable(path)
        if os.path.exists(path):
            _check_existing(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            with self._tx():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    self._create_schema()
                elif version < SCHEMA_VERSION:
                    self._upgrade(version)
        except (sqlite3.Error, StoreWriteError) as e:
            raise StoreError(f"cannot open the mtevm store {path}: {getattr(e, 'reason', e)}") from None

    def _create_schema(self) -> None:
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                self._db.execute(stmt)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _upgrade(self, version: int) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in _UPGRADES[target]:
                self._db.execute(stmt)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction; rolled back entirely if anything in it fails (COMMIT included).

        A write SQLite refuses (disk full, read-only file system, I/O error) raises StoreWriteError
        with the reason: the caller changes its memory only after this returns (write-then-apply),
        so the user is told the truth, "nothing changed"."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass   # SQLite rolls back itself when it cannot
                raise
        except sqlite3.OperationalError as e:   # the disk, not the data (IntegrityError is a bug: raised)
            raise StoreWriteError.because(e) from None

    def close(self) -> None:
        self._db.close()

    # -- VM definitions ---------------------------------------------------------------------------
    def load_vms(self) -> list[VmRow]:
        rows = {}
        for name, host, config, workload, state, last_error, created, qemu_args, guest, host_files in self._db.execute(
                "SELECT name, host, config, workload, state, last_error, created, qemu_args, guest, allow_host_files "
                "FROM vms ORDER BY created, name"):
            rows[name] = VmRow(name, host, json.loads(config), json.loads(workload), state, last_error, created,
                               qemu_args=json.loads(qemu_args), guest=json.loads(guest),
                               allow_host_files=bool(host_files))
        for vm, key, value in self._db.execute("SELECT vm, key, value FROM pending"):
            rows[vm].pending[key] = json.loads(value)
        for vm, info in self._db.execute("SELECT vm, info FROM runtime"):
            rows[vm].runtime = json.loads(info)
        return list(rows.values())

    def add_vm(self, row: VmRow) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO vms (name, host, config, workload, state, last_error, created, qemu_args, guest, "
                       "allow_host_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (row.name, row.host, json.dumps(row.config), json.dumps(row.workload),
                        row.state, row.last_error, row.created or time.time(), json.dumps(row.qemu_args),
                        json.dumps(row.guest), int(row.allow_host_files)))

    def update_vm(self, name: str, **definition) -> None:
        """Change a definition (host=, config=, workload=, qemu_args=, allow_host_files=, and pending= which replaces the
        pending changes; each when given) in one transaction."""
        with self._tx() as db:
            _write_definition(db, name, **definition)

    def set_state(self, name: str, state: str, last_error: str | None = None,
                  runtime: dict | None = None, **definition) -> None:
        """Record a state change; ``runtime`` (reattach info) is replaced, {} clears it. The
        ``definition`` keys of update_vm change in the same transaction (a start applies pending
        changes; a migration moves the VM)."""
        with self._tx() as db:
            db.execute("UPDATE vms SET state=?, last_error=? WHERE name=?", (state, last_error, name))
            _write_definition(db, name, **definition)
            if runtime is not None:
                db.execute("DELETE FROM runtime WHERE vm=?", (name,))
                if runtime:
                    db.execute("INSERT INTO runtime (vm, info) VALUES (?, ?)", (name, json.dumps(runtime)))

    def delete_vm(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE name=?", (name,))

    # -- hosts the user added ---------------------------------------------------------------------
    def load_hosts(self) -> list[dict]:
        """[{"name", "kind", "uri"}] in the order they were added."""
        return [{"name": n, "kind": k, "uri": u} for n, k, u in
                self._db.execute("SELECT name, kind, uri FROM hosts ORDER BY created, name")]

    def add_host(self, name: str, kind: str, uri: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO hosts (name, kind, uri, created) VALUES (?, ?, ?, ?)", (name, kind, uri, time.time()))

    def delete_host(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM hosts WHERE name=?", (name,))

    # -- migration history ------------------------------------------------------------------------
    def add_migration(self, m: dict) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO migrations (vm, src, dst, with_tags, state, reason, progress, started, finished, stats) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (m["vm"], m["src"], m["dst"], int(m["with_tags"]), m["state"], m["reason"], m["progress"],
                 m["started"], m["finished"], json.dumps(m["stats"])))
            return cur.lastrowid

    def update_migration(self, m: dict) -> None:
        with self._tx() as db:
            db.execute("UPDATE migrations SET state=?, reason=?, progress=?, finished=?, stats=? WHERE id=?",
                       (m["state"], m["reason"], m["progress"], m["finished"], json.dumps(m["stats"]), m["id"]))

    def load_migrations(self) -> list[dict]:
        """Newest first."""
        out = []
        for (mid, vm, src, dst, with_tags, state, reason, progress, started, finished, stats) in self._db.execute(
                "SELECT id, vm, src, dst, with_tags, state, reason, progress, started, finished, stats "
                "FROM migrations ORDER BY id DESC"):
            out.append({"id": mid, "vm": vm, "src": src, "dst": dst, "with_tags": bool(with_tags),
                        "state": state, "reason": reason, "progress": progress, "started": started,
                        "finished": finished, "stats": json.loads(stats)})
        return out
