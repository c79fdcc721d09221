"""`influencekit inspect`: influence on a tabular data set, from a CSV file to an HTML report.

The workflow a data scientist runs on their own table (Koh & Liang 2017, §5.4 and §5.1):

1. encode the CSV with a :class:`~influencekit.data.tabular.TabularEncoder` fitted on the training rows
   (one-hot categories, standardised numbers, missing values imputed and counted), streaming the file in
   chunks (columns that look like identifiers are left out, with a notice); the test rows come from ``test=``
   or, without it, from a seeded held-out share of the file;
2. train a model on the mean objective with L2 λ inside each example's loss, in float64:
   ``"logreg"`` (logistic or softmax regression, :func:`~influencekit.engine.training.fit_lbfgs` to ‖∇R‖ ≤ 1e-9,
   exact influence) or ``"mlp"`` (one tanh hidden layer, a fixed budget of full-batch Adam steps with
   :func:`~influencekit.engine.training.fit_steps`; non-convex, so influence uses damping δ > 0);
3. rank the training rows by self-influence ∇L(z)ᵀ(H + δI)⁻¹∇L(z)
   (:func:`~influencekit.applications.mislabel.rank_training_points`): the top rows are the ones most
   likely mislabeled;
4. for each reported test row (the misclassified first, then by loss), the ``k`` most helpful (I_up,loss < 0: removing
them raises its loss) and
   most harmful (I_up,loss > 0) training rows (:meth:`~influencekit.Influence.top_k`);
5. with ``group_by``: the predicted effect of removing each group of training rows (each value of that column)
   on the mean test loss, at order 1 and by the Newton step (:mod:`~influencekit.applications.groups`);
6. write ``report.html`` (tables and PNG figures), ``mislabeled.csv``, ``influence.csv`` (``groups.csv``) and
   ``inspect.json`` into the output folder — built in a temporary folder beside it and renamed into place
   at the end, so a failed run leaves no report, and an earlier report is replaced only by a complete one.

Rows are identified by their data-row number in the CSV (1 = the first record after the header) and the
file line on which they start.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import check_int, check_number
from ..core.errors import InputError
from ..core.results import CONVENTION, RankedInfluence
from ..core.task import ClassificationTask
from ..data.tabular import TabularData, TabularEncoder, count_rows, read_column, read_header, read_rows
from ..engine.scoring import Influence
from ..engine.training import TrainReport, fit_lbfgs, fit_steps
from ..report import html
from .groups import GroupSummary, check_group_column, group_section, summarise_groups, write_group_outputs
from .mislabel import rank_training_points

__all__ = ["MODELS", "InspectResult", "run_inspect"]

MODELS = ("logreg", "mlp")
MARKER = "inspect.json"  # an output folder holding it is an earlier report and may be replaced
_FIGURE_ROWS = 6  # test rows drawn in test_influence.png


@dataclass
class InspectResult:
    """What :func:`run_inspect` computed and where it wrote it.

    Attributes:
        out_dir, report_path: the output folder and its ``report.html``.
        encoder: the fitted :class:`~influencekit.data.tabular.TabularEncoder` (column types, classes).
        model: the trained ``nn.Module`` (float64; one logit for two classes, else one per class).
        train, test: the encoded training rows and all test rows.
        self_influence: ``(n_train,)`` self-influence of every training row, in training order.
        order: ``(n_train,)`` training positions, most suspicious first.
        suspicious: one dict per reported suspicious row (rank, row, line, label, predicted, p_label,
            self_influence, values).
        explained: one dict per reported test row (row, line, label, predicted, p_label, loss, helpful,
            harmful; each of those a list of dicts with row, line, label, influence, loo_change, values).
        ranked: the :class:`~influencekit.RankedInfluence` of the reported test rows.
        groups: with ``group_by``, the :class:`~influencekit.applications.groups.GroupSummary` of its groups.
        train_accuracy, test_accuracy: of the trained model.
        warnings: the warnings raised while training and computing influence, as text.
        metadata: the settings, the training report and the influence metadata (also in ``inspect.json``).
        text: a short summary for the terminal.
    """

    out_dir: Path
    report_path: Path
    encoder: TabularEncoder
    model: nn.Module
    train: TabularData
    test: TabularData
    self_influence: np.ndarray
    order: np.ndarray
    suspicious: list[dict[str, Any]]
    explained: list[dict[str, Any]]
    ranked: RankedInfluence
    train_accuracy: float
    test_accuracy: float
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    groups: GroupSummary | None = None


def run_inspect(
    data: str | os.PathLike,
    label: str,
    *,
    test: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "influencekit-inspect",
    model: str = "logreg",
    l2: float = 1e-3,
    damping: float | None = None,
    solver: str = "exact",
    solver_options: dict[str, Any] | None = None,
    hidden: int = 16,
    steps: int = 1000,
    lr: float = 0.01,
    k: int = 5,
    n_suspicious: int = 20,
    max_test_rows: int = 20,
    test_fraction: float = 0.2,
    categorical: tuple[str, ...] = (),
    numeric: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
    max_categories: int = 30,
    delimiter: str = ",",
    chunk_size: int = 10_000,
    seed: int = 0,
    group_by: str | None = None,
    progress: bool = False,
) -> InspectResult:
    """Train a classifier on a CSV file and report its suspicious training rows and its most influential ones.

    Args:
        data: the training CSV (a header row, then one row per example).
        label: the name of the label column (its distinct values are the classes).
        test: a test CSV with the same columns; ``None`` holds out ``test_fraction`` of ``data`` (seeded).
        out_dir: the output folder; created, or replaced when it holds an earlier report of this command.
        model: ``"logreg"`` or ``"mlp"`` (one tanh hidden layer of ``hidden`` units).
        l2: λ of the L2 term inside each example's loss (> 0).
        damping: δ added to the Hessian; ``None`` means 0 for ``"logreg"`` and 0.01 for ``"mlp"``.
        solver, solver_options: the inverse-Hessian solver (``"exact"``, ``"cg"``, ``"lissa"``) and its settings.
        hidden, steps, lr: the MLP's hidden units and its full-batch Adam steps and learning rate. k: helpful and
            harmful training rows listed per test row.
        n_suspicious: training rows listed as most likely mislabeled.
        max_test_rows: test rows explained at most: the misclassified first, then by loss (so too the report).
        test_fraction: the held-out share of ``data`` when ``test`` is not given.
        categorical, numeric, ignore, max_categories, delimiter, chunk_size: as in
        :class:`~influencekit.data.tabular.TabularEncoder`.
        seed: seed of the held-out split and of the MLP's initialisation.
        group_by: a column whose values group the training rows (a data source, an annotator, a site): the report
            ranks the groups by the predicted effect of removing each on the mean test loss.
        progress: show progress bars.
    """
    started = time.perf_counter()
    l2, damping, hidden, k, n_suspicious, max_test_rows, test_fraction, seed = _check_arguments(
        model, l2, damping, hidden, k, n_suspicious, max_test_rows, test_fraction, seed
    )
    out = Path(out_dir)
    _check_out_dir(out)
    if group_by is not None:
        check_group_column(group_by, read_header(data, delimiter=delimiter), label)
    encoder = TabularEncoder(
        label,
        categorical=categorical,
        numeric=numeric,
        ignore=ignore,
        max_categories=max_categories,
        delimiter=delimiter,
        chunk_size=chunk_size,
        progress=progress,
    )
    train, test_data, test_source, test_path = _encode(
        encoder, data, test, test_fraction=test_fraction, delimiter=delimiter, seed=seed
    )
    fitted = _train_and_score(
        model,
        train,
        test_data,
        len(encoder.classes_),
        l2=l2,
        damping=damping,
        solver=solver,
        solver_options=solver_options,
        hidden=hidden,
        steps=steps,
        lr=lr,
        k=k,
        max_test_rows=max_test_rows,
        seed=seed,
        progress=progress,
    )
    header, suspicious, explained = _tables(fitted, encoder, train, test_data, data, test_path, n_suspicious, delimiter)
    settings = {
        "data": str(Path(data)),
        "test": test_source,
        "label": label,
        "model": _describe_model(model, hidden, steps, lr),
        "l2": l2,
        "damping": damping,
        "solver": solver,
        "solver_options": dict(solver_options or {}),
    }
    result = _result(out, encoder, train, test_data, fitted, suspicious, explained, settings)
    if group_by is not None:
        result.groups = summarise_groups(
            fitted.influence,
            read_column(data, group_by, train.rows.tolist(), delimiter=delimiter),
            test_data.tensors(),
            group_by,
        )
        result.metadata["groups"] = {**result.groups.metadata, "table": result.groups.rows}
    _write_in_place(out, result, header, fitted, test_source, started)
    result.metadata["seconds"] = time.perf_counter() - started
    result.text = _summary(result)
    return result


def _check_arguments(
    model: str,
    l2: float,
    damping: float | None,
    hidden: int,
    k: int,
    n_suspicious: int,
    max_test_rows: int,
    test_fraction: float,
    seed: int,
) -> tuple[float, float, int, int, int, int, float, int]:
    """The checked numeric arguments of :func:`run_inspect` (``damping`` defaulted by the model)."""
    if model not in MODELS:
        raise InputError(f"`model` must be one of {', '.join(map(repr, MODELS))}. Got {model!r}.")
    l2 = check_number("l2", l2, low=0.0, low_inclusive=False)
    damping = (0.0 if model == "logreg" else 0.01) if damping is None else check_number("damping", damping, low=0.0)
    if model == "mlp" and damping == 0.0:
        raise InputError(
            "`damping` must be > 0 for model='mlp': its Hessian need not be positive definite. Got 0; try 0.01."
        )
    hidden = check_int("hidden", hidden, low=1)
    k = check_int("k", k, low=1)
    n_suspicious = check_int("n_suspicious", n_suspicious, low=1)
    max_test_rows = check_int("max_test_rows", max_test_rows, low=1)
    test_fraction = check_number(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    seed = check_int("seed", seed, low=0)
    return l2, damping, hidden, k, n_suspicious, max_test_rows, test_fraction, seed


def _encode(
    encoder: TabularEncoder,
    data: str | os.PathLike,
    test: str | os.PathLike | None,
    *,
    test_fraction: float,
    delimiter: str,
    seed: int,
) -> tuple[TabularData, TabularData, str, Path]:
    """Fit the encoder on the training rows and encode them and the test rows (``test``, or a seeded held-out share of
    ``data``): ``(train, test, description of the test rows, the file they come from)``."""
    if test is None:
        n = count_rows(data, delimiter=delimiter, name="data")
        if n == 0:
            raise InputError(f"`data` ({Path(data).name}) has a header but no data rows: there is nothing to train on.")
        n_held = int(np.floor(test_fraction * n + 0.5))
        if n_held < 1 or n - n_held < 2:
            raise InputError(
                f"`data` has {n} rows, too few to hold out {test_fraction:.0%} for testing; pass a test file (`test=` "
                "/ --test) "
                "or more rows."
            )
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(seed).permutation(n)[:n_held]] = True
        train = encoder.fit_transform(data, rows=~held)
        test_data = encoder.transform(data, rows=held, name="data")
        test_source = f"{n_held} rows of {Path(data).name} held out at random (seed {seed}, {test_fraction:.0%})"
        return train, test_data, test_source, Path(data)
    train = encoder.fit_transform(data)
    test_data = encoder.transform(test, name="test")
    return train, test_data, Path(test).name, Path(test)


@dataclass
class _Fitted:
    """The trained model and what influence says about it (see :class:`InspectResult`); ``chosen`` are the test
    positions explained, ``caught`` the distinct warnings raised meanwhile, as text."""

    net: nn.Module
    train_report: TrainReport
    influence: Influence
    order: np.ndarray
    self_influence: np.ndarray
    p_train: np.ndarray
    pred_train: np.ndarray
    p_test: np.ndarray
    pred_test: np.ndarray
    chosen: np.ndarray
    ranked: RankedInfluence
    caught: list[str]


def _train_and_score(
    model: str,
    train: TabularData,
    test_data: TabularData,
    n_classes: int,
    *,
    l2: float,
    damping: float,
    solver: str,
    solver_options: dict[str, Any] | None,
    hidden: int,
    steps: int,
    lr: float,
    k: int,
    max_test_rows: int,
    seed: int,
    progress: bool,
) -> _Fitted:
    """Train the model, rank the training rows by self-influence and find the helpful and harmful rows of the
    test rows explained (misclassified first, then by loss, at most ``max_test_rows``), recording warnings."""
    net = _make_model(model, train.X.shape[1], n_classes, hidden, seed)
    task = ClassificationTask(net, l2=l2)
    X, y = train.tensors()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        if model == "logreg":
            train_report = fit_lbfgs(task, (X, y))
        else:
            train_report = fit_steps(task, (X, y), steps=steps, lr=lr, optimizer="adam")
        influence = Influence(
            task, (X, y), solver=solver, solver_options=solver_options, damping=damping, progress=progress
        ).fit()
        order_t, values_t = rank_training_points(influence, by="self_influence", return_scores=True)
        order = order_t.numpy()
        self_inf = values_t.detach().cpu().numpy()
        p_train, pred_train = _probabilities(net, X, y)
        X_test, y_test = test_data.tensors()
        p_test, pred_test = _probabilities(net, X_test, y_test)
        # the misclassified test rows first, then by loss (highest first); the first max_test_rows are explained
        chosen = np.lexsort((p_test, pred_test == test_data.y))[:max_test_rows]
        k = min(k, len(train))
        ranked = influence.top_k((X_test[chosen], y_test[chosen]), k=k)
    caught = list(
        dict.fromkeys(  # each distinct warning once; library deprecations are not about this run
            f"{w.category.__name__}: {w.message}"
            for w in records
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        )
    )
    return _Fitted(
        net, train_report, influence, order, self_inf, p_train, pred_train, p_test, pred_test, chosen, ranked, caught
    )


def _tables(
    fitted: _Fitted,
    encoder: TabularEncoder,
    train: TabularData,
    test_data: TabularData,
    data: str | os.PathLike,
    test_path: Path,
    n_suspicious: int,
    delimiter: str,
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """The CSV header, the suspicious training rows and the explained test rows, with their raw fields."""
    n_show = min(n_suspicious, len(train))
    top = fitted.order[:n_show]
    ranked, chosen = fitted.ranked, fitted.chosen
    helpful_idx, harmful_idx = ranked.helpful.indices.numpy(), ranked.harmful.indices.numpy()
    wanted_train = (
        set(train.rows[top].tolist())
        | set(train.rows[helpful_idx].ravel().tolist())
        | set(train.rows[harmful_idx].ravel().tolist())
    )
    header, raw_train = read_rows(data, wanted_train, delimiter=delimiter)
    _, raw_test = read_rows(test_path, test_data.rows[chosen].tolist(), delimiter=delimiter)
    classes = encoder.classes_
    suspicious = [
        {
            "rank": r + 1,
            "row": int(train.rows[i]),
            "line": int(train.lines[i]),
            "label": classes[int(train.y[i])],
            "predicted": classes[int(fitted.pred_train[i])],
            "p_label": float(fitted.p_train[i]),
            "self_influence": float(fitted.self_influence[i]),
            "values": raw_train[int(train.rows[i])],
        }
        for r, i in enumerate(top.tolist())
    ]
    n_train = len(train)
    explained = []
    for q, t in enumerate(chosen.tolist()):
        p_t = fitted.p_test[t]
        entry = {
            "row": int(test_data.rows[t]),
            "line": int(test_data.lines[t]),
            "label": classes[int(test_data.y[t])],
            "predicted": classes[int(fitted.pred_test[t])],
            "p_label": float(p_t),
            "loss": float(-np.log(max(p_t, 1e-300))),
            "values": raw_test[int(test_data.rows[t])],
        }
        for kind, part in (("helpful", ranked.helpful), ("harmful", ranked.harmful)):
            entry[kind] = [
                {
                    "rank": j + 1,
                    "row": int(train.rows[i]),
                    "line": int(train.lines[i]),
                    "label": classes[int(train.y[i])],
                    "influence": float(v),
                    "loo_change": -float(v) / n_train,
                    "values": raw_train[int(train.rows[i])],
                }
                for j, (i, v) in enumerate(zip(part.indices[q].tolist(), part.values[q].tolist()))
            ]
        explained.append(entry)
    return header, suspicious, explained


def _result(
    out: Path,
    encoder: TabularEncoder,
    train: TabularData,
    test_data: TabularData,
    fitted: _Fitted,
    suspicious: list[dict[str, Any]],
    explained: list[dict[str, Any]],
    settings: dict[str, Any],
) -> InspectResult:
    """The :class:`InspectResult` (accuracies and metadata included; ``seconds`` and ``text`` still to come)."""
    train_acc = float((fitted.pred_train == train.y).mean())
    test_acc = float((fitted.pred_test == test_data.y).mean())
    ranked = fitted.ranked
    metadata = {
        "data": settings["data"],
        "test": settings["test"],
        "label": settings["label"],
        "classes": encoder.classes_,
        "n_train": len(train),
        "n_test": len(test_data),
        "n_features": len(encoder.feature_names_),
        "model": settings["model"],
        "l2": settings["l2"],
        "damping": settings["damping"],
        "solver": settings["solver"],
        "train_report": fitted.train_report.__dict__,
        "grad_norm": fitted.influence.engine.grad_norm,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "warnings": fitted.caught,
        "convention": CONVENTION,
        "seconds": None,
        "influence": {key: v for key, v in ranked.metadata.items() if key not in ("convention",)},
    }
    return InspectResult(
        out_dir=out,
        report_path=out / "report.html",
        encoder=encoder,
        model=fitted.net,
        train=train,
        test=test_data,
        self_influence=fitted.self_influence,
        order=fitted.order,
        suspicious=suspicious,
        explained=explained,
        ranked=ranked,
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        warnings=fitted.caught,
        metadata=metadata,
    )


def _write_in_place(
    out: Path, result: InspectResult, header: list[str], fitted: _Fitted, test_source: str, started: float
) -> None:
    """Write the outputs beside ``out`` and rename them into place only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_outputs(
            staging, result, header, fitted.train_report, test_source, fitted.p_train, fitted.pred_train, started
        )
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ pieces
def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"`out_dir` must be a folder. Got {str(out)!r}, which is a file.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(
            f"`out_dir` {str(out)!r} exists and is not an earlier report of `influencekit inspect` (no {MARKER}); "
            "choose another folder (--out) or empty it."
        )


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an earlier report there is replaced only now."""
    _check_out_dir(out)  # again: the folder may have appeared while this ran
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)  # put the earlier report back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _make_model(model: str, d: int, n_classes: int, hidden: int, seed: int) -> nn.Module:
    outputs = 1 if n_classes == 2 else n_classes  # binary: one logit, the logistic loss of the paper
    if model == "logreg":
        net = nn.Linear(d, outputs).double()
        with torch.no_grad():  # convex: start from zero so the result does not depend on torch's initialisation
            net.weight.zero_()
            net.bias.zero_()
        return net
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).double().eval()


def _describe_model(model: str, hidden: int, steps: int, lr: float) -> str:
    if model == "logreg":
        return (
            "logistic regression (one logit for two classes, softmax otherwise), float64, L-BFGS to ||grad R|| <= 1e-9"
        )
    return f"MLP with one tanh hidden layer of {hidden} units, float64, {steps} full-batch Adam steps (lr {lr:g})"


def _probabilities(
    net: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """The model's probability of each row's given label and its predicted class, ``(n,)`` each."""
    p_label, predicted = [], []
    with torch.no_grad():
        for lo in range(0, len(y), chunk):
            logits = net(X[lo : lo + chunk])
            if logits.dim() == 1 or logits.shape[1] == 1:
                p1 = torch.sigmoid(logits.reshape(-1))
                probs = torch.stack([1 - p1, p1], dim=1)
            else:
                probs = torch.softmax(logits, dim=1)
            p_label.append(probs.gather(1, y[lo : lo + chunk, None]).squeeze(1))
            predicted.append(probs.argmax(dim=1))
    return torch.cat(p_label).numpy(), torch.cat(predicted).numpy()


# ------------------------------------------------------------------------------------------ outputs
def _write_outputs(
    folder: Path,
    result: InspectResult,
    header: list[str],
    train_report: TrainReport,
    test_source: str,
    p_train: np.ndarray,
    pred_train: np.ndarray,
    started: float,
) -> None:
    import csv

    with open(folder / "mislabeled.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "row", "line", "label", "predicted", "p_label", "self_influence", *header])
        for s in result.suspicious:
            w.writerow(
                [
                    s["rank"],
                    s["row"],
                    s["line"],
                    s["label"],
                    s["predicted"],
                    repr(s["p_label"]),
                    repr(s["self_influence"]),
                    *s["values"],
                ]
            )
    with open(folder / "influence.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "test_row",
                "test_line",
                "test_label",
                "test_predicted",
                "kind",
                "rank",
                "train_row",
                "train_line",
                "train_label",
                "influence",
                "predicted_loo_change",
            ]
        )
        for e in result.explained:
            for kind in ("helpful", "harmful"):
                for h in e[kind]:
                    w.writerow(
                        [
                            e["row"],
                            e["line"],
                            e["label"],
                            e["predicted"],
                            kind,
                            h["rank"],
                            h["row"],
                            h["line"],
                            h["label"],
                            repr(h["influence"]),
                            repr(h["loo_change"]),
                        ]
                    )
    _plot_self_influence(result, p_train, pred_train, folder / "self_influence.png")
    if result.explained:
        _plot_test_influence(result, folder / "test_influence.png")
    if result.groups is not None:
        write_group_outputs(result.groups, folder, _figure)
    seconds = time.perf_counter() - started
    result.metadata["seconds"] = seconds
    (folder / "report.html").write_text(
        _html_report(result, header, train_report, test_source, seconds), encoding="utf-8"
    )
    (folder / MARKER).write_text(json.dumps(result.metadata, indent=2, default=str), encoding="utf-8")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_self_influence(result: InspectResult, p_train: np.ndarray, pred_train: np.ndarray, path: Path) -> None:
    """Left: self-influence by rank (the listed rows in red). Right: self-influence against p(given label)."""
    values = result.self_influence
    n_show = len(result.suspicious)
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    ranked = values[result.order]
    x = np.arange(1, len(ranked) + 1)
    left.plot(x, ranked, color="tab:blue", lw=1)
    left.scatter(x[:n_show], ranked[:n_show], color="tab:red", s=12, zorder=3, label=f"the {n_show} rows listed")
    left.set_xscale("log")
    left.set_xlabel("rank (most suspicious first)")
    left.set_ylabel("self-influence")
    left.legend(fontsize=8)
    wrong = pred_train != result.train.y
    right.scatter(p_train[~wrong], values[~wrong], s=5, alpha=0.5, color="tab:gray", label="predicted = given label")
    right.scatter(p_train[wrong], values[wrong], s=7, alpha=0.7, color="tab:orange", label="predicted ≠ given label")
    top = result.order[:n_show]
    right.scatter(
        p_train[top], values[top], s=30, facecolors="none", edgecolors="tab:red", label="listed as suspicious"
    )
    right.set_xlabel("model's probability of the given label")
    right.set_ylabel("self-influence")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("Training rows by self-influence (high: the model bends to fit the row; check its label)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_test_influence(result: InspectResult, path: Path) -> None:
    """For the first test rows explained: the predicted change of their loss when each listed training row is
    removed."""
    shown = result.explained[:_FIGURE_ROWS]
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    k = len(shown[0]["helpful"])
    fig = _figure(4.2 * cols, (0.9 + 0.22 * 2 * k) * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, entry in zip(axes, shown):
        items = entry["helpful"] + entry["harmful"][::-1]
        change = [h["loo_change"] for h in items]
        names = [f"row {h['row']} ({h['label']})" for h in items]
        colors = ["tab:green"] * len(entry["helpful"]) + ["tab:red"] * len(entry["harmful"])
        ax.barh(np.arange(len(items)), change, color=colors)
        ax.set_yticks(np.arange(len(items)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"test row {entry['row']}: label {entry['label']}, predicted {entry['predicted']}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Predicted change of the test loss if the training row is removed (green: helpful, red: harmful)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, format="png")


def _columns_section(enc: TabularEncoder, result: InspectResult) -> list[str]:
    """The report's table of columns: kind, missing values (train and test), unseen values, encoding."""
    parts: list[str] = []
    parts.append(html.heading("Columns and missing values"))
    test_missing, unseen = result.test.missing, result.test.unseen
    rows = []
    for s in enc.summary():
        name = s["column"]
        rows.append([name, s["kind"], s["missing"], test_missing.get(name, 0), unseen.get(name, 0), s["encoding"]])
    if enc.identifiers_:
        parts.append(html.paragraph(identifier_notice(enc).removeprefix("notice: ").capitalize() + "."))
    parts.append(
        html.table(["column", "kind", "missing (train)", "missing (test)", "unseen values (test)", "encoding"], rows)
    )
    parts.append(
        html.paragraph(
            "Numeric: missing values are imputed by the training mean (0 after standardising) and marked in a 0/1 "
            "column. "
            "Categorical: missing values are their own category; test values never seen in training go to '(other)' "
            "when "
            "the column has one, else to no category.",
            note=True,
        )
    )
    return parts


