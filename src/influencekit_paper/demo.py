"""`influencekit demo`: influence against actual leave-one-out retraining on scikit-learn's digits.

Multiclass logistic regression (1,200 training / 597 test images, λ = 1e-3) trained to ‖∇R‖ < 1e-9.
For the highest-loss test images: exact, CG and LiSSA influence; actual leave-one-out retraining of the
top-k training points by |influence| plus random ones (the paper's Figure 2 recipe); Pearson r per
solver; the most helpful and harmful training images. Everything goes to an output folder with a
Markdown report; retrainings are cached there so a rerun (or an interrupted run) does not redo them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from influencekit.applications.explain import DigitsModel, train_digits_logistic
from influencekit.engine.scoring import Influence
from influencekit.report.figures import plot_influential_images
from influencekit.validation import leave_one_out, pearson, plot_loo, spearman

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo measured and where it wrote it."""

    out_dir: Path
    table: list[dict[str, Any]]
    report_path: Path
    figures: list[Path] = field(default_factory=list)
    text: str = ""


def run_demo(
    out_dir: str | Path = "influencekit-demo",
    *,
    n_test: int = 3,
    top_k: int = 30,
    n_random: int = 20,
    k_show: int = 5,
    l2: float = 1e-3,
    seed: int = 0,
    solvers: tuple[str, ...] = ("exact", "cg", "lissa"),
    progress: bool = False,
) -> DemoResult:
    """Run the demo and write ``report.md``, ``loo_<solver>.png`` and ``influential.png`` into ``out_dir``.

    Under a torch.distributed process group (e.g. ``torchrun ... -m influencekit.cli demo``) every rank calls
    this: the influence computations are sharded, while rank 0 alone retrains (the others wait at a barrier),
    plots and writes; the other ranks return an empty table and no files.
    """
    import torch.distributed as dist

    from influencekit.core.distributed import is_main_process

    main = is_main_process()
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    digits = train_digits_logistic(l2=l2, seed=seed)
    X_test, y_test = digits.test
    chosen = digits.hardest(n_test)
    test = (X_test[chosen], y_test[chosen])
    fitted, timings = _fit_solvers(digits, solvers, progress)

    # Ground truth once: retrain without each selected point (selection by the exact solver's ranking).
    reference = "exact" if "exact" in fitted else solvers[0]
    shard = fitted[reference].engine.shard  # a one-rank LocalShard when not distributed
    sharded = shard.world_size > 1
    loo = None
    if main:  # retrainings are not sharded: rank 0 does them with an unsharded copy of the reference
        ref = (
            fitted[reference]
            if not sharded
            else Influence(
                digits.task,
                digits.train,
                solver=reference,
                solver_options=fitted[reference].solver_options,
                distributed=False,
            ).fit()
        )
        loo = leave_one_out(
            ref, test, top_k=top_k, n_random=n_random, seed=seed, cache_dir=out / "loo-cache", progress=progress
        )
    if sharded:
        dist.barrier()
    table, figures = _compare_solvers(fitted, test, timings, loo, out, main=main)

    ranked = fitted[reference].top_k(test, k=k_show)
    if not main:
        return DemoResult(out, [], out / "report.md")
    gallery = out / "influential.png"
    _plot_gallery(digits, test, ranked, gallery)
    figures.append(gallery)
    report_path = out / "report.md"
    report_path.write_text(
        _report(
            digits, chosen, table, loo, figures, n_test=n_test, top_k=top_k, n_random=n_random, l2=l2, started=started
        )
    )
    text = _summary(table, loo, out)
    return DemoResult(out, table, report_path, figures, text)


def _fit_solvers(
    digits: DigitsModel, solvers: tuple[str, ...], progress: bool
) -> tuple[dict[str, Influence], dict[str, float]]:
    """One fitted Influence per solver, and the seconds each fit took."""
    fitted: dict[str, Influence] = {}
    timings: dict[str, float] = {}
    for name in solvers:
        t0 = time.perf_counter()
        # LiSSA's residual is reported in the table; its convergence warning would only repeat it
        options = {"warn": False} if name == "lissa" else {}
        fitted[name] = Influence(
            digits.task, digits.train, solver=name, solver_options=options, progress=progress
        ).fit()
        timings[name] = time.perf_counter() - t0
    return fitted, timings


