"""Does ``Influence.choose_solver`` pick the faster of exact and CG? Its estimates against measured runs.

On the peers benchmark's problems (benchmarks/peers.py: the digits logistic regression, 650 parameters, and the
digits MLP 64-128-10, 9,610 parameters; 1,200 training digits, damping 0.01, l2 1e-3), for a few and for all
597 test digits: ``choose_solver`` (its planner estimates, CG's block iterations from a pilot on 256 training
examples), then each candidate's ``fit()`` + ``scores(test)`` timed, one after the other in this process.

Run::

    python benchmarks/choice.py                  # both problems, 10 and 597 queries
    python benchmarks/choice.py --problems mlp --queries 597

Prints one table: per case the estimated and measured seconds of each candidate, the choice, and whether it was
the faster one measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch


def _peers():
    path = Path(__file__).resolve().parent / "peers.py"
    spec = importlib.util.spec_from_file_location("_ik_bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="logreg,mlp", help="comma-separated: logreg, mlp")
    parser.add_argument("--queries", default="10,597", help="comma-separated numbers of test digits")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import influencekit as ik

    peers = _peers()
    rows = []
    for problem in args.problems.split(","):
        if problem not in ("logreg", "mlp"):
            sys.exit(f"--problems: {problem!r} is not one of logreg, mlp")
        torch.manual_seed(0)
        model = peers.build_problem_model(problem)
        train, test = peers.problem_data(problem)
        peers.train_problem(problem, model, train, Path("/nonexistent"))
        task = ik.ClassificationTask(model, l2=peers.L2)
        n_params = sum(p.numel() for p in model.parameters())
        for q in (int(x) for x in args.queries.split(",")):
            queries = (test[0][:q], test[1][:q])
            base = {"damping": peers.DAMPING, "stationarity_tol": None}
            start = time.perf_counter()
            choice = ik.Influence(task, train, **base).choose_solver(queries)
            choosing = time.perf_counter() - start
            print(
                f"\n{problem} ({n_params:,} parameters), {q} queries: choice in {choosing:.1f} s\n{choice}", flush=True
            )
            measured = {}
            for c in choice.candidates:
                start = time.perf_counter()
                ik.Influence(task, train, solver=c.solver, **base).fit().scores(queries)
                measured[c.solver] = time.perf_counter() - start
                print(f"  measured {c.solver}: {measured[c.solver]:.1f} s", flush=True)
            fastest = min(measured, key=measured.get)
            rows.append((problem, n_params, q, choice, measured, fastest, choosing))
    print("\n| problem | queries | exact est. / measured s | cg est. / measured s | chosen | faster measured |")
    print("|---|---:|---:|---:|---|---|")
    for problem, n_params, q, choice, measured, fastest, choosing in rows:
        cells = [f"{choice.candidate(name).seconds:.1f} / {measured[name]:.1f}" for name in ("exact", "cg")]
        print(
            f"| {problem} ({n_params:,} p.) | {q} | {cells[0]} | {cells[1]} | {choice.solver} "
            f"(in {choosing:.1f} s) | {fastest} |"
        )


if __name__ == "__main__":
    main()
