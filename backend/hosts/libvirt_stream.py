"""A libvirt stream (a domain's serial console or a virtio-serial channel) as an asyncio stream pair.

libvirt's streams are blocking; mtevm's console and agent clients (backend.qemu.console,
backend.guests.agent) read asyncio streams. Two threads per stream copy bytes between the libvirt
stream and one end of a socket pair; the clients read and write the other end, exactly as they do
a local QEMU's Unix socket. The bytes travel inside the libvirt connection (``qemu+ssh://`` too).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

log = logging.getLogger("mtevm.libvirt")

CHUNK = 64 * 1024


async def open_bridged(stream, name: str, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``stream`` (opened by virDomainOpenConsole / OpenChannel) as a reader/writer pair."""
    ours, theirs = socket.socketpair()
    _Bridge(stream, theirs, name).start()
    return await asyncio.open_unix_connection(sock=ours, limit=limit)


class _Bridge:
    """Copies bytes between a libvirt stream (blocking) and one end of a socket pair, in two
    threads (never the asyncio executor's: they block for the VM's life). Either side ending
    ends both."""

    def __init__(self, stream, sock: socket.socket, name: str):
        self.stream, self.sock, self.name = stream, sock, name
        self._lock = threading.Lock()
        self._ended = False      # the stream was finished or aborted (exactly once: libvirtd must not see both)
        self._down = threading.Thread(target=self._to_socket, name=f"stream-down-{name}", daemon=True)
        self._up = threading.Thread(target=self._to_stream, name=f"stream-up-{name}", daemon=True)

    def start(self) -> None:
        self._down.start()
        self._up.start()

    def _end(self, how) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        _quietly(how)

    def _to_socket(self) -> None:
        try:
            while True:
                data = self.stream.recv(CHUNK)
                if not isinstance(data, bytes) or not data:
                    break              # end of stream (the domain stopped) or an error code
                self.sock.sendall(data)
            self._end(self.stream.finish)   # libvirtd ended it: finish, as libvirt's stream protocol wants
        except Exception as e:         # libvirtError (stream aborted, connection gone) or the socket closed
            log.debug("libvirt stream of %s: %s", self.name, e)
        finally:
            _quietly(self.sock.shutdown, socket.SHUT_RDWR)

    def _to_stream(self) -> None:
        try:
            while data := self.sock.recv(CHUNK):
                view = memoryview(data)
                while view:
                    sent = self.stream.send(bytes(view))
                    if sent < 0:
                        raise OSError("the channel stream refused data")
                    view = view[sent:]
        except Exception as e:
            log.debug("libvirt stream of %s: %s", self.name, e)
        finally:
            self._end(self.stream.abort)
            _quietly(self.sock.shutdown, socket.SHUT_RDWR)
            self._down.join(10)
            self.sock.close()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass
