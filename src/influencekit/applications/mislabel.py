"""Finding mislabeled training points by self-influence (Koh & Liang 2017, §5.4 and Figure 6).

A training point z whose label is wrong tends to have a large self-influence
∇L(z, θ̂)ᵀ (H + δI)⁻¹ ∇L(z, θ̂): the model has to bend to fit it, so upweighting it moves θ̂ a lot along
directions of low curvature. Ranking the training set by self-influence and checking the labels of the
top of the list finds flipped labels faster than checking the points of highest training loss, which in
turn beats checking at random.

The experiment of the paper's Figure 6 (:func:`flip_and_detect`): flip the labels of a fraction of the
training set, train on the noisy labels, rank the training points three ways (``"self_influence"``,
``"loss"``, ``"random"``), and for each fraction f of the training set checked — the first
k = ⌊f·n + ½⌋ points of a ranking — record

- the fraction of the flipped labels among those k points (:func:`fraction_found`), and
- the test accuracy after restoring the true labels of the flipped points among them and retraining
  (:func:`accuracy_after_fixing`, :func:`~influencekit.engine.training.fit_lbfgs` warm-started from θ̂).

With your own data, where nobody knows which labels are wrong, :func:`rank_training_points` gives the
order in which to check them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int, check_number
from ..core.errors import InputError, InputTypeError
from ..core.progress import progress_bar
from ..core.task import ClassificationTask, Task
from ..data.examples import DataSource, stream
from ..engine.scoring import Influence
from ..engine.training import fit_lbfgs
from ..solvers import Solver

__all__ = [
    "METHODS",
    "MislabelCurves",
    "flip_labels",
    "rank_training_points",
    "n_checked",
    "fraction_found",
    "accuracy_after_fixing",
    "flip_and_detect",
    "bundled_flip_and_detect",
]

METHODS = ("self_influence", "loss", "random")
_LABELS = {"self_influence": "Influence (self-influence)", "loss": "Loss", "random": "Random"}
_COLORS = {"self_influence": "tab:blue", "loss": "tab:orange", "random": "tab:gray"}
DEFAULT_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


# ------------------------------------------------------------------------------------------ checks
def _check_fractions(name: str, fractions: Any) -> np.ndarray:
    if isinstance(fractions, (int, float)) and not isinstance(fractions, bool):
        fractions = [fractions]
    try:
        values = list(fractions)
    except TypeError:
        raise InputTypeError(
            f"`{name}` must be a sequence of floats in (0, 1]. Got {type(fractions).__name__}."
        ) from None
    if not values:
        raise InputError(f"`{name}` must hold at least one fraction in (0, 1]. Got an empty sequence.")
    out = np.array([check_number(name, v, low=0.0, high=1.0, low_inclusive=False) for v in values], dtype=np.float64)
    if np.any(np.diff(out) <= 0):
        raise InputError(f"`{name}` must be strictly increasing. Got {out.tolist()}.")
    return out


def _check_methods(methods: Any) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods:
        raise InputError(f"`methods` must name at least one of {', '.join(repr(m) for m in METHODS)}. Got none.")
    for m in methods:
        if m not in METHODS:
            raise InputError(f"`methods` must hold names among {', '.join(repr(x) for x in METHODS)}. Got {m!r}.")
    if len(set(methods)) != len(methods):
        raise InputError(f"`methods` must not repeat a name. Got {list(methods)}.")
    return methods


def _check_xy(name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``data`` as an ``(X, y)`` pair of tensors with ``y`` 1-D integer labels and at least one example."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InputTypeError(
            f"`{name}` must be an (X, y) pair of tensors or arrays (labels are changed and restored, so the "
            f"data must be in memory). Got {type(data).__name__}"
            + (f" of length {len(data)}." if isinstance(data, (tuple, list)) else ".")
        )
    X, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in data)
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(
            f"the labels of `{name}` must be a 1-D tensor of integer classes. Got shape {tuple(y.shape)}, dtype "
            f"{y.dtype}."
        )
    if len(y) == 0:
        raise InputError(f"`{name}` must hold at least one example. Got an empty data set.")
    if X.shape[0] != len(y):
        raise InputError(f"`{name}` must have one label per example. Got {X.shape[0]} examples and {len(y)} labels.")
    if bool((y < 0).any()):
        raise InputError(f"the labels of `{name}` must be class indices >= 0. Got {int(y.min())}.")
    return X, y.long()


# ------------------------------------------------------------------------------------------ pieces
def flip_labels(
    y: torch.Tensor, fraction: float, *, n_classes: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the labels of ⌊fraction·n + ½⌋ training points chosen at random.

    Binary labels become the other class; with more classes, each chosen label becomes one of the other
    classes uniformly at random.

    Args:
        y: ``(n,)`` integer labels in ``[0, n_classes)``.
        fraction: the fraction of labels to flip, in (0, 1].
        n_classes: the number of classes (at least 2); ``None`` takes ``max(y) + 1``, and 2 at least.
        seed: seed of the choice of points and of the new classes.

    Returns:
        ``(y_noisy, flipped)``: the new labels ``(n,)`` and the sorted indices of the flipped points.
    """
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(np.asarray(y))
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(
            f"`y` must be a 1-D tensor of integer class labels. Got shape {tuple(y.shape)}, dtype {y.dtype}."
        )
    if len(y) == 0:
        raise InputError("`y` must hold at least one label. Got an empty tensor.")
    fraction = check_number("fraction", fraction, low=0.0, high=1.0, low_inclusive=False)
    top = int(y.max()) + 1
    n_classes = max(2, top) if n_classes is None else check_int("n_classes", n_classes, low=max(2, top))
    if bool((y < 0).any()):
        raise InputError(f"`y` must hold class indices >= 0. Got {int(y.min())}.")
    n = len(y)
    k = int(np.floor(fraction * n + 0.5))
    if k == 0:
        raise InputError(
            f"`fraction` x n = {fraction:g} x {n} rounds to 0 labels to flip; raise `fraction` or use more data."
        )
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=k, replace=False))
    old = y.cpu().numpy()[flipped]
    shift = rng.integers(1, n_classes, size=k)  # 1..C-1: never the old class
    y_noisy = y.clone()
    y_noisy[torch.as_tensor(flipped)] = torch.as_tensor((old + shift) % n_classes, dtype=y.dtype).to(y.device)
    return y_noisy, torch.as_tensor(flipped, dtype=torch.long)


