"""The host registry: which hosts a daemon offers and how each is built.

Drivers are imported only when a host is built, so importing ``backend.hosts`` stays cheap and a
driver's heavy imports (numpy, qemu.qmp) do not slow down ``mtevm --help``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.hosts.base import Host

# name -> (module, class, keyword arguments). The order is the order users see.
HOST_DRIVERS: dict[str, tuple[str, str, dict]] = {
    "sim-mte": ("backend.hosts.sim", "SimHost", {"name": "sim-mte", "host_mte": True}),
    "sim-nomte": ("backend.hosts.sim", "SimHost", {"name": "sim-nomte", "host_mte": False}),
    "local": ("backend.hosts.local", "LocalHost", {}),
}
HOST_NAMES = tuple(HOST_DRIVERS)
DEFAULT_HOST = "sim-mte"


def create_host(name: str, runtime_dir: str) -> "Host":
    """Build the host driver called ``name``; ``runtime_dir`` is where it may keep per-VM files."""
    module, cls_name, kwargs = HOST_DRIVERS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    if cls_name == "LocalHost":
        return cls(runtime_dir=runtime_dir, **kwargs)
    return cls(**kwargs)


def create_hosts(runtime_dir: str) -> dict[str, "Host"]:
    return {name: create_host(name, runtime_dir) for name in HOST_NAMES}


def create_libvirt_host(name: str, uri: str) -> "Host":
    """A host the user added by URI (``mtevm host add``); checks the name and the URI."""
    from backend.hosts.libvirt import LibvirtHost
    return LibvirtHost(name, uri)
