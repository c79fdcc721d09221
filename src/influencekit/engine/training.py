"""Trainers of the training objective: full-batch L-BFGS to a tight tolerance, or a fixed budget of optimiser steps.

Influence functions assume θ̂ minimises R(θ) = Σ_i w_i L(z_i, θ) / Σ_i w_i (uniform weights by default).
This trainer gets a convex model there (logistic or ridge regression, a linear top layer) and is what
leave-one-out retraining uses: a zero weight removes an example, warm-started from the current θ̂.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..core.autodiff import ParamLayout, batch_grad_sum
from ..core.checks import check_int, check_number
from ..core.errors import ConvergenceWarning, CurvatureWarning, InputError, NumericalError
from ..core.task import Task
from ..data.examples import DataSource, Examples, stream, take
from ..solvers.base import Solver
from ..solvers.cg import CGSolver
from ..solvers.exact import ExactSolver
from .hessian import HessianOperator

__all__ = ["fit_lbfgs", "fit_steps", "objective_and_grad", "TrainReport"]


@dataclass(frozen=True)
class TrainReport:
    """How :func:`fit_lbfgs` ended: the final ‖∇R‖, the objective, the L-BFGS iterations, and whether ‖∇R‖ ≤ tol."""

    grad_norm: float
    objective: float
    iterations: int
    converged: bool


def objective_and_grad(
    task: Task,
    params: dict[str, torch.Tensor],
    data: Examples,
    layout: ParamLayout,
    weights: torch.Tensor | None,
    batch_size: int,
) -> tuple[float, torch.Tensor]:
    """R_w(θ) = Σᵢ wᵢ L(zᵢ, θ) / Σᵢ wᵢ + (l2/2)‖θ‖² and its flat gradient at ``params``, streamed over ``data``.

    ``weights=None`` means uniform weights; the data are read in chunks of ``batch_size`` examples.
    """
    total_w = float(weights.sum()) if weights is not None else float(len(data))
    grad = torch.zeros(layout.n, dtype=layout.dtype, device=layout.device)
    value = 0.0
    for lo, batch in stream(data, batch_size, dtype=layout.dtype, device=layout.device, check=task.check_batch):
        w = None if weights is None else weights[lo : lo + batch_size].to(layout.device, layout.dtype)
        g, losses = batch_grad_sum(task.loss, params, batch, layout, w)
        grad += g
        value += float(losses.sum() if w is None else (w * losses).sum())
    theta = layout.flatten(params)
    value = value / total_w + 0.5 * task.l2 * float((theta * theta).sum())
    return value, grad / total_w + task.l2 * theta


def _start_point(task: Task) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.Tensor], ParamLayout]:
    """The model's parameters by name, copies of the selected ones (the start point) and their layout."""
    named = dict(task.model.named_parameters())
    params = {n: named[n].detach().clone() for n in task.param_names}
    return named, params, ParamLayout.of(params)


def _checked_weights(weights: Any, n: int) -> torch.Tensor:
    """``weights`` as a tensor, refused unless finite, non-negative, of shape ``(n,)`` and with a positive sum."""
    weights = torch.as_tensor(weights)
    if (
        weights.shape != (n,)
        or not bool(torch.isfinite(weights).all())
        or bool((weights < 0).any())
        or float(weights.sum()) <= 0
    ):
        raise InputError(
            f"`weights` must be a finite, non-negative tensor of shape ({n},) with a positive sum. Got shape "
            f"{tuple(weights.shape)}."
        )
    return weights


def _write_back(named: dict[str, torch.nn.Parameter], layout: ParamLayout, theta: torch.Tensor) -> None:
    """Copy the flat ``theta`` into the model's selected parameters, in place."""
    with torch.no_grad():
        for name, value in layout.unflatten(theta.detach()).items():
            named[name].copy_(value)


