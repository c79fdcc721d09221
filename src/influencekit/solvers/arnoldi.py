"""Low-rank inverse from the top eigenpairs of H found by Lanczos: the Arnoldi solver of Schioppa et al.

Schioppa, Zablotskaia, Vilar & Sokolov (2022), "Scaling Up Influence Functions", AAAI
(https://arxiv.org/abs/2112.03052). H is symmetric, so Arnoldi's iteration is Lanczos'; it runs with
full reorthogonalisation (:func:`~influencekit.core.spectrum.lanczos`) on H *without* damping, one
Hessian-vector product per iteration::

    n_iter Lanczos steps:  Q (m, n_params) orthonormal,  T = Q H Qᵀ (m, m) tridiagonal, float64
    T = Y diag(θ) Yᵀ;  keep the `rank` largest Ritz values θ_i and vectors v_i = Qᵀ y_i   ("distil")
    (H + δI)⁻¹ ≈ Σ_i v_i v_iᵀ / (θ_i + δ)                                    remainder="drop"
                 + (1/δ)(I − V Vᵀ)                                           remainder="damped"

``"drop"`` is what the peers do: the complement of the top-`rank` subspace, where H's eigenvalues are
smallest and H⁻¹ largest, is ignored. ``"damped"`` treats H as zero there, so (H + δI)⁻¹ acts as 1/δ on
it; this needs δ > 0. At ``rank = n_params`` both equal the exact inverse. The eigenvalue problem of T
is solved in float64; the Ritz pairs' accuracy is bounded by ‖H v_i − θ_i v_i‖ = β_m |y_{m,i}|, which is
reported. A solve costs two products with the ``(rank, n_params)`` basis and no HVP, apart from the
few used to report the residual.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ..core.checks import check_int
from ..core.curvature import CurvatureOperator
from ..core.errors import CurvatureWarning, InputError, NumericalError
from ..core.spectrum import lanczos
from .base import Capabilities, Solver, relative_residuals
from .costs import CostProbe, SolverCost
from .registry import register

__all__ = ["ArnoldiSolver"]

logger = logging.getLogger(__name__)

# a kept Ritz pair counts as converged when ‖H v − θ v‖ ≤ RITZ_RTOL · (largest Ritz value)
RITZ_RTOL = 1e-3


@register
class ArnoldiSolver(Solver):
    """Top-`rank` eigenpairs of H by Lanczos with full reorthogonalisation, inverted with the damping.

    Args:
        rank: eigenpairs kept (1 ≤ rank ≤ n_params); memory ``rank × n_params`` of the model's dtype.
        n_iter: Lanczos iterations (full-data HVPs), at least ``rank``; ``None`` means ``2·rank``. Capped at
            n_params (the Krylov space is then the whole space). More iterations make the kept pairs more
            accurate; the Lanczos basis needs ``n_iter × n_params`` memory during ``fit``.
        remainder: ``"drop"`` (ignore the complement of the kept subspace, as the peers do) or ``"damped"``
            (add (1/δ)(I − VVᵀ); needs ``damping > 0``).
        seed: seed of the Lanczos start vector (and of the subsample).
        examples: run Lanczos on the Hessian of a seeded random subsample of this many training examples (plus
            λI) instead of the whole set, so the fit costs ``n_iter`` HVPs over ``examples`` points rather than
            over n (Schioppa et al. 2022 estimate the spectrum on a subset too). ``None`` (default): all of
            them. The kept eigenpairs are then those of the subsample's Hessian; the reported residuals are
            still measured against the full H + δI.
        residual_rows: how many right-hand sides (spread evenly) the reported residual is computed on; each
            costs one full-data HVP, in every solve (scoring solves one block of test points at a time, so
            10,000 training points × 8 blocks spent 144 of 153 s of scoring on it in benchmarks/scale.py).
            0 skips it: the reports then carry NaN.

    Fitted attributes: ``eigenvalues_`` (rank,) float64, descending, eigenvalues of H without damping;
    ``eigenvectors_`` (rank, n_params) orthonormal rows; ``ritz_values_`` all Ritz values of T (ascending);
    ``ritz_residuals_`` (rank,) the bounds β_m|y_{m,i}| of the kept pairs.
    """

    name = "arnoldi"
    capabilities = Capabilities(
        approximate_inverse=True, low_rank=True, quadratic_form=True, sharded=True, stochastic=True
    )
    _state_fields = (
        "eigenvalues_",
        "eigenvectors_",
        "_inv",
        "ritz_values_",
        "ritz_residuals_",
        "n_iter_",
        "converged_",
        "sample_",
        "examples_used_",
    )

    def __init__(
        self,
        *,
        rank: int = 100,
        n_iter: int | None = None,
        remainder: str = "drop",
        seed: int = 0,
        residual_rows: int = 8,
        examples: int | None = None,
    ) -> None:
        super().__init__()
        self.rank = check_int("rank", rank, low=1)
        self.n_iter = None if n_iter is None else check_int("n_iter", n_iter, low=self.rank)
        if remainder not in ("drop", "damped"):
            raise InputError(f"`remainder` must be 'drop' or 'damped'. Got {remainder!r}.")
        self.remainder = remainder
        self.seed = check_int("seed", seed, low=0)
        self.residual_rows = check_int("residual_rows", residual_rows, low=0)
        self.examples = None if examples is None else check_int("examples", examples, low=1)

    def cost(self, probe: CostProbe) -> SolverCost:
        """Fit min(n_iter or 2·rank, p) HVPs over n (or `examples`); a solve 4·q·rank·p / ρ + residual_rows·n·τ_h.
        Scores in the eigenbasis when remainder="drop" and rank < min(n_test, n_params)."""
        n, p, q, item = probe.n, probe.p, probe.queries, probe.item
        if self.rank > p:
            raise InputError(
                f"`rank` must be an int in [1, n_params] = [1, {p}]. Got {self.rank}. Lower `rank` or use "
                "solver='exact'."
            )
        steps = min(self.n_iter if self.n_iter is not None else 2 * self.rank, p)
        state = self.rank * p * item
        m_l = min(self.examples or n, n)  # Lanczos on a subsample of m_l examples when `examples` is set
        rows = min(q, self.residual_rows)
        return SolverCost(
            fit_seconds=steps * m_l * probe.tau_hvp,
            fit_memory=probe.base + state + steps * p * item,
            fit_formula=f"{steps} Lanczos steps · {'n' if m_l == n else 'examples'}·τ_h; state rank·p·b",
            state=state,
            solve_seconds=4 * q * self.rank * p / probe.flops + probe.hvp_seconds(rows),
            solve_memory=2 * q * p * item,
            solve_formula="4·q·rank·p / ρ + residual_rows·n·τ_h",
            # scores in the eigenbasis (Influence._score_basis)
            basis_rank=self.rank if self.remainder == "drop" and self.rank < min(probe.n_test, p) else 0,
        )

    def _fit(self, operator: CurvatureOperator) -> None:
        p = operator.n_params
        delta = operator.damping
        if self.rank > p:
            raise InputError(
                f"`rank` must be an int in [1, n_params] = [1, {p}]. Got {self.rank}. Lower `rank` (rank = n_params "
                "is the exact inverse) or use solver='exact'."
            )
        if self.remainder == "damped" and delta <= 0:
            raise InputError(
                f"`remainder`='damped' adds (1/δ)(I − VVᵀ) and needs `damping` > 0. Got damping={delta:g}. Pass a "
                "damping (e.g. damping=0.01) or use remainder='drop'."
            )
        steps = min(self.n_iter if self.n_iter is not None else 2 * self.rank, p)

        n = operator.n_examples
        if self.examples is not None and self.examples < n:
            gen = torch.Generator().manual_seed(self.seed)
            sample = torch.randperm(n, generator=gen)[: self.examples].sort().values
            self.sample_ = sample

            def h_matvec(V: torch.Tensor) -> torch.Tensor:  # H of the subsample, without δ
                return operator.minibatch_matvec(V, sample, damped=False)
        else:
            self.sample_ = None

            def h_matvec(V: torch.Tensor) -> torch.Tensor:  # H without δ: the damping enters only the inverse
                return operator.matvec(V, damped=False)

        res = lanczos(h_matvec, p, steps=steps, dtype=operator.dtype, device=operator.device, seed=self.seed)
        theta, Y = torch.linalg.eigh(res.T)  # float64, ascending
        keep = torch.arange(len(theta) - 1, len(theta) - 1 - self.rank, -1)  # the rank largest, descending
        evals = theta[keep]
        self.n_iter_ = len(theta)
        self.examples_used_ = n if self.sample_ is None else len(self.sample_)
        self.ritz_values_ = theta
        self.ritz_residuals_ = res.beta * Y[-1, keep].abs()
        self.eigenvalues_ = evals
        self.eigenvectors_ = Y[:, keep].T.to(device=res.Q.device, dtype=res.Q.dtype) @ res.Q
        top = float(theta.abs().max())
        self.converged_ = bool((self.ritz_residuals_ <= RITZ_RTOL * max(top, torch.finfo(torch.float64).tiny)).all())
        lowest = float(operator.damp(theta[:1])[0])
        if lowest < 0:
            warnings.warn(
                f"H + δI has negative curvature (smallest Ritz value of H {float(theta[0]):.3g}, δ = {delta:g}): θ̂ is "
                "not a "
                "minimum, or the model is non-convex. Influence then has no meaning as a leave-one-out prediction; "
                "use "
                f"damping >= {-float(theta[0]) * 1.01:.3g} (Koh & Liang add damping for non-convex models).",
                CurvatureWarning,
                stacklevel=4,
            )
        shifted = operator.damp(evals)
        # round-off of a Ritz value grows with the Lanczos steps, not with n_params (eps·p flagged 0.45 as
        # singular for a float32 CNN of 1M parameters whose largest eigenvalue is 77)
        tiny = torch.finfo(operator.dtype).eps * max(top, 1.0) * steps
        if bool((shifted.abs() <= tiny).any()):
            raise NumericalError(
                f"H + δI is singular on the kept subspace: a kept eigenvalue plus damping is "
                f"{float(shifted[shifted.abs().argmin()]):.3g} (largest {top:.3g}). Add damping (e.g. "
                f"damping={max(1e-3 * top, 1e-8):.3g}) or an L2 term (`l2=` of the task)."
            )
        self._inv = (1.0 / shifted).to(device=operator.device, dtype=operator.dtype)
        logger.info(
            "arnoldi solver: %d Lanczos steps, kept %d Ritz values in [%.3g, %.3g], largest Ritz residual %.3g",
            steps,
            self.rank,
            float(evals[-1]),
            float(evals[0]),
            float(self.ritz_residuals_.max()),
        )

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        B = self.eigenvectors_
        C = V @ B.T  # (k, rank): coordinates in the kept eigenbasis
        X = (C * self._inv) @ B
        if self.remainder == "damped":
            X += (V - C @ B) / self.operator_.damping
        return X

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        X = self._apply(V)
        # a residual costs one full-data HVP per row: check at most `residual_rows`, spread evenly
        if self.residual_rows and len(V):
            rows = torch.linspace(0, len(V) - 1, min(len(V), self.residual_rows)).round().long().unique()
            rel = relative_residuals(self.operator_, X[rows], V[rows])
        else:
            rows, rel = torch.zeros(0, dtype=torch.long), None
        return X, {
            "iterations": self.n_iter_,
            "relative_residual": float(rel.max()) if rel is not None else (float("nan") if len(V) else 0.0),
            "converged": self.converged_,
            "hvps": float(len(rows)),
            "details": {
                "method": "Lanczos with full reorthogonalisation",
                "rank": self.rank,
                "remainder": self.remainder,
                "lanczos_hvps": self.n_iter_,
                "lanczos_examples": self.examples_used_,
                "ritz_values": [float(t) for t in self.eigenvalues_],
                "max_ritz_residual": float(self.ritz_residuals_.max()),
                "ritz_rtol": RITZ_RTOL,
                "residual_checked_rows": len(rows),
            },
        }

    def solution_basis(self) -> torch.Tensor | None:
        """The kept eigenvectors when ``remainder="drop"`` (every solve lies in their span); None for "damped"."""
        self._require_fitted()
        return self.eigenvectors_ if self.remainder == "drop" else None

    def quadratic_form(self, G: torch.Tensor) -> torch.Tensor:
        """``gᵀ(H + δI)⁻¹g`` per row of ``G`` in the kept eigenbasis (plus the damped remainder), no HVP."""
        op = self._require_fitted()
        Gd = G.to(device=op.device, dtype=op.dtype)
        C = Gd @ self.eigenvectors_.T
        out = (C * C * self._inv).sum(dim=1)
        if self.remainder == "damped":
            out += ((Gd * Gd).sum(dim=1) - (C * C).sum(dim=1)).clamp_min(0.0) / op.damping
        return out.to(G.dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "solver": self.name,
            "rank": self.rank,
            "n_iter": self.n_iter,
            "remainder": self.remainder,
            "seed": self.seed,
            "examples": self.examples,
        }