def rank_training_points(
    influence: Influence, *, by: str = "self_influence", seed: int = 0, return_scores: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """The order in which to check training labels, most suspicious first, ``(n_train,)`` long indices.

    Args:
        influence: a fitted :class:`~influencekit.Influence` on the (possibly mislabeled) training data.
        by: ``"self_influence"`` (descending ∇L(z)ᵀ(H + δI)⁻¹∇L(z), the paper's method), ``"loss"``
            (descending training loss ℓ(z, θ̂)), or ``"random"`` (a seeded permutation).
        seed: seed of the ``"random"`` order.
        return_scores: also return the ``(n_train,)`` values sorted by (self-influence or training loss,
            in data order; ``None`` for ``"random"``), as ``(order, scores)``.
    """
    if by not in METHODS:
        raise InputError(f"`by` must be one of {', '.join(repr(m) for m in METHODS)}. Got {by!r}.")
    influence.check_fitted()
    n = influence.engine.n_train
    if by == "random":
        order = torch.as_tensor(np.random.default_rng(seed).permutation(n), dtype=torch.long)
        return (order, None) if return_scores else order
    if by == "self_influence":
        values = influence.self_influence()
    else:
        values = _training_losses(influence)
    # stable, so ties keep the data order and the result is reproducible
    order = torch.as_tensor(np.argsort(-values.detach().cpu().numpy(), kind="stable"), dtype=torch.long)
    return (order, values) if return_scores else order


def _training_losses(influence: Influence) -> torch.Tensor:
    layout, task = influence.engine.layout, influence.task
    parts = []
    with torch.no_grad():
        for _, batch in stream(
            influence.engine.train,
            influence.engine.chunks.grad,
            dtype=layout.dtype,
            device=layout.device,
            check=task.check_batch,
        ):
            parts.append(task.loss(influence.engine.params, batch))
    return torch.cat(parts)


def n_checked(fractions: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """How many training points checking each fraction means: k = ⌊f·n + ½⌋ (``int64``, one per fraction)."""
    fractions = _check_fractions("fractions", fractions)
    n = check_int("n", n, low=1)
    return np.floor(fractions * n + 0.5).astype(np.int64)


def fraction_found(order: Any, flipped: Any, fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    """The fraction of flipped labels among the first k = ⌊f·n + ½⌋ points of ``order``, for each fraction f.

    Args:
        order: ``(n,)`` a permutation of the training indices, most suspicious first.
        flipped: the indices of the training points whose labels are wrong (at least one).
        fractions: the fractions of the training set checked, each in (0, 1], increasing.

    Returns:
        ``(len(fractions),)`` float64 values in [0, 1].
    """
    order = np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order).reshape(-1)
    n = len(order)
    if n == 0:
        raise InputError("`order` must rank at least one training point. Got an empty ranking.")
    if not np.issubdtype(order.dtype, np.integer) or not np.array_equal(np.sort(order), np.arange(n)):
        raise InputError(f"`order` must be a permutation of 0..{n - 1} (each training index once).")
    flipped = np.asarray(flipped.cpu() if isinstance(flipped, torch.Tensor) else flipped).reshape(-1)
    if len(flipped) == 0:
        raise InputError("`flipped` must name at least one mislabeled training point. Got none.")
    if (
        not np.issubdtype(flipped.dtype, np.integer)
        or flipped.min() < 0
        or flipped.max() >= n
        or len(np.unique(flipped)) != len(flipped)
    ):
        raise InputError(f"`flipped` must hold distinct indices in [0, {n - 1}]. Got {flipped[:5].tolist()}...")
    ks = n_checked(fractions, n)
    is_flipped = np.zeros(n, dtype=bool)
    is_flipped[flipped] = True
    found = np.concatenate([[0], np.cumsum(is_flipped[order])])
    return found[ks] / len(flipped)


def _accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(X)
    if logits.dim() == 2 and logits.shape[1] > 1:
        predicted = logits.argmax(dim=1)
    else:
        predicted = (logits.reshape(-1) > 0).long()
    return float((predicted == y.to(predicted.device)).double().mean())


def accuracy_after_fixing(
    task: Task,
    train: DataSource,
    true_labels: Any,
    order: Any,
    fractions: Sequence[float] | np.ndarray,
    test: DataSource,
    *,
    curvature: Solver | None = None,
    tol: float = 1e-6,
    progress: bool = False,
) -> np.ndarray:
    """Test accuracy after checking the first k = ⌊f·n + ½⌋ points of ``order`` and retraining, per fraction.

    Checking a point restores its true label. The model is retrained with
    :func:`~influencekit.engine.training.fit_lbfgs` from the task's current parameters (θ̂ on the noisy labels),
    which are put back afterwards; retrainings with the same set of fixed labels are done once.

    Args:
        task: the task whose model was trained on ``train``; its selected parameters are retrained.
        train: ``(X, y_noisy)``.
        true_labels: ``(n,)`` the correct labels.
        order: ``(n,)`` the checking order (e.g. from :func:`rank_training_points`).
        fractions: fractions of the training set checked, each in (0, 1], increasing.
        test: ``(X_test, y_test)`` with correct labels.
        curvature: a fitted solver of the Hessian at θ̂ (``influence.engine.solver``) for fast first steps.
        tol: retrain to ‖∇R‖ ≤ tol (test accuracy needs far less than influence does).
        progress: show a progress bar over the retrainings.

    Returns:
        ``(len(fractions),)`` test accuracies in [0, 1].
    """
    X, y_noisy = _check_xy("train", train)
    X_test, y_test = _check_xy("test", test)
    y_true = torch.as_tensor(np.asarray(true_labels.cpu() if isinstance(true_labels, torch.Tensor) else true_labels))
    if y_true.shape != y_noisy.shape:
        raise InputError(
            f"`true_labels` must have one label per training example, shape {tuple(y_noisy.shape)}. Got "
            f"{tuple(y_true.shape)}."
        )
    y_true = y_true.long().to(y_noisy.device)
    order = torch.as_tensor(np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order)).long()
    if len(order) != len(y_noisy):
        raise InputError(f"`order` must rank all {len(y_noisy)} training points. Got {len(order)}.")
    ks = n_checked(fractions, len(y_noisy))
    wrong = (y_true != y_noisy).cpu()
    saved = {name: value.clone() for name, value in task.params().items()}
    named = dict(task.model.named_parameters())
    done: dict[bytes, float] = {}
    out = np.empty(len(ks))
    bar = progress_bar(total=len(ks), desc="retraining after fixing labels", enabled=progress)
    try:
        for j, k in enumerate(ks.tolist()):
            checked = order[:k]
            fixed = np.sort(checked[wrong[checked]].numpy())
            key = fixed.tobytes()
            if key not in done:
                y_fixed = y_noisy.clone()
                y_fixed[torch.as_tensor(fixed, dtype=torch.long)] = y_true[torch.as_tensor(fixed, dtype=torch.long)]
                if len(fixed):
                    fit_lbfgs(task, (X, y_fixed), tol=tol, curvature=curvature)
                done[key] = _accuracy(task.model, X_test, y_test)
                with torch.no_grad():
                    for name, value in saved.items():
                        named[name].copy_(value)
            out[j] = done[key]
            bar.update()
    finally:
        bar.close()
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)
    return out


