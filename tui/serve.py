"""`mtevm serve`: the app in a web browser, through textual-serve.

Why a separate entry point: textual-serve runs one app process per browser tab (each one a client
of the same daemon, like another terminal), so the VMs outlive the tab exactly as they outlive an
ssh session. Whoever reaches the app controls the VMs, and a loopback port is open to every local
user (the daemon's Unix socket checks the uid; a TCP port cannot). So, as Jupyter does:
- each run makes a random secret token and prints the URL that carries it (``/?token=...``);
  every HTTP and websocket request without it is refused (401 no token, 403 a wrong one). The
  first page load with the token sets a cookie (HttpOnly, SameSite=Strict) and redirects to
  the bare URL, so the browser's later requests (static files, the websocket) carry it;
- the Host header must name a loopback address (or the --public-url's host): a DNS-rebinding page
  cannot reach the app through a name of its own;
- a websocket's Origin, when a browser sends one, must be this server itself;
- the server binds to a loopback address only; from another machine use an ssh tunnel.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import secrets
import shlex
import sys
from urllib.parse import urlencode, urlsplit

DEFAULT_PORT = 8000

# The command textual-serve runs (through a shell) for each browser tab: this interpreter, this
# checkout's app, with whatever app arguments were given after `--`.
_APP_SNIPPET = "import sys; from tui.app import run_app; raise SystemExit(run_app(sys.argv[1:]))"


class ServeError(Exception):
    """A refusal to serve, for the user (str(e) is the whole message)."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_command(app_args: list[str]) -> str:
    """The shell command line that starts one app process for one browser tab."""
    return shlex.join([sys.executable, "-c", _APP_SNIPPET, *app_args])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mtevm serve",
        description="Serve the mtevm app to a web browser (textual-serve). Each run prints a URL with "
                    "a secret token (http://127.0.0.1:8000/?token=...); requests without it are refused. "
                    "Binds to 127.0.0.1 only; reach it from elsewhere with "
                    "`ssh -L 8000:127.0.0.1:8000 host` and open the printed URL.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="loopback address to listen on (default 127.0.0.1; ::1 or localhost also work)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    parser.add_argument("--public-url", default=None, metavar="URL",
                        help="the address the browser uses, when it differs from http://HOST:PORT "
                             "(an ssh tunnel to another local port: ssh -L 9000:127.0.0.1:8000 host "
                             "-> --public-url http://127.0.0.1:9000)")
    parser.add_argument("app_args", nargs=argparse.REMAINDER,
                        help="after `--`: arguments for the app each browser tab runs")
    args = parser.parse_args(argv)
    if args.app_args[:1] == ["--"]:
        args.app_args = args.app_args[1:]
    if args.public_url:
        args.public_url = args.public_url.rstrip("/")     # textual-serve appends "/ws" etc.
    # Check the app's arguments now, not in every browser tab later (exits 2 with the app's usage).
    from tui.app import parse_args as parse_app_args
    parse_app_args(args.app_args)
    return args


def check_address(host: str, port: int, public_url: str | None = None) -> None:
    """Refuse what would expose the VMs by accident; raise ServeError with what to do instead."""
    if not 0 < port < 65536:
        raise ServeError(f"mtevm serve: bad port {port}: use 1..65535")
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise ServeError(f"mtevm serve: bad --public-url {public_url!r}: give http://HOST:PORT "
                         "(or https:// behind a proxy)")
    if not is_loopback(host):
        raise ServeError(
            f"mtevm serve: refusing to listen on {host}: the web app has no authentication but its "
            f"token, and anyone who can reach {host}:{port} could try it and control your VMs. Keep "
            f"the default 127.0.0.1 and use an ssh tunnel (ssh -L {port}:127.0.0.1:{port} this-host).")


class Gate:
    """Who may use the served app: the holder of this run's token, through a loopback name."""

    COOKIE_PREFIX = "mtevm-token-"

    def __init__(self, token: str, public_url: str) -> None:
        self.token = token
        self.public_host = (urlsplit(public_url).hostname or "").lower()
        # One cookie name per token: two servers on one host (cookies ignore ports) do not clash.
        self.cookie = self.COOKIE_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:12]

    def matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def allowed_host(self, host_header: str | None) -> bool:
        """A loopback name or address, or the --public-url's host (never a name someone else controls)."""
        if not host_header:
            return False
        name = (urlsplit("//" + host_header).hostname or "").lower()
        return name == self.public_host or is_loopback(name)

    def refusal(self, request) -> tuple[int, str] | None:
        """None if ``request`` may pass, else (HTTP status, reason)."""
        if not self.allowed_host(request.headers.get("Host")):
            return 403, f"Host {request.headers.get('Host')!r} is not this machine's loopback address"
        origin = request.headers.get("Origin")
        if origin is not None and request.path.startswith("/ws"):
            if urlsplit(origin).netloc.lower() != (request.headers.get("Host") or "").lower():
                return 403, f"websocket from a foreign page (Origin {origin!r})"
        auth = request.headers.get("Authorization", "")
        given = (request.query.get("token") or request.cookies.get(self.cookie)
                 or (auth[6:].strip() if auth.lower().startswith("token ") else None))
        if given is None:
            return 401, "no token: open the URL that `mtevm serve` printed (it ends in ?token=...)"
        if not self.matches(given):
            return 403, "wrong token: open the URL that this run of `mtevm serve` printed"
        return None

    def middleware(self):
        from aiohttp import web

        @web.middleware
        async def gate(request, handler):
            refused = self.refusal(request)
            if refused is not None:
                status, reason = refused
                return web.Response(status=status, text=f"mtevm serve: refused: {reason}\n",
                                    headers={"Cache-Control": "no-store"})
            if request.path == "/" and "token" in request.query:
                # Keep the token out of the address bar and history: a cookie carries it from now on.
                rest = [(k, v) for k, v in request.query.items() if k != "token"]
                # relative: behind a proxy that serves us under a path prefix it stays under it
                target = "./" + ("?" + urlencode(rest) if rest else "")
                response = web.Response(status=302, headers={"Location": target, "Cache-Control": "no-store"})
                response.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")
                return response
            return await handler(request)
        return gate


def _make_server(command: str, host: str, port: int, public_url: str | None, token: str):
    """textual-serve's server behind the token gate, announcing itself in mtevm's words."""
    from textual_serve.server import Server   # imported late: `mtevm --help` stays fast

    class MtevmServer(Server):
        async def _make_app(self):
            app = await super()._make_app()
            app.middlewares.append(Gate(token, self.public_url).middleware())
            return app

        async def on_startup(self, app) -> None:
            # print, not rich: the URL must stay on one line so that terminals make it a link
            print("mtevm: serving the app to your browser; open this URL (its token is the password "
                  "for this run; Ctrl+C stops it):", flush=True)
            print(f"    {self.public_url}/?token={token}", flush=True)

    return MtevmServer(command, host=host, port=port, title="mtevm", public_url=public_url)


def main(argv: list[str] | None = None) -> int:
    """Run the web server until Ctrl+C or SIGTERM; return the process exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_address(args.host, args.port, args.public_url)
    except ServeError as e:
        print(e, file=sys.stderr)
        return 2
    server = _make_server(app_command(args.app_args), args.host, args.port, args.public_url,
                          secrets.token_urlsafe(32))
    try:
        server.serve()
    except OSError as e:           # port in use, address not on this machine
        print(f"mtevm serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
