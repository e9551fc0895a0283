"""How the server process manages its memory: large blocks are reused, not mapped afresh for
every answer, and the cyclic collector leaves what start-up made alone.

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

Python's cyclic collector stops every Python thread while it runs, and a full collection walks
every object that can hold a reference: each time, the about 50,000 that the imports, the
models and their sessions leave, though they live as long as the process. Under overload, full
collections came three times a minute and stopped the event loop for 25-73 ms each.
`freeze_startup_objects` moves those objects out of the collector's view once the models are
loaded; such a collection then took 2-12 ms (docs/RELIABILITY.md, "Overload"). Reference
counting still frees them; only a cycle among them would outlive its use, and nothing loaded at
start is unloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def freeze_startup_objects() -> int:
    """Collect once, then move every object still alive out of the cyclic collector's view
    (`gc.freeze`), so that later collections walk only what serving makes; returns how many
    objects were moved. Process-wide: call it from the server's entry point, once the models
    are loaded."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
