"""Figures comparing how two or more models use the same training data (Koh & Liang 2017, Figure 4).

Drawn on bare ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot, nothing shown), like
:func:`~influencekit.validation.plot_loo`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["plot_influence_vs_distance", "plot_helpful_by_model"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_influence_vs_distance(
    distance: np.ndarray,
    loo_change: Mapping[str, np.ndarray],
    same_class: np.ndarray,
    *,
    correlations: Mapping[str, float] | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Any:
    """One panel per model: predicted leave-one-out change of one test loss (−I_up,loss/n, y) against the
    Euclidean distance of each training input to the test input (x); green same class, red other class.

    Args:
        distance: ``(n_train,)``; loo_change: model name -> ``(n_train,)``; same_class: ``(n_train,)`` bool.
        correlations: model name -> Spearman(|influence|, distance), shown in each panel's title.
    """
    names = list(loo_change)
    fig = _figure(4.2 * len(names), 3.8)
    same = np.asarray(same_class, dtype=bool)
    for j, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        y = np.asarray(loo_change[name])
        ax.scatter(distance[~same], y[~same], s=9, alpha=0.6, color="tab:red", label="other class")
        ax.scatter(distance[same], y[same], s=9, alpha=0.6, color="tab:green", label="same class")
        ax.axhline(0.0, color="0.8", linewidth=0.8, zorder=0)
        ax.ticklabel_format(style="sci", axis="y", scilimits=(-3, 3))
        ax.set_xlabel("Euclidean distance to the test input")
        if j == 0:
            ax.set_ylabel("−I_up,loss / n  (> 0: helpful)")
            ax.legend(loc="upper right", fontsize="small", frameon=False)
        rho = None if correlations is None else correlations.get(name)
        ax.set_title(
            name + (f"\nSpearman(|influence|, distance) = {rho:.3f}" if rho is not None and np.isfinite(rho) else ""),
            fontsize=9,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png")
    return fig


def plot_helpful_by_model(
    test_images: np.ndarray,
    test_labels: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    helpful: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    n_train: int,
    image_shape: tuple[int, int],
    path: str | os.PathLike | None = None,
) -> Any:
    """One row per test image: the image, then each model's ``k`` most helpful training images side by side.

    ``helpful`` maps a model name to ``(indices, I_up,loss values)``, each ``(n_test, k)``; every training
    image is titled with its label and −I_up,loss/n (the predicted rise of the test loss if it were removed).
    """
    names = list(helpful)
    n_test, k = np.asarray(helpful[names[0]][0]).shape
    cols = 1 + len(names) * k
    fig = _figure(1.25 * cols, 1.5 * n_test + 0.4)
    axes = fig.subplots(n_test, cols, squeeze=False)

    def show(ax: Any, image: np.ndarray, text: str, color: str) -> None:
        ax.imshow(np.asarray(image).reshape(image_shape), cmap="gray_r")
        ax.set_title(text, fontsize=6.5, color=color)
        ax.set_xticks([])
        ax.set_yticks([])

    colors = ["darkgreen", "darkblue", "darkorange", "purple"]
    for row in range(n_test):
        show(axes[row, 0], test_images[row], f"test, label {int(test_labels[row])}", "black")
        for m, name in enumerate(names):
            idx, vals = (np.asarray(a) for a in helpful[name])
            for j in range(k):
                i = int(idx[row, j])
                text = (
                    f"{name}\n" if row == 0 and j == 0 else ""
                ) + f"#{i} y={int(train_labels[i])}\n{-vals[row, j] / n_train:+.1e}"
                show(axes[row, 1 + m * k + j], train_images[i], text, colors[m % len(colors)])
    fig.suptitle(f"most helpful training images per model ({', '.join(names)}); number = -I_up,loss / n", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png")
    return fig
