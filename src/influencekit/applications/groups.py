"""Which groups of a table's training rows matter most for its test rows: the group-effects workflow of
``influencekit inspect --group-by COLUMN`` (Koh et al. 2019; Basu et al. 2020).

Each distinct value of the column is a group; for each, the predicted change of the mean test loss if its rows
were removed and the model retrained, by :meth:`~influencekit.Influence.group_influence` at order 1 (the sum of
the rows' own predictions) and with the Newton step on the objective without the group (closer for large
groups). A table of the groups (largest effect first), a bar chart and a CSV file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError, NumericalError
from ..data.examples import DataSource
from ..data.tabular import columns_hint
from ..engine.scoring import Influence
from ..report import html

__all__ = ["GroupSummary", "summarise_groups", "MISSING_GROUP", "MAX_GROUPS"]

MISSING_GROUP = "(missing)"  # the group of rows whose group column is empty
MAX_GROUPS = 200  # more distinct values than this look like an identifier column, not groups


@dataclass
class GroupSummary:
    """The groups of one column: ``rows`` (largest |Newton change| first, or order 1 where Newton failed) with group,
    size, fraction, order1, newton, effect; ``newton_error`` says why the Newton step is missing, if it is."""

    column: str
    rows: list[dict[str, Any]]
    newton_error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def check_group_column(column: str, header: list[str], label: str) -> None:
    """Refuse a group column that is not in the file or is the label, naming the columns there are."""
    if column == label:
        raise InputError(
            f"`group_by` must not be the label column {label!r}: removing a whole class is not a data source."
        )
    if column not in header:
        raise InputError(f"`group_by` names no column of the data: {column!r}; {columns_hint(column, header)}")


def summarise_groups(influence: Influence, values: list[str], test: DataSource, column: str) -> GroupSummary:
    """Group the training rows by ``values`` (one raw value per training row) and predict each group's removal."""
    labels = np.array([v if v != "" else MISSING_GROUP for v in values], dtype=object)
    distinct = np.unique(labels)
    if len(distinct) > MAX_GROUPS:
        raise InputError(
            f"`group_by` column {column!r} has {len(distinct):,} distinct values in {len(labels):,} training rows "
            "(more than "
            f"{MAX_GROUPS}); it looks like an identifier, not a grouping. Choose a column with fewer values."
        )
    if len(distinct) < 2:
        raise InputError(
            f"`group_by` column {column!r} has one value in every training row; there is nothing to compare."
        )
    try:  # both orders from one call: the gradient pass and the first solve are shared
        both = influence.group_influence(labels.astype(str), test, order=[1, "newton"])
        first, newton, error = both["1"], both["newton"], None
    except NumericalError as exc:  # e.g. a group whose removal leaves the Hessian indefinite: order 1 still stands
        first, newton, error = influence.group_influence(labels.astype(str), test, order=1), None, str(exc)
    m1 = first.mean_change().detach().cpu().numpy()
    mn = newton.mean_change().detach().cpu().numpy() if newton is not None else None
    key = np.abs(mn if mn is not None else m1)
    rows = []
    for g in np.argsort(-key, kind="stable"):
        change = float(mn[g]) if mn is not None else float(m1[g])
        rows.append(
            {
                "group": first.names[g],
                "size": first.sizes[g],
                "fraction": first.sizes[g] / first.n_train,
                "order1": float(m1[g]),
                "newton": None if mn is None else float(mn[g]),
                "effect": "harmful" if change < 0 else "helpful",
            }
        )
    meta = {
        "column": column,
        "n_groups": len(rows),
        "seconds_order1": first.metadata.get("seconds"),
        "newton": None if newton is None else newton.metadata.get("newton"),
    }
    return GroupSummary(column, rows, error, meta)


def write_group_outputs(summary: GroupSummary, folder: Path, figure: Any) -> None:
    """``groups.csv`` and ``groups.png`` (a bar per group: the predicted change of the mean test loss)."""
    with open(folder / "groups.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                summary.column,
                "size",
                "fraction",
                "mean_test_loss_change_order1",
                "mean_test_loss_change_newton",
                "effect",
            ]
        )
        for r in summary.rows:
            w.writerow(
                [
                    r["group"],
                    r["size"],
                    repr(r["fraction"]),
                    repr(r["order1"]),
                    "" if r["newton"] is None else repr(r["newton"]),
                    r["effect"],
                ]
            )
    shown = summary.rows[:30]
    fig = figure(8, 0.8 + 0.28 * len(shown))
    ax = fig.add_subplot()
    y = np.arange(len(shown))
    ax.barh(
        y - 0.2,
        [r["order1"] for r in shown],
        height=0.4,
        color="tab:gray",
        label="order 1 (sum of the rows' influence)",
    )
    if summary.newton_error is None:
        ax.barh(
            y + 0.2, [r["newton"] for r in shown], height=0.4, color="tab:blue", label="Newton step without the group"
        )
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['group']} ({r['size']:,})" for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("predicted change of the mean test loss if the group is removed (< 0: harmful group)")
    ax.set_title(
        f"groups of {summary.column!r}"
        + (f" (largest {len(shown)} of {len(summary.rows)})" if len(summary.rows) > len(shown) else ""),
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "groups.png", format="png")


def group_section(summary: GroupSummary) -> list[str]:
    """The report's section on the groups: what each does, the figure and the table."""
    parts = [
        html.heading(f"Groups of {summary.column!r}: what removing each would do"),
        html.paragraph(
            f"Each of the {len(summary.rows)} values of {summary.column!r} is a group of training rows. For each, the "
            "predicted "
            "change of the mean test loss if its rows were removed and the model retrained: order 1 adds up the rows' "
            "own "
            "leave-one-out predictions (it underestimates large, coherent groups, Koh et al. 2019); the Newton step "
            "solves the "
            "objective without the group from θ̂. Negative: the group hurts the test rows (removing it helps); "
            "positive: it helps. "
            "Check them by retraining with ik.validate_groups."
        ),
    ]
    if summary.newton_error is not None:
        parts.append(html.paragraph(f"The Newton step is not shown: {summary.newton_error}", note=True))
    parts.append(html.image("groups.png", f"predicted effect of removing each group of {summary.column}"))
    parts.append(
        html.table(
            ["group", "rows", "share", "order 1", "Newton step", "effect"],
            [
                [
                    r["group"],
                    f"{r['size']:,}",
                    f"{r['fraction']:.1%}",
                    f"{r['order1']:+.4g}",
                    "" if r["newton"] is None else f"{r['newton']:+.4g}",
                    r["effect"],
                ]
                for r in summary.rows
            ],
        )
    )
    return parts
