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

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..autodiff import ParamLayout
from ..checks import check_indices, check_int, check_number
from ..data.examples import Examples, batch_size_of, take
from ..errors import ConvergenceWarning, InputError, InputTypeError, NumericalError, UnsupportedError
from ..folders import atomic_write, fingerprint, open_folder
from ..progress import progress_bar
from ..scoring import Influence
from ..task import Task
from ..training import TrainReport, _objective_and_grad, fit_lbfgs, fit_steps
from .metrics import _correlation_or_nan, pearson, spearman

__all__ = ["leave_one_out", "LOOResult", "StepRetrain"]

logger = logging.getLogger(__name__)

RetrainFn = Callable[[Task, Any, torch.Tensor], Any]


@dataclass(frozen=True)
class StepRetrain:
    """Retrain a non-convex model with a fixed budget of optimiser steps from θ̂ (:func:`~influencekit.fit_steps`).

    Pass it as ``leave_one_out(..., retrain=StepRetrain(steps=..., lr=...))``. A network is not retrained
    *to* a minimum but run for ``steps`` steps from θ̂, so the optimiser itself moves the test loss even
    without any removal. ``leave_one_out`` therefore runs the same steps once with nothing removed (the
    control) and reports ``actual = m(θ₋ᵢ) − m(θ_control)``, subtracting that drift (the paper's CNN recipe,
    Koh & Liang 2017 §5.1: 30,000 Adam steps from θ̂). Full-batch steps (``batch_size=None``) are
    deterministic; with mini-batches every run draws the same batches (``seed``).

    Attributes:
        steps, lr, optimizer, momentum, batch_size, seed: as in :func:`~influencekit.fit_steps`.
    """

    steps: int = 1000
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    batch_size: int | None = None
    seed: int = 0

    #: a fixed step budget has no end state to converge to; leave_one_out subtracts a control run
    fixed_budget = True

    def __post_init__(self) -> None:
        check_int("steps", self.steps, low=1)
        check_number("lr", self.lr, low=0.0, low_inclusive=False)
        check_number("momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, low=1)
        check_int("seed", self.seed, low=0)
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"`optimizer` must be 'adam' or 'sgd'. Got {self.optimizer!r}.")

    def __call__(self, task: Task, train: Any, weights: torch.Tensor) -> TrainReport:
        return fit_steps(
            task, train, steps=self.steps, lr=self.lr, optimizer=self.optimizer, momentum=self.momentum,
            batch_size=self.batch_size, seed=self.seed, weights=weights,
        )


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


# ------------------------------------------------------------------------------------------ selection
def _check_influence(influence: Any) -> None:
    if not isinstance(influence, Influence):
        raise InputTypeError(
            f"`influence` must be a fitted ik.Influence (ik.Influence(task, train).fit()). Got {type(influence).__name__}."
        )
    influence._require_fitted()


def _check_retrain(retrain: Any) -> None:
    if retrain is not None and not callable(retrain):
        raise InputTypeError(f"`retrain` must be None or a callable retrain(task, train, weights) -> None. Got {type(retrain).__name__}.")


def _index_array(name: str, idx: Any, n: int, what: str) -> np.ndarray:
    return np.asarray(check_indices(name, idx, n, what=what, unique=True), dtype=np.int64)


@dataclass(frozen=True)
class _Tests:
    indices: np.ndarray  # positions in the test data
    raw_batch: Any  # the examples as the user gave them (for Influence.scores)
    batch: Any  # checked and moved to the model's dtype and device (for measurements)
    fingerprint: str


def _select_tests(influence: Influence, test: Any, test_indices: Any) -> _Tests:
    data = test if isinstance(test, Examples) else Examples(test, name="test")
    n = len(data)
    indices = np.arange(n, dtype=np.int64) if test_indices is None else _index_array("test_indices", test_indices, n, "test")
    raw = data.batch(indices.tolist())
    layout = influence.layout_
    batch = take(data, indices.tolist(), dtype=layout.dtype, device=layout.device, check=influence.task.check_batch)
    return _Tests(indices, raw, batch, fingerprint(batch))


