"""Keep the heap from holding on to large message buffers after they are freed, and the
cyclic garbage collector from costing more than it finds.

glibc raises its mmap threshold each time a large block is freed, so after a few 10 MB
messages every later buffer comes from the heap arenas, where fragmentation keeps the memory
long after Python has let go of it (measured: 20 concurrent 10 MB messages peaked at 830 MB
RSS and stayed near it; with a fixed 1 MiB threshold, 520 MB peak and back to 100 MB after).
Setting the threshold explicitly also turns that adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1024 * 1024
# Allocations (less deallocations) between collections of the youngest generation: Python's
# 700 collected several times per message. Measured under smtp-source (bench/README.md, fifth
# round): CPU per message 4-10% lower, peak RSS unchanged (20 x 10 MB: 246 MB; 1,000 idle
# connections: 60 MB): reference counting frees most of what the daemon lets go of; only its
# cycles (an exception's traceback, for one) wait longer.
# The older generations are collected after 20 collections of the one below (Python: 10).
_GC_THRESHOLDS = (10_000, 20, 20)

log = logging.getLogger("ratatoskr")


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; a no-op (False) on other C libraries."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; keeping the C library's default")
    return ok


def tune_gc() -> None:
    """Freeze what start-up made (modules, config: never garbage, and no longer scanned by each
    full collection) and collect the youngest generation less often."""
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
