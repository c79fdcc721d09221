"""Scale benchmark (issue 6): EK-FAC and Arnoldi pairwise scores for a ~1M-parameter CNN on MNIST.

A CNN ``Conv(1→32, 3×3)-ReLU-MaxPool-Conv(32→64, 3×3)-ReLU-MaxPool-Linear(3136→300)-ReLU-Linear(300→10)``
(962,582 parameters) is trained with Adam in float32 on ``--n-train`` images of ``../shared/data/mnist``
(the 10,000-image ``t10k`` file is what the shared folder holds: the training set is its first
``--n-train`` images after a seeded shuffle, and the ``--n-test`` test points are drawn from the images
left over, or from the training images when none are left; scikit-learn's digits upsampled to 28×28 and
repeated when the folder is absent). Then, for each solver, a fresh Python process (``subprocess``) runs

    t_fit   = time of ik.Influence(task, train, solver=..., damping=...).fit()
    t_score = time of inf.scores(test)               # n_test × n_train pairwise scores
    t_grad  = time of one per-example-gradient pass over the training set (inf.gradients_.stream, discarded chunks)

and reports ``(t_fit + t_score) / t_grad`` (target < 3) and its own peak resident memory (``VmHWM``, target
< 4 GB). A separate process runs :meth:`Influence.plan` first, so that the planner's estimate of every stage
can be read next to the measurement. With ``remainder="drop"`` (used here) the engine scores Arnoldi in the
eigenbasis: the training gradients are projected once onto the ``rank`` eigenvectors and the scores are a
(n_test × rank) × (rank × n_train) product. Each worker also records which per-example gradient method the
engine chose (layer taps or ``vmap(grad)``) and times the same pass through ``vmap(grad)``.

Usage (2 threads; each worker has its own ``timeout``)::

    python benchmarks/scale.py                         # 10,000 train × 1,000 test, ekfac and arnoldi rank 50
    python benchmarks/scale.py --n-train 2000 --n-test 200 --solvers arnoldi
    python benchmarks/scale.py --plan-only             # only the planner's table (seconds)
    python benchmarks/scale.py --solvers arnoldi --examples 1000   # Lanczos on 1,000 of the 10,000 images
    python benchmarks/scale.py --solvers ekfac --query-rank 8      # query batching: low-rank queries, compared
                                                                   # with full rank on the first 100 test points
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
L2 = 1e-4
DAMPING = 1e-2


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(3136, 300),
        torch.nn.ReLU(),
        torch.nn.Linear(300, 10),
    )


def load_data(
    n_train: int, n_test: int, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], str]:
    rng = np.random.default_rng(seed)
    try:
        from influencekit_paper.data.mnist import load_mnist

        images, labels = load_mnist(MNIST, "test")
        source = f"MNIST t10k from {MNIST}"
    except Exception as exc:  # the shared folder is absent: bundled digits, upsampled and repeated
        from sklearn.datasets import load_digits

        d = load_digits()
        small = torch.as_tensor(d.images / 16.0, dtype=torch.float32)[:, None]
        up = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
        reps = -(-(n_train + n_test) // len(up))
        images = (up.repeat(reps, 1, 1, 1)[:, 0].numpy() * 255).astype(np.uint8)
        labels = np.tile(d.target, reps)
        source = f"scikit-learn digits upsampled to 28×28 and repeated ({exc.__class__.__name__}: no MNIST)"
    order = rng.permutation(len(labels))
    X = torch.as_tensor(images[order], dtype=torch.float32)[:, None] / 255.0
    y = torch.as_tensor(labels[order].astype(np.int64))
    if n_train > len(y):
        raise SystemExit(f"--n-train {n_train} exceeds the {len(y)} images available")
    rest = len(y) - n_train
    if rest >= n_test:
        test_idx = np.arange(n_train, n_train + n_test)
        how = "test points are images outside the training set"
    else:
        test_idx = np.sort(rng.choice(n_train, n_test, replace=False))
        how = "test points are drawn from the training images (no images left over)"
    return (X[:n_train], y[:n_train]), (X[test_idx], y[test_idx]), f"{source}; {how}"


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


# ------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import influencekit as ik

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    train, test, _ = load_data(args.n_train, args.n_test)
    model = build_model()
    model.load_state_dict(torch.load(args.state))
    task = ik.ClassificationTask(model, l2=L2)
    solver, options = args.worker, {}
    if solver == "arnoldi":
        options = {"rank": args.rank, "residual_rows": 0, "remainder": "drop"}  # no per-block residual HVP
        if args.examples:
            options["examples"] = args.examples
    if solver == "ekfac":
        options = {"probes": 1, "solve_dtype": None}  # rotations in the model's float32
    from scipy.stats import spearmanr

    out: dict[str, Any] = {"solver": solver, "options": options, "base_gb": rss_gb()}
    if args.plan:
        inf = ik.Influence(
            task, train, solver=solver, damping=DAMPING, solver_options=options, memory_budget=args.memory_budget
        )
        start = time.perf_counter()
        plan = inf.plan(n_test=args.n_test, query_rank=args.query_rank or None)
        out.update(
            plan_seconds=time.perf_counter() - start, plan=str(plan), plan_dict=plan.to_dict(), peak_gb=peak_rss_gb()
        )
        Path(args.out).write_text(json.dumps(out))
        return
    inf = ik.Influence(
        task, train, solver=solver, damping=DAMPING, solver_options=options, memory_budget=args.memory_budget
    )
    start = time.perf_counter()
    inf.fit()
    out["t_fit"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = inf.scores(test, query_rank=args.query_rank or None)
    out["t_score"] = time.perf_counter() - start
    out["peak_gb"] = peak_rss_gb()
    out["chunks"] = dataclasses.asdict(inf.chunks_)
    space = scores.metadata["score_space"]
    if args.query_rank:  # agreement with full-rank scores on the first --compare test points (their cost is not timed)
        out["layers"] = {k: scores.metadata[k] for k in ("factored", "dense")}
        m = min(args.compare, len(test[1]))
        start = time.perf_counter()
        full = inf.scores((test[0][:m], test[1][:m])).values
        out["t_full_rows"] = time.perf_counter() - start
        low = scores.values[:m]
        rhos = [float(spearmanr(low[i].numpy(), full[i].numpy())[0]) for i in range(m)]
        top = [
            len(set(low[i].topk(10).indices.tolist()) & set(full[i].topk(10).indices.tolist())) / 10 for i in range(m)
        ]
        out["agreement"] = {
            "rows": m,
            "spearman_median": float(np.median(rhos)),
            "spearman_min": min(rhos),
            "pearson_all": float(np.corrcoef(low.flatten().numpy(), full.flatten().numpy())[0, 1]),
            "top10_harmful_overlap": float(np.mean(top)),
        }
    del scores
    grads = []
    for _ in range(2):  # the best of two passes: the first may pay for fresh pages
        start = time.perf_counter()
        for _lo, _G in inf.gradients_.stream(inf.train_, side="train"):
            pass
        grads.append(time.perf_counter() - start)
    out["t_grad"] = min(grads)
    out["score_space"] = space
    out["gradients"] = dict(inf.gradient_methods_)
    vmapped = ik.GradientSource(
        inf.task, inf.params_, chunk=inf.chunks_.grad, method="vmap"
    )  # the same pass through vmap(grad)
    start = time.perf_counter()
    for _lo, _G in vmapped.stream(inf.train_, side="train"):
        pass
    out["t_grad_vmap"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------- parent
def train_model(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    (X, y), (Xt, yt), source = load_data(args.n_train, args.n_test)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y), generator=g).split(128):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx]) + 0.5 * L2 * sum(
                (p * p).sum() for p in model.parameters()
            )
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(Xt).argmax(1) == yt).float().mean())
    torch.save(model.state_dict(), state)
    return {
        "source": source,
        "n_params": sum(p.numel() for p in model.parameters()),
        "test_accuracy": acc,
        "train_seconds": time.perf_counter() - start,
    }


def run(args: argparse.Namespace, solver: str, state: Path, plan: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        solver,
        "--state",
        str(state),
        "--out",
        str(out),
        "--n-train",
        str(args.n_train),
        "--n-test",
        str(args.n_test),
        "--rank",
        str(args.rank),
        "--examples",
        str(args.examples),
        "--threads",
        str(args.threads),
        "--memory-budget",
        args.memory_budget,
        "--query-rank",
        str(args.query_rank),
        "--compare",
        str(args.compare),
    ] + (["--plan"] if plan else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"solver": solver, "error": f"timed out after {args.worker_timeout} s"}
    if proc.returncode != 0:
        return {"solver": solver, "error": proc.stderr[-2000:]}
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--n-test", type=int, default=1_000)
    ap.add_argument("--solvers", default="ekfac,arnoldi")
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument(
        "--examples", type=int, default=0, help="arnoldi: Lanczos on a subsample of this many training points (0: all)"
    )
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-budget", default="2GiB")
    ap.add_argument("--worker-timeout", type=int, default=660)
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument(
        "--query-rank", type=int, default=0, help="score with low-rank queries of this rank per layer (0: full rank)"
    )
    ap.add_argument(
        "--compare", type=int, default=100, help="with --query-rank: test points also scored at full rank to compare"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "cnn.pt"
        info = train_model(args, state)
        print(
            f"data: {info['source']}; {args.n_train:,} train × {args.n_test:,} test; CNN {info['n_params']:,} "
            "parameters, "
            f"float32, {args.epochs} Adam epochs in {info['train_seconds']:.0f} s, test accuracy "
            f"{info['test_accuracy']:.3f}; "
            f"l2={L2:g}, damping={DAMPING:g}, {args.threads} threads, memory_budget={args.memory_budget}",
            flush=True,
        )
        for solver in args.solvers.split(","):
            p = run(args, solver, state, plan=True)
            if "error" in p:
                print(f"{solver} plan failed: {p['error']}", flush=True)
            else:
                print(
                    f"\n{solver}: planner ({p['plan_seconds']:.1f} s, peak {p['peak_gb']:.2f} GB)\n{p['plan']}",
                    flush=True,
                )
            if args.plan_only:
                continue
            r = run(args, solver, state, plan=False)
            if "error" in r:
                print(f"{solver}: {r['error']}", flush=True)
                continue
            ratio = (r["t_fit"] + r["t_score"]) / r["t_grad"]
            line = (
                f"{solver} {r['options']}: t_grad {r['t_grad']:.1f} s, t_fit {r['t_fit']:.1f} s "
                f"({r['t_fit'] / r['t_grad']:.2f}×), "
                f"t_score {r['t_score']:.1f} s ({r['t_score'] / r['t_grad']:.2f}×), (fit + score) / grad = {ratio:.2f} "
                f"[target < 3: {'met' if ratio < 3 else 'NOT met'}], peak RSS {r['peak_gb']:.2f} GB (base "
                f"{r['base_gb']:.2f}) "
                f"[target < 4 GB: {'met' if r['peak_gb'] < 4 else 'NOT met'}], chunks {r['chunks']}"
            )
            line += (
                f"\n  per-example gradients: {r['gradients']}; the same pass through vmap(grad): "
                f"{r['t_grad_vmap']:.1f} s "
                f"({r['t_grad_vmap'] / r['t_grad']:.2f}× t_grad); scored in: {r['score_space']}"
            )
            if "agreement" in r:
                a = r["agreement"]
                line += (
                    f"\n  query rank {args.query_rank}: {r['layers']}; against full rank on {a['rows']} test points "
                    f"(scored in {r['t_full_rows']:.1f} s, not in t_score): Spearman median "
                    f"{a['spearman_median']:.4f}, "
                    f"min {a['spearman_min']:.4f} [target ≥ 0.95], Pearson {a['pearson_all']:.4f}, "
                    f"top-10 harmful overlap {a['top10_harmful_overlap']:.3f}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
