"""Attribution for networks far from a minimum: TracIn, a TRAK-style estimator, and ensembles of any attributors.

Influence functions assume θ̂ minimises the training objective; a network trained for a few epochs of Adam is not
there, and the field judges such models by the linear datamodeling score (:mod:`influencekit.validation.datamodels`).
The estimators here answer for them, each returning :class:`~influencekit.InfluenceScores` ``(n_test, n_train)`` in
influencekit's sign convention — a value > 0 means up-weighting the training point raises the test measurement, and
``predicted_loo_change() = −values / n`` — so top-k, the LDS and every result method work on them unchanged:

- :class:`TracIn` (Pruthi et al. 2020): Σ_c η_c ∇f(z_test; θ_c) · ∇L(z; θ_c) over checkpoints θ_c with learning
  rates η_c, negated into the convention (−Σ_c η_c ∇f·∇L: a training step on z moves f by −η ∇f·∇L(z)). The
  curvature (H + δI)⁻¹ of Influence is replaced by η_c I at each checkpoint: the values are not a calibrated
  leave-one-out prediction, their order is what they offer.
- :class:`TRAK` (Park et al. 2023): per checkpoint (an independently trained model, or a checkpoint of one run)
  the gradients of the measurement (the margin, ``ClassificationTask(measurement="margin")``) projected to ``dim``
  dimensions by a projection of its own, φ = P_c∇f; the scores φ_test (ΦᵀΦ + λI)⁻¹ Φᵀ averaged over checkpoints,
  times the mean over checkpoints of each training point's 1 − p (p its probability of the correct class), TRAK's
  logistic weighting.
- :class:`Ensemble`: the mean of the scores of several attributors (Influence objects fitted on independently
  trained models, TracIn, TRAK, …), with each member's seconds in the metadata.

Both gradient-based estimators stream per-example gradients through :class:`~influencekit.engine.gradients.
GradientSource` in chunks (the same layer taps or vmap as Influence), one checkpoint at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from ..core.autodiff import ParamLayout
from ..core.checks import check_int, check_number
from ..core.errors import InputError, InputTypeError
from ..core.projection import Projector
from ..core.results import InfluenceScores
from ..core.task import ClassificationTask, Params, Task
from ..data.examples import DataSource, Examples
from .gradients import GradientSource

__all__ = ["Attributor", "TracIn", "TRAK", "Ensemble"]


class Attributor(Protocol):
    """Anything that scores test points against the training set: ``scores(test) -> InfluenceScores``."""

    def scores(self, test: DataSource) -> InfluenceScores: ...


def _checked_checkpoints(task: Task, checkpoints: Sequence[Params]) -> list[dict[str, torch.Tensor]]:
    """The checkpoints as detached copies, each refused unless it holds exactly the task's selected parameters."""
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, Sequence) or not checkpoints:
        raise InputTypeError(
            "`checkpoints` must be a non-empty list of parameter dicts (name -> tensor, as task.params() gives). Got "
            f"{type(checkpoints).__name__}{' (empty)' if isinstance(checkpoints, Sequence) else ''}."
        )
    reference = task.params()
    out = []
    for c, point in enumerate(checkpoints):
        if not isinstance(point, dict):
            raise InputTypeError(f"checkpoint {c} must be a dict of parameters. Got {type(point).__name__}.")
        if sorted(point) != sorted(reference):
            raise InputError(
                f"checkpoint {c} must hold the task's selected parameters {sorted(reference)}. Got {sorted(point)}; "
                "save checkpoints as {name: p.detach().clone() for name, p in task.params().items()}."
            )
        for name, value in point.items():
            if tuple(value.shape) != tuple(reference[name].shape):
                raise InputError(
                    f"checkpoint {c}: parameter {name!r} has shape {tuple(value.shape)}, the model's "
                    f"{tuple(reference[name].shape)}."
                )
            if not bool(torch.isfinite(value).all()):
                raise InputError(f"checkpoint {c}: parameter {name!r} holds NaN/inf values.")
        out.append({name: point[name].detach().to(reference[name]).clone() for name in reference})
    return out


