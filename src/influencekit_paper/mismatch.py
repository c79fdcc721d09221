"""`influencekit paper readmission`: a domain mismatch on hospital readmission (Koh & Liang 2017, §5.3).

:func:`run_readmission` re-creates the paper's experiment on the UCI diabetes data:

1. a balanced training set of 20,000 encounters (10,000 readmitted within 30 days), the paper's 127
   features (:func:`~influencekit_paper.data.readmission.load_readmission`), binary logistic regression in
   float64 with L2 λ = 1e-4 inside each example's loss, trained with :func:`~influencekit.engine.training.fit_lbfgs`;
2. the mismatch: the readmitted children (age ``[0-10)``) stay, the healthy ones are removed but one
   (the paper: 3 of 24 children readmitted becomes 3 of 4), so the model learns "child → readmitted";
3. for the healthy test child predicted readmitted with the highest probability (the highest test loss),
   the remaining children are by far the most influential training points, and
   :func:`~influencekit.applications.mismatch.explain_features` shows that they act through the age-group feature.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencekit.applications.mismatch import FeatureExplanation, explain_features
from influencekit.core.checks import check_int, check_number
from influencekit.core.errors import InputError
from influencekit.core.task import ClassificationTask
from influencekit.engine.scoring import Influence
from influencekit.engine.training import fit_lbfgs

__all__ = [
    "ReadmissionResult",
    "run_readmission",
    "MismatchRows",
    "MismatchModel",
    "draw_rows",
    "standardised",
    "train_mismatch",
    "fit_logistic",
    "CHILD",
]

CHILD = "[0-10)"


@dataclass
class ReadmissionResult:
    """What :func:`run_readmission` measured and where it wrote the report.

    Positions are into the modified training set unless named ``*_row`` (0-based data rows of the CSV).

    Attributes:
        train_rows: ``(n_train,)`` the CSV rows of the training set (after the removal), in file order.
        children: ``(c,)`` training positions of the children left in it; ``children_readmitted`` their labels.
        removed_rows: CSV rows of the healthy children removed from the balanced training set.
        test_row: the CSV row of the explained test child; ``test_probability`` its predicted P(readmitted).
        influence: ``(n_train,)`` I_up,loss of every training point on that test child.
        ratio_min: min over the children of |I_up,loss| / max over all other training points of |I_up,loss|.
        ratio_max: the same with the largest child.
        ratios: ``(m,)`` ``ratio_min`` for each of the m test children predicted readmitted.
        test_children: healthy children in the test pool; ``predicted_before`` / ``predicted_after``: how many
            of them are predicted readmitted without / with the removal (``predicted_before`` is ``None`` when
            the unmodified model was not trained).
        explanation: :func:`explain_features` of the test child, ranked by |I_pert · x|.
        explanation_gradient: the same ranked by |I_pert| (features the children do not have included).
        age_rank: per remaining child, the rank (1 = first) of ``age=[0-10)`` under each ranking.
    """

    train_rows: np.ndarray
    children: np.ndarray
    children_readmitted: np.ndarray
    removed_rows: np.ndarray
    test_row: int
    test_probability: float
    influence: np.ndarray
    ratio_min: float
    ratio_max: float
    ratios: np.ndarray
    test_children: int
    predicted_before: int | None
    predicted_after: int
    explanation: FeatureExplanation
    explanation_gradient: FeatureExplanation
    age_rank: dict[str, list[int]]
    out_dir: Path
    report_path: Path
    figure_path: Path
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float, tol: float) -> tuple[ClassificationTask, Any]:
    model = torch.nn.Linear(X.shape[1], 1).to(X.dtype)
    with torch.no_grad():  # convex: start from zero so the run does not depend on torch's initialisation
        model.weight.zero_()
        model.bias.zero_()
    task = ClassificationTask(model, l2=l2)
    return task, fit_lbfgs(task, (X, y), tol=tol, max_iter=5000)


def _probability(task: ClassificationTask, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(task.model(X)[:, 0])


def run_readmission(
    csv: str | os.PathLike,
    out_dir: str | os.PathLike = "influencekit-readmission",
    *,
    n_train: int = 20_000,
    keep_healthy_children: int = 1,
    l2: float = 1e-4,
    solver: str = "exact",
    k: int = 10,
    label: str = "<30",
    test_row: int | None = None,
    compare: bool = True,
    tol: float = 1e-8,
    seed: int = 0,
    progress: bool = False,
) -> ReadmissionResult:
    """Koh & Liang (2017) §5.3 on the UCI diabetes data: find the training points behind a domain mismatch.

    Builds a balanced training set of ``n_train`` encounters (half readmitted; every readmitted child is put
    in it, the rest drawn at random with ``seed``), removes all but ``keep_healthy_children`` of its healthy
    children, standardises the 8 count features with the balanced training set's mean and s.d., trains
    binary logistic regression (float64, L2 ``l2``, :func:`~influencekit.engine.training.fit_lbfgs` to ‖∇R‖ ≤ ``tol``),
    and explains the healthy test child predicted readmitted with the highest probability (or ``test_row``):
    I_up,loss of every training point, the ratio of the children's influence to everyone else's, and
    :func:`explain_features` (both rankings). The test pool is every encounter outside the balanced set.
    Writes ``report.md`` and ``influence.png`` into ``out_dir``.

    Args:
        csv: ``dataset_diabetes.zip``, ``diabetic_data.csv`` or a folder holding either.
        out_dir: the output folder (created).
        n_train: size of the balanced training set before the removal (even; the paper: 20,000).
        keep_healthy_children: healthy children left in the training set (the paper: 1, i.e. 3 of 4 readmitted).
        l2: λ of the L2 term inside each example's loss (the paper: 1e-4).
        solver: the inverse-Hessian solver (``"exact"`` or ``"cg"``; 128 parameters).
        k: training points explained by :func:`explain_features`.
        label: ``"<30"`` (the paper's) or ``"any"`` (see
        :func:`~influencekit_paper.data.readmission.load_readmission`).
        test_row: explain this 0-based CSV row instead (it must be in the test pool).
        compare: also train on the unmodified balanced set, to count the test children it predicts readmitted.
        tol: training tolerance on ‖∇R‖.
        seed: seed of the training set draw and of which healthy children stay.
        progress: show progress bars.
    """
    from .data.readmission import load_readmission

    started = time.perf_counter()
    n_train = check_int("n_train", n_train, low=2)
    if n_train % 2:
        raise InputError(f"`n_train` must be even (a balanced training set: half readmitted). Got {n_train}.")
    keep_healthy_children = check_int("keep_healthy_children", keep_healthy_children, low=0)
    l2 = check_number("l2", l2, low=0.0)
    tol = check_number("tol", tol, low=0.0, low_inclusive=False)
    seed = check_int("seed", seed)
    k = check_int("k", k, low=1)
    if solver not in ("exact", "cg"):
        raise InputError(f"`solver` must be 'exact' or 'cg' (the model has 128 parameters). Got {solver!r}.")

    data = load_readmission(csv, label=label)
    rows = draw_rows(data, n_train, keep_healthy_children, label, seed)
    X = standardised(data, rows.balanced)
    fit = train_mismatch(X, data.y, rows, l2, tol, compare)
    chosen = _test_child(fit, rows, test_row, keep_healthy_children, len(data.y))
    found = _measure(data, X, rows, fit, chosen, solver=solver, k=k, progress=progress)
    seconds = time.perf_counter() - started
    settings = {"label": label, "seed": seed, "n_balanced": n_train}
    return _finish(data, X, rows, fit, found, chosen, Path(out_dir), settings, l2, seconds)


@dataclass
class MismatchRows:
    """Which CSV rows go where: the balanced draw and the test pool outside it, the healthy children of the draw
    and those removed from it, the training set left, and the healthy children of the test pool."""

    balanced: np.ndarray
    test_pool: np.ndarray
    healthy: np.ndarray
    removed: np.ndarray
    train_rows: np.ndarray
    test_children: np.ndarray


def draw_rows(data: Any, n_train: int, keep_healthy_children: int, label: str, seed: int) -> MismatchRows:
    """The balanced training set (every readmitted child in it), less all but ``keep_healthy_children`` healthy
    children."""
    y_all = data.y.numpy()
    child = data.age == CHILD
    per_class = n_train // 2
    pos, neg = np.flatnonzero(y_all == 1), np.flatnonzero(y_all == 0)
    if per_class > len(pos) or per_class > len(neg):
        raise InputError(
            f"`n_train` must be at most {2 * min(len(pos), len(neg))} for a balanced training set ({len(pos)} "
            "readmitted and "
            f"{len(neg)} other encounters with label={label!r}). Got {n_train}."
        )
    rng = np.random.default_rng(seed)
    sick_children = pos[child[pos]]
    others = rng.permutation(pos[~child[pos]])[: per_class - len(sick_children)]
    balanced = np.sort(np.concatenate([sick_children, others, rng.permutation(neg)[:per_class]]))
    test_pool = np.setdiff1d(np.arange(len(y_all)), balanced)
    healthy = balanced[child[balanced] & (y_all[balanced] == 0)]
    if keep_healthy_children > len(healthy):
        raise InputError(
            f"`keep_healthy_children` must be at most {len(healthy)} (the healthy children in the balanced training "
            "set). "
            f"Got {keep_healthy_children}."
        )
    kept = rng.permutation(healthy)[:keep_healthy_children]
    removed = np.setdiff1d(healthy, kept)
    train_rows = np.setdiff1d(balanced, removed)
    test_children = test_pool[child[test_pool] & (y_all[test_pool] == 0)]
    if len(test_children) == 0:
        raise InputError("no healthy child is left outside the training set to explain; use a smaller `n_train`.")
    return MismatchRows(balanced, test_pool, healthy, removed, train_rows, test_children)


def standardised(data: Any, balanced: np.ndarray) -> torch.Tensor:
    """The features with the count columns standardised by the balanced training set's mean and s.d."""
    X = data.X.clone()
    stats = X[torch.as_tensor(balanced)][:, data.numeric]
    mean, std = stats.mean(0), stats.std(0)
    X[:, data.numeric] = (X[:, data.numeric] - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return X


@dataclass
class MismatchModel:
    """The model trained after the removal, its training report, its P(readmitted) of the healthy test children
    and how many of them the model trained before the removal predicts readmitted (``None``: not trained)."""

    task: ClassificationTask
    report: Any
    train: tuple[torch.Tensor, torch.Tensor]
    p_children: torch.Tensor
    predicted_before: int | None


def train_mismatch(
    X: torch.Tensor, y: torch.Tensor, rows: MismatchRows, l2: float, tol: float, compare: bool
) -> MismatchModel:
    predicted_before = None
    if compare:
        task0, _ = fit_logistic(X[torch.as_tensor(rows.balanced)], y[torch.as_tensor(rows.balanced)], l2, tol)
        predicted_before = int((_probability(task0, X[torch.as_tensor(rows.test_children)]) > 0.5).sum())
    tr = torch.as_tensor(rows.train_rows)
    train = (X[tr], y[tr])
    task, report = fit_logistic(*train, l2, tol)
    p_children = _probability(task, X[torch.as_tensor(rows.test_children)])
    return MismatchModel(task, report, train, p_children, predicted_before)


def _test_child(
    fit: MismatchModel, rows: MismatchRows, test_row: int | None, keep_healthy_children: int, n_rows: int
) -> int:
    """``test_row`` checked, or the healthy test child predicted readmitted with the highest probability."""
    if test_row is None:
        if not bool((fit.p_children > 0.5).any()):
            raise InputError(
                f"no healthy test child is predicted readmitted after keeping {keep_healthy_children} healthy "
                "children: "
                "the mismatch did not take; lower `keep_healthy_children`."
            )
        return int(rows.test_children[int(fit.p_children.argmax())])
    chosen = check_int("test_row", test_row, low=0, high=n_rows - 1)
    if chosen not in set(rows.test_pool.tolist()):
        raise InputError(f"`test_row` must be an encounter outside the training set. Got {chosen}, which is in it.")
    return chosen


@dataclass
class _Measured:
    """What influence says about the test child (see :class:`ReadmissionResult`)."""

    children: np.ndarray
    ratios: np.ndarray
    explanation: FeatureExplanation
    explanation_gradient: FeatureExplanation
    values: np.ndarray
    ratio_min: float
    ratio_max: float
    age_rank: dict[str, list[int]]


def _measure(
    data: Any,
    X: torch.Tensor,
    rows: MismatchRows,
    fit: MismatchModel,
    chosen: int,
    *,
    solver: str,
    k: int,
    progress: bool,
) -> _Measured:
    """Influence of every training point on the test child (and on every test child predicted readmitted), the
    children's share of it, and :func:`explain_features` of the test child under both rankings."""
    y = data.y
    train_rows = rows.train_rows
    wrong = rows.test_children[(fit.p_children > 0.5).numpy()]
    inf = Influence(fit.task, fit.train, solver=solver, progress=progress).fit()
    children = np.flatnonzero((data.age == CHILD)[train_rows])
    others_mask = np.ones(len(train_rows), dtype=bool)
    others_mask[children] = False
    scores = (
        inf.scores((X[torch.as_tensor(wrong)], y[torch.as_tensor(wrong)])).values.abs().cpu().numpy()
        if len(wrong)
        else np.zeros((0, len(train_rows)))
    )
    ratios = scores[:, children].min(1) / scores[:, others_mask].max(1) if len(children) else np.zeros(0)
    point = (X[chosen : chosen + 1], y[chosen : chosen + 1])
    names = data.feature_names
    explanation = explain_features(inf, point, k=k, feature_names=names, n_show=4, rank_by="gradient_x_input")
    explanation_gradient = explain_features(inf, point, k=k, feature_names=names, n_show=4, rank_by="gradient")
    values = inf.scores(point).values[0].cpu().numpy()
    a = np.abs(values)
    ratio_min = float(a[children].min() / a[others_mask].max()) if len(children) else float("nan")
    ratio_max = float(a[children].max() / a[others_mask].max()) if len(children) else float("nan")
    age = data.feature_index("age=" + CHILD)
    age_rank: dict[str, list[int]] = {}
    for ex in (explanation, explanation_gradient):
        where = {int(t): r for r, t in enumerate(ex.train_indices.tolist())}
        age_rank[ex.rank_by] = [
            int((ex.order[where[c]] == age).nonzero()[0, 0]) + 1 for c in children.tolist() if c in where
        ]
    return _Measured(children, ratios, explanation, explanation_gradient, values, ratio_min, ratio_max, age_rank)


def _finish(
    data: Any,
    X: torch.Tensor,
    rows: MismatchRows,
    fit: MismatchModel,
    found: _Measured,
    chosen: int,
    out: Path,
    settings: dict[str, Any],
    l2: float,
    seconds: float,
) -> ReadmissionResult:
    """Write ``influence.png`` and ``report.md`` into ``out`` and return the result with its printed summary."""
    y_all = data.y.numpy()
    train_rows, children, names = rows.train_rows, found.children, data.feature_names
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "influence.png"
    probability = float(_probability(fit.task, X[chosen : chosen + 1])[0])
    _plot(found.values, children, y_all[train_rows][children], found.explanation, names, figure, chosen, probability)
    metadata = {
        **found.explanation.metadata,
        "train_report": fit.report.__dict__,
        "label": settings["label"],
        "seed": settings["seed"],
        "n_balanced": settings["n_balanced"],
        "source": data.source,
        "standardised": [names[j] for j in data.numeric],
    }
    result = ReadmissionResult(
        train_rows=train_rows,
        children=children,
        children_readmitted=y_all[train_rows][children],
        removed_rows=rows.removed,
        test_row=chosen,
        test_probability=probability,
        influence=found.values,
        ratio_min=found.ratio_min,
        ratio_max=found.ratio_max,
        ratios=found.ratios,
        test_children=len(rows.test_children),
        predicted_before=fit.predicted_before,
        predicted_after=int((fit.p_children > 0.5).sum()),
        explanation=found.explanation,
        explanation_gradient=found.explanation_gradient,
        age_rank=found.age_rank,
        out_dir=out,
        report_path=out / "report.md",
        figure_path=figure,
        text="",
        metadata=metadata,
    )
    result.report_path.write_text(_report(result, data, rows.healthy, l2, seconds))
    result.text = _summary(result, seconds)
    return result


def _summary(r: ReadmissionResult, seconds: float) -> str:
    n_sick = int(r.children_readmitted.sum())
    lines = [
        f"training set: {len(r.train_rows)} encounters; children [0-10) in it: {len(r.children)}, {n_sick} readmitted "
        f"({len(r.removed_rows)} healthy children removed)",
        "healthy test children predicted readmitted: "
        + (f"{r.predicted_before} of {r.test_children} before the removal, " if r.predicted_before is not None else "")
        + f"{r.predicted_after} of {r.test_children} after",
        f"explained: test row {r.test_row} (a healthy child, P(readmitted) = {r.test_probability:.3f})",
        f"|I_up,loss| of the children / largest of any other training point: {r.ratio_min:.1f}x (smallest child) to "
        f"{r.ratio_max:.1f}x (largest); over all {len(r.ratios)} test children predicted readmitted, the "
        "smallest-child "
        f"ratio is {np.median(r.ratios):.1f}x median (min {r.ratios.min():.1f}x, max {r.ratios.max():.1f}x)"
        if len(r.ratios)
        else "no test child is predicted readmitted",
        "rank of age=[0-10) among each child's features: by |I_pert*x| "
        + str(r.age_rank.get("gradient_x_input"))
        + ", by |I_pert| "
        + str(r.age_rank.get("gradient")),
        "",
        r.explanation.table(),
        "",
        f"report and figure: {r.out_dir.resolve()} ({seconds:.0f} s)",
    ]
    return "\n".join(lines)


def _report(r: ReadmissionResult, data: Any, healthy: np.ndarray, l2: float, seconds: float) -> str:
    n_sick = int(r.children_readmitted.sum())
    child_rows = r.train_rows[r.children]
    order = np.argsort(-np.abs(r.influence))
    rank_of = {int(t): i + 1 for i, t in enumerate(order.tolist())}
    others = np.delete(np.abs(r.influence), r.children)
    outcome = "readmitted <30" if data.label == "<30" else "readmitted"
    child_table = [
        f"| training position | CSV row | encounter_id | {outcome} | I_up,loss | rank by abs(I_up,loss) | x largest "
        "other |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, row in zip(r.children.tolist(), child_rows.tolist()):
        child_table.append(
            f"| {c} | {row} | {int(data.encounter_id[row])} | {'yes' if data.y[row] else 'no'} | {r.influence[c]:+.4g} "
            "| "
            f"{rank_of[c]} | {abs(r.influence[c]) / others.max():.1f} |"
        )
    meta = r.metadata
    lines = [
        "# Domain mismatch on hospital readmission (Koh & Liang 2017, §5.3)",
        "",
        f"Data: `{data.source}` ({len(data)} encounters), the paper's {len(data.feature_names)} features (8 counts, "
        "standardised with the balanced training set's mean and s.d., and one-hot demographics, discharge "
        "disposition, "
        f"lab results and medications). Label: readmitted {'within 30 days' if data.label == '<30' else 'at all'}. "
        f"Balanced training set of {meta['n_balanced']} encounters (seed {meta['seed']}; every readmitted child put in "
        "it), "
        f"holding {len(healthy) + n_sick} children [0-10), {n_sick} readmitted. The mismatch: {len(r.removed_rows)} of "
        "its "
        f"{len(healthy)} healthy children are removed, leaving {len(r.children)} children, {n_sick} readmitted "
        f"[paper: 3 of 24 becomes 3 of 4]. Binary logistic regression in float64, L2 λ = {l2:g} inside each example's "
        "loss, "
        f"trained with fit_lbfgs to ‖∇R‖ = {meta['train_report']['grad_norm']:.1e} on {len(r.train_rows)} encounters; "
        f"{meta['solver']} inverse Hessian.",
        "",
        "Healthy test children (not in the training set) predicted readmitted: "
        + (
            f"**{r.predicted_before} of {r.test_children}** trained on the balanced set, "
            if r.predicted_before is not None
            else ""
        )
        + f"**{r.predicted_after} of {r.test_children}** after the removal.",
        "",
        f"## The highest-loss test child: CSV row {r.test_row} (encounter_id {int(data.encounter_id[r.test_row])})",
        "",
        f"Healthy, predicted readmitted with P = {r.test_probability:.3f}. The children left in the training set are "
        "the "
        f"{len(r.children)} most influential training points; the least of them has **{r.ratio_min:.1f}×** and the "
        "most "
        f"**{r.ratio_max:.1f}×** the |I_up,loss| of the most influential other training point [paper: 30–40×]. "
        "Readmitted children are harmful to this test point (I_up,loss > 0: they push it towards 'readmitted'), the "
        "healthy one is helpful.",
        "",
        *child_table,
        "",
        f"Over all {len(r.ratios)} healthy test children predicted readmitted, the least influential child has "
        + (
            f"{np.median(r.ratios):.1f}× (median; min {r.ratios.min():.1f}×, max {r.ratios.max():.1f}×) "
            if len(r.ratios)
            else "— "
        )
        + "the |I_up,loss| of the most influential other training point.",
        "",
        "## Through which features they act (`explain_features`)",
        "",
        "I_pert,loss of each of the most influential training points, ranked by |I_pert · x| (the first-order change "
        "of "
        "its influence if the feature were set to 0, i.e. among the features the encounter has):",
        "",
        r.explanation.markdown(),
        "",
        f"Rank of `age=[0-10)` among each child's 127 features: {r.age_rank.get('gradient_x_input')} by |I_pert · x|, "
        f"{r.age_rank.get('gradient')} by the raw |I_pert|. The raw ranking also counts features a child does not "
        "have: "
        "raising an absent indicator moves the point's margin by that feature's weight, so the discharge codes with "
        "the "
        "largest weights come first there:",
        "",
        r.explanation_gradient.markdown(),
        "",
        "![influence](influence.png)",
        "",
        f"Total time {seconds:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _plot(
    values: np.ndarray,
    children: np.ndarray,
    readmitted: np.ndarray,
    explanation: FeatureExplanation,
    names: list[str],
    path: Path,
    test_row: int,
    probability: float,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    others = np.setdiff1d(np.arange(len(values)), children)
    left.scatter(
        others, values[others], s=3, color="tab:gray", alpha=0.5, label="other training points", rasterized=True
    )
    for c, sick in zip(children.tolist(), readmitted.tolist()):
        left.scatter([c], [values[c]], s=40, color="tab:red" if sick else "tab:green", zorder=3)
        left.annotate(
            "readmitted child" if sick else "healthy child",
            (c, values[c]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    left.axhline(0, color="black", lw=0.5)
    left.set_xlabel("training point")
    left.set_ylabel("I_up,loss on the test child (> 0: harmful)")
    left.set_title(f"influence on test row {test_row} (healthy child, P(readmitted) = {probability:.2f})", fontsize=9)
    left.legend(fontsize=7, loc="lower right")

    where = {int(t): r for r, t in enumerate(explanation.train_indices.tolist())}
    rows = [where[c] for c in children.tolist() if c in where]
    if rows:
        attribution = explanation.attribution()[rows].abs().mean(0).numpy()
        top = np.argsort(-attribution)[:8][::-1]
        right.barh(
            [names[j] for j in top],
            attribution[top],
            color=["tab:red" if names[j].startswith("age=") else "tab:blue" for j in top],
        )
        right.set_xlabel("mean over the children of |I_pert · x|")
        right.set_title("features through which the children act", fontsize=9)
        right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
