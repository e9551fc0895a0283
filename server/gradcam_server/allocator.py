"""How the server process takes memory from the system: large blocks are reused, not mapped
afresh for every answer.

glibc's malloc maps every block above its mmap threshold (at most 32 MiB) on its own, and unmaps
it when freed; the next such block is new memory, whose every 4 KiB page faults on first touch.
gRPC copies each response into a new buffer of its own on the event loop, so a 46 MiB answer
cost 11,777 page faults there: the loop stalled 35-45 ms per answer on a 2-core VM, against
12-19 ms for the same copy into memory used before (docs/RELIABILITY.md, "Health while large
heatmaps are made"). `reuse_freed_memory` has malloc serve every block from its heaps and keep
up to `KEPT_FREE_BYTES` free at a heap's top, so a freed answer's pages serve the next one.

The price is that the resident set stays near its high-water mark: what was freed is kept
for reuse, not returned. The peak itself is what the server's bounds make it (requests in
flight, message size, augmented variants held); ``gradcam-server --return-freed-memory``
keeps glibc's defaults. Elsewhere than glibc (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
KEPT_FREE_BYTES = 256 * 2**20
"""Free memory at the top of a heap beyond this is given back to the system."""


def reuse_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks, large ones included (see the module); True where
    it took effect, False where the C library is not glibc or refused."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    # mallopt returns 1 on success: no more blocks mapped on their own, and freed memory at a
    # heap's top kept up to KEPT_FREE_BYTES
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(
        _M_TRIM_THRESHOLD, KEPT_FREE_BYTES) == 1
    if not applied:
        log.warning("glibc refused the allocator settings; large answers map new memory")
    return applied
