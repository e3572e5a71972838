"""backend.client: the one async API every front end uses (the Textual app, the CLI, tests).

Two transports behind the same methods:
- in-process: a Service in this process (tests, ``mtevm --no-daemon``);
- socket: the daemon over its Unix socket (aiohttp), started on demand.

Both return plain JSON data (the in-process results go through a JSON round trip, so nobody holds
the Service's own objects) and raise the same MtevmError subclasses with the same messages.

    client = await connect()                      # the daemon, started if needed
    async with client:
        for vm in await client.list(): ...
        async for event in client.events(rate_hz=4): ...
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator
from urllib.parse import quote

from backend.config import DEFAULT_TIMEOUT
from backend.daemon.api import CONSOLE_PATH, ROUTES, format_query
from backend.daemon.events import HEARTBEAT_PERIOD, check_event_rate
from backend.errors import ConfigError, MtevmError, error_from_name
from backend.paths import Paths

__all__ = ["Client", "connect", "HEARTBEAT_PERIOD"]


def _plain(data: Any) -> Any:
    """A JSON round trip: exactly what the socket transport would return."""
    return json.loads(json.dumps(data))


class InProcessTransport:
    """Calls a Service in this process directly."""

    def __init__(self, service, owned: bool):
        self.service = service
        self._owned = owned

    async def call(self, op: str, extra_wait: float | None = None, **kwargs) -> Any:
        return _plain(await getattr(self.service, ROUTES[op].service_method)(**kwargs))

    async def stream(self, op: str, **kwargs) -> AsyncIterator[dict]:
        events = getattr(self.service, ROUTES[op].service_method)(**kwargs)
        try:
            async for event in events:
                yield _plain(event)
        finally:
            await events.aclose()

    def console(self, name: str):
        return _InProcessConsole(self.service, name)

    async def close(self) -> None:
        if self._owned:
            await self.service.close()

    async def revive(self) -> None:
        """The service lives in this process: nothing to bring back."""


class _InProcessConsole:
    def __init__(self, service, name: str):
        self.service, self.name, self.session = service, name, None

    async def __aenter__(self):
        self.session = self.service.console_session(self.name)
        return self.session

    async def __aexit__(self, *exc) -> None:
        await self.session.close()


class _SocketConsole:
    """The daemon's console WebSocket as read()/write()."""

    def __init__(self, transport: "SocketTransport", name: str):
        self.t, self.name, self.ws = transport, name, None

    async def __aenter__(self) -> "_SocketConsole":
        import aiohttp
        url = "http://mtevm" + CONSOLE_PATH.replace("{name:[^/]*}", quote(self.name, safe=""))
        try:
            self.ws = await self.t._session.ws_connect(url, autoping=True, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as e:
            if e.status >= 400:   # the daemon refused (no such VM, not running): its JSON error
                resp = await self.t._session.get(url)
                async with resp:
                    try:
                        err = (await resp.json(content_type=None))["error"]
                    except (ValueError, KeyError, TypeError):
                        raise MtevmError(f"the mtevm daemon refused the console: {e.status} {e.message}") from None
                    raise error_from_name(err["class"], err["message"]) from None
            raise MtevmError(f"cannot attach to the console: {e}") from None
        except aiohttp.ClientConnectionError as e:
            raise MtevmError(f"lost the connection to the mtevm daemon at {self.t.paths.socket}: {e}") from None
        return self

    async def read(self) -> bytes | None:
        import aiohttp
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                return msg.data
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.ERROR):
                return None

    async def write(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()


class SocketTransport:
    """HTTP/JSON over the daemon's Unix socket, one aiohttp session per client."""

    def __init__(self, paths: Paths, start_daemon: bool = True, timeout: float = DEFAULT_TIMEOUT):
        self.paths = paths
        self.start_daemon = start_daemon
        self.timeout = timeout         # seconds for one request's answer (streams: none)
        self._session = self._new_session()

    def _new_session(self):
        import aiohttp
        return aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.paths.socket),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def revive(self) -> None:
        """After the daemon went away: start it again as ``connect`` does (unless this client was made
        with start_daemon=False), and reconnect with a fresh session (no pooled connection to the
        dead daemon is reused). Raises MtevmError if it cannot be brought back."""
        from backend.daemon import launch
        if self.start_daemon:
            await asyncio.to_thread(launch.ensure_daemon, self.paths)
        elif not await asyncio.to_thread(launch.socket_alive, self.paths):
            raise MtevmError(f"no mtevm daemon is running (socket {self.paths.socket}): run 'mtevm daemon'")
        old, self._session = self._session, self._new_session()
        await old.close()

    def _request(self, op: str, kwargs: dict) -> tuple[str, str, dict]:
        route = ROUTES[op]
        path = route.path
        if "{name" in path:
            name = kwargs.pop("name")
            if not isinstance(name, str):
                raise ConfigError(f"a VM name must be a string, not {type(name).__name__}")
            path = path[:path.index("{name")] + quote(name, safe="") + path[path.index("}") + 1:]
        query = {key: kwargs.pop(kw, None) for kw, (key, _) in route.query.items()}
        params = {key: format_query(value) for key, value in query.items() if value is not None}
        opts: dict = {"params": params}
        if route.body_whole:
            opts["data"] = self._encode(kwargs.pop(route.body_whole))
        elif route.body:
            opts["data"] = self._encode({route.body[kw]: kwargs.pop(kw) for kw in list(kwargs) if kw in route.body})
        if kwargs:
            raise TypeError(f"{op}() got unexpected keyword argument(s) {', '.join(kwargs)}")
        return route.method, "http://mtevm" + path, opts

    @staticmethod
    def _encode(body) -> bytes:
        try:
            return json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the request cannot be sent as JSON: {e}") from None

    async def _send(self, op: str, kwargs: dict, timeout: float | None):
        import aiohttp
        method, url, opts = self._request(op, dict(kwargs))
        try:
            resp = await self._session.request(method, url, headers={"Content-Type": "application/json"},
                                               timeout=aiohttp.ClientTimeout(total=timeout), **opts)
        except aiohttp.ClientConnectionError as e:
            raise MtevmError(f"lost the connection to the mtevm daemon at {self.paths.socket}: {e}") from None
        except TimeoutError:
            raise self._no_answer(timeout) from None
        if resp.status >= 400:
            try:
                err = (await resp.json(content_type=None))["error"]
                raise error_from_name(err["class"], err["message"])
            except (ValueError, KeyError, TypeError, aiohttp.ClientError):
                raise MtevmError(f"the mtevm daemon answered {resp.status} {resp.reason}") from None
            finally:
                resp.release()
        return resp

    async def call(self, op: str, extra_wait: float | None = None, **kwargs) -> Any:
        """One request. The answer is awaited for the timeout plus what the operation itself may
        rightly take: ``extra_wait``, else the route's ``may_take`` (a guest's shutdown grace, a
        snapshot's state file)."""
        timeout = self.timeout + (ROUTES[op].may_take if extra_wait is None else extra_wait)
        resp = await self._send(op, kwargs, timeout)
        async with resp:
            try:
                return await resp.json()
            except TimeoutError:             # the answer started, then the daemon stopped sending
                raise self._no_answer(timeout) from None

    def _no_answer(self, timeout: float) -> MtevmError:
        """One line for a daemon that does not answer in time (stopped, overloaded, stuck)."""
        from backend.daemon.launch import daemon_pid
        try:
            pid = daemon_pid(self.paths)
        except (OSError, MtevmError):
            pid = None
        who = f"the mtevm daemon (pid {pid})" if pid else "the mtevm daemon"
        return MtevmError(f"{who} did not answer within {timeout:g} s (socket {self.paths.socket}): it may be "
                          "stopped or stuck. Wait longer with --timeout SECONDS (or MTEVM_TIMEOUT), or restart "
                          "it with 'mtevm daemon stop' and run the command again")

    async def stream(self, op: str, **kwargs) -> AsyncIterator[dict]:
        import aiohttp
        if "rate_hz" in kwargs:  # checked here as the Service would: a query string cannot carry its type
            kwargs["rate_hz"] = check_event_rate(kwargs["rate_hz"])
        resp = await self._send(op, kwargs, None)
        async with resp:
            buffer = b""
            try:
                # Split lines ourselves: aiohttp's line iterator refuses a line longer than its
                # buffer limit, and an event's size grows with the VM's vCPUs and faults.
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    lines = [line for line in lines if line.strip()]
                    if lines:       # one decode for all the lines that came together (a round of 1,000 VMs)
                        for event in json.loads(b"[" + b",".join(lines) + b"]"):
                            yield event
            except aiohttp.ClientPayloadError:
                return  # the daemon stopped: the stream simply ends

    def console(self, name: str):
        return _SocketConsole(self, name)

    async def close(self) -> None:
        await self._session.close()


