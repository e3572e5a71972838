"""The event bus: state changes and migration progress fanned out to every subscriber.

Each subscriber has its own bounded queue; a subscriber that does not keep up loses its oldest
events rather than slowing the daemon down or growing without bound (counter samples are
re-sent at the next tick anyway, and a front end can always re-read ``list()``).
"""
from __future__ import annotations

import asyncio
import math
import time

from backend.errors import ConfigError

QUEUE_LIMIT = 1000
MAX_EVENT_RATE = 50.0
HEARTBEAT_PERIOD = 1.0   # an event stream with nothing to say still sends {"type": "heartbeat"} this often,
                         # so a client can tell an idle daemon from a hung one (SIGSTOP, deadlock)


def check_event_rate(rate_hz) -> float:
    """Counter samples per second for an event stream: a number in (0, 50]."""
    if (isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float)) or not math.isfinite(rate_hz)
            or not 0 < rate_hz <= MAX_EVENT_RATE):
        shown = f"{rate_hz:g}" if isinstance(rate_hz, (int, float)) and not isinstance(rate_hz, bool) else repr(rate_hz)
        raise ConfigError(f"event rate must be a number of samples per second in (0, {MAX_EVENT_RATE:g}], not {shown}")
    return float(rate_hz)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[asyncio.Queue, int] = {}     # queue -> events dropped since last asked

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers[q] = 0
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.pop(q, None)

    def dropped(self, q: asyncio.Queue) -> int:
        """Events this subscriber lost to a full queue since the last call (then 0 again)."""
        n = self._subscribers.get(q, 0)
        if n:
            self._subscribers[q] = 0
        return n

    def _put_all(self, item: dict | None) -> None:
        for q in self._subscribers:
            if q.full():
                q.get_nowait()  # drop the oldest: never block the publisher
                self._subscribers[q] += 1
            q.put_nowait(item)

    def close(self) -> None:
        """End every subscriber's stream (the daemon is stopping): each gets a None."""
        self._put_all(None)

    def publish(self, type_: str, **payload) -> None:
        self._put_all({"type": type_, "time": time.time(), **payload})
