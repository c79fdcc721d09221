"""Retraining machinery shared by leave-one-out (:mod:`.loo`) and the linear datamodeling score (:mod:`.metrics`).

- :class:`StepRetrain`: a fixed budget of optimiser steps from θ̂, the retrainer of a non-convex model;
- :func:`check_influence`, :func:`check_retrain`: argument checks of the validation entry points;
- :func:`select_tests`: the chosen test points, as given, checked and fingerprinted (:class:`SelectedTests`);
- :class:`Retrainer`: retrains a private copy of the task from θ̂ under example weights and measures the test points;
- :func:`run_retrainings`: a list of retrainings in this process or in forked workers, yielded as each finishes;
- :class:`RetrainingCache`: one small file per finished retraining, under a manifest (resumable runs).

It sits below :mod:`.loo`, :mod:`.groups` and :mod:`.metrics` and imports none of them.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.autodiff import ParamLayout
from ..core.checks import check_indices, check_int, check_number
from ..core.errors import ConvergenceWarning, InputError, InputTypeError, NumericalError, UnsupportedError
from ..core.folders import atomic_write, fingerprint, open_folder
from ..core.progress import progress_bar
from ..core.task import Task
from ..data.examples import Batch, DataSource, Examples, batch_size_of, take
from ..engine.fitted import FittedEngine
from ..engine.scoring import Influence
from ..engine.training import TrainReport, fit_lbfgs, fit_steps, objective_and_grad

__all__ = [
    "RetrainFn",
    "StepRetrain",
    "check_influence",
    "check_retrain",
    "index_array",
    "SelectedTests",
    "select_tests",
    "Retrainer",
    "CONTROL",
    "run_retrainings",
    "RetrainingCache",
    "RetrainSettings",
    "check_retrain_settings",
    "check_resolution",
    "warn_if_round_off",
    "Retrainings",
]

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

    def __call__(self, task: Task, train: DataSource, weights: torch.Tensor) -> TrainReport:
        return fit_steps(
            task,
            train,
            steps=self.steps,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            batch_size=self.batch_size,
            seed=self.seed,
            weights=weights,
        )


# ------------------------------------------------------------------------------------------ checks
def check_influence(influence: Any) -> None:
    """Refuse anything but a fitted :class:`~influencekit.Influence`."""
    if not isinstance(influence, Influence):
        raise InputTypeError(
            "`influence` must be a fitted ik.Influence (ik.Influence(task, train).fit()). Got "
            f"{type(influence).__name__}."
        )
    influence.check_fitted()


def check_retrain(retrain: Any) -> None:
    """Refuse a ``retrain`` that is neither None nor callable."""
    if retrain is not None and not callable(retrain):
        raise InputTypeError(
            f"`retrain` must be None or a callable retrain(task, train, weights) -> None. Got {type(retrain).__name__}."
        )


def index_array(name: str, idx: Any, n: int, what: str) -> np.ndarray:
    """Distinct indices into ``n`` ``what`` points as an int64 array (checked as ``name``)."""
    return np.asarray(check_indices(name, idx, n, what=what, unique=True), dtype=np.int64)


# ------------------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class SelectedTests:
    """The chosen test points, in the forms the validation needs."""

    indices: np.ndarray  # positions in the test data
    raw_batch: Any  # the examples as the user gave them (for Influence.scores)
    batch: Batch  # checked and moved to the model's dtype and device (for measurements)
    fingerprint: str


def select_tests(engine: FittedEngine, test: DataSource, test_indices: Any) -> SelectedTests:
    """The test points at ``test_indices`` of ``test`` (all of them for ``None``)."""
    data = test if isinstance(test, Examples) else Examples(test, name="test")
    n = len(data)
    indices = (
        np.arange(n, dtype=np.int64) if test_indices is None else index_array("test_indices", test_indices, n, "test")
    )
    raw = data.batch(indices.tolist())
    layout = engine.layout
    batch = take(data, indices.tolist(), dtype=layout.dtype, device=layout.device, check=engine.task.check_batch)
    return SelectedTests(indices, raw, batch, fingerprint(batch))


# ------------------------------------------------------------------------------------------ retraining
def _describe_callable(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


class Retrainer:
    """Retrains a private copy of the task from θ̂ under given example weights and measures the test points.

    The user's model is never touched: the copy is reset to θ̂ (its full ``state_dict``) before each
    retraining. Convergence means ‖∇R_w(θ)‖ ≤ tol for R_w(θ) = Σ w_i L(z_i, θ) / Σ w_i.
    """

    def __init__(
        self,
        influence: Influence,
        test_batch: Any,
        *,
        retrain: RetrainFn | None,
        tol: float,
        max_iter: int,
        newton_start: bool = False,
    ) -> None:
        check_retrain(retrain)
        self.influence = influence
        self.engine = engine = influence.engine
        self.source = influence.task
        self.work = copy.deepcopy(influence.task)
        self.snapshot = copy.deepcopy(self.work.model.state_dict())
        self.theta_hat = {k: v.detach().clone() for k, v in engine.params.items()}
        self.layout: ParamLayout = engine.layout
        self.dtype = self.layout.dtype
        self.test_batch = test_batch
        self.retrain = retrain
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = engine.chunks.hvp  # fit_lbfgs's Newton polish streams HVPs in chunks of this size
        self.grad_batch_size = engine.chunks.grad
        self.name = (
            "influencekit.fit_lbfgs"
            if retrain is None
            else (repr(retrain) if isinstance(retrain, StepRetrain) else _describe_callable(retrain))
        )
        # With a factorised (dense) solver, fit_lbfgs starts with chord-Newton steps on the influence's own
        # (H + δI): from θ̂ they contract at a rate of about ‖I − (H + δI)⁻¹H_w‖ (O(1/n) for one removed point)
        # for one gradient and one cheap solve each, and fit_lbfgs falls back to L-BFGS when they do not. An
        # iterative solver would pay a whole solve per step, more than L-BFGS needs (measured: 3x slower with CG).
        solver = engine.solver
        self.curvature = solver if (retrain is None and solver.capabilities.dense) else None
        # a large removal (a whole group) moves θ̂ far for chord steps: Newton steps on the weighted Hessian first
        self.newton_start = bool(newton_start and retrain is None)
        self.before = self.measure(self.source)

    def measure(self, task: Task) -> np.ndarray:
        with torch.no_grad():
            values = task.measurement(task.params(), self.test_batch)
        values = values.detach()
        n_test = batch_size_of(self.test_batch)
        if values.shape != (n_test,):
            raise InputError(
                f"the task's measurement must return one value per test example, shape ({n_test},). Got "
                f"{tuple(values.shape)}."
            )
        return values.cpu().to(torch.float64).numpy()

    def run(self, weights: torch.Tensor) -> tuple[np.ndarray, float, bool]:
        """Retrain under ``weights`` (n,) from θ̂; return the test measurements after, ‖∇R_w‖ and whether ≤ tol."""
        self.work.model.load_state_dict(self.snapshot)
        if self.retrain is None:
            report = fit_lbfgs(
                self.work,
                self.engine.train,
                weights=weights,
                tol=self.tol,
                max_iter=self.max_iter,
                batch_size=self.batch_size,
                warn=False,
                curvature=self.curvature,
                newton_start=self.newton_start,
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
                raise InputError(
                    f"`retrain` removed the parameter {name!r} from the model; it must update the task's parameters in "
                    "place."
                )
            if p.shape != ref.shape or p.dtype != ref.dtype or p.device != ref.device:
                raise InputError(
                    f"`retrain` must keep the shape, dtype and device of each selected parameter. Got {name!r} with "
                    "shape "
                    f"{tuple(p.shape)}, {p.dtype}, {p.device} after retraining; expected {tuple(ref.shape)}, "
                    f"{ref.dtype}, "
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
        _, grad = objective_and_grad(
            self.work, params, self.engine.train, ParamLayout.of(params), weights, self.grad_batch_size
        )
        return float(grad.norm())


@dataclass(frozen=True)
class RetrainSettings:
    """The checked retraining arguments of :func:`~influencekit.leave_one_out` and
    :func:`~influencekit.validate_groups`."""

    tol: float
    max_iter: int
    seed: int
    retrain: RetrainFn | None
    control: bool
    strict: bool
    workers: int
    threads: int | None


def check_retrain_settings(
    influence: Influence,
    *,
    tol: float,
    max_iter: int,
    seed: int,
    retrain: RetrainFn | None,
    control: bool | None,
    strict: bool,
    workers: int,
    threads: int | None,
) -> RetrainSettings:
    """Check the retraining arguments (before the test data, in the order leave_one_out always checked them)."""
    check_influence(influence)
    tol = check_number("tol", tol, low=0.0)
    max_iter = check_int("max_iter", max_iter, low=1)
    seed = check_int("seed", seed, low=0)
    check_retrain(retrain)
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
    n = influence.engine.n_train
    if n < 2:
        raise InputError(f"retraining without training points needs at least 2 of them. Got {n}.")
    return RetrainSettings(tol, max_iter, seed, retrain, control, strict, workers, threads)


# ------------------------------------------------------------------------------------------ resolution
RESOLUTION_ULPS = 100  # a change must exceed this many units in the last place of the test measurement to be measured


def check_resolution(retrainer: Retrainer, predicted: np.ndarray, *, tol: float, what: str) -> None:
    """Refuse, before any retraining, a validation whose actual changes cannot be measured in the model's dtype.

    Two bounds, both known before the first retraining: (1) the median predicted change must exceed
    ``RESOLUTION_ULPS`` units in the last place of the test measurements (float32 test losses of about 1 cannot show a
    change of 1e-6); (2) the default trainer's ``tol`` must be reachable: ‖∇R‖ cannot fall much below
    eps · (mean per-example gradient norm). Both say to compute in float64 (``model.double()`` and float64 data)."""
    dtype = retrainer.dtype
    eps = float(torch.finfo(dtype).eps)
    pred = np.abs(np.asarray(predicted, dtype=np.float64)).ravel()
    scale = float(np.median(np.abs(retrainer.before))) if len(retrainer.before) else 0.0
    floor = RESOLUTION_ULPS * eps * max(scale, float(torch.finfo(dtype).tiny))
    if len(pred) and float(np.median(pred)) < floor:
        raise InputError(
            f"{what} cannot be measured in {str(dtype).removeprefix('torch.')}: the median predicted change "
            f"{float(np.median(pred)):.3g} is below {RESOLUTION_ULPS} units in the last place of test measurements of "
            "about "
            f"{scale:.3g} ({floor:.3g}), so the retrained changes would be round-off. Compute in float64: "
            "model.double() and "
            "float64 data, then build the Influence again."
        )
    if retrainer.retrain is None:
        engine = retrainer.engine
        sample = engine.gradients.gather(engine.train, list(range(min(engine.n_train, 256))), side="train")
        reachable = 10 * eps * float(sample.norm(dim=1).mean())
        if tol < reachable:
            fix = (
                f"pass tol >= {reachable:.2g}"
                if dtype == torch.float64
                else f"compute in float64 (model.double() and float64 data), or pass tol >= {reachable:.2g} "
                "knowing the "
                "retrained changes are then that coarse"
            )
            raise InputError(
                f"`tol`={tol:g} cannot be reached in {str(dtype).removeprefix('torch.')}: the round-off of ||grad R|| "
                "is about "
                f"{reachable:.2g} (eps times the mean per-example gradient norm, ×10); {fix}."
            )


def warn_if_round_off(retrainer: Retrainer, actual: np.ndarray, predicted: np.ndarray, *, what: str) -> None:
    """Warn (ConvergenceWarning) when the measured changes are at the round-off of the test measurements while the
    predictions are not: the retraining did not move the model (too few steps, too small a learning rate, float32)."""
    eps = float(torch.finfo(retrainer.dtype).eps)
    scale = float(np.median(np.abs(retrainer.before))) if len(retrainer.before) else 0.0
    floor = RESOLUTION_ULPS * eps * scale
    if len(actual) and float(np.median(np.abs(actual))) < floor <= float(np.median(np.abs(predicted))):
        warnings.warn(
            f"the {what} changes are round-off: median |actual| {float(np.median(np.abs(actual))):.3g} is below "
            f"{RESOLUTION_ULPS} "
            f"units in the last place of the test measurements ({floor:.3g}) while the median prediction is "
            f"{float(np.median(np.abs(predicted))):.3g}; the retraining did not move the model. Use more steps or a "
            "larger "
            "learning rate (StepRetrain), or compute in float64; the correlations of this result mean nothing.",
            ConvergenceWarning,
            stacklevel=4,
        )


# ------------------------------------------------------------------------------------------ workers
CONTROL = -1  # the job key of a no-removal control run
_JOBS: tuple[Retrainer, Callable[[Any], torch.Tensor]] | None = None  # set in the parent before forking workers


def _worker_start(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_job(job: Any) -> tuple[Any, np.ndarray, float, bool]:
    assert _JOBS is not None  # set before the fork; internal invariant, not user input
    retrainer, weights_of = _JOBS
    return (job, *retrainer.run(weights_of(job)))


def run_retrainings(
    retrainer: Retrainer,
    jobs: list[Any],
    weights_of: Callable[[Any], torch.Tensor],
    *,
    workers: int,
    threads: int | None,
) -> Iterator[tuple[Any, np.ndarray, float, bool]]:
    """Yield ``(job, measurements, ‖∇R‖, converged)`` for each job, retrained under ``weights_of(job)``, in this
    process or in forked workers.

    Workers are forked copies of this process (the model, data and trainer are inherited, nothing is
    pickled but the results); each runs torch with ``threads`` intra-op threads. Results come back in
    completion order, so the caller can cache each as soon as it is done.
    """
    global _JOBS
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield (job, *retrainer.run(weights_of(job)))
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    per_worker = threads if threads is not None else max(1, torch.get_num_threads() // workers)
    _JOBS = (retrainer, weights_of)
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=mp.get_context("fork"),
        initializer=_worker_start,
        initargs=(per_worker,),
    )
    try:
        futures = [pool.submit(_worker_job, job) for job in jobs]
        for future in cf.as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOBS = None


# ---------------------------------------------------------------------------------------------- cache
class RetrainingCache:
    """One ``<prefix>-<job>.npz`` per finished retraining (measurements after, ‖∇R‖) + ``manifest.json``."""

    def __init__(self, folder: str | os.PathLike, config: dict[str, Any], *, prefix: str, what: str) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.config = open_folder(folder, config, arg="cache_dir", what=what, pattern=f"{prefix}-*.npz")

    def path(self, job: Any) -> Path:
        return self.folder / f"{self.prefix}-{'control' if job == CONTROL else job}.npz"

    def load(self, job: Any, n_test: int) -> tuple[np.ndarray, float] | None:
        path = self.path(job)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                after, grad_norm = np.asarray(z["measurement"], dtype=np.float64), float(z["grad_norm"])
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s); retraining", path, exc)
            return None
        if after.shape != (n_test,) or not np.isfinite(after).all():
            logger.warning(
                "ignoring cache file %s with shape %s (expected (%d,)); retraining", path, after.shape, n_test
            )
            return None
        return after, grad_norm

    def save(self, job: Any, after: np.ndarray, grad_norm: float) -> None:
        atomic_write(self.path(job), lambda f: np.savez(f, measurement=after, grad_norm=np.float64(grad_norm)))


class Retrainings:
    """The retrainings of one validation run: from the cache or run here, recorded as each finishes (shared by
    leave-one-out and group validation; only a job's weights and its name in messages differ).

    ``after`` holds the test measurements of every converged retraining (the control run under ``CONTROL``),
    ``grad_norms`` the final ‖∇R‖ of all of them, ``not_converged`` those above ``tol``.
    """

    def __init__(
        self,
        retrainer: Retrainer,
        cache: RetrainingCache | None,
        settings: RetrainSettings,
        *,
        weights_of: Callable[[Any], torch.Tensor],
        describe: Callable[[Any], str],
        desc: str,
    ) -> None:
        self.retrainer, self.cache, self.settings = retrainer, cache, settings
        self.weights_of, self.describe, self.desc = weights_of, describe, desc
        self.after: dict[Any, np.ndarray] = {}
        self.grad_norms: dict[Any, float] = {}
        self.not_converged: dict[Any, float] = {}
        self.from_cache = 0
        self.jobs: list[Any] = []

    def load(self, removals: list[Any], n_test: int) -> None:
        """Take what the cache holds for ``removals`` (and the control run) and list the retrainings left to run."""
        control = self.settings.control
        if self.cache is not None:
            for job in removals + ([CONTROL] if control else []):
                hit = self.cache.load(job, n_test)
                if hit is not None:
                    self.after[job], self.grad_norms[job] = hit
        self.from_cache = len([j for j in self.after if j != CONTROL])
        self.jobs = ([CONTROL] if control and CONTROL not in self.after else []) + [
            j for j in removals if j not in self.after
        ]

    def record(self, job: Any, values: np.ndarray, grad_norm: float, converged: bool) -> None:
        """Keep (and cache) a converged retraining; note one that did not, or raise in strict mode."""
        self.grad_norms[job] = grad_norm
        if converged:
            self.after[job] = values
            if self.cache is not None:
                self.cache.save(job, values, grad_norm)
            return
        self.not_converged[job] = grad_norm
        if self.settings.strict:
            what = "the control run (no removal)" if job == CONTROL else self.describe(job)
            raise NumericalError(
                f"{what} did not reach ||grad R|| <= tol={self.settings.tol:g} (got {grad_norm:.3g}). Raise `max_iter` "
                "or `tol`, "
                "compute in float64, or pass strict=False to report it in `result.not_converged` instead."
            )

    def run(self, *, progress: bool) -> None:
        """Run the retrainings left, in this process or in forked workers, recording each as it finishes."""
        settings = self.settings
        bar = progress_bar(total=len(self.jobs), desc=self.desc, enabled=bool(progress))
        try:
            for job, values, grad_norm, converged in run_retrainings(
                self.retrainer, self.jobs, self.weights_of, workers=settings.workers, threads=settings.threads
            ):
                self.record(job, values, grad_norm, converged)
                bar.update(1)
        finally:
            bar.close()

    def require_control(self) -> None:
        """Raise when there should be a control run and it did not converge."""
        if self.settings.control and CONTROL not in self.after:
            raise NumericalError(
                "the control retraining (no removal) did not converge (||grad R|| = "
                f"{self.not_converged.get(CONTROL, float('nan')):.3g}); "
                "without it the drift of the trainer cannot be subtracted. Check the trainer's settings."
            )

    @property
    def baseline(self) -> np.ndarray:
        """What each change is measured from: the control run's measurements, or those at θ̂."""
        return self.after[CONTROL] if self.settings.control else self.retrainer.before
