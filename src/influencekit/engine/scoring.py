"""The engine: fit the curvature once, precondition the query side once, stream training gradients.

For test points z_test and training points z (docs/conventions.md)::

    I_up,params(z)        = −(H + δI)⁻¹ ∇L(z, θ̂)
    I_up,loss(z, z_test)  = −∇ℓ(z_test, θ̂)ᵀ (H + δI)⁻¹ ∇L(z, θ̂)
    self-influence(z)     =  ∇L(z, θ̂)ᵀ (H + δI)⁻¹ ∇L(z, θ̂)

``scores`` solves (H + δI)⁻¹ for all test gradients in one block solve, then streams per-example training
gradients in chunks and multiplies: its cost is one per-example-gradient pass over the training set, the
solve, and the score product n_test × n_train × n_params (which dominates when test points are many).
Chunk sizes follow ``memory_budget``.

Under an initialised ``torch.distributed`` process group the training set is sharded across ranks
(:mod:`influencekit.core.distributed`): the same calls, on every rank, return the same results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.autodiff import InputPath
from ..core.checks import check_indices, check_int
from ..core.errors import InputError, InputTypeError, NotFittedError
from ..core.lowrank import LowRankQueries
from ..core.results import GroupInfluence, InfluenceScores, RankedInfluence, TopK
from ..core.task import Task
from ..data.examples import DataSource, Examples
from ..solvers import Solver, SolveReport, make_solver
from .choice import SolverChoice, choose_solver
from .config import InfluenceConfig
from .fitted import FittedEngine, fit_engine
from .groups import check_newton, check_orders, group_effects, parse_groups
from .hessian import check_curvature
from .persistence import DATA_HEAD, ScoreFolder
from .perturbation import perturbation_scores
from .planner import Plan, plan_influence

__all__ = ["Influence"]


class _EngineField:
    """A fitted attribute of :class:`Influence` read from its engine: ``inf.solver_`` is ``inf.engine.solver``
    (read-only; NotFittedError, an AttributeError too, before ``fit()``)."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, influence: Influence | None, owner: type) -> Any:
        if influence is None:
            return self
        return getattr(influence.engine, self.field)

    def __set__(self, influence: Influence, value: Any) -> None:
        raise AttributeError(
            f"`{self.field}_` is part of the fitted engine and read-only; build another engine with "
            f"dataclasses.replace(inf.engine, {self.field}=...) if a test needs one."
        )


