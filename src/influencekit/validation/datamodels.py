"""The linear datamodeling score with its ground truth built the way the field builds it: models trained from scratch.

:func:`linear_datamodeling_score` retrains the fitted model warm from θ̂ to convergence, which is the right test for
a model at a minimum. A deep network trained the usual way (a few epochs of Adam from a random start) is judged
instead against models trained *from scratch*, with its own recipe, on random subsets of the training set (Park et
al. 2023, TRAK; dattri's and Kronfluence's benchmarks): :func:`subset_outputs` trains them (a callable of the user's:
``train_on_subset(kept_indices, seed) -> (margins, losses)`` on the test points) and keeps each subset's outputs in
a checked file of a folder, so that an interrupted build resumes and a finished one is read back;
:func:`datamodel_score` then scores any attribution matrix against them, with a bootstrap interval over test points.

The prediction for a subset S is additive over the training points left out, R = [n] \\ S, in influencekit's sign
convention (results.CONVENTION): Σ_{i∈R} predicted_loo_change[t, i] = Σ_{i∈R} −I(z_i, z_t)/n. LDS(z_t) is the
Spearman correlation across subsets of that prediction with the output measured after training on S; the score is
its mean over test points.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import check_choice, check_int, check_number
from ..core.errors import InputError, InputTypeError
from ..core.folders import load_array, open_folder, save_array
from ..core.progress import progress_bar
from ..core.results import InfluenceScores
from .metrics import draw_subsets, per_test_spearman, subset_size
from .stats import as_vector

__all__ = ["SubsetOutputs", "DatamodelScore", "HeldOutChoice", "subset_outputs", "datamodel_score", "choose_held_out"]

OUTPUTS = ("margin", "loss")
TrainOnSubset = Callable[[np.ndarray, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SubsetOutputs:
    """The ground truth of a datamodeling score: the test outputs of models trained on random subsets.

    Attributes:
        subsets: ``(n_subsets, n_train)`` bool, True where a training point was kept.
        margins: ``(n_subsets, n_test)`` the correct class's logit minus the log-sum-exp of the others.
        losses: ``(n_subsets, n_test)`` the test losses.
        seconds: ``(n_subsets,)`` the training time of each subset's model (0 where it was read back).
        folder: where the outputs are kept.
    """

    subsets: np.ndarray
    margins: np.ndarray
    losses: np.ndarray
    seconds: np.ndarray
    folder: Path

    def outputs(self, output: str) -> np.ndarray:
        return self.margins if check_choice("output", output, OUTPUTS) == "margin" else self.losses

    def select(self, rows: np.ndarray) -> SubsetOutputs:
        """The ground truth of the subsets ``rows`` only (indices or a boolean mask over the subsets)."""
        rows = np.asarray(rows)
        return SubsetOutputs(self.subsets[rows], self.margins[rows], self.losses[rows], self.seconds[rows], self.folder)


def subset_outputs(
    train_on_subset: TrainOnSubset,
    *,
    n_train: int,
    n_test: int,
    folder: str | Path,
    recipe: dict[str, Any],
    n_subsets: int = 100,
    alpha: float = 0.5,
    seed: int = 0,
    progress: bool = False,
) -> SubsetOutputs:
    """Train one model per random subset (``train_on_subset(kept_indices, seed + 1 + k)`` for subset k) and keep
    its test margins and losses in ``folder`` (``subset-<k>.npy``, checked; a manifest of ``recipe``, the sizes,
    ``alpha`` and ``seed``). Subsets already there are read back, a damaged file is recomputed: an interrupted build
    resumes where it stopped. ``recipe`` describes the training (model, optimiser, epochs, data): another recipe in
    the same folder is refused."""
    n_train, n_test = check_int("n_train", n_train, low=2), check_int("n_test", n_test, low=1)
    n_subsets = check_int("n_subsets", n_subsets, low=3)
    alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    seed = check_int("seed", seed, low=0)
    subsets = draw_subsets(n_subsets, n_train, subset_size(alpha, n_train), seed)
    config = {
        "kind": "influencekit subset outputs",
        "recipe": recipe,
        "n_train": n_train,
        "n_test": n_test,
        "n_subsets": n_subsets,
        "alpha": alpha,
        "seed": seed,
    }
    folder = Path(folder)
    open_folder(folder, config, arg="folder", what="subset outputs", pattern="subset-*.npy")
    outputs = np.empty((n_subsets, 2, n_test))
    seconds = np.zeros(n_subsets)
    bar = progress_bar(total=n_subsets, desc="subset models", enabled=progress)
    for k in range(n_subsets):
        path = folder / f"subset-{k:04d}.npy"
        stored, _ = load_array(path, (2, n_test), np.float64)
        if stored is None:
            start = time.perf_counter()
            margins, losses = train_on_subset(np.flatnonzero(subsets[k]), seed + 1 + k)
            seconds[k] = time.perf_counter() - start
            stored = np.stack([_checked(margins, n_test, "margins"), _checked(losses, n_test, "losses")])
            save_array(path, stored)
        outputs[k] = stored
        bar.update(1)
    bar.close()
    return SubsetOutputs(subsets, outputs[:, 0], outputs[:, 1], seconds, folder)


def _checked(values: torch.Tensor, n_test: int, what: str) -> np.ndarray:
    """``train_on_subset``'s ``what`` as a finite float64 vector of the ``n_test`` test points."""
    array = as_vector(f"train_on_subset's {what}", values)
    if array.shape != (n_test,):
        raise InputError(f"`train_on_subset` must return {what} for the {n_test} test points. Got {len(array)}.")
    return array


