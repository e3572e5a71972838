"""Internal snapshots of a VM's qcow2 disks, taken at the same instant as its state file (issue 12).

A snapshot's state file (a migration to a file) holds RAM, devices and the MTE tags, not the disks;
loading it over disks that changed since would hand the guest a file system that disagrees with its
page cache. So, as ``virsh snapshot-create`` does with internal snapshots, each qcow2 disk keeps an
internal snapshot named after the tag, taken with the vCPUs stopped just before the state is written
(one QMP ``transaction`` of ``blockdev-snapshot-internal-sync``: every disk or none). A restore
reverts each disk with ``qemu-img snapshot -a`` while no QEMU has it open, then boots the state with
``-incoming``; a delete removes the internal snapshots (QMP while the VM's QEMU runs, ``qemu-img
snapshot -d`` when it does not).

Each snapshot is recorded with its qcow2 identity (name, date, VM clock), so a disk whose snapshot
was deleted, re-made or converted away behind mtevm's back is found before anything is reverted.
A raw disk cannot hold a snapshot: refused with the conversion command (libvirt refuses the same
with "internal snapshot for disk vda unsupported for storage type raw").
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import time

from backend.errors import StateError
from backend.guests.definition import disk_format
from backend.qemu.argv import drive_id
from backend.qemu.qmp import QmpError, QmpGone

QEMU_IMG_TIMEOUT = 60.0     # seconds for one qemu-img call (snapshot -a/-d copy no data, only metadata)
IDENTITY = ("name", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")   # of a qcow2 snapshot


def raw_refusal(vm: str, disks: list[str]) -> str | None:
    """Why the VM's disks cannot keep a snapshot (a raw one), naming the disk and the way out; None if
    every disk is qcow2 (or there are none). Read from the files, as QEMU is told at each start."""
    for path in disks:
        try:
            fmt = disk_format(path)
        except OSError as e:
            return f"VM {vm!r}: disk {path} cannot be read ({e.strerror}): no snapshot taken"
        if fmt == "raw":
            q = shlex.quote(path)
            return (f"VM {vm!r}: disk {path} is a raw image, which cannot keep a snapshot of its contents (only "
                    "qcow2 disks have internal snapshots, as with virsh), so the VM's state would come back over "
                    f"a disk that moved on: no snapshot taken. Convert it with the VM stopped: "
                    f"qemu-img convert -f raw -O qcow2 {q} {q}.qcow2 && mv {q}.qcow2 {q} "
                    "(mtevm reads each disk's format from the file at start)")
    return None


def identity(snapshot: dict) -> dict:
    """What identifies one qcow2 internal snapshot (QEMU's ``SnapshotInfo`` minus its reusable id)."""
    return {k: snapshot.get(k) for k in IDENTITY}


def summary(snapshot: dict) -> str:
    """For people (the CLI's DISKS column, the app's snapshots screen): each disk holding its part of
    ``snapshot`` by file name, "(gone)" where it was lost behind mtevm's back; "-" without disks."""
    return ", ".join(os.path.basename(d["path"]) + ("" if d.get("present", True) else " (gone)")
                     for d in snapshot.get("disks") or []) or "-"


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if not path:
        raise StateError("qemu-img not found: it keeps the snapshots of qcow2 disks (Debian: qemu-utils; "
                         "`bash scripts/install-deps.sh` installs it)")
    return path


async def _qemu_img(*args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [qemu_img(), *args], capture_output=True, text=True,
                                   timeout=QEMU_IMG_TIMEOUT, stdin=subprocess.DEVNULL)


def _said(r: subprocess.CompletedProcess) -> str:
    """qemu-img's own error text, on one line."""
    return " ".join(line.strip() for line in r.stderr.splitlines() if line.strip()) or f"exit status {r.returncode}"


# -- what the disks hold ---------------------------------------------------------------------------
async def file_inventory(paths: list[str]) -> dict[str, dict]:
    """Each disk file's ``{"format", "snapshots": [SnapshotInfo], "error"}``, read with qemu-img (no
    QEMU has them open: a stopped VM)."""
    out = {}
    for path in paths:
        try:
            fmt = disk_format(path)
        except OSError as e:
            out[path] = {"format": None, "snapshots": [], "error": f"cannot be read ({e.strerror})"}
            continue
        if fmt != "qcow2":
            out[path] = {"format": fmt, "snapshots": [], "error": None}
            continue
        r = await _qemu_img("info", "-U", "-f", "qcow2", "--output=json", path)
        if r.returncode:
            out[path] = {"format": fmt, "snapshots": [], "error": _said(r)}
        else:
            out[path] = {"format": fmt, "snapshots": json.loads(r.stdout).get("snapshots", []), "error": None}
    return out


async def qmp_inventory(qmp, paths: list[str]) -> dict[str, dict]:
    """The same as file_inventory, from the VM's running QEMU (``query-block``): what it has open."""
    blocks = {b.get("device"): b for b in await qmp.execute("query-block")}
    out = {}
    for i, path in enumerate(paths):
        image = (blocks.get(drive_id(i)) or {}).get("inserted", {}).get("image")
        if image is None:
            out[path] = {"format": None, "snapshots": [], "error": f"QEMU has no drive {drive_id(i)} open"}
        else:
            out[path] = {"format": image.get("format"), "snapshots": image.get("snapshots", []), "error": None}
    return out


def find(inventory: dict[str, dict], path: str, tag: str) -> dict | None:
    return next((s for s in inventory.get(path, {}).get("snapshots", []) if s.get("name") == tag), None)


def problems(saved: list[dict], inventory: dict[str, dict], tag: str) -> list[str]:
    """Why the disks no longer hold what snapshot ``tag`` recorded (``saved``: its disks), one reason
    per disk; [] when every disk still has its own internal snapshot."""
    out = []
    for disk in saved:
        path, now = disk["path"], inventory.get(disk["path"]) or {}
        if now.get("error"):
            out.append(f"disk {path}: {now['error']}")
        elif now.get("format") != "qcow2":
            out.append(f"disk {path} is {now.get('format')} now, no longer qcow2: its internal snapshot is gone")
        else:
            found = find(inventory, path, tag)
            if found is None:
                out.append(f"disk {path} no longer has its internal snapshot {tag!r} (deleted outside mtevm?)")
            elif identity(found) != identity(disk["snapshot"]):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.get("date-sec") or 0))
                out.append(f"disk {path} has an internal snapshot {tag!r} made {when}, not the one mtevm took "
                           "with this snapshot (re-made outside mtevm?)")
    return out