class Client:
    """The mtevm API (docs/contracts.md). Use ``connect()`` to get one."""

    def __init__(self, transport):
        self._t = transport

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._t.close()

    async def revive(self) -> None:
        """Bring the daemon back after it went away (started again, as ``connect`` would) and
        reconnect; a no-op in-process. Raises MtevmError if it cannot."""
        await self._t.revive()

    @property
    def paths(self):
        """The runtime/state dirs this client works on (a daemon's, or the in-process service's)."""
        t = self._t
        return t.paths if hasattr(t, "paths") else getattr(getattr(t, "service", None), "paths", None)

    @property
    def in_process(self) -> bool:
        return isinstance(self._t, InProcessTransport)

    async def hosts(self) -> list[dict]:
        return await self._t.call("hosts")

    async def host_add(self, name: str, uri: str) -> dict:
        return await self._t.call("host_add", name=name, uri=uri)

    async def host_remove(self, name: str) -> None:
        await self._t.call("host_remove", name=name)

    async def probe(self, host: str | None = None) -> list[dict]:
        return await self._t.call("probe", host=host)

    async def list(self) -> list[dict]:
        return await self._t.call("list")

    async def show(self, name: str) -> dict:
        return await self._t.call("show", name=name)

    async def create(self, config: dict, validate_only: bool = False, existing: bool = False) -> dict:
        return await self._t.call("create", config=config, validate_only=validate_only, existing=existing)

    async def start(self, name: str) -> dict:
        return await self._t.call("start", name=name)

    async def stop(self, name: str) -> dict:
        return await self._t.call("stop", name=name)

    async def delete(self, name: str) -> None:
        await self._t.call("delete", name=name)

    async def set_mte(self, name: str, on: bool) -> dict:
        return await self._t.call("set_mte", name=name, on=on)

    async def set_tcf(self, name: str, vcpu: int | None, tcf: str) -> dict:
        return await self._t.call("set_tcf", name=name, vcpu=vcpu, tcf=tcf)

    async def vcpus(self, name: str) -> list[dict]:
        return await self._t.call("vcpus", name=name)

    async def counters(self, name: str) -> dict:
        return await self._t.call("counters", name=name)

    async def migrate(self, name: str, to_host: str, with_tags: bool = False) -> dict:
        return await self._t.call("migrate", name=name, to_host=to_host, with_tags=with_tags)

    async def migrations(self) -> list[dict]:
        return await self._t.call("migrations")

    async def argv(self, name: str) -> list[str]:
        """The VM's QEMU command line (running: the one it runs; stopped: the one start would run)."""
        return await self._t.call("argv", name=name)

    async def console_log(self, name: str, lines: int = 100) -> dict:
        """``{"name", "log": path, "lines": [...]}``: the end of the VM's console log."""
        return await self._t.call("console_log", name=name, lines=lines)

    async def exec(self, name: str, args: list[str] = (), *, program: str | None = None, data: bytes | None = None,
                   path: str | None = None, cwd: str | None = None) -> AsyncIterator[dict]:
        """Run a program in a Linux guest: ``data`` (a static aarch64 ELF's bytes) named ``program``,
        or a ``path`` in the guest. Yields exec-started, exec-output (``data`` as bytes) and
        exec-exit (status, signal, pid, faults) messages; errors raise MtevmError subclasses."""
        import base64
        body = {"args": list(args), "program": program, "path": path, "cwd": cwd,
                "data": base64.b64encode(data).decode() if data is not None else None}
        stream = self._t.stream("exec", name=name, **{k: v for k, v in body.items() if v is not None})
        try:
            async for msg in stream:
                if msg.get("type") == "failed":
                    raise error_from_name(msg.get("class", "MtevmError"), msg.get("message", "exec failed"))
                if msg.get("type") == "exec-output":
                    msg["data"] = base64.b64decode(msg.get("data") or "")
                yield msg
        finally:
            await stream.aclose()

    def console(self, name: str):
        """``async with client.console(name) as c``: ``await c.read()`` -> bytes (None: the console
        closed), ``await c.write(data)``."""
        return self._t.console(name)

    # -- everyday operations (backend.daemon.vm_operations) ------------------------------------------
    async def pause(self, name: str) -> dict:
        return await self._t.call("pause", name=name)

    async def resume(self, name: str) -> dict:
        return await self._t.call("resume", name=name)

    async def reboot(self, name: str) -> dict:
        return await self._t.call("reboot", name=name)

    async def shutdown(self, name: str, timeout: float | None = None) -> dict:
        if timeout is None:
            return await self._t.call("shutdown", name=name)
        wait = timeout if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None
        return await self._t.call("shutdown", extra_wait=wait, name=name, timeout=timeout)

    async def edit(self, name: str, changes: dict) -> dict:
        return await self._t.call("edit", name=name, changes=changes)

    async def clone(self, name: str, new_name: str) -> dict:
        return await self._t.call("clone", name=name, new_name=new_name)

    async def migrate_cancel(self, name: str) -> dict:
        return await self._t.call("migrate_cancel", name=name)

    async def monitor(self, name: str, command: str, hmp: bool = False) -> dict:
        return await self._t.call("monitor", name=name, command=command, hmp=hmp)

    async def snapshot_list(self, name: str) -> list[dict]:
        return await self._t.call("snapshot_list", name=name)

    async def snapshot_save(self, name: str, tag: str | None = None) -> dict:
        return await self._t.call("snapshot_save", name=name, tag=tag)

    async def snapshot_restore(self, name: str, tag: str | None = None) -> dict:
        return await self._t.call("snapshot_restore", name=name, tag=tag)

    async def snapshot_delete(self, name: str, tag: str) -> dict:
        return await self._t.call("snapshot_delete", name=name, tag=tag)

    def events(self, rate_hz: float = 4.0, vcpus: str = "all") -> AsyncIterator[dict]:
        """Events as they happen (vm, counters every 1/rate_hz s, migration); ends if the daemon stops.
        A stream with nothing to say sends a heartbeat event every HEARTBEAT_PERIOD seconds, so
        silence for several periods means the daemon hangs. ``vcpus``: whose counters events carry
        per-vCPU figures: "all", "none" (VM totals only: a front end watching a big fleet) or one VM's name.

        A bad rate raises ConfigError at the first iteration, as any error of the stream does."""
        return self._t.stream("events", rate_hz=rate_hz, vcpus=vcpus)


async def connect(in_process: bool = False, runtime_dir: str | None = None, state_dir: str | None = None,
                  *, start_daemon: bool = True, hosts: dict | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> Client:
    """A Client: in-process (a fresh Service on ``state_dir``) or to the daemon (started on demand).

    ``hosts`` (in-process only) replaces the registry's hosts, e.g. to give tests their own drivers.
    ``timeout``: seconds to wait for each answer of the daemon (backend.config.resolve_timeout
    gives the user's choice); then MtevmError in one line.
    """
    paths = Paths.resolve(runtime_dir, state_dir)
    if in_process:
        from backend.daemon.service import open_service
        return Client(InProcessTransport(await open_service(paths, hosts), owned=True))
    if hosts is not None:
        raise ConfigError("hosts= only applies to an in-process client")
    from backend.daemon import launch
    if start_daemon:
        await asyncio.to_thread(launch.ensure_daemon, paths)
    elif not await asyncio.to_thread(launch.socket_alive, paths):
        raise MtevmError(f"no mtevm daemon is running (socket {paths.socket}): run 'mtevm daemon'")
    return Client(SocketTransport(paths, start_daemon=start_daemon, timeout=timeout))
