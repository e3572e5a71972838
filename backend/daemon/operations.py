"""One operation at a time per VM: the daemon's rule against racing start/stop/migrate/... calls.

Every Service method that changes what runs (start, stop, migrate, delete, set_tcf; later pause,
reboot, snapshot) first *claims* the VM with a verb ("starting", "migrating", ...). The claim is
taken synchronously, before the method's first ``await``, so two requests can never both pass
their state checks and then interleave (the migrate + stop race: both answered 200 and the
migration task found ``rec.running`` gone). A second operation while one runs is refused at once
with ``StateError("VM 'x' is migrating")``; it never waits and never crashes.

A claim is a context manager for operations that finish inside one request; an operation that
goes on in a background task (a migration) hands its claim to the task, which releases it when
the work really ends.
"""
from __future__ import annotations

from typing import Protocol

from backend.errors import StateError


class Claimable(Protocol):
    """What a VM record needs for claims: its name and the slot holding the current operation."""

    name: str
    operation: "Operation | None"


class Operation:
    """The claim of one running operation on one VM; ``release()`` (or leaving ``with``) ends it."""

    def __init__(self, vm: Claimable, verb: str):
        self.vm = vm
        self.verb = verb

    def release(self) -> None:
        """End this operation (idempotent; never ends a later operation's claim)."""
        if self.vm.operation is self:
            self.vm.operation = None

    def __enter__(self) -> "Operation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(vm: Claimable, verb: str) -> Operation:
    """Claim ``vm`` for the operation ``verb`` (a present participle: "starting", "migrating").

    Raises StateError naming the operation in progress if there is one. Synchronous on purpose:
    call it before the first ``await`` of the operation.
    """
    if vm.operation is not None:
        raise StateError(f"VM {vm.name!r} is {vm.operation.verb}")
    op = Operation(vm, verb)
    vm.operation = op
    return op
