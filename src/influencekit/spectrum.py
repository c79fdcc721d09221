"""Extreme eigenvalues of a symmetric operator from matrix-vector products: Lanczos and power iteration.

Used to pick LiSSA's scale (it must exceed the largest eigenvalue of H + δI) and to detect negative
curvature, which makes the influence of a non-convex model meaningless without damping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .checks import check_int

__all__ = ["lanczos_extremes", "power_iteration"]

MatVec = Callable[[torch.Tensor], torch.Tensor]  # (k, n) -> (k, n)


def lanczos_extremes(
    matvec: MatVec,
    n: int,
    *,
    steps: int = 30,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[float, float]:
    """Smallest and largest Ritz values after ``steps`` Lanczos iterations with full reorthogonalisation.

    The extreme Ritz values converge first and from the inside: the returned interval lies within
    ``[λ_min, λ_max]`` of the operator and tightens with more steps (Golub & Van Loan, §10.1).
    Returns ``(lambda_min_estimate, lambda_max_estimate)``.
    """
    steps = check_int("steps", steps, low=1)
    steps = min(steps, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()
    Q = torch.zeros(steps, n, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        Q[j] = q
        w = matvec(q.unsqueeze(0))[0].to(dtype)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        # full reorthogonalisation against every previous Lanczos vector (twice is enough)
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = float(w.norm())
        if j == steps - 1 or beta <= 1e-12 * max(abs(alpha), 1e-300):
            break
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    T = torch.zeros(m, m, dtype=torch.float64)
    T.diagonal().copy_(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T.diagonal(1).copy_(off)
        T.diagonal(-1).copy_(off)
    ritz = torch.linalg.eigvalsh(T)
    return float(ritz[0]), float(ritz[-1])


def power_iteration(
    matvec: MatVec,
    n: int,
    *,
    iters: int = 50,
    rtol: float = 1e-3,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Dominant eigenvalue (largest in magnitude, with its sign) by power iteration.

    Stops when the Rayleigh quotient changes by less than ``rtol`` relative, or after ``iters`` products.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    v /= v.norm()
    previous = None
    value = 0.0
    for _ in range(check_int("iters", iters, low=1)):
        w = matvec(v.unsqueeze(0))[0].to(dtype)
        value = float(torch.dot(w, v))
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if previous is not None and abs(value - previous) <= rtol * abs(value):
            break
        previous = value
    return value