class TracIn:
    """TracIn over checkpoints (module docstring): ``values[t, i] = −Σ_c η_c ∇f(z_t; θ_c) · ∇L(z_i; θ_c)``.

    Args:
        task: the task (its ``measurement`` is f on the test side, its loss with L2 is L on the training side).
        train: the training data.
        checkpoints: parameter dicts saved during training (``task.params()`` at each checkpoint).
        learning_rates: η_c per checkpoint (the learning rate in force around it), or one for all.
        batch_size: examples per gradient chunk.
        progress: progress bars.

    Example::

        tracin = ik.TracIn(task, train, checkpoints=saved, learning_rates=1e-3)
        scores = tracin.scores(test)   # InfluenceScores; scores.top_k(...) as for Influence
    """

    def __init__(
        self,
        task: Task,
        train: DataSource,
        *,
        checkpoints: Sequence[Params],
        learning_rates: float | Sequence[float] = 1.0,
        batch_size: int = 256,
        progress: bool = False,
    ) -> None:
        if not isinstance(task, Task):
            raise InputTypeError(f"`task` must be an influencekit Task. Got {type(task).__name__}.")
        self.task, self.train = task, Examples(train, name="train")
        self.checkpoints = _checked_checkpoints(task, checkpoints)
        rates = (
            [learning_rates] * len(self.checkpoints)
            if isinstance(learning_rates, (int, float))
            else list(learning_rates)
        )
        if len(rates) != len(self.checkpoints):
            raise InputError(
                f"`learning_rates` must give one rate per checkpoint ({len(self.checkpoints)}). Got {len(rates)}."
            )
        self.learning_rates = [check_number("learning_rates", r, low=0.0, low_inclusive=False) for r in rates]
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.progress = bool(progress)

    def scores(self, test: DataSource) -> InfluenceScores:
        start = time.perf_counter()
        test_data = Examples(test, name="test")
        values = None
        for theta, rate in zip(self.checkpoints, self.learning_rates):
            source = GradientSource(self.task, theta, chunk=self.batch_size, progress=self.progress)
            Q = source.block(test_data, side="test", desc="test gradients")
            if values is None:
                values = torch.zeros(len(test_data), len(self.train), dtype=Q.dtype, device=Q.device)
            for lo, G in source.stream(self.train, side="train", desc="training gradients"):
                values[:, lo : lo + len(G)].addmm_(Q, G.T, alpha=-rate)  # −η ∇f·∇L, into the sum in place
        metadata = {
            "method": "tracin",
            "checkpoints": len(self.checkpoints),
            "learning_rates": self.learning_rates,
            "task": self.task.describe(),
            "seconds": time.perf_counter() - start,
        }
        return InfluenceScores(values, len(self.train), metadata)


def _one_minus_correct_probability(
    task: ClassificationTask, params: Params, source: GradientSource, data: Examples
) -> torch.Tensor:
    """1 − p_i, each example's probability of another label than its own, ``(n,)``: σ(−margin), since the margin is
    log(p / (1 − p)) (:meth:`~influencekit.ClassificationTask.margins`, one logit or many)."""
    with torch.no_grad():
        return torch.cat([torch.sigmoid(-task.margins(params, batch)) for _, batch in source.batches(data)])


