"""Typed results that carry their meaning: the values, their sign convention, and how they were computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .checks import check_int

__all__ = ["CONVENTION", "GROUP_CONVENTION", "TopK", "InfluenceScores", "RankedInfluence", "GroupInfluence"]

CONVENTION = (
    "I_up,loss(z, z_test) = -grad l(z_test)^T (H + damping*I)^-1 grad L(z), with H the Hessian of the mean training "
    "objective R = (1/n) sum_i L(z_i), L(z) = l(z) + (l2/2)||theta||^2 (train side includes L2, test side does not). "
    "> 0: upweighting z raises the test loss (z is harmful); < 0: z is helpful. "
    "Predicted leave-one-out change of the test loss: -I_up,loss / n_train."
)

GROUP_CONVENTION = (
    "Predicted change of each test measurement when a whole group U of training points is removed and the model "
    "retrained: measurement without U minus measurement with U (the sign of predicted_loo_change). > 0: removing U "
    "raises the test loss (U is helpful); < 0: removing U lowers it (U is harmful). Order 1 is the sum of "
    "-I_up,loss/n over U; order 2 adds the second-order term of the removal's expansion; 'newton' measures the "
    "test points at one Newton step on the objective without U (docs/conventions.md)."
)


class TopK(NamedTuple):
    """The ``k`` selected training points for each test point: ``indices`` and I_up,loss ``values``, ``(n_test, k)``."""

    indices: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class InfluenceScores:
    """I_up,loss for every (test, train) pair.

    Attributes:
        values: ``(n_test, n_train)``; see :data:`CONVENTION` for the sign.
        n_train: the training-set size n that turns I_up,loss into a leave-one-out prediction.
        metadata: task, solver and its report, damping, dtype, and the convention.
    """

    values: torch.Tensor
    n_train: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def convention(self) -> str:
        return CONVENTION

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    def predicted_loo_change(self) -> torch.Tensor:
        """``-I_up,loss / n``: predicted change of each test loss when each training point is removed, ``(n_test,
        n_train)``."""
        return -self.values / self.n_train

    def helpful(self, k: int = 10) -> TopK:
        """The ``k`` most helpful training points per test point (most negative I_up,loss: removing them raises the test
        loss)."""
        k = check_int("k", k, low=1, high=self.values.shape[1])
        vals, idx = torch.topk(-self.values, k, dim=1)
        return TopK(idx, -vals)

    def harmful(self, k: int = 10) -> TopK:
        """The ``k`` most harmful training points per test point (most positive I_up,loss: removing them lowers the test
        loss)."""
        k = check_int("k", k, low=1, high=self.values.shape[1])
        vals, idx = torch.topk(self.values, k, dim=1)
        return TopK(idx, vals)


@dataclass(frozen=True)
class RankedInfluence:
    """Top-k helpful and harmful training points per test point, computed by streaming (no full score matrix)."""

    helpful: TopK
    harmful: TopK
    n_train: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def convention(self) -> str:
        return CONVENTION


@dataclass(frozen=True)
class GroupInfluence:
    """The predicted effect of removing each of several groups of training points on each test point.

    Attributes:
        values: ``(n_groups, n_test)``, see :data:`GROUP_CONVENTION` for the sign.
        params_change: ``(n_groups, n_params)`` the predicted parameter change θ̂₋U − θ̂ of each removal.
        names: one name per group (the label column's values, a dict's keys, or ``"0"``, ``"1"``, ...).
        sizes: the number of training points in each group.
        order: ``"1"``, ``"2"`` or ``"newton"``.
        n_train: the training-set size n.
        metadata: task, solver and its reports, damping, the order's own report.
    """

    values: torch.Tensor
    params_change: torch.Tensor
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    order: str
    n_train: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def convention(self) -> str:
        return GROUP_CONVENTION

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    def mean_change(self) -> torch.Tensor:
        """``(n_groups,)`` the predicted change of the mean test measurement when each group is removed."""
        return self.values.mean(dim=1)

    def ranking(self) -> list[dict[str, Any]]:
        """The groups by how much their removal moves the mean test measurement (largest |change| first), as rows
        ``{"group", "size", "fraction", "mean_change", "effect"}`` (``effect``: "harmful" when removing the group
        lowers the test loss, "helpful" when it raises it)."""
        mean = self.mean_change().detach().cpu().double()
        order = torch.argsort(-mean.abs(), stable=True).tolist()
        return [
            {
                "group": self.names[g],
                "size": self.sizes[g],
                "fraction": self.sizes[g] / self.n_train,
                "mean_change": float(mean[g]),
                "effect": "harmful" if mean[g] < 0 else "helpful",
            }
            for g in order
        ]
