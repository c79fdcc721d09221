"""How well predicted influence matches retraining: Pearson, Spearman, and the linear datamodeling score.

``pearson`` and ``spearman`` are thin, checked wrappers over SciPy. ``linear_datamodeling_score`` (LDS,
Park et al. 2023, "TRAK: Attributing Model Behavior at Scale", https://arxiv.org/abs/2303.14186) asks
whether influence ranks *sets* of training points correctly: for random subsets S of the training data
it retrains on S and compares, per test point and across subsets, the actual change of the test loss with
the first-order prediction for removing the complement R = [n] \\ S (docs/conventions.md)::

    predicted(R, z_test) = Σ_{i ∈ R} predicted_loo_change[z_test, i] = −(1/n) Σ_{i ∈ R} I_up,loss(z_i, z_test)
    actual(R, z_test)    = ℓ_test(θ̂ retrained on S) − ℓ_test(θ̂)
    LDS(z_test)          = Spearman over subsets of (predicted, actual);   LDS = mean over test points
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.stats
import torch

from ..core.checks import check_int, check_number
from ..core.errors import ConvergenceWarning, InputError, NumericalError
from ..core.progress import progress_bar
from ..data.examples import DataSource
from .retraining import Retrainer, check_influence, check_retrain, select_tests
from .stats import as_vector, correlation_or_nan

if TYPE_CHECKING:
    from ..engine.scoring import Influence

__all__ = [
    "pearson",
    "spearman",
    "linear_datamodeling_score",
    "LDSResult",
    "draw_subsets",
    "subset_size",
    "per_test_spearman",
]


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_vector("a", a), as_vector("b", b)
    if len(a) != len(b):
        raise InputError(f"`a` and `b` must have the same length. Got lengths {len(a)} and {len(b)}.")
    if len(a) < 2:
        raise InputError(f"`a` and `b` must hold at least 2 points for a correlation. Got {len(a)}.")
    for name, x in (("a", a), ("b", b)):
        if np.all(x == x[0]):
            raise InputError(f"`{name}` is constant (every value is {x[0]!r}): the correlation is undefined.")
    return a, b


def pearson(a: Any, b: Any) -> float:
    """Pearson's correlation coefficient r of two 1-D arrays of the same length (``scipy.stats.pearsonr``).

    Raises :class:`~influencekit.InputError` on different lengths, fewer than 2 points, NaN/inf, or a
    constant input (r is undefined).
    """
    a, b = _pair(a, b)
    return float(scipy.stats.pearsonr(a, b)[0])


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation ρ of two 1-D arrays of the same length (``scipy.stats.spearmanr``; ties get
    average ranks). Raises :class:`~influencekit.InputError` like :func:`pearson`."""
    a, b = _pair(a, b)
    return float(scipy.stats.spearmanr(a, b)[0])