# ------------------------------------------------------------------------------------------ result
@dataclass
class MislabelCurves:
    """The curves of :func:`flip_and_detect`, per seed, for each ranking method.

    Attributes:
        fractions: ``(F,)`` fractions of the training set checked.
        found: method -> ``(S, F)`` fraction of the flipped labels found, one row per seed.
        accuracy: method -> ``(S, F)`` test accuracy after fixing the labels found and retraining
            (empty when the experiment ran with ``retrain=False``).
        accuracy_clean: ``(S,)`` test accuracy of the model trained on the correct labels.
        accuracy_noisy: ``(S,)`` test accuracy of the model trained on the flipped labels.
        seeds, flip_fraction, n_train, n_test, n_flipped: the experiment's settings.
        metadata: task, solver, damping, L2, dtype and training reports.
    """

    fractions: np.ndarray
    found: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    accuracy_clean: np.ndarray
    accuracy_noisy: np.ndarray
    seeds: tuple[int, ...]
    flip_fraction: float
    n_train: int
    n_test: int
    n_flipped: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.found)

    def mean_found(self, method: str) -> np.ndarray:
        """``(F,)`` fraction of flips found, averaged over seeds."""
        return self.found[self._method(method)].mean(axis=0)

    def mean_accuracy(self, method: str) -> np.ndarray:
        """``(F,)`` test accuracy after fixing, averaged over seeds."""
        method = self._method(method)
        if method not in self.accuracy:
            raise InputError(
                "these curves were computed without retraining (`retrain=False`): no test accuracy after fixing."
            )
        return self.accuracy[method].mean(axis=0)

    def _method(self, method: str) -> str:
        if method not in self.found:
            raise InputError(f"`method` must be one of {', '.join(repr(m) for m in self.found)}. Got {method!r}.")
        return method

    def table(self) -> str:
        """A fixed-width table: one row per fraction checked, fraction found (and accuracy) per method, means over
        seeds."""
        head = f"{'checked':>8s}" + "".join(f" {'found ' + m:>21s}" for m in self.methods)
        if self.accuracy:
            head += "".join(f" {'acc ' + m:>19s}" for m in self.methods)
        lines = [head]
        for j, f in enumerate(self.fractions):
            row = f"{f:8.2f}" + "".join(f" {self.mean_found(m)[j]:21.3f}" for m in self.methods)
            if self.accuracy:
                row += "".join(f" {self.mean_accuracy(m)[j]:19.4f}" for m in self.methods)
            lines.append(row)
        lines.append(
            f"test accuracy: clean labels {self.accuracy_clean.mean():.4f}, {self.flip_fraction:.0%} flipped "
            f"{self.accuracy_noisy.mean():.4f} (means over {len(self.seeds)} seeds; {self.n_flipped} of {self.n_train} "
            "training labels flipped)"
        )
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table as Markdown, with the spread over seeds (±1 standard deviation)."""
        cols = [f"found, {m}" for m in self.methods] + (
            [f"test acc., {m}" for m in self.methods] if self.accuracy else []
        )
        lines = ["| checked | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for j, f in enumerate(self.fractions):
            cells = [f"{self.found[m][:, j].mean():.3f} ± {self.found[m][:, j].std():.3f}" for m in self.methods]
            if self.accuracy:
                cells += [
                    f"{self.accuracy[m][:, j].mean():.4f} ± {self.accuracy[m][:, j].std():.4f}" for m in self.methods
                ]
            lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None) -> Any:
        """The paper's Figure 6: test accuracy (left, when retrained) and fraction of flips found (right)
        against the fraction of training data checked, means over seeds with ±1 s.d. bands.

        Returns the ``matplotlib.figure.Figure`` (Agg canvas, never shown); writes a PNG when ``path`` is given.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = 2 if self.accuracy else 1
        fig = Figure(figsize=(4.6 * panels, 3.8), dpi=120)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, panels, squeeze=False)[0]
        x = np.concatenate([[0.0], self.fractions])
        if self.accuracy:
            ax = axes[0]
            for m in self.methods:
                acc = np.concatenate([self.accuracy_noisy[:, None], self.accuracy[m]], axis=1)
                ax.plot(x, acc.mean(0), marker="o", ms=3, color=_COLORS[m], label=_LABELS[m])
                ax.fill_between(x, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=_COLORS[m], alpha=0.15)
            ax.axhline(self.accuracy_clean.mean(), color="black", ls="--", lw=1, label="clean labels")
            ax.set_xlabel("fraction of training data checked")
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=8, loc="lower right")
        ax = axes[-1]
        for m in self.methods:
            found = np.concatenate([np.zeros((len(self.seeds), 1)), self.found[m]], axis=1)
            ax.plot(x, found.mean(0), marker="o", ms=3, color=_COLORS[m], label=_LABELS[m])
            ax.fill_between(x, found.mean(0) - found.std(0), found.mean(0) + found.std(0), color=_COLORS[m], alpha=0.15)
        ax.set_xlabel("fraction of training data checked")
        ax.set_ylabel("fraction of flips found")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="upper left")
        for a in axes:
            a.set_xlim(0, x[-1])
            a.grid(alpha=0.3)
        fig.suptitle(
            title
            or f"{self.flip_fraction:.0%} of {self.n_train} training labels flipped, mean of {len(self.seeds)} seeds",
            fontsize=10,
        )
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path), format="png")
        return fig


