"""The API table: each client method, the Service method behind it and its HTTP route.

The socket server builds its routes from this table and the socket client builds its requests
from it, so the two sides cannot drift apart (docs/contracts.md lists the same routes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from backend.errors import ConfigError


def parse_bool(key: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"query parameter {key}: {text!r} is not true or false")


def parse_float(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"query parameter {key}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"query parameter {key}: {text!r} is not a finite number")
    return value


def parse_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"query parameter {key}: {text!r} is not a whole number") from None


def parse_str(key: str, text: str) -> str:
    return text


def format_query(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Route:
    op: str                     # the Client method (and usually the Service method) name
    method: str                 # HTTP verb
    path: str                   # aiohttp path template; {name} is a VM name
    service: str = ""           # Service method, when it differs from op
    body: dict[str, str] = field(default_factory=dict)     # keyword -> key of the JSON body
    body_whole: str | None = None                           # keyword that IS the JSON body
    query: dict[str, tuple[str, Callable[[str, str], object]]] = field(default_factory=dict)
    stream: bool = False        # NDJSON stream of events
    may_take: float = 0.0       # seconds the operation itself may rightly take: the client waits this
                                # much longer than its timeout (--timeout) for the answer

    @property
    def service_method(self) -> str:
        return self.service or self.op


# {name:[^/]*}: an empty or odd name still reaches the Service, which answers "no VM named ..."
# exactly as it does in-process.
# The default time a guest agent gets to power off (shutdown without timeout): the server applies
# it, and a client waits that much longer for the answer.
SHUTDOWN_GRACE = 30.0
REBOOT_WAIT = 30.0      # vm_operations.REBOOT_TIMEOUT: a guest agent's clean reboot
SNAPSHOT_WAIT = 120.0   # hosts/local.SAVE_TIMEOUT: writing or loading a snapshot's state file

_VM = "/v1/vms/{name:[^/]*}"

ROUTES: dict[str, Route] = {r.op: r for r in (
    Route("hosts", "GET", "/v1/hosts", service="hosts_info"),
    Route("host_add", "POST", "/v1/hosts", body={"name": "name", "uri": "uri"}),
    Route("host_remove", "DELETE", "/v1/hosts/{name:[^/]*}"),
    Route("probe", "GET", "/v1/probe", query={"host": ("host", parse_str)}),
    Route("list", "GET", "/v1/vms"),
    Route("create", "POST", "/v1/vms", body_whole="config",
          query={"validate_only": ("validate_only", parse_bool), "existing": ("existing", parse_bool)}),
    Route("show", "GET", _VM),
    Route("delete", "DELETE", _VM),
    Route("start", "POST", _VM + "/start"),
    Route("stop", "POST", _VM + "/stop"),
    Route("set_mte", "PUT", _VM + "/mte", body={"on": "on"}),
    Route("set_tcf", "PUT", _VM + "/tcf", body={"vcpu": "vcpu", "tcf": "tcf"}),
    Route("vcpus", "GET", _VM + "/vcpus"),
    Route("counters", "GET", _VM + "/counters"),
    Route("migrate", "POST", _VM + "/migrate", body={"to_host": "to", "with_tags": "with_tags"}),
    Route("migrations", "GET", "/v1/migrations"),
    Route("events", "GET", "/v1/events", query={"rate_hz": ("rate", parse_float), "vcpus": ("vcpus", parse_str)},
          stream=True),
    # Guests of the local host (backend.daemon.guest_ops). The interactive console is a WebSocket
    # on CONSOLE_PATH (not in this table: it is not request/response).
    Route("argv", "GET", _VM + "/argv"),
    Route("console_log", "GET", _VM + "/console/log", query={"lines": ("lines", parse_int)}),
    Route("exec", "POST", _VM + "/exec", stream=True,
          body={k: k for k in ("args", "program", "data", "path", "cwd")}),
    # the everyday operations (backend.daemon.vm_operations)
    Route("pause", "POST", _VM + "/pause"),
    Route("resume", "POST", _VM + "/resume"),
    Route("reboot", "POST", _VM + "/reboot", may_take=REBOOT_WAIT),
    Route("shutdown", "POST", _VM + "/shutdown", body={"timeout": "timeout"}, may_take=SHUTDOWN_GRACE),
    Route("edit", "PATCH", _VM, body={"changes": "changes"}),
    Route("clone", "POST", _VM + "/clone", body={"new_name": "new_name"}),
    Route("migrate_cancel", "POST", _VM + "/migrate/cancel"),
    Route("monitor", "POST", _VM + "/monitor", body={"command": "command", "hmp": "hmp"}),
    Route("snapshot_list", "GET", _VM + "/snapshots"),
    Route("snapshot_save", "POST", _VM + "/snapshots", body={"tag": "tag"}, may_take=SNAPSHOT_WAIT),
    Route("snapshot_restore", "POST", _VM + "/snapshots/restore", body={"tag": "tag"}, may_take=SNAPSHOT_WAIT),
    Route("snapshot_delete", "POST", _VM + "/snapshots/delete", body={"tag": "tag"}),
)}

CONSOLE_PATH = _VM + "/console"   # GET, upgraded to a WebSocket: binary frames both ways
