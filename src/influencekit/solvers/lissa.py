"""LiSSA: the stochastic Neumann-series estimate of (H + δI)⁻¹v used by Koh & Liang (2017), after
Agarwal, Bullins & Hazan (2017), "Second-Order Stochastic Optimization for Machine Learning in Linear Time".

With A = H + δI and a scale s above A's largest eigenvalue, (A/s)⁻¹ = Σ_j (I − A/s)^j, estimated by the
recursion over random mini-batch Hessians A_{B_j}::

    h_0 = v,   h_j = v + h_{j−1} − A_{B_j} h_{j−1} / s,   estimate = h_depth / s

``repeats`` independent recursions are averaged. The error shrinks by about (1 − λ_min(A)/s) per step, so
the depth needed grows with s/λ_min. ``scale`` defaults to ``scale_margin`` times the largest
eigenvalue found by Lanczos on the full Hessian and by power iteration on a few mini-batch Hessians.
While it runs, ‖h_j‖ can never exceed (j + 1)‖v‖ if the recursion contracts; twice that bound stops
it at once with :class:`~influencekit.errors.SolverDivergenceError` naming the setting to raise.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..checks import check_int, check_number
from ..curvature import CurvatureOperator
from ..errors import ConvergenceWarning, CurvatureWarning, SolverDivergenceError
from ..spectrum import lanczos_extremes, power_iteration
from .base import Solver, relative_residuals
from .costs import CostProbe, SolverCost

__all__ = ["LissaSolver"]


class LissaSolver(Solver):
    """The paper's stochastic inverse-HVP estimator, many right-hand sides at once.

    Args:
        depth: recursion steps per repeat (the paper's T).
        repeats: independent recursions averaged (the paper's r).
        batch_size: examples per mini-batch Hessian, drawn with replacement; at least the training-set size
            means the full Hessian at every step (a deterministic recursion).
        scale: s; ``None`` estimates it (see the module docstring).
        scale_margin: factor above the estimated largest eigenvalue for the automatic scale.
        eigen_steps: Lanczos steps (full-data HVPs) for the automatic scale and the curvature check.
        rtol: relative residual under which the estimate counts as converged in the report.
        seed: seed of the mini-batch sampling and of the eigenvalue estimates.
        warn: warn when the final relative residual exceeds ``rtol``.
    """

    name = "lissa"
    capabilities = frozenset({"batched", "sharded", "stochastic"})
    _state_fields = ("lambda_min_", "lambda_max_", "scale_")

    def __init__(
        self,
        *,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int = 128,
        scale: float | None = None,
        scale_margin: float = 1.2,
        eigen_steps: int = 20,
        rtol: float = 0.05,
        seed: int = 0,
        warn: bool = True,
    ) -> None:
        super().__init__()
        self.depth = check_int("depth", depth, low=1)
        self.repeats = check_int("repeats", repeats, low=1)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.scale = None if scale is None else check_number("scale", scale, low=0.0, low_inclusive=False)
        self.scale_margin = check_number("scale_margin", scale_margin, low=1.0)
        self.eigen_steps = check_int("eigen_steps", eigen_steps, low=2)
        self.rtol = check_number("rtol", rtol, low=0.0, low_inclusive=False)
        self.seed = check_int("seed", seed, low=0)
        self.warn = bool(warn)

    def cost(self, probe: CostProbe) -> SolverCost:
        """Fit eigen_steps·n·τ_h + 90·batch·τ_h (Lanczos and power iteration); a solve (repeats·depth·batch + n)·q·τ_H."""
        n, q, p, item = probe.n, probe.queries, probe.p, probe.item
        b = min(self.batch_size, n)
        return SolverCost(
            fit_seconds=self.eigen_steps * probe.hvp_seconds(1) + 90 * b * probe.tau_hvp, fit_memory=probe.base + 3 * p * item,
            fit_formula="eigen_steps·n·τ_h + 90·batch·τ_h", state=0,
            solve_seconds=(self.repeats * self.depth * b / n + 1) * probe.hvp_seconds(q), solve_memory=4 * q * p * item,
            solve_formula="(repeats·depth·batch + n)·q·τ_H",
        )

    def _fit(self, operator: CurvatureOperator) -> None:
        n = operator.n_examples
        b = min(self.batch_size, n)
        lo, hi = lanczos_extremes(
            operator.matvec, operator.n_params, steps=self.eigen_steps, dtype=operator.dtype, device=operator.device, seed=self.seed
        )
        self.lambda_min_, self.lambda_max_ = lo, hi
        if lo <= 0:
            warnings.warn(
                f"H + δI has negative curvature (Lanczos estimate of its smallest eigenvalue: {lo:.3g}); LiSSA diverges "
                f"on it. Use damping >= {abs(lo) + operator.damping:.3g} (non-convex models need damping).",
                CurvatureWarning,
                stacklevel=4,
            )
        if self.scale is not None:
            self.scale_ = self.scale
            return
        gen = torch.Generator().manual_seed(self.seed)
        top = hi
        for probe in range(3):
            idx = torch.randint(n, (b,), generator=gen)
            top = max(top, abs(power_iteration(
                lambda V, idx=idx: operator.minibatch_matvec(V, idx), operator.n_params, iters=30, rtol=1e-3,
                dtype=operator.dtype, device=operator.device, seed=self.seed + 1 + probe,
            )))
        self.scale_ = self.scale_margin * top

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        op = self.operator_
        n = op.n_examples
        b = min(self.batch_size, n)
        s = self.scale_
        gen = torch.Generator().manual_seed(self.seed)
        vnorm = V.norm(dim=1)
        total = torch.zeros_like(V)
        for rep in range(self.repeats):
            h = V.clone()
            for step in range(self.depth):
                if b >= n:  # a batch as large as the data: the deterministic full-Hessian recursion
                    h = V + h - op.matvec(h) / s
                else:
                    idx = torch.randint(n, (b,), generator=gen)
                    h = V + h - op.minibatch_matvec(h, idx) / s
                hn = h.norm(dim=1)
                if not bool(torch.isfinite(hn).all()) or bool((hn > 2.0 * (step + 2) * vnorm).any()):
                    raise SolverDivergenceError(self._divergence_message(step + 1, rep + 1, s))
            total += h / s
        X = total / self.repeats
        rel = relative_residuals(op, X, V)
        worst = float(rel.max()) if len(rel) else 0.0
        converged = worst <= self.rtol
        rate = 1.0 - max(self.lambda_min_, 0.0) / s
        if not converged and self.warn:
            # the deterministic recursion's error after `depth` steps is at most rate**depth; when that is already
            # far below the residual, what is left is mini-batch noise, which more depth does not remove
            bias = rate ** self.depth if rate < 1.0 else 1.0
            if b < n and bias < 0.1 * worst:
                advice = (
                    f"the recursion's own error is already below {bias:.2g}, so the rest is mini-batch noise: raise "
                    f"`batch_size` (now {b}) or `repeats` (now {self.repeats}) rather than `depth`"
                )
            else:
                needed = math.ceil(math.log(max(self.rtol, 1e-300)) / math.log(rate)) if 0.0 < rate < 1.0 else None
                advice = (
                    f"raise `depth`{f' (about {needed} steps reach rtol)' if needed else ''}, or raise `damping` to "
                    "improve the conditioning"
                )
            warnings.warn(
                f"LiSSA's relative residual is {worst:.3g} after depth={self.depth} (rtol={self.rtol:g}). Each step "
                f"shrinks the error by about {rate:.6f} (1 − λ_min/scale, λ_min ≈ {self.lambda_min_:.3g}, scale={s:.4g}): "
                f"{advice}.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return X, {
            "iterations": self.depth * self.repeats,
            "relative_residual": worst,
            "converged": converged,
            "hvps": float(self.depth * self.repeats * V.shape[0] * b / n + V.shape[0]),
            "details": {"scale": s, "lambda_max": self.lambda_max_, "lambda_min": self.lambda_min_, "rate": rate},
        }

    def _divergence_message(self, steps: int, repeat: int, s: float) -> str:
        head = (
            f"LiSSA diverged after {steps} step(s) of repeat {repeat}: ‖h_j‖ exceeded 2·(j+1)·‖v‖, which a contracting "
            "recursion never does. "
        )
        if self.lambda_min_ < 0:
            return head + (
                f"H + δI has negative curvature (smallest eigenvalue ≈ {self.lambda_min_:.3g}): raise `damping` by at least "
                f"{abs(self.lambda_min_):.3g}."
            )
        suggested = max(2.0 * s, 1.5 * self.lambda_max_)
        return head + (
            f"`scale`={s:.4g} is below the largest eigenvalue of a mini-batch Hessian plus damping (full Hessian: "
            f"≈ {self.lambda_max_:.3g}). Use scale={suggested:.4g} or scale=None (automatic), or raise `batch_size`."
        )

    def describe(self) -> dict[str, Any]:
        return {
            "solver": self.name, "depth": self.depth, "repeats": self.repeats, "batch_size": self.batch_size,
            "scale": self.scale, "scale_margin": self.scale_margin, "seed": self.seed,
        }
