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

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .autodiff import InputPath, ParamLayout, batch_grad_sum, input_size_per_example, mixed_vjp, per_example_grads
from .checks import check_indices, check_int, check_number, parse_bytes
from .data.examples import Examples, batch_size_of, stream, take
from .distributed import SHARDED_SOLVERS, Shard, on_first_rank, parameter_digest, resolve_shard
from .errors import CurvatureWarning, InputError, InputTypeError, NotFittedError, NumericalError, StationarityWarning, UnsupportedError
from .folders import atomic_write, fingerprint, open_folder
from .hessian import HessianOperator
from .layers import GRADIENT_METHODS, choose_per_example
from .progress import progress_bar
from .results import CONVENTION, InfluenceScores, RankedInfluence, TopK
from .solvers import Solver, SolveReport, make_solver
from .spectrum import lanczos_extremes
from .task import Task

if TYPE_CHECKING:
    from .planner import Plan

__all__ = ["Influence"]

SOLVER_STATE = "solver-state.pt"  # the fitted solver's state inside `cache_dir`
PRECISIONS = ("full", "tf32", "bf16")  # `precision` of Influence: the arithmetic of scoring's gradient products


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Chunks:
    """Chunk sizes derived from the memory budget."""

    grad: int  # examples per per-example-gradient chunk
    hvp: int  # examples per HVP chunk
    tangents: int  # right-hand sides per vectorised HVP
    queries: int  # test points solved together


