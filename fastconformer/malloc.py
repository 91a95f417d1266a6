"""glibc malloc settings for CPU serving: keep the memory a forward frees for the next forward.

An eager forward frees its activations after each use and allocates them again in the next one.
With glibc's default settings, blocks beyond its mmap threshold are mapped and unmapped on every
allocation, and the top of the heap goes back to the kernel whenever more than its trim threshold
lies free there (both thresholds adapt, up to 32 MB and 64 MB); the next forward then faults that
memory in afresh (``python -m benchmarks.cpu_breakdown`` counts the page faults and system time per
forward; the README's "Deploy on CPU" has the measurements).
:func:`keep_freed_memory` sets both thresholds from Python, what
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`` does at process
start.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["THRESHOLD", "keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
THRESHOLD = 2 ** 31 - 1  # the largest value mallopt takes (an int): 2 GiB less one byte
MMAP_THRESHOLD_CAPPED = 32 * 2 ** 20  # the most older glibc releases accept (64-bit: HEAP_MAX_SIZE / 2)


def _glibc() -> ctypes.CDLL | None:
    """glibc, when it is this process's C library and its ``malloc`` is the one the process calls
    (not a jemalloc or tcmalloc preloaded through ``LD_PRELOAD``); else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL("libc.so.6")
        default = ctypes.CDLL(None)
    except (AttributeError, OSError, ValueError):  # no confstr (Windows), no such name (musl, macOS)
        return None
    address = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    return libc if address == ctypes.cast(default.malloc, ctypes.c_void_p).value else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the whole process and its lifetime:
    ``mallopt(M_MMAP_THRESHOLD, ...)`` (blocks up to 2 GiB come from the heap, not from a mapping
    of their own) and then ``mallopt(M_TRIM_THRESHOLD, ...)`` (the heap's free top stays mapped),
    both :data:`THRESHOLD` (older glibc releases cap the mmap threshold at 32 MiB: there it is set to
    that, and larger blocks are still mapped afresh each time). Each eager CPU forward after the first
    then reuses memory already faulted in.

    Costs: the process keeps its peak heap (a batch larger than the usual leaves its memory
    reserved), and glibc's adaptive thresholds do not come back (no undo: start a new process). It
    changes nothing for other engines' own memory pools (OpenVINO) and nothing on the GPU.

    Returns True when the settings took; False, changing nothing, where the C library is not glibc
    (musl, macOS, Windows), where another allocator serves ``malloc`` (jemalloc or tcmalloc through
    ``LD_PRELOAD``, which keep freed memory in their own way), or where glibc refuses both values.
    The mmap threshold is set first: a trim threshold alone would also stop the mmap threshold from
    adapting, at its 128 KiB default, and map most activations afresh on every allocation."""
    libc = _glibc()
    if libc is None:
        return False
    if not (libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CAPPED)):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
