"""The Hessian of a final Linear layer under cross-entropy or the logistic loss, in closed form.

When the selected parameters are exactly the weight (and bias) of the model's last ``nn.Linear`` — logistic or
softmax regression, or the head of a frozen network — the logits are linear in θ and the loss's Hessian is

    H = (1/n) Σ_i Λ_i ⊗ ã_i ã_iᵀ + λI,   Λ_i = diag(p_i) − p_i p_iᵀ (softmax) or σ_i(1 − σ_i) (one logit),

with ã_i the layer's input (a 1 appended for the bias). Built from the layer's inputs in one pass — C² products of
``(D × n)·(n × D)`` for C classes and D inputs — instead of one Hessian-vector product per parameter. The layer is
found by name (the selection must be exactly its parameters) and its role checked on the first batch: it runs once
per forward on a 2-D input and its output is the model's output. The result is then checked against two ordinary
Hessian-vector products on random vectors; any doubt returns None and the caller builds H from HVPs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..core.task import Task
from ..data.examples import Batch

__all__ = ["last_linear_hessian", "closed_form_applies", "CLOSED_FORM"]

logger = logging.getLogger(__name__)

CLOSED_FORM = "closed form (final Linear layer under cross-entropy)"


def _the_layer(task: Task, names: tuple[str, ...]) -> tuple[str, nn.Linear] | None:
    if getattr(task, "fisher", None) != "classification":
        return None
    for name, module in task.model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        prefix = f"{name}." if name else ""
        own = (f"{prefix}weight",) + ((f"{prefix}bias",) if module.bias is not None else ())
        if tuple(names) == own:
            return name, module
    return None


def _inputs_and_logits(
    task: Task, params: dict[str, torch.Tensor], layer: nn.Linear, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor] | None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = layer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad():
            logits = task.outputs(params, batch)
    finally:
        hook.remove()
    if len(seen) != 1 or not isinstance(logits, torch.Tensor):
        return None
    x, out = seen[0]
    if x.dim() != 2 or out.shape != logits.shape or not torch.equal(out, logits):
        return None
    return x, logits


def _curvature(logits: torch.Tensor) -> torch.Tensor:
    """Λ_i per example, ``(B, C, C)``; one logit: ``(B, 1, 1)`` σ(1 − σ)."""
    if logits.dim() == 1 or logits.shape[1] == 1:
        s = torch.sigmoid(logits.reshape(-1))
        return (s * (1 - s)).reshape(-1, 1, 1)
    p = torch.softmax(logits, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def closed_form_applies(task: Task, names: tuple[str, ...]) -> bool:
    """Whether the selection ``names`` is exactly a final Linear layer's parameters under a classification loss:
    the structural test only (no data pass). :func:`last_linear_hessian` still checks the layer's role on the data
    and falls back to HVPs where it is not the model's last layer."""
    return _the_layer(task, tuple(names)) is not None


def last_linear_hessian(operator: Any) -> torch.Tensor | None:
    """The undamped H (with λI) of ``operator`` (a :class:`~influencekit.engine.hessian.HessianOperator`) in closed
    form, or
    None when the selection is not a final Linear layer under cross-entropy (see the module docstring)."""
    task, params, layout = operator.task, operator.params, operator.layout
    found = _the_layer(task, layout.names)
    if found is None:
        return None
    _, layer = found
    C, d = layer.weight.shape
    D = d + (1 if layer.bias is not None else 0)

    def local() -> torch.Tensor:
        K = torch.zeros(C, D, C, D, dtype=operator.dtype, device=operator.device)
        for offset, batch in operator._stream():
            got = _inputs_and_logits(task, params, layer, batch)
            if got is None:
                raise _NotApplicable
            x, logits = got
            a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1) if D > d else x
            lam = _curvature(logits)
            if operator.weights is not None:
                lam = lam * operator.weights[offset : offset + len(x)].reshape(-1, 1, 1)
            K += torch.einsum("nab,nj,nk->ajbk", lam, a, a)
        return K

    try:
        K = operator._summed(local)
    except _NotApplicable:
        return None
    # (class, input) order -> the layout's order: the weight row-major, then the bias
    index = torch.arange(C * D).reshape(C, D)
    order = torch.cat([index[:, :d].reshape(-1), index[:, d:].reshape(-1)]) if D > d else index.reshape(-1)
    H = K.reshape(C * D, C * D)[order][:, order] / operator._total_weight
    H = 0.5 * (H + H.T)
    H.diagonal().add_(operator.l2)
    return H if _agrees(operator, H) else None


class _NotApplicable(Exception):
    pass


def _agrees(operator: Any, H: torch.Tensor) -> bool:
    """H against two Hessian-vector products of the general route, to ~√eps relative."""
    g = torch.Generator(device="cpu").manual_seed(0)
    V = torch.randn(2, H.shape[0], dtype=H.dtype, generator=g).to(H.device)
    HV = operator.matvec(V, damped=False)
    err = float((V @ H - HV).norm() / HV.norm().clamp_min(torch.finfo(H.dtype).tiny))
    ok = err < 100 * torch.finfo(H.dtype).eps ** 0.5
    if not ok:
        logger.info(
            "closed-form Hessian of the final Linear layer disagrees with HVPs (relative %.3g); using HVPs", err
        )
    return ok
