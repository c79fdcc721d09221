"""LiSSA: the stochastic Neumann-series estimate of (H + δI)⁻¹v used by Koh & Liang (2017), after
Agarwal, Bullins & Hazan (2017), "Second-Order Stochastic Optimization for Machine Learning in Linear Time".

With A = H + δI and a scale s above A's largest eigenvalue, (A/s)⁻¹ = Σ_j (I − A/s)^j, estimated by the
recursion over random mini-batch Hessians A_{B_j}::

    h_0 = v,   h_j = v + h_{j−1} − A_{B_j} h_{j−1} / s,   estimate = h_depth / s

``repeats`` independent recursions are averaged. The error shrinks by about (1 − λ_min(A)/s) per step, so
the depth needed grows with s/λ_min. ``scale`` defaults to ``scale_margin`` times the largest
eigenvalue found by Lanczos on the full Hessian and by power iteration on a few mini-batch Hessians.
While it runs, ‖h_j‖ can never exceed (j + 1)‖v‖ if the recursion contracts; twice that bound stops
it at once with :class:`~influencekit.errors.SolverDivergenceError` naming the setting to raise. The true
relative residual of the running estimate is checked every max(10, 10·n/batch) steps (the checks cost about a
tenth of the recursion): one above 2 (twice that of the estimate 0) that is still growing, or one above 1 after
growing at three checks in a row, stops it with that error too, and an estimate whose final residual is above 2
is never returned (a mini-batch recursion at its noise floor wanders, also upwards, but stays bounded). The report
gives the residual history of the last repeat, the measured factor per step (a least-squares fit over the second
half of the checks) and the trend (converged, converging, stalled at the mini-batch noise, diverging); the advice
of a warning follows the trend.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import torch

from ..checks import check_int, check_number
from ..curvature import CurvatureOperator
from ..errors import ConvergenceWarning, CurvatureWarning, SolverDivergenceError, setting_hint
from ..progress import progress_bar
from ..spectrum import lanczos_extremes, power_iteration
from .base import Solver, relative_residuals
from .costs import CostProbe, SolverCost

__all__ = ["LissaSolver"]


def _diverging(history: list[tuple[int, float]]) -> bool:
    """The residual is above twice that of the estimate 0 and still growing, or above 1 after growing at each of the
    last three checks. (A mini-batch recursion at its noise floor wanders, also upwards, but stays bounded.)"""
    (_, a), (_, b) = history[-2:] if len(history) > 1 else ((0, 1.0), history[-1])
    if b > 2.0 and b > a:
        return True
    last = [r for _, r in history[-4:]]
    return len(last) == 4 and last[-1] > 1.0 and all(y > x for x, y in zip(last, last[1:]))


def _fitted_rate(history: list[tuple[int, float]]) -> tuple[float, int] | None:
    """The residual's factor per step — exp of the least-squares slope of log(residual) against the step — over the
    checks of the second half of the run so far (at least three: where a noise floor or the slowest mode has been
    reached; else over all), and the number of steps those checks span; None with fewer than two checks."""
    points = [(j, r) for j, r in history if r > 0]
    late = [(j, r) for j, r in points if j >= points[-1][0] / 2] if points else []
    points = late if len(late) >= 3 else points
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    slope, _ = statistics.linear_regression([float(j) for j, _ in points], [math.log(r) for _, r in points])
    return math.exp(slope), points[-1][0] - points[0][0]


def _trend(history: list[tuple[int, float]], fitted: tuple[float, int] | None, *, noise_bound: float | None = None) -> str:
    """'diverging' (the fitted factor above 1 and the residual above 1), 'stalled' (the fit shrinks the residual by
    less than 10% over the steps it spans, or, for a mini-batch recursion, ``noise_bound`` — the deterministic
    recursion's error bound rate**depth — is below a tenth of the residual: what is left is noise) or 'converging'."""
    if fitted is None:
        return "converging" if history[-1][1] < 1.0 else "diverging"
    rate, span = fitted
    if rate > 1.0 and history[-1][1] > 1.0:
        return "diverging"
    if noise_bound is not None and noise_bound < 0.1 * history[-1][1]:
        return "stalled"
    return "stalled" if rate ** span > 0.9 else "converging"


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
                f"on it. Use {setting_hint('damping', abs(lo) + operator.damping, scope='influence')} or more (non-convex models need damping).",
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
        # the true residual of the running estimate, checked at most every `every` steps so that the checks (one
        # full-data product each, n/b mini-batch steps) cost about a tenth of the recursion
        every = 10 if b >= n else max(10, math.ceil(10 * n / b))
        history: list[tuple[int, float]] = []
        checks = 0  # residual checks over all repeats (each one full-data product per right-hand side)
        bar = progress_bar(total=self.repeats * self.depth, desc="LiSSA recursion", enabled=bool(getattr(op, "progress", False)))
        try:
            for rep in range(self.repeats):
                h = V.clone()
                history = [(0, 1.0)]  # the estimate 0 has relative residual 1
                for step in range(self.depth):
                    if b >= n:  # a batch as large as the data: the deterministic full-Hessian recursion
                        h = V + h - op.matvec(h) / s
                    else:
                        idx = torch.randint(n, (b,), generator=gen)
                        h = V + h - op.minibatch_matvec(h, idx) / s
                    bar.update(1)
                    hn = h.norm(dim=1)
                    if not bool(torch.isfinite(hn).all()) or bool((hn > 2.0 * (step + 2) * vnorm).any()):
                        raise SolverDivergenceError(self._divergence_message(step + 1, rep + 1, s, history))
                    if (step + 1) % every == 0 and step + 1 < self.depth:
                        history.append((step + 1, float(relative_residuals(op, h / s, V).max())))
                        checks += 1
                        bar.set_postfix(residual=f"{history[-1][1]:.3g}")
                        if _diverging(history):
                            raise SolverDivergenceError(self._divergence_message(step + 1, rep + 1, s, history))
                total += h / s
        finally:
            bar.close()
        X = total / self.repeats
        rel = relative_residuals(op, X, V)
        worst = float(rel.max()) if len(rel) else 0.0
        history.append((self.depth, worst))
        if not worst <= 2.0:  # far worse than the estimate 0: never returned
            raise SolverDivergenceError(self._divergence_message(self.depth, self.repeats, s, history))
        converged = worst <= self.rtol
        rate = 1.0 - max(self.lambda_min_, 0.0) / s
        fitted = _fitted_rate(history)
        measured = None if fitted is None else fitted[0]
        bound = rate ** self.depth if b < n and rate < 1.0 else None
        trend = "converged" if converged else _trend(history, fitted, noise_bound=bound)
        if not converged and self.warn:
            warnings.warn(self._unconverged_message(worst, rate, measured, trend, b, n), ConvergenceWarning, stacklevel=4)
        return X, {
            "iterations": self.depth * self.repeats,
            "relative_residual": worst,
            "converged": converged,
            "hvps": float(self.depth * self.repeats * V.shape[0] * b / n + V.shape[0] * (checks + 1)),
            "details": {
                "scale": s, "lambda_max": self.lambda_max_, "lambda_min": self.lambda_min_, "rate": rate,
                "measured_rate": measured, "trend": trend, "residual_history": history,
            },
        }

    def _unconverged_message(self, worst: float, rate: float, measured: float | None, trend: str, b: int, n: int) -> str:
        shown = "not measured (depth below one check)" if measured is None else f"{measured:.6f} per step"
        head = (
            f"LiSSA did not converge: relative residual {worst:.3g} after depth={self.depth} (rtol={self.rtol:g}); "
            f"the residual is {trend}, measured factor {shown} (1 − λ_min/scale predicts {rate:.6f}, "
            f"λ_min ≈ {self.lambda_min_:.3g}, scale={self.scale_:.4g}). "
        )
        if trend == "diverging":
            return head + (
                f"The recursion does not contract: raise {setting_hint('damping', scope='influence')} (now "
                f"{self.operator_.damping:g}), or {setting_hint('scale', 2 * self.scale_)} if a mini-batch Hessian's "
                f"top eigenvalue exceeds the scale, or {setting_hint('batch_size', min(n, 4 * b))} (now {b})."
            )
        if trend == "stalled" and b < n:
            return head + (
                f"What is left is mini-batch noise, which more depth does not remove: raise "
                f"{setting_hint('batch_size', min(n, 4 * b))} (now {b}) or {setting_hint('repeats', 4 * self.repeats)}."
            )
        speed = measured if measured is not None and 0.0 < measured < 1.0 else rate
        needed = math.ceil(self.depth + math.log(self.rtol / worst) / math.log(speed)) if 0.0 < speed < 1.0 else None
        return head + (
            f"Raise {setting_hint('depth', needed)}{' (reaches rtol at the measured factor)' if needed else ''}, or raise "
            f"{setting_hint('damping', scope='influence')} to improve the conditioning."
        )

    def _divergence_message(self, steps: int, repeat: int, s: float, history: list[tuple[int, float]]) -> str:
        fitted = _fitted_rate(history)
        measured = None if fitted is None else fitted[0]
        if len(history) > 1:
            shown = ", ".join(f"{r:.3g} at step {j}" for j, r in history[-3:])
            why = f"its relative residual went {shown}{f' (factor {measured:.4f} per step)' if measured is not None else ''}"
        else:
            why = "‖h_j‖ exceeded 2·(j+1)·‖v‖, which a contracting recursion never reaches"
        head = f"LiSSA diverged after {steps} step(s) of repeat {repeat}: {why}; no estimate is returned. "
        if self.lambda_min_ < 0:
            return head + (
                f"H + δI has negative curvature (smallest eigenvalue ≈ {self.lambda_min_:.3g}): use "
                f"{setting_hint('damping', self.operator_.damping + 2 * abs(self.lambda_min_), scope='influence')} or more."
            )
        suggested = max(2.0 * s, 1.5 * self.lambda_max_)
        return head + (
            f"`scale`={s:.4g} is below the largest eigenvalue of a mini-batch Hessian plus damping (full Hessian: "
            f"≈ {self.lambda_max_:.3g}). Use {setting_hint('scale', suggested)} or leave scale unset (automatic), or "
            f"raise {setting_hint('batch_size', min(self.operator_.n_examples, 4 * self.batch_size))}."
        )

    def describe(self) -> dict[str, Any]:
        return {
            "solver": self.name, "depth": self.depth, "repeats": self.repeats, "batch_size": self.batch_size,
            "scale": self.scale, "scale_margin": self.scale_margin, "seed": self.seed,
        }
