"""Errors of the tag-check core: the architecture's faults that are not tag-check faults.

They are ``MtevmError`` subclasses so that a front end shows ``str(e)`` as it is; they are
raised before anything changes, so a bad operation loses nothing.
"""
from backend.errors import MtevmError


class TagAlignmentError(MtevmError):
    """A tag store (STG/ST2G/STZG) or a bulk tag copy was not aligned: the alignment fault."""


class OutsideRamError(MtevmError):
    """An address (or part of an access) lies outside the VM's RAM. mtevm never crashes on it."""


class NoTagStorageError(MtevmError):
    """A tag instruction on a VM without MTE: there is no tag storage to touch."""
