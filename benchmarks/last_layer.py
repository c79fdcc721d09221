"""The exact solver's dense Hessian in closed form (final Linear layer under cross-entropy) against one HVP per
parameter, on the digits logistic regression (1,200 train / 597 test, 650 parameters, float64, one thread).
Not a timed test; prints fit and score seconds of both routes, measured in one run, and the largest score difference.

    python benchmarks/last_layer.py
"""

from __future__ import annotations

import time

import torch

import influencekit as ik
import influencekit.engine.last_layer as last_layer
from influencekit.data.bundled import load_digits_split


def main() -> None:
    torch.set_num_threads(1)
    (X, y), (Xt, yt) = load_digits_split(1200)
    task = ik.ClassificationTask(torch.nn.Linear(64, 10).double(), l2=1e-3)
    ik.fit_lbfgs(task, (X, y))

    def run() -> tuple[float, float, torch.Tensor, str]:
        t = time.perf_counter()
        inf = ik.Influence(task, (X, y), solver="exact").fit()
        fit = time.perf_counter() - t
        t = time.perf_counter()
        s = inf.scores((Xt, yt))
        return fit, time.perf_counter() - t, s.values, s.metadata["solve_reports"][0]["details"]["hessian"]

    run()  # warm-up
    closed = run()
    original = last_layer.last_linear_hessian
    last_layer.last_linear_hessian = lambda operator: None  # force the HVP route
    try:
        hvps = run()
    finally:
        last_layer.last_linear_hessian = original
    for fit, score, _, how in (closed, hvps):
        print(f"{how:55s} fit {fit:.3f} s  score {score:.3f} s  total {fit + score:.3f} s")
    diff = float((closed[2] - hvps[2]).abs().max() / hvps[2].abs().max())
    print(f"closed form {hvps[0] / closed[0]:.1f}x faster to fit; largest relative score difference {diff:.2e}")


if __name__ == "__main__":
    main()