def _compare_solvers(
    fitted: dict[str, Influence], test: Any, timings: dict[str, float], loo: Any, out: Path, *, main: bool
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Score the test points with every solver (on every rank; ``timings`` grows by the scoring time) and, on
    rank 0, compare each with the actual leave-one-out changes: the table rows and the scatter plots written."""
    table = []
    figures = []
    for name, inf in fitted.items():
        t0 = time.perf_counter()
        scores = inf.scores(test)
        timings[name] += time.perf_counter() - t0
        if not main:
            continue
        predicted = scores.predicted_loo_change().numpy()[loo.test_index, loo.train_index]
        report = scores.metadata["solve_reports"][0]
        table.append(
            {
                "solver": name,
                "pearson": pearson(predicted, loo.actual),
                "spearman": spearman(predicted, loo.actual),
                "seconds": timings[name],
                "iterations": report["iterations"],
                "relative_residual": report["relative_residual"],
            }
        )
        path = out / f"loo_{name}.png"
        plot_loo(
            predicted,
            loo.actual,
            test_index=loo.test_index,
            path=path,
            title=f"{name} solver, digits logistic regression",
        )
        figures.append(path)
    return table, figures


def _plot_gallery(digits: DigitsModel, test: Any, ranked: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    X_train, y_train = digits.train
    fig = plot_influential_images(
        test[0].numpy(),
        test[1].numpy(),
        X_train.numpy(),
        y_train.numpy(),
        ranked.helpful,
        ranked.harmful,
        n_train=len(y_train),
        path=path,
    )
    plt.close(fig)


def _report(
    digits: DigitsModel,
    chosen: Any,
    table: list[dict[str, Any]],
    loo: Any,
    figures: list[Path],
    *,
    n_test: int,
    top_k: int,
    n_random: int,
    l2: float,
    started: float,
) -> str:
    n, n_test_images = len(digits.train[1]), len(digits.test[1])
    gallery = figures[-1]
    lines = [
        "# influencekit demo: influence functions against leave-one-out retraining",
        "",
        f"Multiclass logistic regression on scikit-learn's digits: {n} training / {n_test_images} test images, "
        f"pixels in [0, 1], l2 = {l2:g}, trained to ||grad R|| = {digits.train_report.grad_norm:.1e}; test accuracy "
        f"{digits.accuracy:.3f}.",
        f"Test points: the {n_test} with the highest loss ({', '.join(str(int(c)) for c in chosen)}). For each, "
        f"{top_k} training points with the largest |influence| plus {n_random} random ones were removed one at a time "
        "and the model retrained (warm start from the fitted parameters, Newton-type steps to ||grad R|| <= 1e-9): "
        f"{len(loo)} pairs, "
        f"{len(np.unique(loo.train_index))} retrainings.",
        "",
        "| solver | Pearson r | Spearman | fit + score (s) | iterations | relative residual |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['solver']} | {row['pearson']:.4f} | {row['spearman']:.4f} | {row['seconds']:.2f} | "
            f"{row['iterations']} | {row['relative_residual']:.1e} |"
        )
    lines += ["", "Predicted (x) against actual (y) change of the test loss when a training point is removed:", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures[:-1]]
    lines += [
        "",
        "The most helpful (green) and harmful (red) training images for each test image:",
        "",
        f"![influential]({gallery.name})",
        "",
    ]
    lines.append(f"Total time {time.perf_counter() - started:.1f} s.")
    return "\n".join(lines) + "\n"


def _summary(table: list[dict[str, Any]], loo: Any, out: Path) -> str:
    lines = [
        f"influence vs actual leave-one-out retraining on digits ({len(loo)} test/train pairs):",
        f"{'solver':8s} {'Pearson r':>10s} {'Spearman':>9s} {'seconds':>8s} {'iterations':>10s}",
    ]
    for row in table:
        lines.append(
            f"{row['solver']:8s} {row['pearson']:10.4f} {row['spearman']:9.4f} {row['seconds']:8.2f} "
            f"{row['iterations']:10d}"
        )
    lines.append(f"report, figures and cached retrainings: {out.resolve()}")
    return "\n".join(lines)
