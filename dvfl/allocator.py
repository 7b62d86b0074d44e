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


def keep_freed_memory(enabled: bool = True) -> bool:
    """Process-wide (every thread's arena), for the rest of the process: a process that sets it owns
    its memory (a training worker, a cache writer, an evaluation task, predict, a Serve replica);
    ``enabled=False`` sets glibc's initial values (its dynamic thresholds stay off). Returns whether
    it took: False off glibc (macOS, musl), where nothing is changed."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in (KEEP if enabled else GLIBC_START).items())
