"""The leave-one-out scatter of Koh & Liang (2017), Figure 2: predicted against actual change of the test loss.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, so neither the global backend
nor pyplot's figure list is touched, and nothing is ever shown. matplotlib is imported only when a figure
is drawn (it is an optional dependency).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..core.errors import InputError
from .metrics import pearson
from .stats import as_vector, correlation_or_nan

__all__ = ["plot_loo", "plot_groups", "scatter_panel"]


def plot_loo(
    predicted: Any,
    actual: Any,
    *,
    test_index: Any = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Any:
    """Scatter the actual leave-one-out change (y) against the predicted one, −I_up,loss/n (x).

    Both axes share one range, with the diagonal y = x drawn; the title carries Pearson's r. Points are
    coloured by test point when ``test_index`` names between 2 and 10 of them.

    Args:
        predicted: ``(n_pairs,)`` predicted change of the test loss.
        actual: ``(n_pairs,)`` change measured by retraining.
        test_index: ``(n_pairs,)`` the test point of each pair, or ``None``.
        path: where to write the figure as PNG (any suffix; the format is PNG).
        title: a first title line; Pearson's r goes below it.

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is installed in the test environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    x, y = as_vector("predicted", predicted), as_vector("actual", actual)
    if len(x) != len(y):
        raise InputError(f"`predicted` and `actual` must have the same length. Got {len(x)} and {len(y)}.")
    if len(x) == 0:
        raise InputError("`predicted` and `actual` must hold at least one pair to plot. Got none.")
    groups = np.zeros(len(x), dtype=np.int64) if test_index is None else np.asarray(test_index).reshape(-1)
    if len(groups) != len(x):
        raise InputError(f"`test_index` must have one entry per pair ({len(x)}). Got {len(groups)}.")

    fig = Figure(figsize=(5.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    scatter_panel(
        fig.add_subplot(),
        x,
        y,
        groups,
        xlabel="Predicted change in test loss  (−I_up,loss / n)",
        ylabel="Actual change in test loss  (retrained)",
        title=title,
        what="test point",
        unit="pairs",
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png")
    return fig


def scatter_panel(
    ax: Any,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None,
    what: str,
    unit: str,
) -> None:
    """Actual (y) against predicted (x) on one axis: shared ranges, the diagonal, colours by ``groups`` (2 to 10
    of them, labelled "<what> <label>"), Pearson's r in the title."""
    labels = np.unique(groups)
    if 2 <= len(labels) <= 10:
        for label in labels:
            sel = groups == label
            ax.scatter(x[sel], y[sel], s=16, alpha=0.8, label=f"{what} {label}")
        ax.legend(loc="upper left", fontsize="small", frameon=False)
    else:
        ax.scatter(x, y, s=16, alpha=0.8, color="tab:blue")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1e-12)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=1, linestyle="--", zorder=0)
    ax.axhline(0.0, color="0.85", linewidth=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.ticklabel_format(style="sci", axis="both", scilimits=(-3, 3))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    r = correlation_or_nan(pearson, x, y)
    line = f"Pearson r = {r:.4f}  ({len(x)} {unit})" if np.isfinite(r) else f"Pearson r undefined  ({len(x)} {unit})"
    ax.set_title(f"{title}\n{line}" if title else line)


def plot_groups(
    predicted: dict[str, Any], actual: Any, *, path: str | os.PathLike | None = None, title: str | None = None
) -> Any:
    """One panel per order: the actual change of the test loss when a group is removed (y, retrained) against the
    predicted one (x), each point a (group, test point) pair (Koh, Ang, Teo & Liang 2019, Figure 1). Returns the
    Figure."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is installed in the test environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    y = as_vector("actual", actual)
    if not predicted or len(y) == 0:
        raise InputError("`predicted` and `actual` must hold at least one order and one pair to plot. Got none.")
    fig = Figure(figsize=(4.6 * len(predicted), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    for j, (order, values) in enumerate(predicted.items()):
        x = as_vector(f"predicted[{order!r}]", values)
        if len(x) != len(y):
            raise InputError(f"`predicted[{order!r}]` must have one entry per pair ({len(y)}). Got {len(x)}.")
        name = "Newton step" if order == "newton" else f"order {order}"
        scatter_panel(
            fig.add_subplot(1, len(predicted), j + 1),
            x,
            y,
            np.zeros(len(x)),
            xlabel=f"Predicted change ({name})",
            ylabel="Actual change (retrained without the group)",
            title=title,
            what="",
            unit="pairs",
        )
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png")
    return fig