# ------------------------------------------------------------------------------------------ experiment
def flip_and_detect(
    model: torch.nn.Module,
    train: DataSource,
    test: DataSource,
    *,
    l2: float,
    flip_fraction: float = 0.1,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    n_classes: int | None = None,
    solver: str | Solver = "exact",
    damping: float = 0.0,
    retrain: bool = True,
    tol: float = 1e-8,
    retrain_tol: float = 1e-6,
    progress: bool = False,
) -> MislabelCurves:
    """Flip labels, train, rank by self-influence / loss / at random, and measure what checking finds.

    For each seed: flip ``flip_fraction`` of the training labels (:func:`flip_labels`), train a copy of
    ``model`` from its given parameters with :func:`~influencekit.engine.training.fit_lbfgs` on the noisy labels
    (cross-entropy, or the logistic loss for one output, with L2 ``l2`` — :class:`ClassificationTask`),
    rank the training points by each method (:func:`rank_training_points`; the seed also seeds
    ``"random"``), and record :func:`fraction_found` and, when ``retrain``, :func:`accuracy_after_fixing`.
    ``model`` itself is not changed. Koh & Liang (2017), §5.4, Figure 6.

    Args:
        model: the model to train, at its starting parameters (convex models: any start).
        train: ``(X, y)`` with the correct labels ``y`` ``(n,)``.
        test: ``(X_test, y_test)`` with correct labels.
        l2: λ of the L2 term inside each example's loss.
        flip_fraction: fraction of the training labels flipped, in (0, 1].
        fractions: fractions of the training set checked, in (0, 1], increasing.
        seeds: one experiment per seed; the curves keep every seed (means in :class:`MislabelCurves`).
        methods: a subset of ``("self_influence", "loss", "random")``.
        n_classes: the number of classes; ``None`` takes the largest label in train and test + 1 (2 at least).
        solver, damping: of the :class:`~influencekit.Influence` computing self-influence.
        retrain: compute the test accuracy after fixing (one retraining per distinct set of fixed labels).
        tol: train to ‖∇R‖ ≤ tol before computing influence.
        retrain_tol: retrain to ‖∇R‖ ≤ retrain_tol after fixing labels (only the test accuracy is used).
        progress: show progress bars.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"`model` must be a torch.nn.Module. Got {type(model).__name__}.")
    X, y = _check_xy("train", train)
    X_test, y_test = _check_xy("test", test)
    l2 = check_number("l2", l2, low=0.0)
    flip_fraction = check_number("flip_fraction", flip_fraction, low=0.0, high=1.0, low_inclusive=False)
    fractions = _check_fractions("fractions", fractions)
    methods = _check_methods(methods)
    seeds = _check_seeds(seeds)
    top = int(max(int(y.max()), int(y_test.max()))) + 1
    n_classes = max(2, top) if n_classes is None else check_int("n_classes", n_classes, low=max(2, top))

    clean = copy.deepcopy(model)
    fit_lbfgs(ClassificationTask(clean, l2=l2), (X, y), tol=tol)
    acc_clean = _accuracy(clean, X_test, y_test)
    runs = _flip_runs(
        model,
        (X, y),
        (X_test, y_test),
        l2=l2,
        flip_fraction=flip_fraction,
        fractions=fractions,
        seeds=seeds,
        methods=methods,
        n_classes=n_classes,
        solver=solver,
        damping=damping,
        retrain=retrain,
        tol=tol,
        retrain_tol=retrain_tol,
        progress=progress,
    )
    metadata = {
        **runs.task.describe(),
        **runs.influence.engine.solver.describe(),
        "damping": damping,
        "dtype": str(runs.influence.engine.layout.dtype),
        "n_params": runs.influence.engine.layout.n,
        "n_classes": n_classes,
        "train_reports": [r.__dict__ for r in runs.reports],
    }
    return MislabelCurves(
        fractions=fractions,
        found={m: np.stack(v) for m, v in runs.found.items()},
        accuracy={m: np.stack(v) for m, v in runs.accuracy.items()} if retrain else {},
        accuracy_clean=np.full(len(seeds), acc_clean),
        accuracy_noisy=np.array(runs.accuracy_noisy),
        seeds=seeds,
        flip_fraction=flip_fraction,
        n_train=len(y),
        n_test=len(y_test),
        n_flipped=runs.n_flipped,
        metadata=metadata,
    )


def _check_seeds(seeds: Any) -> tuple[int, ...]:
    seeds = tuple(check_int("seeds", s) for s in (seeds if not isinstance(seeds, int) else (seeds,)))
    if not seeds:
        raise InputError("`seeds` must hold at least one seed. Got none.")
    return seeds


@dataclass
class _FlipRuns:
    """Per seed of :func:`flip_and_detect`: what each ranking found, the accuracies and the training reports;
    with the last seed's task and influence (for the metadata)."""

    found: dict[str, list[np.ndarray]]
    accuracy: dict[str, list[np.ndarray]]
    accuracy_noisy: list[float]
    reports: list[Any]
    n_flipped: int
    task: ClassificationTask
    influence: Influence