@dataclass(frozen=True)
class LDSResult:
    """The linear datamodeling score: per test point and averaged.

    Attributes:
        mean: the LDS, the mean of ``per_test`` over the test points where it is defined.
        per_test: ``(n_test,)`` Spearman ρ across subsets between predicted and actual test-loss change.
        test_index: ``(n_test,)`` the positions of those test points in the ``test`` data.
        predicted: ``(n_subsets, n_test)`` Σ over the removed points of −I_up,loss/n.
        actual: ``(n_subsets, n_test)`` measured change of the test loss after retraining on the subset
            (NaN in the rows of subsets whose retraining did not converge).
        subsets: ``(n_subsets, n_train)`` bool, True where a training point was *kept*.
        not_converged: subset number -> final ‖∇R‖ of each retraining that did not reach ``tol``; those
            subsets are left out of ``per_test``.
        metadata: solver, damping, convention, tol, alpha, seed, timings.
    """

    mean: float
    per_test: np.ndarray
    test_index: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    subsets: np.ndarray
    not_converged: dict[int, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return self.mean


def _check_lds_arguments(
    influence: Any, *, n_subsets: int, alpha: float, seed: int, tol: float, max_iter: int, retrain: Any
) -> tuple[int, float, int, float, int]:
    """Check the arguments of :func:`linear_datamodeling_score`; return the checked ``n_subsets, alpha, seed, tol,
    max_iter``."""
    check_influence(influence)
    n_subsets = check_int("n_subsets", n_subsets, low=3)
    alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    seed = check_int("seed", seed, low=0)
    tol = check_number("tol", tol, low=0.0)
    max_iter = check_int("max_iter", max_iter, low=1)
    check_retrain(retrain)
    return n_subsets, alpha, seed, tol, max_iter


def per_test_spearman(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``(n_test,)`` Spearman ρ across subsets (rows) of ``predicted`` and ``actual`` ``(n_subsets, n_test)``, per test
    point (column); NaN where undefined (a constant column)."""
    return np.array([correlation_or_nan(spearman, predicted[:, t], actual[:, t]) for t in range(predicted.shape[1])])


def subset_size(alpha: float, n: int) -> int:
    """How many of the ``n`` training points a subset keeps: ``round(alpha * n)``, between 1 and n - 1."""
    keep = int(round(alpha * n))
    if not 1 <= keep <= n - 1:
        raise InputError(
            f"`alpha` must keep between 1 and n - 1 = {n - 1} of the {n} training points. Got alpha={alpha:g}, "
            f"which keeps {keep}."
        )
    return keep


def draw_subsets(n_subsets: int, n: int, keep: int, seed: int) -> np.ndarray:
    """``(n_subsets, n)`` bool, each row True at ``keep`` training points drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    subsets = np.zeros((n_subsets, n), dtype=bool)
    for s in range(n_subsets):
        subsets[s, rng.choice(n, keep, replace=False)] = True
    return subsets


def _retrain_subsets(
    retrainer: Retrainer, subsets: np.ndarray, *, n_test: int, tol: float, strict: bool, progress: bool
) -> tuple[np.ndarray, dict[int, float], dict[int, float]]:
    """Retrain on each subset; return the actual changes (NaN rows where not converged), all ‖∇R‖ and the failures."""
    n_subsets = len(subsets)
    actual = np.full((n_subsets, n_test), np.nan)
    grad_norms: dict[int, float] = {}
    not_converged: dict[int, float] = {}
    bar = progress_bar(total=n_subsets, desc="LDS retraining", enabled=bool(progress))
    for s in range(n_subsets):
        weights = torch.as_tensor(subsets[s], dtype=retrainer.dtype)
        after, grad_norm, converged = retrainer.run(weights)
        grad_norms[s] = grad_norm
        if converged:
            actual[s] = after - retrainer.before
        else:
            not_converged[s] = grad_norm
            if strict:
                bar.close()
                raise NumericalError(
                    f"retraining on subset {s} did not reach ||grad R|| <= tol={tol:g} (got {grad_norm:.3g}). "
                    "Raise `max_iter` or `tol`, compute in float64, or pass strict=False to report it instead."
                )
        bar.update(1)
    bar.close()
    return actual, grad_norms, not_converged


def _lds_metadata(
    score_metadata: dict[str, Any],
    retrainer: Retrainer,
    *,
    alpha: float,
    keep: int,
    n_subsets: int,
    n_used: int,
    seed: int,
    tol: float,
    max_iter: int,
    grad_norms: dict[int, float],
    undefined: list[int],
    start: float,
) -> dict[str, Any]:
    """The LDS result's metadata: the scores', the subsets', the retrainings' and the timing."""
    return {
        **score_metadata,
        "validation": "linear datamodeling score (Park et al. 2023)",
        "alpha": alpha,
        "kept_per_subset": keep,
        "n_subsets": n_subsets,
        "n_subsets_used": n_used,
        "seed": seed,
        "tol": tol,
        "retrain": retrainer.name,
        "retrain_max_iter": max_iter,
        "retrain_curvature": None if retrainer.curvature is None else retrainer.curvature.name,
        "retrain_grad_norms": grad_norms,
        "undefined_test_points": undefined,
        "seconds": time.perf_counter() - start,
    }


def linear_datamodeling_score(
    influence: Influence,
    test: DataSource,
    *,
    test_indices: Any = None,
    n_subsets: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    retrain: Callable[..., Any] | None = None,
    tol: float = 1e-9,
    max_iter: int = 2000,
    strict: bool = False,
    progress: bool = False,
) -> LDSResult:
    """Linear datamodeling score of a fitted :class:`~influencekit.Influence` (Park et al. 2023, TRAK).

    Draws ``n_subsets`` random subsets S of ``round(alpha * n)`` training points (seeded), retrains a copy
    of the model on each (weights 1 on S, 0 elsewhere, warm-started from θ̂, with the same machinery as
    :func:`~influencekit.validation.leave_one_out`), and measures every chosen test point. The prediction
    for a subset is additive in the removed points R = [n] \\ S: Σ_{i∈R} (−I_up,loss(z_i, z_test)/n).
    LDS(z_test) is the Spearman correlation across subsets of predicted and actual test-loss change; the
    result's ``mean`` averages it over test points. The user's model is never modified.

    Args:
        influence: a fitted :class:`~influencekit.Influence`.
        test: the test data (any form ``Influence.scores`` accepts).
        test_indices: positions in ``test`` to score; ``None`` means all of them (measuring a test point
            is cheap, retraining is what costs: one per subset).
        n_subsets: how many subsets (retrainings), at least 3.
        alpha: the fraction of the training set each subset keeps, in (0, 1).
        seed: seeds the subsets.
        retrain: ``None`` for :func:`~influencekit.fit_lbfgs` (started with chord-Newton steps on the
            influence's H + δI when its solver is dense), or ``retrain(task, train, weights) -> None`` (see
            :func:`~influencekit.validation.leave_one_out` for its contract).
        tol: a retraining counts as converged when ‖∇R_S(θ)‖ ≤ tol; the others are reported in
            ``not_converged`` and left out (warned with :class:`~influencekit.ConvergenceWarning`).
        max_iter: L-BFGS iterations per retraining (the default trainer only).
        strict: raise :class:`~influencekit.NumericalError` at the first retraining that does not converge.
        progress: show a progress bar over the retrainings.
    """
    start = time.perf_counter()
    n_subsets, alpha, seed, tol, max_iter = _check_lds_arguments(
        influence, n_subsets=n_subsets, alpha=alpha, seed=seed, tol=tol, max_iter=max_iter, retrain=retrain
    )
    n = influence.engine.n_train
    keep = subset_size(alpha, n)
    tests = select_tests(influence.engine, test, test_indices)
    scores = influence.scores(tests.raw_batch)
    pred_loo = scores.predicted_loo_change().detach().cpu().double().numpy()  # (n_test, n_train)
    subsets = draw_subsets(n_subsets, n, keep, seed)
    predicted = (~subsets).astype(np.float64) @ pred_loo.T  # (n_subsets, n_test)

    retrainer = Retrainer(influence, tests.batch, retrain=retrain, tol=tol, max_iter=max_iter)
    actual, grad_norms, not_converged = _retrain_subsets(
        retrainer, subsets, n_test=len(tests.indices), tol=tol, strict=strict, progress=progress
    )
    if not_converged:
        warnings.warn(
            f"{len(not_converged)} of {n_subsets} LDS retrainings did not reach ||grad R|| <= tol={tol:g} (subsets "
            f"{sorted(not_converged)[:10]}; worst {max(not_converged.values()):.3g}); they are left out of the score "
            "and listed in `result.not_converged`. Raise `max_iter` or `tol`, or compute in float64.",
            ConvergenceWarning,
            stacklevel=2,
        )

    ok = ~np.isnan(actual[:, 0])  # the converged subsets
    per_test = per_test_spearman(predicted[ok], actual[ok])
    finite = np.isfinite(per_test)
    mean = float(per_test[finite].mean()) if finite.any() else float("nan")
    metadata = _lds_metadata(
        scores.metadata,
        retrainer,
        alpha=alpha,
        keep=keep,
        n_subsets=n_subsets,
        n_used=int(ok.sum()),
        seed=seed,
        tol=tol,
        max_iter=max_iter,
        grad_norms=grad_norms,
        undefined=tests.indices[~finite].tolist(),
        start=start,
    )
    for arr in (per_test, tests.indices, predicted, actual, subsets):
        arr.setflags(write=False)
    return LDSResult(mean, per_test, tests.indices, predicted, actual, subsets, not_converged, metadata)
