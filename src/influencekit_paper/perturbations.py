"""Original, perturbed and difference images of a training-set attack (Koh & Liang 2017, Figure 6).

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, nothing is shown, and
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from influencekit.core.errors import InputError

__all__ = ["plot_perturbations"]


def plot_perturbations(
    original: Any,
    perturbed: Any,
    *,
    target: Any = None,
    row_titles: list[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """One row per perturbed training image: the original, the perturbed image and their difference.

    Args:
        original: ``(k, ...)`` original images; each reshapes to a square (e.g. ``(k, 1, 28, 28)`` or ``(k, 64)``).
        perturbed: the same shape.
        target: an optional test image drawn in the first row's fourth column (the attacked test point).
        row_titles: one label per row (e.g. the training index and label).
        title: the figure's title.
        path: where to write a PNG.

    The difference uses a diverging colour map symmetric around 0 with its largest absolute value printed.
    Returns the matplotlib Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    original = np.asarray(original, dtype=np.float64)
    perturbed = np.asarray(perturbed, dtype=np.float64)
    if original.shape != perturbed.shape or original.ndim < 2:
        raise InputError(
            f"`original` and `perturbed` must have the same shape (k, ...). Got {original.shape} and {perturbed.shape}."
        )
    k = len(original)
    side = int(round(np.sqrt(original[0].size)))
    if side * side != original[0].size:
        raise InputError(f"each image must reshape to a square. Got {original[0].size} values per image.")
    cols = 3 if target is None else 4
    fig = Figure(figsize=(2.0 * cols, 2.1 * k + (0.5 if title else 0.0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, cols, squeeze=False)
    lo, hi = min(original.min(), perturbed.min()), max(original.max(), perturbed.max())
    for r in range(k):
        diff = (perturbed[r] - original[r]).reshape(side, side)
        bound = float(np.abs(diff).max()) or 1.0
        panels = [
            (
                original[r].reshape(side, side),
                "gray_r",
                lo,
                hi,
                "original" if row_titles is None else f"original {row_titles[r]}",
            ),
            (perturbed[r].reshape(side, side), "gray_r", lo, hi, "perturbed"),
            (diff, "RdBu_r", -bound, bound, f"difference (max |d| {bound:.3g})"),
        ]
        if target is not None:
            panels.append(
                (np.asarray(target, dtype=np.float64).reshape(side, side), "gray_r", lo, hi, "target test image")
            )
        for c, (image, cmap, vmin, vmax, label) in enumerate(panels):
            ax = axes[r, c]
            if r > 0 and c == 3:
                ax.axis("off")
                continue
            ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=100)
    return fig
