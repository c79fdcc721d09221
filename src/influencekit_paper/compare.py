"""`influencekit paper fig4`: how two models use the same training data (Koh & Liang 2017, §5.1, Figure 4).

:func:`run_fig4` compares an RBF SVM on raw pixels with logistic regression on a frozen CNN's features, both on
two digit classes (:func:`~influencekit_paper.image_problem.binary_image_problem`), through
:func:`~influencekit.applications.explain.compare_models`, and writes ``report.md`` and its figures.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from influencekit.applications.attack import predict_labels
from influencekit.applications.explain import ModelComparison, compare_models
from influencekit.core.checks import check_number
from influencekit.core.errors import InputError, StationarityWarning
from influencekit.core.task import SmoothHingeTask
from influencekit.engine.scoring import Influence
from influencekit.models.kernel_svm import fit_rbf_svm

from .image_problem import binary_image_problem

__all__ = ["run_fig4"]


def run_fig4(
    out_dir: str | Path = "influencekit-fig4",
    *,
    mnist: str | Path | None = None,
    classes: tuple[int, int] = (3, 8),
    svm_l2: float = 0.1,
    gamma: float | None = None,
    temperature: float = 0.001,
    feature_map: str = "auto",
    n_plot: int = 3,
    k: int = 5,
    max_images: int | None = None,
    seed: int = 0,
) -> ModelComparison:
    """Koh & Liang (2017) §5.1, Figure 4: an RBF SVM on pixels against logistic regression on learned features.

    Both models see the same two digit classes (:func:`~influencekit_paper.image_problem.binary_image_problem`:
    bundled 8×8 digits, or MNIST IDX files in ``mnist``). The feature model is that problem's frozen CNN with
    a logistic top layer; the RBF SVM (:func:`~influencekit.models.kernel_svm.fit_rbf_svm`, λ = ``svm_l2``)
    is solved with the true hinge on an explicit kernel feature map and scored with the smooth hinge at
    ``temperature`` (the paper's t = 0.001; the test side measures the true hinge loss). The test points are
    those both models classify correctly and on which the SVM's hinge loss is positive (beyond the margin
    it has no gradient and no training point has influence); the first ``n_plot`` are drawn. Writes
    ``report.md`` and PNGs into ``out_dir``.
    """
    started = time.perf_counter()
    svm_l2 = check_number("svm_l2", svm_l2, low=0.0, low_inclusive=False)
    temperature = check_number("temperature", temperature, low=0.0)
    out = Path(out_dir)
    problem = binary_image_problem(mnist=mnist, classes=classes, max_images=max_images, seed=seed)
    X, y = problem.train
    X_t, y_t = problem.test
    svm = fit_rbf_svm(X, y, l2=svm_l2, gamma=gamma, feature_map=feature_map, seed=seed)
    svm_task = SmoothHingeTask(svm.model, temperature=temperature, measurement_temperature=0.0, l2=svm_l2, params="top")
    with torch.no_grad():
        margins = svm_task.margins(svm_task.params(), (X_t, y_t))
    svm_accuracy = float((margins > 0).double().mean())
    chosen = ((margins > 0) & (margins < 1) & (predict_labels(problem.task, X_t) == y_t)).nonzero().flatten()
    if len(chosen) == 0:
        raise InputError(
            "no test point is classified correctly by both models with a positive SVM hinge loss; "
            "raise `svm_l2` (a wider margin) or use more images."
        )
    with warnings.catch_warnings():  # θ̂ minimises the true hinge, not the smooth one: expected (as in Figure 3)
        warnings.simplefilter("ignore", StationarityWarning)
        svm_inf = Influence(svm_task, problem.train, solver="exact").fit()
    feature_inf = Influence(problem.task, problem.train, solver="exact").fit()
    n_sv = int((svm.solution.alpha > 0).sum())
    notes = [
        problem.description + ".",
        f"RBF SVM on raw pixels: {svm.feature_map}; true hinge, lambda = {svm_l2:g} (bias penalised), duality gap "
        f"{svm.solution.gap:.1e}, {n_sv} of {len(y)} support vectors, test accuracy {svm_accuracy:.3f}; influence with "
        "the "
        f"smooth hinge t = {temperature:g}, test side the true hinge loss.",
        f"Test points: the {len(chosen)} of {len(y_t)} classified correctly by both models with SVM margin in (0, 1).",
    ]
    result = compare_models(
        {"RBF SVM (pixels)": svm_inf, "logistic on CNN features": feature_inf},
        (X_t[chosen], y_t[chosen]),
        k=k,
        out_dir=out,
        n_plot=n_plot,
        label_names=problem.classes,
        notes=notes,
    )
    lines = [
        "# Figure 4 (Koh & Liang 2017, section 5.1): how two models use the same training data",
        "",
        *notes,
        "",
        "| model | Spearman(abs influence, distance): all | same class | other class |",
        "|---|---|---|---|",
    ]
    for name in result.names:
        lines.append(
            f"| {name} | {result.mean_spearman(name):+.3f} | {result.mean_spearman(name, 'same'):+.3f} | "
            f"{result.mean_spearman(name, 'other'):+.3f} |"
        )
    lines += [
        "",
        "Paper (dog vs fish, RBF SVM vs Inception): the SVM's influence falls off with pixel distance; the "
        "Inception model's influential images can be far away in pixel space.",
        "",
        *[f"![{p.stem}]({p.name})" for p in result.figures],
        "",
        f"Total time {time.perf_counter() - started:.0f} s.",
    ]
    result.report_path = out / "report.md"
    result.report_path.write_text("\n".join(lines) + "\n")
    result.text = result.summary() + f"\nreport and figures: {out.resolve()}"
    return result
