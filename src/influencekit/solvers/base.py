"""What every inverse-Hessian solver provides: ``fit(operator)``, then ``solve(V)`` with a report.

A solver is configured in ``__init__`` (settings only), does its expensive work in ``fit`` and returns
``self``, then ``solve(V)`` returns ``(H + δI)⁻¹ V`` for a block ``V`` of shape ``(k, n_params)`` (one
right-hand side per row) together with a :class:`SolveReport`. The engine reads a solver's declared
:class:`Capabilities` (typed flags), never its type or name:

- ``batched``: ``solve`` handles many right-hand sides at once efficiently (all solvers here).
- ``quadratic_form``: ``quadratic_form(G)`` gives ``gᵀ(H + δI)⁻¹g`` per row without a solve.
- ``tap_quadratic_form``: ``tap_quadratic_form(factors, l2)`` gives the same from a chunk's layer taps
  (:class:`~influencekit.core.lowrank.Factors`), never materialising the gradients (K-FAC/EK-FAC).
- ``in_place``: ``solve(V, overwrite=True)`` writes the result into ``V`` (one block in memory, not two).
- ``tap_solve``: ``solve_taps(factors, out)`` writes the solutions for a chunk's layer taps into ``out`` without
  forming the gradients (K-FAC/EK-FAC; they rotate a transformer layer's taps, cheaper than its gradient).
- ``dense``: the solver holds an explicit matrix (memory grows as ``n_params²``).
- ``low_rank``: the solver holds ``eigenvalues_`` ``(rank,)`` and orthonormal ``eigenvectors_``
  ``(rank, n_params)`` of H (memory grows as ``rank · n_params``).
- ``stochastic``: results depend on a random seed.
- ``sharded``: the result under torch.distributed sharding equals the single-process one (the engine refuses
  other solvers under a process group). It must be declared by the solver's own class, not inherited: a subclass
  may change the algorithm.
- ``approximate_inverse``: after ``fit`` the solver applies a fixed approximation of ``(H + δI)⁻¹`` without
  iterating to a tolerance (exact, Arnoldi, K-FAC, EK-FAC): CG can use it as a preconditioner by name.
- ``iterative``: a solve iterates to a tolerance, and its cost is (iterations) × (products), with an iteration count
  set by the spectrum and the block of right-hand sides: the solver's ``cost`` reads it from the probe's
  ``cg_iterations``, which :func:`~influencekit.engine.choice.choose_solver` measures with a pilot solve.

``"tap_solve" in solver.capabilities`` (the former frozenset spelling) still answers; a subclass that declares a
frozenset of names gets it converted, with a DeprecationWarning.

The dry-run planner asks ``cost(probe)`` for the solver's estimated fit and solve
(:mod:`~influencekit.solvers.costs`). A subclass that takes a new ``name`` does not inherit its parent's cost model
(it may change the algorithm): it defines its own ``cost`` or gets the base answer, no estimate.

A solver reads the training objective only through the operator
(:class:`~influencekit.core.curvature.CurvatureOperator`),
which owns the damping: it asks for undamped products (``damped=False``) and adds δ with ``operator.damp``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch

from ..core.curvature import CurvatureOperator
from ..core.errors import InputError, NotFittedError
from ..core.lowrank import Factors, LowRankQueries
from ..core.task import Task
from .costs import CostProbe, SolverCost, unknown_cost

__all__ = ["Solver", "SolveReport", "Solution", "Capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """What a solver can do beyond ``fit``/``solve`` (the module docstring says what each flag promises)."""

    batched: bool = True
    quadratic_form: bool = False
    tap_quadratic_form: bool = False
    in_place: bool = False
    tap_solve: bool = False
    dense: bool = False
    low_rank: bool = False
    stochastic: bool = False
    sharded: bool = False
    approximate_inverse: bool = False
    iterative: bool = False

    @classmethod
    def of(cls, names: Iterable[str]) -> Capabilities:
        """From a set of flag names (the former frozenset declaration); an unknown name is refused."""
        names = set(names)
        known = {f.name for f in fields(cls)}
        if names - known:
            raise InputError(f"unknown solver capabilities {sorted(names - known)}; the flags are {sorted(known)}.")
        return cls(**{name: name in names for name in known})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(getattr(self, name, False))


@dataclass(frozen=True)
class SolveReport:
    """How a block solve went.

    Attributes:
        solver: the solver's name.
        iterations: iterations used (the largest over right-hand sides; 0 for a direct solve).
        relative_residual: the largest ‖(H + δI)x − v‖ / ‖v‖ over the right-hand sides, computed with the
            full operator after the solve (not the solver's internal estimate).
        converged: whether every right-hand side met the solver's stopping rule.
        n_rhs: number of right-hand sides.
        hvps: Hessian-vector products over the full training set spent (mini-batch products count as
            their fraction of the data).
        seconds: wall time of the solve.
        details: solver-specific figures (e.g. LiSSA's scale).
    """

    solver: str
    iterations: int
    relative_residual: float
    converged: bool
    n_rhs: int
    hvps: float
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Solution(NamedTuple):
    """``x = (H + δI)⁻¹ V`` of shape ``(k, n_params)`` and the report of the solve."""

    x: torch.Tensor
    report: SolveReport


def relative_residuals(
    operator: CurvatureOperator,
    X: torch.Tensor,
    V: torch.Tensor,
    *,
    examples: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """‖(H + δI)x − v‖ / ‖v‖ per row, with one batched product over the full training set, or with H the mean
    over ``examples`` evenly spaced training examples when that is fewer than all (a cheaper estimate), in HVP
    calls of ``chunk`` examples (default: the operator's)."""
    n = operator.n_examples
    if examples is not None and examples < n:
        indices = torch.linspace(0, n - 1, examples, dtype=torch.float64).round().long().unique()
        R = operator.minibatch_matvec(X, indices, **({} if chunk is None else {"chunk": chunk})) - V.to(X.dtype)
    else:
        R = operator.matvec(X) - V.to(X.dtype)
    vn = V.norm(dim=1).to(X.dtype)
    return torch.where(vn > 0, R.norm(dim=1) / vn.clamp_min(torch.finfo(X.dtype).tiny), R.norm(dim=1))


class Solver:
    """Base class: the shared checks of ``fit``/``solve``; subclasses define ``_fit`` and ``_solve``."""

    name: ClassVar[str] = "solver"
    capabilities: ClassVar[Capabilities] = Capabilities()
    # fitted attributes that make up the state kept by state_dict(); empty: nothing worth keeping
    _state_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.operator_: CurvatureOperator | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("capabilities")
        if isinstance(declared, (set, frozenset)):
            warnings.warn(
                f"{cls.__name__}.capabilities: a set of names is deprecated; declare "
                f"Capabilities({', '.join(f'{n}=True' for n in sorted(declared))}).",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.capabilities = Capabilities.of(declared)
        # a cost model describes one algorithm: a renamed subclass without its own gets none (the base answer)
        owner = next(c for c in cls.__mro__ if "cost" in c.__dict__)
        if owner is not Solver and issubclass(owner, Solver) and owner.name != cls.name:
            cls.cost = Solver.cost  # type: ignore[method-assign]

    def cost(self, probe: CostProbe) -> SolverCost:
        """Estimated seconds and bytes of ``fit`` and of one block solve on the planner's ``probe``; here unknown
        (nan)."""
        return unknown_cost(self.name, probe)

    def fit(self, operator: CurvatureOperator) -> Solver:
        """Do the expensive preparation on ``operator`` (an :class:`~influencekit.engine.hessian.HessianOperator`)."""
        self.operator_ = operator
        self._fit(operator)
        return self

    def solve(self, V: torch.Tensor, *, overwrite: bool = False) -> Solution:
        """Return ``(H + δI)⁻¹ V`` for ``V`` of shape ``(k, n_params)`` (or ``(n_params,)``) and a report.

        ``overwrite=True``: the caller gives ``V`` up, and a solver with the ``"in_place"`` capability writes the result
        into it (one block of that size in memory instead of two); others leave it as it is."""
        op = self._require_fitted()
        squeeze = V.dim() == 1
        if squeeze:
            V = V.unsqueeze(0)
        if V.dim() != 2 or V.shape[1] != op.n_params:
            raise InputError(f"`V` must have shape (k, n_params) = (k, {op.n_params}). Got {tuple(V.shape)}.")
        if not bool(torch.isfinite(V).all()):
            raise InputError("`V` must hold only finite values. Got NaN/inf; check the gradients it came from.")
        start = time.perf_counter()
        V_op = V.to(device=op.device, dtype=op.dtype)
        X, info = self._solve_in_place(V_op) if overwrite and self.capabilities.in_place else self._solve(V_op)
        seconds = time.perf_counter() - start
        report = SolveReport(solver=self.name, n_rhs=V.shape[0], seconds=seconds, **info)
        X = X.to(V.dtype)
        return Solution(X[0] if squeeze else X, report)

    def low_rank_solve(
        self, factors: Factors, factored: list[bool], rank: int, *, seed: int = 0
    ) -> tuple[LowRankQueries, SolveReport]:
        """The preconditioned queries of the test gradients given as layer ``factors``, their ``factored`` layer blocks
        kept at ``rank`` (:mod:`~influencekit.core.lowrank`). Here: the dense solve, then each block's truncated SVD; a
        solver that can precondition the factors directly (K-FAC) overrides it."""
        X, report = self.solve(factors.dense(self._require_fitted().n_params))
        return LowRankQueries.from_dense(X, factors.blocks, factored, rank, seed=seed), report

    def tap_solvable(self) -> bool:
        """Whether ``solve_taps`` applies to this fitted solver (solvers with the ``"tap_solve"`` capability)."""
        return False

    def state_dict(self) -> dict[str, Any] | None:
        """The fitted state (tensors and plain values) that :meth:`load_state_dict` restores without refitting;
        None when the solver keeps nothing worth storing (its fit is cheap, e.g. CG)."""
        self._require_fitted()
        if not self._state_fields:
            return None
        return {name: getattr(self, name) for name in self._state_fields}

    def load_state_dict(self, operator: CurvatureOperator, state: dict[str, Any]) -> Solver:
        """Become fitted on ``operator`` from a :meth:`state_dict` of the same solver, settings and problem."""
        missing = [name for name in self._state_fields if name not in state]
        if not self._state_fields or missing:
            raise InputError(
                f"the stored state of solver {self.name!r} is incomplete (missing {missing}); delete it and refit."
            )
        self.operator_ = operator
        for name in self._state_fields:
            setattr(self, name, state[name])
        return self

    def check_task(self, task: Task) -> None:
        """Refuse a task this solver cannot work with; called when :class:`~influencekit.Influence` is built, before
        any pass over the data. Accepts every task by default."""

    def covered_task(self, task: Task) -> Task:
        """The task this solver computes influence for: ``task`` itself (default), or a copy restricted to the
        parameters the solver covers (:meth:`~influencekit.core.task.Task.restricted`). Called with
        :meth:`check_task`."""
        return task

    def solution_basis(self) -> torch.Tensor | None:
        """Orthonormal rows ``(r, n_params)`` spanning every result of ``solve``, or None when there is none.

        When ``r`` is small the engine scores in that basis: training gradients are projected onto it once
        (``n_train × r`` numbers) and each score is a product of r coordinates, since qᵀg = (Bq)ᵀ(Bg) for
        q in the span of B's rows.
        """
        return None

    def quadratic_form(self, G: torch.Tensor) -> torch.Tensor:
        """``gᵀ(H + δI)⁻¹g`` for each row of ``G``; only for solvers with the ``"quadratic_form"`` capability."""
        raise NotImplementedError(f"solver {self.name!r} has no quadratic_form; use solve().")

    def _require_fitted(self) -> CurvatureOperator:
        if self.operator_ is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet. Call fit(operator) before solve().")
        return self.operator_

    def _fit(self, operator: CurvatureOperator) -> None:
        raise NotImplementedError

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def _solve_in_place(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`_solve` writing the result into ``V`` (solvers with the ``"in_place"`` capability)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The solver's settings, for result metadata."""
        return {"solver": self.name}
