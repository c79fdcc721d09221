"""The factored training rows of an influence index (``rows="factored"``).

A layer seen once per example (an ``nn.Linear`` on flat inputs: T = 1 position) has the per-example gradient
g ãᵀ (:mod:`~influencekit.core.lowrank`): the index keeps the two vectors, k + out numbers, instead of the out·k
entries; the parameters of every other layer keep their gradient entries. For the 1M-parameter CNN of
benchmarks/scale.py that is ~23,000 numbers per example instead of 962,926. A preconditioned query Q scores the
rows exactly: −(Q_dense · G_dense + Σ_layers g · (Q_layer ã) + Q · λθ̂), the same value as against the dense
gradient up to round-off (another order of the same products), with the flops of a dense dot product.

Per chunk of training examples the folder holds ``rows-<lo>.npy`` (the dense part, ``(rows, width_dense)``) and,
per factored layer j, ``taps-<lo>-<j>-a.npy`` ``(rows, T, k)`` and ``taps-<lo>-<j>-g.npy`` ``(rows, T, out)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from ..core.errors import InputError, UnsupportedError
from ..core.layers import LayerBlock
from ..core.lowrank import Factors, LowRankQueries, dense_block_product, factor_blocks
from ..engine.fitted import FittedEngine

__all__ = ["FactoredRows", "choose_factored"]

ROWS = ("auto", "dense", "factored")


def _stored_factored(f: Factors, explicit: bool) -> list[bool]:
    """Per block: keep the taps? ``auto``: one position and fewer numbers than the gradient (a scan then costs a
    dense dot product's flops); asked for: wherever the taps are fewer numbers (T·(out + k) < out·k)."""
    out = []
    for block, a in zip(f.blocks, f.a):
        o, k = block.index.shape
        T = a.shape[1]
        out.append(T * (o + k) < o * k and (explicit or T == 1))
    return out


def choose_factored(engine: FittedEngine, rows: str, *, space: str) -> tuple[list[LayerBlock], list[bool]] | None:
    """The blocks and which of them the index keeps as taps, or None for dense rows.

    ``rows="auto"`` factors for a Kronecker-factored solver (one that solves from layer taps: K-FAC, EK-FAC) when the
    rows would be parameter
    gradients, every selected parameter is in a tapped layer and one layer qualifies; ``"factored"`` asks for it with
    any solver and names what stands in the way; ``"dense"`` never."""
    if rows not in ROWS:
        raise InputError(f"`rows` must be one of {', '.join(repr(r) for r in ROWS)}. Got {rows!r}.")
    explicit = rows == "factored"
    if rows == "dense" or (not explicit and not engine.solver.capabilities.tap_solve):
        return None
    if space != "parameters":
        if explicit:
            raise InputError(
                f"`rows='factored'` keeps parameter gradients, but this index stores {space} rows "
                "(a solver basis or a gradient store); leave `rows` at 'auto'."
            )
        return None
    source, train = engine.gradients, engine.train
    try:
        factor_blocks(source.task.model, source.layout)
        _, probe = next(
            source.layer_factors(
                train, side="train", start=0, stop=min(len(train), 2), desc="index: probing the layer taps"
            )
        )
    except UnsupportedError as exc:
        if explicit:
            raise UnsupportedError(f"`rows='factored'` needs layer taps: {exc}") from None
        return None
    factored = _stored_factored(probe, explicit)
    if not any(factored):
        if explicit:
            raise InputError(
                "`rows='factored'`: no selected layer has fewer tap values than gradient entries "
                f"(positions per example: {[a.shape[1] for a in probe.a]}); use rows='dense'."
            )
        return None
    return probe.blocks, factored


@dataclass
class FactoredRows:
    """Training rows kept as layer taps where ``factored``, gradient entries elsewhere (module docstring)."""

    blocks: list[LayerBlock]
    factored: list[bool]
    a: list[torch.Tensor | None]  # (n, T, k) per factored block
    g: list[torch.Tensor | None]  # (n, T, out) per factored block
    dense: torch.Tensor  # (n, width_dense): the other blocks' gradient entries, block after block
    l2: torch.Tensor | None  # λθ̂, in every training gradient

    @cached_property
    def columns(self) -> torch.Tensor:
        """The parameter positions of the dense part's columns."""
        parts = [b.index.reshape(-1) for b, f in zip(self.blocks, self.factored) if not f]
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(self.dense.device)

    @classmethod
    def from_factors(cls, f: Factors, factored: list[bool], l2: torch.Tensor | None) -> FactoredRows:
        """One chunk's rows from its layer taps."""
        dense = [f.block_gradient(j).reshape(len(f), -1) for j, keep in enumerate(factored) if not keep]
        empty = torch.zeros(len(f), 0, dtype=f.g[0].dtype, device=f.g[0].device)
        return cls(
            f.blocks,
            factored,
            [x if keep else None for x, keep in zip(f.a, factored)],
            [x if keep else None for x, keep in zip(f.g, factored)],
            torch.cat(dense, dim=1) if dense else empty,
            l2,
        )

    @classmethod
    def cat(cls, parts: list[FactoredRows]) -> FactoredRows:
        first = parts[0]
        join = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return cls(
            first.blocks,
            first.factored,
            [join([p.a[j] for p in parts]) for j in range(len(first.blocks))],
            [join([p.g[j] for p in parts]) for j in range(len(first.blocks))],
            torch.cat([p.dense for p in parts]),
            first.l2,
        )

    def files(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(suffix, array)`` of what a chunk stores: ``""`` the dense part, ``"-<j>-a"``/``"-<j>-g"`` the taps."""
        yield "", self.dense
        for j, keep in enumerate(self.factored):
            if keep:
                yield f"-{j}-a", self.a[j]
                yield f"-{j}-g", self.g[j]

    def __len__(self) -> int:
        return self.dense.shape[0]

    def __getitem__(self, idx: slice | torch.Tensor) -> FactoredRows:
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return FactoredRows(
            self.blocks, self.factored, [pick(x) for x in self.a], [pick(x) for x in self.g], self.dense[idx], self.l2
        )

    def gradients(self, n_params: int) -> torch.Tensor:
        """The rows as per-example gradients ``(n, n_params)``, the L2 term included."""
        G = torch.zeros(len(self), n_params, dtype=self.dense.dtype, device=self.dense.device)
        G[:, self.columns] = self.dense
        for j, block in enumerate(self.blocks):
            if self.factored[j]:
                G[:, block.index] = Factors([block], [self.a[j]], [self.g[j]]).block_gradient(0)
        if self.l2 is not None:
            G += self.l2
        return G

    def scores(self, Q: torch.Tensor) -> torch.Tensor:
        """−⟨Q_i, ∇L(z_j)⟩ for every query row and stored example: ``(q, n)``."""
        S = Q[:, self.columns] @ self.dense.T
        for j, block in enumerate(self.blocks):
            if self.factored[j]:
                S += dense_block_product(Q[:, block.index], self.a[j], self.g[j])
        if self.l2 is not None:
            S += (Q @ self.l2)[:, None]
        return -S

    def low_rank_scores(self, Q: LowRankQueries) -> torch.Tensor:
        """:meth:`scores` of low-rank queries (:class:`~influencekit.core.lowrank.LowRankQueries`): a factored query
        block
        against taps is Σ_r (u_r·g)(v_r·ã); a whole one by :func:`dense_block_product`; a block stored as gradient
        entries takes the query block whole (its factors multiplied out)."""
        q, n = len(Q), len(self)
        S = torch.zeros(q, n, dtype=self.dense.dtype, device=self.dense.device)
        offset = 0
        for j, block in enumerate(self.blocks):
            U, V, M = Q.U[j], Q.V[j], Q.M[j]
            if self.factored[j]:
                taps = Factors([block], [self.a[j]], [self.g[j]])
                S += (
                    LowRankQueries([block], Q.rank, [U], [V], [None]).product(taps)
                    if M is None
                    else dense_block_product(M, self.a[j], self.g[j])
                )
                continue
            width = block.index.numel()
            M = U.transpose(1, 2) @ V if M is None else M  # (q, out, k)
            S += M.reshape(q, -1) @ self.dense[:, offset : offset + width].T
            offset += width
        if self.l2 is not None:
            S += Q.dot(self.l2)[:, None]
        return -S
