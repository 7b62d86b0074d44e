"""Let glibc keep the memory a training step (or an evaluation, cache or predict batch) frees, so the
next one does not fault it back in.

A training step allocates and frees the same large activations every step. By default glibc hands
blocks above its mmap threshold (and a heap top above its trim threshold) back to the kernel on
free, so every step page-faults its activations back in, each page zeroed by the kernel first:
on a 2-core Xeon, a bf16 nano step at 8x112^2 batch 8 run in a thread (as Ray Train runs the loop)
took 50-170k page faults and 1.35-2.09 s, and 18-34k faults and 1.01 s with freed memory kept, for
the same peak RSS (docs/training-speed.md).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
GLIBC_START = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}  # glibc's initial values
# no mmap'd blocks, never trim a heap. In a thread's own arena (Ray Train runs the loop in a thread)
# a block larger than glibc's 64 MiB heap is still mmap'd and handed back on free.
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt", None)
    except OSError:
        return None


_kept = False  # what this process last set


def keep_freed_memory(enabled: bool = True) -> bool:
    """Process-wide (every thread's arena); ``enabled=False`` restores glibc's initial settings.
    Returns whether it took: False off glibc (macOS, musl), where nothing is changed."""
    global _kept
    mallopt = _mallopt()
    if mallopt is None:
        return False
    took = all(mallopt(param, value) == 1 for param, value in (KEEP if enabled else GLIBC_START).items())
    if took:
        _kept = enabled
    return took


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True):
    """Freed memory kept inside (``enabled``); afterwards as before: a process that did not keep it
    (a run's driver evaluating between stages) gets glibc's settings back and its freed memory trimmed."""
    if not enabled or _kept:
        yield
        return
    took = keep_freed_memory(True)
    try:
        yield
    finally:
        if took:
            keep_freed_memory(False)
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            getattr(libc, "malloc_trim", lambda _pad: 0)(0)
