"""Training-set attacks through input-perturbation influence (Koh & Liang 2017, §5.2).

The attacker changes a few training inputs by at most ``eps`` per pixel so that, once the model is
retrained, chosen test predictions flip. I_pert,loss(z, z_test) = −∇θℓ(z_test)ᵀ H⁻¹ ∇x∇θL(z, θ̂) says how
the target test loss moves when a training input x moves (:meth:`Influence.perturbation_influence`):
retraining after x → x + δ changes it by about I_pert,loss · δ / n. The attack

1. picks the training points with the largest ‖I_pert,loss‖₁ — the first-order rise of the target loss
   that an L∞-bounded perturbation of that point buys,
2. iterates: x̃ ← Π(x̃ + step · sign(I_pert,loss(x̃, z_test))), with Π the projection onto the L∞ ball of
   radius ``eps`` around the original inputs and onto the valid input range; retrain the task's selected
   parameters (the top layer above a frozen feature extractor) warm-started with :func:`fit_lbfgs`; stop
   when the target predictions flip or after ``max_iter`` iterations.

With several targets the attacked quantity is the sum of their test losses (the multi-target variant).
The paper's experiment on two classes of digits or MNIST (a small CNN trained there, frozen, under a binary
logistic top layer; the paper froze Inception features instead) is
:func:`~influencekit_paper.attack.run_attack_experiment`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.checks import check_indices, check_int, check_number
from ..core.errors import InputError, InputTypeError, StationarityWarning
from ..core.progress import progress_bar
from ..core.task import ClassificationTask
from ..engine.scoring import Influence
from ..engine.training import fit_lbfgs

__all__ = [
    "AttackResult",
    "training_set_attack",
    "predict_labels",
]

logger = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """What :func:`training_set_attack` did.

    Attributes:
        train_idx: the attacked training points, ``(k,)``.
        original: their original inputs, ``(k, *x.shape[1:])``.
        perturbed: their perturbed inputs, same shape; ``|perturbed − original| ≤ eps`` everywhere.
        losses: target test losses at the start and after each retraining, ``(iterations + 1, n_targets)``.
        flipped_targets: whether each target's prediction flipped, ``(n_targets,)``.
        flipped: every target flipped.
        iterations: attack steps taken (each followed by a retraining).
        params: the selected parameters retrained on the perturbed data (the model itself is restored
            unless ``restore=False``).
    """

    train_idx: torch.Tensor
    original: torch.Tensor
    perturbed: torch.Tensor
    losses: torch.Tensor
    flipped_targets: torch.Tensor
    flipped: bool
    iterations: int
    params: dict[str, torch.Tensor]
    eps: float
    step: float

    @property
    def delta(self) -> torch.Tensor:
        """``perturbed − original``, ``(k, *x.shape[1:])``."""
        return self.perturbed - self.original

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """A copy of the training inputs ``X`` with the attacked rows replaced by their perturbed versions."""
        out = X.clone()
        out[self.train_idx] = self.perturbed.to(out)
        return out


def predict_labels(
    task: ClassificationTask, X: torch.Tensor, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Predicted classes ``(B,)``: ``logit > 0`` for one output (binary logistic), ``argmax`` otherwise."""
    with torch.no_grad():
        logits = task.forward(task.params() if params is None else params, X)
    if logits.dim() == 2 and logits.shape[1] > 1:
        return logits.argmax(1)
    return (logits.reshape(-1) > 0).long()


def _pair(name: str, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value)):
        raise InputTypeError(f"`{name}` must be an (X, y) tuple of tensors. Got {type(value).__name__}.")
    X, y = value
    if not X.is_floating_point():
        raise InputError(
            f"`{name}` inputs must be continuous (a floating tensor): the attack moves them along the input gradient. "
            f"Got dtype {X.dtype}; for token ids attack the embeddings instead."
        )
    if len(X) != len(y) or len(X) == 0:
        raise InputError(
            f"`{name}` must hold as many inputs as labels, at least one. Got {len(X)} inputs and {len(y)} labels."
        )
    return X, y


