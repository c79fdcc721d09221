"""Group effects against retraining: remove each group, retrain, compare with every order of the prediction.

For a group U and a test point z_test (docs/conventions.md)::

    actual = m(z_test, θ̂₋U) − m(z_test, θ̂),   θ̂₋U = argmin (1/(n − |U|)) Σ_{i∉U} L(z_i, θ)

with m the task's measurement, retrained on a copy of the model with weight 0 on U, warm-started from θ̂ (the
leave-one-out machinery: the same trainers, forked workers and on-disk cache). Koh, Ang, Teo & Liang (2019)
found the first-order prediction well correlated with the actual effect but smaller; the report gives, per
order, Pearson and Spearman over the (group, test) pairs, the slope of actual on predicted through the origin
(1 is unbiased; > 1 underestimates) and the mean absolute error.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.errors import ConvergenceWarning, NumericalError
from ..core.folders import fingerprint
from ..data.examples import DataSource
from ..engine.groups import Groups, check_orders, parse_groups
from ..engine.scoring import Influence
from .metrics import pearson, spearman
from .retraining import (
    CONTROL,
    Retrainer,
    RetrainFn,
    RetrainingCache,
    Retrainings,
    check_resolution,
    check_retrain_settings,
    select_tests,
)
from .stats import correlation_or_nan

__all__ = ["validate_groups", "GroupValidation", "NEWTON_START_PARAMS"]

# up to this many parameters the default trainer adds Newton steps on the weighted dense Hessian (n_params HVPs each)
# where the chord steps stop contracting, before L-BFGS. Measured: the §5.3 groups (128 parameters) 35 s → 0.4 s per
# retraining; Enron1 (1,377 parameters) 1.2 s → 10 s per retraining, where L-BFGS is the cheaper finish
NEWTON_START_PARAMS = 512


@dataclass(frozen=True)
class GroupValidation:
    """Predicted against actual effect of removing each group on each chosen test point.

    Attributes:
        actual: ``(n_groups, n_test)`` measurement after retraining without the group minus before (NaN rows for
            retrainings that did not converge).
        predicted: order (``"1"``, ``"2"``, ``"newton"``) -> ``(n_groups, n_test)`` prediction.
        names, sizes: of the groups.
        test_index: ``(n_test,)`` positions of the chosen test points in ``test``.
        metrics: order -> ``{"pearson", "spearman", "slope", "mae"}`` over the pairs of converged retrainings.
        params_change: order -> ``(n_groups, n_params)`` the predicted parameter change of each removal.
        not_converged: group name -> final ‖∇R₋U‖ of each retraining that did not reach ``tol``.
        metadata: the predictions' metadata, the trainer, timings.
    """

    actual: np.ndarray
    predicted: dict[str, np.ndarray]
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    test_index: np.ndarray
    metrics: dict[str, dict[str, float]]
    params_change: dict[str, torch.Tensor] = field(default_factory=dict)
    not_converged: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per order: its metrics, for printing or a report."""
        return [{"order": order, **values} for order, values in self.metrics.items()]

    def plot(self, path: Any = None, title: str | None = None) -> Any:
        """Actual against predicted change, one panel per order (Koh et al. 2019, Figure 1); the matplotlib Figure."""
        from .plot import plot_groups

        keep = np.isfinite(self.actual).all(axis=1)
        return plot_groups(
            {o: v[keep].ravel() for o, v in self.predicted.items()}, self.actual[keep].ravel(), path=path, title=title
        )


