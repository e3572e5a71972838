"""The mtevm Textual app: a client of the daemon (``backend.client``), never of the hosts directly.

``MtevmApp(client_factory=...)`` takes an async factory returning a connected client, so tests run
the real app on the real in-process service and ``run_app`` connects to the daemon's socket.
Quitting (or losing the terminal) closes the client only: VMs keep running in the daemon.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.markup import escape
from textual.screen import Screen

from backend.client import HEARTBEAT_PERIOD
from backend.config import (MAX_REFRESH_RATE, MIN_REFRESH_RATE, UserConfig, check_refresh_rate,
                            load_config, resolve_timeout)
from backend.errors import MtevmError
from tui import keymap
from tui.options import add_app_options, add_version
from tui.components.status import StatusBar
from tui.live import BIG_FLEET, CountersBatch, CountersSampled, LiveModel, ModelRefreshed, VmDeleted
from tui.screens.help import HelpScreen
from tui.screens.hosts import HostsScreen
from tui.screens.migrations import MigrationsScreen
from tui.screens.vm_list import VmListScreen

ClientFactory = Callable[[], Awaitable["object"]]
RETRY_SECONDS = 2.0           # between attempts to resume a lost event stream
STALL_SECONDS = 5 * HEARTBEAT_PERIOD    # no event (not even a heartbeat) this long: the daemon hangs


class MtevmApp(App):
    """The VM manager. ``clock`` is used for every time shown (tests freeze it)."""

    CSS_PATH = str(Path(__file__).with_name("mtevm.tcss"))   # absolute: subclasses elsewhere find it too
    TITLE = "mtevm"
    BINDINGS = keymap.bindings(keymap.APP_KEYS)
    MODES = {"vms": VmListScreen, "hosts": HostsScreen, "migrations": MigrationsScreen}

    def __init__(self, client_factory: ClientFactory, *, rate_hz: float | None = None,
                 clock: Callable[[], float] = time.time, config: UserConfig | None = None,
                 live: bool = True, ansi_color: bool | None = None, watch_terminal: bool = False,
                 connection_label: str = "daemon") -> None:
        config = config or UserConfig()
        keymap.check_keymap(config.keymap)
        self.watch_terminal = watch_terminal      # before App.__init__: it asks get_driver_class()
        super().__init__(ansi_color=ansi_color)
        self._client_factory = client_factory
        self.client = None
        self.rate_hz = check_refresh_rate(rate_hz if rate_hz is not None else config.refresh_rate, "--rate")
        self.clock = clock
        self.user_keymap = dict(config.keymap)
        self.live = live
        self.connection_label = connection_label
        self.daemon_lost: str | None = None      # why the daemon is unreachable, while it is
        self.model = LiveModel()
        self.vcpu_focus: str | None = None       # the VM whose vCPUs are on screen (its detail)
        self.feed_vcpus = "all"                  # whose per-vCPU figures the event feed carries
        self._batch: set[str] = set()            # big fleet: VMs sampled since the last CountersBatch
        self._flushed = 0.0
        if ansi_color:
            self.theme = "ansi-dark"

    # -- life cycle ----------------------------------------------------------------------------
    async def on_mount(self) -> None:
        self.set_keymap(self.user_keymap)
        if self.watch_terminal:
            from tui.terminal import TerminalWatch
            TerminalWatch(self).install()
        try:
            self.client = await self._client_factory()
            await self.refresh_model()
        except (MtevmError, OSError) as e:
            self.exit(return_code=1, message=f"mtevm: cannot reach the daemon: {e}")
            return
        await self.switch_mode("vms")
        if self.live:
            self.follow_events()

    async def on_unmount(self) -> None:
        """Close the connection only: the daemon keeps every VM running."""
        client, self.client = self.client, None
        if client is not None:
            close = getattr(client, "close", None) or getattr(client, "aclose", None)
            if close is not None:
                await close()

    async def refresh_model(self) -> None:
        """Re-read VMs and migrations (after an operation; events keep it current otherwise)."""
        before = set(self.model.vms)
        self.model.set_vms(await self.client.list())
        self.model.set_migrations(await self.client.migrations())
        for name in before - set(self.model.vms):
            self.broadcast(VmDeleted(name))
        self.broadcast(ModelRefreshed())

    def broadcast(self, message) -> None:
        """Give a live-update message to the screen the user sees.

        Only that one: Textual repaints, on the top screen, every region that changes on the
        screen beneath it, so updating a hidden VM list would resend the whole terminal each
        tick. Screens catch up from the model when they are shown again (on_screen_resume).
        """
        self.screen.post_message(message)
        if not isinstance(message, (CountersSampled, CountersBatch)):      # the VM count may have changed
            self.refresh_status()

    def refresh_status(self) -> None:
        """Redraw the status lines now (VM count or rate changed) rather than at their next tick."""
        for bar in self.screen.query(StatusBar):
            bar.tick()

    @work(exclusive=True, group="events", exit_on_error=False)
    async def follow_events(self) -> None:
        """Fold the daemon's event stream into the model and tell the screens. When the stream is
        lost, say so at once (status bar, dimmed live figures), start the daemon again as the CLI
        does (``client.revive``), re-read everything and follow it anew. A daemon that hangs
        (SIGSTOP, deadlock) is noticed too: the stream carries a heartbeat when it has nothing else."""
        while self.client is not None:
            self.feed_vcpus = self.wanted_feed()
            events = self.client.events(self.rate_hz, **({} if self.feed_vcpus == "all"
                                                          else {"vcpus": self.feed_vcpus}))
            regear = False
            reason = "the daemon ended the event stream"
            loop = asyncio.get_running_loop()
            try:
                # one deadline, pushed back by events (no task per event at 4 Hz x 64 VMs), at most
                # once a second (rescheduling is a timer handle: 4,000 events/s on a big fleet)
                async with contextlib.aclosing(events), asyncio.timeout(STALL_SECONDS) as deadline:
                    pushed = loop.time()
                    async for event in events:
                        if (now := loop.time()) - pushed >= 1.0:
                            deadline.reschedule(now + STALL_SECONDS)
                            pushed = now
                        if self.feed_vcpus != "all" and event.get("type") == "counters":
                            if self.model.fold_counters(event):     # a big fleet: no message per sample
                                self.batch_sample(event["vm"])
                            continue
                        if self.deliver(self.model.apply(event)):
                            regear = True            # the fleet crossed BIG_FLEET: follow in the other mode
                            break
            except TimeoutError:
                reason = f"the daemon sent nothing for {STALL_SECONDS:g} s (not even a heartbeat)"
            except Exception as e:          # whatever broke the stream, the app stays up and retries
                reason = f"event stream lost: {e}"
            if self.client is None:
                return
            if regear:
                continue
            self.set_daemon_lost(reason)
            await self.reconnect()

    def wanted_feed(self) -> str:
        """Whose per-vCPU figures the event feed should carry: all of them for a fleet of up to
        BIG_FLEET VMs; above that only the VM whose detail is on screen (the list shows VM totals)."""
        if len(self.model.vms) <= BIG_FLEET:
            return "all"
        return self.vcpu_focus or "none"

    def set_vcpu_focus(self, name: str | None) -> None:
        """The VM whose vCPUs are on screen (None: none); a big fleet's feed follows it."""
        self.vcpu_focus = name
        if self.live and self.client is not None and self.feed_vcpus != self.wanted_feed() \
                and self.daemon_lost is None:
            self.follow_events()

    def deliver(self, message) -> bool:
        """Tell the screen what an event changed: one message per event (a big fleet's samples
        never get here: follow_events folds them and ``batch_sample``). True when the fleet
        crossed BIG_FLEET."""
        if message is None:
            return False
        self.broadcast(message)
        return self.wanted_feed() != self.feed_vcpus

    def batch_sample(self, name: str) -> None:
        """A big fleet's sample of ``name`` (in the model already): the screen hears of it with the
        tick's others in one CountersBatch; the VM whose detail is open gets its CountersSampled."""
        self._batch.add(name)
        if name == self.vcpu_focus:
            self.broadcast(CountersSampled(name))
        now = time.monotonic()
        if now - self._flushed >= 1.0 / self.rate_hz:
            self.broadcast(CountersBatch(self._batch))
            self._batch, self._flushed = set(), now

    async def reconnect(self) -> None:
        """Until it works: bring the daemon back and re-read the model; then the figures are live again."""
        while self.client is not None:
            await asyncio.sleep(RETRY_SECONDS)
            try:
                await self.client.revive()
                await self.refresh_model()
            except Exception as e:
                self.set_daemon_lost(f"cannot restart it: {e}")
                continue
            self.set_daemon_lost(None)
            return

    def set_daemon_lost(self, reason: str | None) -> None:
        """Show (reason) or clear (None) the lost daemon: the status bar says it and every screen dims
        its live figures (class ``-daemon-lost`` on the app: tui/mtevm.tcss), since they are frozen."""
        was, self.daemon_lost = self.daemon_lost, reason
        self.set_class(reason is not None, "-daemon-lost")
        if (was is None) != (reason is None):
            self.notify(f"{self.connection_label} lost: {reason}; reconnecting (starting it again if it is gone)"
                        if reason
                        else f"{self.connection_label} is back", severity="warning" if reason else "information")
        self.refresh_status()

    def set_rate(self, rate_hz: float) -> None:
        """Change the counter refresh rate (restarts the event feed at the new rate)."""
        self.rate_hz = check_refresh_rate(rate_hz, "refresh rate")
        if self.live and self.client is not None:
            self.follow_events()

    def get_driver_class(self):
        """On a real terminal (not headless tests, not ``mtevm serve``'s web driver), Textual's Linux
        driver with an output thread that cannot hang the app when the terminal dies early."""
        driver_class = super().get_driver_class()
        if self.watch_terminal:
            from textual.drivers.linux_driver import LinuxDriver
            from tui.terminal import HangupSafeDriver
            if driver_class is LinuxDriver:
                return HangupSafeDriver
        return driver_class

    # -- app-wide actions ----------------------------------------------------------------------
    def action_rate_faster(self) -> None:
        self._change_rate(2.0)

    def action_rate_slower(self) -> None:
        self._change_rate(0.5)

    def _change_rate(self, factor: float) -> None:
        rate = min(MAX_REFRESH_RATE, max(MIN_REFRESH_RATE, self.rate_hz * factor))
        if rate != self.rate_hz:
            self.set_rate(rate)
        self.refresh_status()
        self.notify(f"live counters: {self.rate_hz:g} updates per second", timeout=2)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_vms(self) -> None:
        await self.switch_mode("vms")

    async def action_hosts(self) -> None:
        await self.switch_mode("hosts")

    async def action_migrations(self) -> None:
        await self.switch_mode("migrations")

    def key_hint(self, *binding_ids: str) -> str:
        """"d delete, h hosts": keys that do not fit the footer, as the user has them mapped."""
        specs = {spec.id: spec for spec in keymap.ALL_KEYS}
        return "  ".join(f"{keymap.display_key(specs[i], self.user_keymap)} {specs[i].description}"
                         for i in binding_ids)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette: every action of the key table that the current screen offers."""
        for spec in keymap.ALL_KEYS:
            if spec.id == "app_commands":
                continue
            target = self if spec in keymap.APP_KEYS else screen
            if not hasattr(target, f"action_{spec.action}"):
                continue
            key = keymap.display_key(spec, self.user_keymap)
            yield SystemCommand(escape(spec.help), escape(f"key {key}   binding id {spec.id}"),
                                _runner(target, spec.action))
        yield SystemCommand("Theme", "Change the colour theme", self.action_change_theme)


def _runner(target, action: str):
    async def run() -> None:
        await target.run_action(action)
    return run


# -- command line ------------------------------------------------------------------------------
def wants_16_colours(env: dict | None = None) -> bool:
    """The Linux console and *-16color terminals get the ANSI theme (16 colours, no RGB)."""
    env = os.environ if env is None else env
    term = env.get("TERM", "")
    return term == "linux" or term.endswith("-16color") or env.get("TEXTUAL_COLOR_SYSTEM") == "standard"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mtevm", description="Terminal VM manager for Arm64 virt machines with MTE")
    add_version(p)
    add_app_options(p)
    p.add_argument("--no-daemon", action="store_true",
                   help="run the service inside the app (VMs stop when the app exits)")
    p.add_argument("--state-dir", default=None, help="where VM definitions are kept")
    p.add_argument("--runtime-dir", default=None, help="where the daemon's socket lives")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for each answer of the daemon (default 60; env MTEVM_TIMEOUT, "
                        "config.toml 'timeout')")
    args = p.parse_args(argv)
    args.colors = args.colors or "auto"
    return args


def run_app(argv: list[str] | None = None) -> int:
    """Entry point for ``mtevm`` / ``python -m tui``: returns the process exit code."""
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        keymap.check_keymap(config.keymap)
        if args.rate is not None:
            check_refresh_rate(args.rate, "--rate")
        resolve_timeout(args.timeout, config)       # a bad --timeout or MTEVM_TIMEOUT: exit 2 now
    except MtevmError as e:
        print(f"mtevm: {e}", file=sys.stderr)
        return 2
    if args.keys:
        for spec in keymap.ALL_KEYS:
            print(f"{spec.id:16} {keymap.display_key(spec, config.keymap):14} {spec.help}")
        return 0

    async def connect_client():
        from backend.client import connect
        if args.no_daemon:
            return await connect(in_process=True, state_dir=args.state_dir)
        return await connect(in_process=False, runtime_dir=args.runtime_dir, state_dir=args.state_dir,
                             timeout=resolve_timeout(args.timeout, config))

    ansi = {"16": True, "full": False, "auto": wants_16_colours() or None}[args.colors]
    app = MtevmApp(connect_client, rate_hz=args.rate, config=config, ansi_color=ansi, watch_terminal=True,
                   connection_label="in-process" if args.no_daemon else "daemon")
    app.run()
    return app.return_code or 0


def main() -> None:
    sys.exit(run_app(sys.argv[1:]))
