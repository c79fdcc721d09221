"""release_freed_memory: glibc's malloc_trim hands freed heap memory back (the resident size falls)."""

import sys

import pytest
import torch

from influencekit.core.memory import release_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_heap_memory_is_returned():
    """3,000 tensors of 64 KiB (below glibc's mmap threshold: they live in the heap), all freed but the last, which
    pins the heap's top so that glibc's automatic trim cannot shrink it: ~190 MiB stay resident until the trim."""
    if not release_freed_memory():
        pytest.skip("this C library has no malloc_trim")
    kept = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each, written: resident
    last = kept[-1]
    del kept
    before = _rss_mib()
    assert release_freed_memory()
    after = _rss_mib()
    assert before - after > 100, (before, after)  # measured: 188 MiB returned
    assert float(last.sum()) == 16 * 1024  # what is still in use is untouched


def test_workspace_reuses_one_buffer_per_name_and_grows_when_asked_for_more():
    from influencekit.core.memory import Workspace

    ws = Workspace()
    first = ws.take("rows", (4, 6), dtype=torch.float32, device=torch.device("cpu"))
    second = ws.take("rows", (3, 5), dtype=torch.float32, device=torch.device("cpu"))
    assert second.shape == (3, 5) and second.data_ptr() == first.data_ptr()  # the same memory, a smaller view
    other = ws.take("other", (3, 5), dtype=torch.float32, device=torch.device("cpu"))
    assert other.data_ptr() != first.data_ptr()  # names do not share
    larger = ws.take("rows", (10, 10), dtype=torch.float32, device=torch.device("cpu"))
    assert larger.shape == (10, 10) and larger.is_contiguous()
    wider = ws.take("rows", (2, 2), dtype=torch.float64, device=torch.device("cpu"))
    assert wider.dtype == torch.float64  # a dtype change gets a buffer of that dtype