def metrics_of(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman, the slope of actual on predicted through the origin and the mean absolute error."""
    x, y = predicted.ravel(), actual.ravel()
    denom = float(x @ x)
    return {
        "pearson": correlation_or_nan(pearson, x, y),
        "spearman": correlation_or_nan(spearman, x, y),
        "slope": float(x @ y) / denom if denom > 0 else float("nan"),
        "mae": float(np.abs(x - y).mean()) if len(x) else float("nan"),
    }


def _group_weights(job: int, groups: Groups, dtype: torch.dtype) -> torch.Tensor:
    weights = torch.ones(groups.n, dtype=dtype)
    if job != CONTROL:
        weights[torch.as_tensor(groups.members[job])] = 0.0
    return weights


def validate_groups(
    influence: Influence,
    groups: Any,
    test: DataSource,
    *,
    orders: Any = (1, 2, "newton"),
    test_indices: Any = None,
    retrain: RetrainFn | None = None,
    tol: float = 1e-9,
    max_iter: int = 2000,
    strict: bool = False,
    control: bool | None = None,
    workers: int = 1,
    threads: int | None = None,
    cache_dir: Any = None,
    progress: bool = False,
) -> GroupValidation:
    """Retrain without each group and compare the actual change of the test measurements with each order's prediction.

    Args:
        influence: a fitted :class:`~influencekit.Influence`.
        groups: as :meth:`~influencekit.Influence.group_influence` takes them (index arrays, a dict, a boolean mask
            matrix or a label column).
        test: the test data; ``test_indices`` chooses some of its points (all by default).
        orders: the predictions to check, any of 1, 2, ``"newton"``.
        retrain, tol, max_iter, strict, control, workers, threads: as for :func:`~influencekit.leave_one_out` (the
            default trainer is ``fit_lbfgs`` warm-started at θ̂; a fixed-budget :class:`StepRetrain` gets a control run).
        cache_dir: a folder keeping one ``group-<g>.npz`` per finished retraining under a manifest of the
            configuration (groups, test points, θ̂, trainer): a rerun retrains only what is missing.
        progress: progress bars over the retrainings (and the Newton solve).

    Returns:
        :class:`GroupValidation` with the metrics per order and ``.plot()``.
    """
    start = time.perf_counter()
    settings = check_retrain_settings(
        influence,
        tol=tol,
        max_iter=max_iter,
        seed=0,
        retrain=retrain,
        control=control,
        strict=strict,
        workers=workers,
        threads=threads,
    )
    tol, max_iter, control = settings.tol, settings.max_iter, settings.control
    order_names = check_orders(list(orders) if isinstance(orders, (list, tuple)) else orders)
    parsed = parse_groups(groups, influence.engine.n_train)
    tests = select_tests(influence.engine, test, test_indices)
    predictions = influence.group_influence(parsed.mask(), tests.raw_batch, order=list(order_names))
    predicted = {o: r.values.detach().cpu().to(torch.float64).numpy() for o, r in predictions.items()}
    retrainer = Retrainer(
        influence,
        tests.batch,
        retrain=retrain,
        tol=tol,
        max_iter=max_iter,
        newton_start=influence.engine.layout.n <= NEWTON_START_PARAMS,
    )
    check_resolution(retrainer, predicted[order_names[0]], tol=tol, what="group retraining")
    cache = None
    if cache_dir is not None:
        config = influence.engine.provenance.manifest(
            "influencekit group retraining",
            ("n_train", "task"),
            groups=parsed.fingerprint(),
            test_indices=tests.indices.tolist(),
            test_fingerprint=tests.fingerprint,
            theta_fingerprint=fingerprint(retrainer.theta_hat),
            dtype=str(retrainer.dtype),
            tol=tol,
            retrain=retrainer.name,
            drift_control=control,
        )
        cache = RetrainingCache(cache_dir, config, prefix="group", what="group retraining results")
    runs = Retrainings(
        retrainer,
        cache,
        settings,
        weights_of=functools.partial(_group_weights, groups=parsed, dtype=retrainer.dtype),
        describe=lambda g: f"retraining without group {parsed.names[g]!r}",
        desc="group retraining",
    )
    runs.load(list(range(len(parsed.members))), len(tests.indices))
    runs.run(progress=progress)
    runs.require_control()
    after, grad_norms, failed, from_cache, baseline = (
        runs.after,
        runs.grad_norms,
        runs.not_converged,
        runs.from_cache,
        runs.baseline,
    )
    actual = np.full((len(parsed.members), len(tests.indices)), np.nan)
    for g in range(len(parsed.members)):
        if g in after:
            actual[g] = after[g] - baseline
    keep = np.isfinite(actual).all(axis=1)
    if not keep.any():
        raise NumericalError(f"no group's retraining reached ||grad R|| <= tol={tol:g}; raise `max_iter` or `tol`.")
    not_converged = {parsed.names[g]: v for g, v in failed.items() if g != CONTROL}
    if not_converged:
        warnings.warn(
            f"{len(not_converged)} of {len(parsed.members)} group retrainings did not reach ||grad R|| <= tol={tol:g} "
            f"(groups {list(not_converged)[:10]}): they are left out of the metrics.",
            ConvergenceWarning,
            stacklevel=2,
        )
    metrics = {o: metrics_of(v[keep], actual[keep]) for o, v in predicted.items()}
    first = next(iter(predictions.values()))
    metadata = {
        **first.metadata,
        "validation": "group removal retraining (Koh et al. 2019; Basu et al. 2020)",
        "orders": list(order_names),
        "retrain": retrainer.name,
        "tol": tol,
        "retrain_max_iter": max_iter,
        "retrain_grad_norms": {parsed.names[g]: v for g, v in grad_norms.items() if g != CONTROL},
        "n_from_cache": from_cache,
        "drift_control": control,
        "workers": settings.workers,
        "prediction_seconds": {o: r.metadata.get("seconds") for o, r in predictions.items()},
        "seconds": time.perf_counter() - start,
    }
    changes = {o: r.params_change for o, r in predictions.items()}
    return GroupValidation(
        actual, predicted, parsed.names, parsed.sizes, tests.indices, metrics, changes, not_converged, metadata
    )
