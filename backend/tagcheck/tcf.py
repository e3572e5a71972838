"""TCF: what a tag-check fault does (SCTLR_ELx.TCF/TCF0)."""
from __future__ import annotations

import enum


class TCF(enum.IntEnum):
    NONE = 0     # no effect: accesses are unchecked
    SYNC = 1     # synchronous: the access is not performed, a fault with FAR is taken
    ASYNC = 2    # asynchronous: the access is performed, TFSR.TF0/TF1 is set
    ASYMM = 3    # asymmetric (FEAT_MTE3): loads as SYNC, stores as ASYNC

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: "str | int | TCF") -> "TCF":
        """TCF from "none"/"sync"/"async"/"asymm" (any case) or 0..3; ValueError otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
            return cls(value)
        raise ValueError(f"TCF {value!r} is not one of none, sync, async, asymm")
