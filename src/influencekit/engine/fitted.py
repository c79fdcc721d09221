"""The fitted engine: everything ``Influence.fit()`` builds, as one immutable object.

:func:`fit_engine` checks the data and θ̂, plans the chunks, measures ‖∇R(θ̂)‖ and fits the solver; it returns a
:class:`FittedEngine` holding the training data, the parameter layout, the shard, the chunk plan, the gradient
source, the training side of the score products, the curvature operator and the fitted solver. The modules built on
the engine (groups, perturbations, the gradient store, the index, validation, applications) take a ``FittedEngine``
as an argument; none of them reads :class:`~influencekit.engine.scoring.Influence`'s attributes.

Imported by the engine parts that work on a fitted engine (groups, perturbation) and everything above them; it
imports nothing of theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..core.autodiff import ParamLayout
from ..core.checks import check_int
from ..core.distributed import Shard, resolve_shard
from ..core.errors import InputError
from ..core.folders import fingerprint
from ..core.lowrank import LowRankQueries
from ..core.memory import release_freed_memory
from ..core.task import Task
from ..data.examples import Examples, take
from ..solvers import Solver, SolveReport
from .config import Chunks, InfluenceConfig, Provenance, plan_chunks
from .gradients import GradientSource, objective_gradient_norm, warn_if_not_stationary
from .hessian import HessianOperator
from .pairwise import TrainingSide, combined, low_rank_queries, scores_without_rows
from .persistence import DATA_HEAD, SolverCache

__all__ = ["FittedEngine", "fit_engine", "data_fingerprint"]

logger = logging.getLogger(__name__)


def data_fingerprint(gradients: GradientSource, data: Examples, examples: int = DATA_HEAD) -> str:
    """sha256 of the first ``examples`` examples of ``data`` as the engine sees them (the manifests' data check)."""
    return fingerprint(gradients.take(data, range(min(len(data), examples))))


@dataclass(frozen=True)
class FittedEngine:
    """The state of a fitted :class:`~influencekit.engine.scoring.Influence`, built once by :func:`fit_engine`.

    Attributes:
        task: the task (model, loss, selected parameters) the engine was fitted for.
        config: the validated configuration (solver, damping, chunks, budget, precision).
        train: the training data as :class:`~influencekit.data.Examples`.
        params: θ̂, a copy taken at fit time (training the model further does not move it).
        layout: how ``params`` flatten to one vector of ``n_params`` coordinates.
        shard: this rank's part of the training set (one rank when not distributed).
        progress: whether this rank shows progress bars.
        provenance: the configuration's fingerprint for manifests and result metadata.
        chunks: examples per chunk for gradients, HVPs, tangents and query blocks.
        gradients: the per-example gradient source of both sides.
        training_side: the streamed training side of the score products.
        operator: the damped curvature operator H + δI.
        solver: the fitted solver of (H + δI)⁻¹.
        grad_norm: ‖∇R(θ̂)‖ (NaN where the stationarity check was skipped).
        train_loss: R(θ̂) measured with it (NaN likewise).
        solver_loaded: whether the solver was read from ``cache_dir`` instead of fitted.
    """

    task: Task
    config: InfluenceConfig
    train: Examples
    params: dict[str, torch.Tensor]
    layout: ParamLayout
    shard: Shard
    progress: bool
    provenance: Provenance
    chunks: Chunks
    gradients: GradientSource
    training_side: TrainingSide
    operator: HessianOperator
    solver: Solver
    grad_norm: float
    train_loss: float
    solver_loaded: bool

    @property
    def n_train(self) -> int:
        return len(self.train)

    def data_fingerprint(self, data: Examples, examples: int = DATA_HEAD) -> str:
        """sha256 of the first ``examples`` examples of ``data`` as this engine sees them."""
        return data_fingerprint(self.gradients, data, examples)

    def solve(self, V: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, SolveReport]:
        """(H + δI)⁻¹ applied to each row of ``V``, and the solver's report (logged)."""
        x, report = self.solver.solve(V, overwrite=overwrite)
        logger.info("solve: %s", report)
        return x, report

    def metadata(self, reports: list[SolveReport], **extra: Any) -> dict[str, Any]:
        """A result's metadata: the configuration, the solve reports, ‖∇R(θ̂)‖, the gradient methods and ``extra``."""
        return self.provenance.metadata(reports, self.grad_norm, gradients=self.gradients.describe(), **extra)

    def queries(
        self,
        test: Examples,
        *,
        block: int | None = None,
        skip: Callable[[int], bool] | None = None,
        query_rank: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor | LowRankQueries, SolveReport]]:
        """Blocks of preconditioned test gradients: ``(offset, (H + δI)⁻¹∇ℓ(z_test) rows, report)``.

        ``block`` test points at a time (default: as the memory budget allows); blocks whose offset ``skip`` accepts
        are skipped (finished score files). ``query_rank``: :class:`~influencekit.core.lowrank.LowRankQueries`."""
        # each rank solves the same blocks: a different test set would hang them
        self.shard.check_same("the test set", {"n_test": len(test)})
        if query_rank is not None:  # blocks of `block` test points, or as many as half the memory budget holds
            yield from low_rank_queries(
                self.gradients,
                self.solver,
                test,
                check_int("query_rank", query_rank, low=1),
                block=block,
                budget=self.config.memory_budget // 2,
            )
            return
        block = block or self.chunks.queries
        if self._solves_from_taps(test):
            yield from self._queries_from_taps(test, block, skip)
            return
        for lo in range(0, len(test), block):
            if skip is not None and skip(lo):
                continue
            hi = min(lo + block, len(test))
            # the gradients are not bound in this frame, and the solved block is unbound before the next one is
            # computed (one block of queries in memory at a time)
            solved = self.solve(
                self.gradients.block(test, side="test", start=lo, stop=hi, desc="test gradients"), overwrite=True
            )
            release_freed_memory()  # the test gradients', before the training pass allocates its own
            yield (lo, *solved)
            del solved

    def _solves_from_taps(self, data: Examples) -> bool:
        """Whether the solver takes the test side's layer taps (:meth:`Solver.solve_taps`): it can, every parameter
        is in a factored dense layer, and the taps give the test gradients."""
        if not self.solver.capabilities.tap_solve or not self.solver.tap_solvable() or len(data) == 0:
            return False
        # chosen as on the first chunk: choose_per_example checks the taps against vmap on its first 4 examples
        self.gradients.per_example("test", self.gradients.take(data, range(min(len(data), 4))))
        return self.gradients.methods["test"] == "layers"

    def _queries_from_taps(
        self, data: Examples, block: int, skip: Callable[[int], bool] | None
    ) -> Iterator[tuple[int, torch.Tensor, SolveReport]]:
        """:meth:`queries` solved from the test layer taps chunk by chunk into the block: no gradient rows formed."""
        for lo in range(0, len(data), block):
            if skip is not None and skip(lo):
                continue
            hi = min(lo + block, len(data))
            X = torch.empty(hi - lo, self.layout.n, dtype=self.layout.dtype, device=self.layout.device)
            factors = self.gradients.layer_factors(data, side="test", start=lo, stop=hi, desc="test layer taps")
            report = combined([self.solver.solve_taps(f, X[c - lo : c - lo + len(f)]) for c, f in factors])
            logger.info("solve: %s", report)
            release_freed_memory()  # the test taps', before the training pass allocates its own
            yield lo, X, report
            del X  # the caller's block is freed before the next one is built: one block in memory at a time