def _html_report(
    result: InspectResult, header: list[str], train_report: TrainReport, test_source: str, seconds: float
) -> str:
    enc, meta = result.encoder, result.metadata
    data_name = Path(meta["data"]).name
    n_train, n_test = len(result.train), len(result.test)
    parts = [
        html.paragraph(
            f"{n_train:,} training rows from {data_name}; {n_test:,} test rows ({test_source}). "
            f"{len(enc.feature_names_)} features after encoding. Label {meta['label']!r} with classes "
            + ", ".join(f"{c} ({enc.label_counts_[c]:,})" for c in enc.classes_)
            + " in the training rows."
        ),
        html.paragraph(
            f"Model: {meta['model']}; L2 λ = {meta['l2']:g} inside each example's loss; influence with the "
            f"{meta['solver']} "
            f"solver, damping δ = {meta['damping']:g}. After training ||∇R(θ̂)|| = {meta['grad_norm']:.3g} "
            f"({train_report.iterations} iterations). Accuracy: training {result.train_accuracy:.4f}, test "
            f"{result.test_accuracy:.4f}. "
            f"Computed in {seconds:.1f} s."
        ),
    ]
    if result.warnings:
        parts += [html.paragraph("Warnings while training and computing influence:"), html.items(result.warnings)]

    parts += _columns_section(enc, result)

    parts.append(html.heading(f"Training rows most likely mislabeled ({len(result.suspicious)} of {n_train:,})"))
    parts.append(
        html.paragraph(
            "Ranked by self-influence ∇L(z)ᵀ(H + δI)⁻¹∇L(z) (Koh & Liang 2017, §5.4): how much the row moves the model "
            "along directions the rest of the data does not pin down. Check the labels of these rows first; the "
            "rows the model itself disagrees with are highlighted. Also in mislabeled.csv."
        )
    )
    parts.append(html.image("self_influence.png", "self-influence of the training rows"))
    parts.append(
        html.table(
            ["rank", "row", "line", "label", "predicted", "p(label)", "self-influence", *header],
            [
                [
                    s["rank"],
                    s["row"],
                    s["line"],
                    s["label"],
                    s["predicted"],
                    s["p_label"],
                    s["self_influence"],
                    *s["values"],
                ]
                for s in result.suspicious
            ],
            row_classes=["bad" if s["predicted"] != s["label"] else "" for s in result.suspicious],
        )
    )

    capped = n_test > len(result.explained)
    parts.append(html.heading(f"Most helpful and harmful training rows for {len(result.explained)} test rows"))
    parts.append(
        html.paragraph(
            (
                "The misclassified test rows, then those with the highest loss"
                if capped
                else "Every test row, the misclassified first, then by loss (highest first)"
            )
            + f". For each, the {len(result.explained[0]['helpful']) if result.explained else 0} most helpful "
            "training rows "
            "(I_up,loss < 0: removing one would raise this test row's loss) and the most harmful (I_up,loss > 0: "
            "removing "
            "one would lower it). 'LOO change' = −I_up,loss / n, the predicted change of the test loss if the training "
            "row "
            "were removed and the model retrained. Also in influence.csv."
        )
    )
    if result.explained:
        parts.append(html.image("test_influence.png", "helpful and harmful training rows"))
    for e in result.explained:
        parts.append(
            html.heading(
                f"Test row {e['row']} (line {e['line']}): label {e['label']}, predicted {e['predicted']}, "
                f"p(label) = {e['p_label']:.3g}, loss {e['loss']:.3g}",
                level=3,
            )
        )
        parts.append(html.table(header, [e["values"]]))
        table_rows, css = [], []
        for kind in ("helpful", "harmful"):
            for h in e[kind]:
                table_rows.append(
                    [kind, h["rank"], h["row"], h["line"], h["label"], h["influence"], h["loo_change"], *h["values"]]
                )
                css.append("good" if kind == "helpful" else "bad")
        parts.append(
            html.table(
                ["", "rank", "row", "line", "label", "I_up,loss", "LOO change", *header], table_rows, row_classes=css
            )
        )

    if result.groups is not None:
        parts += group_section(result.groups)
    parts.append(html.heading("Convention"))
    parts.append(html.paragraph(CONVENTION, note=True))
    parts.append(
        html.paragraph(
            "Rows are numbered from 1 for the first record after the header; 'line' is the file line on which the "
            "record "
            "starts (the header is line 1).",
            note=True,
        )
    )
    return html.page(f"influencekit inspect: {data_name}", parts)


