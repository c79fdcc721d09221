"""The process's memory: hand back to the operating system what the C allocator keeps after a stage frees it.

glibc's malloc keeps freed blocks below its mmap threshold (which rises to 32 MiB as large blocks are freed) inside
its heap for reuse, resident. A fit frees a few GB of per-chunk tensors of every size; without a trim they stay
resident while the scoring allocates its own, and the peak is the sum (MiniLM, every layer, 300 × 50: 5,372 MiB, and
4,733 MiB with a trim after the fit and after each query block is solved; docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the running process, or None (another OS or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: return the allocator's free memory to the OS (a few milliseconds). Returns whether it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