def _checked_params(task: Task) -> dict[str, torch.Tensor]:
    """A copy of θ̂ (training the model further after fit() must not silently change θ̂ under a fitted Hessian),
    refused where it holds NaN/inf."""
    params = {name: value.clone() for name, value in task.params().items()}
    for name, value in params.items():
        if not bool(torch.isfinite(value).all()):
            raise InputError(
                f"the model parameter {name!r} holds NaN/inf values; influence needs a finite trained model."
            )
    return params


def fit_engine(task: Task, train_data: Any, config: InfluenceConfig) -> FittedEngine:
    """Check the data and θ̂, plan the chunks, measure ‖∇R(θ̂)‖ and fit (or load) the solver on H + δI."""
    task.check_mode()
    task.check_examples(train_data, "train")  # e.g. token ids outside the vocabulary: before any model pass
    solver = config.solver
    train = Examples(train_data, name="train")
    params = _checked_params(task)
    layout = ParamLayout.of(params)
    shard = resolve_shard(config.distributed, len(train), layout.device)
    progress = config.progress and shard.rank == 0
    provenance = Provenance.of(task, solver, config, params, len(train))
    shard.check_same("the model, data and configuration", provenance.agreement(config))
    shard.check_solver(solver)
    first = take(train, [0], dtype=layout.dtype, device=layout.device, check=task.check_batch)
    chunks = plan_chunks(
        task,
        params,
        first,
        len(train),
        batch_size=config.batch_size,
        memory_budget=config.memory_budget,
        without_rows=scores_without_rows(solver, config.gradients, task.model, layout),
    )
    gradients = GradientSource(
        task, params, chunk=chunks.grad, method=config.gradients, precision=config.precision, progress=progress
    )
    grad_norm = train_loss = float("nan")
    if config.stationarity_tol is not None:
        grad_norm, train_loss = objective_gradient_norm(gradients, train, shard)
        warn_if_not_stationary(grad_norm, config.stationarity_tol)
    logger.info("fit: n_train=%d, n_params=%d, ||grad R(theta)||=%.3g", len(train), layout.n, grad_norm)
    operator = HessianOperator(
        task,
        params,
        train,
        damping=config.damping,
        batch_size=chunks.hvp,
        tangent_block=chunks.tangents,
        progress=progress,
        shard=shard,
    )
    cache = None
    if config.cache_dir is not None:
        cache = SolverCache(config.cache_dir, provenance, data_fingerprint(gradients, train), shard)
    loaded = cache is not None and cache.load(solver, operator)
    if not loaded:
        solver.fit(operator)
        if cache is not None:
            cache.store(solver)
    release_freed_memory()  # the fit's freed chunks would otherwise stay resident under the scoring's
    return FittedEngine(
        task=task,
        config=config,
        train=train,
        params=params,
        layout=layout,
        shard=shard,
        progress=progress,
        provenance=provenance,
        chunks=chunks,
        gradients=gradients,
        training_side=TrainingSide(gradients, train, shard, config.precision),
        operator=operator,
        solver=solver,
        grad_norm=grad_norm,
        train_loss=train_loss,
        solver_loaded=loaded,
    )
