"""Giving freed heap memory back to the operating system (glibc's ``malloc_trim``).

Large short-lived allocations made outside torch's own tensors, such as the
tokenizer's per-token objects for a long text (several hundred bytes per
token, made on its worker threads), are freed into glibc's per-thread arenas
and stay in the process's resident memory. ``malloc_trim(0)`` returns the free
pages of every arena. Measured on ``fedprune simulate`` with a 1.3 MB text:
resident memory after tokenizing drops from 570 to 410 MB. Elsewhere (no
glibc) this does nothing.

``bound_heap`` keeps the heap from growing in the first place during a streamed
pass (call it once, before the first large allocation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, on Linux; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim():
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # not glibc (musl has no malloc_trim)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system, where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def bound_heap() -> None:
    """Serve every allocation of 1 MiB or more straight from the OS, and give it back on
    free (glibc's M_MMAP_THRESHOLD, fixed). glibc otherwise raises that threshold as large
    blocks are freed (up to 32 MiB) and keeps later ones on its heap, which fragments: a
    streamed pass over the blocks then grows the process by tens of MB per block.
    No-op elsewhere."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
