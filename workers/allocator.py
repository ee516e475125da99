"""How the worker process's C allocator treats memory freed between steps.

glibc's defaults suit short programs, not a decode loop. Each step's larger
temporaries (an MLP's activations, the logits, a batch's KV buffers) are
over its 128 KiB mmap threshold, so every step maps fresh pages, faults them
in, and unmaps them again; freed memory at the top of the heap is handed back
as soon as 128 KiB of it is free, and re-faulted on the next step. A batch's
KV cache (tens of MB) was unmapped in the step its last row left: ~9 ms in
one step on the 4M test model at batch 64. Measured on the 2-core machine
(bench/step_overhead.py, 4M model, batch 64): the forward pass took 19.0
instead of 21.7 ms a step, and the rest of the step 15.2 instead of 18.4 us a
token (see bench/README.md, "The allocator").

So the worker keeps what it frees while it is busy: blocks up to 32 MiB (the
most glibc allows) come from the heap, and the heap is not trimmed while
requests run. Once the worker has been idle for IDLE_RELEASE_S it hands the
free memory back (malloc_trim), so an idle worker's resident size falls back
instead of staying at its busiest. LOOM_KEEP_FREED_MEMORY=0 keeps glibc's
defaults (for comparison). Other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger("loom.worker")

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (half its 64 MiB heap size)
TRIM_THRESHOLD = 2**31 - 1  # the most mallopt takes: in effect never on its own; IdleRelease trims
IDLE_RELEASE_S = 2.0

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # glibc only
        except (OSError, AttributeError):
            libc = False
        _libc = libc
    return _libc or None


def keep_freed_memory() -> bool:
    """Make freed memory stay in the process while it is busy; True if the allocator took it."""
    if os.environ.get("LOOM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if ok:
        log.info("allocator: freed memory kept for reuse while requests run (blocks up to %d MiB from the heap), "
                 "handed back after %.0f s idle", MMAP_THRESHOLD >> 20, IDLE_RELEASE_S)
    return ok


class IdleRelease:
    """Hands free memory back to the system once the worker has been idle a while (once per idle spell)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._idle_since: float | None = None
        self._released = True

    def tick(self, busy: bool, now: float | None = None) -> bool:
        """Call once per engine loop; True when it released memory this call."""
        if not self.enabled:
            return False
        if busy:
            self._idle_since, self._released = None, False
            return False
        now = time.monotonic() if now is None else now
        if self._idle_since is None:
            self._idle_since = now
        if self._released or now - self._idle_since < IDLE_RELEASE_S:
            return False
        self._released = True
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
        return True
