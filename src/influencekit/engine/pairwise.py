"""The training side of the score products −Qᵀ∇L(z): preconditioned queries against every training gradient.

Each process scores its shard's training examples (all of them alone); blocks are gathered on every rank,
top-k lists merged from each rank's own. When the solver's results lie in a small orthonormal basis B
(:meth:`~influencekit.solvers.Solver.solution_basis`) the training gradients are projected onto it once and
kept: qᵀg = (qBᵀ)(Bg), so a score costs r products instead of n_params.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from ..core.autodiff import ParamLayout
from ..core.distributed import Shard
from ..core.errors import UnsupportedError
from ..core.layers import GradientPiece, layer_blocks
from ..core.lowrank import Factors, LowRankQueries, factored_layers
from ..core.progress import progress_bar
from ..core.topk import StreamingTopK, helpful_and_harmful
from ..data.examples import Examples, columns
from ..solvers import Solver, SolveReport
from .gradients import GradientSource, matmul_precision

# a training chunk as GradientSource.parts gives it: its examples' indices and their gradient pieces
ChunkPieces = tuple[Sequence[int], Iterator[GradientPiece]]

__all__ = ["TrainingSide", "Coordinates", "low_rank_queries", "scores_without_rows"]


def scores_without_rows(solver: Solver, gradients: str, model: torch.nn.Module, layout: ParamLayout) -> bool:
    """Whether scoring in parameters should hold no whole gradient rows: the solver solves in place and layer taps can
    give every selected parameter's gradients (:meth:`GradientSource.parts`; their check against ``vmap`` on the first
    chunk may still choose otherwise)."""
    if not solver.capabilities.in_place or gradients not in ("auto", "layers"):
        return False
    return not layer_blocks(model, layout, embeddings=True)[1]


def self_influence_of(
    G: torch.Tensor, solver: Solver, solve: Callable[[torch.Tensor], tuple[torch.Tensor, SolveReport]]
) -> tuple[torch.Tensor, SolveReport | None]:
    """gᵀ(H + δI)⁻¹g for each row of ``G``: the solver's quadratic form when it has one (no solve, no report), else
    one block solve."""
    if solver.capabilities.quadratic_form:
        return solver.quadratic_form(G), None
    X, report = solve(G)
    return (X * G).sum(dim=1), report


def low_rank_queries(
    gradients: GradientSource, solver: Solver, test: Examples, rank: int, *, block: int | None, budget: int
) -> Iterator[tuple[int, LowRankQueries, SolveReport]]:
    """Blocks of preconditioned test gradients kept per layer at ``rank`` (:mod:`~influencekit.core.lowrank`), each
    gradient
    chunk solved from its layer taps (:meth:`Solver.low_rank_solve`): ``block`` test points per block, or (``None``)
    as many as ``budget`` bytes of low-rank queries hold. Which layers are factored is decided once, on the first
    chunk's positions per layer, so every block is kept alike."""
    factored: list[bool] | None = None
    parts: list[LowRankQueries] = []
    reports: list[SolveReport] = []
    first = 0
    for lo in range(0, len(test), block or len(test)):
        hi = min(lo + (block or len(test)), len(test))
        for c, f in gradients.layer_factors(test, side="test", start=lo, stop=hi, desc="test layer taps"):
            factored = factored_layers(f.blocks, [a.shape[1] for a in f.a], rank) if factored is None else factored
            q, report = solver.low_rank_solve(f, factored, rank)
            parts.append(q), reports.append(report)
            if block is None and sum(p.nbytes for p in parts) >= budget and c + len(f) < hi:
                yield first, LowRankQueries.cat(parts), combined(reports)
                first, parts, reports = c + len(f), [], []
        if parts:
            yield first, LowRankQueries.cat(parts), combined(reports)
            first, parts, reports = hi, [], []


def combined(reports: list[SolveReport]) -> SolveReport:
    """One report for the solves of one query block's chunks: counts and times added, the worst residual kept."""
    if len(reports) == 1:
        return reports[0]
    return dataclasses.replace(
        reports[0],
        iterations=max(r.iterations for r in reports),
        n_rhs=sum(r.n_rhs for r in reports),
        relative_residual=max(r.relative_residual for r in reports),
        converged=all(r.converged for r in reports),
        hvps=sum(r.hvps for r in reports),
        seconds=sum(r.seconds for r in reports),
    )


