"""Conjugate gradient for many right-hand sides at once.

Each right-hand side ``v_j`` runs its own CG recursion (its own step sizes α_j, β_j), but all of them
share one vectorised Hessian-vector product per iteration, so k test points cost about as many passes
over the training data as one. Stopping rule, per right-hand side (as in SciPy's ``cg``)::

    ‖r_j‖ ≤ max(rtol · ‖v_j‖, atol),   r_j = v_j − (H + δI) x_j   (the recursively updated residual)

A right-hand side that has met it is frozen and drops out of the products. After the loop the true
residual is recomputed with the operator and reported. CG needs H + δI positive definite: a direction
with pᵀ(H + δI)p ≤ 0 stops the solve with an error that suggests a damping.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..checks import check_int, check_number
from ..errors import ConvergenceWarning, NumericalError
from .base import Solver, relative_residuals

__all__ = ["CGSolver"]


def default_rtol(dtype: torch.dtype) -> float:
    """1e-8 in float64, 1e-5 in float32, 1e-3 below (what the dtype can reach with an HVP's round-off)."""
    return {torch.float64: 1e-8, torch.float32: 1e-5}.get(dtype, 1e-3)


class CGSolver(Solver):
    """Batched conjugate gradient (Hestenes & Stiefel 1952) over Hessian-vector products.

    Args:
        rtol: relative tolerance of the stopping rule; ``None`` picks 1e-8 (float64) or 1e-5 (float32).
        atol: absolute tolerance of the stopping rule.
        max_iter: most iterations per right-hand side.
        warn: warn with a :class:`~influencekit.errors.ConvergenceWarning` when a right-hand side did not
            meet the rule within ``max_iter``.
    """

    name = "cg"
    capabilities = frozenset({"batched"})

    def __init__(self, *, rtol: float | None = None, atol: float = 0.0, max_iter: int = 1000, warn: bool = True) -> None:
        super().__init__()
        self.rtol = None if rtol is None else check_number("rtol", rtol, low=0.0, high=1.0, low_inclusive=False)
        self.atol = check_number("atol", atol, low=0.0)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.warn = bool(warn)

    def _fit(self, operator: Any) -> None:
        self.rtol_ = default_rtol(operator.dtype) if self.rtol is None else self.rtol

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        op = self.operator_
        k = V.shape[0]
        X = torch.zeros_like(V)
        R = V.clone()
        P = R.clone()
        rs = (R * R).sum(dim=1)
        threshold = torch.clamp(self.rtol_ * V.norm(dim=1), min=self.atol) ** 2
        done = rs <= threshold
        iters = torch.zeros(k, dtype=torch.long)
        hvps = 0
        for _ in range(self.max_iter):
            active = (~done).nonzero().flatten()
            if len(active) == 0:
                break
            Pa = P[active]
            AP = op.matvec(Pa)
            hvps += len(active)
            curvature = (Pa * AP).sum(dim=1)
            if bool((curvature <= 0).any()):
                j = int(torch.argmin(curvature / (Pa * Pa).sum(dim=1)))
                q = float(curvature[j] / (Pa[j] * Pa[j]).sum())
                raise NumericalError(
                    f"CG met negative curvature: pᵀ(H + δI)p/‖p‖² = {q:.3g} ≤ 0, so H + δI is not positive definite "
                    f"(δ = {op.damping:g}). Raise `damping` above {abs(q) * 2:.3g} (non-convex models need it), or "
                    "check that the model is trained to a minimum."
                )
            alpha = rs[active] / curvature
            X[active] += alpha[:, None] * Pa
            R[active] -= alpha[:, None] * AP
            rs_new = (R[active] * R[active]).sum(dim=1)
            beta = rs_new / rs[active]
            P[active] = R[active] + beta[:, None] * Pa
            rs[active] = rs_new
            iters[active] += 1
            done[active] = rs_new <= threshold[active]
        rel = relative_residuals(op, X, V)
        converged = bool(done.all())
        if not converged and self.warn:
            worst = float(rel.max())
            warnings.warn(
                f"CG stopped after max_iter={self.max_iter} iterations with {int((~done).sum())} of {k} right-hand "
                f"sides above rtol={self.rtol_:g} (worst relative residual {worst:.3g}). Raise `max_iter`, or raise "
                "`damping` if H is ill-conditioned.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return X, {
            "iterations": int(iters.max()) if k else 0,
            "relative_residual": float(rel.max()) if k else 0.0,
            "converged": converged,
            "hvps": float(hvps + k),
            "details": {"rtol": self.rtol_, "atol": self.atol},
        }

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "rtol": self.rtol, "atol": self.atol, "max_iter": self.max_iter}