# -- on a running QEMU -----------------------------------------------------------------------------
async def take(qmp, paths: list[str], tag: str) -> list[dict]:
    """Snapshot every disk under ``tag`` in one QMP transaction (all or none); the vCPUs must be
    stopped, so the disks match the state written next. Returns the disks' records."""
    taken = [p for p, inv in (await qmp_inventory(qmp, paths)).items() if find({p: inv}, p, tag)]
    if taken:
        raise StateError(f"disk {taken[0]} already has an internal snapshot named {tag!r} (not one of mtevm's "
                         f"for this VM): use another tag, or remove it with qemu-img snapshot -d {shlex.quote(tag)} "
                         f"{shlex.quote(taken[0])} while the VM is stopped")
    actions = [{"type": "blockdev-snapshot-internal-sync", "data": {"device": drive_id(i), "name": tag}}
               for i in range(len(paths))]
    try:
        await qmp.execute("transaction", {"actions": actions})
    except QmpError as e:
        raise StateError(f"QEMU could not snapshot the disks: {e}") from None
    inventory = await qmp_inventory(qmp, paths)
    return [{"path": p, "format": "qcow2", "snapshot": identity(find(inventory, p, tag) or {})} for p in paths]


async def delete_live(qmp, saved: list[dict], all_paths: list[str], tag: str) -> None:
    """Remove snapshot ``tag`` from the disks of ``saved`` through the running QEMU (which has them
    open and locked). Only the snapshot mtevm took goes: a disk that no longer has it, or has another
    one of that name (made outside mtevm), is left as it is."""
    inventory = await qmp_inventory(qmp, all_paths)
    for disk in _ours(saved, inventory, tag):
        try:
            await qmp.execute("blockdev-snapshot-delete-internal-sync",
                              {"device": drive_id(all_paths.index(disk["path"])), "name": tag})
        except QmpGone:
            raise           # QEMU died: the caller reads the files instead
        except QmpError as e:
            raise StateError(f"disk {disk['path']}: QEMU could not delete its snapshot {tag!r}: {e}") from None


def _ours(saved: list[dict], inventory: dict[str, dict], tag: str) -> list[dict]:
    """The disks of ``saved`` that still hold the very internal snapshot mtevm took."""
    return [d for d in saved if (found := find(inventory, d["path"], tag)) is not None
            and identity(found) == identity(d["snapshot"])]


# -- on disk files no QEMU has open ----------------------------------------------------------------
async def delete_files(saved: list[dict], tag: str) -> None:
    """``qemu-img snapshot -d`` on each disk of ``saved`` that still holds the snapshot mtevm took
    (files gone, snapshots gone or re-made outside mtevm are left as they are)."""
    inventory = await file_inventory([d["path"] for d in saved if os.path.exists(d["path"])])
    for disk in _ours(saved, inventory, tag):
        r = await _qemu_img("snapshot", "-f", "qcow2", "-d", tag, disk["path"])
        if r.returncode:
            raise StateError(f"disk {disk['path']}: could not delete its snapshot {tag!r}: {_said(r)}")


async def revert_files(saved: list[dict], tag: str) -> None:
    """Bring every disk back to snapshot ``tag``: all are checked first (nothing is reverted if one
    disk lost its snapshot), then ``qemu-img snapshot -a`` each."""
    paths = [d["path"] for d in saved]
    wrong = problems(saved, await file_inventory(paths), tag)
    if wrong:
        raise StateError("; ".join(wrong))
    done: list[str] = []
    for path in paths:
        r = await _qemu_img("snapshot", "-f", "qcow2", "-a", tag, path)
        if r.returncode:
            raise StateError(f"disk {path}: could not revert to its snapshot {tag!r}: {_said(r)}"
                             + (f" (already reverted: {', '.join(done)})" if done else ""))
        done.append(path)
