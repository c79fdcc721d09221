"""`influencekit paper groups`: group effects checked by retraining on the paper's own data (Koh et al. 2019).

Two real problems, each trained as the paper's experiment trains it, then for every group of training points
the predicted change of the test measurement if the group is removed (:meth:`~influencekit.Influence.group_influence`,
orders 1 and 2 and the Newton step) against retraining without it (:func:`~influencekit.validation.validate_groups`):

- ``readmission``: the §5.3 domain mismatch (UCI diabetes, 20,000 balanced encounters, all but one healthy child
  removed; :mod:`~influencekit_paper.mismatch`); groups = each age decade and each admission source of the
  training encounters; test = the healthy test children, whose mean loss the mismatch raised.
- ``spam``: Enron1 word-presence features and logistic regression as in §5.4 (:mod:`~influencekit_paper.spam`,
  no flipped labels); groups = 20 k-means clusters of the training e-mails, and the e-mails holding each of the
  address-like tokens ``ect``, ``hou``, ``enron``, ``com``, ``http``, ``www`` (Enron's own address fragments and web
  links);
  the test accuracy after removal: predicted by evaluating the model at θ̂ + Δθ of each order, actual after retraining.

Writes ``report.md`` (per grouping: the groups ranked by the predicted effect, against the actual one; the metrics per
order) and ``groups.png`` (the Koh et al. 2019 scatter of each grouping) into an output folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencekit.core.checks import check_choice, check_int
from influencekit.data.examples import DataSource
from influencekit.engine.scoring import Influence
from influencekit.validation.groups import GroupValidation, metrics_of, validate_groups

__all__ = ["GroupEffectsResult", "run_group_effects", "PROBLEMS", "SENDER_TOKENS"]

PROBLEMS = ("readmission", "spam")
SENDER_TOKENS = ("ect", "hou", "enron", "com", "http", "www")


@dataclass
class GroupEffectsResult:
    """The validations of one problem by grouping, the accuracy rows (spam) and where the report went."""

    problem: str
    validations: dict[str, GroupValidation]
    accuracy: dict[str, list[dict[str, Any]]]
    out_dir: Path
    report_path: Path
    text: str


def _readmission(csv: Path, seed: int, progress: bool) -> tuple[Influence, dict[str, Any], Any, str]:
    from .data.readmission import load_readmission
    from .mismatch import draw_rows, standardised, train_mismatch

    data = load_readmission(csv)
    rows = draw_rows(data, 20_000, 1, "<30", seed)
    X = standardised(data, rows.balanced)
    fit = train_mismatch(X, data.y, rows, 1e-4, 1e-8, compare=False)
    inf = Influence(fit.task, fit.train, solver="exact", progress=progress).fit()
    tr, te = rows.train_rows, torch.as_tensor(rows.test_children)
    groupings = {
        "age group": data.age[tr],
        "admission source": np.array([f"id {v}" for v in data.admission_source[tr]]),
    }
    setting = (
        f"§5.3 mismatch, seed {seed}: {len(tr):,} training encounters (4 children, 3 readmitted), logistic regression, "
        f"L2 1e-4, exact solver; test = the {len(te)} healthy test children (mean loss)"
    )
    return inf, groupings, (X[te], data.y[te]), setting


def _spam(enron: Path, seed: int, progress: bool) -> tuple[Influence, dict[str, Any], Any, str]:
    from sklearn.cluster import KMeans

    from influencekit.core.task import ClassificationTask
    from influencekit.engine.training import fit_lbfgs

    from .data.enron import load_enron

    data = load_enron(enron, min_df=50)
    n = len(data.y)
    n_train = int(np.floor(0.8 * n))
    order = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    train, test = (data.X[order[:n_train]], data.y[order[:n_train]]), (data.X[order[n_train:]], data.y[order[n_train:]])
    model = torch.nn.Linear(data.X.shape[1], 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    task = ClassificationTask(model, l2=1e-4)
    fit_lbfgs(task, train, tol=1e-9, max_iter=5000)
    inf = Influence(task, train, solver="exact", progress=progress).fit()
    clusters = KMeans(20, n_init=4, random_state=seed).fit_predict(train[0].numpy())
    tokens = {
        t: np.flatnonzero(train[0][:, data.vocabulary.index(t)].numpy() > 0)
        for t in SENDER_TOKENS
        if t in data.vocabulary
    }
    groupings = {
        "k-means cluster": np.array([f"cluster {c}" for c in clusters]),
        "address-like token": {f"contains '{t}'": idx for t, idx in tokens.items() if 0 < len(idx) < n_train},
    }
    setting = (
        f"Enron1, {n_train:,} train / {n - n_train:,} test e-mails (split seed {seed}), {data.X.shape[1]:,} words, "
        "logistic regression, L2 1e-4, exact solver; test = every test e-mail"
    )
    return inf, groupings, test, setting


def _accuracy_rows(inf: Influence, validation: GroupValidation, test: DataSource) -> list[dict[str, Any]]:
    """Test accuracy after removing each group: at θ̂ + Δθ of each order (the validation's predicted parameter changes),
    and after retraining (from the validation's measured losses: a test point is right when its loss is below log 2)."""
    X, y = test
    layout, task = inf.engine.layout, inf.task
    theta = layout.flatten(inf.engine.params)
    before = inf.task.measurement(inf.engine.params, test).detach()
    rows = []
    base = float((before < np.log(2)).double().mean())  # binary logistic loss < log 2 <=> the label is predicted
    for g, name in enumerate(validation.names):
        after = before + torch.as_tensor(validation.actual[g])
        row = {
            "group": name,
            "size": validation.sizes[g],
            "before": base,
            "actual": float((after < np.log(2)).double().mean()),
        }
        for order, change in validation.params_change.items():
            with torch.no_grad():
                logits = task.forward(layout.unflatten(theta + change[g]), X)[:, 0]
            row[order] = float(((logits > 0).long() == y).double().mean())
        rows.append(row)
    return rows


def run_group_effects(
    problem: str,
    data: str | Path,
    out_dir: str | Path = "influencekit-groups",
    *,
    seed: int = 0,
    progress: bool = False,
) -> GroupEffectsResult:
    """Run one problem of :data:`PROBLEMS` on its data file and write ``report.md`` and ``groups.png`` into ``out_dir``.

    Args:
        problem: ``"readmission"`` (``data``: dataset_diabetes.zip) or ``"spam"`` (``data``: enron1.tar.gz or its
        folder).
        out_dir: the output folder (created).
        seed: seed of the training-set draw (readmission) or of the split and the clusters (spam).
        progress: progress bars over the retrainings.
    """
    started = time.perf_counter()
    problem = check_choice("problem", problem, PROBLEMS)
    seed = check_int("seed", seed, low=0)
    inf, groupings, test, setting = (_readmission if problem == "readmission" else _spam)(Path(data), seed, progress)
    validations, accuracy = {}, {}
    for name, groups in groupings.items():
        validations[name] = validate_groups(inf, groups, test, progress=progress)
        if problem == "spam":
            accuracy[name] = _accuracy_rows(inf, validations[name], test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(validations, out / "groups.png")
    seconds = time.perf_counter() - started
    report = out / "report.md"
    report.write_text(_report(problem, setting, validations, accuracy, seconds))
    text = _summary(problem, validations, out, seconds)
    return GroupEffectsResult(problem, validations, accuracy, out, report, text)


def _plot(validations: dict[str, GroupValidation], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from influencekit.validation.plot import scatter_panel

    orders = list(next(iter(validations.values())).predicted)
    fig = Figure(figsize=(4.2 * len(orders), 4.2 * len(validations)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, v) in enumerate(validations.items()):
        keep = np.isfinite(v.actual).all(axis=1)
        actual = v.actual[keep].mean(axis=1)
        for j, order in enumerate(orders):
            ax = fig.add_subplot(len(validations), len(orders), i * len(orders) + j + 1)
            label = "Newton step" if order == "newton" else f"order {order}"
            scatter_panel(
                ax,
                v.predicted[order][keep].mean(axis=1),
                actual,
                np.zeros(int(keep.sum())),
                xlabel=f"predicted ({label})",
                ylabel="actual (retrained)",
                title=f"{name}: mean test-loss change",
                what="",
                unit="groups",
            )
    fig.tight_layout()
    fig.savefig(path, format="png")


def _group_table(v: GroupValidation) -> list[str]:
    mean_actual = v.actual.mean(axis=1)
    means = {o: p.mean(axis=1) for o, p in v.predicted.items()}
    order = np.argsort(-np.abs(means.get("newton", means[next(iter(means))])), kind="stable")
    head = (
        "| group | size | "
        + " | ".join("Newton" if o == "newton" else f"order {o}" for o in means)
        + " | actual (retrained) |"
    )
    lines = [head, "|---|---|" + "---|" * (len(means) + 1)]
    for g in order:
        lines.append(
            f"| {v.names[g]} | {v.sizes[g]:,} | "
            + " | ".join(f"{means[o][g]:+.4f}" for o in means)
            + f" | {mean_actual[g]:+.4f} |"
        )
    return lines


def _metrics_table(v: GroupValidation) -> list[str]:
    lines = [
        "| order | Spearman (groups, mean change) | slope | MAE | Pearson (group × test pairs) | Spearman (pairs) |",
        "|---|---|---|---|---|---|",
    ]
    keep = np.isfinite(v.actual).all(axis=1)
    for order, pred in v.predicted.items():
        mean = metrics_of(pred[keep].mean(axis=1), v.actual[keep].mean(axis=1))
        pairs = v.metrics[order]
        lines.append(
            f"| {order} | {mean['spearman']:.3f} | {mean['slope']:.2f} | {mean['mae']:.4f} | {pairs['pearson']:.3f} | "
            f"{pairs['spearman']:.3f} |"
        )
    return lines


def _report(
    problem: str,
    setting: str,
    validations: dict[str, GroupValidation],
    accuracy: dict[str, list[dict[str, Any]]],
    seconds: float,
) -> str:
    lines = [
        f"# Group effects: {problem}",
        "",
        setting + ".",
        "",
        "Predicted change of the mean test loss if each group is removed (order 1 = the sum of the points' own "
        "−I_up,loss/n; order 2 adds the second-order term; Newton = one Newton step on the objective without the "
        "group), "
        "against retraining without it (L-BFGS to ||grad R|| <= 1e-9). Slope: actual on predicted through the origin.",
        "",
    ]
    for name, v in validations.items():
        lines += [f"## {name} ({len(v.names)} groups)", "", *_metrics_table(v), "", *_group_table(v), ""]
        if name in accuracy:
            orders = [o for o in accuracy[name][0] if o not in ("group", "size", "before", "actual")]
            lines += [
                f"Test accuracy after removing the group (with every group: {accuracy[name][0]['before']:.4f}): at θ̂ "
                "+ Δθ of each "
                "order, and after retraining.",
                "",
                "| group | size | " + " | ".join(orders) + " | actual |",
                "|---|---|" + "---|" * (len(orders) + 1),
            ]
            by_effect = sorted(
                accuracy[name], key=lambda r: r["actual"]
            )  # the removals that cost the most accuracy first
            lines += [
                f"| {r['group']} | {r['size']:,} | "
                + " | ".join(f"{r[o]:.4f}" for o in orders)
                + f" | {r['actual']:.4f} |"
                for r in by_effect
            ]
            lines.append("")
    lines.append(f"Figure: groups.png. Whole run: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def _summary(problem: str, validations: dict[str, GroupValidation], out: Path, seconds: float) -> str:
    lines = [f"group effects on {problem}:"]
    for name, v in validations.items():
        keep = np.isfinite(v.actual).all(axis=1)
        parts = []
        for order, pred in v.predicted.items():
            m = metrics_of(pred[keep].mean(axis=1), v.actual[keep].mean(axis=1))
            parts.append(f"{order}: Spearman {m['spearman']:.3f}, slope {m['slope']:.2f}")
        lines.append(f"  {name} ({len(v.names)} groups): " + "; ".join(parts))
    lines.append(f"report and figure: {out.resolve()} ({seconds:.0f} s)")
    return "\n".join(lines)
