"""Values users send as JSON (request bodies, trace lines, workload parameters): the checks every
reader applies the same way, so none of them can forget one.

- ``loads``: JSON text -> value, nesting at most MAX_DEPTH levels. Python's own parser recurses,
  so a body of 100,000 ``[`` raised RecursionError (a 500 from the daemon, a traceback from replay);
  here it is a ValueError that says what is wrong (callers turn it into their own 400 / exit 2).
- ``is_int`` / ``is_number``: ``True`` is an ``int`` in Python but not a number in a definition
  (``"uaf_rate": true`` was accepted as 1.0).
Standard library only: any layer may import it.
"""
from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64    # far more than any mtevm document (a definition is 3 levels deep)


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number, integer or not (not a bool, not NaN or infinity)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        todo.extend((child, level + 1) for child in children)
    return deepest


def loads(text: str | bytes) -> Any:
    """``json.loads`` with a nesting limit; ValueError (json.JSONDecodeError for bad syntax) says why."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if depth(value) > MAX_DEPTH:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)")
    return value
