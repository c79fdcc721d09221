"""Extreme eigenvalues of a symmetric operator from matrix-vector products: Lanczos and power iteration.

Used by the Arnoldi solver (the top eigenpairs of H), to pick LiSSA's scale (it must exceed the largest
eigenvalue of H + δI) and to detect negative curvature, which makes the influence of a non-convex model
meaningless without damping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .checks import check_int

__all__ = ["lanczos", "LanczosResult", "lanczos_extremes", "power_iteration", "randomized_svd"]

MatVec = Callable[[torch.Tensor], torch.Tensor]  # (k, n) -> (k, n)


class LanczosResult(NamedTuple):
    """The output of :func:`lanczos`.

    Attributes:
        Q: orthonormal Lanczos vectors as rows, ``(m, n)`` in the requested dtype.
        T: the tridiagonal ``Q A Qᵀ``, ``(m, m)`` float64 (a zero off-diagonal marks a restart).
        beta: the norm of the last residual; ‖A yᵀQ − θ yᵀQ‖ = beta·|y_m| for a Ritz pair (θ, y) of T.
    """

    Q: torch.Tensor
    T: torch.Tensor
    beta: float


def lanczos(
    matvec: MatVec,
    n: int,
    *,
    steps: int = 30,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LanczosResult:
    """``steps`` Lanczos iterations on the symmetric operator ``matvec``, with full reorthogonalisation.

    From a seeded Gaussian start q₁, each step applies the operator once and orthogonalises the result
    against *every* previous Lanczos vector, repeating the pass while one still removes more than 30% of it,
    so the vectors stay orthonormal to round-off and no spurious copies of converged eigenvalues appear
    (Golub & Van Loan, §10.1). When the Krylov space becomes invariant (the residual keeps shrinking under
    reorthogonalisation, or falls below max(1e-12, 10·eps) of the largest coefficient seen) the iteration
    restarts from a fresh random vector orthogonal to the previous ones, so ``steps = n`` always spans the
    whole space. The Ritz pairs of ``T`` (eigenvalues θ, eigenvectors y) give approximate eigenpairs
    (θ, yᵀQ) of the operator, the extreme ones converging first and from the inside.
    """
    steps = min(check_int("steps", steps, low=1), n)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def fresh(Q_prev: torch.Tensor) -> torch.Tensor:
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        for _ in range(2):
            v = v - Q_prev.T @ (Q_prev @ v)
        return v / v.norm()

    q = fresh(torch.zeros(0, n, dtype=dtype, device=device))
    Q = torch.zeros(steps, n, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    beta = 0.0
    floor = max(1e-12, 10 * torch.finfo(dtype).eps)
    for j in range(steps):
        Q[j] = q
        w = matvec(q.unsqueeze(0))[0].to(dtype)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        # full reorthogonalisation against every previous Lanczos vector: the first pass is the three-term
        # recurrence, then passes repeat while one still removes more than 30% (Daniel, Gragg, Kaufman &
        # Stewart 1976); a vector that keeps shrinking is round-off inside the span: an invariant subspace
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = float(w.norm())
        invariant = True
        for _ in range(3):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            shrunk, beta = beta, float(w.norm())
            if beta > 0.7 * shrunk:
                invariant = False
                break
        scale = max(scale, abs(alpha), beta)
        if j == steps - 1:
            break
        if invariant or beta <= floor * max(scale, 1e-300):  # restart orthogonally
            betas.append(0.0)
            q = fresh(Q[: j + 1])
        else:
            betas.append(beta)
            q = w / beta
    m = len(alphas)
    T = torch.zeros(m, m, dtype=torch.float64)
    T.diagonal().copy_(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T.diagonal(1).copy_(off)
        T.diagonal(-1).copy_(off)
    return LanczosResult(Q[:m], T, beta)


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
    Returns ``(lambda_min_estimate, lambda_max_estimate)``. See :func:`lanczos`.
    """
    ritz = torch.linalg.eigvalsh(lanczos(matvec, n, steps=steps, dtype=dtype, device=device, seed=seed).T)
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


def randomized_svd(
    M: torch.Tensor, rank: int, *, oversample: int = 8, iterations: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of each matrix of a batch ``M (b, m, n)``: ``U (b, m, r)``,
    ``s (b, r)``, ``V (b, n, r)`` with r = min(rank, m, n), so that ``M ≈ U diag(s) Vᵀ``.

    Halko, Martinsson & Tropp (2011): a seeded Gaussian sketch of ``rank + oversample`` columns, ``iterations``
    QR-stabilised power iterations, then the exact SVD of the small projected matrix. Where the sketch would be
    as wide as the matrix, the exact SVD (truncated) is returned instead, so a rank ≥ min(m, n) is exact.
    The same seed gives the same sketch: the result does not depend on the batch it is computed in."""
    check_int("rank", rank, low=1)
    _, m, n = M.shape
    r = min(rank, m, n)
    width = r + oversample
    if width >= min(m, n):
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[..., :r], s[..., :r], Vh[..., :r, :].mT
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=g, dtype=torch.float64).to(device=M.device, dtype=M.dtype)
    Qm = torch.linalg.qr(M @ omega).Q
    for _ in range(iterations):
        Qm = torch.linalg.qr(M @ torch.linalg.qr(M.mT @ Qm).Q).Q
    Ub, s, Vh = torch.linalg.svd(Qm.mT @ M, full_matrices=False)
    return (Qm @ Ub)[..., :r], s[..., :r], Vh[..., :r, :].mT