class Coordinates(NamedTuple):
    """Training gradients of the examples ``start .. stop − 1`` projected onto ``basis``: ``Z = G Bᵀ``."""

    basis: torch.Tensor
    start: int
    stop: int
    Z: torch.Tensor


class TrainingSide:
    """Score blocks of preconditioned queries against this process's training examples."""

    def __init__(self, gradients: GradientSource, train: Examples, shard: Shard, precision: str) -> None:
        self.gradients = gradients
        self.train = train
        self.shard = shard
        self.precision = precision
        self.coordinates: Coordinates | None = None  # kept until the next fit

    def basis_for(self, solver: Solver, n_test: int) -> torch.Tensor | None:
        """The solver's solution basis ``(r, n_params)`` when scoring in it is cheaper, else None.

        Worth it when r < n_test (projecting costs r products per training gradient, the direct route n_test),
        or when the projections are already kept."""
        basis = solver.solution_basis()
        if basis is None or basis.shape[0] >= self.gradients.layout.n:
            return None
        kept = self.coordinates is not None and self.coordinates.basis is basis
        return basis if (kept or basis.shape[0] < n_test) else None

    @staticmethod
    def space_name(basis: torch.Tensor | None, query_rank: int | None = None) -> str:
        if query_rank is not None:
            return f"low-rank queries (rank {query_rank} per factored layer)"
        return "parameters" if basis is None else f"solver basis (rank {basis.shape[0]})"

    def rows(self, basis: torch.Tensor | None, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Training-side rows of this process's shard in chunks: gradients, or their coordinates in ``basis``."""
        start, stop = self.shard.start, self.shard.stop
        if basis is None:
            yield from self.gradients.stream(self.train, side="train", start=start, stop=stop, desc=desc)
            return
        c = self.coordinates
        if c is None or c.basis is not basis or (c.start, c.stop) != (start, stop):
            Z = torch.empty(stop - start, basis.shape[0], dtype=basis.dtype, device=basis.device)
            for lo, G in self.gradients.stream(
                self.train, side="train", start=start, stop=stop, desc=f"{desc} (projecting onto the solver's basis)"
            ):
                Z[lo - start : lo - start + len(G)] = G @ basis.T
            self.coordinates = c = Coordinates(basis, start, stop, Z)
        step = self.gradients.chunk
        for lo in range(start, stop, step):
            yield lo, c.Z[lo - start : min(lo + step, stop) - start]

    def dot(self, Qs: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Qs Gᵀ of a block of queries against gradient rows (or their coordinates), in ``precision``."""
        if self.precision == "bf16":
            return (Qs.to(torch.bfloat16) @ G.to(torch.bfloat16).T).to(Qs.dtype)
        with matmul_precision(self.precision):
            return Qs @ G.T

    def product(self, Qs: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Scores −Qs Gᵀ of a block of preconditioned queries against training rows, in ``precision``."""
        return -self.dot(Qs, G)

    def chunk_scores(self, Q: torch.Tensor, chunk: ChunkPieces, l2: torch.Tensor | None) -> torch.Tensor:
        """Scores −Qᵀ∇L(z) of a block of queries against one chunk ``(indices, pieces)`` of
        :meth:`GradientSource.parts`, a piece at a time; ``l2`` is Q's product with the L2 term λθ̂ (the pieces
        leave it out), or None."""
        indices, pieces = chunk
        S = torch.zeros(len(Q), len(indices), dtype=Q.dtype, device=Q.device)
        for piece in pieces:
            S += piece.dot(Q, self.dot)
        return -(S if l2 is None else S + l2[:, None])

    def chunks(self, desc: str) -> Iterator[tuple[Sequence[int], ChunkPieces]]:
        """``(indices, (indices, pieces))`` per training chunk of this shard (:meth:`GradientSource.parts`, in
        batches of similar lengths for token sequences)."""
        for indices, pieces in self.gradients.parts(
            self.train, side="train", start=self.shard.start, stop=self.shard.stop, desc=desc
        ):
            yield indices, (indices, pieces)

    def l2_dot(self, Q: torch.Tensor) -> torch.Tensor | None:
        """Qλθ̂, the L2 term's part of every training example's score (None without L2)."""
        l2 = self.gradients.l2_term
        return None if l2 is None else self.dot(Q, l2[None])[:, 0]

    def score_rows(self, Q: torch.Tensor | LowRankQueries, basis: torch.Tensor | None) -> torch.Tensor:
        """−Qᵀ∇L(z) for every training point z, ``(len(Q), n_train)`` on every rank (``Q`` dense or low-rank).

        In parameters, each training chunk is scored a piece at a time (a layer's parameter, from layer taps): one
        training pass per query block, and no chunk of whole gradient rows in memory."""
        if isinstance(Q, LowRankQueries):
            return self.low_rank_score_rows(Q)
        start, stop = self.shard.start, self.shard.stop

        def local() -> torch.Tensor:
            block = torch.empty(len(Q), stop - start, dtype=Q.dtype, device=Q.device)
            if basis is None:
                l2 = self.l2_dot(Q)
                for indices, chunk in self.chunks("scoring"):
                    block[:, columns(indices, start)] = self.chunk_scores(Q, chunk, l2)
                return block
            Qs = Q @ basis.T
            for lo, G in self.rows(basis, "scoring"):
                block[:, lo - start : lo - start + len(G)] = self.product(Qs, G)
            return block

        return self.shard.gather_columns(self.shard.local(local))

    def group_score_rows(self, Q: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
        """−Q[:, g] ∇L(z)[g] for each group g of parameter coordinates, ``(len(groups), len(Q), n_train)`` on every
        rank; the groups' rows add up to :meth:`score_rows` when they partition the parameters."""
        start, stop = self.shard.start, self.shard.stop

        def local() -> torch.Tensor:
            block = torch.empty(len(groups), len(Q), stop - start, dtype=Q.dtype, device=Q.device)
            parts = [Q[:, g] for g in groups]
            for lo, G in self.rows(None, "scoring per module"):
                for j, g in enumerate(groups):
                    block[j, :, lo - start : lo - start + len(G)] = self.product(parts[j], G[:, g])
            return block

        return self.shard.gather_columns(self.shard.local(local))

    def top_k(
        self, Q: torch.Tensor | LowRankQueries, basis: torch.Tensor | None, k: int
    ) -> tuple[StreamingTopK, StreamingTopK]:
        """The ``k`` most negative (helpful) and most positive (harmful) scores per query, over every rank."""
        if isinstance(Q, LowRankQueries):
            return self.low_rank_top_k(Q, k)

        def local() -> tuple[StreamingTopK, StreamingTopK]:
            if basis is None:
                l2 = self.l2_dot(Q)
                return helpful_and_harmful(Q, self.chunks("top-k"), k, lambda q, chunk: self.chunk_scores(q, chunk, l2))
            return helpful_and_harmful(Q @ basis.T, self.rows(basis, "top-k"), k, self.product)

        helpful, harmful = self.shard.local(local)
        return helpful.merged(self.shard), harmful.merged(self.shard)

    def low_rank_rows(self, queries: LowRankQueries, desc: str) -> Iterator[tuple[int, Factors]]:
        """This shard's training layer taps in chunks, for :meth:`low_rank_product`."""
        yield from self.gradients.layer_factors(
            self.train, side="train", start=self.shard.start, stop=self.shard.stop, desc=desc
        )

    def low_rank_product(self, queries: LowRankQueries, f: Factors) -> torch.Tensor:
        """Scores −⟨query, ∇L(z)⟩ of low-rank queries against a chunk of training taps, the L2 term λθ̂ included."""
        with matmul_precision(self.precision if self.precision != "bf16" else "full"):
            S = queries.product(f)
        l2 = self.gradients.l2_term
        return -(S if l2 is None else S + queries.dot(l2)[:, None])

    def low_rank_score_rows(self, queries: LowRankQueries) -> torch.Tensor:
        """:meth:`score_rows` for low-rank queries: ``(len(queries), n_train)`` on every rank."""
        start, stop = self.shard.start, self.shard.stop

        def local() -> torch.Tensor:
            block = torch.empty(
                len(queries), stop - start, dtype=self.gradients.layout.dtype, device=self.gradients.layout.device
            )
            for lo, f in self.low_rank_rows(queries, "scoring (low-rank queries)"):
                block[:, lo - start : lo - start + len(f)] = self.low_rank_product(queries, f)
            return block

        return self.shard.gather_columns(self.shard.local(local))

    def low_rank_top_k(self, queries: LowRankQueries, k: int) -> tuple[StreamingTopK, StreamingTopK]:
        """:meth:`top_k` for low-rank queries."""

        def local() -> tuple[StreamingTopK, StreamingTopK]:
            n = len(queries)
            probe = torch.empty(n, 0, dtype=self.gradients.layout.dtype, device=self.gradients.layout.device)
            return helpful_and_harmful(
                probe,
                self.low_rank_rows(queries, "top-k (low-rank queries)"),
                k,
                lambda _q, f: self.low_rank_product(queries, f),
            )

        helpful, harmful = self.shard.local(local)
        return helpful.merged(self.shard), harmful.merged(self.shard)

    def _quadratic_forms(
        self, solver: Solver, solve: Callable[[torch.Tensor], tuple[torch.Tensor, SolveReport]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, gᵀ(H + δI)⁻¹g)`` per chunk of this shard: from layer taps when the solver takes them and the
        gradients come from taps (K-FAC/EK-FAC: no gradient is materialised), else from the gradient rows."""
        source, shard = self.gradients, self.shard
        if solver.capabilities.tap_quadratic_form:
            taps = source.layer_factors(
                self.train, side="train", start=shard.start, stop=shard.stop, desc="self-influence (layer taps)"
            )
            try:
                first = next(taps)
            except StopIteration:  # an empty shard
                return
            except UnsupportedError:  # a parameter outside tapped layers, or gradients not from taps: the rows below
                first = None
            if first is not None:
                for lo, f in itertools.chain([first], taps):
                    yield lo, solver.tap_quadratic_form(f, source.l2_term)
                return
        for lo, G in source.stream(self.train, side="train", start=shard.start, stop=shard.stop, desc="self-influence"):
            yield lo, self_influence_of(G, solver, solve)[0]

    def self_influence(
        self, solver: Solver, solve: Callable[[torch.Tensor], tuple[torch.Tensor, SolveReport]]
    ) -> tuple[torch.Tensor, list[SolveReport]]:
        """∇L(z)ᵀ(H + δI)⁻¹∇L(z) for every training point on every rank, and the reports of the solves.

        With the solver's quadratic form: each rank its own shard, then gathered. Else one block solve per
        gradient chunk, the chunks the same as in one process: each rank computes the gradients of the chunk's
        examples in its shard, the chunk is gathered and solved by all ranks together."""
        n, shard, source = len(self.train), self.shard, self.gradients
        layout = source.layout
        out = torch.empty(n, dtype=layout.dtype, device=layout.device)
        reports: list[SolveReport] = []
        if solver.capabilities.quadratic_form:  # no solve

            def local() -> torch.Tensor:
                part = torch.empty(shard.stop - shard.start, dtype=out.dtype, device=out.device)
                for lo, values in self._quadratic_forms(solver, solve):
                    part[lo - shard.start : lo - shard.start + len(values)] = values
                return part

            out[:] = shard.gather_columns(shard.local(local))
            return out, reports
        solves = progress_bar(total=n, desc="self-influence solves", enabled=source.progress)
        for lo in range(0, n, source.chunk):
            hi = min(lo + source.chunk, n)
            a, b = max(lo, shard.start), min(hi, shard.stop)
            counts = [max(0, min(hi, e) - max(lo, s)) for s, e in shard.bounds]
            mine = shard.local(
                lambda a=a, b=b: (
                    source.block(self.train, side="train", start=a, stop=b, desc="self-influence")
                    if b > a
                    else torch.zeros(0, layout.n, dtype=out.dtype, device=out.device)
                )
            )
            G = shard.gather_rows(mine, counts)
            out[lo:hi], report = self_influence_of(G, solver, solve)
            reports.append(report)
            solves.update(hi - lo)
        solves.close()
        return out, reports
