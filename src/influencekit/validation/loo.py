"""Leave-one-out retraining against the influence prediction (Koh & Liang 2017, Section 2 and Figure 2).

For a test point z_test and a training point z_i the influence prediction of removing z_i is
(docs/conventions.md)::

    predicted = −I_up,loss(z_i, z_test) / n
    actual    = m(z_test, θ̂₋ᵢ) − m(z_test, θ̂),   θ̂₋ᵢ = argmin (1/(n−1)) Σ_{j≠i} L(z_j, θ)

with m the task's ``measurement`` (the test loss by default). θ̂₋ᵢ is found by retraining a *copy* of the
model with weight 0 on z_i, warm-started from θ̂ (:func:`~influencekit.fit_lbfgs` by default). One
retraining serves every chosen test point. Retrainings can be cached on disk, one small file per removed
training point, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int
from ..core.errors import ConvergenceWarning, InputError
from ..core.folders import fingerprint
from ..data.examples import DataSource
from ..engine.scoring import Influence
from .metrics import pearson, spearman
from .retraining import (
    CONTROL,
    Retrainer,
    RetrainFn,
    RetrainingCache,
    Retrainings,
    RetrainSettings,
    SelectedTests,
    StepRetrain,
    check_resolution,
    check_retrain_settings,
    index_array,
    select_tests,
    warn_if_round_off,
)
from .stats import correlation_or_nan

__all__ = ["leave_one_out", "LOOResult", "StepRetrain"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class LOOResult:
    """Predicted against actual leave-one-out change of the test measurement, one entry per (test, train) pair.

    Attributes:
        predicted: ``(n_pairs,)`` −I_up,loss/n.
        actual: ``(n_pairs,)`` measurement after retraining without the training point minus before.
        test_index: ``(n_pairs,)`` position of the pair's test point in the ``test`` data.
        train_index: ``(n_pairs,)`` the removed training point.
        pearson: Pearson r of ``predicted`` and ``actual`` over all pairs (NaN if undefined).
        spearman: Spearman ρ over all pairs (NaN if undefined).
        per_test: test index -> Pearson r over that test point's pairs.
        per_test_spearman: test index -> Spearman ρ over that test point's pairs.
        not_converged: removed training index -> final ‖∇R₋ᵢ‖ of each retraining that did not reach ``tol``.
            Their pairs are *not* in ``predicted``/``actual`` or the correlations.
        metadata: solver, damping, convention, task, tol, the trainer, the selection recipe, the final
            ‖∇R₋ᵢ‖ of every retraining, how many came from the cache, timings.
    """

    predicted: np.ndarray
    actual: np.ndarray
    test_index: np.ndarray
    train_index: np.ndarray
    pearson: float
    spearman: float
    per_test: dict[int, float]
    per_test_spearman: dict[int, float]
    not_converged: dict[int, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.predicted)

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
        """Scatter of actual against predicted change (the paper's Figure 2); see :func:`plot_loo`.

        Returns the matplotlib ``Figure``; writes a PNG when ``path`` is given.
        """
        from .plot import plot_loo

        return plot_loo(self.predicted, self.actual, test_index=self.test_index, path=path, title=title)


# ------------------------------------------------------------------------------------------ removals
_CONTROL = CONTROL  # the job index of the no-removal control run


def _weights(i: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    weights = torch.ones(n, dtype=dtype)
    if i != _CONTROL:
        weights[i] = 0.0
    return weights


# ------------------------------------------------------------------------------ steps of leave_one_out
@dataclass(frozen=True)
class _Plan:
    """Which training points to remove for which test point, and the prediction for every pair."""

    scores: Any  # the InfluenceScores of the chosen test points (their metadata goes into the result)
    pred_loo: np.ndarray  # (n_test, n_train) −I_up,loss/n
    selection: list[np.ndarray]  # per chosen test point: the training points whose removal is checked
    removals: list[int]  # the distinct removed training points, sorted
    recipe: dict[str, Any]  # how they were chosen (``train_indices``, or ``top_k``/``n_random``/``seed``)


def _plan_removals(
    influence: Influence, tests: SelectedTests, *, train_indices: Any, top_k: int, n_random: int, seed: int
) -> _Plan:
    """Check the selection arguments, predict every pair and choose the (test, train) pairs to retrain."""
    n = influence.engine.n_train
    if train_indices is not None:
        chosen = index_array("train_indices", train_indices, n, "training")
        recipe: dict[str, Any] = {"train_indices": chosen.tolist()}
    else:
        top_k = check_int("top_k", top_k, low=0, high=n)
        n_random = check_int("n_random", n_random, low=0, high=n)
        if top_k + n_random == 0 or top_k + n_random > n:
            raise InputError(
                f"`top_k` + `n_random` must be between 1 and n_train = {n}. Got top_k={top_k}, n_random={n_random}."
            )
        recipe = {"top_k": top_k, "n_random": n_random, "seed": seed}
    scores = influence.scores(tests.raw_batch)
    pred_loo = scores.predicted_loo_change().detach().cpu().to(torch.float64).numpy()  # (n_test, n_train)
    if train_indices is not None:
        selection = [chosen for _ in tests.indices]
    else:
        selection = _recipe_selection(pred_loo, top_k=top_k, n_random=n_random, seed=seed)
    removals = sorted({int(i) for sel in selection for i in sel})
    return _Plan(scores, pred_loo, selection, removals, recipe)


def _recipe_selection(pred_loo: np.ndarray, *, top_k: int, n_random: int, seed: int) -> list[np.ndarray]:
    """The paper's recipe, per test point: its ``top_k`` by |prediction| plus ``n_random`` others (seeded)."""
    n = pred_loo.shape[1]
    rng = np.random.default_rng(seed)
    selection = []
    for row in range(len(pred_loo)):
        top = np.argsort(-np.abs(pred_loo[row]), kind="stable")[:top_k]
        rest = np.setdiff1d(np.arange(n), top)
        selection.append(np.concatenate([top, rng.choice(rest, n_random, replace=False)]).astype(np.int64))
    return selection


def _cache_config(
    influence: Influence, tests: SelectedTests, retrainer: Retrainer, settings: RetrainSettings
) -> dict[str, Any]:
    """The configuration a cache folder of retrainings belongs to (its ``manifest.json``)."""
    return influence.engine.provenance.manifest(
        "influencekit leave-one-out retraining",
        ("n_train", "task"),
        test_indices=tests.indices.tolist(),
        test_fingerprint=tests.fingerprint,
        theta_fingerprint=fingerprint(retrainer.theta_hat),
        n_params=retrainer.layout.n,
        dtype=str(retrainer.dtype),
        tol=settings.tol,
        measurement=type(influence.task).measurement.__qualname__,
        retrain=retrainer.name,
        drift_control=settings.control,
    )


def _prepare(
    influence: Influence,
    tests: SelectedTests,
    plan: _Plan,
    settings: RetrainSettings,
    cache_dir: str | os.PathLike | None,
) -> Retrainings:
    """Set up the retrainer (refusing a run whose changes its dtype cannot resolve) and the cache, take what the cache
    holds and list the retrainings left to run."""
    retrainer = Retrainer(
        influence, tests.batch, retrain=settings.retrain, tol=settings.tol, max_iter=settings.max_iter
    )
    chosen = (
        np.concatenate([plan.pred_loo[r, sel] for r, sel in enumerate(plan.selection)])
        if plan.selection
        else np.zeros(0)
    )
    check_resolution(retrainer, chosen, tol=settings.tol, what="leave-one-out retraining")
    cache = None
    if cache_dir is not None:
        cache = RetrainingCache(
            cache_dir, _cache_config(influence, tests, retrainer, settings), prefix="loo", what="leave-one-out results"
        )
    runs = Retrainings(
        retrainer,
        cache,
        settings,
        weights_of=functools.partial(_weights, n=influence.engine.n_train, dtype=retrainer.dtype),
        describe=lambda i: f"retraining without training point {i}",
        desc="leave-one-out retraining",
    )
    runs.load(plan.removals, len(tests.indices))
    return runs


def _finish(runs: Retrainings, n_removed: int) -> None:
    """Require the control run when there is one and warn about the retrainings that did not converge.

    Called from :func:`leave_one_out` itself: the warning's ``stacklevel`` names its caller.
    """
    runs.require_control()
    not_converged = runs.not_converged
    not_converged.pop(_CONTROL, None)
    if not_converged:
        worst = max(not_converged.values())
        warnings.warn(
            f"{len(not_converged)} of {n_removed} leave-one-out retrainings did not reach ||grad R|| <= "
            f"tol={runs.settings.tol:g} "
            f"(training points {sorted(not_converged)[:10]}{' ...' if len(not_converged) > 10 else ''}; worst "
            f"{worst:.3g}): their pairs are left out of `predicted`, `actual` and the correlations and listed in "
            "`result.not_converged`. Raise `max_iter` or `tol`, or compute in float64.",
            ConvergenceWarning,
            stacklevel=3,
        )


def _assemble_result(
    influence: Influence,
    tests: SelectedTests,
    plan: _Plan,
    runs: Retrainings,
    *,
    cache_dir: str | os.PathLike | None,
    start: float,
) -> LOOResult:
    """The :class:`LOOResult` of the converged retrainings' (test, train) pairs."""
    after, baseline = runs.after, runs.baseline
    rows = [(row, int(i)) for row, sel in enumerate(plan.selection) for i in sel if int(i) in after]
    row_of = np.array([r for r, _ in rows], dtype=np.int64)
    train_index = np.array([i for _, i in rows], dtype=np.int64)
    test_index = tests.indices[row_of] if rows else np.zeros(0, dtype=np.int64)
    predicted = plan.pred_loo[row_of, train_index] if rows else np.zeros(0)
    actual = np.array([after[i][r] - baseline[r] for r, i in rows], dtype=np.float64)
    warn_if_round_off(runs.retrainer, actual, predicted, what="leave-one-out")
    per_test = {
        int(t): correlation_or_nan(pearson, predicted[row_of == r], actual[row_of == r])
        for r, t in enumerate(tests.indices)
    }
    per_test_s = {
        int(t): correlation_or_nan(spearman, predicted[row_of == r], actual[row_of == r])
        for r, t in enumerate(tests.indices)
    }
    metadata = _result_metadata(influence, plan, runs, cache_dir=cache_dir, start=start)
    for arr in (predicted, actual, test_index, train_index):
        arr.setflags(write=False)
    return LOOResult(
        predicted=predicted,
        actual=actual,
        test_index=test_index,
        train_index=train_index,
        pearson=correlation_or_nan(pearson, predicted, actual),
        spearman=correlation_or_nan(spearman, predicted, actual),
        per_test=per_test,
        per_test_spearman=per_test_s,
        not_converged=runs.not_converged,
        metadata=metadata,
    )


def _result_metadata(
    influence: Influence, plan: _Plan, runs: Retrainings, *, cache_dir: str | os.PathLike | None, start: float
) -> dict[str, Any]:
    """The result's metadata: the scores', the validation's settings, the retrainings' counts and timings."""
    retrainer, settings = runs.retrainer, runs.settings
    control = settings.control
    return {
        **plan.scores.metadata,
        "validation": "leave-one-out retraining (Koh & Liang 2017, Figure 2)",
        "measurement": type(influence.task).measurement.__qualname__,
        "n_train": influence.engine.n_train,
        "tol": settings.tol,
        "retrain": retrainer.name,
        "retrain_max_iter": settings.max_iter,
        "retrain_curvature": None if retrainer.curvature is None else retrainer.curvature.name,
        **plan.recipe,
        "n_removed": len(plan.removals),
        "n_retrained": len([i for i in runs.jobs if i != _CONTROL]),
        "n_from_cache": runs.from_cache,
        "retrain_grad_norms": {i: runs.grad_norms[i] for i in plan.removals},
        "drift_control": control,
        "drift": (runs.after[_CONTROL] - retrainer.before).tolist() if control else None,
        "workers": settings.workers,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------- main
def leave_one_out(
    influence: Influence,
    test: DataSource,
    *,
    test_indices: Any = None,
    train_indices: Any = None,
    top_k: int = 30,
    n_random: int = 20,
    seed: int = 0,
    retrain: RetrainFn | None = None,
    tol: float = 1e-9,
    max_iter: int = 2000,
    strict: bool = False,
    control: bool | None = None,
    workers: int = 1,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> LOOResult:
    """Compare −I_up,loss/n with actual leave-one-out retraining (Koh & Liang 2017, Figure 2).

    For each chosen test point the training points to remove are, by default, its ``top_k`` by |influence|
    plus ``n_random`` others drawn at random (seeded), the paper's recipe. Each distinct training point is
    removed once: a copy of the model is retrained without it, warm-started from θ̂, and *every* chosen test
    point is measured on it; the result keeps the (test, train) pairs that were chosen. The user's model is
    never modified.

    Args:
        influence: a fitted :class:`~influencekit.Influence`; its task, training data, solver and damping
            give the prediction, and its training data the retraining.
        test: the test data (any form ``Influence.scores`` accepts).
        test_indices: positions in ``test`` to check; ``None`` means all (each costs nothing extra to
            measure, but brings its own ``top_k + n_random`` removals).
        train_indices: the training points to remove for every chosen test point, instead of the recipe.
        top_k, n_random, seed: the default recipe (ignored with ``train_indices``).
        retrain: ``None`` retrains with ``ik.fit_lbfgs(task, train, weights=w, tol=tol, max_iter=max_iter)``,
            starting with chord-Newton steps on the influence's own factorised H + δI when its solver is dense
            (``"exact"``: ``curvature=influence.engine.solver``), which makes one retraining cost a few gradients.
            Otherwise ``retrain(task, train, weights) -> None``: ``task`` is a private copy of your task whose
            selected parameters hold θ̂, ``train`` is the training data as given to ``Influence``, ``weights``
            an ``(n,)`` float tensor with 0 at the removed point and 1 elsewhere. It must minimise
            Σ wᵢ L(zᵢ, θ) / Σ wᵢ and leave the minimiser in the task's selected parameters **in place**
            (same shapes, dtypes, devices), returning None — its convergence is then checked here,
            ‖∇R₋ᵢ‖ ≤ tol — or a :class:`~influencekit.TrainReport` whose ``converged`` says whether it
            reached its own criterion (a dual gap for a non-smooth loss, a step budget). For a non-convex
            model pass ``StepRetrain(steps=..., lr=...)``: a fixed budget of Adam/SGD steps from θ̂,
            measured against a control run (``control``).
        tol: a retraining counts as converged when ‖∇R₋ᵢ(θ)‖ ≤ tol. The others are left out of the
            comparison, listed in ``not_converged`` and warned about (:class:`~influencekit.ConvergenceWarning`).
        max_iter: L-BFGS iterations per retraining (the default trainer only).
        strict: raise :class:`~influencekit.NumericalError` at the first retraining that does not converge.
        control: also retrain once with nothing removed and measure each change against that control run
            instead of θ̂, subtracting the drift the trainer causes by itself. ``None`` (default): on for a
            fixed-budget trainer (:class:`StepRetrain`, the non-convex recipe), off otherwise (a trainer that
            converges to the minimum has no drift: its control run would return θ̂).
        workers: retrain in this many forked worker processes (Linux/macOS ``fork``), each handed whole
            retrainings; results are cached and counted as each finishes. Helps when one retraining cannot
            use all cores (small models); ``1`` (default) retrains in this process.
        threads: torch threads per worker; default ``torch.get_num_threads() // workers`` (at least 1).
        cache_dir: a folder for one ``loo-<train index>.npz`` file per finished retraining plus a
            ``manifest.json`` of the configuration (n_train, test points and their fingerprint, tol, a
            fingerprint of θ̂, the task, the trainer). A rerun with the same configuration only retrains
            what is missing; a different configuration in the same folder is refused. Retrainings that did
            not converge are not cached.
        progress: show a progress bar over the retrainings.

    Returns:
        :class:`LOOResult` with one entry per (test, train) pair of converged retrainings.
    """
    start = time.perf_counter()
    settings = check_retrain_settings(
        influence,
        tol=tol,
        max_iter=max_iter,
        seed=seed,
        retrain=retrain,
        control=control,
        strict=strict,
        workers=workers,
        threads=threads,
    )
    tests = select_tests(influence.engine, test, test_indices)
    plan = _plan_removals(
        influence, tests, train_indices=train_indices, top_k=top_k, n_random=n_random, seed=settings.seed
    )
    runs = _prepare(influence, tests, plan, settings, cache_dir)
    runs.run(progress=progress)
    _finish(runs, len(plan.removals))
    return _assemble_result(influence, tests, plan, runs, cache_dir=cache_dir, start=start)
