"""glibc malloc settings for CPU serving: keep the memory a forward frees for the next forward.

An eager forward frees its activations after each use and allocates them again in the next one.
With glibc's default settings, blocks beyond its mmap threshold are mapped and unmapped on every
allocation, and the top of the heap goes back to the kernel whenever more than its trim threshold
lies free there (both thresholds adapt, up to 32 MiB and 64 MiB); the next forward then faults that
memory in afresh (``python -m benchmarks.cpu_breakdown`` counts the page faults and system time per
forward; the README's "Deploy on CPU" has the measurements). :func:`keep_freed_memory` fixes both
thresholds from Python, what ``GLIBC_TUNABLES`` does at process start.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MIN_MMAP_THRESHOLD", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2 ** 20  # the most glibc's adaptive threshold reaches, and every glibc accepts (64-bit)
TRIM_THRESHOLD = 2 ** 31 - 1  # the largest value mallopt takes (an int): 2 GiB less one byte
MIN_MMAP_THRESHOLD = 128 * 2 ** 10  # glibc's own start: below it more blocks are mapped afresh, not fewer


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


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the whole process and its lifetime:
    ``mallopt(M_MMAP_THRESHOLD, mmap_threshold)`` (blocks below it come from the heap from the
    first allocation on, where glibc's adaptive threshold starts at 128 KiB) and then
    ``mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)`` (the heap's free top stays mapped, never handed
    back). Once the heap has grown to what a forward needs (a few forwards), each eager CPU forward
    reuses memory already faulted in; blocks of ``mmap_threshold`` or more are still mapped afresh
    on each allocation.

    ``mmap_threshold`` (bytes, from glibc's own 128 KiB start, below which more blocks would be
    mapped afresh, to 2 GiB less one byte): the default, 32 MiB, is the most
    glibc's adaptive threshold reaches, so the heap serves the blocks it serves anyway once warm
    (every block of Conformer-S's eager forward at batch 8, 224x224: few page faults once warm,
    where glibc's defaults fault in thousands per forward). A larger value lets the heap serve
    larger batches' blocks too, at a cost glibc's defaults limit to blocks below 32 MiB: a freed
    block that a small long-lived allocation then pins mid-heap is not reused for the next block of
    the same size, so a loop of such rounds grows the heap by a block each time (blocks at or above
    the threshold are mapped, never pinned). Older glibc releases refuse values above 32 MiB
    (False).

    Costs: the process keeps its peak heap (a batch larger than the usual leaves its memory
    reserved), and glibc's adaptive thresholds do not come back (no undo: start a new process).
    Threads other than the main one allocate from their own arenas, whose heaps are at most 64 MiB,
    so large blocks there may still be mapped afresh. Other engines' own memory pools (OpenVINO's)
    and GPU memory are not affected.

    Returns True when both settings took (glibc never refuses the trim threshold); False, changing
    nothing, where the C library is not glibc (musl, macOS, Windows), where another allocator
    serves ``malloc`` (jemalloc or tcmalloc through ``LD_PRELOAD``, which keep freed memory in their
    own way), or where glibc refuses ``mmap_threshold``. The mmap threshold is set first: a trim
    threshold alone also stops the mmap threshold from adapting, and left at its 128 KiB start that
    maps most activations afresh on every allocation."""
    if (not isinstance(mmap_threshold, int) or isinstance(mmap_threshold, bool)
            or not MIN_MMAP_THRESHOLD <= mmap_threshold < 2 ** 31):
        raise ValueError(f"keep_freed_memory: mmap_threshold must be an int in [{MIN_MMAP_THRESHOLD} (128 KiB, glibc's "
                         f"own start), 2**31 - 1] bytes, got {mmap_threshold!r}")
    libc = _glibc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
