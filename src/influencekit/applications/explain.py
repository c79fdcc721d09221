"""Explaining predictions: the most helpful and most harmful training points for chosen test points.

:func:`compare_models` puts two or more models trained on the same data side by side (Koh & Liang 2017,
§5.1, Figure 4): the influence of every training point against its pixel distance to the test input, and
each model's most helpful training inputs; :func:`~influencekit_paper.compare.run_fig4` is the paper's
RBF SVM vs feature-model experiment on two digit classes (``influencekit paper fig4``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int
from ..core.errors import InputError, InputTypeError
from ..core.results import TopK
from ..core.task import ClassificationTask
from ..data.bundled import load_digits_split
from ..engine.scoring import Influence
from ..engine.training import TrainReport, fit_lbfgs
from ..validation import spearman

__all__ = [
    "explain_digits",
    "DigitsModel",
    "train_digits_logistic",
    "compare_models",
    "ModelComparison",
]


@dataclass
class DigitsModel:
    """Multiclass logistic regression trained on bundled digits, with its data and test losses."""

    model: torch.nn.Linear
    task: ClassificationTask
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_report: TrainReport
    test_losses: torch.Tensor
    accuracy: float

    def hardest(self, n: int) -> torch.Tensor:
        """Indices of the ``n`` test images with the highest loss."""
        return torch.argsort(self.test_losses, descending=True)[:n]


def train_digits_logistic(*, l2: float = 1e-3, seed: int = 0) -> DigitsModel:
    """Float64 multiclass logistic regression on scikit-learn's digits (1,200 train), trained by fit_lbfgs."""
    (X_train, y_train), (X_test, y_test) = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(X_train.shape[1], 10).double()
    task = ClassificationTask(model, l2=l2)
    report = fit_lbfgs(task, (X_train, y_train))
    with torch.no_grad():
        logits = model(X_test)
        losses = torch.nn.functional.cross_entropy(logits, y_test, reduction="none")
    accuracy = float((logits.argmax(1) == y_test).double().mean())
    return DigitsModel(model, task, (X_train, y_train), (X_test, y_test), report, losses, accuracy)


