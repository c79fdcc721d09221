"""Wall time of one process against two (torch.distributed, gloo on CPU) for 10,000 training points.

Problem: multiclass logistic regression ``nn.Linear(64, 10)`` (650 parameters, float64, ``l2=1e-3``) on
10,000 synthetic training points (Gaussian features, labels from a random linear teacher with noise) and
200 test points, trained with ``ik.fit_lbfgs`` in the parent. For each world size W in ``--worlds`` the
parent spawns W processes (one torch thread each, file:// rendezvous) which each time, on the same data,

    t_fit   = ik.Influence(task, train, solver=S).fit()     # W = 1: distributed=False
    t_score = inf.scores(test)                              # (200, 10,000)
    t_self  = inf.self_influence()                          # (10,000,)

and the parent prints the slowest rank's times, the speed-up over W = 1 and the largest relative
difference of the score matrix from the W = 1 run. One process is started for W = 1 too, so process start
and imports are outside every timed figure.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/distributed.py                     # exact, W = 1, 2 (~1 min)
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --solvers exact,cg   # cg self-influence: minutes
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import influencekit as ik


def make_problem(n_train: int, n_test: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_test, 64, generator=gen, dtype=torch.float64)
    teacher = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = (X @ teacher + 2.0 * torch.randn(len(X), 10, generator=gen, dtype=torch.float64)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 10).double()
    task = ik.ClassificationTask(model, l2=1e-3)
    ik.fit_lbfgs(task, (X[:n_train], y[:n_train]), tol=1e-9)
    return {"state": model.state_dict(), "train": (X[:n_train], y[:n_train]), "test": (X[n_train:], y[n_train:])}


def worker(rank: int, world: int, folder: str, solver: str) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / f'rdv-{solver}-{world}'}", rank=rank, world_size=world
    )
    try:
        problem = torch.load(folder / "problem.pt", weights_only=False)
        model = torch.nn.Linear(64, 10).double()
        model.load_state_dict(problem["state"])
        task = ik.ClassificationTask(model, l2=1e-3)
        dist.barrier()
        times = {}
        start = time.perf_counter()
        inf = ik.Influence(task, problem["train"], solver=solver, distributed=world > 1).fit()
        times["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = inf.scores(problem["test"]).values
        times["scores"] = time.perf_counter() - start
        start = time.perf_counter()
        inf.self_influence()
        times["self"] = time.perf_counter() - start
        torch.save({"times": times, "scores": scores if rank == 0 else None}, folder / f"{solver}-{world}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--solvers", default="exact")
    parser.add_argument("--worlds", default="1,2")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        problem = make_problem(args.n_train, args.n_test)
        torch.save(problem, Path(folder) / "problem.pt")
        print(f"logistic regression, 650 parameters, n_train={args.n_train}, n_test={args.n_test}, float64, gloo")
        print(
            f"{'solver':7} {'W':>2} {'fit s':>8} {'scores s':>9} {'self s':>8} {'total s':>8} {'speed-up':>9} "
            f"{'max rel diff':>13}"
        )
        for solver in args.solvers.split(","):
            base = None
            for world in worlds:
                mp.spawn(worker, args=(world, folder, solver), nprocs=world, join=True)
                runs = [torch.load(Path(folder) / f"{solver}-{world}-{r}.pt", weights_only=False) for r in range(world)]
                times = {key: max(run["times"][key] for run in runs) for key in runs[0]["times"]}
                total = sum(times.values())
                scores = runs[0]["scores"]
                if base is None:
                    base = (total, scores)
                diff = float((scores - base[1]).abs().max() / base[1].abs().max())
                print(
                    f"{solver:7} {world:>2} {times['fit']:8.2f} {times['scores']:9.2f} {times['self']:8.2f} "
                    f"{total:8.2f} "
                    f"{base[0] / total:9.2f} {diff:13.1e}"
                )


if __name__ == "__main__":
    main()
