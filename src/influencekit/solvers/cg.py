"""Block conjugate gradient: many right-hand sides share one growing Krylov space.

The k right-hand sides are solved together by breakdown-free block CG (O'Leary 1980; Ji & Li 2017,
"A breakdown-free block conjugate gradient method", BIT 57): each iteration applies H + δI to a block of
search directions with one vectorised Hessian-vector product, and the block is re-orthonormalised with
rank detection, so directions that became linearly dependent are dropped instead of breaking the
recursion. Because every right-hand side profits from the directions found for all the others, the
iteration count falls as k grows (for k close to n_params a handful of iterations suffice), while a
single right-hand side follows exactly the classic CG recursion (Hestenes & Stiefel 1952).

Stopping rule, per right-hand side (as in SciPy's ``cg``), checked after each iteration::

    ‖r_j‖ ≤ max(rtol · ‖v_j‖, atol),   r_j = v_j − (H + δI) x_j   (the recursively updated residual)

The solve stops when every right-hand side meets it; the true residual is then recomputed with the
operator and reported. CG needs H + δI positive definite: a block with a non-positive Rayleigh quotient
stops the solve with an error that suggests a damping.

**Preconditioning** (``preconditioner=`` the name of an approximate inverse, ``"ekfac"``, ``"kfac"``, ``"arnoldi"``
or ``"exact"``, or a Solver instance): each residual block is passed
through an approximate inverse M⁻¹ ≈ (H + δI)⁻¹ — a K-FAC/EK-FAC solver fitted on the same operator (Gauss-Newton
curvature, so for non-convex models it is a preconditioner, not the answer) — and the search directions are
built from Z = M⁻¹R (the preconditioned breakdown-free block CG of Ji & Li 2017, Algorithm 3):

    α = (PᵀAP)⁻¹PᵀR,   X += Pα,   R −= APα,   Z = M⁻¹R,   β = −(PᵀAP)⁻¹(AP)ᵀZ,   P = orth(Z + Pβ)

The iterates and the stopping rule are those of CG (the residual is that of H + δI, not of the preconditioned
system), so preconditioning changes how many iterations are needed, never what counts as converged. M⁻¹ must
be symmetric positive definite (K-FAC/EK-FAC with damping are).

**Stopping by the scores** (``score_rtol``): influence scores are inner products gᵀx with training gradients g;
CG's residual rule asks more accuracy than scores need. With ``score_rtol`` set, a right-hand side also stops
once an iteration changed its solution by less than ``score_rtol`` relative, measured in the norm the scores see
(it goes on improving with the block until every right-hand side has stopped):
‖Pα_j‖_A / ‖x_j‖_A (A = H + δI; for the exact solution x = A⁻¹v, gᵀx changes by at most ‖g‖_{A⁻¹}‖Δx‖_A), computed
from the products CG already has. The report keeps the residual of every right-hand side and says which rule
stopped it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..core.checks import check_int, check_number
from ..core.curvature import CurvatureOperator
from ..core.errors import ConvergenceWarning, InputError, InputTypeError, NumericalError, UnsupportedError, setting_hint
from ..core.task import Task
from .base import Capabilities, Solver, relative_residuals
from .costs import CostProbe, SolverCost
from .registry import SOLVERS, preconditioner_names, register

__all__ = ["CGSolver"]


def __getattr__(name: str) -> object:
    if name == "PRECONDITIONERS":  # the former constant: the names now come from the registry
        warnings.warn(
            "`influencekit.solvers.cg.PRECONDITIONERS` is deprecated; use "
            "influencekit.solvers.registry.preconditioner_names().",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(preconditioner_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_rtol(dtype: torch.dtype) -> float:
    """1e-8 in float64, 1e-5 in float32, 1e-3 below (what the dtype can reach with an HVP's round-off)."""
    return {torch.float64: 1e-8, torch.float32: 1e-5}.get(dtype, 1e-3)


def orthonormal_rows(M: torch.Tensor, *, drop: float) -> torch.Tensor:
    """An orthonormal basis (rows) of the row space of ``M`` ``(m, n)``, dropping directions whose singular
    value is below ``drop`` times the largest; twice Gram-eigh (CholeskyQR2-like) for accuracy."""
    for _ in range(2):
        gram = M @ M.T
        evals, evecs = torch.linalg.eigh(gram)
        top = float(evals[-1]) if len(evals) else 0.0
        if top <= 0.0:
            return M[:0]
        keep = evals > (drop * drop) * top
        M = (evecs[:, keep] / evals[keep].sqrt()).T @ M
    return M


@register
class CGSolver(Solver):
    """Breakdown-free block conjugate gradient over Hessian-vector products.

    Args:
        rtol: relative tolerance of the stopping rule; ``None`` picks 1e-8 (float64) or 1e-5 (float32).
        atol: absolute tolerance of the stopping rule.
        max_iter: most block iterations.
        preconditioner: ``None``; the name of a solver with ``capabilities.approximate_inverse`` (``"kfac"``,
            ``"ekfac"``, ``"arnoldi"``, ``"exact"``), fitted on the same operator in ``fit`` (K-FAC needs a
            ``ClassificationTask``/``RegressionTask`` or a task that declares how to sample labels); or an unfitted
            :class:`Solver` instance of that kind, used as M⁻¹.
        score_rtol: also stop a right-hand side once an iteration changes its solution by less than this,
            relative, in the norm the scores see (see the module docstring); ``None``: the residual rule only.
        warn: warn with a :class:`~influencekit.core.errors.ConvergenceWarning` when a right-hand side did not
            meet the rule within ``max_iter``.
        check_residuals: report ‖v − (H + δI)x‖/‖v‖ from one more block of products after the solve, instead of the
            residuals the recursion carries (the same up to round-off: 8e-12 relative on the digits MLP in float64,
            where the extra block was a quarter of the products of a solve to rtol 1e-4).
    """

    name = "cg"
    capabilities = Capabilities(sharded=True, iterative=True)

    def __init__(
        self,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iter: int = 1000,
        preconditioner: Any = None,
        score_rtol: float | None = None,
        warn: bool = True,
        check_residuals: bool = False,
    ) -> None:
        super().__init__()
        self.rtol = None if rtol is None else check_number("rtol", rtol, low=0.0, high=1.0, low_inclusive=False)
        self.atol = check_number("atol", atol, low=0.0)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        names = preconditioner_names()
        if preconditioner is not None and not isinstance(preconditioner, (str, Solver)):
            raise InputTypeError(
                f"`preconditioner` must be None, one of {', '.join(map(repr, names))} or a Solver instance. Got "
                f"{type(preconditioner).__name__}."
            )
        if isinstance(preconditioner, str) and preconditioner not in names:
            raise InputError(
                f"`preconditioner` must be None, one of {', '.join(map(repr, names))} or a Solver instance. Got "
                f"{preconditioner!r}."
            )
        if isinstance(preconditioner, Solver) and not preconditioner.capabilities.approximate_inverse:
            raise InputError(
                f"`preconditioner` must be a direct approximate inverse ({', '.join(names)}), not an iterative "
                f"{preconditioner.name} solver."
            )
        self.preconditioner = preconditioner
        self.score_rtol = (
            None
            if score_rtol is None
            else check_number("score_rtol", score_rtol, low=0.0, high=1.0, low_inclusive=False)
        )
        self.warn = bool(warn)
        self.check_residuals = bool(check_residuals)

    def _preconditioner_solver(self) -> Solver | None:
        if self.preconditioner is None or isinstance(self.preconditioner, Solver):
            return self.preconditioner
        return SOLVERS[self.preconditioner]()

    def check_task(self, task: Task) -> None:
        """With a K-FAC/EK-FAC preconditioner, its own check of the task (when the Influence is built)."""
        if self.preconditioner is not None:
            self.preconditioner_ = self._preconditioner_solver()
            try:
                self.preconditioner_.check_task(task)
            except UnsupportedError as exc:
                raise UnsupportedError(
                    f"CG's preconditioner {self.preconditioner_.name!r} cannot work with this task: {exc} (For CG, "
                    "leave the preconditioner out: plain CG needs only Hessian-vector products.)"
                ) from exc

    def cost(self, probe: CostProbe) -> SolverCost:
        """Nothing to fit; a solve cg_iterations·q·n·τ_H, with the iteration count an assumption of the planner."""
        it = probe.cg_iterations
        return SolverCost(
            fit_seconds=0.0,
            fit_memory=probe.base,
            fit_formula="nothing to fit",
            state=0,
            solve_seconds=it * probe.hvp_seconds(probe.queries),
            solve_memory=6 * probe.queries * probe.p * probe.item,
            solve_formula=f"cg_iterations·q·n·τ_H, cg_iterations = {it} assumed",
            notes=(
                f"cg: {it} block iterations assumed (set cg_iterations=); the real count depends on the conditioning "
                "of H + δI.",
            ),
        )

    def _fit(self, operator: CurvatureOperator) -> None:
        self.rtol_ = default_rtol(operator.dtype) if self.rtol is None else self.rtol
        self.preconditioner_ = getattr(self, "preconditioner_", None) or self._preconditioner_solver()
        if self.preconditioner_ is not None:
            self.preconditioner_.fit(operator)

    def _precondition(self, R: torch.Tensor) -> torch.Tensor:
        return R if self.preconditioner_ is None else self.preconditioner_.solve(R).x

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        op = self.operator_
        k = V.shape[0]
        drop = 100 * torch.finfo(V.dtype).eps ** 0.5  # rank threshold of the direction block
        X = torch.zeros_like(V)
        R = V.clone()
        threshold = torch.clamp(self.rtol_ * V.norm(dim=1), min=self.atol)
        done = R.norm(dim=1) <= threshold
        by_scores = torch.zeros_like(done)
        x_energy = torch.zeros(
            k, dtype=V.dtype, device=V.device
        )  # ‖x_j‖²_A, accumulated: the directions are A-conjugate
        P = orthonormal_rows(self._precondition(R[~done]) if bool((~done).any()) else R[:0], drop=drop)
        iterations = 0
        hvps = 0
        while not bool(done.all()) and iterations < self.max_iter and len(P):
            Q = op.matvec(P)  # (m, n): (H + δI) applied to each direction
            hvps += len(P)
            PQ = P @ Q.T
            PQ = 0.5 * (PQ + PQ.T)
            evals = torch.linalg.eigvalsh(PQ)
            if float(evals[0]) <= 0:
                raise NumericalError(
                    f"CG met negative curvature: a direction p with pᵀ(H + δI)p/‖p‖² = {float(evals[0]):.3g} ≤ 0, so "
                    f"H + δI is not positive definite (δ = {op.damping:g}). Raise `damping` above "
                    f"{abs(float(evals[0])) * 2:.3g} (non-convex models need it), or check that the model is trained "
                    "to a minimum."
                )
            alpha = torch.linalg.solve(PQ, P @ R.T)  # (m, k)
            X += alpha.T @ P
            R -= alpha.T @ Q
            iterations += 1
            if self.score_rtol is not None:
                step_energy = (alpha * (PQ @ alpha)).sum(dim=0)  # ‖Pα_j‖²_A
                x_energy += step_energy
                small = (step_energy <= self.score_rtol**2 * x_energy) & ~done
                by_scores |= small
                done = done | small
            done = done | (R.norm(dim=1) <= threshold)
            if bool(done.all()):
                break
            Z = self._precondition(R)
            beta = -torch.linalg.solve(PQ, Q @ Z.T)  # (m, k)
            P = orthonormal_rows(Z + beta.T @ P, drop=drop)
        if self.check_residuals:
            rel = relative_residuals(op, X, V)
            hvps += k
        else:  # the recursion's residuals R = V − (H + δI)X
            vn = V.norm(dim=1)
            rel = torch.where(vn > 0, R.norm(dim=1) / vn.clamp_min(torch.finfo(V.dtype).tiny), R.norm(dim=1))
        converged = bool(done.all())
        if not converged and self.warn:
            warnings.warn(
                f"CG stopped after max_iter={self.max_iter} iterations with {int((~done).sum())} of {k} right-hand "
                f"sides above rtol={self.rtol_:g} (worst relative residual {float(rel.max()):.3g}). Raise "
                f"{setting_hint('max_iter', 2 * self.max_iter)}, or raise {setting_hint('damping', scope='influence')} "
                "if H is "
                "ill-conditioned.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return X, {
            "iterations": iterations,
            "relative_residual": float(rel.max()) if k else 0.0,
            "converged": converged,
            "hvps": float(hvps),
            "details": {
                "rtol": self.rtol_,
                "atol": self.atol,
                "score_rtol": self.score_rtol,
                "method": "breakdown-free block CG"
                + (f", preconditioned by {self.preconditioner_.name}" if self.preconditioner_ else ""),
                "stopped_by_scores": int(by_scores.sum()),
                "relative_residuals": rel.tolist(),
                "residuals": "checked by one more block of products" if self.check_residuals else "the recursion's",
            },
        }

    def describe(self) -> dict[str, Any]:
        return {
            "solver": self.name,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_iter": self.max_iter,
            "preconditioner": self.preconditioner
            if isinstance(self.preconditioner, (str, type(None)))
            else self.preconditioner.describe(),
            "score_rtol": self.score_rtol,
            "check_residuals": self.check_residuals,
        }
