"""Influence index: build cost and query latency through the explorer's HTTP API (issue 17). Not a timed test.

A softmax regression (64 features → 10 classes, 650 parameters, float64, exact solver) on a synthetic training set
of N examples (features N(0, 1), labels from a random linear teacher with 10% flipped), trained by ``fit_lbfgs``;
the index is built by :meth:`InfluenceIndex.build`, served by uvicorn on localhost, and queried 200 times with
``POST /api/explain`` (a random stored test example, k = 10) by a real HTTP client. Printed per N: build seconds
and its multiple of one per-example-gradient pass over the training set, the index's size on disk, and the median
and 95th percentile of the query latency (client-measured, end to end), with the server's own time per query.

    python benchmarks/index.py                 # N = 10,000 and 100,000 (about 3 minutes on 2 cores)
    python benchmarks/index.py --sizes 10000 --threads 2

``--problem cnn``: the 962,926-parameter MNIST CNN of benchmarks/scale.py (Conv-Conv-Linear(3136→300)-Linear(300→10),
float32, trained 2 epochs by Adam), EK-FAC (damping 0.01, one probe), the index built with ``--rows`` (``factored``:
the two Linear layers kept as their layer taps, the convolutions as gradient entries; ``dense``: every gradient
entry, 3.85 MB per example); a query is one test gradient, one EK-FAC solve and one exact scan:

    python benchmarks/index.py --problem cnn --sizes 1000 --rows dense,factored --queries 50
    python benchmarks/index.py --problem cnn --sizes 10000 --rows factored --queries 50 --query-ranks 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def problem(n: int, n_test: int = 500, seed: int = 0):
    import influencekit as ik

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_test, 64, dtype=torch.float64, generator=g)
    teacher = torch.randn(64, 10, dtype=torch.float64, generator=g)
    y = (X @ teacher).argmax(dim=1)
    flip = torch.rand(n + n_test, generator=g) < 0.1
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    model = torch.nn.Linear(64, 10).double()
    task = ik.ClassificationTask(model, l2=1e-3)
    ik.fit_lbfgs(task, (X[:n], y[:n]), warn=False)
    return task, (X[:n], y[:n]), (X[n:], y[n:])


def cnn_problem(n: int, n_test: int = 200):
    """The scale benchmark's CNN on n MNIST images (benchmarks/scale.py), trained 2 epochs: (task, train, test)."""
    import influencekit as ik
    from scale import L2, build_model, load_data

    train, test, _ = load_data(n, n_test)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in torch.randperm(n, generator=g).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            opt.step()
    return ik.ClassificationTask(model, l2=L2), train, test


def gradient_pass_seconds(inf) -> float:
    start = time.perf_counter()
    for _ in inf.gradients_.stream(inf.train_, side="train", start=0, stop=len(inf.train_), desc="timing"):
        pass
    return time.perf_counter() - start


def run(
    n: int, queries: int, folder: Path, kind: str = "softmax", rows: str = "auto", query_ranks: tuple = (None,)
) -> list[dict]:
    import warnings

    import httpx

    import influencekit as ik
    from influencekit.index import Display, InfluenceIndex
    from influencekit.index.serve import serving

    if kind == "cnn":
        task, train, test = cnn_problem(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 2 epochs are not a stationary point: the build says so, irrelevant here
            inf = ik.Influence(
                task,
                train,
                solver="ekfac",
                damping=0.01,
                solver_options={"probes": 1},
                cache_dir=InfluenceIndex.solver_dir(folder),
            ).fit()
    else:
        task, train, test = problem(n)
        inf = ik.Influence(task, train, solver="exact", cache_dir=InfluenceIndex.solver_dir(folder)).fit()
    grad_pass = gradient_pass_seconds(inf)
    start = time.perf_counter()
    index = InfluenceIndex.build(
        inf, folder, test=test, rows=rows, display={"test": Display("text", [f"test {i}" for i in range(len(test[1]))])}
    )
    build = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    out = []
    with serving(index) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.post(
            "/api/explain", json={"split": "test", "index": 0, "k": 10}
        ).raise_for_status()  # warm-up (rows loaded)
        for rank in query_ranks:
            rng = np.random.default_rng(0)  # the same test examples for every query rank
            latencies, server_side, answers = [], [], []
            for _ in range(queries):
                body = {"split": "test", "index": int(rng.integers(len(test[1]))), "k": 10}
                if rank is not None:
                    body["query_rank"] = rank
                t = time.perf_counter()
                response = client.post("/api/explain", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - t)
                server_side.append(response.json()["seconds"])
                answers.append({e["index"] for e in response.json()["harmful"]})
            if rank is None:
                exact = answers
            ms = 1000 * np.array(latencies)
            overlap = (
                float(np.mean([len(a & b) / 10 for a, b in zip(answers, exact)]))
                if query_ranks[0] is None
                else float("nan")
            )
            out.append(
                {
                    "n": n,
                    "rows": index.config["space"] + ("" if rank is None else f", query_rank={rank}"),
                    "build_s": build,
                    "build_per_grad_pass": build / grad_pass,
                    "grad_pass_s": grad_pass,
                    "size_mb": size / 2**20,
                    "median_ms": float(np.median(ms)),
                    "p95_ms": float(np.percentile(ms, 95)),
                    "server_median_ms": 1000 * float(np.median(server_side)),
                    "overlap": overlap,
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="training-set sizes (comma-separated)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--problem", choices=("softmax", "cnn"), default="softmax", help="softmax regression (default) or the MNIST CNN"
    )
    parser.add_argument("--rows", default="auto", help="the index rows, comma-separated: auto, dense, factored")
    parser.add_argument(
        "--query-ranks",
        default="",
        help="also query with these ranks (comma-separated; factored rows), "
        "after the exact queries; the top-10 harmful overlap with the exact answers is printed",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ranks = (None, *(int(r) for r in args.query_ranks.split(",") if r))
    print(
        "| training examples | rows | build | build / gradient pass | size on disk | query median | query p95 | server "
        "time (median) | top-10 harmful overlap with exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, rows in ((int(s), r) for s in args.sizes.split(",") for r in args.rows.split(",")):
        with tempfile.TemporaryDirectory(prefix="ik-index-") as tmp:
            results = run(n, args.queries, Path(tmp), args.problem, rows, ranks)
        for r in results:
            print(
                f"| {r['n']:,} | {r['rows']} | {r['build_s']:.1f} s | {r['build_per_grad_pass']:.1f} (pass "
                f"{r['grad_pass_s']:.2f} s) | "
                f"{r['size_mb']:.0f} MB | {r['median_ms']:.1f} ms | {r['p95_ms']:.1f} ms | {r['server_median_ms']:.1f} "
                f"ms | {r['overlap']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