def training_set_attack(
    task: ClassificationTask,
    train: tuple[torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float,
    step: float,
    n_perturb: int = 1,
    train_idx: int | Sequence[int] | torch.Tensor | None = None,
    max_iter: int = 100,
    input_range: tuple[float, float] | None = (0.0, 1.0),
    solver: str = "exact",
    damping: float = 0.0,
    tol: float = 1e-8,
    restore: bool = True,
    influence_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> AttackResult:
    """Perturb a few training inputs within an L∞ ball so that retraining flips the target prediction(s).

    Args:
        task: a :class:`ClassificationTask` whose selected parameters (e.g. ``params="top"``) are trained
            to a minimum on ``train``; the other parameters stay frozen, inputs are differentiated through them.
        train: ``(X, y)`` the training set; ``X`` floating. It is not modified (the result holds the new rows).
        target: ``(X, y)`` the test point(s) to flip, all correctly classified now. Several targets make the
            multi-target attack: the sum of their losses is raised until every prediction flips.
        eps: L∞ radius of the perturbation around the original inputs (in input units), > 0.
        step: size of each signed step, > 0 (the paper: step 0.02 and eps 0.5 of one 8-bit grey level).
        n_perturb: how many training points to perturb, chosen by the largest ‖I_pert,loss‖₁ (summed over
            targets) — ignored when ``train_idx`` names them.
        max_iter: most steps (each followed by a retraining).
        input_range: ``(low, high)`` valid input values; ``None`` for no bound.
        solver, damping: the inverse-Hessian solver and damping of :class:`~influencekit.Influence`.
        tol: ‖∇R‖ tolerance of each warm-started retraining.
        restore: put the task's selected parameters back to their values before the attack.
        influence_options: more keyword arguments for each :class:`~influencekit.Influence` (e.g.
            ``memory_budget``, ``solver_options``).
        progress: show a progress bar over iterations.

    Returns:
        :class:`AttackResult` with the perturbed inputs, the per-iteration target losses and whether the
        prediction(s) flipped.
    """
    if not isinstance(task, ClassificationTask):
        raise InputTypeError(
            f"`task` must be an ik.ClassificationTask (the attack flips predicted classes). Got {type(task).__name__}."
        )
    X, y = _pair("train", train)
    X_t, y_t = _pair("target", target)
    eps = check_number("eps", eps, low=0.0, low_inclusive=False)
    step = check_number("step", step, low=0.0, low_inclusive=False)
    max_iter = check_int("max_iter", max_iter, low=1)
    bounds = _check_input_range(X, input_range)
    _check_correct(task, X_t, y_t)
    targets = (X_t, y_t)
    settings = {**(influence_options or {}), "solver": solver, "damping": damping}
    saved = {k: v.clone() for k, v in task.params().items()}
    X_cur = X.clone()
    try:
        inf = Influence(task, (X_cur, y), **settings).fit()  # warns when the model is not trained to a minimum
        idx = _attacked_points(inf, targets, train_idx, n_perturb, len(y))
        original = X[idx].clone()
        low, high = original - eps, original + eps
        if bounds is not None:
            low, high = low.clamp(min=bounds[0]), high.clamp(max=bounds[1])
        losses, flipped_targets, iterations = _iterate(
            task,
            inf,
            X_cur,
            y,
            targets,
            idx,
            (low, high),
            step=step,
            max_iter=max_iter,
            tol=tol,
            settings=settings,
            progress=progress,
        )
        params = {k: v.clone() for k, v in task.params().items()}
    finally:
        if restore:
            _restore(task, saved)
    result = AttackResult(
        train_idx=idx,
        original=original,
        perturbed=X_cur[idx].clone(),
        losses=torch.stack(losses),
        flipped_targets=flipped_targets,
        flipped=bool(flipped_targets.all()),
        iterations=iterations,
        params=params,
        eps=eps,
        step=step,
    )
    logger.info(
        "attack on %d target(s) with %d training point(s): flipped=%s after %d iterations",
        len(y_t),
        len(idx),
        result.flipped,
        iterations,
    )
    return result


def _check_input_range(X: torch.Tensor, input_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """``(low, high)`` checked, and the training inputs checked to lie in it; ``None`` for no bound."""
    if input_range is None:
        return None
    lo_, hi_ = (check_number("input_range[0]", input_range[0]), check_number("input_range[1]", input_range[1]))
    if not lo_ < hi_:
        raise InputError(f"`input_range` must be (low, high) with low < high, or None. Got {tuple(input_range)!r}.")
    if bool((X < lo_).any() or (X > hi_).any()):
        raise InputError(
            f"`train` inputs must lie in `input_range`={tuple(input_range)!r}. Got values in [{float(X.min()):g}, "
            f"{float(X.max()):g}]; pass the range the inputs live in, or input_range=None."
        )
    return lo_, hi_


def _check_correct(task: ClassificationTask, X_t: torch.Tensor, y_t: torch.Tensor) -> None:
    """Refuse targets that are misclassified already: the attack flips correct predictions only."""
    predicted = predict_labels(task, X_t)
    wrong = (predicted != y_t).nonzero().flatten().tolist()
    if wrong:
        j = wrong[0]
        raise InputError(
            f"`target` example {j} is already misclassified (label {int(y_t[j])}, predicted {int(predicted[j])}); the "
            "attack "
            "flips correct predictions only. Pass correctly classified test points"
            + (f" ({len(wrong)} of {len(y_t)} are not)." if len(wrong) > 1 else ".")
        )


def _attacked_points(
    inf: Influence, targets: tuple[torch.Tensor, torch.Tensor], train_idx: Any, n_perturb: int, n: int
) -> torch.Tensor:
    """The training points to perturb: ``train_idx`` when given, else the ``n_perturb`` largest ‖Σ_t I_pert‖₁,
    sorted."""
    if train_idx is not None:
        return torch.as_tensor(check_indices("train_idx", train_idx, n, unique=True), dtype=torch.long)
    n_perturb = check_int("n_perturb", n_perturb, low=1, high=n)
    # the first-order rise of Σ target losses that an L∞ step buys is ‖Σ_t I_pert‖₁ · eps / n
    G_all = inf.perturbation_influence(targets, range(n)).sum(0)
    return G_all.reshape(n, -1).abs().sum(1).topk(n_perturb).indices.sort().values


def _iterate(
    task: ClassificationTask,
    inf: Influence,
    X_cur: torch.Tensor,
    y: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
    idx: torch.Tensor,
    box: tuple[torch.Tensor, torch.Tensor],
    *,
    step: float,
    max_iter: int,
    tol: float,
    settings: dict[str, Any],
    progress: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Signed steps on the rows ``idx`` of ``X_cur`` (in place), projected onto ``box``, each followed by a
    warm-started retraining, until every target flips or after ``max_iter`` steps.

    Returns the target losses at the start and after each retraining, which targets flipped, and the steps taken.
    """
    X_t, y_t = targets
    low, high = box
    losses = [_target_losses(task, targets)]
    flipped_targets = torch.zeros(len(y_t), dtype=torch.bool)
    iterations = 0
    bar = progress_bar(total=max_iter, desc="attack", enabled=progress)
    while iterations < max_iter:
        G = inf.perturbation_influence(targets, idx).sum(0)  # ∝ ∂(Σ target losses)/∂x̃ after retraining
        X_cur[idx] = torch.minimum(torch.maximum(X_cur[idx] + step * torch.sign(G), low), high)
        fit_lbfgs(task, (X_cur, y), tol=tol, curvature=inf.engine.solver)
        iterations += 1
        losses.append(_target_losses(task, targets))
        flipped_targets = predict_labels(task, X_t) != y_t
        bar.update(1)
        if bool(flipped_targets.all()):
            break
        if iterations < max_iter:
            inf = _refit(task, (X_cur, y), settings)
    bar.close()
    return losses, flipped_targets, iterations


def _refit(task: ClassificationTask, train: tuple[torch.Tensor, torch.Tensor], settings: dict[str, Any]) -> Influence:
    with warnings.catch_warnings():
        # fit_lbfgs has just reached ‖∇R‖ ≤ tol (or warned itself); the engine's check would only repeat that
        warnings.simplefilter("ignore", StationarityWarning)
        return Influence(task, train, **settings).fit()


def _target_losses(task: ClassificationTask, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return task.loss(task.params(), targets).detach().clone()


def _restore(task: ClassificationTask, saved: dict[str, torch.Tensor]) -> None:
    """Put the task's selected parameters back to ``saved``."""
    with torch.no_grad():
        named = dict(task.model.named_parameters())
        for name, value in saved.items():
            named[name].copy_(value)
