"""Self-influence with K-FAC/EK-FAC three ways, on the 1M-parameter MNIST CNN of benchmarks/scale.py. Not a timed test.

gᵀ(G + (λ + δ)I)⁻¹g for every training image (the mislabel-detection ranking), with the same fitted EK-FAC:

- ``solve``: per gradient chunk a solve (rotate into the Kronecker eigenbasis, divide, rotate back) and a dot
  product: the route the engine took before ``quadratic_form`` (two rotations per example);
- ``quadratic_form``: per gradient chunk one rotation, squared and divided (``KFACSolver.quadratic_form``);
- ``taps``: from the layer taps (``KFACSolver.tap_quadratic_form``, what ``Influence.self_influence`` runs now):
  the two Linear layers see one position per example, so their rotated gradient is the outer product
  (Q_Sᵀg)(Q_Aᵀã)ᵀ and the form is out·k multiply-adds; the convolutions are rotated as blocks.

Printed: seconds, the multiple of one per-example-gradient pass, and the largest relative difference from the
``solve`` route (float32 model, float64 rotations). The ``solve`` and ``quadratic_form`` routes run on the first
``--subset`` images only (they are the slow ones) and their times are scaled to the whole set, saying so.

    python benchmarks/self_influence.py                       # 10,000 images, the two slow routes on 500
    python benchmarks/self_influence.py --n-train 2000 --subset 2000
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--subset", type=int, default=500, help="images for the solve and quadratic_form routes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # 2 epochs are not a stationary point; irrelevant: one solver, three routes

    import influencekit as ik
    from influencekit.data.examples import Examples
    from scale import DAMPING, L2, build_model, load_data

    train, _, source = load_data(args.n_train, 1)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        for idx in torch.randperm(args.n_train, generator=g).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            opt.step()
    task = ik.ClassificationTask(model, l2=L2)
    start = time.perf_counter()
    inf = ik.Influence(task, train, solver="ekfac", damping=DAMPING, solver_options={"probes": 1}).fit()
    fit = time.perf_counter() - start
    solver, grads = inf.solver_, inf.gradients_
    start = time.perf_counter()
    for _ in grads.stream(inf.train_, side="train"):
        pass
    grad_pass = time.perf_counter() - start
    print(
        f"{source}; {args.n_train:,} images, EK-FAC fit {fit:.1f} s, one gradient pass {grad_pass:.1f} s "
        f"({grads.methods['train']}), gradient chunk {grads.chunk}"
    )

    start = time.perf_counter()
    taps = inf.self_influence()
    t_taps = time.perf_counter() - start
    m = min(args.subset, args.n_train)
    subset = Examples((train[0][:m], train[1][:m]), name="train")
    routes: dict[str, tuple[float, torch.Tensor]] = {}
    for name in ("solve", "quadratic_form"):
        start = time.perf_counter()
        parts = []
        for _, G in grads.stream(subset, side="train"):
            parts.append((G * solver.solve(G).x).sum(dim=1) if name == "solve" else solver.quadratic_form(G))
        routes[name] = (time.perf_counter() - start, torch.cat(parts))
    reference = routes["solve"][1]
    scale = args.n_train / m
    print("| route | seconds (all images) | / gradient pass | max relative difference from `solve` |")
    print("|---|---|---|---|")
    for name, (seconds, values) in routes.items():
        note = "" if m == args.n_train else f" (measured on {m:,}, ×{scale:.0f})"
        diff = float((values - reference).abs().max() / reference.abs().max())
        print(f"| {name} | {seconds * scale:.1f}{note} | {seconds * scale / grad_pass:.1f} | {diff:.1e} |")
    diff = float((taps[:m] - reference).abs().max() / reference.abs().max())
    print(f"| taps (Influence.self_influence) | {t_taps:.1f} | {t_taps / grad_pass:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