def fit_lbfgs(
    task: Task,
    train: DataSource,
    *,
    weights: torch.Tensor | None = None,
    tol: float = 1e-9,
    max_iter: int = 2000,
    batch_size: int = 4096,
    warn: bool = True,
    curvature: Solver | None = None,
    newton_start: bool = False,
) -> TrainReport:
    """Minimise the training objective over the task's selected parameters in place, warm-started from them.

    Args:
        task: the task; its selected parameters are overwritten with the minimiser.
        train: the training data (any form :class:`~influencekit.data.Examples` accepts).
        weights: per-example weights ``(n,)`` ≥ 0 (0 removes an example); ``None`` means uniform.
        tol: stop when ‖∇R(θ)‖ ≤ tol.
        max_iter: most L-BFGS iterations in all.
        batch_size: examples per gradient chunk (the result does not depend on it).
        warn: warn with a ConvergenceWarning when tol was not reached.
        curvature: a fitted solver of a Hessian close to the one at the minimum — for leave-one-out
            retraining, the influence's own solver at θ̂. Training then starts with chord-Newton steps
            θ ← θ − S⁻¹∇R(θ), which from a nearby warm start converge linearly at a rate of about
            ‖I − S⁻¹H‖ (O(1/n) for one removed example) for the price of one gradient and one solve each;
            when they stop shrinking ‖∇R‖ fast, L-BFGS and Newton take over.
        newton_start: before L-BFGS (and after the chord steps, when they stop contracting fast), take at most 10
            Newton steps on the objective's own Hessian at the current point (dense for up to 3,000 parameters, CG
            beyond), each kept only while it shrinks ‖∇R‖: for a convex model warm-started after a large change of the
            weights (a whole group removed) they converge quadratically where chord steps on the old Hessian crawl and
            L-BFGS needs hundreds of iterations.
    """
    tol = check_number("tol", tol, low=0.0)
    max_iter = check_int("max_iter", max_iter, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    data = Examples(train, name="train")
    named, params, layout = _start_point(task)
    if weights is not None:
        weights = _checked_weights(weights, len(data))

    theta = layout.flatten(params).clone().requires_grad_(True)
    objective = _Objective(task, data, layout, weights, batch_size, theta)
    iterations = 0
    if curvature is not None:
        iterations = _chord_newton_steps(objective, curvature, tol=tol, max_iter=max_iter)
    if newton_start:  # after chord steps that stopped contracting fast (or none): Newton steps before L-BFGS
        if curvature is None:
            objective.closure()
        iterations += _newton_polish(objective, tol=tol, max_iter=max_iter, iterations=iterations)
    iterations = _lbfgs_restarts(objective, tol=tol, max_iter=max_iter, iterations=iterations)
    iterations += _newton_polish(objective, tol=tol, max_iter=max_iter, iterations=iterations)
    _write_back(named, layout, theta)
    report = TrainReport(objective.grad_norm, objective.value, int(iterations), objective.grad_norm <= tol)
    if warn and not report.converged:
        warnings.warn(
            f"L-BFGS stopped with ||grad R|| = {report.grad_norm:.3g} > tol={tol:g} after {report.iterations} "
            "iterations; "
            "raise `max_iter`, compute in float64, or raise `tol`.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return report


class _Objective:
    """The training objective R_w at a flat θ (``theta``) that the steps of :func:`fit_lbfgs` move in place.

    :meth:`closure` evaluates R_w(θ) and ∇R_w(θ), leaves the gradient in ``theta.grad`` (where
    ``torch.optim.LBFGS`` reads it) and keeps the last ``value``, ``grad_norm`` and the count of ``evals``.
    """

    def __init__(
        self,
        task: Task,
        data: Examples,
        layout: ParamLayout,
        weights: torch.Tensor | None,
        batch_size: int,
        theta: torch.Tensor,
    ) -> None:
        self.task = task
        self.data = data
        self.layout = layout
        self.weights = weights
        self.batch_size = batch_size
        self.theta = theta
        self.value = float("nan")
        self.grad_norm = float("inf")
        self.evals = 0

    def closure(self) -> torch.Tensor:
        current = self.layout.unflatten(self.theta.detach())
        value, grad = objective_and_grad(self.task, current, self.data, self.layout, self.weights, self.batch_size)
        if not bool(torch.isfinite(grad).all()) or not math.isfinite(value):
            raise NumericalError(
                "the training objective or its gradient is not finite during L-BFGS; check the data and the model."
            )
        self.theta.grad = grad
        self.value, self.grad_norm, self.evals = value, float(grad.norm()), self.evals + 1
        return torch.tensor(value, dtype=self.layout.dtype)

    def restore(self, saved: torch.Tensor) -> None:
        """Undo a step: put ``saved`` back into θ and evaluate there again."""
        with torch.no_grad():
            self.theta.copy_(saved)
        self.closure()


def _chord_newton_steps(objective: _Objective, curvature: Solver, *, tol: float, max_iter: int) -> int:
    """Chord-Newton steps θ ← θ − S⁻¹∇R(θ) on the fitted solver S while they halve ‖∇R‖; return how many were taken."""
    theta = objective.theta
    iterations = 0
    objective.closure()
    while objective.grad_norm > tol and iterations < max_iter:
        before, saved = objective.grad_norm, theta.detach().clone()
        step, _ = curvature.solve(-theta.grad.unsqueeze(0))
        with torch.no_grad():
            theta += step[0].to(theta.dtype)
        iterations += 1
        objective.closure()
        if not objective.grad_norm < before:  # the step made things worse: undo it, let L-BFGS work
            objective.restore(saved)
            break
        if objective.grad_norm > 0.5 * before:  # too slow a contraction for chord steps
            break
    return iterations


def _lbfgs_restarts(objective: _Objective, *, tol: float, max_iter: int, iterations: int) -> int:
    """L-BFGS until ‖∇R‖ ≤ tol or the budget ``max_iter`` is spent; return the iteration count, ``iterations``
    included."""
    theta = objective.theta
    for _ in range(
        20 if objective.grad_norm > tol else 0
    ):  # L-BFGS stops early when its line search stalls; restart from where it stopped
        if iterations >= max_iter:
            break
        optimizer = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=max_iter - iterations,
            tolerance_grad=tol / 10,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )
        before = objective.grad_norm
        optimizer.step(objective.closure)
        iterations += int(optimizer.state[theta].get("n_iter", 0))
        objective.closure()
        if objective.grad_norm <= tol or iterations >= max_iter or objective.grad_norm > 0.5 * before:
            break
    return iterations


def _newton_polish(objective: _Objective, *, tol: float, max_iter: int, iterations: int) -> int:
    """At most 10 Newton steps H d = −∇R within the budget left after ``iterations``; return how many were taken.

    Near the minimum the objective's round-off hides further decrease from any line search, while the
    gradient is still accurate: finish with Newton steps H d = −∇R (dense for small models, CG otherwise),
    which need no function values and converge quadratically. A step that does not shrink ‖∇R‖ (a
    non-convex model far from a minimum) is undone and ends the polish.
    """
    theta, layout = objective.theta, objective.layout
    newton = 0
    while objective.grad_norm > tol and newton < 10 and iterations + newton < max_iter:
        saved, saved_norm = theta.detach().clone(), objective.grad_norm
        current = layout.unflatten(theta.detach())
        operator = HessianOperator(
            objective.task,
            current,
            objective.data,
            damping=0.0,
            batch_size=objective.batch_size,
            tangent_block=min(layout.n, 1024),
            weights=objective.weights,
        )
        # small models: one dense Hessian beats hundreds of single-vector CG products
        solver = (
            ExactSolver() if layout.n <= 3000 else CGSolver(rtol=1e-12, max_iter=max(100, 2 * layout.n), warn=False)
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CurvatureWarning)
                step, _ = solver.fit(operator).solve(-theta.grad)
        except NumericalError:  # a singular or indefinite Hessian: no Newton step to take
            break
        with torch.no_grad():
            theta += step
        newton += 1
        objective.closure()
        if not objective.grad_norm < saved_norm:
            objective.restore(saved)
            break
    return newton


_OPTIMIZERS = ("adam", "sgd")


def fit_steps(
    task: Task,
    train: DataSource,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    momentum: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> TrainReport:
    """Run a fixed number of optimiser steps on the training objective, in place, from the current parameters.

    The trainer for models whose minimum is not found to a tolerance (non-convex networks): it is what
    leave-one-out validation runs from θ̂ on a model trained with Adam (Koh & Liang 2017 retrained their CNN
    with 30,000 Adam steps), once per removed point and once without removal as a control. Each step
    minimises R_w(θ) = Σ wᵢ L(zᵢ, θ) / Σ wᵢ over the task's selected parameters (L2 term included):

    - ``batch_size=None``: full-batch steps, the gradient summed over the data in chunks of ``chunk_size``
      (deterministic, so a removal run and its control differ only by the removal);
    - otherwise mini-batches of ``batch_size`` drawn with replacement by a generator seeded with ``seed``:
      the same draws for every ``weights``, so the control run sees the same batches (common random
      numbers). A mini-batch gradient is Σ_b w_b ∇L_b / (B·Σw/n), unbiased for ∇R_w.

    Args:
        task: the task; its selected parameters are overwritten.
        train: the training data (any form :class:`~influencekit.data.Examples` accepts).
        steps: how many optimiser steps (≥ 1).
        lr: the learning rate (> 0).
        optimizer: ``"adam"`` (torch.optim.Adam, default betas) or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum in [0, 1).
        batch_size: examples per step, or ``None`` for full-batch steps.
        seed: seed of the mini-batch draws.
        weights: per-example weights ``(n,)`` ≥ 0 (0 removes an example); ``None`` means uniform.
        chunk_size: examples per gradient chunk of a full-batch step (the result does not depend on it).

    Returns:
        :class:`TrainReport` with the full-batch ‖∇R_w‖ and R_w at the end, ``iterations=steps`` and
        ``converged=True`` (a fixed budget has nothing to miss; the gradient norm says how far it got).
    """
    steps = check_int("steps", steps, low=1)
    lr = check_number("lr", lr, low=0.0, low_inclusive=False)
    momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    chunk_size = check_int("chunk_size", chunk_size, low=1)
    seed = check_int("seed", seed, low=0)
    if optimizer not in _OPTIMIZERS:
        raise InputError(f"`optimizer` must be one of {', '.join(map(repr, _OPTIMIZERS))}. Got {optimizer!r}.")
    data = Examples(train, name="train")
    n = len(data)
    if n == 0:
        raise InputError("`train` is empty: there is nothing to train on.")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, low=1)
    named, params, layout = _start_point(task)
    if weights is None:
        weights = torch.ones(n, dtype=layout.dtype)
    weights = _checked_weights(weights, n).to(layout.device, layout.dtype)
    theta = layout.flatten(params).clone().requires_grad_(True)
    _optimiser_steps(
        task,
        data,
        layout,
        weights,
        theta,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        batch_size=batch_size,
        seed=seed,
        chunk_size=chunk_size,
    )
    value, grad = objective_and_grad(task, layout.unflatten(theta.detach()), data, layout, weights, chunk_size)
    _write_back(named, layout, theta)
    return TrainReport(float(grad.norm()), value, steps, True)


def _optimiser_steps(
    task: Task,
    data: Examples,
    layout: ParamLayout,
    weights: torch.Tensor,
    theta: torch.Tensor,
    *,
    steps: int,
    lr: float,
    optimizer: str,
    momentum: float,
    batch_size: int | None,
    seed: int,
    chunk_size: int,
) -> None:
    """The ``steps`` optimiser steps of :func:`fit_steps` on the flat ``theta``, in place (arguments checked there)."""
    n = len(data)
    total_w = float(weights.sum())
    opt = (
        torch.optim.Adam([theta], lr=lr) if optimizer == "adam" else torch.optim.SGD([theta], lr=lr, momentum=momentum)
    )
    generator = torch.Generator().manual_seed(seed)

    for _ in range(steps):
        current = layout.unflatten(theta.detach())
        if batch_size is None:
            _, grad = objective_and_grad(task, current, data, layout, weights, chunk_size)
        else:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
            batch = take(data, idx, dtype=layout.dtype, device=layout.device, check=task.check_batch)
            g, _ = batch_grad_sum(task.loss, current, batch, layout, weights[idx.to(weights.device)])
            grad = g * (n / (batch_size * total_w)) + task.l2 * theta.detach()
        if not bool(torch.isfinite(grad).all()):
            raise NumericalError(
                f"the training gradient became NaN/inf during {optimizer} steps; lower `lr` (got {lr:g}) or check the "
                "data."
            )
        theta.grad = grad
        opt.step()
        if not bool(torch.isfinite(theta).all()):
            raise NumericalError(
                f"the parameters became NaN/inf during {optimizer} steps; lower `lr` (got {lr:g}) or check the data."
            )