class Influence:
    """Influence of training points on a model's test predictions (Koh & Liang 2017).

    Args:
        task: a :class:`~influencekit.core.task.Task` (model, per-example loss, L2, selected parameters).
        train: the training data the model was fitted on (tensors, tuples, dicts, Datasets:
        :class:`~influencekit.data.Examples`).
        solver: a name of :data:`~influencekit.solvers.SOLVERS` (``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``,
            ``"kfac"``, ``"ekfac"``) or a :class:`~influencekit.solvers.Solver` instance.
        damping: δ ≥ 0 added to the Hessian's diagonal (non-convex models need δ > 0).
        solver_options: keyword arguments for the solver's constructor when ``solver`` is a name.
        batch_size: examples per chunk for gradients and HVPs; ``None`` derives it from ``memory_budget``.
        memory_budget: working memory for chunks, bytes or ``"2GiB"`` (the exact solver's Hessian comes on top).
        stationarity_tol: ``fit`` warns when ‖∇R(θ̂)‖ exceeds this (influence assumes θ̂ minimises R); ``None`` skips
            that check and its pass over the training data (``grad_norm_`` is then NaN): for a fine-tuned network,
            which is never at a minimum, the pass costs a gradient pass and tells nothing new.
        progress: show progress bars on long work (on rank 0 only under torch.distributed).
        distributed: shard the training set across the ranks of torch.distributed
        (:mod:`influencekit.core.distributed`):
            ``None`` (default) when a group of more than one rank is initialised, ``True`` require one, ``False`` never.
        cache_dir: a folder keeping the fitted solver: ``fit`` loads it instead of refitting when its manifest
            matches this configuration (task, solver, damping, dtype, shapes, sha256 of θ̂ and of the first 1,024
            training examples, n_train), and refuses one of another configuration (docs/guide.md).
        gradients: how per-example gradients are computed. ``"layers"``: from the inputs and output gradients
            of nn.Linear / nn.Conv1d / nn.Conv2d / nn.Embedding / Conv1D layers in one batched backward pass
            (:mod:`influencekit.core.layers`; all selected parameters must belong to such layers); ``"vmap"``:
            ``vmap(grad)`` over examples; ``"loop"``: one ordinary backward pass per example (slow, works for any
            model autograd works for); ``"auto"`` (default), in this order: layers when they cover the selected
            parameters *and* agree on the first examples with vmap (or the loop where vmap cannot trace the model,
            as transformers' masking code) to √eps relative, then vmap, then the loop; the choice and the reason
            per side are in ``gradient_methods_`` and every result's ``metadata["gradients"]``.
        precision: the arithmetic of scoring's bulk gradient products (``scores``, ``top_k``; solves, factors and
            self-influence unchanged): ``"full"`` (default, the model's dtype), ``"tf32"`` (float32 products may use
            TensorFloat-32 on CUDA Ampere+), ``"bf16"`` (score products in bfloat16: ~3 digits, docs/guide.md).

    Example::

        task = ik.ClassificationTask(model, l2=1e-3)
        inf = ik.Influence(task, (X_train, y_train), solver="cg").fit()
        scores = inf.scores((X_test, y_test))          # I_up,loss, (n_test, n_train)
        scores.predicted_loo_change()                  # -I_up,loss / n
    """

    def __init__(
        self,
        task: Task,
        train: DataSource,
        *,
        solver: str | Any = "cg",
        damping: float = 0.0,
        solver_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        memory_budget: int | str = "2GiB",
        stationarity_tol: float | None = 1e-3,
        progress: bool = False,
        distributed: bool | None = None,
        gradients: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        precision: str = "full",
    ) -> None:
        if not isinstance(task, Task):
            raise InputTypeError(
                f"`task` must be an influencekit Task (e.g. ik.ClassificationTask(model)). Got {type(task).__name__}."
            )
        self.config = config = InfluenceConfig.from_arguments(
            solver=solver,
            damping=damping,
            solver_options=solver_options,
            batch_size=batch_size,
            memory_budget=memory_budget,
            stationarity_tol=stationarity_tol,
            progress=progress,
            distributed=distributed,
            gradients=gradients,
            cache_dir=cache_dir,
            precision=precision,
        )
        config.solver.check_task(task)  # e.g. K-FAC needs a declared likelihood: refused now, not after a data pass
        task = config.solver.covered_task(task)  # e.g. K-FAC leaves out the parameters of layers it does not factor
        self.task, self.train, self.solver = task, train, solver
        task.check_mode()  # dropout / batch norm in training mode: refused now
        self.damping, self.solver_options, self.batch_size = config.damping, config.solver_options, config.batch_size
        self.memory_budget, self.stationarity_tol, self.progress = (
            config.memory_budget,
            config.stationarity_tol,
            config.progress,
        )
        self.distributed, self.gradients, self.cache_dir, self.precision = distributed, gradients, cache_dir, precision
        self._engine: FittedEngine | None = None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self) -> Influence:
        """Check the data and θ̂, measure ‖∇R(θ̂)‖, and fit the solver on H + δI
        (:func:`~influencekit.engine.fit_engine`).
        Returns ``self``; the fitted state is :attr:`engine`."""
        self._engine = fit_engine(self.task, self.train, self.config)
        return self

    @property
    def is_fitted(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> FittedEngine:
        """The fitted engine (:class:`~influencekit.engine.FittedEngine`): what the modules built on the engine take."""
        if self._engine is None:
            raise NotFittedError("this Influence is not fitted yet. Call .fit() before computing scores.")
        return self._engine

    # the fitted state under its scikit-learn-style names (read-only): ``inf.solver_`` is ``inf.engine.solver``
    train_ = _EngineField("train")
    params_ = _EngineField("params")
    layout_ = _EngineField("layout")
    shard_ = _EngineField("shard")
    progress_ = _EngineField("progress")
    provenance_ = _EngineField("provenance")
    chunks_ = _EngineField("chunks")
    gradients_ = _EngineField("gradients")
    training_side_ = _EngineField("training_side")
    operator_ = _EngineField("operator")
    solver_ = _EngineField("solver")
    grad_norm_ = _EngineField("grad_norm")
    train_loss_ = _EngineField("train_loss")
    solver_loaded_ = _EngineField("solver_loaded")

    def data_fingerprint(self, data: Examples, examples: int = DATA_HEAD) -> str:
        """sha256 of the first ``examples`` examples of ``data`` as the engine sees them (the manifests' data check)."""
        return self.engine.data_fingerprint(data, examples)

    def plan(
        self, n_test: int = 0, *, probe_examples: int = 256, cg_iterations: int = 100, query_rank: int | None = None
    ) -> Plan:
        """Estimated memory and time of ``fit()`` then ``scores(test, query_rank=)`` on ``n_test`` test points, without
        running them.

        A short timed probe on ``probe_examples`` training examples, extrapolated to the data size; returns a
        :class:`~influencekit.engine.planner.Plan` that prints as a table. Formulas: :mod:`influencekit.engine.planner`.
        """
        solver = make_solver(self.solver, **self.solver_options)  # unfitted: the probe times its fit
        return plan_influence(
            self.task,
            self.train,
            self.config,
            solver,
            n_test,
            probe_examples=probe_examples,
            cg_iterations=cg_iterations,
            query_rank=query_rank,
        )

    def choose_solver(
        self,
        test: DataSource,
        *,
        candidates: tuple[str | Solver, ...] = ("exact", "cg"),
        pilot_examples: int = 256,
        probe_examples: int = 256,
    ) -> SolverChoice:
        """The candidate solver with the least estimated time for ``fit()`` then ``scores(test)`` on this task, data
        and configuration (damping, memory budget, gradients), without running them.

        Each candidate is planned (:meth:`plan`); CG's block iterations, which the planner cannot know, are measured
        by a pilot solve on ``pilot_examples`` random training examples with the first block of ``test``'s gradients
        (:mod:`influencekit.engine.choice`). Returns a :class:`~influencekit.engine.choice.SolverChoice`; build the
        Influence with ``solver=choice.solver``. This Influence's own solver is not touched.
        """
        return choose_solver(
            self.task,
            self.train,
            self.config,
            test,
            candidates=candidates,
            pilot_examples=pilot_examples,
            probe_examples=probe_examples,
        )

    def check_fitted(self) -> None:
        """Raise :class:`~influencekit.core.errors.NotFittedError` unless :meth:`fit` has run."""
        self.engine  # noqa: B018 (raises when not fitted)

    @property
    def gradient_methods_(self) -> dict[str, str]:  # per side: "layers", "vmap" or "loop", once computed
        return self.engine.gradients.methods

    # -------------------------------------------------------------------------------------- queries
    def queries(
        self,
        test: DataSource,
        *,
        block: int | None = None,
        skip: Callable[[int], bool] | None = None,
        query_rank: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor | LowRankQueries, SolveReport]]:
        """Blocks of preconditioned test gradients: ``(offset, (H + δI)⁻¹∇ℓ(z_test) rows, report)``.

        ``block`` test points at a time (default: as the memory budget allows); blocks whose offset ``skip`` accepts are
        skipped (finished score files). ``query_rank``: :class:`~influencekit.core.lowrank.LowRankQueries`
        (:meth:`scores`)."""
        data = test if isinstance(test, Examples) else Examples(test, name="test")
        return self.engine.queries(data, block=block, skip=skip, query_rank=query_rank)

    def scores(
        self,
        test: DataSource,
        *,
        folder: str | os.PathLike | None = None,
        rows_per_file: int | None = None,
        query_rank: int | None = None,
    ) -> InfluenceScores:
        """I_up,loss for every (test, train) pair, ``(n_test, n_train)``, as an :class:`InfluenceScores`.

        One block solve for the test gradients, then one streamed per-example-gradient pass over the
        training set (per block of test points that fits the memory budget). Under torch.distributed each
        rank scores its shard and every rank receives the whole matrix.

        ``query_rank`` (query batching, an approximation): each query's block of a layer kept at that rank, scored
        against the training taps, never their gradients (:mod:`~influencekit.core.lowrank`, docs/guide.md).

        ``folder``: also keep the matrix on disk, ``rows_per_file`` test points (default: the query block) per
        ``scores-<first row>.npy`` file, each written atomically, with a ``manifest.json`` of the configuration; a
        later call with the same configuration computes only the missing blocks (an interrupted run resumes, bit
        for bit), one of another configuration is refused (docs/guide.md). Under torch.distributed rank 0 writes.
        """
        engine = self.engine
        test_data = Examples(test, name="test")
        layout = engine.layout
        out = torch.empty(len(test_data), engine.n_train, dtype=layout.dtype, device=layout.device)
        reports: list[SolveReport] = []
        side = engine.training_side
        basis = side.basis_for(engine.solver, len(test_data))
        extra: dict[str, Any] = {}
        store: ScoreFolder | None = None
        if folder is not None:
            store, extra = _open_score_folder(engine, folder, rows_per_file, test_data, out, query_rank)
        blocks = engine.queries(
            test_data,
            block=store.rows if store else None,
            skip=store.done.__contains__ if store else None,
            query_rank=query_rank,
        )
        for qlo, Q, report in blocks:
            reports.append(report)
            out[qlo : qlo + len(Q)] = block = side.score_rows(Q, basis)
            extra.update(Q.describe() if query_rank is not None else {})
            if store is not None:
                store.write(qlo, block)
            del Q  # freed before the next block of queries is built: one block in memory at a time
        metadata = engine.metadata(reports, score_space=side.space_name(basis, query_rank), **extra)
        return InfluenceScores(out, engine.n_train, metadata)

    def module_scores(self, test: DataSource) -> dict[str, InfluenceScores]:
        """I_up,loss split by the module that carries it, ``{module name: InfluenceScores}`` (``""``: the model's
        own parameters): module m's part is −[(H + δI)⁻¹∇ℓ(z_test)]_mᵀ[∇L(z)]_m, its coordinates of the preconditioned
        test gradient against its coordinates of the training gradient (as Kronfluence and Bergson report per
        module). The parts add up to :meth:`scores`, at the same cost."""
        engine = self.engine
        test_data = Examples(test, name="test")
        groups = engine.layout.module_indices()
        out = torch.empty(
            len(groups), len(test_data), engine.n_train, dtype=engine.layout.dtype, device=engine.layout.device
        )
        reports: list[SolveReport] = []
        for qlo, Q, report in engine.queries(test_data):
            reports.append(report)
            out[:, qlo : qlo + len(Q)] = engine.training_side.group_score_rows(Q, list(groups.values()))
            del Q  # one block of queries in memory at a time
        meta = engine.metadata(reports, score_space="parameters")
        return {
            name: InfluenceScores(out[j], engine.n_train, {**meta, "module": name}) for j, name in enumerate(groups)
        }

    def top_k(self, test: DataSource, k: int = 10, *, query_rank: int | None = None) -> RankedInfluence:
        """The ``k`` most helpful and most harmful training points per test point, streamed (no full matrix);
        ``query_rank`` as in :meth:`scores`."""
        engine = self.engine
        k = check_int("k", k, low=1, high=engine.n_train)
        test_data = Examples(test, name="test")
        side = engine.training_side
        basis = side.basis_for(engine.solver, len(test_data))
        parts: dict[str, list[torch.Tensor]] = {"hi": [], "hv": [], "xi": [], "xv": []}
        reports = []
        for _, Q, report in engine.queries(test_data, query_rank=query_rank):
            reports.append(report)
            helpful, harmful = side.top_k(Q, basis, k)
            del Q  # one block of queries in memory at a time
            for key, part in zip(
                ("hv", "hi", "xv", "xi"), (-helpful.values, helpful.indices, harmful.values, harmful.indices)
            ):
                parts[key].append(part)
        helpful_k = TopK(torch.cat(parts["hi"]), torch.cat(parts["hv"]))
        harmful_k = TopK(torch.cat(parts["xi"]), torch.cat(parts["xv"]))
        metadata = engine.metadata(reports, k=k, score_space=side.space_name(basis, query_rank))
        return RankedInfluence(helpful_k, harmful_k, engine.n_train, metadata)

    def self_influence(self) -> torch.Tensor:
        """∇L(z)ᵀ(H + δI)⁻¹∇L(z) for every training point, ``(n_train,)``.

        Uses the solver's quadratic form when it has one (exact): each rank its own shard, then gathered. Else one
        block solve per gradient chunk; under torch.distributed the chunks are the same as in one process: each
        rank computes the gradients of the chunk's examples in its shard, the chunk is gathered and solved by all
        ranks together. The solve reports are kept in ``self_influence_reports_``.
        """
        engine = self.engine
        out, reports = engine.training_side.self_influence(engine.solver, engine.solve)
        self.self_influence_reports_ = reports
        return out

    def params_influence(self, idx: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """I_up,params = −(H + δI)⁻¹∇L(z) for the training points ``idx``, ``(len(idx), n_params)``.

        Multiply by −1/n for the predicted parameter change when a point is removed; split a row into
        named tensors with :meth:`unflatten`. The solve report is kept in ``params_influence_report_``.
        """
        engine = self.engine
        indices = check_indices("idx", idx, engine.n_train)
        X, self.params_influence_report_ = engine.solve(engine.gradients.gather(engine.train, indices, side="train"))
        return -X

    def perturbation_influence(
        self, test: DataSource, train_idx: int | Sequence[int] | torch.Tensor, *, input: InputPath | str = "auto"
    ) -> torch.Tensor:
        """I_pert,loss(z, z_test) = −∇θℓ(z_test)ᵀ (H + δI)⁻¹ ∇x∇θL(z, θ̂) for the training points ``train_idx``.

        Returns ``(n_test, len(train_idx), *x.shape[1:])``, shaped like the training inputs; the formula, its
        cost and ``input`` are documented in :func:`~influencekit.engine.perturbation.perturbation_scores`. The solve
        reports are kept in ``perturbation_influence_reports_``.
        """
        engine = self.engine
        indices = check_indices("train_idx", train_idx, engine.n_train)
        out, self.perturbation_influence_reports_ = perturbation_scores(
            engine, Examples(test, name="test"), indices, input
        )
        return out

    def group_influence(
        self,
        groups: Any,
        test: DataSource,
        *,
        order: int | str | Sequence[int | str] = 1,
        newton_tol: float = 1e-6,
        newton_max_iter: int = 100,
    ) -> GroupInfluence | dict[str, GroupInfluence]:
        """Predicted change of each test measurement when each group of training points is removed: a
        :class:`GroupInfluence`
        ``(n_groups, n_test)``. ``groups``: index arrays, a ``{name: indices}`` dict, an ``(n_groups, n_train)`` bool
        mask or a
        label column. ``order``: 1 (Σ_U −I_up,loss/n), 2 (plus the second-order term, Basu et al. 2020), ``"newton"``
        (one
        Newton step without the group, to ``newton_tol``), or a list (a dict by order). Formulas, costs:
        :mod:`influencekit.engine.groups`."""
        engine = self.engine
        orders, (tol, max_iter) = check_orders(order), check_newton(newton_tol, newton_max_iter)
        out = group_effects(
            engine,
            parse_groups(groups, engine.n_train),
            Examples(test, name="test"),
            orders,
            newton_tol=tol,
            newton_max_iter=max_iter,
        )
        return out if isinstance(order, (list, tuple)) else out[orders[0]]

    def eigenvalue_range(self, *, steps: int = 30, seed: int = 0) -> tuple[float, float]:
        """Lanczos estimates ``(λ_min, λ_max)`` of H + δI from ``steps`` full-data HVPs; warns (CurvatureWarning, with a
        damping that removes it) when ``λ_min ≤ 0``. The estimates tighten from the inside as ``steps`` grows."""
        return check_curvature(self.engine.operator, steps=steps, seed=seed)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split flat parameter vectors ``(..., n_params)`` into a dict of named parameter-shaped tensors."""
        layout = self.engine.layout
        if vector.shape[-1] != layout.n:
            raise InputError(f"`vector` must end in n_params = {layout.n}. Got shape {tuple(vector.shape)}.")
        return layout.unflatten(vector)

    @property
    def n_params(self) -> int:
        return self.engine.layout.n


def _open_score_folder(
    engine: FittedEngine,
    folder: str | os.PathLike,
    rows_per_file: int | None,
    test_data: Examples,
    out: torch.Tensor,
    query_rank: int | None,
) -> tuple[ScoreFolder, dict[str, Any]]:
    """:meth:`Influence.scores`' folder: opened (or refused), its finished blocks read into ``out``."""
    if query_rank is not None:
        raise InputError(
            "`folder` and `query_rank` cannot be combined yet: the score folder keeps exact scores. Drop one."
        )
    rows = engine.chunks.queries if rows_per_file is None else check_int("rows_per_file", rows_per_file, low=1)
    store = ScoreFolder(
        folder,
        engine.provenance,
        n_test=len(test_data),
        rows=rows,
        shard=engine.shard,
        train_fingerprint=engine.data_fingerprint(engine.train),
        test_fingerprint=engine.data_fingerprint(test_data) if len(test_data) else "",
    )
    for lo in store.done:
        block = store.read(lo)
        out[lo : lo + len(block)] = block.to(out.device)
    return store, {"score_folder": str(folder), "score_files_reused": len(store.done)}
