"""The tag-check core: MTE allocation tags, tag instructions and checked accesses (numpy only).

See docs/contracts.md "backend.tagcheck" for the API other modules use.
"""
from backend.tagcheck.cpu import TagCheckCpu
from backend.tagcheck.errors import NoTagStorageError, OutsideRamError, TagAlignmentError
from backend.tagcheck.layout import GRANULE, PAGE
from backend.tagcheck.ram import GuestRam
from backend.tagcheck.results import BatchResult, FaultRecord, VcpuCounters
from backend.tagcheck.tags import TagMemory
from backend.tagcheck.tcf import TCF

__all__ = ["GRANULE", "PAGE", "TCF", "TagMemory", "GuestRam", "TagCheckCpu", "BatchResult", "FaultRecord",
           "VcpuCounters", "TagAlignmentError", "OutsideRamError", "NoTagStorageError"]
