"""I_pert,loss: the influence of perturbing a training input on a test loss (Koh & Liang 2017, §2.2).

    I_pert,loss(z, z_test) = −∇θℓ(z_test)ᵀ (H + δI)⁻¹ ∇x∇θL(z, θ̂)

the gradient of I_up,loss with respect to the training input x: perturbing x by a small δ and retraining
changes the test measurement by about I_pert,loss · δ / n. One block solve s = (H + δI)⁻¹∇ℓ(z_test) for the
test points (as in ``scores``), then per chunk of training points one vector–Jacobian product of the
parameter gradient with respect to the input per test point (:func:`~influencekit.core.autodiff.mixed_vjp`),
never a dense Jacobian. θ are the task's selected parameters, while the input gradient flows through the
whole model (a frozen feature extractor included). The L2 term does not depend on x, so ∇x∇θL = ∇x∇θℓ.
"""

from __future__ import annotations

import torch

from ..core.autodiff import InputPath, mixed_vjp
from ..data.examples import Examples
from ..solvers import SolveReport
from .fitted import FittedEngine

__all__ = ["perturbation_scores"]


def perturbation_scores(
    engine: FittedEngine, test: Examples, indices: list[int], input: InputPath | str = "auto"
) -> tuple[torch.Tensor, list[SolveReport]]:
    """I_pert,loss of the training points ``indices`` on every test point, ``(n_test, len(indices), *x.shape[1:])``.

    ``input`` locates the input in a training batch: ``"auto"`` takes the first element of a tuple batch, the
    task's ``input_key`` of a dict batch, or the batch itself when it is a tensor; an int or a key picks
    another. The input must be floating point (embeddings, not token ids). Returns the scores and the solve
    reports of the test blocks.
    """
    source, layout, task = engine.gradients, engine.layout, engine.task
    first = source.take(engine.train, indices[:1])
    if input == "auto":
        input = (
            None
            if isinstance(first, torch.Tensor)
            else (getattr(task, "input_key", "x") if isinstance(first, dict) else 0)
        )
    probe = torch.zeros(1, layout.n, dtype=layout.dtype, device=layout.device)
    x_shape = mixed_vjp(task.loss, source.params, first, layout, probe, where=input).shape[2:]
    out = torch.empty(len(test), len(indices), *x_shape, dtype=layout.dtype, device=layout.device)
    reports = []
    chunk, tangents = engine.chunks.grad, engine.chunks.tangents
    for qlo, Q, report in engine.queries(test):
        reports.append(report)
        for lo in range(0, len(indices), chunk):
            part = indices[lo : lo + chunk]
            batch = source.take(engine.train, part)
            for tlo in range(0, len(Q), tangents):
                rows = Q[tlo : tlo + tangents]
                out[qlo + tlo : qlo + tlo + len(rows), lo : lo + len(part)] = -mixed_vjp(
                    task.loss, source.params, batch, layout, rows, where=input
                )
    return out, reports