class TRAK:
    """A TRAK-style estimator (module docstring) over one or more checkpoints / independently trained models.

    Args:
        task: a :class:`~influencekit.ClassificationTask`, best with ``measurement="margin"`` (TRAK's output
            function); its measurement is differentiated on both sides.
        train: the training data.
        checkpoints: parameter dicts of the trained models (``task.params()`` of each).
        dim: the projection dimension k. 512 (dattri's default) scored a higher LDS than 2,048 (TRAK's) on a 5,000-image
            MNIST MLP (0.243 against 0.174 for one model, docs/benchmarks.md): a dimension well below n regularises
            the kernel; larger training sets call for larger k.
        damping: λ of the kernel (ΦᵀΦ + λI)⁻¹, relative to its mean diagonal (a small ridge keeps it invertible when
            k is close to n).
        seed: the projections' seed: checkpoint c is projected with seed + c (a projection of its own, as TRAK's).
        batch_size: examples per gradient chunk.
        progress: progress bars.
    """

    def __init__(
        self,
        task: Task,
        train: DataSource,
        *,
        checkpoints: Sequence[Params],
        dim: int = 512,
        damping: float = 1e-6,
        seed: int = 0,
        batch_size: int = 256,
        progress: bool = False,
    ) -> None:
        if not isinstance(task, ClassificationTask):
            raise InputTypeError(
                f"`task` must be a ClassificationTask (TRAK weights each example by 1 − p of its label). Got "
                f"{type(task).__name__}."
            )
        self.task, self.train = task, Examples(train, name="train")
        self.checkpoints = _checked_checkpoints(task, checkpoints)
        self.dim = check_int("dim", dim, low=1)
        self.damping = check_number("damping", damping, low=0.0)
        self.seed = check_int("seed", seed, low=0)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.progress = bool(progress)
        self._fitted: list[tuple[GradientSource, Projector, torch.Tensor, torch.Tensor]] | None = None
        self._weights: torch.Tensor | None = None
        self.fit_seconds_ = math.nan

    def fit(self) -> TRAK:
        """Per checkpoint: the projected training gradients Φ and the Cholesky factor of ΦᵀΦ + λI; the weights 1 − p."""
        start = time.perf_counter()
        layout = ParamLayout.of(self.checkpoints[0])
        fitted, weights = [], []
        for c, theta in enumerate(self.checkpoints):
            # a projection of its own per checkpoint (seed + c), as TRAK's: the projections' errors then average out
            # over the ensemble instead of repeating (on models that barely differ, a shared projection gains nothing)
            projector = Projector(layout.n, self.dim, seed=self.seed + c)
            source = GradientSource(self.task, theta, chunk=self.batch_size, progress=self.progress)
            Phi = torch.cat(
                [projector.project(G) for _, G in source.stream(self.train, side="test", desc="training gradients")]
            )
            K = Phi.T @ Phi
            ridge = self.damping * float(K.diagonal().mean()) if K.numel() else 0.0
            L, info = torch.linalg.cholesky_ex(K + ridge * torch.eye(len(K), dtype=K.dtype, device=K.device))
            if int(info) != 0:
                raise InputError(
                    f"TRAK's kernel ΦᵀΦ + λI is singular at dim={self.dim} with damping={self.damping:g}; raise "
                    "`damping` (e.g. 1e-3) or lower `dim` below the number of training examples."
                )
            fitted.append((source, projector, Phi, L))
            weights.append(_one_minus_correct_probability(self.task, theta, source, self.train))
        self._fitted, self._weights = fitted, torch.stack(weights).mean(0)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def scores(self, test: DataSource) -> InfluenceScores:
        if self._fitted is None:
            self.fit()
        start = time.perf_counter()
        test_data = Examples(test, name="test")
        values = None
        for source, projector, Phi, L in self._fitted:
            phi = torch.cat(
                [projector.project(G) for _, G in source.stream(test_data, side="test", desc="test gradients")]
            )
            part = torch.cholesky_solve(phi.T, L).T @ Phi.T  # φ_test (ΦᵀΦ + λI)⁻¹ Φᵀ
            values = part if values is None else values.add_(part)
        values = values / len(self._fitted) * self._weights[None, :].to(values.dtype)
        metadata = {
            "method": "trak",
            "checkpoints": len(self.checkpoints),
            "dim": self.dim,
            "damping": self.damping,
            "seed": self.seed,
            "task": self.task.describe(),
            "fit_seconds": self.fit_seconds_,
            "seconds": time.perf_counter() - start,
        }
        return InfluenceScores(values, len(self.train), metadata)


class Ensemble:
    """The mean of several attributors' scores (each with ``scores(test) -> InfluenceScores`` on the same training
    set): Influence objects fitted on independently trained models, checkpoints, TracIn, TRAK, … The metadata lists
    each member's method and seconds."""

    def __init__(self, members: Sequence[Attributor]) -> None:
        if not isinstance(members, Sequence) or not members:
            raise InputTypeError("`members` must be a non-empty list of attributors (objects with scores(test)).")
        for j, member in enumerate(members):
            if not callable(getattr(member, "scores", None)):
                raise InputTypeError(f"member {j} ({type(member).__name__}) has no scores(test) method.")
        self.members = list(members)

    def scores(self, test: DataSource) -> InfluenceScores:
        total, costs, n_train = None, [], None
        for j, member in enumerate(self.members):
            start = time.perf_counter()
            result = member.scores(test)
            costs.append(
                {
                    "member": j,
                    "method": result.metadata.get("method", type(member).__name__),
                    "seconds": time.perf_counter() - start,
                }
            )
            if n_train is not None and result.n_train != n_train:
                raise InputError(
                    f"every member must score the same training set; member {j} has {result.n_train} training "
                    f"points, member 0 {n_train}."
                )
            n_train = result.n_train
            total = result.values.clone() if total is None else total.add_(result.values.to(total))
        metadata = {"method": "ensemble", "members": costs, "seconds": sum(c["seconds"] for c in costs)}
        return InfluenceScores(total / len(self.members), n_train, metadata)
