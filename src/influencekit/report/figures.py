"""Galleries of the most helpful and harmful training images for test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.results import TopK

__all__ = ["plot_influential_images"]


def _figure(rows: int, cols: int, size: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(cols * size, rows * size * 1.15), squeeze=False)


def plot_influential_images(
    test_images: np.ndarray,
    test_labels: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    helpful: TopK,
    harmful: TopK,
    *,
    n_train: int,
    path: str | Path | None = None,
    image_shape: tuple[int, int] | None = None,
) -> Any:
    """One row per test image: the image, its ``k`` most helpful then ``k`` most harmful training images.

    Each training image is titled with its label and the predicted change of the test loss if it were
    removed (−I_up,loss / n). Returns the matplotlib Figure; writes a PNG when ``path`` is given.
    """
    n_test, k = helpful.indices.shape
    fig, axes = _figure(n_test, 1 + 2 * k, 1.3)
    shape = image_shape or (int(round(np.sqrt(train_images.shape[-1]))),) * 2

    def show(ax: Any, image: np.ndarray, title: str, color: str = "black") -> None:
        ax.imshow(np.asarray(image).reshape(shape), cmap="gray_r")
        ax.set_title(title, fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])

    for row in range(n_test):
        show(axes[row, 0], test_images[row], f"test, label {int(test_labels[row])}", "navy")
        for j in range(k):
            for offset, part, color in ((1, helpful, "darkgreen"), (1 + k, harmful, "darkred")):
                i = int(part.indices[row, j])
                change = -float(part.values[row, j]) / n_train
                show(axes[row, offset + j], train_images[i], f"#{i} y={int(train_labels[i])}\nLOO {change:+.1e}", color)
    fig.suptitle(
        f"left: test image; green: {k} most helpful, red: {k} most harmful training images "
        "(LOO = predicted change of the test loss if removed)",
        fontsize=8,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
