"""Process tuning for long-running commands: the allocator's mmap threshold and the garbage collector."""

from __future__ import annotations

import ctypes
import gc
import os
import platform

#: glibc's default size from which an allocation gets a mapping of its own (mallopt(3), M_MMAP_THRESHOLD).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Stop glibc from raising its mmap threshold while the process runs; True if it was pinned.

    glibc raises the threshold to the size of every mapped block that is freed (up to 32 MiB), so after one
    large table or buffer is freed, big short-lived blocks come from the main heap instead: asyncio reads a
    socket into a fresh 256 KiB bytes (``recv(256 KiB)``, then shrunk), many times a second. Long-lived
    objects allocated among them (a worker's cached bodies over 512 bytes) leave holes that the next 256 KiB
    never fits, and the heap grows with free space in it: 1.4-3.7 MiB a minute in a worker at 60 events/s,
    with nothing in use growing (RELIABILITY.md, soak). Setting the threshold turns that adjustment off
    (mallopt(3)); the value is glibc's default. ``MALLOC_MMAP_THRESHOLD_`` in the environment (which also
    turns it off) wins; without glibc (musl, macOS) there is nothing to pin.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))


#: The collector's thresholds for long-running commands (gc.set_threshold): see tune_gc.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Collect cycles less often than CPython's default, and never look at the start-up heap again.

    A young-generation collection runs every 700 net allocations of container objects by default, and
    walks every young object still alive. A worker decoding and applying batches keeps thousands of young
    events alive at once (a catch-up holds three batches of 2,000), so each collection walks them and
    promotes them, and every tenth walks them again: a fifth of a catch-up's CPU (BENCHMARKS.md). Nearly
    all of that memory is freed by reference counting anyway; cycles are rare (exceptions, asyncio
    callbacks) and are still collected, just later. ``gc.freeze()`` after start-up moves modules, classes
    and compiled queries to the permanent generation so that full collections skip them.
    """
    gc.set_threshold(*thresholds)
    gc.collect()
    gc.freeze()
