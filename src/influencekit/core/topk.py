"""Streaming top-k: the k largest values per row of a matrix seen in column blocks, never held whole.

Used by :meth:`Influence.top_k <influencekit.Influence.top_k>` (per rank, then merged across ranks), by
:meth:`GradientStore.top_k <influencekit.GradientStore.top_k>` and by the influence index, all through
:func:`helpful_and_harmful`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from .distributed import Shard

__all__ = ["StreamingTopK", "helpful_and_harmful"]

Rows = TypeVar("Rows")  # what a block of training examples is scored from: gradient rows, taps, pieces


class StreamingTopK:
    """The ``k`` largest values of each of ``rows`` rows, and their column indices, over blocks of columns."""

    def __init__(self, rows: int, k: int, *, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        self.k = int(k)
        self.values = torch.empty(rows, 0, dtype=dtype, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Merge a block ``values`` ``(rows, m)`` whose columns have the indices ``indices`` ``(rows, m)``."""
        vals = torch.cat([self.values, values], dim=1)
        idx = torch.cat([self.indices, indices], dim=1)
        top, pos = torch.topk(vals, min(self.k, vals.shape[1]), dim=1)
        self.values, self.indices = top, torch.gather(idx, 1, pos)

    def add_block(self, values: torch.Tensor, first: int | Sequence[int]) -> None:
        """Merge a block ``values`` ``(rows, m)`` of the consecutive columns ``first .. first + m − 1``, or of the
        columns ``first`` given one by one (a batch of similar lengths)."""
        if isinstance(first, int):
            cols = torch.arange(first, first + values.shape[1], device=values.device)
        else:
            cols = torch.as_tensor(list(first), dtype=torch.long, device=values.device)
        self.update(values, cols.expand(values.shape[0], -1))

    def merged(self, shard: Shard) -> StreamingTopK:
        """Every rank's top-k of its own shard's columns merged into the top-k over all columns (on every rank):
        ``(rows, k·world)`` candidates travel, never the whole matrix."""
        widths = [min(self.k, stop - start) for start, stop in shard.bounds]
        values = shard.gather_columns(self.values, widths)
        if values is self.values:  # nothing came from other ranks (a single process): already the answer
            return self
        out = StreamingTopK(self.values.shape[0], self.k, dtype=self.values.dtype, device=self.values.device)
        out.update(values, shard.gather_columns(self.indices, widths))
        return out


def helpful_and_harmful(
    Q: torch.Tensor,
    blocks: Iterable[tuple[int | Sequence[int], Rows]],
    k: int,
    product: Callable[[torch.Tensor, Rows], torch.Tensor],
) -> tuple[StreamingTopK, StreamingTopK]:
    """The ``k`` most negative (helpful, kept as the top-k of −S) and most positive (harmful) scores per query, over
    ``blocks`` ``(first column or the columns, rows)`` whose scores are ``S = product(Q, rows)``."""
    helpful = StreamingTopK(len(Q), k, dtype=Q.dtype, device=Q.device)
    harmful = StreamingTopK(len(Q), k, dtype=Q.dtype, device=Q.device)
    for lo, rows in blocks:
        S = product(Q, rows)
        helpful.add_block(-S, lo)
        harmful.add_block(S, lo)
    return helpful, harmful
