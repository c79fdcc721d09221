"""Typed results that carry their meaning: the values, their sign convention, and how they were computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .checks import check_int

__all__ = ["CONVENTION", "TopK", "InfluenceScores", "RankedInfluence"]

CONVENTION = (
    "I_up,loss(z, z_test) = -grad l(z_test)^T (H + damping*I)^-1 grad L(z), with H the Hessian of the mean training "
    "objective R = (1/n) sum_i L(z_i), L(z) = l(z) + (l2/2)||theta||^2 (train side includes L2, test side does not). "
    "> 0: upweighting z raises the test loss (z is harmful); < 0: z is helpful. "
    "Predicted leave-one-out change of the test loss: -I_up,loss / n_train."
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
        """``-I_up,loss / n``: predicted change of each test loss when each training point is removed, ``(n_test, n_train)``."""
        return -self.values / self.n_train

    def helpful(self, k: int = 10) -> TopK:
        """The ``k`` most helpful training points per test point (most negative I_up,loss: removing them raises the test loss)."""
        k = check_int("k", k, low=1, high=self.values.shape[1])
        vals, idx = torch.topk(-self.values, k, dim=1)
        return TopK(idx, -vals)

    def harmful(self, k: int = 10) -> TopK:
        """The ``k`` most harmful training points per test point (most positive I_up,loss: removing them lowers the test loss)."""
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