@dataclass(frozen=True)
class DatamodelScore:
    """The LDS of one attribution matrix against :class:`SubsetOutputs`.

    Attributes:
        mean: the LDS, the mean over test points of ``per_test``.
        low, high: the 95% bootstrap interval of ``mean`` (test points resampled).
        per_test: ``(n_test,)`` Spearman ρ across subsets (NaN where undefined: a constant prediction or output).
        output: ``"margin"`` or ``"loss"``.
        metadata: the bootstrap's size and seed, the subsets used.
    """

    mean: float
    low: float
    high: float
    per_test: np.ndarray
    output: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return self.mean

    def __str__(self) -> str:
        return f"LDS {self.mean:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.output})"


def datamodel_score(
    predicted_loo: Any, truth: SubsetOutputs, *, output: str = "margin", bootstrap: int = 1000, seed: int = 0
) -> DatamodelScore:
    """The LDS of ``predicted_loo`` ``(n_test, n_train)`` — the predicted change of each test output when each
    training point is removed (``InfluenceScores.predicted_loo_change()``, or any attribution in that sign
    convention) — against ``truth``'s ``output`` (``"margin"`` or ``"loss"``; the attribution must predict the
    same output). The interval: ``bootstrap`` resamples of the test points (seeded)."""
    output = check_choice("output", output, OUTPUTS)
    bootstrap = check_int("bootstrap", bootstrap, low=1)
    if isinstance(predicted_loo, InfluenceScores):
        raise InputTypeError(
            "`predicted_loo` must be a predicted leave-one-out change: pass scores.predicted_loo_change(), not the "
            "InfluenceScores themselves (their sign is the opposite)."
        )
    pred = torch.as_tensor(predicted_loo).detach().cpu().double().numpy()
    actual = truth.outputs(output)
    n_subsets, n_train = truth.subsets.shape
    if pred.shape != (actual.shape[1], n_train):
        raise InputError(
            f"`predicted_loo` must have shape (n_test, n_train) = ({actual.shape[1]}, {n_train}). Got {pred.shape}."
        )
    if not np.isfinite(pred).all():
        raise InputError("`predicted_loo` holds NaN/inf values.")
    predicted = (~truth.subsets).astype(np.float64) @ pred.T  # (n_subsets, n_test): Σ over the removed points
    per_test = per_test_spearman(predicted, actual)
    finite = per_test[np.isfinite(per_test)]
    if not len(finite):
        raise InputError("the LDS is undefined at every test point (constant predictions or outputs).")
    rng = np.random.default_rng(seed)
    means = rng.choice(finite, size=(bootstrap, len(finite)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    per_test.setflags(write=False)
    meta = {"bootstrap": bootstrap, "seed": seed, "n_subsets": n_subsets, "n_defined": len(finite)}
    return DatamodelScore(float(finite.mean()), float(low), float(high), per_test, output, meta)


@dataclass(frozen=True)
class HeldOutChoice:
    """A setting chosen by the LDS on some subsets and scored on the others (:func:`choose_held_out`).

    Attributes:
        best: the candidate with the highest LDS on the selection subsets.
        selection: per candidate (in the order given), its LDS on the selection subsets.
        held_out: per candidate, its :class:`DatamodelScore` on the held-out subsets (the chosen one's is the figure
            to report; the others show what choosing cost or gained).
        predicted_loo: the chosen candidate's ``(n_test, n_train)`` prediction.
        selection_subsets, held_out_subsets: the subsets' indices in the ground truth.
    """

    best: Any
    selection: dict[Any, float]
    held_out: dict[Any, DatamodelScore]
    predicted_loo: np.ndarray
    selection_subsets: np.ndarray
    held_out_subsets: np.ndarray

    @property
    def score(self) -> DatamodelScore:
        """The chosen candidate's LDS on the held-out subsets."""
        return self.held_out[self.best]

    def __str__(self) -> str:
        tried = ", ".join(f"{c!r}: {v:.3f}" for c, v in self.selection.items())
        return f"chose {self.best!r} (selection LDS {tried}); held out: {self.score}"


def choose_held_out(
    candidates: Any,
    predicted_loo: Callable[[Any], Any],
    truth: SubsetOutputs,
    *,
    selection: float = 0.5,
    output: str = "margin",
    seed: int = 0,
) -> HeldOutChoice:
    """Choose a setting of an attribution method (a damping, a projection size, a number of models) by the LDS on a
    random ``selection`` fraction of ``truth``'s subsets, and score every candidate on the remaining, held-out ones:
    the chosen candidate's held-out LDS is a figure its choice has not seen. ``predicted_loo(candidate)`` returns
    the ``(n_test, n_train)`` predicted leave-one-out change (e.g. ``scores.predicted_loo_change()`` of an
    ``Influence`` fitted with that damping); it runs once per candidate."""
    candidates = list(candidates)
    if not candidates:
        raise InputError("`candidates` is empty: give at least one setting to choose from.")
    selection = check_number("selection", selection, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    n_subsets = truth.subsets.shape[0]
    n_select = int(round(selection * n_subsets))
    if n_select < 3 or n_subsets - n_select < 3:
        raise InputError(
            f"`selection`={selection:g} of {n_subsets} subsets leaves {n_select} to choose on and "
            f"{n_subsets - n_select} to score on; each needs at least 3 (build more subsets)."
        )
    order = np.random.default_rng(check_int("seed", seed, low=0)).permutation(n_subsets)
    chosen_rows, held_rows = np.sort(order[:n_select]), np.sort(order[n_select:])
    choose_on, score_on = truth.select(chosen_rows), truth.select(held_rows)
    on_selection, held_out = {}, {}
    best, kept = None, None  # only the leading candidate's (n_test, n_train) prediction is held
    for candidate in candidates:
        prediction = torch.as_tensor(predicted_loo(candidate)).detach().cpu().double().numpy()
        on_selection[candidate] = datamodel_score(prediction, choose_on, output=output).mean
        held_out[candidate] = datamodel_score(prediction, score_on, output=output)
        if kept is None or on_selection[candidate] > on_selection[best]:
            best, kept = candidate, prediction
    return HeldOutChoice(best, on_selection, held_out, kept, chosen_rows, held_rows)
