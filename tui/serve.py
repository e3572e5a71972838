"""`mtevm serve`: the app in a web browser, through textual-serve.

Why a separate entry point: textual-serve runs one app process per browser tab (each one a client
of the same daemon, like another terminal), so the VMs outlive the tab exactly as they outlive an
ssh session. There is NO authentication: anyone who can reach the port controls the VMs. So the
server binds to a loopback address only, and has no switch to do otherwise: the way to reach it from
another machine is an ssh tunnel, which brings ssh's authentication with it (see docs/remote.md).
"""
from __future__ import annotations

import argparse
import ipaddress
import shlex
import sys

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
        description="Serve the mtevm app to a web browser (textual-serve). Unauthenticated: "
                    "binds to 127.0.0.1; reach it from elsewhere with "
                    "`ssh -L 8000:127.0.0.1:8000 host` and open http://127.0.0.1:8000/.")
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
            f"mtevm serve: refusing to listen on {host}: the web app has no authentication, so anyone "
            f"who can reach {host}:{port} could control your VMs. Keep the default 127.0.0.1 and use "
            f"an ssh tunnel (ssh -L {port}:127.0.0.1:{port} this-host).")


def _make_server(command: str, host: str, port: int, public_url: str | None):
    """textual-serve's server, announcing itself in mtevm's words (not its logo and raw command)."""
    from textual_serve.server import Server   # imported late: `mtevm --help` stays fast

    class MtevmServer(Server):
        async def on_startup(self, app) -> None:
            self.console.print(f"mtevm: starting the web app on {self.public_url}/ (no authentication: "
                               "loopback only; see docs/remote.md). Ctrl+C stops it.", highlight=False)

    return MtevmServer(command, host=host, port=port, title="mtevm", public_url=public_url)


def main(argv: list[str] | None = None) -> int:
    """Run the web server until Ctrl+C or SIGTERM; return the process exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_address(args.host, args.port, args.public_url)
    except ServeError as e:
        print(e, file=sys.stderr)
        return 2
    server = _make_server(app_command(args.app_args), args.host, args.port, args.public_url)
    try:
        server.serve()
    except OSError as e:           # port in use, address not on this machine
        print(f"mtevm serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
