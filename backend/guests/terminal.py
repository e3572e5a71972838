"""``mtevm console NAME``: this terminal attached to a VM's serial console, as ``virsh console``.

The terminal goes to raw mode (every key, ctrl+c included, goes to the guest) and is restored
on the way out, however that happens (detach, the VM stops, an error). ``ctrl+]`` detaches.
Works the same over ssh: only the local tty is touched.
"""
from __future__ import annotations

import asyncio
import os
import sys
import termios
import tty

ESCAPE = b"\x1d"     # ctrl+]
ESCAPE_NAME = "^]"


async def attach(client, name: str, stdin_fd: int | None = None, stdout_fd: int | None = None) -> str:
    """Relay stdin -> the guest console and the console -> stdout until ctrl+] (returns
    "detached"), the console ends ("closed"), or stdin ends ("eof")."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    loop = asyncio.get_running_loop()
    async with client.console(name) as console:
        done: asyncio.Future = loop.create_future()
        typed: asyncio.Queue = asyncio.Queue()

        def on_stdin() -> None:
            try:
                data = os.read(stdin_fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(stdin_fd)
                if not done.done():
                    done.set_result("eof")
                return
            if ESCAPE in data:
                data = data[:data.index(ESCAPE)]
                if data:
                    typed.put_nowait(data)
                loop.remove_reader(stdin_fd)
                if not done.done():
                    done.set_result("detached")
                return
            typed.put_nowait(data)

        async def output() -> None:
            while (chunk := await console.read()) is not None:
                os.write(stdout_fd, chunk)
            if not done.done():
                done.set_result("closed")

        async def input_() -> None:
            while True:
                await console.write(await typed.get())

        saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
        if saved is not None:
            tty.setraw(stdin_fd, termios.TCSANOW)
        os.write(2, f"Connected to the console of VM {name} (detach: {ESCAPE_NAME})\r\n".encode())
        tasks = [asyncio.ensure_future(output()), asyncio.ensure_future(input_())]
        loop.add_reader(stdin_fd, on_stdin)
        try:
            how = await done
            while not typed.empty():          # what was typed before ctrl+] still goes to the guest
                await console.write(typed.get_nowait())
        finally:
            loop.remove_reader(stdin_fd)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if saved is not None:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        os.write(2, {"detached": "\r\nDetached from the console.\r\n",
                     "closed": "\r\nThe console closed (the VM stopped).\r\n",
                     "eof": "\r\nInput ended; detached.\r\n"}[how].encode())
        return how
