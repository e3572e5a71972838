"""The daemon's HTTP face: aiohttp on a Unix socket, JSON in and out, NDJSON for events.

Every route comes from backend.daemon.api.ROUTES and calls the Service method of the same
operation. Errors travel as ``{"error": {"class": ..., "message": ...}}`` so the client raises the
same MtevmError subclass the Service raised. Only clients of the daemon's own uid are served
(SO_PEERCRED on the accepted socket), as the socket gives full control over the user's VMs.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os

from aiohttp import web

from backend.daemon.api import CONSOLE_PATH, ROUTES, Route
from backend.daemon.launch import peer_uid
from backend.daemon.service import Service
from backend import jsonvalues
from backend.errors import ConfigError, MtevmError, NotFoundError, error_payload

log = logging.getLogger("mtevm.daemon")

STREAM_POLL = 1.0  # how often an idle event stream checks that its client is still there
STREAM_BATCH = 64  # events at most in one write of an event stream


def error_response(err: MtevmError) -> web.Response:
    return web.json_response(error_payload(err), status=err.status)


@web.middleware
async def only_our_uid(request: web.Request, handler):
    sock = request.transport.get_extra_info("socket") if request.transport else None
    uid = peer_uid(sock) if sock is not None else -1
    if uid != os.getuid():
        log.warning("refused a client of uid %s", uid)
        err = MtevmError(f"permission denied: this mtevm daemon belongs to uid {os.getuid()} "
                         f"and refuses clients of uid {uid}")
        resp = web.json_response(error_payload(err), status=403)
        resp.force_close()
        return resp
    return await handler(request)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except MtevmError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status == 404:
            return error_response(NotFoundError(f"no such API route: {request.method} {request.path}"))
        err = MtevmError(f"{request.method} {request.path}: {e.reason}")
        err.status = e.status
        return error_response(err)
    except Exception as e:
        log.exception("internal error in %s %s", request.method, request.path)
        err = MtevmError(f"internal error in the mtevm daemon: {e!r} (see the daemon log)")
        err.status = 500
        return error_response(err)


async def _read_body(request: web.Request):
    if not request.can_read_body:
        return {}
    try:
        return jsonvalues.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as e:    # bad syntax, bad UTF-8, nested too deeply
        raise ConfigError(f"the request body is not usable JSON: {e}") from None


async def _kwargs(request: web.Request, route: Route) -> dict:
    kwargs = dict(request.match_info)
    for kw, (key, parse) in route.query.items():
        if key in request.query:
            kwargs[kw] = parse(key, request.query[key])
    if route.body or route.body_whole:
        body = await _read_body(request)
        if route.body_whole:
            kwargs[route.body_whole] = body
        else:
            if not isinstance(body, dict):
                raise ConfigError("the request body must be a JSON object")
            unknown = set(body) - set(route.body.values())
            if unknown:
                raise ConfigError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
            for kw, key in route.body.items():
                if key in body:
                    kwargs[kw] = body[key]
    return kwargs


def _handler(service: Service, route: Route):
    method = getattr(service, route.service_method)
    signature = inspect.signature(method)

    async def handle(request: web.Request) -> web.StreamResponse:
        kwargs = await _kwargs(request, route)
        try:
            signature.bind(**kwargs)
        except TypeError as e:  # e.g. a body without a required field
            raise ConfigError(f"{route.op}: {e}") from None
        if route.stream:
            return await _stream(request, method(**kwargs))
        return web.json_response(await method(**kwargs))

    return handle


async def _stream(request: web.Request, events) -> web.StreamResponse:
    """NDJSON: one event per line, as Docker's /events does. Ends when the client goes away."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    pending = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=STREAM_POLL)
            if not done:
                if request.transport is None or request.transport.is_closing():
                    break
                continue
            # What the stream has ready now goes out in one write (a round of 1,000 VMs' counters
            # comes out a slice at a time without waiting): a write, and a chunk for the client to
            # parse, per slice rather than per event.
            lines, ended = [], False
            while pending.done() and len(lines) < STREAM_BATCH:
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    ended = True
                    break
                lines.append(json.dumps(event).encode())
                pending = asyncio.ensure_future(anext(events))
                await asyncio.sleep(0)          # its next step: done now unless it has to wait
            if lines:
                await resp.write(b"\n".join(lines) + b"\n")
            if ended:
                break
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await events.aclose()
    return resp


MAX_REQUEST = 64 << 20   # an exec request carries a program of up to 32 MiB as base64


def _console_handler(service: Service):
    async def handle(request: web.Request) -> web.StreamResponse:
        """``mtevm console``: a WebSocket; guest output as binary frames, typed input back."""
        session = service.console_session(request.match_info["name"])   # errors: plain JSON replies
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)

        async def pump_out() -> None:
            while (chunk := await session.read()) is not None:
                await ws.send_bytes(chunk)
            await ws.close()

        out = asyncio.ensure_future(pump_out())
        try:
            async for msg in ws:
                if msg.type == web.WSMsgType.BINARY:
                    await session.write(msg.data)
                elif msg.type == web.WSMsgType.TEXT:
                    await session.write(msg.data.encode())
        finally:
            out.cancel()
            await asyncio.gather(out, return_exceptions=True)
            await session.close()
        return ws

    return handle


def build_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[only_our_uid, errors_as_json], client_max_size=MAX_REQUEST)
    for route in ROUTES.values():
        app.router.add_route(route.method, route.path, _handler(service, route))
    app.router.add_route("GET", CONSOLE_PATH, _console_handler(service))
    return app
