"""How numbers, sizes and times look on screen: one place, so every screen agrees.

Times are formatted with the app's ``clock`` (an injectable ``() -> float``): snapshot tests
freeze it, and a user sees one consistent "now" on every screen.
"""
from __future__ import annotations

import time

_UNITS = ("B", "K", "M", "G", "T")


def size(n: int | None) -> str:
    """Bytes as QEMU-style sizes: 268435456 -> "256M"."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


EXACT_BELOW = 10_000                         # counters below this are shown digit for digit
_COUNT_UNITS = ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"))


def count(n: int | float | None) -> str:
    """Large counters stay narrow: 1234 -> "1234", 26195 -> "26.2k", 1234567 -> "1.23M".

    Below 10,000 the number itself; above, three significant digits and the unit whose
    multiplier it was divided by (k = 1e3, M = 1e6, ...): the text always reads back as the
    number within half a unit of its last digit (tests/tui/test_format.py checks exactly that).
    """
    if n is None:
        return "-"
    n = float(n)
    if abs(n) < EXACT_BELOW:
        return f"{n:.0f}" if n == int(n) else f"{n:.1f}"
    for multiplier, suffix in _COUNT_UNITS:
        text = _three_digits(abs(n) / multiplier)
        if float(text) < 1000 or suffix == _COUNT_UNITS[-1][1]:   # 999.6k reads 1.00M, never "1000k"
            return ("-" if n < 0 else "") + text + suffix
    raise AssertionError("unreachable")


def _three_digits(scaled: float) -> str:
    """``scaled`` (>= 1) with three significant digits, never in exponent form."""
    for digits, below in ((2, 10), (1, 100), (0, float("inf"))):
        text = f"{scaled:.{digits}f}"
        if float(text) < below:
            return text
    raise AssertionError("unreachable")


def rate(per_s: float | None) -> str:
    """A per-second rate for the tables (one decimal below 10)."""
    if per_s is None:
        return "-"
    return f"{per_s:.1f}" if per_s < 10 else count(per_s)


def yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def clock_time(ts: float | None) -> str:
    """An absolute time as HH:MM:SS UTC (the daemon may run elsewhere, so no local zone)."""
    if ts is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def age(ts: float | None, now: float) -> str:
    """How long ago ``ts`` was, relative to the app clock's ``now``: "4s", "3m", "2h"."""
    if ts is None:
        return "-"
    d = max(0.0, now - ts)
    if d < 60:
        return f"{d:.0f}s"
    if d < 3600:
        return f"{d // 60:.0f}m"
    if d < 86400:
        return f"{d // 3600:.0f}h"
    return f"{d // 86400:.0f}d"


def progress_bar(fraction: float, width: int = 10) -> str:
    """A text progress bar that works in 16 colours and over any ssh: "██████░░░░ 60%"."""
    fraction = min(1.0, max(0.0, fraction or 0.0))
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled) + f" {fraction * 100:3.0f}%"