# ------------------------------------------------------------------------------------------ retraining
def _describe_callable(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


class _Retrainer:
    """Retrains a private copy of the task from θ̂ under given example weights and measures the test points.

    The user's model is never touched: the copy is reset to θ̂ (its full ``state_dict``) before each
    retraining. Convergence means ‖∇R_w(θ)‖ ≤ tol for R_w(θ) = Σ w_i L(z_i, θ) / Σ w_i.
    """

    def __init__(self, influence: Influence, test_batch: Any, *, retrain: RetrainFn | None, tol: float, max_iter: int) -> None:
        _check_retrain(retrain)
        self.influence = influence
        self.source = influence.task
        self.work = copy.deepcopy(influence.task)
        self.snapshot = copy.deepcopy(self.work.model.state_dict())
        self.theta_hat = {k: v.detach().clone() for k, v in influence.params_.items()}
        self.layout: ParamLayout = influence.layout_
        self.dtype = self.layout.dtype
        self.test_batch = test_batch
        self.retrain = retrain
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = influence.chunks_.hvp  # fit_lbfgs's Newton polish streams HVPs in chunks of this size
        self.grad_batch_size = influence.chunks_.grad
        self.name = "influencekit.fit_lbfgs" if retrain is None else (repr(retrain) if isinstance(retrain, StepRetrain) else _describe_callable(retrain))
        # With a factorised (dense) solver, fit_lbfgs starts with chord-Newton steps on the influence's own
        # (H + δI): from θ̂ they contract at a rate of about ‖I − (H + δI)⁻¹H_w‖ (O(1/n) for one removed point)
        # for one gradient and one cheap solve each, and fit_lbfgs falls back to L-BFGS when they do not. An
        # iterative solver would pay a whole solve per step, more than L-BFGS needs (measured: 3x slower with CG).
        solver = influence.solver_
        self.curvature = solver if (retrain is None and "dense" in getattr(solver, "capabilities", ())) else None
        self.before = self.measure(self.source)

    def measure(self, task: Task) -> np.ndarray:
        with torch.no_grad():
            values = task.measurement(task.params(), self.test_batch)
        values = values.detach()
        n_test = batch_size_of(self.test_batch)
        if values.shape != (n_test,):
            raise InputError(f"the task's measurement must return one value per test example, shape ({n_test},). Got {tuple(values.shape)}.")
        return values.cpu().to(torch.float64).numpy()

    def run(self, weights: torch.Tensor) -> tuple[np.ndarray, float, bool]:
        """Retrain under ``weights`` (n,) from θ̂; return the test measurements after, ‖∇R_w‖ and whether ≤ tol."""
        self.work.model.load_state_dict(self.snapshot)
        if self.retrain is None:
            report = fit_lbfgs(
                self.work, self.influence.train_, weights=weights, tol=self.tol, max_iter=self.max_iter,
                batch_size=self.batch_size, warn=False, curvature=self.curvature,
            )
            grad_norm = report.grad_norm
        else:
            out = self.retrain(self.work, self.influence.train, weights.clone())
            self._check_user_retrain(out)
            if isinstance(out, TrainReport):  # the trainer judged its own convergence (a dual gap, a step budget)
                after = self._measure_after()
                return after, float(out.grad_norm), bool(out.converged)
            grad_norm = self._grad_norm(weights)
            named = dict(self.work.model.named_parameters())
            if grad_norm > self.tol and all(torch.equal(named[k].detach(), v) for k, v in self.theta_hat.items()):
                raise InputError(
                    "`retrain` left the task's parameters at theta-hat: it must retrain the task it is given "
                    "(`task.model`, a copy of your model warm-started at theta-hat) and update its parameters in place."
                )
        return self._measure_after(), grad_norm, grad_norm <= self.tol

    def _measure_after(self) -> np.ndarray:
        after = self.measure(self.work)
        if not np.isfinite(after).all():
            raise NumericalError("the test measurement is not finite after retraining; check the trainer and the data.")
        return after

    def _check_user_retrain(self, out: Any) -> None:
        if out is not None and not isinstance(out, TrainReport):
            raise InputError(
                "`retrain` must update the selected parameters of the task it is given in place and return None. Got a "
                f"{type(out).__name__} back; copy the new values into the task instead, e.g. "
                "`with torch.no_grad(): task.model.weight.copy_(new_weight)`."
            )
        named = dict(self.work.model.named_parameters())
        for name, ref in self.theta_hat.items():
            p = named.get(name)
            if p is None:
                raise InputError(f"`retrain` removed the parameter {name!r} from the model; it must update the task's parameters in place.")
            if p.shape != ref.shape or p.dtype != ref.dtype or p.device != ref.device:
                raise InputError(
                    f"`retrain` must keep the shape, dtype and device of each selected parameter. Got {name!r} with shape "
                    f"{tuple(p.shape)}, {p.dtype}, {p.device} after retraining; expected {tuple(ref.shape)}, {ref.dtype}, "
                    f"{ref.device}."
                )
            if not bool(torch.isfinite(p).all()):
                raise NumericalError(f"`retrain` left NaN/inf values in the parameter {name!r}.")
        if any(not torch.equal(self.source.params()[k], v) for k, v in self.theta_hat.items()):
            raise InputError(
                "`retrain` modified the original model. It must retrain the copy it is given (`task.model`), not a "
                "model it holds a reference to; reload your model's trained parameters before going on."
            )

    def _grad_norm(self, weights: torch.Tensor) -> float:
        """‖∇R_w(θ)‖ at the copy's current parameters, the same quantity fit_lbfgs stops on."""
        params = self.work.params()
        _, grad = _objective_and_grad(self.work, params, self.influence.train_, ParamLayout.of(params), weights, self.grad_batch_size)
        return float(grad.norm())


# ------------------------------------------------------------------------------------------ workers
_CONTROL = -1  # the job index of the no-removal control run
_WORKER: _Retrainer | None = None  # set in the parent before forking worker processes


def _weights(i: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    weights = torch.ones(n, dtype=dtype)
    if i != _CONTROL:
        weights[i] = 0.0
    return weights


def _worker_start(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_job(i: int, n: int) -> tuple[int, np.ndarray, float, bool]:
    assert _WORKER is not None  # set before the fork; internal invariant, not user input
    return (i, *_WORKER.run(_weights(i, n, _WORKER.dtype)))


def _run_jobs(retrainer: _Retrainer, jobs: list[int], n: int, *, workers: int, threads: int | None) -> Any:
    """Yield ``(i, measurements, ‖∇R‖, converged)`` for each job, in this process or in forked workers.

    Workers are forked copies of this process (the model, data and trainer are inherited, nothing is
    pickled but the results); each runs torch with ``threads`` intra-op threads. Results come back in
    completion order, so the caller can cache each as soon as it is done.
    """
    global _WORKER
    if workers == 1 or len(jobs) <= 1:
        for i in jobs:
            yield (i, *retrainer.run(_weights(i, n, retrainer.dtype)))
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    per_worker = threads if threads is not None else max(1, torch.get_num_threads() // workers)
    _WORKER = retrainer
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=mp.get_context("fork"),
        initializer=_worker_start, initargs=(per_worker,),
    )
    try:
        futures = [pool.submit(_worker_job, i, n) for i in jobs]
        for future in cf.as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER = None


# ---------------------------------------------------------------------------------------------- cache
class _Cache:
    """One ``loo-<train index>.npz`` per finished retraining (measurements after, ‖∇R₋ᵢ‖) + ``manifest.json``."""

    def __init__(self, folder: str | os.PathLike, config: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.config = open_folder(folder, config, arg="cache_dir", what="leave-one-out results", pattern="loo-*.npz")

    def path(self, i: int) -> Path:
        return self.folder / ("loo-control.npz" if i == _CONTROL else f"loo-{i}.npz")

    def load(self, i: int, n_test: int) -> tuple[np.ndarray, float] | None:
        path = self.path(i)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                after, grad_norm = np.asarray(z["measurement"], dtype=np.float64), float(z["grad_norm"])
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s); retraining", path, exc)
            return None
        if after.shape != (n_test,) or not np.isfinite(after).all():
            logger.warning("ignoring cache file %s with shape %s (expected (%d,)); retraining", path, after.shape, n_test)
            return None
        return after, grad_norm

    def save(self, i: int, after: np.ndarray, grad_norm: float) -> None:
        atomic_write(self.path(i), lambda f: np.savez(f, measurement=after, grad_norm=np.float64(grad_norm)))


# ----------------------------------------------------------------------------------------------- main
def leave_one_out(
    influence: Influence,
    test: Any,
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
            (``"exact"``: ``curvature=influence.solver_``), which makes one retraining cost a few gradients.
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
    _check_influence(influence)
    tol = check_number("tol", tol, low=0.0)
    max_iter = check_int("max_iter", max_iter, low=1)
    seed = check_int("seed", seed, low=0)
    _check_retrain(retrain)
    if control is None:
        control = bool(getattr(retrain, "fixed_budget", False))
    elif not isinstance(control, bool):
        raise InputTypeError(f"`control` must be True, False or None. Got {control!r}.")
    workers = check_int("workers", workers, low=1)
    if threads is not None:
        threads = check_int("threads", threads, low=1)
    if workers > 1:
        import multiprocessing as mp

        if "fork" not in mp.get_all_start_methods():
            raise UnsupportedError(
                "`workers` > 1 needs the 'fork' start method, which this platform lacks; use workers=1."
            )
    n = len(influence.train_)
    if n < 2:
        raise InputError(f"leave-one-out needs at least 2 training points. Got {n}.")
    tests = _select_tests(influence, test, test_indices)
    if train_indices is not None:
        chosen = _index_array("train_indices", train_indices, n, "training")
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

    # ------------------------------------------------------------------ which (test, train) pairs
    if train_indices is not None:
        selection = [chosen for _ in tests.indices]
    else:
        rng = np.random.default_rng(seed)
        selection = []
        for row in range(len(tests.indices)):
            top = np.argsort(-np.abs(pred_loo[row]), kind="stable")[:top_k]
            rest = np.setdiff1d(np.arange(n), top)
            selection.append(np.concatenate([top, rng.choice(rest, n_random, replace=False)]).astype(np.int64))
    removals = sorted({int(i) for sel in selection for i in sel})

    # ------------------------------------------------------------------ retrain once per removed point
    retrainer = _Retrainer(influence, tests.batch, retrain=retrain, tol=tol, max_iter=max_iter)
    cache = None
    if cache_dir is not None:
        cache = _Cache(cache_dir, {
            "kind": "influencekit leave-one-out retraining",
            "format": 1,
            "n_train": n,
            "test_indices": tests.indices.tolist(),
            "test_fingerprint": tests.fingerprint,
            "theta_fingerprint": fingerprint(retrainer.theta_hat),
            "n_params": retrainer.layout.n,
            "dtype": str(retrainer.dtype),
            "tol": tol,
            "task": influence.task.describe(),
            "measurement": type(influence.task).measurement.__qualname__,
            "retrain": retrainer.name,
            "drift_control": control,
        })
    after: dict[int, np.ndarray] = {}
    grad_norms: dict[int, float] = {}
    not_converged: dict[int, float] = {}
    if cache is not None:
        for i in removals + ([_CONTROL] if control else []):
            hit = cache.load(i, len(tests.indices))
            if hit is not None:
                after[i], grad_norms[i] = hit
    from_cache = len([i for i in after if i != _CONTROL])
    jobs = ([_CONTROL] if control and _CONTROL not in after else []) + [i for i in removals if i not in after]

    def record(i: int, values: np.ndarray, grad_norm: float, converged: bool) -> None:
        grad_norms[i] = grad_norm
        if converged:
            after[i] = values
            if cache is not None:
                cache.save(i, values, grad_norm)
            return
        not_converged[i] = grad_norm
        if strict:
            what = "the control run (no removal)" if i == _CONTROL else f"retraining without training point {i}"
            raise NumericalError(
                f"{what} did not reach ||grad R|| <= tol={tol:g} (got {grad_norm:.3g}). Raise `max_iter` or `tol`, "
                "compute in float64, or pass strict=False to report it in `result.not_converged` instead."
            )

    bar = progress_bar(total=len(jobs), desc="leave-one-out retraining", enabled=bool(progress))
    try:
        for i, values, grad_norm, converged in _run_jobs(retrainer, jobs, n, workers=workers, threads=threads):
            record(i, values, grad_norm, converged)
            bar.update(1)
    finally:
        bar.close()
    if control and _CONTROL not in after:
        raise NumericalError(
            f"the control retraining (no removal) did not converge (||grad R|| = {not_converged.get(_CONTROL, float('nan')):.3g}); "
            "without it the drift of the trainer cannot be subtracted. Check the trainer's settings."
        )
    not_converged.pop(_CONTROL, None)
    if not_converged:
        worst = max(not_converged.values())
        warnings.warn(
            f"{len(not_converged)} of {len(removals)} leave-one-out retrainings did not reach ||grad R|| <= tol={tol:g} "
            f"(training points {sorted(not_converged)[:10]}{' ...' if len(not_converged) > 10 else ''}; worst "
            f"{worst:.3g}): their pairs are left out of `predicted`, `actual` and the correlations and listed in "
            "`result.not_converged`. Raise `max_iter` or `tol`, or compute in float64.",
            ConvergenceWarning,
            stacklevel=2,
        )
    baseline = after[_CONTROL] if control else retrainer.before

    # ------------------------------------------------------------------ pairs and correlations
    rows = [(row, int(i)) for row, sel in enumerate(selection) for i in sel if int(i) in after]
    row_of = np.array([r for r, _ in rows], dtype=np.int64)
    train_index = np.array([i for _, i in rows], dtype=np.int64)
    test_index = tests.indices[row_of] if rows else np.zeros(0, dtype=np.int64)
    predicted = pred_loo[row_of, train_index] if rows else np.zeros(0)
    actual = np.array([after[i][r] - baseline[r] for r, i in rows], dtype=np.float64)
    per_test = {int(t): _correlation_or_nan(pearson, predicted[row_of == r], actual[row_of == r]) for r, t in enumerate(tests.indices)}
    per_test_s = {int(t): _correlation_or_nan(spearman, predicted[row_of == r], actual[row_of == r]) for r, t in enumerate(tests.indices)}
    metadata = {
        **scores.metadata,
        "validation": "leave-one-out retraining (Koh & Liang 2017, Figure 2)",
        "measurement": type(influence.task).measurement.__qualname__,
        "n_train": n,
        "tol": tol,
        "retrain": retrainer.name,
        "retrain_max_iter": max_iter,
        "retrain_curvature": None if retrainer.curvature is None else retrainer.curvature.name,
        **recipe,
        "n_removed": len(removals),
        "n_retrained": len([i for i in jobs if i != _CONTROL]),
        "n_from_cache": from_cache,
        "retrain_grad_norms": {i: grad_norms[i] for i in removals},
        "drift_control": control,
        "drift": (after[_CONTROL] - retrainer.before).tolist() if control else None,
        "workers": workers,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "seconds": time.perf_counter() - start,
    }
    for arr in (predicted, actual, test_index, train_index):
        arr.setflags(write=False)
    return LOOResult(
        predicted=predicted,
        actual=actual,
        test_index=test_index,
        train_index=train_index,
        pearson=_correlation_or_nan(pearson, predicted, actual),
        spearman=_correlation_or_nan(spearman, predicted, actual),
        per_test=per_test,
        per_test_spearman=per_test_s,
        not_converged=not_converged,
        metadata=metadata,
    )