def identifier_notice(encoder: TabularEncoder) -> str:
    """The notice on the columns left out as identifiers, with how to keep them."""
    named = ", ".join(
        f"{c.name!r} ({c.n_distinct} distinct values in {c.n_present} rows)" for c in encoder.identifiers_
    )
    return (
        f"notice: left out as identifiers (a value per row, nothing to learn from): {named}; name a column in "
        "--categorical or --numeric to use it as a feature, or in --ignore to silence this notice"
    )


def _summary(result: InspectResult) -> str:
    meta = result.metadata
    lines = [
        f"{meta['n_train']:,} training rows, {meta['n_test']:,} test rows ({meta['test']}), {meta['n_features']} "
        "features; "
        f"classes {', '.join(map(str, meta['classes']))}",
        f"{meta['model']}; l2={meta['l2']:g}, damping={meta['damping']:g}; accuracy train {result.train_accuracy:.4f}, "
        f"test {result.test_accuracy:.4f}",
    ]
    if result.encoder.identifiers_:
        lines.append(identifier_notice(result.encoder))
    if result.train.missing or result.test.missing:
        lines.append(
            "missing values imputed: "
            + ", ".join(
                f"{c} {result.train.missing.get(c, 0)} train / {result.test.missing.get(c, 0)} test"
                for c in sorted(set(result.train.missing) | set(result.test.missing))
            )
        )
    lines.append(
        "most likely mislabeled (row: label, self-influence): "
        + ", ".join(f"{s['row']}: {s['label']}, {s['self_influence']:.3g}" for s in result.suspicious[:5])
        + (" ..." if len(result.suspicious) > 5 else "")
    )
    if result.groups is not None:
        change = "newton" if result.groups.newton_error is None else "order1"
        lines.append(
            f"groups of {result.groups.column!r} by predicted effect on the mean test loss: "
            + ", ".join(f"{r['group']} ({r['size']}): {r[change]:+.3g}" for r in result.groups.rows[:5])
            + (" ..." if len(result.groups.rows) > 5 else "")
        )
    lines += [f"warning: {w}" for w in result.warnings]
    lines.append(f"report: {result.report_path.resolve()} ({meta['seconds']:.1f} s)")
    return "\n".join(lines)
