"""LiSSA: the stochastic Neumann-series estimate of (H + δI)⁻¹v used by Koh & Liang (2017), after
Agarwal, Bullins & Hazan (2017), "Second-Order Stochastic Optimization for Machine Learning in Linear Time".

With A = H + δI and a scale s above A's largest eigenvalue, (A/s)⁻¹ = Σ_j (I − A/s)^j, estimated by the
recursion over random mini-batch Hessians A_{B_j} (the paper's h_j = v + h_{j−1} − A_{B_j} h_{j−1}/s with x = h/s)::

    x_0 = 0,   x_{j+1} = x_j + α(v − A_{B_j} x_j) + β(x_j − x_{j−1}),   α = 1/s, β = 0 in the paper's form

``repeats`` independent recursions are averaged. The error shrinks by about (1 − λ_min(A)/s) per step, so
the depth needed grows with s/λ_min. At the defaults the solver chooses from the spectrum that its fit estimates
(Lanczos on the full Hessian): the full training set as the batch where that is cheaper (no sampling noise), there
the heavy-ball step (Polyak 1964: α, β from the interval [λ_min, s], error factor (√κ − 1)/(√κ + 1) per step), and
the depth by the residual (see :class:`LissaSolver`). ``scale`` defaults to ``scale_margin`` times the largest
eigenvalue found by Lanczos on the full Hessian and, with mini-batches, by power iteration on a few mini-batch
Hessians. While it runs, ‖x_j‖ can never exceed j‖v‖/s if the plain recursion contracts (√κ times more for the
heavy-ball one's transient); twice that bound stops it at once with
:class:`~influencekit.core.errors.SolverDivergenceError`
naming the setting to raise. The true relative residual of the running estimate comes with every step's product of
the deterministic recursion and is checked every max(10, 10·n/batch) steps of a mini-batch one (the checks cost about
a tenth of the recursion): one above 2 (twice that of the estimate 0; the transient's bound with momentum) that is
still growing, or one above 1 after growing at three checks in a row (plain recursion), stops it with that error too,
and an estimate whose final residual is above 2 is never returned (a mini-batch recursion at its noise floor wanders,
also upwards, but stays bounded). The report gives the residual history of the last repeat, the measured factor
per step (a least-squares fit over the second half of the checks), the trend (converged, converging, stalled at the
mini-batch noise, diverging), the batch, step and momentum used and why; the advice of a warning follows the trend.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import torch

from ..core.checks import check_choice, check_int, check_number
from ..core.curvature import CurvatureOperator
from ..core.errors import (
    ConvergenceWarning,
    CurvatureWarning,
    InputError,
    SolverDivergenceError,
    UnsupportedError,
    setting_hint,
)
from ..core.progress import progress_bar
from ..core.spectrum import lanczos_extremes, power_iteration
from .base import Capabilities, Solver, relative_residuals
from .costs import CostProbe, SolverCost
from .registry import register

__all__ = ["LissaSolver"]


def _diverging(history: list[tuple[int, float]], limit: float = 2.0, *, streak: bool = True) -> bool:
    """The residual is above ``limit`` times that of the estimate 0 and still growing, or (``streak``) above 1 after
    growing at each of the last three checks. (A mini-batch recursion at its noise floor wanders, also upwards, but
    stays bounded; a heavy-ball recursion's residual rises for a while before it falls: no streak rule, a higher
    limit.)"""
    (_, a), (_, b) = history[-2:] if len(history) > 1 else ((0, 1.0), history[-1])
    if b > limit and b > a:
        return True
    if not streak:
        return False
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


def _trend(
    history: list[tuple[int, float]], fitted: tuple[float, int] | None, *, noise_bound: float | None = None
) -> str:
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
    return "stalled" if rate**span > 0.9 else "converging"


# the mini-batch of the stochastic recursion when batch_size is automatic and the data are many
STOCHASTIC_BATCH = 128
# the cost model of products="auto": a full-data HVP costs about this many flops per example and parameter (a
# forward and backward pass, ~6·n·p, twice over); a product with an explicit H + δI costs 2·p² per right-hand side
HVP_FLOPS_PER_EXAMPLE_PARAM = 12


@register
class LissaSolver(Solver):
    """The paper's stochastic inverse-HVP estimator, many right-hand sides at once.

    At its defaults every setting follows from the spectrum that the fit estimates (Lanczos on the full Hessian):

    * ``batch_size=None``: the full training set (the deterministic recursion, no sampling noise) when
      n ≤ 2·√κ·128, κ = λ_max/λ_min — there a deterministic step with momentum reaches rtol in fewer example-products
      than plain mini-batch steps of 128 (about √κ/2 against κ·128/n full products per e-fold) — else mini-batches of
      128;
    * ``momentum=None``: the heavy-ball step of the deterministic recursion, x ← x + α(v − Ax) + β(x − x_prev) with
      α = 4/(√a + √b)², β = ((√b − √a)/(√b + √a))² for the estimated interval [a, b] = [λ_min, scale] (the error
      shrinks by about (√κ − 1)/(√κ + 1) per step instead of 1 − 1/κ); none on mini-batches, where it would amplify
      the sampling noise;
    * ``depth=None``: the recursion stops at the first residual check below ``rtol`` (every step of the deterministic
      recursion reads its residual for free; mini-batch runs check every max(10, 10·n/batch) steps), after at most
      3× the steps the predicted rate needs (at least 100);
    * ``products="auto"``: the deterministic recursion multiplies by an explicit H + δI (built once, by
      :meth:`~influencekit.core.curvature.CurvatureOperator.dense`: in closed form for a final Linear layer, else p
      HVPs) where that costs less than the HVPs the predicted steps need: p + steps·q·p/(6n) against steps·q
      one-vector HVPs (a full-data HVP ≈ 12·n·p flops, a dense product 2·p² per right-hand side), and p ≤
      ``dense_max_params``. The iterates are those of the HVP route up to round-off.

    Args:
        depth: recursion steps per repeat (the paper's T); ``None``: until rtol (see above).
        repeats: independent recursions averaged (the paper's r); the deterministic recursion runs once.
        batch_size: examples per mini-batch Hessian, drawn with replacement; at least the training-set size
            means the full Hessian at every step (a deterministic recursion); ``None``: chosen (see above).
        scale: s, the step being 1/s; ``None`` estimates it (``scale_margin`` above the largest eigenvalue).
        scale_margin: factor above the estimated largest eigenvalue for the automatic scale.
        momentum: β of a heavy-ball term β(x_j − x_{j−1}); ``None``: automatic (see above); 0: the plain recursion.
        eigen_steps: Lanczos steps (full-data HVPs) for the automatic scale and the curvature check.
        rtol: relative residual under which the estimate counts as converged (and, with ``depth=None``, stops).
        seed: seed of the mini-batch sampling and of the eigenvalue estimates.
        warn: warn when the final relative residual exceeds ``rtol``.
        products: ``"hvp"`` (Hessian-vector products every step), ``"dense"`` (an explicit H + δI, deterministic
            recursion only), or ``"auto"`` (see above).
        dense_max_params: the most parameters for which ``"auto"`` builds the explicit H (p² values).
    """

    name = "lissa"
    capabilities = Capabilities(sharded=True, stochastic=True)
    _state_fields = ("lambda_min_", "lambda_max_", "scale_", "batch_size_", "momentum_", "step_", "why_")
    _dense: torch.Tensor | None = None  # the explicit H + δI of products="dense", built at the first solve that uses it
    _route = "hvp"  # how the current solve multiplies: "hvp" or "dense"
    dense_method_ = ""  # how the operator built the explicit H (closed form or HVPs)

    def __init__(
        self,
        *,
        depth: int | None = None,
        repeats: int = 1,
        batch_size: int | None = None,
        scale: float | None = None,
        scale_margin: float = 1.2,
        momentum: float | None = None,
        eigen_steps: int = 20,
        rtol: float = 0.05,
        seed: int = 0,
        warn: bool = True,
        products: str = "auto",
        dense_max_params: int = 12_000,
    ) -> None:
        super().__init__()
        self.products = check_choice("products", products, ("auto", "hvp", "dense"))
        self.dense_max_params = check_int("dense_max_params", dense_max_params, low=1)
        self.depth = None if depth is None else check_int("depth", depth, low=1)
        self.repeats = check_int("repeats", repeats, low=1)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, low=1)
        self.scale = None if scale is None else check_number("scale", scale, low=0.0, low_inclusive=False)
        self.scale_margin = check_number("scale_margin", scale_margin, low=1.0)
        self.momentum = (
            None if momentum is None else check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        )
        self.eigen_steps = check_int("eigen_steps", eigen_steps, low=2)
        self.rtol = check_number("rtol", rtol, low=0.0, low_inclusive=False)
        self.seed = check_int("seed", seed, low=0)
        self.warn = bool(warn)

    def cost(self, probe: CostProbe) -> SolverCost:
        """Fit eigen_steps·n·τ_h (+ 90·batch·τ_h for mini-batch scales); a solve (repeats·depth·batch + n)·q·τ_H, with
        100 full-data steps assumed where depth and batch are chosen after the fit."""
        n, q, p, item = probe.n, probe.queries, probe.p, probe.item
        b = n if self.batch_size is None else min(self.batch_size, n)
        depth = 100 if self.depth is None else self.depth
        repeats = 1 if b >= n else self.repeats
        return SolverCost(
            fit_seconds=self.eigen_steps * probe.hvp_seconds(1) + (90 * b * probe.tau_hvp if b < n else 0.0),
            fit_memory=probe.base + 3 * p * item,
            fit_formula="eigen_steps·n·τ_h + 90·batch·τ_h (mini-batches)",
            state=0,
            solve_seconds=(repeats * depth * b / n + 1) * probe.hvp_seconds(q),
            # an explicit H + δI where products="auto" may build one (an upper bound: the HVP route needs none)
            solve_memory=5 * q * p * item
            + (p * p * item if self.products != "hvp" and p <= self.dense_max_params else 0),
            solve_formula="(repeats·depth·batch + n)·q·τ_H"
            + (" (depth 100 assumed: chosen by rtol)" if self.depth is None else ""),
        )

    def _fit(self, operator: CurvatureOperator) -> None:
        n = operator.n_examples
        lo, hi = lanczos_extremes(
            operator.matvec,
            operator.n_params,
            steps=self.eigen_steps,
            dtype=operator.dtype,
            device=operator.device,
            seed=self.seed,
        )
        self.lambda_min_, self.lambda_max_ = lo, hi
        if lo <= 0:
            warnings.warn(
                f"H + δI has negative curvature (Lanczos estimate of its smallest eigenvalue: {lo:.3g}); LiSSA "
                "diverges "
                f"on it. Use {setting_hint('damping', abs(lo) + operator.damping, scope='influence')} or more "
                "(non-convex models need damping).",
                CurvatureWarning,
                stacklevel=4,
            )
        kappa = hi / lo if lo > 0 else math.inf
        if self.batch_size is not None:
            self.batch_size_ = min(self.batch_size, n)
            self.why_ = f"batch_size={self.batch_size} set"
        elif n <= 2 * math.sqrt(kappa) * STOCHASTIC_BATCH:
            self.batch_size_ = n
            self.why_ = (
                f"deterministic: n={n} ≤ 2·√κ·{STOCHASTIC_BATCH} = {2 * math.sqrt(kappa) * STOCHASTIC_BATCH:.0f} "
                f"(κ ≈ {kappa:.3g}): full-data steps with momentum need fewer example-products"
            )
        else:
            self.batch_size_ = STOCHASTIC_BATCH
            self.why_ = f"mini-batches of {STOCHASTIC_BATCH}: n={n} > 2·√κ·{STOCHASTIC_BATCH} (κ ≈ {kappa:.3g})"
        deterministic = self.batch_size_ >= n
        if self.products == "dense" and not deterministic:
            raise InputError(
                f"LiSSA's products='dense' multiplies by the full-data H + δI, but the recursion uses mini-batches "
                f"({self.why_}); set batch_size=None or batch_size >= {n}, or products='auto'."
            )
        if self.products == "dense" and "dense" not in operator.capabilities:
            raise UnsupportedError("LiSSA's products='dense': this curvature operator has no explicit Hessian.")
        self._dense = None
        self.scale_ = self.scale if self.scale is not None else self.scale_margin * self._top_eigenvalue(operator, hi)
        if self.momentum is not None:
            self.momentum_, self.step_ = self.momentum, 1.0 / self.scale_
        elif deterministic and self.scale is None and lo > 0:
            a, b = math.sqrt(lo), math.sqrt(self.scale_)
            self.momentum_, self.step_ = ((b - a) / (b + a)) ** 2, 4.0 / (a + b) ** 2
        else:
            self.momentum_, self.step_ = 0.0, 1.0 / self.scale_

    def _top_eigenvalue(self, operator: CurvatureOperator, full: float) -> float:
        """The full Hessian's top eigenvalue, or with mini-batches the largest over it and three mini-batch Hessians."""
        n = operator.n_examples
        if self.batch_size_ >= n:
            return full
        gen = torch.Generator().manual_seed(self.seed)
        top = full
        for probe in range(3):
            idx = torch.randint(n, (self.batch_size_,), generator=gen)
            top = max(
                top,
                abs(
                    power_iteration(
                        lambda V, idx=idx: operator.minibatch_matvec(V, idx),
                        operator.n_params,
                        iters=30,
                        rtol=1e-3,
                        dtype=operator.dtype,
                        device=operator.device,
                        seed=self.seed + 1 + probe,
                    )
                ),
            )
        return top

    def rate(self) -> float:
        """The predicted factor per step by which the error shrinks: (√κ − 1)/(√κ + 1) with the heavy-ball step,
        1 − α·λ_min for the plain one (κ over the interval [λ_min, scale])."""
        if self.momentum_ > 0:
            return math.sqrt(self.momentum_)
        return 1.0 - max(self.lambda_min_, 0.0) * self.step_

    def _depth_cap(self) -> int:
        if self.depth is not None:
            return self.depth
        rate = self.rate()
        predicted = math.log(self.rtol) / math.log(rate) if 0.0 < rate < 1.0 else 1000.0
        return max(100, math.ceil(3 * predicted))

    def _products_for(self, q: int) -> tuple[str, str]:
        """How the deterministic recursion multiplies ``q`` right-hand sides: ``("dense" | "hvp", why)``, by the cost
        model of the class docstring."""
        op = self.operator_
        p, n = op.n_params, op.n_examples
        if self.products != "auto":
            return self.products, f"products={self.products!r} set"
        if "dense" not in op.capabilities:
            return "hvp", "the curvature operator has no explicit Hessian"
        if p > self.dense_max_params:
            return "hvp", f"p={p:,} > dense_max_params={self.dense_max_params:,}"
        rate = self.rate()
        steps = self.depth or min(
            self._depth_cap(), math.ceil(math.log(self.rtol) / math.log(rate)) if 0.0 < rate < 1.0 else 10**9
        )
        per_step = p / (HVP_FLOPS_PER_EXAMPLE_PARAM / 2 * n)  # a dense product's cost in one-vector HVPs
        dense, hvps = p + steps * q * per_step, steps * q
        why = (
            f"{steps} predicted step(s) × {q} right-hand sides: explicit H + δI ≈ {dense:,.0f} HVP-equivalents "
            f"(p={p:,} to build it, {per_step:.3g} per product), HVPs {hvps:,}"
        )
        return ("dense" if dense < hvps else "hvp"), why

    def _dense_matrix(self) -> torch.Tensor:
        if self._dense is None:
            op = self.operator_
            self._dense = op.damp_matrix(op.dense())
            self.dense_method_ = getattr(op, "dense_method", "")
        return self._dense

    def _product(self, X: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        op = self.operator_
        if self._route == "dense":
            return X @ self._dense_matrix().to(X.dtype)  # H + δI is symmetric
        if self.batch_size_ >= op.n_examples:
            return op.matvec(X)
        return op.minibatch_matvec(X, torch.randint(op.n_examples, (self.batch_size_,), generator=gen))

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        op = self.operator_
        n = op.n_examples
        deterministic = self.batch_size_ >= n
        repeats = 1 if deterministic else self.repeats
        gen = torch.Generator().manual_seed(self.seed)
        cap = self._depth_cap()
        self._route, route_why = (
            self._products_for(V.shape[0]) if deterministic else ("hvp", "mini-batch Hessians: a new one every step")
        )
        built = self._dense is not None
        total = torch.zeros_like(V)
        steps = full = 0
        history: list[tuple[int, float]] = []
        bar = progress_bar(total=repeats * cap, desc="LiSSA recursion", enabled=bool(getattr(op, "progress", False)))
        try:
            for rep in range(repeats):
                X, history, ran, products = self._recursion(V, gen, cap, rep, bar)
                total += X
                steps, full = steps + ran, full + products
        finally:
            bar.close()
        X = total / repeats
        if deterministic and history and history[-1][0] == steps:  # the last residual read is that of X
            worst = history[-1][1]
        else:
            if self._route == "dense":
                rel = (self._product(X, gen) - V).norm(dim=1) / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
            else:
                rel = relative_residuals(op, X, V)
                full += 1
            worst = float(rel.max()) if len(rel) else 0.0
            history.append((steps // repeats, worst))
        s = self.scale_
        if not worst <= 2.0:  # far worse than the estimate 0: never returned
            raise SolverDivergenceError(self._divergence_message(steps // repeats, repeats, s, history))
        converged = worst <= self.rtol
        rate = self.rate()
        fitted = _fitted_rate(history)
        measured = None if fitted is None else fitted[0]
        bound = rate ** (steps // repeats) if not deterministic and rate < 1.0 else None
        trend = "converged" if converged else _trend(history, fitted, noise_bound=bound)
        if not converged and self.warn:
            warnings.warn(
                self._unconverged_message(worst, steps // repeats, measured, trend, self.batch_size_, n),
                ConvergenceWarning,
                stacklevel=4,
            )
        minibatch = 0.0 if deterministic else steps * self.batch_size_ / n
        if self._route == "dense":  # no HVP per step; building H from HVPs took p of them (none in closed form)
            closed = "closed form" in self.dense_method_
            hvps = 0.0 if built or closed else float(op.n_params)
        else:
            hvps = float(V.shape[0] * (minibatch + full))
        return X, {
            "iterations": steps,
            "relative_residual": worst,
            "converged": converged,
            "hvps": hvps,
            "details": {
                "products": self._route,
                "products_why": route_why,
                **({"dense_method": self.dense_method_} if self._route == "dense" else {}),
                "scale": s,
                "lambda_max": self.lambda_max_,
                "lambda_min": self.lambda_min_,
                "rate": rate,
                "step": self.step_,
                "momentum": self.momentum_,
                "batch_size": self.batch_size_,
                "why": self.why_,
                "measured_rate": measured,
                "trend": trend,
                "residual_history": history,
            },
        }

    def _recursion(
        self, V: torch.Tensor, gen: torch.Generator, cap: int, rep: int, bar: Any
    ) -> tuple[torch.Tensor, list[tuple[int, float]], int, int]:
        """One repeat: x ← x + α(v − A_B x) + β(x − x_prev) from x = 0, for ``cap`` steps or, with ``depth=None``, until
        a residual check reads rtol. Returns x, the residual history, the steps run and the full-data products it spent
        (each deterministic step's, the mini-batch runs' checks). The deterministic recursion's residual comes with each
        step's product; mini-batch runs check every
        max(10, 10·n/batch) steps (about a tenth of the recursion's cost)."""
        op = self.operator_
        n = op.n_examples
        deterministic = self.batch_size_ >= n
        alpha, beta = self.step_, self.momentum_
        vnorm = V.norm(dim=1)
        safe = vnorm.clamp_min(torch.finfo(V.dtype).tiny)
        every = (
            10 if deterministic else max(10, math.ceil(10 * n / self.batch_size_))
        )  # steps between recorded residuals
        # a contracting plain recursion keeps ‖x_j‖ ≤ (j + 1)·α·‖v‖; momentum's transient may exceed it by ~√κ
        slack = 2.0 if beta == 0 else 2.0 * (1.0 + 1.0 / max(1.0 - math.sqrt(beta), 1e-12))
        history = [(0, 1.0)]  # the estimate 0 has relative residual 1
        X, previous = torch.zeros_like(V), None
        products = 0
        for step in range(cap):
            if step == 0:
                R = V
            else:
                R = V - self._product(X, gen)
                if deterministic:  # the residual of x_step comes with its product: the stop reads it every step
                    products += 1
                    residual = float((R.norm(dim=1) / safe).max())
                    if self.depth is None and residual <= self.rtol:
                        history.append((step, residual))
                        return X, history, step, products
                    if step % every == 0:
                        history.append((step, residual))
                        self._check_divergence(history, slack, beta, step, rep)
            new = X + alpha * R if previous is None or beta == 0 else X + alpha * R + beta * (X - previous)
            previous, X = X, new
            bar.update(1)
            xn = X.norm(dim=1)
            if not bool(torch.isfinite(xn).all()) or bool((xn > slack * (step + 2) * alpha * vnorm).any()):
                raise SolverDivergenceError(self._divergence_message(step + 1, rep + 1, self.scale_, history))
            if not deterministic and (step + 1) % every == 0 and step + 1 < cap:
                history.append((step + 1, float(relative_residuals(op, X, V).max())))
                products += 1
                bar.set_postfix(residual=f"{history[-1][1]:.3g}")
                if self.depth is None and history[-1][1] <= self.rtol:
                    return X, history, step + 1, products
                self._check_divergence(history, slack, beta, step + 1, rep)
        return X, history, cap, products

    def _check_divergence(
        self, history: list[tuple[int, float]], limit: float, beta: float, step: int, rep: int
    ) -> None:
        if _diverging(history, limit, streak=beta == 0):
            raise SolverDivergenceError(self._divergence_message(step, rep + 1, self.scale_, history))

    def _unconverged_message(self, worst: float, depth: int, measured: float | None, trend: str, b: int, n: int) -> str:
        shown = "not measured (depth below one check)" if measured is None else f"{measured:.6f} per step"
        rate = self.rate()
        predicts = "the heavy-ball step predicts" if self.momentum_ > 0 else "1 − λ_min/scale predicts"
        head = (
            f"LiSSA did not converge: relative residual {worst:.3g} after depth={depth} (rtol={self.rtol:g}); "
            f"the residual is {trend}, measured factor {shown} ({predicts} {rate:.6f}, "
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
        needed = math.ceil(depth + math.log(self.rtol / worst) / math.log(speed)) if 0.0 < speed < 1.0 else None
        return head + (
            f"Raise {setting_hint('depth', needed)}{' (reaches rtol at the measured factor)' if needed else ''}, or "
            "raise "
            f"{setting_hint('damping', scope='influence')} to improve the conditioning."
        )

    def _divergence_message(self, steps: int, repeat: int, s: float, history: list[tuple[int, float]]) -> str:
        fitted = _fitted_rate(history)
        measured = None if fitted is None else fitted[0]
        if len(history) > 1:
            shown = ", ".join(f"{r:.3g} at step {j}" for j, r in history[-3:])
            why = (
                "its relative residual went "
                f"{shown}{f' (factor {measured:.4f} per step)' if measured is not None else ''}"
            )
        else:
            why = "‖x_j‖ exceeded 2·j·‖v‖/scale, which a contracting recursion never reaches"
        head = f"LiSSA diverged after {steps} step(s) of repeat {repeat}: {why}; no estimate is returned. "
        if self.lambda_min_ < 0:
            return head + (
                f"H + δI has negative curvature (smallest eigenvalue ≈ {self.lambda_min_:.3g}): use "
                f"{setting_hint('damping', self.operator_.damping + 2 * abs(self.lambda_min_), scope='influence')} or "
                "more."
            )
        suggested = max(2.0 * s, 1.5 * self.lambda_max_)
        return head + (
            f"`scale`={s:.4g} is below the largest eigenvalue of a mini-batch Hessian plus damping (full Hessian: "
            f"≈ {self.lambda_max_:.3g}). Use {setting_hint('scale', suggested)} or leave scale unset (automatic), or "
            f"raise {setting_hint('batch_size', min(self.operator_.n_examples, 4 * self.batch_size_))}."
        )

    def describe(self) -> dict[str, Any]:
        return {
            "solver": self.name,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "scale": self.scale,
            "scale_margin": self.scale_margin,
            "momentum": self.momentum,
            "seed": self.seed,
            "products": self.products,
            "dense_max_params": self.dense_max_params,
        }
