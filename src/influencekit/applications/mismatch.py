"""Debugging a domain mismatch with influence functions (Koh & Liang 2017, §5.3).

When a model errs on a test point, the training points with the largest |I_up,loss| are the ones
"responsible" for the error; their per-feature input influence I_pert,loss (the gradient of I_up,loss with
respect to each training point's features) says *through which features* they act.
:func:`explain_features` does both for any model and data;
:func:`~influencekit_paper.mismatch.run_readmission` re-creates the paper's experiment on the UCI
diabetes data (``influencekit paper readmission``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.autodiff import InputPath, input_leaf
from ..core.checks import check_int
from ..core.errors import InputError, InputTypeError
from ..data.examples import Examples, take
from ..engine.scoring import Influence

__all__ = ["FeatureExplanation", "explain_features"]

RANK_BY = ("gradient", "gradient_x_input")


# ------------------------------------------------------------------------------------------ explain_features
@dataclass(frozen=True)
class FeatureExplanation:
    """The most influential training points of one test point and the features that drive their influence.

    Attributes:
        train_indices: ``(k,)`` the training points, largest |I_up,loss| first.
        influence: ``(k,)`` their I_up,loss on the test point (> 0 harmful, < 0 helpful; docs/conventions.md).
        values: ``(k, n_features)`` I_pert,loss of each of them, the input flattened: moving feature j of
            training point i by a small δ and retraining changes the test loss by about ``values[i, j]·δ/n``.
        inputs: ``(k, n_features)`` the (flattened) inputs of those training points.
        feature_names: ``(n_features,)`` one name per flattened input coordinate.
        rank_by: ``"gradient"`` (features ordered by |I_pert|) or ``"gradient_x_input"`` (by |I_pert · x|).
        order: ``(k, n_features)`` long, the feature order of each training point under ``rank_by``.
        n_train: the training-set size n.
        n_show: features per training point that :meth:`table` shows.
        metadata: the influence computation's metadata (solver, damping, dtype, convention, ...).
    """

    train_indices: torch.Tensor
    influence: torch.Tensor
    values: torch.Tensor
    inputs: torch.Tensor
    feature_names: list[str]
    rank_by: str
    order: torch.Tensor
    n_train: int
    n_show: int = 3
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.train_indices)

    def attribution(self) -> torch.Tensor:
        """``(k, n_features)`` what the features are ranked by: I_pert, or I_pert · x for ``"gradient_x_input"``."""
        return self.values * self.inputs if self.rank_by == "gradient_x_input" else self.values

    def top_features(self, i: int, n: int | None = None) -> list[tuple[str, float, float]]:
        """The ``n`` leading features of the ``i``-th training point: ``(name, I_pert, I_pert · x)`` each."""
        i = check_int("i", i, low=0, high=len(self) - 1)
        n = self.n_show if n is None else check_int("n", n, low=1, high=len(self.feature_names))
        return [
            (self.feature_names[j], float(self.values[i, j]), float(self.values[i, j] * self.inputs[i, j]))
            for j in self.order[i, :n].tolist()
        ]

    def rows(self, n: int | None = None) -> list[dict[str, Any]]:
        """One dict per training point: rank, train index, I_up,loss, predicted LOO change, leading features."""
        return [
            {
                "rank": r + 1,
                "train_index": int(self.train_indices[r]),
                "influence": float(self.influence[r]),
                "loo_change": -float(self.influence[r]) / self.n_train,
                "features": self.top_features(r, n),
            }
            for r in range(len(self))
        ]

    def table(self, n: int | None = None) -> str:
        """A plain-text table: one line per training point with its ``n`` leading features."""
        key = "I_pert*x" if self.rank_by == "gradient_x_input" else "I_pert"
        header = f"{'rank':>4}  {'train':>7}  {'I_up,loss':>11}  {'LOO change':>11}  leading features ({key})"
        lines = [header, "-" * len(header)]
        for row in self.rows(n):
            feats = ", ".join(
                f"{name} {(gx if self.rank_by == 'gradient_x_input' else g):+.3g}" for name, g, gx in row["features"]
            )
            lines.append(
                f"{row['rank']:>4}  {row['train_index']:>7}  {row['influence']:>+11.4g}  {row['loo_change']:>+11.3g}  "
                f"{feats}"
            )
        return "\n".join(lines)

    def markdown(self, n: int | None = None) -> str:
        """The same table in Markdown."""
        key = "I_pert · x" if self.rank_by == "gradient_x_input" else "I_pert"
        lines = [
            f"| rank | train index | I_up,loss | predicted LOO change | leading features ({key}) |",
            "|---|---|---|---|---|",
        ]
        for row in self.rows(n):
            feats = "; ".join(
                f"`{name}` {(gx if self.rank_by == 'gradient_x_input' else g):+.3g}" for name, g, gx in row["features"]
            )
            lines.append(
                f"| {row['rank']} | {row['train_index']} | {row['influence']:+.4g} | {row['loo_change']:+.3g} | "
                f"{feats} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def explain_features(
    influence: Influence,
    test_point: Any,
    *,
    k: int = 5,
    feature_names: Sequence[str] | None = None,
    n_show: int = 3,
    rank_by: str = "gradient",
    input: InputPath | str = "auto",
) -> FeatureExplanation:
    """For the ``k`` training points with the largest |I_up,loss| on ``test_point``, the features that drive it.

    The training points are ranked by |I_up,loss(z, z_test)| = |−∇ℓ(z_test)ᵀ(H + δI)⁻¹∇L(z)| (helpful and
    harmful alike); for each, I_pert,loss(z, z_test) = −∇ℓ(z_test)ᵀ(H + δI)⁻¹∇x∇θL(z) is computed with
    :meth:`Influence.perturbation_influence` and its coordinates are ranked by magnitude (Koh & Liang 2017,
    §2.2 and §5.3).

    ``rank_by="gradient"`` orders the features by |I_pert|: how strongly a small change of the feature would
    change the influence. For one-hot data that also ranks features the point does not have (raising an
    absent indicator from 0 moves the point's margin by that feature's weight, so large weights lead).
    ``rank_by="gradient_x_input"`` orders them by |I_pert · x|, the first-order change of the influence if
    the feature were set to 0: only the features the point has count (for standardised numbers, the change
    if the value were set to the training mean).

    Args:
        influence: a fitted :class:`~influencekit.Influence` (its model's input must be floating point).
        test_point: exactly one test example, in any form the training data takes (e.g. ``(X[j:j+1], y[j:j+1])``).
        k: how many training points to explain, in [1, n_train].
        feature_names: one name per input coordinate (flattened, C order); default ``x[j]`` (``x[i,j]``, ...).
        n_show: features per training point shown by ``table()`` / ``markdown()`` (``values`` keeps all).
        rank_by: ``"gradient"`` or ``"gradient_x_input"`` (above).
        input: where the input sits in a batch, as for :meth:`Influence.perturbation_influence`.

    Returns:
        A :class:`FeatureExplanation`; ``print()`` it for a table.
    """
    if not isinstance(influence, Influence):
        raise InputTypeError(f"`influence` must be a fitted influencekit Influence. Got {type(influence).__name__}.")
    influence.check_fitted()
    if rank_by not in RANK_BY:
        raise InputError(f"`rank_by` must be one of {', '.join(repr(r) for r in RANK_BY)}. Got {rank_by!r}.")
    n_train = influence.engine.n_train
    k = check_int("k", k, low=1, high=n_train)
    n_show = check_int("n_show", n_show, low=1)
    n_test = len(Examples(test_point, name="test_point"))
    if n_test != 1:
        raise InputError(
            f"`test_point` must hold exactly one example. Got {n_test}; pass a slice such as (X[j:j+1], y[j:j+1])."
        )

    scores = influence.scores(test_point)
    values = scores.values[0]
    top = torch.topk(values.abs(), k).indices
    pert = influence.perturbation_influence(test_point, top, input=input)[0]  # (k, *x.shape[1:])
    x_shape = tuple(pert.shape[1:])
    pert = pert.reshape(k, -1)
    d = pert.shape[1]

    layout = influence.engine.layout
    batch = take(
        influence.engine.train, top.tolist(), dtype=layout.dtype, device=layout.device, check=influence.task.check_batch
    )
    if input == "auto":  # the same resolution as Influence.perturbation_influence
        input = (
            None
            if isinstance(batch, torch.Tensor)
            else (getattr(influence.task, "input_key", "x") if isinstance(batch, dict) else 0)
        )
    inputs = input_leaf(batch, input).reshape(k, -1).to(pert.dtype)

    if feature_names is None:
        names = [f"x[{','.join(str(int(i)) for i in np.unravel_index(j, x_shape))}]" for j in range(d)]
    else:
        names = [str(name) for name in feature_names]
        if len(names) != d:
            raise InputError(
                f"`feature_names` must name each of the {d} input coordinates (the input has shape {x_shape}, "
                "flattened). "
                f"Got {len(names)} names."
            )
    key = pert * inputs if rank_by == "gradient_x_input" else pert
    order = torch.as_tensor(np.argsort(-key.abs().detach().cpu().numpy(), axis=1, kind="stable"))
    metadata = {**scores.metadata, "method": "I_up,loss and I_pert,loss", "rank_by": rank_by, "input_shape": x_shape}
    return FeatureExplanation(
        train_indices=top.cpu(),
        influence=values[top].detach().cpu(),
        values=pert.detach().cpu(),
        inputs=inputs.detach().cpu(),
        feature_names=names,
        rank_by=rank_by,
        order=order,
        n_train=n_train,
        n_show=min(n_show, d),
        metadata=metadata,
    )
