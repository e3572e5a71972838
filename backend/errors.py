"""Errors meant for users: ``str(e)`` is the whole message, shown verbatim by every front end.

Where QEMU has a message for the same situation, mtevm raises QEMU's exact text
(see ../shared/reference/mte-facts.md), so a user can search for it.
"""


class MtevmError(Exception):
    """Any error a user should read. Subclasses say which kind, for exit codes and HTTP status."""

    status = 400

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(MtevmError):
    """A machine definition or other user input is not valid."""


class RealizeError(MtevmError):
    """Building the virt machine failed (QEMU's machvirt_init / kvm_arm_enable_mte message)."""


class MigrationError(MtevmError):
    """A migration was refused or failed (QEMU's blocker text)."""


class NotFoundError(MtevmError):
    """An unknown VM, host or migration."""

    status = 404


class StateError(MtevmError):
    """The operation does not fit the VM's current state (e.g. deleting a running VM)."""

    status = 409


class StoreError(MtevmError):
    """The persistent store is corrupted or from a newer mtevm; it is left untouched."""

    status = 500


class StoreWriteError(StoreError):
    """A change could not be written to the store (disk full, read-only, I/O error); nothing changed."""

    reason: str = ""

    @classmethod
    def because(cls, reason) -> "StoreWriteError":
        err = cls(f"the store could not be written: {reason}; nothing changed")
        err.reason = str(reason)
        return err


ERROR_CLASSES = {cls.__name__: cls for cls in
                 (MtevmError, ConfigError, RealizeError, MigrationError, NotFoundError, StateError, StoreError,
                  StoreWriteError)}


def error_payload(err: MtevmError) -> dict:
    """The wire form of an error (socket replies, daemon start-up reports); error_from_name reverses it."""
    return {"error": {"class": type(err).__name__, "message": str(err)}}


def error_from_name(name: str, message: str) -> MtevmError:
    """Rebuild an error received over the socket as the same class the server raised."""
    return ERROR_CLASSES.get(name, MtevmError)(message)
