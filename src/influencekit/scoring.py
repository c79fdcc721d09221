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
(:mod:`influencekit.distributed`): the same calls, on every rank, return the same results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .autodiff import InputPath, ParamLayout
from .checks import check_indices, check_int
from .config import Chunks, InfluenceConfig, Provenance, plan_chunks
from .data.examples import Examples, take
from .distributed import resolve_shard
from .errors import InputError, InputTypeError, NotFittedError
from .folders import fingerprint
from .gradients import GradientSource, objective_gradient_norm, warn_if_not_stationary
from .groups import check_newton, check_orders, group_effects, parse_groups
from .hessian import HessianOperator, check_curvature
from .lowrank import LowRankQueries
from .memory import release_freed_memory
from .pairwise import TrainingSide, combined, low_rank_queries, scores_without_rows
from .persistence import DATA_HEAD, ScoreFolder, SolverCache
from .perturbation import perturbation_scores
from .results import GroupInfluence, InfluenceScores, RankedInfluence, TopK
from .solvers import SolveReport
from .task import Task

if TYPE_CHECKING:
    from .planner import Plan

__all__ = ["Influence"]

logger = logging.getLogger(__name__)


class Influence:
    """Influence of training points on a model's test predictions (Koh & Liang 2017).

    Args:
        task: a :class:`~influencekit.task.Task` (model, per-example loss, L2, selected parameters).
        train: the training data the model was fitted on (tensors, tuples, dicts, Datasets: :class:`~influencekit.data.Examples`).
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
        distributed: shard the training set across the ranks of torch.distributed (:mod:`influencekit.distributed`):
            ``None`` (default) when a group of more than one rank is initialised, ``True`` require one, ``False`` never.
        cache_dir: a folder keeping the fitted solver: ``fit`` loads it instead of refitting when its manifest
            matches this configuration (task, solver, damping, dtype, shapes, sha256 of θ̂ and of the first 1,024
            training examples, n_train), and refuses one of another configuration (docs/guide.md).
        gradients: how per-example gradients are computed. ``"layers"``: from the inputs and output gradients
            of nn.Linear / nn.Conv1d / nn.Conv2d / nn.Embedding / Conv1D layers in one batched backward pass
            (:mod:`influencekit.layers`; all selected parameters must belong to such layers); ``"vmap"``:
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
        train: Any,
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
            raise InputTypeError(f"`task` must be an influencekit Task (e.g. ik.ClassificationTask(model)). Got {type(task).__name__}.")
        self.config = config = InfluenceConfig.from_arguments(
            solver=solver, damping=damping, solver_options=solver_options, batch_size=batch_size, memory_budget=memory_budget,
            stationarity_tol=stationarity_tol, progress=progress, distributed=distributed, gradients=gradients,
            cache_dir=cache_dir, precision=precision,
        )
        config.solver.check_task(task)  # e.g. K-FAC needs a declared likelihood: refused now, not after a data pass
        task = config.solver.covered_task(task)  # e.g. K-FAC leaves out the parameters of layers it does not factor
        self.task, self.train, self.solver = task, train, solver
        task.check_mode()  # dropout / batch norm in training mode: refused now
        self.damping, self.solver_options, self.batch_size = config.damping, config.solver_options, config.batch_size
        self.memory_budget, self.stationarity_tol, self.progress = config.memory_budget, config.stationarity_tol, config.progress
        self.distributed, self.gradients, self.cache_dir, self.precision = distributed, gradients, cache_dir, precision

    # ------------------------------------------------------------------------------------------ fit
    def fit(self) -> Influence:
        """Check the data and θ̂, measure ‖∇R(θ̂)‖, and fit the solver on H + δI. Returns ``self``."""
        self.task.check_mode()
        self.task.check_examples(self.train, "train")  # e.g. token ids outside the vocabulary: before any model pass
        config, solver = self.config, self.config.solver
        self.train_ = train = Examples(self.train, name="train")
        # a copy: training the model further after fit() must not silently change θ̂ under a fitted Hessian
        self.params_ = params = {name: value.clone() for name, value in self.task.params().items()}
        self.layout_ = layout = ParamLayout.of(params)
        for name, value in params.items():
            if not bool(torch.isfinite(value).all()):
                raise InputError(f"the model parameter {name!r} holds NaN/inf values; influence needs a finite trained model.")
        self.shard_ = shard = resolve_shard(config.distributed, len(train), layout.device)
        self.progress_ = config.progress and shard.rank == 0
        self.provenance_ = Provenance.of(self.task, solver, config, params, len(train))
        shard.check_same("the model, data and configuration", self.provenance_.agreement(config))
        shard.check_solver(solver)
        first = take(train, [0], dtype=layout.dtype, device=layout.device, check=self.task.check_batch)
        self.chunks_: Chunks = plan_chunks(self.task, params, first, len(train), batch_size=config.batch_size,
                                           memory_budget=config.memory_budget,
                                           without_rows=scores_without_rows(solver, config.gradients, self.task.model, layout))
        self.gradients_ = GradientSource(self.task, params, chunk=self.chunks_.grad, method=config.gradients,
                                         precision=config.precision, progress=self.progress_)
        self.training_side_ = TrainingSide(self.gradients_, train, shard, config.precision)
        self.grad_norm_ = self.train_loss_ = float("nan")
        if config.stationarity_tol is not None:
            self.grad_norm_, self.train_loss_ = objective_gradient_norm(self.gradients_, train, shard)
            warn_if_not_stationary(self.grad_norm_, config.stationarity_tol)
        logger.info("fit: n_train=%d, n_params=%d, ||grad R(theta)||=%.3g", len(train), layout.n, self.grad_norm_)
        self.operator_ = HessianOperator(self.task, params, train, damping=config.damping, batch_size=self.chunks_.hvp,
                                         tangent_block=self.chunks_.tangents, progress=self.progress_, shard=shard)
        cache = None if config.cache_dir is None else SolverCache(config.cache_dir, self.provenance_, self.data_fingerprint(train), shard)
        self.solver_loaded_ = cache is not None and cache.load(solver, self.operator_)
        if not self.solver_loaded_:
            solver.fit(self.operator_)
            if cache is not None:
                cache.store(solver)
        self.solver_ = solver
        release_freed_memory()  # the fit's freed chunks would otherwise stay resident under the scoring's
        return self

    def data_fingerprint(self, data: Examples, examples: int = DATA_HEAD) -> str:
        """sha256 of the first ``examples`` examples of ``data`` as the engine sees them (the manifests' data check)."""
        return fingerprint(self.gradients_.take(data, range(min(len(data), examples))))

    def plan(self, n_test: int = 0, *, probe_examples: int = 256, cg_iterations: int = 100, query_rank: int | None = None) -> Plan:
        """Estimated memory and time of ``fit()`` then ``scores(test, query_rank=)`` on ``n_test`` test points, without running them.

        A short timed probe on ``probe_examples`` training examples, extrapolated to the data size; returns a
        :class:`~influencekit.planner.Plan` that prints as a table. Formulas: :mod:`influencekit.planner`.
        """
        from .planner import plan_influence

        return plan_influence(self, n_test, probe_examples=probe_examples, cg_iterations=cg_iterations, query_rank=query_rank)

    def check_fitted(self) -> None:
        """Raise :class:`~influencekit.errors.NotFittedError` unless :meth:`fit` has run."""
        if not hasattr(self, "solver_"):
            raise NotFittedError("this Influence is not fitted yet. Call .fit() before computing scores.")

    @property
    def gradient_methods_(self) -> dict[str, str]:  # per side: "layers", "vmap" or "loop", once computed
        return self.gradients_.methods

    # -------------------------------------------------------------------------------------- queries
    def _solve(self, V: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, SolveReport]:
        x, report = self.solver_.solve(V, overwrite=overwrite)
        logger.info("solve: %s", report)
        return x, report

    def _metadata(self, reports: list[SolveReport], **extra: Any) -> dict[str, Any]:
        return self.provenance_.metadata(reports, self.grad_norm_, gradients=self.gradients_.describe(), **extra)

    def queries(self, test: Any, *, block: int | None = None, skip: Callable[[int], bool] | None = None,
                query_rank: int | None = None) -> Iterator[tuple[int, torch.Tensor | LowRankQueries, SolveReport]]:
        """Blocks of preconditioned test gradients: ``(offset, (H + δI)⁻¹∇ℓ(z_test) rows, report)``.

        ``block`` test points at a time (default: as the memory budget allows); blocks whose offset ``skip`` accepts are
        skipped (finished score files). ``query_rank``: :class:`~influencekit.lowrank.LowRankQueries` (:meth:`scores`)."""
        self.check_fitted()
        data = test if isinstance(test, Examples) else Examples(test, name="test")
        # each rank solves the same blocks: a different test set would hang them
        self.shard_.check_same("the test set", {"n_test": len(data)})
        if query_rank is not None:  # blocks of `block` test points, or as many as half the memory budget holds
            yield from low_rank_queries(self.gradients_, self.solver_, data, check_int("query_rank", query_rank, low=1),
                                        block=block, budget=self.config.memory_budget // 2)
            return
        block = block or self.chunks_.queries
        if self._solves_from_taps(data):
            yield from self._queries_from_taps(data, block, skip)
            return
        for lo in range(0, len(data), block):
            if skip is not None and skip(lo):
                continue
            hi = min(lo + block, len(data))
            # the gradients are not bound in this frame, and the solved block is unbound before the next one is
            # computed (one block of queries in memory at a time)
            solved = self._solve(self.gradients_.block(data, side="test", start=lo, stop=hi, desc="test gradients"),
                                 overwrite=True)
            release_freed_memory()  # the test gradients', before the training pass allocates its own
            yield (lo, *solved)
            del solved

    def _solves_from_taps(self, data: Examples) -> bool:
        """Whether the solver takes the test side's layer taps (:meth:`Solver.solve_taps`): it can, every parameter is
        in a factored dense layer, and the taps give the test gradients."""
        if "tap_solve" not in self.solver_.capabilities or not self.solver_.tap_solvable() or len(data) == 0:
            return False
        # chosen as on the first chunk: choose_per_example checks the taps against vmap on its first 4 examples
        self.gradients_.per_example("test", self.gradients_.take(data, range(min(len(data), 4))))
        return self.gradients_.methods["test"] == "layers"

    def _queries_from_taps(self, data: Examples, block: int, skip: Callable[[int], bool] | None
                           ) -> Iterator[tuple[int, torch.Tensor, SolveReport]]:
        """:meth:`queries` solved from the test layer taps chunk by chunk into the block: no gradient rows formed."""
        for lo in range(0, len(data), block):
            if skip is not None and skip(lo):
                continue
            hi = min(lo + block, len(data))
            X = torch.empty(hi - lo, self.layout_.n, dtype=self.layout_.dtype, device=self.layout_.device)
            reports = [self.solver_.solve_taps(f, X[c - lo:c - lo + len(f)])
                       for c, f in self.gradients_.layer_factors(data, side="test", start=lo, stop=hi, desc="test layer taps")]
            report = combined(reports)
            logger.info("solve: %s", report)
            release_freed_memory()  # the test taps', before the training pass allocates its own
            yield lo, X, report
            del X  # the caller's block is freed before the next one is built: one block in memory at a time

    def scores(self, test: Any, *, folder: str | os.PathLike | None = None, rows_per_file: int | None = None,
               query_rank: int | None = None) -> InfluenceScores:
        """I_up,loss for every (test, train) pair, ``(n_test, n_train)``, as an :class:`InfluenceScores`.

        One block solve for the test gradients, then one streamed per-example-gradient pass over the
        training set (per block of test points that fits the memory budget). Under torch.distributed each
        rank scores its shard and every rank receives the whole matrix.

        ``query_rank`` (query batching, an approximation): each query's block of a layer kept at that rank, scored
        against the training taps, never their gradients (:mod:`~influencekit.lowrank`, docs/guide.md).

        ``folder``: also keep the matrix on disk, ``rows_per_file`` test points (default: the query block) per
        ``scores-<first row>.npy`` file, each written atomically, with a ``manifest.json`` of the configuration; a
        later call with the same configuration computes only the missing blocks (an interrupted run resumes, bit
        for bit), one of another configuration is refused (docs/guide.md). Under torch.distributed rank 0 writes.
        """
        self.check_fitted()
        test_data = Examples(test, name="test")
        out = torch.empty(len(test_data), len(self.train_), dtype=self.layout_.dtype, device=self.layout_.device)
        reports: list[SolveReport] = []
        side = self.training_side_
        basis = side.basis_for(self.solver_, len(test_data))
        extra: dict[str, Any] = {}
        store: ScoreFolder | None = None
        if folder is not None:
            store, extra = _open_score_folder(self, folder, rows_per_file, test_data, out, query_rank)
        for qlo, Q, report in self.queries(test_data, block=store.rows if store else None, skip=store.done.__contains__ if store else None,
                                           query_rank=query_rank):
            reports.append(report)
            out[qlo:qlo + len(Q)] = block = side.score_rows(Q, basis)
            extra.update(Q.describe() if query_rank is not None else {})
            if store is not None:
                store.write(qlo, block)
            del Q  # freed before the next block of queries is built: one block in memory at a time
        return InfluenceScores(out, len(self.train_), self._metadata(reports, score_space=side.space_name(basis, query_rank), **extra))

    def module_scores(self, test: Any) -> dict[str, InfluenceScores]:
        """I_up,loss split by the module that carries it, ``{module name: InfluenceScores}`` (``""``: the model's
        own parameters): module m's part is −[(H + δI)⁻¹∇ℓ(z_test)]_mᵀ[∇L(z)]_m, its coordinates of the preconditioned
        test gradient against its coordinates of the training gradient (as Kronfluence and Bergson report per
        module). The parts add up to :meth:`scores`, at the same cost."""
        self.check_fitted()
        test_data = Examples(test, name="test")
        groups = self.layout_.module_indices()
        out = torch.empty(len(groups), len(test_data), len(self.train_), dtype=self.layout_.dtype, device=self.layout_.device)
        reports: list[SolveReport] = []
        for qlo, Q, report in self.queries(test_data):
            reports.append(report)
            out[:, qlo:qlo + len(Q)] = self.training_side_.group_score_rows(Q, list(groups.values()))
            del Q  # one block of queries in memory at a time
        meta = self._metadata(reports, score_space="parameters")
        return {name: InfluenceScores(out[j], len(self.train_), {**meta, "module": name}) for j, name in enumerate(groups)}

    def top_k(self, test: Any, k: int = 10, *, query_rank: int | None = None) -> RankedInfluence:
        """The ``k`` most helpful and most harmful training points per test point, streamed (no full matrix);
        ``query_rank`` as in :meth:`scores`."""
        self.check_fitted()
        n_train = len(self.train_)
        k = check_int("k", k, low=1, high=n_train)
        test_data = Examples(test, name="test")
        side = self.training_side_
        basis = side.basis_for(self.solver_, len(test_data))
        parts: dict[str, list[torch.Tensor]] = {"hi": [], "hv": [], "xi": [], "xv": []}
        reports = []
        for _, Q, report in self.queries(test_data, query_rank=query_rank):
            reports.append(report)
            helpful, harmful = side.top_k(Q, basis, k)
            del Q  # one block of queries in memory at a time
            for key, part in zip(("hv", "hi", "xv", "xi"), (-helpful.values, helpful.indices, harmful.values, harmful.indices)):
                parts[key].append(part)
        helpful_k = TopK(torch.cat(parts["hi"]), torch.cat(parts["hv"]))
        harmful_k = TopK(torch.cat(parts["xi"]), torch.cat(parts["xv"]))
        return RankedInfluence(helpful_k, harmful_k, n_train, self._metadata(reports, k=k, score_space=side.space_name(basis, query_rank)))

    def self_influence(self) -> torch.Tensor:
        """∇L(z)ᵀ(H + δI)⁻¹∇L(z) for every training point, ``(n_train,)``.

        Uses the solver's quadratic form when it has one (exact): each rank its own shard, then gathered. Else one
        block solve per gradient chunk; under torch.distributed the chunks are the same as in one process: each
        rank computes the gradients of the chunk's examples in its shard, the chunk is gathered and solved by all
        ranks together. The solve reports are kept in ``self_influence_reports_``.
        """
        self.check_fitted()
        out, reports = self.training_side_.self_influence(self.solver_, self._solve)
        self.self_influence_reports_ = reports
        return out

    def params_influence(self, idx: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """I_up,params = −(H + δI)⁻¹∇L(z) for the training points ``idx``, ``(len(idx), n_params)``.

        Multiply by −1/n for the predicted parameter change when a point is removed; split a row into
        named tensors with :meth:`unflatten`. The solve report is kept in ``params_influence_report_``.
        """
        self.check_fitted()
        indices = check_indices("idx", idx, len(self.train_))
        X, self.params_influence_report_ = self._solve(self.gradients_.gather(self.train_, indices, side="train"))
        return -X

    def perturbation_influence(
        self, test: Any, train_idx: int | Sequence[int] | torch.Tensor, *, input: InputPath | str = "auto"
    ) -> torch.Tensor:
        """I_pert,loss(z, z_test) = −∇θℓ(z_test)ᵀ (H + δI)⁻¹ ∇x∇θL(z, θ̂) for the training points ``train_idx``.

        Returns ``(n_test, len(train_idx), *x.shape[1:])``, shaped like the training inputs; the formula, its
        cost and ``input`` are documented in :func:`~influencekit.perturbation.perturbation_scores`. The solve
        reports are kept in ``perturbation_influence_reports_``.
        """
        self.check_fitted()
        indices = check_indices("train_idx", train_idx, len(self.train_))
        out, self.perturbation_influence_reports_ = perturbation_scores(self, Examples(test, name="test"), indices, input)
        return out

    def group_influence(self, groups: Any, test: Any, *, order: int | str | Sequence[int | str] = 1, newton_tol: float = 1e-6,
                        newton_max_iter: int = 100) -> GroupInfluence | dict[str, GroupInfluence]:
        """Predicted change of each test measurement when each group of training points is removed: a :class:`GroupInfluence`
        ``(n_groups, n_test)``. ``groups``: index arrays, a ``{name: indices}`` dict, an ``(n_groups, n_train)`` bool mask or a
        label column. ``order``: 1 (Σ_U −I_up,loss/n), 2 (plus the second-order term, Basu et al. 2020), ``"newton"`` (one
        Newton step without the group, to ``newton_tol``), or a list (a dict by order). Formulas, costs: :mod:`influencekit.groups`."""
        self.check_fitted()
        orders, (tol, max_iter) = check_orders(order), check_newton(newton_tol, newton_max_iter)
        out = group_effects(self, parse_groups(groups, len(self.train_)), Examples(test, name="test"), orders, solve=self._solve,
                            metadata=self._metadata, newton_tol=tol, newton_max_iter=max_iter)
        return out if isinstance(order, (list, tuple)) else out[orders[0]]

    def eigenvalue_range(self, *, steps: int = 30, seed: int = 0) -> tuple[float, float]:
        """Lanczos estimates ``(λ_min, λ_max)`` of H + δI from ``steps`` full-data HVPs; warns (CurvatureWarning, with a
        damping that removes it) when ``λ_min ≤ 0``. The estimates tighten from the inside as ``steps`` grows."""
        self.check_fitted()
        return check_curvature(self.operator_, steps=steps, seed=seed)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split flat parameter vectors ``(..., n_params)`` into a dict of named parameter-shaped tensors."""
        self.check_fitted()
        if vector.shape[-1] != self.layout_.n:
            raise InputError(f"`vector` must end in n_params = {self.layout_.n}. Got shape {tuple(vector.shape)}.")
        return self.layout_.unflatten(vector)

    @property
    def n_params(self) -> int:
        self.check_fitted()
        return self.layout_.n


def _open_score_folder(inf: Influence, folder: str | os.PathLike, rows_per_file: int | None, test_data: Examples,
                       out: torch.Tensor, query_rank: int | None) -> tuple[ScoreFolder, dict[str, Any]]:
    """:meth:`Influence.scores`' folder: opened (or refused), its finished blocks read into ``out``."""
    if query_rank is not None:
        raise InputError("`folder` and `query_rank` cannot be combined yet: the score folder keeps exact scores. Drop one.")
    rows = inf.chunks_.queries if rows_per_file is None else check_int("rows_per_file", rows_per_file, low=1)
    store = ScoreFolder(folder, inf.provenance_, n_test=len(test_data), rows=rows, shard=inf.shard_,
                        train_fingerprint=inf.data_fingerprint(inf.train_),
                        test_fingerprint=inf.data_fingerprint(test_data) if len(test_data) else "")
    for lo in store.done:
        block = store.read(lo)
        out[lo:lo + len(block)] = block.to(out.device)
    return store, {"score_folder": str(folder), "score_files_reused": len(store.done)}
