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

from .autodiff import ParamLayout, batch_grad_sum
from .checks import check_int, check_number
from .data.examples import Examples, stream, take
from .errors import ConvergenceWarning, CurvatureWarning, InputError, NumericalError
from .hessian import HessianOperator
from .solvers.base import Solver
from .solvers.cg import CGSolver
from .solvers.exact import ExactSolver
from .task import Task

__all__ = ["fit_lbfgs", "fit_steps", "TrainReport"]


@dataclass(frozen=True)
class TrainReport:
    """How :func:`fit_lbfgs` ended: the final ‖∇R‖, the objective, the L-BFGS iterations, and whether ‖∇R‖ ≤ tol."""

    grad_norm: float
    objective: float
    iterations: int
    converged: bool


def _objective_and_grad(
    task: Task, params: dict[str, torch.Tensor], data: Examples, layout: ParamLayout, weights: torch.Tensor | None, batch_size: int
) -> tuple[float, torch.Tensor]:
    total_w = float(weights.sum()) if weights is not None else float(len(data))
    grad = torch.zeros(layout.n, dtype=layout.dtype, device=layout.device)
    value = 0.0
    for lo, batch in stream(data, batch_size, dtype=layout.dtype, device=layout.device, check=task.check_batch):
        w = None if weights is None else weights[lo:lo + batch_size].to(layout.device, layout.dtype)
        g, losses = batch_grad_sum(task.loss, params, batch, layout, w)
        grad += g
        value += float(losses.sum() if w is None else (w * losses).sum())
    theta = layout.flatten(params)
    value = value / total_w + 0.5 * task.l2 * float((theta * theta).sum())
    return value, grad / total_w + task.l2 * theta


