"""Keep freed memory in the process: LRP allocates the same large buffers batch after batch.

glibc returns every block above its mmap threshold (32 MiB at most by default) to the kernel the
moment it is freed, so each batch page-faults the same activations and Winograd tiles in again, and
the kernel zeroes every page on the way. On VGG16 at batch 8 that is a fifth of the engine's time.
Raising the thresholds keeps those blocks in the heap for the next batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_memory() -> bool:
    """Serve allocations up to 2 GiB from the heap and keep up to 2 GiB of it when freed (process-wide).

    What ``lrp-heatmap`` does at start; worth calling in any long batch job that explains many batches.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    return all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, _LIMIT),
            (_M_TRIM_THRESHOLD, _LIMIT),
            (_M_TOP_PAD, 1 << 28),
        )
    )


def release_freed_memory() -> None:
    """Give the heap's free memory back to the kernel (e.g. before measuring a peak)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