def explain_digits(
    *,
    n_test: int = 3,
    k: int = 5,
    solver: str = "cg",
    solver_options: dict[str, Any] | None = None,
    l2: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> str:
    """Train multiclass logistic regression on bundled digits and explain its highest-loss test digits.

    Returns a printable report: for each test digit, its label and prediction, then the ``k`` most helpful
    and most harmful training images with their labels, I_up,loss and the predicted change of the test
    loss if that image were removed (−I_up,loss / n).
    """
    digits = train_digits_logistic(l2=l2, seed=seed)
    y_train = digits.train[1]
    X_test, y_test = digits.test
    model, train_report, accuracy, losses = digits.model, digits.train_report, digits.accuracy, digits.test_losses
    with torch.no_grad():
        logits = model(X_test)
    chosen = digits.hardest(n_test)
    influence = Influence(
        digits.task, digits.train, solver=solver, solver_options=solver_options, progress=progress
    ).fit()
    ranked = influence.top_k((X_test[chosen], y_test[chosen]), k=k)
    n = len(y_train)
    lines = [
        f"multiclass logistic regression on scikit-learn digits: {n} training / {len(y_test)} test images, "
        f"l2={l2:g}, test accuracy {accuracy:.3f}, ||grad R|| = {train_report.grad_norm:.1e}",
        f"solver {solver!r}: {ranked.metadata['solve_reports'][0]['iterations']} iterations, relative residual "
        f"{ranked.metadata['solve_reports'][0]['relative_residual']:.1e}",
        "I_up,loss > 0: the training image raises this test loss (harmful); < 0: it lowers it (helpful).",
        "LOO = predicted change of the test loss if that training image were removed (-I_up,loss / n).",
    ]
    for row, t in enumerate(chosen.tolist()):
        lines.append("")
        lines.append(
            f"test image {t}: label {int(y_test[t])}, predicted {int(logits[t].argmax())}, loss {float(losses[t]):.3f}"
        )
        for title, part in (("helpful", ranked.helpful), ("harmful", ranked.harmful)):
            lines.append(f"  most {title}:")
            for i, v in zip(part.indices[row].tolist(), part.values[row].tolist()):
                lines.append(f"    train {i:5d}  label {int(y_train[i])}  I_up,loss {v:+.4f}  LOO {-v / n:+.2e}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ comparing models (§5.1)
@dataclass
class ModelComparison:
    """What :func:`compare_models` measured, per model, on the same training set and test points.

    Attributes:
        names: the models, in the order given.
        influence: name -> I_up,loss ``(n_test, n_train)`` (sign: docs/conventions.md; < 0 helpful).
        distance: Euclidean distance between each test input and each training input ``(n_test, n_train)``.
        same_class: whether the training label equals the test label ``(n_test, n_train)``.
        spearman: name -> Spearman(|I_up,loss|, distance) per test point ``(n_test,)``; NaN where every
            |I_up,loss| is equal (e.g. a test loss with zero gradient, such as a hinge loss beyond the margin).
        helpful: name -> the ``k`` most helpful training points per test point
        (:class:`~influencekit.core.results.TopK`).
        n_train: the training-set size (−I_up,loss / n is the predicted leave-one-out change).
        figures: the PNGs written (when ``out_dir`` was given).
        notes: lines describing the models (e.g. which kernel feature map), shown in :meth:`summary`.
    """

    names: list[str]
    influence: dict[str, torch.Tensor]
    distance: torch.Tensor
    same_class: torch.Tensor
    spearman: dict[str, np.ndarray]
    helpful: dict[str, TopK]
    n_train: int
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_path: Path | None = None
    text: str = ""

    def mean_spearman(self, name: str, subset: str = "all") -> float:
        """Mean over test points of Spearman(|I_up,loss|, distance) for ``name``, over ``subset`` of the
        training points: ``"all"``, ``"same"`` (same class as the test point) or ``"other"``."""
        if subset == "all":
            values = self.spearman[name]
        elif subset in ("same", "other"):
            values = _rank_correlations(
                self.influence[name], self.distance, self.same_class if subset == "same" else ~self.same_class
            )
        else:
            raise InputError(f"`subset` must be 'all', 'same' or 'other'. Got {subset!r}.")
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if len(finite) else float("nan")

    def summary(self) -> str:
        """One line per model: the mean rank correlation between |influence| and pixel distance."""
        lines = list(self.notes)
        lines.append(
            f"Spearman(|I_up,loss|, Euclidean distance), mean over {self.distance.shape[0]} test point(s) "
            "(negative: nearer training inputs matter more):"
        )
        for name in self.names:
            rho = self.spearman[name]
            finite = rho[np.isfinite(rho)]
            spread = f" (range {finite.min():+.3f} .. {finite.max():+.3f})" if len(finite) > 1 else ""
            lines.append(
                f"  {name:24s} all {self.mean_spearman(name):+.3f}{spread}   same class "
                f"{self.mean_spearman(name, 'same'):+.3f}   "
                f"other class {self.mean_spearman(name, 'other'):+.3f}"
                + ("" if len(finite) == len(rho) else f"   [{len(rho) - len(finite)} undefined]")
            )
        return "\n".join(lines)


def _rank_correlations(influence: torch.Tensor, distance: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    out = np.full(len(distance), np.nan)
    for t in range(len(distance)):
        a, b = influence[t].abs().numpy(), distance[t].numpy()
        if mask is not None:
            keep = mask[t].numpy()
            a, b = a[keep], b[keep]
        if len(a) >= 2 and not np.all(a == a[0]) and not np.all(b == b[0]):
            out[t] = spearman(a, b)
    return out


def _xy(name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, torch.Tensor) for v in data)):
        raise InputTypeError(f"`{name}` must be an (X, y) tuple of tensors. Got {type(data).__name__}.")
    X, y = data
    if X.dim() < 2 or y.dim() != 1 or len(X) != len(y) or len(X) == 0:
        raise InputError(
            f"`{name}` must hold inputs X (n, ...) and labels y (n,) with n >= 1. Got X {tuple(X.shape)} and y "
            f"{tuple(y.shape)}."
        )
    return X, y


def compare_models(
    models: Mapping[str, Influence],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    k: int = 5,
    out_dir: str | Path | None = None,
    n_plot: int = 3,
    image_shape: tuple[int, int] | None = None,
    label_names: Any = None,
    notes: list[str] | None = None,
) -> ModelComparison:
    """How several models use the same training data: influence against pixel distance, and the most helpful inputs.

    For every model and every test point, I_up,loss of every training point (:meth:`Influence.scores`),
    the Euclidean distance between the flattened training and test inputs, and Spearman's rank correlation
    between |I_up,loss| and that distance. Koh & Liang (2017, §5.1, Figure 4): an RBF SVM's influence falls
    off with distance (it reasons by nearness), a model on learned features draws on training inputs of
    the same class wherever they lie in pixel space.

    Args:
        models: name -> :class:`~influencekit.Influence` (fitted or not; ``fit`` is called when needed), all on
            the *same* training set, an ``(X, y)`` tuple of tensors with equal inputs and labels. Each model
            takes the raw inputs (a fixed feature map belongs inside the model, e.g.
            :class:`~influencekit.models.kernel_svm.KernelSVM`).
        test: ``(X, y)`` test points, inputs shaped like the training inputs.
        k: most helpful training points kept per test point and model.
        out_dir: when given, writes ``influence_vs_distance_<t>.png`` and ``helpful.png`` for the first
            ``n_plot`` test points.
        image_shape: ``(h, w)`` for the gallery; default the training inputs' last two dimensions, or the
            square root of their size.
        label_names: what to call label ``c`` in the figures (``label_names[c]``), e.g. the two digits.
        notes: lines put at the top of :meth:`ModelComparison.summary` (e.g. the kernel feature map used).

    Returns:
        :class:`ModelComparison`.
    """
    names, X, y = _shared_training_set(models)
    X_t, y_t = _xy("test", test)
    if X_t.shape[1:] != X.shape[1:]:
        raise InputError(
            f"`test` inputs must have the shape of the training inputs, (n_test, {', '.join(map(str, X.shape[1:]))}). "
            "Got "
            f"{tuple(X_t.shape)}; reshape the test inputs the way the training inputs are."
        )
    k = check_int("k", k, low=1, high=len(y))
    n_plot = check_int("n_plot", n_plot, low=0)
    scores: dict[str, torch.Tensor] = {}
    for name in names:
        inf = models[name]
        if not inf.is_fitted:
            inf.fit()
        scores[name] = inf.scores((X_t, y_t)).values.detach().cpu().to(torch.float64)
    flat = X.reshape(len(X), -1).detach().cpu().to(torch.float64)
    flat_t = X_t.reshape(len(X_t), -1).detach().cpu().to(torch.float64)
    distance = torch.cdist(flat_t, flat)
    same = y_t.cpu()[:, None] == y.cpu()[None, :]
    helpful = {}
    for name, values in scores.items():
        vals, idx = torch.topk(-values, k, dim=1)
        helpful[name] = TopK(idx, -vals)
    result = ModelComparison(
        names,
        scores,
        distance,
        same,
        {name: _rank_correlations(v, distance) for name, v in scores.items()},
        helpful,
        len(y),
        notes=list(notes or []),
    )
    if out_dir is not None and n_plot > 0:
        shown_y, shown_y_t = (y, y_t) if label_names is None else (_named(label_names, y), _named(label_names, y_t))
        result.figures = _comparison_figures(
            result, flat, shown_y, flat_t, shown_y_t, Path(out_dir), n_plot, image_shape or _image_shape(X)
        )
    result.text = result.summary()
    return result


def _shared_training_set(models: Any) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The models' names and their common training set ``(X, y)``; refuses models trained on different data."""
    if not isinstance(models, Mapping) or len(models) < 1:
        raise InputTypeError(f"`models` must be a non-empty mapping name -> ik.Influence. Got {type(models).__name__}.")
    for name, inf in models.items():
        if not isinstance(inf, Influence):
            raise InputTypeError(f"`models[{name!r}]` must be an ik.Influence. Got {type(inf).__name__}.")
    names = list(models)
    X, y = _xy(f"models[{names[0]!r}].train", models[names[0]].train)
    for name in names[1:]:
        Xo, yo = _xy(f"models[{name!r}].train", models[name].train)
        if Xo.shape != X.shape or not torch.equal(Xo.to(X), X) or not torch.equal(yo.to(y), y):
            what = (
                f"inputs {tuple(Xo.shape)} vs {tuple(X.shape)}"
                if Xo.shape != X.shape
                else "the same shapes but different values (inputs or labels)"
            )
            raise InputError(
                f"`models` must be trained on the same training set: {name!r} and {names[0]!r} differ ({what}). Give "
                "every "
                "model the same (X, y) tensors and put any fixed feature map inside the model."
            )
    return names, X, y


def _named(label_names: Any, y: torch.Tensor) -> torch.Tensor:
    try:
        return torch.as_tensor([int(label_names[int(c)]) for c in y])
    except (IndexError, KeyError, TypeError, ValueError):
        raise InputError(
            f"`label_names` must map every label to an integer name, e.g. (3, 8). Got {label_names!r}."
        ) from None


def _image_shape(X: torch.Tensor) -> tuple[int, int]:
    if X.dim() >= 3:
        return int(X.shape[-2]), int(X.shape[-1])
    side = int(round(np.sqrt(X.shape[1])))
    if side * side != X.shape[1]:
        raise InputError(f"`image_shape` is needed: {X.shape[1]} input features are not a square image.")
    return side, side


def _comparison_figures(
    result: ModelComparison,
    flat: torch.Tensor,
    y: torch.Tensor,
    flat_t: torch.Tensor,
    y_t: torch.Tensor,
    out: Path,
    n_plot: int,
    image_shape: tuple[int, int],
) -> list[Path]:
    from ..report.comparison import plot_helpful_by_model, plot_influence_vs_distance

    out.mkdir(parents=True, exist_ok=True)
    shown = list(range(min(n_plot, len(y_t))))
    figures = []
    for t in shown:
        path = out / f"influence_vs_distance_{t}.png"
        plot_influence_vs_distance(
            result.distance[t].numpy(),
            {n: (-result.influence[n][t] / result.n_train).numpy() for n in result.names},
            result.same_class[t].numpy(),
            correlations={n: float(result.spearman[n][t]) for n in result.names},
            title=f"test point {t} (label {int(y_t[t])}): influence of every training point vs pixel distance",
            path=path,
        )
        figures.append(path)
    path = out / "helpful.png"
    plot_helpful_by_model(
        flat_t[shown].numpy(),
        y_t[shown].numpy(),
        flat.numpy(),
        y.numpy(),
        {n: (result.helpful[n].indices[shown].numpy(), result.helpful[n].values[shown].numpy()) for n in result.names},
        n_train=result.n_train,
        image_shape=image_shape,
        path=path,
    )
    figures.append(path)
    return figures