class Influence:
    """Influence of training points on a model's test predictions (Koh & Liang 2017).

    Args:
        task: a :class:`~influencekit.task.Task` (model, per-example loss, L2, selected parameters).
        train: the training data the model was fitted on: a tensor, an ``(X, y)`` tuple, a dict of tensors,
            a map-style Dataset, or a DataLoader that does not shuffle.
        solver: ``"exact" | "cg" | "lissa"`` or a :class:`~influencekit.solvers.Solver` instance.
        damping: δ ≥ 0 added to the Hessian's diagonal (non-convex models need δ > 0).
        solver_options: keyword arguments for the solver's constructor when ``solver`` is a name.
        batch_size: examples per chunk for gradients and HVPs; ``None`` derives it from ``memory_budget``.
        memory_budget: working memory for chunks, bytes or a string like ``"2GiB"`` (the exact solver's
            dense Hessian comes on top; see its ``max_params``).
        stationarity_tol: ``fit`` warns when ‖∇R(θ̂)‖ exceeds this (influence assumes θ̂ minimises R).
        progress: show progress bars on long work (on rank 0 only under torch.distributed).
        distributed: shard the training set across the ranks of the initialised torch.distributed process
            group (:mod:`influencekit.distributed`). ``None`` (default): shard when a group of more than one
            rank is initialised (e.g. under ``torchrun``); ``True``: require one; ``False``: never. Every rank
            must pass the same model, task, data and options; all ranks then return the same results.
        cache_dir: a folder keeping the fitted solver (the exact Hessian and its factor, Arnoldi's eigenpairs,
            K-FAC/EK-FAC factors, LiSSA's scale): ``fit`` loads it instead of refitting when the folder's
            manifest matches this configuration (task, solver settings, damping, dtype, parameter shapes, a
            sha256 of θ̂ and of the first 1,024 training examples, n_train) and refuses a folder of another
            configuration, printing both. Written atomically once the fit ends. ``None``: nothing is kept.
        gradients: how per-example gradients are computed. ``"layers"``: from the inputs and output gradients
            of nn.Linear / nn.Conv1d / nn.Conv2d layers in one batched backward pass (:mod:`influencekit.layers`; all
            selected parameters must belong to such layers); ``"vmap"``: ``vmap(grad)`` over examples, for any
            model; ``"auto"`` (default): layers when they cover the selected parameters *and* agree with vmap
            on the first examples (to √eps relative; a loss that uses a parameter outside its layer fails this
            check), vmap otherwise. The choice per side is kept in ``gradient_methods_``.
        precision: the arithmetic of the bulk gradient work of scoring (``scores``, ``top_k``; the solves,
            factors and self-influence are unchanged). ``"full"`` (default): the model's dtype. ``"tf32"``:
            float32 matrix products of the per-example gradients and of the score products may use TensorFloat-32
            (``torch.set_float32_matmul_precision("high")`` while they run, restored after; CUDA Ampere or newer;
            no effect on float64 models or on CPU). ``"bf16"``: the score products (test × training gradient
            matrix products) in bfloat16 — half the memory traffic, about 3 significant digits per score
            (Pearson r ≥ 0.9999 against full precision on the digits MLP, tests/test_scoring.py).

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
        solver: str | Solver = "cg",
        damping: float = 0.0,
        solver_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        memory_budget: int | str = "2GiB",
        stationarity_tol: float = 1e-3,
        progress: bool = False,
        distributed: bool | None = None,
        gradients: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        precision: str = "full",
    ) -> None:
        if not isinstance(task, Task):
            raise InputTypeError(f"`task` must be an influencekit Task (e.g. ik.ClassificationTask(model)). Got {type(task).__name__}.")
        self.task = task
        self.train = train
        self.solver = solver
        self.damping = check_number("damping", damping, low=0.0)
        self.solver_options = dict(solver_options or {})
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, low=1)
        self.memory_budget = parse_bytes("memory_budget", memory_budget)
        self.stationarity_tol = check_number("stationarity_tol", stationarity_tol, low=0.0)
        self.progress = bool(progress)
        if distributed is not None and not isinstance(distributed, bool):
            raise InputTypeError(f"`distributed` must be None, True or False. Got {distributed!r}.")
        self.distributed = distributed
        if gradients not in GRADIENT_METHODS:
            raise InputError(f"`gradients` must be one of {', '.join(repr(m) for m in GRADIENT_METHODS)}. Got {gradients!r}.")
        self.gradients = gradients
        self.cache_dir = cache_dir
        if precision not in PRECISIONS:
            raise InputError(f"`precision` must be one of {', '.join(repr(m) for m in PRECISIONS)}. Got {precision!r}.")
        self.precision = precision
        make_solver(solver, **self.solver_options)  # validate the choice now, not at fit time

    # ------------------------------------------------------------------------------------------ fit
    def fit(self) -> "Influence":
        """Check the data and θ̂, measure ‖∇R(θ̂)‖, and fit the solver on H + δI. Returns ``self``."""
        self.task._check_mode()
        train = Examples(self.train, name="train")
        # a copy: training the model further after fit() must not silently change θ̂ under a fitted Hessian
        params = {name: value.clone() for name, value in self.task.params().items()}
        layout = ParamLayout.of(params)
        for name, value in params.items():
            if not bool(torch.isfinite(value).all()):
                raise InputError(f"the model parameter {name!r} holds NaN/inf values; influence needs a finite trained model.")
        self.train_ = train
        self.params_ = params
        self.layout_ = layout
        self.shard_ = shard = resolve_shard(self.distributed, len(train), layout.device)
        self.progress_ = self.progress and (shard is None or shard.rank == 0)
        theta = layout.flatten(params)
        if shard is not None:
            self._check_ranks_agree(shard, train, layout, theta)
        self.chunks_ = self._plan_chunks(train, params, layout)
        self.gradient_methods_: dict[str, str] = {}
        self._coordinates: tuple[torch.Tensor, int, int, torch.Tensor] | None = None  # (basis, start, stop, Z)
        self._pex: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
        start, stop = (0, None) if shard is None else (shard.start, shard.stop)

        def local_sums() -> torch.Tensor:
            # (gradient sum, loss sum) over this process's examples, as one vector for one all_reduce
            grad_sum = torch.zeros(layout.n + 1, dtype=layout.dtype, device=layout.device)
            for lo, batch in stream(train, self.chunks_.grad, dtype=layout.dtype, device=layout.device, check=self.task.check_batch, start=start, stop=stop):
                g, losses = batch_grad_sum(self.task.loss, params, batch, layout)
                self._check_losses(losses, "train", lo)
                if not bool(torch.isfinite(g).all()):
                    G, _ = per_example_grads(self.task.loss, params, batch, layout)
                    self._check_grads(G, "train", lo)
                grad_sum[:-1] += g
                grad_sum[-1] += losses.sum()
            return grad_sum

        sums = local_sums() if shard is None else shard.all_reduce(shard.local(local_sums))
        grad_sum, loss_sum = sums[:-1], float(sums[-1])
        mean_grad = grad_sum / len(train) + self.task.l2 * theta
        self.grad_norm_ = float(mean_grad.norm())
        self.train_loss_ = loss_sum / len(train)
        logger.info("fit: n_train=%d, n_params=%d, ||grad R(theta)||=%.3g", len(train), layout.n, self.grad_norm_)
        if self.grad_norm_ > self.stationarity_tol:
            warnings.warn(
                f"the model is far from a stationary point of the training objective: ||grad R(theta)|| = "
                f"{self.grad_norm_:.3g} > stationarity_tol={self.stationarity_tol:g}. Influence assumes theta minimises "
                "R (with the same `l2`); train longer or check that `l2` matches the training regularisation.",
                StationarityWarning,
                stacklevel=2,
            )

        self.operator_ = HessianOperator(
            self.task, params, train, damping=self.damping, batch_size=self.chunks_.hvp,
            tangent_block=self.chunks_.tangents, progress=self.progress_, shard=shard,
        )
        self.solver_ = make_solver(self.solver, **self.solver_options)
        self.solver_loaded_ = self.cache_dir is not None and self._load_solver(train, layout)
        if not self.solver_loaded_:
            self.solver_.fit(self.operator_)
            if self.cache_dir is not None:
                self._store_solver()
        return self

    def _load_solver(self, train: Examples, layout: ParamLayout) -> bool:
        """Open ``cache_dir`` (refusing another configuration) and load the fitted solver if it is there."""
        solver, shard = self.solver_, self.shard_
        config = {
            "kind": "influencekit fitted solver",
            "format": 1,
            "n_train": len(train),
            "parameters": [[name, list(shape)] for name, shape in zip(layout.names, layout.shapes)],
            "dtype": str(layout.dtype),
            "task": self.task.describe(),
            "solver": solver.describe(),
            "damping": self.damping,
            "theta_fingerprint": fingerprint(self.params_),
            "data_fingerprint": self._head_fingerprint(train),
        }
        folder = Path(self.cache_dir)
        open_folder(folder, config, arg="cache_dir", what="a fitted solver", pattern=SOLVER_STATE)
        path = folder / SOLVER_STATE
        exists = path.exists()
        if shard is not None:  # a rank loading while another fits (with collectives) would hang them
            shard.check_same("the fitted-solver cache", {"state_file_exists": exists})
        if not exists:
            return False
        solver.load_state_dict(self.operator_, torch.load(path, map_location=layout.device, weights_only=True))
        logger.info("fit: solver %r loaded from %s", solver.name, path)
        return True

    def _head_fingerprint(self, data: Examples, examples: int = 1024) -> str:
        """sha256 of the first ``examples`` examples as the engine sees them (the manifests' cheap data check)."""
        layout = self.layout_
        head = take(data, list(range(min(len(data), examples))), dtype=layout.dtype, device=layout.device, check=self.task.check_batch)
        return fingerprint(head)

    def _store_solver(self) -> None:
        state = self.solver_.state_dict()
        folder = Path(self.cache_dir)
        if state is None:
            logger.info("fit: solver %r keeps no state worth storing; %s holds only the manifest", self.solver_.name, folder)
            return
        on_first_rank(self.shard_, lambda: atomic_write(folder / SOLVER_STATE, lambda f: torch.save(state, f)))

    def _check_ranks_agree(self, shard: Shard, train: Examples, layout: ParamLayout, theta: torch.Tensor) -> None:
        """Every rank must hold the same θ̂, data size and configuration, or the collectives would mismatch."""
        solver = make_solver(self.solver, **self.solver_options)
        shard.check_same("the model, data and configuration", {
            "n_train": len(train),
            "parameters": [(name, tuple(shape)) for name, shape in zip(layout.names, layout.shapes)],
            "dtype": str(layout.dtype),
            "theta_sha256": parameter_digest(theta),
            "task": repr(sorted(self.task.describe().items())),
            "solver": repr(sorted(solver.describe().items())),
            "damping": self.damping,
            "batch_size": self.batch_size,
            "memory_budget": self.memory_budget,
        })
        if solver.name not in SHARDED_SOLVERS:
            raise UnsupportedError(
                f"solver {solver.name!r} is not known to give the same result when the training set is "
                f"sharded across processes. Under torch.distributed use one of {sorted(SHARDED_SOLVERS)}, "
                "or pass distributed=False to compute on every rank alone."
            )

    def _plan_chunks(self, train: Examples, params: dict[str, torch.Tensor], layout: ParamLayout) -> _Chunks:
        first = take(train, [0], dtype=layout.dtype, device=layout.device, check=self.task.check_batch)
        act = input_size_per_example(self.task.loss, params, first, self.task.model)
        item = torch.finfo(layout.dtype).bits // 8
        p = layout.n
        budget = self.memory_budget
        n = len(train)
        # vmap(grad): per-example gradient rows plus a few copies of activations per example
        grad = self.batch_size or max(1, min(n, 4096, budget // (item * (2 * p + 4 * act))))
        # HVP chunks: large enough that a small model's HVP is one call (per-call overhead dominated there: the
        # digits MLP's HVP took 21 ms in chunks of 1,024 + 176 examples, 11 ms in one), small enough to leave
        # room for 16 tangents per vectorised call, and at least 256 examples. Models with large activations
        # get the 256 (1M-parameter CNN: 0.99 ms/example per HVP in chunks of 256, 1.78 in chunks of 1,024)
        hvp = self.batch_size or max(1, min(n, max(256, budget // (item * 6 * act * 16))))
        # vmap over tangents of jvp(grad): each tangent carries activations of the whole chunk and a gradient
        tangents = max(1, min(4096, budget // (item * 6 * (hvp * act + p))))
        queries = max(1, budget // (item * 4 * p))
        return _Chunks(grad=grad, hvp=hvp, tangents=tangents, queries=queries)

    def plan(self, n_test: int = 0, *, probe_examples: int = 256, cg_iterations: int = 100) -> "Plan":
        """Estimated memory and time of ``fit()`` then ``scores`` on ``n_test`` test points, without running them.

        A short timed probe on ``probe_examples`` training examples, extrapolated to the data size; returns a
        :class:`~influencekit.planner.Plan` that prints as a table. Formulas: :mod:`influencekit.planner`.
        """
        from .planner import plan_influence

        return plan_influence(self, n_test, probe_examples=probe_examples, cg_iterations=cg_iterations)

    def _require_fitted(self) -> None:
        if not hasattr(self, "solver_"):
            raise NotFittedError("this Influence is not fitted yet. Call .fit() before computing scores.")

    @staticmethod
    def _check_losses(losses: torch.Tensor, name: str, offset: int) -> None:
        if not bool(torch.isfinite(losses).all()):
            bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
            raise NumericalError(
                f"the loss is not finite for `{name}` example(s) {[offset + b for b in bad[:5]]}: check those examples "
                "and the model's outputs (e.g. log of 0, overflow); compute in float64 if values are extreme."
            )

    @staticmethod
    def _check_grads(G: torch.Tensor, name: str, offset: int) -> None:
        # a NaN or inf entry makes its row's sum NaN or inf: one reduction, no (B, p) mask for a clean chunk
        # (the elementwise check runs only when a row sum is not finite, e.g. an overflowing sum)
        if bool(torch.isfinite(G.sum(dim=1)).all()):
            return
        finite = torch.isfinite(G).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise NumericalError(
                f"the loss gradient is not finite for `{name}` example(s) {[offset + b for b in bad[:5]]} although the "
                "loss is: the model is not differentiable there (e.g. sqrt or abs at 0, a hard clamp). Smooth the model "
                "or remove those examples."
            )

    # ------------------------------------------------------------------------------------ gradients
    def _grads(self, data: Examples, *, train_side: bool, start: int = 0, stop: int | None = None, desc: str = "") -> Iterator[tuple[int, torch.Tensor]]:
        """Per-example gradients in chunks: ∇L (with L2) on the train side, ∇(measurement) on the test side."""
        layout = self.layout_
        fn = self.task.loss if train_side else self.task.measurement
        l2_term = self.task.l2 * layout.flatten(self.params_) if (train_side and self.task.l2) else None
        stop = len(data) if stop is None else stop
        bar = progress_bar(total=stop - start, desc=desc or f"{data.name} gradients", enabled=self.progress_)
        for lo, batch in stream(data, self.chunks_.grad, dtype=layout.dtype, device=layout.device, check=self.task.check_batch, start=start, stop=stop):
            with self._matmul_precision():
                G, losses = self._per_example(train_side, batch)(fn, self.params_, batch)
            self._check_losses(losses, data.name, lo)
            self._check_grads(G, data.name, lo)
            if l2_term is not None:
                G += l2_term  # in place: the chunk is freshly allocated, a copy would double its memory traffic
            bar.update(batch_size_of(batch))
            yield lo, G
        bar.close()

    def _per_example(self, train_side: bool, batch: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The per-example gradient function ``(fn, params, batch) -> (G, values)`` for one side, chosen on its
        first batch (see ``gradients`` in the class docstring) and kept."""
        side = "train" if train_side else "test"
        if side in self._pex:
            return self._pex[side]
        fn = self.task.loss if train_side else self.task.measurement
        chosen, method, reason = choose_per_example(self.gradients, self.task.model, fn, self.params_, self.layout_, batch, side=side)
        self.gradient_methods_[side] = method
        logger.info("per-example gradients (%s side): %s (%s)", side, self.gradient_methods_[side], reason)
        self._pex[side] = chosen
        return chosen

    def _gather(self, data: Examples, indices: Sequence[int], *, train_side: bool) -> torch.Tensor:
        layout = self.layout_
        fn = self.task.loss if train_side else self.task.measurement
        rows = []
        for lo in range(0, len(indices), self.chunks_.grad):
            part = list(indices[lo:lo + self.chunks_.grad])
            batch = take(data, part, dtype=layout.dtype, device=layout.device, check=self.task.check_batch)
            G, losses = self._per_example(train_side, batch)(fn, self.params_, batch)
            self._check_losses(losses, data.name, part[0])
            self._check_grads(G, data.name, part[0])
            rows.append(G)
        G = torch.cat(rows)
        if train_side and self.task.l2:
            G = G + self.task.l2 * layout.flatten(self.params_)
        return G

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
        x, report = self.solver_.solve(V)
        logger.info("solve: %s", report)
        return x, report

    def _metadata(self, reports: list[SolveReport], **extra: Any) -> dict[str, Any]:
        return {
            "method": "I_up,loss",
            "convention": CONVENTION,
            **self.task.describe(),
            **self.solver_.describe(),
            "damping": self.damping,
            "dtype": str(self.layout_.dtype),
            "n_params": self.layout_.n,
            "grad_norm": self.grad_norm_,
            "precision": self.precision,
            "solve_reports": [r.to_dict() for r in reports],
            **extra,
        }

    def _queries(self, test: Any, *, block: int | None = None, skip: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[int, torch.Tensor, SolveReport]]:
        """Blocks of preconditioned test gradients: (offset, (H + δI)⁻¹∇ℓ(z_test) rows, report).

        ``block`` test points at a time (default: as many as the memory budget allows); blocks whose offset
        ``skip`` accepts are not computed (the score folder's finished files)."""
        data = test if isinstance(test, Examples) else Examples(test, name="test")
        if self.shard_ is not None:  # each rank solves the same blocks: a different test set would hang them
            self.shard_.check_same("the test set", {"n_test": len(data)})
        block = block or self.chunks_.queries
        for lo in range(0, len(data), block):
            if skip is not None and skip(lo):
                continue
            hi = min(lo + block, len(data))
            G = torch.cat([g for _, g in self._grads(data, train_side=False, start=lo, stop=hi, desc="test gradients")])
            Q, report = self._solve(G)
            yield lo, Q, report

    @contextlib.contextmanager
    def _matmul_precision(self) -> Iterator[None]:
        """With ``precision="tf32"``: float32 matrix products may use TensorFloat-32 inside; restored after."""
        if self.precision != "tf32":
            yield
            return
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)

    def _product(self, Qs: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Scores −Qs Gᵀ of a block of preconditioned queries against training rows, in ``precision``."""
        if self.precision == "bf16":
            return -(Qs.to(torch.bfloat16) @ G.to(torch.bfloat16).T).to(Qs.dtype)
        with self._matmul_precision():
            return -(Qs @ G.T)

    def _score_rows(self, Q: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
        """−Qᵀ∇L(z) for every training point z, ``(len(Q), n_train)``; under a process group each rank scores
        its shard and every rank receives the whole block."""
        start, stop = self._shard_range()

        def local() -> torch.Tensor:
            block = torch.empty(len(Q), stop - start, dtype=Q.dtype, device=Q.device)
            Qs = Q if basis is None else Q @ basis.T
            for lo, G in self._train_side(basis, start, stop, "scoring"):
                block[:, lo - start:lo - start + len(G)] = self._product(Qs, G)
            return block

        return local() if self.shard_ is None else self.shard_.gather_columns(self.shard_.local(local))

    # ------------------------------------------------------------------------------------ public API
    def scores(self, test: Any, *, folder: str | os.PathLike | None = None, rows_per_file: int | None = None) -> InfluenceScores:
        """I_up,loss for every (test, train) pair, ``(n_test, n_train)``, as an :class:`InfluenceScores`.

        One block solve for the test gradients, then one streamed per-example-gradient pass over the
        training set (per block of test points that fits the memory budget). Under torch.distributed each
        rank scores its shard and every rank receives the whole matrix.

        ``folder``: also keep the matrix on disk, ``rows_per_file`` test points (default: the memory budget's
        query block) per ``scores-<first row>.npy`` file, each written atomically as its block finishes, with a
        ``manifest.json`` of the configuration (task, solver, damping, θ̂, the train and test data's size and
        first 1,024 examples). A later call with the same configuration reads the finished files and computes
        only the missing blocks, so an interrupted run resumes where it stopped and gives the same values bit
        for bit; a folder of another configuration is refused with both printed. Each file can be read alone
        (``numpy.load(path, mmap_mode="r")``) without loading the matrix. Under torch.distributed rank 0 writes.
        """
        self._require_fitted()
        test_data = Examples(test, name="test")
        n_train = len(self.train_)
        out = torch.empty(len(test_data), n_train, dtype=self.layout_.dtype, device=self.layout_.device)
        reports = []
        basis = self._score_basis(len(test_data))
        if folder is not None:
            rows = self.chunks_.queries if rows_per_file is None else check_int("rows_per_file", rows_per_file, low=1)
            done = self._open_score_folder(Path(folder), test_data, rows)
            for lo, path in done.items():
                block = torch.from_numpy(np.load(path))
                out[lo:lo + len(block)] = block.to(out.device)
            for qlo, Q, report in self._queries(test_data, block=rows, skip=done.__contains__):
                reports.append(report)
                out[qlo:qlo + len(Q)] = rows_block = self._score_rows(Q, basis)
                self._write_score_file(Path(folder) / _score_file(qlo), rows_block)
            extra = {"score_folder": str(folder), "score_files_reused": len(done)}
        else:
            for qlo, Q, report in self._queries(test_data):
                reports.append(report)
                out[qlo:qlo + len(Q)] = self._score_rows(Q, basis)
            extra = {}
        return InfluenceScores(out, n_train, self._metadata(reports, score_space=self._space_name(basis), **extra))

    def _open_score_folder(self, folder: Path, test: Examples, rows: int) -> dict[int, Path]:
        """Create or check the score folder's manifest; the finished files by first row (the same on every rank)."""
        layout = self.layout_
        config = {
            "kind": "influencekit pairwise scores",
            "format": 1,
            "n_train": len(self.train_),
            "n_test": len(test),
            "rows_per_file": rows,
            "task": self.task.describe(),
            "solver": self.solver_.describe(),
            "damping": self.damping,
            "dtype": str(layout.dtype),
            "theta_fingerprint": fingerprint(self.params_),
            "train_fingerprint": self._head_fingerprint(self.train_),
            "test_fingerprint": self._head_fingerprint(test) if len(test) else "",
            **({"precision": self.precision} if self.precision != "full" else {}),
        }
        open_folder(folder, config, arg="folder", what="pairwise scores", pattern="scores-*.npy")
        done = {lo: folder / _score_file(lo) for lo in range(0, len(test), rows) if (folder / _score_file(lo)).exists()}
        if self.shard_ is not None:  # every rank must skip the same blocks, or the collectives would mismatch
            self.shard_.check_same("the score folder's finished files", {"files": sorted(done)})
        return done

    def _write_score_file(self, path: Path, block: torch.Tensor) -> None:
        array = block.detach().cpu().numpy()
        on_first_rank(self.shard_, lambda: atomic_write(path, lambda f: np.save(f, array)))

    def _score_basis(self, n_test: int) -> torch.Tensor | None:
        """The solver's solution basis B ``(r, n_params)`` when scoring in it is cheaper, else None.

        Every preconditioned query q lies in the span of B's orthonormal rows, so qᵀg = (qBᵀ)(Bg): the training
        gradients are projected once (n_train × r numbers, kept for later calls) and each score costs r
        multiplications instead of n_params. Worth it when r < n_test (projecting costs r products per
        training gradient, the direct route n_test), or when the projections are already kept.
        """
        basis = self.solver_.solution_basis()
        if basis is None or basis.shape[0] >= self.layout_.n:
            return None
        kept = self._coordinates is not None and self._coordinates[0] is basis
        return basis if (kept or basis.shape[0] < n_test) else None

    def _train_side(self, basis: torch.Tensor | None, start: int, stop: int, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Training-side rows to score against, in chunks: per-example gradients, or their coordinates in
        ``basis`` (projected on the first call and kept until the next ``fit``)."""
        if basis is None:
            yield from self._grads(self.train_, train_side=True, start=start, stop=stop, desc=desc)
            return
        c = self._coordinates
        if c is None or c[0] is not basis or (c[1], c[2]) != (start, stop):
            Z = torch.empty(stop - start, basis.shape[0], dtype=basis.dtype, device=basis.device)
            for lo, G in self._grads(self.train_, train_side=True, start=start, stop=stop, desc=f"{desc} (projecting onto the solver's basis)"):
                Z[lo - start:lo - start + len(G)] = G @ basis.T
            self._coordinates = c = (basis, start, stop, Z)
        step = self.chunks_.grad
        for lo in range(start, stop, step):
            yield lo, c[3][lo - start:min(lo + step, stop) - start]

    @staticmethod
    def _space_name(basis: torch.Tensor | None) -> str:
        return "parameters" if basis is None else f"solver basis (rank {basis.shape[0]})"

    def _shard_range(self) -> tuple[int, int]:
        """``[start, stop)`` of the training examples this process scores (all of them without a process group)."""
        return (0, len(self.train_)) if self.shard_ is None else (self.shard_.start, self.shard_.stop)

    def top_k(self, test: Any, k: int = 10) -> RankedInfluence:
        """The ``k`` most helpful and most harmful training points per test point, streamed (no full matrix)."""
        self._require_fitted()
        n_train = len(self.train_)
        k = check_int("k", k, low=1, high=n_train)
        test_data = Examples(test, name="test")
        parts: dict[str, list[torch.Tensor]] = {"hi": [], "hv": [], "xi": [], "xv": []}
        reports = []
        start, stop = self._shard_range()
        basis = self._score_basis(len(test_data))
        for _, Q, report in self._queries(test_data):
            reports.append(report)

            def local() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
                best_neg = (torch.empty(len(Q), 0, dtype=Q.dtype, device=Q.device), torch.empty(len(Q), 0, dtype=torch.long, device=Q.device))
                best_pos = best_neg
                Qs = Q if basis is None else Q @ basis.T
                for lo, G in self._train_side(basis, start, stop, "top-k"):
                    S = self._product(Qs, G)
                    idx = torch.arange(lo, lo + len(G), device=S.device).expand(len(Q), -1)
                    best_neg = _merge_topk(best_neg, -S, idx, k)
                    best_pos = _merge_topk(best_pos, S, idx, k)
                return best_neg, best_pos

            if self.shard_ is None:
                best_neg, best_pos = local()
            else:  # merge every rank's own top-k: (n_test, k·world) values, never the whole score matrix
                best_neg, best_pos = self.shard_.local(local)
                best_neg = _merge_topk(_empty_topk(Q), *self._gather_topk(best_neg, k), k)
                best_pos = _merge_topk(_empty_topk(Q), *self._gather_topk(best_pos, k), k)
            parts["hv"].append(-best_neg[0]); parts["hi"].append(best_neg[1])
            parts["xv"].append(best_pos[0]); parts["xi"].append(best_pos[1])
        helpful = TopK(torch.cat(parts["hi"]), torch.cat(parts["hv"]))
        harmful = TopK(torch.cat(parts["xi"]), torch.cat(parts["xv"]))
        return RankedInfluence(helpful, harmful, n_train, self._metadata(reports, k=k, score_space=self._space_name(basis)))

    def self_influence(self) -> torch.Tensor:
        """∇L(z)ᵀ(H + δI)⁻¹∇L(z) for every training point, ``(n_train,)``.

        Uses the solver's quadratic form when it has one (exact), else one block solve per gradient chunk.
        Under torch.distributed the chunks are the same as in one process: each rank computes the gradients
        of the chunk's examples in its shard, the chunk is gathered and solved by all ranks together.
        """
        self._require_fitted()
        out = torch.empty(len(self.train_), dtype=self.layout_.dtype, device=self.layout_.device)
        quadratic = "quadratic_form" in self.solver_.capabilities
        reports = []
        shard = self.shard_
        if shard is not None and quadratic:  # no solve: each rank its own shard, then gather
            def local() -> torch.Tensor:
                part = torch.empty(shard.stop - shard.start, dtype=out.dtype, device=out.device)
                for lo, G in self._grads(self.train_, train_side=True, start=shard.start, stop=shard.stop, desc="self-influence"):
                    part[lo - shard.start:lo - shard.start + len(G)] = self.solver_.quadratic_form(G)
                return part

            out[:] = shard.gather_columns(shard.local(local))
        elif shard is not None:
            step = self.chunks_.grad
            for lo in range(0, len(self.train_), step):
                hi = min(lo + step, len(self.train_))
                a, b = max(lo, shard.start), min(hi, shard.stop)
                counts = [max(0, min(hi, e) - max(lo, s)) for s, e in shard.bounds]
                mine = shard.local(lambda: torch.cat([g for _, g in self._grads(self.train_, train_side=True, start=a, stop=b, desc="self-influence")])
                                   if b > a else torch.zeros(0, self.layout_.n, dtype=out.dtype, device=out.device))
                G = shard.gather_rows(mine, counts)
                X, report = self._solve(G)
                reports.append(report)
                out[lo:hi] = (X * G).sum(dim=1)
        else:
            for lo, G in self._grads(self.train_, train_side=True, desc="self-influence"):
                if quadratic:
                    out[lo:lo + len(G)] = self.solver_.quadratic_form(G)
                else:
                    X, report = self._solve(G)
                    reports.append(report)
                    out[lo:lo + len(G)] = (X * G).sum(dim=1)
        self.self_influence_reports_ = reports
        return out

    def params_influence(self, idx: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """I_up,params = −(H + δI)⁻¹∇L(z) for the training points ``idx``, ``(len(idx), n_params)``.

        Multiply by −1/n for the predicted parameter change when a point is removed; split a row into
        named tensors with :meth:`unflatten`.
        """
        self._require_fitted()
        indices = check_indices("idx", idx, len(self.train_))
        G = self._gather(self.train_, indices, train_side=True)
        X, report = self._solve(G)
        self.params_influence_report_ = report
        return -X

    def perturbation_influence(
        self, test: Any, train_idx: int | Sequence[int] | torch.Tensor, *, input: InputPath | str = "auto"
    ) -> torch.Tensor:
        """I_pert,loss(z, z_test) = −∇θℓ(z_test)ᵀ (H + δI)⁻¹ ∇x∇θL(z, θ̂) for the training points ``train_idx``.

        The gradient of I_up,loss with respect to the training input x (Koh & Liang 2017, §2.2): perturbing
        x by a small δ and retraining changes the test measurement by about I_pert,loss · δ / n. Returns a
        tensor ``(n_test, len(train_idx), *x.shape[1:])``, shaped like the training inputs.

        One block solve s = (H + δI)⁻¹∇ℓ(z_test) for the test points (as :meth:`scores`), then per chunk of
        training points one vector–Jacobian product of the parameter gradient with respect to the input per
        test point (:func:`~influencekit.autodiff.mixed_vjp`), never a dense Jacobian. θ are the task's
        selected parameters, while the input gradient flows through the whole model (a frozen feature
        extractor included). The L2 term does not depend on x, so ∇x∇θL = ∇x∇θℓ.

        ``input`` locates the input in a training batch: ``"auto"`` (default) takes the first element of a
        tuple batch, the task's ``input_key`` of a dict batch, or the batch itself when it is a tensor; an
        int or a key picks another. The input must be floating point (embeddings, not token ids). The solve
        reports are kept in ``perturbation_influence_reports_``.
        """
        self._require_fitted()
        indices = check_indices("train_idx", train_idx, len(self.train_))
        layout = self.layout_
        first = take(self.train_, indices[:1], dtype=layout.dtype, device=layout.device, check=self.task.check_batch)
        if input == "auto":
            input = None if isinstance(first, torch.Tensor) else (getattr(self.task, "input_key", "x") if isinstance(first, dict) else 0)
        x_shape = mixed_vjp(self.task.loss, self.params_, first, layout, torch.zeros(1, layout.n, dtype=layout.dtype, device=layout.device), where=input).shape[2:]
        test_data = Examples(test, name="test")
        out = torch.empty(len(test_data), len(indices), *x_shape, dtype=layout.dtype, device=layout.device)
        reports = []
        for qlo, Q, report in self._queries(test_data):
            reports.append(report)
            for lo in range(0, len(indices), self.chunks_.grad):
                part = indices[lo:lo + self.chunks_.grad]
                batch = take(self.train_, part, dtype=layout.dtype, device=layout.device, check=self.task.check_batch)
                for tlo in range(0, len(Q), self.chunks_.tangents):
                    rows = Q[tlo:tlo + self.chunks_.tangents]
                    out[qlo + tlo:qlo + tlo + len(rows), lo:lo + len(part)] = -mixed_vjp(self.task.loss, self.params_, batch, layout, rows, where=input)
        self.perturbation_influence_reports_ = reports
        return out

    def eigenvalue_range(self, *, steps: int = 30, seed: int = 0) -> tuple[float, float]:
        """Lanczos estimates ``(λ_min, λ_max)`` of H + δI from ``steps`` full-data HVPs.

        Warns with :class:`~influencekit.errors.CurvatureWarning` and a damping that removes the negative
        curvature when ``λ_min ≤ 0``; the estimates tighten from the inside as ``steps`` grows.
        """
        self._require_fitted()
        op = self.operator_
        lo, hi = lanczos_extremes(op.matvec, op.n_params, steps=steps, dtype=op.dtype, device=op.device, seed=seed)
        if lo <= 0:
            warnings.warn(
                f"H + δI has negative curvature (Lanczos estimate of its smallest eigenvalue: {lo:.3g} with damping "
                f"{self.damping:g}); use damping >= {self.damping - lo * 1.5:.3g} (Lanczos under-estimates |λ_min|; "
                "raise `steps` for a tighter figure).",
                CurvatureWarning,
                stacklevel=2,
            )
        return lo, hi

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split flat parameter vectors ``(..., n_params)`` into a dict of named parameter-shaped tensors."""
        self._require_fitted()
        if vector.shape[-1] != self.layout_.n:
            raise InputError(f"`vector` must end in n_params = {self.layout_.n}. Got shape {tuple(vector.shape)}.")
        return self.layout_.unflatten(vector)

    def _gather_topk(self, best: tuple[torch.Tensor, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's ``(n_test, k_r)`` top-k values and global indices side by side (k_r = min(k, shard))."""
        widths = [min(k, stop - start) for start, stop in self.shard_.bounds]
        return self.shard_.gather_columns(best[0], widths), self.shard_.gather_columns(best[1], widths)

    @property
    def n_params(self) -> int:
        self._require_fitted()
        return self.layout_.n


def _score_file(first_row: int) -> str:
    return f"scores-{first_row:09d}.npy"


def _empty_topk(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(len(Q), 0, dtype=Q.dtype, device=Q.device), torch.empty(len(Q), 0, dtype=torch.long, device=Q.device)


def _merge_topk(
    current: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.cat([current[0], values], dim=1)
    idx = torch.cat([current[1], indices], dim=1)
    top, pos = torch.topk(vals, min(k, vals.shape[1]), dim=1)
    return top, torch.gather(idx, 1, pos)
