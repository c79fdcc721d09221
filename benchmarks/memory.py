"""Peak memory as the training set grows (issue 8): 1×, 4× and 16× the data at one memory budget.

Problem: ``benchmarks/solvers.py``'s digits MLP (``Linear(64, 128)-Tanh-Linear(128, 10)``, 9,610 parameters,
float64, ``l2=1e-3``) trained with ``ik.fit_lbfgs`` on the 1,200 digits training images. The larger training
sets are those images repeated 4× and 16× with seeded Gaussian pixel noise (σ = 0.5 on the 0–16 scale), so
that every example is distinct; θ̂ stays the 1,200-image model (the memory of fit and scoring does not
depend on θ̂ being stationary, and the stationarity warning is recorded, not hidden). Each (solver, n) runs
in a fresh process (``subprocess``, one torch thread) that reports

    base    resident memory before ``fit`` (interpreter, torch, data, model)
    peak    its peak resident memory (``VmHWM``) over ``fit()`` then ``scores`` on 50 test points
    result  the bytes of the returned score matrix (50 × n float64: it must grow with n)
    work    peak − base − result: what fitting and scoring held on top (should not grow with n)

with ``memory_budget`` (default 256 MiB) sizing every chunk. The exact solver is left out of the default run: its
state is the dense Hessian (p², whatever n) and its fit costs p HVPs over n points, 75 s at n = 1,200 and
20 minutes at 16×; ``--solvers exact --factors 1,4`` runs it. The table is printed and, with ``--write``,
placed between the MEMORY markers of docs/benchmarks.md.

Usage::

    python benchmarks/memory.py                                # cg, ekfac, arnoldi × 1, 4, 16 (~6 min)
    python benchmarks/memory.py --solvers ekfac --factors 1,4 --memory-budget 64MiB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solvers import L2, build_model, current_rss_mib, group_warnings, rss_mib, source_line  # noqa: E402

BEGIN, END = "<!-- BEGIN MEMORY GENERATED -->", "<!-- END MEMORY GENERATED -->"
DAMPING = 0.5  # the noisy copies leave θ̂ short of a minimum: CG refuses H + δI with negative curvature below ~0.2
OPTIONS = {"exact": {}, "cg": {}, "ekfac": {}, "arnoldi": {"rank": 50}}
N_TEST = 50


def grown_data(factor: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from influencekit.data import load_digits_split

    (X, y), (Xt, yt) = load_digits_split(1200)
    if factor == 1:
        return (X, y), (Xt[:N_TEST], yt[:N_TEST])
    g = torch.Generator().manual_seed(factor)
    noise = 0.5 * torch.randn(factor - 1, *X.shape, generator=g, dtype=X.dtype)
    Xg = torch.cat([X, (X.unsqueeze(0) + noise).reshape(-1, X.shape[1])])
    return (Xg, y.repeat(factor)), (Xt[:N_TEST], yt[:N_TEST])


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    import influencekit as ik

    train, test = grown_data(args.factor)
    model = build_model("mlp", 128)
    model.load_state_dict(torch.load(args.state, weights_only=True))
    model.eval()
    base = current_rss_mib()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = ik.Influence(
            ik.ClassificationTask(model, l2=L2),
            train,
            solver=args.solver,
            damping=DAMPING,
            solver_options=OPTIONS[args.solver],
            memory_budget=args.memory_budget,
        )
        t0 = time.perf_counter()
        inf.fit()
        scores = inf.scores(test)
        seconds = time.perf_counter() - t0
    S = scores.values
    Path(args.out).write_text(
        json.dumps(
            {
                "base": base,
                "peak": rss_mib(),
                "result": S.numel() * S.element_size() / 2**20,
                "seconds": seconds,
                "chunks": vars(inf.chunks_) if hasattr(inf.chunks_, "__dict__") else str(inf.chunks_),
                "gradients": inf.gradient_methods_,
                "warnings": group_warnings(caught),
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solvers", default="cg,ekfac,arnoldi")
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--memory-budget", default="256MiB")
    ap.add_argument("--worker-timeout", type=float, default=900.0)
    ap.add_argument("--write", metavar="PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--factor", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.solver = args.worker
        worker(args)
        return 0
    torch.set_num_threads(1)
    import influencekit as ik
    from influencekit.data import load_digits_split

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    (X, y), _ = load_digits_split(1200)
    torch.manual_seed(0)
    model = build_model("mlp", 128)
    rep = ik.fit_lbfgs(ik.ClassificationTask(model, l2=L2), (X, y), max_iter=3000, tol=1e-6)
    print(f"trained the MLP: ||grad R|| = {rep.grad_norm:.1e}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ik-memory-") as tmp:
        state = Path(tmp) / "mlp.pt"
        torch.save(model.state_dict(), state)
        for solver in args.solvers.split(","):
            for factor in (int(f) for f in args.factors.split(",")):
                out = Path(tmp) / f"{solver}-{factor}.json"
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    solver,
                    "--factor",
                    str(factor),
                    "--state",
                    str(state),
                    "--out",
                    str(out),
                    "--memory-budget",
                    args.memory_budget,
                ]
                env = dict(os.environ, OMP_NUM_THREADS="1")
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
                except subprocess.TimeoutExpired:
                    rows.append(
                        [solver, f"{1200 * factor:,}", f"timed out after {args.worker_timeout:.0f} s"] + ["—"] * 4
                    )
                    continue
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
                    rows.append([solver, f"{1200 * factor:,}", f"FAILED: {tail[0]}"] + ["—"] * 4)
                    continue
                r = json.loads(out.read_text())
                work = r["peak"] - r["base"] - r["result"]
                rows.append(
                    [
                        solver,
                        f"{1200 * factor:,}",
                        f"{r['seconds']:.1f}",
                        f"{r['base']:.0f}",
                        f"{r['peak']:.0f}",
                        f"{r['result']:.1f}",
                        f"{work:.0f}",
                    ]
                )
                print("  ".join(rows[-1]), f"chunks {r['chunks']}", flush=True)
    header = ["solver", "n_train", "fit + scores s", "base MiB", "peak MiB", "result MiB", "work MiB"]
    table = "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    )
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per worker"
    total = time.perf_counter() - started
    print(table)
    print(f"machine: {machine}; load {load_start:.2f} -> {os.getloadavg()[0]:.2f}; total {total:.0f} s")
    if args.write:
        body = "\n".join(
            [
                f"Command: `python benchmarks/memory.py {shlex.join(sys.argv[1:])}`",
                "",
                f"Machine: {machine}; total {total:.0f} s. Source: {source_line()}.",
                "",
                f"Digits MLP (9,610 parameters, float64), damping {DAMPING:g}, memory_budget {args.memory_budget}, "
                f"{N_TEST} test points; the training set is the 1,200 images repeated with noise. `work` = peak − base "
                "− "
                "result (the score matrix).",
                "",
                table,
            ]
        )
        path = Path(args.write)
        text = path.read_text() if path.exists() else ""
        block = f"{BEGIN}\n{body}\n{END}"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip() + "\n\n## Memory as the data grows\n\n" + block + "\n"
        path.write_text(text)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