def fit_lbfgs(
    task: Task,
    train: Any,
    *,
    weights: torch.Tensor | None = None,
    tol: float = 1e-9,
    max_iter: int = 2000,
    batch_size: int = 4096,
    warn: bool = True,
    curvature: Solver | None = None,
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
    """
    tol = check_number("tol", tol, low=0.0)
    max_iter = check_int("max_iter", max_iter, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    data = Examples(train, name="train")
    named = dict(task.model.named_parameters())
    params = {n: named[n].detach().clone() for n in task.param_names}
    layout = ParamLayout.of(params)
    if weights is not None:
        weights = torch.as_tensor(weights)
        if weights.shape != (len(data),) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise InputError(
                f"`weights` must be a finite, non-negative tensor of shape ({len(data)},) with a positive sum. "
                f"Got shape {tuple(weights.shape)}."
            )

    theta = layout.flatten(params).clone().requires_grad_(True)
    state = {"value": float("nan"), "grad_norm": float("inf"), "evals": 0}

    def closure() -> torch.Tensor:
        current = layout.unflatten(theta.detach())
        value, grad = _objective_and_grad(task, current, data, layout, weights, batch_size)
        if not bool(torch.isfinite(grad).all()) or not math.isfinite(value):
            raise NumericalError("the training objective or its gradient is not finite during L-BFGS; check the data and the model.")
        theta.grad = grad
        state.update(value=value, grad_norm=float(grad.norm()), evals=state["evals"] + 1)
        return torch.tensor(value, dtype=layout.dtype)

    iterations = 0
    if curvature is not None:
        closure()
        while state["grad_norm"] > tol and iterations < max_iter:
            before, saved = state["grad_norm"], theta.detach().clone()
            step, _ = curvature.solve(-theta.grad.unsqueeze(0))
            with torch.no_grad():
                theta += step[0].to(theta.dtype)
            iterations += 1
            closure()
            if not state["grad_norm"] < before:  # the step made things worse: undo it, let L-BFGS work
                with torch.no_grad():
                    theta.copy_(saved)
                closure()
                break
            if state["grad_norm"] > 0.5 * before:  # too slow a contraction for chord steps
                break
    for _ in range(20 if state["grad_norm"] > tol else 0):  # L-BFGS stops early when its line search stalls; restart from where it stopped
        if iterations >= max_iter:
            break
        optimizer = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=max_iter - iterations, tolerance_grad=tol / 10, tolerance_change=0.0,
            history_size=50, line_search_fn="strong_wolfe",
        )
        before = state["grad_norm"]
        optimizer.step(closure)
        iterations += int(optimizer.state[theta].get("n_iter", 0))
        closure()
        if state["grad_norm"] <= tol or iterations >= max_iter or state["grad_norm"] > 0.5 * before:
            break
    # Near the minimum the objective's round-off hides further decrease from any line search, while the
    # gradient is still accurate: finish with Newton steps H d = −∇R (dense for small models, CG otherwise),
    # which need no function values and converge quadratically. A step that does not shrink ‖∇R‖ (a
    # non-convex model far from a minimum) is undone and ends the polish.
    newton = 0
    while state["grad_norm"] > tol and newton < 10 and iterations + newton < max_iter:
        saved, saved_norm = theta.detach().clone(), state["grad_norm"]
        current = layout.unflatten(theta.detach())
        operator = HessianOperator(
            task, current, data, damping=0.0, batch_size=batch_size, tangent_block=min(layout.n, 1024), weights=weights
        )
        # small models: one dense Hessian beats hundreds of single-vector CG products
        solver = ExactSolver() if layout.n <= 3000 else CGSolver(rtol=1e-12, max_iter=max(100, 2 * layout.n), warn=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CurvatureWarning)
                step, _ = solver.fit(operator).solve(-theta.grad)
        except NumericalError:  # a singular or indefinite Hessian: no Newton step to take
            break
        with torch.no_grad():
            theta += step
        newton += 1
        closure()
        if not state["grad_norm"] < saved_norm:
            with torch.no_grad():
                theta.copy_(saved)
            closure()
            break
    iterations += newton
    with torch.no_grad():
        for name, value in layout.unflatten(theta.detach()).items():
            named[name].copy_(value)
    report = TrainReport(state["grad_norm"], state["value"], int(iterations), state["grad_norm"] <= tol)
    if warn and not report.converged:
        warnings.warn(
            f"L-BFGS stopped with ||grad R|| = {report.grad_norm:.3g} > tol={tol:g} after {report.iterations} iterations; "
            "raise `max_iter`, compute in float64, or raise `tol`.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return report


_OPTIMIZERS = ("adam", "sgd")


def fit_steps(
    task: Task,
    train: Any,
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
    named = dict(task.model.named_parameters())
    params = {k: named[k].detach().clone() for k in task.param_names}
    layout = ParamLayout.of(params)
    if weights is None:
        weights = torch.ones(n, dtype=layout.dtype)
    weights = torch.as_tensor(weights)
    if weights.shape != (n,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise InputError(
            f"`weights` must be a finite, non-negative tensor of shape ({n},) with a positive sum. Got shape {tuple(weights.shape)}."
        )
    weights = weights.to(layout.device, layout.dtype)
    total_w = float(weights.sum())
    theta = layout.flatten(params).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr) if optimizer == "adam" else torch.optim.SGD([theta], lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)

    for _ in range(steps):
        current = layout.unflatten(theta.detach())
        if batch_size is None:
            _, grad = _objective_and_grad(task, current, data, layout, weights, chunk_size)
        else:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
            batch = take(data, idx, dtype=layout.dtype, device=layout.device, check=task.check_batch)
            g, _ = batch_grad_sum(task.loss, current, batch, layout, weights[idx.to(weights.device)])
            grad = g * (n / (batch_size * total_w)) + task.l2 * theta.detach()
        if not bool(torch.isfinite(grad).all()):
            raise NumericalError(
                f"the training gradient became NaN/inf during {optimizer} steps; lower `lr` (got {lr:g}) or check the data."
            )
        theta.grad = grad
        opt.step()
        if not bool(torch.isfinite(theta).all()):
            raise NumericalError(
                f"the parameters became NaN/inf during {optimizer} steps; lower `lr` (got {lr:g}) or check the data."
            )
    value, grad = _objective_and_grad(task, layout.unflatten(theta.detach()), data, layout, weights, chunk_size)
    with torch.no_grad():
        for name, v in layout.unflatten(theta.detach()).items():
            named[name].copy_(v)
    return TrainReport(float(grad.norm()), value, steps, True)
