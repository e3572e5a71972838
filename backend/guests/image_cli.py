"""``mtevm image build linux`` and ``mtevm image list``: guest images, built on this machine.

A local operation (no daemon): it downloads pinned Debian packages and cross-compiles, with
progress on stderr, into the user's cache dir (backend.guests.linux.image).
"""
from __future__ import annotations

import json
import sys
import time

from backend.guests.linux import image


def add_parser(sub, parents) -> None:
    """The ``image`` command and its two subcommands (called by backend.cli.build_parser)."""
    p = sub.add_parser("image", help="guest images: 'mtevm image build linux', 'mtevm image list'",
                       description="Guest images that VMs boot (the Linux MTE guest), kept in the cache dir "
                                   "(env MTEVM_CACHE_DIR).", parents=parents)
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    b = isub.add_parser("build", help="build (or confirm up to date) a guest image", parents=parents,
                        description="Build mtevm's Linux MTE guest from pinned Debian arm64 packages: kernel, "
                                    "busybox, the virtio modules, mtevm's agent and workload, the kernel's "
                                    "arm64/mte selftests.")
    b.add_argument("target", choices=[image.NAME], help="the image to build")
    b.add_argument("--update-lock", action="store_true",
                   help="re-pin the packages to what the archive has now (rewrites the lock file)")
    b.add_argument("--lock", metavar="FILE", default=str(image.LOCK_PATH),
                   help="the lock file to build from (default: the one shipped with mtevm)")
    b.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    lp = isub.add_parser("list", help="the built images, their versions, sizes and state", parents=parents)
    lp.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args) -> int:
    if args.image_command == "list":
        images = image.list_images()
        if args.json:
            print(json.dumps(images, indent=2))
            return 0
        from rich.console import Console
        from rich.table import Table
        if not images:
            print(f"no guest image built yet: build one with '{image.build_command()}'")
            return 0
        t = Table(show_edge=False, header_style="bold", pad_edge=False)
        for c in ("NAME", "KERNEL", "PACKAGES", "SIZE", "BUILT", "STATE"):
            t.add_column(c)
        for i in images:
            pk = ", ".join(f"{p['package']} {p['version']}" for p in i["packages"].values())
            t.add_row(i["name"], i["kernel_release"] or "-", pk, _size(i["size"]), i["built"] or "-", i["state"])
        Console(width=None if sys.stdout.isatty() else 200, highlight=False).print(t)
        return 0 if all(i["state"] == "ok" for i in images) else 1

    image.check_build_inputs()
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    m = image.build(progress=progress, update_lock=args.update_lock, lock_path=args.lock, force=args.force)
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        state = "up to date" if m["up_to_date"] else "built"
        files = ", ".join(f"{n} {_size(f['size'])} sha256 {f['sha256'][:12]}" for n, f in m["files"].items())
        print(f"image {m['name']} {state}: kernel {m['kernel_release']}; {files}; in {image.image_dir(m['name'])}")
    return 0
