"""Cost of group influence against one ``scores()`` call (issue: group effects; Koh et al. 2019, Basu et al. 2020).

Problem: scikit-learn's bundled digits, 797 training and 1,000 test images (float64), and two models:

* ``logreg``: ``nn.Linear(64, 10)`` (650 parameters), ``l2=1e-3``, exact solver;
* ``mlp``: ``Linear(64, 128)-Tanh-Linear(128, 10)`` (9,610 parameters), ``l2=1e-3``, damping 0.01, the exact solver
  (its dense Hessian is fitted once) and CG (every solve a CG run).

Groups: ``--groups`` (100) disjoint groups, a seeded random partition of the training set. For each model the script
times, in one process, after ``fit``:

    t_grad    one per-example-gradient pass over the training set (best of 5)
    t_scores  inf.scores(test): all 1,000 × 797 scores (what the pointwise answer costs)
    t_1       inf.group_influence(groups, test, order=1)
    t_2       order 2 (order 1's work, then the group HVPs, third derivatives, one more block solve and the test-side
              second directional derivatives)
    t_newton  the Newton step (order 1's work, then CG preconditioned by the fitted solver, then 100 × 1,000 forwards)

and prints them in seconds, in gradient passes, and as ratios to ``t_scores``, with the seconds spent in the
solves beyond order 1's (order 2: one block solve; Newton: one per CG iteration; each includes the residual check).
Order 1 also checks itself against the
sum of the pointwise scores over each group (relative error printed). Not a timed test: figures go to
docs/benchmarks.md with the command that made them.

Usage::

    python benchmarks/groups.py                 # both models (~1-2 min on 2 cores)
    python benchmarks/groups.py --models logreg --groups 50
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

sys.path.pop(0)  # this folder would shadow packages (e.g. a module named like one of ours): import the installed one
import influencekit as ik  # noqa: E402
from influencekit.data import load_digits_split  # noqa: E402


def _timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _model(name: str, train) -> tuple[ik.Task, list[tuple[str, dict]]]:
    torch.manual_seed(0)
    if name == "logreg":
        model = torch.nn.Linear(64, 10).double()
        task = ik.ClassificationTask(model, l2=1e-3)
        ik.fit_lbfgs(task, train, tol=1e-9)
        return task, [("exact", {"damping": 0.0})]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).double()
    task = ik.ClassificationTask(model, l2=1e-3)
    ik.fit_lbfgs(task, train, max_iter=3000, tol=1e-6)
    return task, [("exact", {"damping": 0.01}), ("cg", {"damping": 0.01})]


def run(name: str, n_groups: int, train, test) -> list[str]:
    task, solvers = _model(name, train)
    n = len(train[1])
    groups = np.array_split(np.random.default_rng(0).permutation(n), n_groups)
    rows = []
    for solver, options in solvers:
        inf = ik.Influence(task, train, solver=solver, stationarity_tol=1e-2, **options).fit()
        t_grad, _ = _timed(lambda inf=inf: list(inf.gradients_.stream(inf.train_, side="train")), repeats=5)
        t_scores, scores = _timed(lambda inf=inf: inf.scores(test))
        t1, first = _timed(lambda inf=inf: inf.group_influence(groups, test, order=1))
        t2, second = _timed(lambda inf=inf: inf.group_influence(groups, test, order=2))
        tn, newton = _timed(lambda inf=inf: inf.group_influence(groups, test, order="newton"))
        summed = torch.stack([scores.predicted_loo_change()[:, g].sum(1) for g in groups])
        error = float((first.values - summed).norm() / summed.norm())
        iters = newton.metadata["newton"]["iterations"]
        s2, sn = (
            sum(r["seconds"] for r in res.metadata["solve_reports"][1:]) for res in (second, newton)
        )  # beyond order 1's solve
        rows.append(
            f"| {name} ({inf.n_params:,} params) | {solver} | {t_grad * 1e3:.1f} ms | {t_scores:.2f} s "
            f"({t_scores / t_grad:.1f}) | "
            f"{t1:.2f} s ({t1 / t_grad:.1f}; {t1 / t_scores:.2f}×) | {t2:.2f} s ({t2 / t_grad:.1f}; "
            f"{t2 / t_scores:.2f}×; "
            f"solves {s2:.2f} s) | {tn:.2f} s ({tn / t_grad:.1f}; {tn / t_scores:.2f}×; solves {sn:.2f} s, {iters} CG "
            "iterations) | "
            f"{error:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="logreg,mlp", help="comma-separated: logreg, mlp")
    parser.add_argument("--groups", type=int, default=100, help="number of disjoint groups")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (Xtr, ytr), (Xte, yte) = load_digits_split(797, seed=0)
    train, test = (Xtr.double(), ytr), (Xte.double()[:1000], yte[:1000])
    print(
        f"digits: {len(ytr)} train, {len(test[1])} test, {args.groups} disjoint groups, {args.threads} threads; "
        "times in seconds (in gradient passes; as a ratio to scores())",
        flush=True,
    )
    print("| model | solver | gradient pass | scores() | order 1 | order 2 | Newton | order 1 vs summed scores |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        run(name.strip(), args.groups, train, test)


if __name__ == "__main__":
    main()
