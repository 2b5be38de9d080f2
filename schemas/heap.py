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

Models that travel in chunks (gigabytes through short-lived 8 MiB buffers in several threads)
want the opposite for big blocks: ``return_big_buffers()`` maps every block of 1 MiB or more
and unmaps it on free, so freed chunk buffers never pile up in the arenas (measured: +0.9 GB
resident after three 512 MB updates without it). Its price is a fresh mapping per such block
(rounds of a 4 MB model 2.5x slower), so the aggregator and the agent call it only once they
know their model will be chunked; the trim threshold set by ``keep_heap`` stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_BYTES = 64 * 2**20
TRIM_BYTES = 256 * 2**20


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt(param, value)`` for each setting; False where there is no glibc or it refused one."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([bool(mallopt(param, value)) for param, value in settings])


def keep_heap() -> bool:
    """Set the two thresholds for this process; True if glibc took them."""
    if os.environ.get("FEDWB_KEEP_HEAP", "1") == "0":
        return False
    return _mallopt((M_MMAP_THRESHOLD, MMAP_BYTES), (M_TRIM_THRESHOLD, TRIM_BYTES))


def return_big_buffers(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, returned on free (chunked
    models only: see the module's docstring). False where there is no glibc."""
    return _mallopt((M_MMAP_THRESHOLD, int(threshold)))
