"""The process's memory: hand back to the operating system what the C allocator keeps after a stage frees it, and
reuse the large temporaries of a hot loop instead of allocating them afresh.

glibc's malloc keeps freed blocks below its mmap threshold (which rises to 32 MiB as large blocks are freed) inside
its heap for reuse, resident. A fit frees a few GB of per-chunk tensors of every size; without a trim they stay
resident while the scoring allocates its own, and the peak is the sum (MiniLM, every layer, 300 × 50: 5,372 MiB, and
4,733 MiB with a trim after the fit and after each query block is solved; docs/benchmarks.md).

Blocks above the mmap threshold (32 MiB at most) are mapped fresh on every allocation and unmapped on free: each
first touch of their pages is a page fault. A (28, 1536, 385) float32 product made 64 times a chunk by EK-FAC's
correction pass took 52 ms allocated afresh and 24 ms written into a reused buffer (16,171 page faults a call on
this project's 2-core machine). :class:`Workspace` keeps such buffers for the length of a loop.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable

import torch

__all__ = ["Workspace", "release_freed_memory"]


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


class Workspace:
    """Reusable buffers for a loop's large temporaries, one per name: :meth:`take` returns a tensor of the asked
    shape that shares memory with the last one taken under that name (grown when too small), so the caller must be
    done with the previous one first. Hold one for the length of a loop and drop it after: it keeps the largest
    buffer of each name alive until then."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` tensor, in the buffer ``name``."""
        n = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != device:
            del buffer
            self._buffers.pop(name, None)  # freed before the larger one is allocated
            buffer = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buffer[:n].view(shape)