def _flip_runs(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    l2: float,
    flip_fraction: float,
    fractions: np.ndarray,
    seeds: tuple[int, ...],
    methods: tuple[str, ...],
    n_classes: int,
    solver: str | Solver,
    damping: float,
    retrain: bool,
    tol: float,
    retrain_tol: float,
    progress: bool,
) -> _FlipRuns:
    """For each seed: flip labels, train a copy of ``model`` on them, rank the training points by each method and
    record what checking them finds (and, when ``retrain``, the test accuracy after fixing)."""
    X, y = train
    X_test, y_test = test
    found: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    accuracy: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    acc_noisy, reports, n_flipped = [], [], 0
    bar = progress_bar(total=len(seeds), desc="flip and detect (seeds)", enabled=progress)
    for seed in seeds:
        y_noisy, flipped = flip_labels(y, flip_fraction, n_classes=n_classes, seed=seed)
        n_flipped = len(flipped)
        noisy = copy.deepcopy(model)
        task = ClassificationTask(noisy, l2=l2)
        report = fit_lbfgs(task, (X, y_noisy), tol=tol)
        reports.append(report)
        acc_noisy.append(_accuracy(noisy, X_test, y_test))
        influence = Influence(task, (X, y_noisy), solver=solver, damping=damping, progress=progress).fit()
        for m in methods:
            order = rank_training_points(influence, by=m, seed=seed)
            found[m].append(fraction_found(order, flipped, fractions))
            if retrain:
                accuracy[m].append(
                    accuracy_after_fixing(
                        task,
                        (X, y_noisy),
                        y,
                        order,
                        fractions,
                        (X_test, y_test),
                        curvature=influence.engine.solver,
                        tol=retrain_tol,
                        progress=progress,
                    )
                )
        bar.update()
    bar.close()
    return _FlipRuns(found, accuracy, acc_noisy, reports, n_flipped, task, influence)


