"""Keep freed buffers for reuse instead of handing them back to the kernel (glibc's allocator).

Every update and every global model passes through buffers of the model's size: the packet
read from the socket, the tensors decoded from it, the payload encoded for the next publish.
With glibc's defaults a block above its (dynamic) mmap threshold is mapped and unmapped each
time, the heap's free top beyond twice that threshold is trimmed, and thread arenas shrink: so
the next buffer of the same size faults its pages in again, one fault per 4 KiB page, which on
a virtual machine costs microseconds each. ``keep_heap()`` sets

- ``M_MMAP_THRESHOLD`` = ``MMAP_BYTES``: blocks below it come from the heap and are reused;
  bigger ones (a chunked model's large tensors) are still mapped and given back when freed;
- ``M_TRIM_THRESHOLD`` = ``TRIM_BYTES``: free heap memory stays mapped up to that much,

the way long-running servers keep their high-water mark. The processes that call it (the
aggregator and the agent) then hold at most about ``TRIM_BYTES`` more than their working set.
``FEDWB_KEEP_HEAP=0`` leaves glibc's defaults; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_BYTES = 64 * 2**20
TRIM_BYTES = 256 * 2**20


def keep_heap() -> bool:
    """Set the two thresholds for this process; True if glibc took them."""
    if os.environ.get("FEDWB_KEEP_HEAP", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