def bundled_flip_and_detect(
    dataset: str = "breast_cancer",
    *,
    l2: float = 1e-3,
    flip_fraction: float = 0.1,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    retrain: bool = True,
    split_seed: int = 0,
    progress: bool = False,
) -> MislabelCurves:
    """:func:`flip_and_detect` on data that ships with scikit-learn (no download), float64 logistic regression.

    ``"breast_cancer"``: binary (one logit), 569 tumours × 30 standardised features, 400 train / 169 test.
    ``"digits"``: 10 classes, 8×8 images with pixels in [0, 1], 1,200 train / 597 test.
    """
    from ..data.bundled import load_breast_cancer_split, load_digits_split

    if dataset == "breast_cancer":
        train, test = load_breast_cancer_split(seed=split_seed)
        outputs = 1
    elif dataset == "digits":
        train, test = load_digits_split(seed=split_seed)
        outputs = 10
    else:
        raise InputError(f"`dataset` must be 'breast_cancer' or 'digits'. Got {dataset!r}.")
    torch.manual_seed(split_seed)
    model = torch.nn.Linear(train[0].shape[1], outputs).double()
    with torch.no_grad():  # a convex problem: start from zero so the result does not depend on torch's init
        model.weight.zero_()
        model.bias.zero_()
    return flip_and_detect(
        model,
        train,
        test,
        l2=l2,
        flip_fraction=flip_fraction,
        fractions=fractions,
        seeds=seeds,
        methods=methods,
        retrain=retrain,
        progress=progress,
    )
