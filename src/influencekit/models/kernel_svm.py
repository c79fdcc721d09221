"""An RBF-kernel SVM as a linear SVM on an explicit kernel feature map, so the same engine scores it.

k(x, x') = exp(−γ‖x − x'‖²). Two feature maps φ with φ(x)ᵀφ(x') ≈ k(x, x'):

- ``"exact"`` (small n): the Gram matrix of the n training inputs K = UΛUᵀ, and
  φ(x) = Λ_m^{-1/2} U_mᵀ k(X_train, x) over the m eigenvalues above ``rtol``·λ_max. On the training
  inputs φ(x_i)ᵀφ(x_j) = K_ij up to the dropped eigenvalues, so a linear SVM on φ with the L2 penalty
  ‖w‖² *is* the kernel SVM with the RKHS norm (representer theorem): its solution lies in the span of the
  training features either way. Removing a training point keeps the map and gives the kernel SVM trained
  without it, so :class:`~influencekit.models.svm.HingeSVMRetrain` retrains it exactly.
- ``"fourier"`` (large n): D random Fourier features φ(x) = √(2/D) cos(Wx + b), W ~ N(0, 2γI),
  b ~ U[0, 2π] (Rahimi & Recht 2007); φᵀφ' → k as D grows, error O(1/√D).

:func:`fit_rbf_svm` trains the SVM on φ with the true hinge (:func:`~influencekit.models.svm.fit_hinge_svm`,
bias as a penalised constant feature); influence then uses :class:`~influencekit.SmoothHingeTask` with
``params="top"`` on the returned :class:`KernelSVM`, which takes raw inputs (Koh & Liang 2017, §5.1: t = 0.001).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.checks import check_int, check_number
from ..core.errors import InputError
from .svm import HingeSVM, fit_hinge_svm, set_linear

__all__ = ["RBFFeatures", "KernelSVM", "fit_rbf_svm", "rbf_gamma"]


def rbf_gamma(X: torch.Tensor) -> float:
    """γ = 1 / (d · Var(X)) over all coordinates of the flattened inputs (scikit-learn's ``gamma="scale"``)."""
    flat = X.reshape(len(X), -1).to(torch.float64)
    var = float(flat.var(unbiased=False))
    if not var > 0:
        raise InputError("`X` has zero variance; pass `gamma` explicitly. Got identical inputs.")
    return 1.0 / (flat.shape[1] * var)


class RBFFeatures(nn.Module):
    """φ(x) for flattened inputs ``(B, ...)`` → ``(B, m)``; no trainable parameters (buffers only).

    Build it with :meth:`exact` or :meth:`fourier`; ``description`` says which map and its size.
    """

    def __init__(self, kind: str, gamma: float, a: torch.Tensor, b: torch.Tensor, description: str) -> None:
        super().__init__()
        self.kind, self.gamma, self.description = kind, float(gamma), description
        self.register_buffer("a", a)  # exact: training inputs (n, d); fourier: W (D, d)
        self.register_buffer("b", b)  # exact: Λ^{-1/2}Uᵀ scaled basis (n, m); fourier: phases (D,)

    @classmethod
    def exact(cls, X: torch.Tensor, gamma: float, *, rtol: float = 1e-10) -> RBFFeatures:
        """The empirical kernel map of the training inputs ``X`` through the eigendecomposition of their Gram matrix."""
        flat = X.reshape(len(X), -1).to(torch.float64)
        K = torch.exp(-gamma * torch.cdist(flat, flat).square())
        lam, U = torch.linalg.eigh(K)
        keep = lam > rtol * lam.max()
        basis = U[:, keep] / lam[keep].sqrt()
        m = int(keep.sum())
        text = (
            f"exact RBF kernel map (eigendecomposition of the {len(flat)}x{len(flat)} Gram matrix, {m} eigenvalues "
            f"above {rtol:g} x max kept), gamma = {gamma:.4g}"
        )
        return cls("exact", gamma, flat, basis, text)

    @classmethod
    def fourier(cls, d: int, gamma: float, *, n_features: int, seed: int = 0) -> RBFFeatures:
        """``n_features`` random Fourier features of the RBF kernel on ``d`` input coordinates."""
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n_features, d, generator=g, dtype=torch.float64) * np.sqrt(2.0 * gamma)
        phase = torch.rand(n_features, generator=g, dtype=torch.float64) * 2 * np.pi
        text = f"random Fourier features of the RBF kernel (D = {n_features}, seed {seed}), gamma = {gamma:.4g}"
        return cls("fourier", gamma, W, phase, text)

    @property
    def n_features(self) -> int:
        return self.b.shape[1] if self.kind == "exact" else self.b.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(self.a.dtype)
        if self.kind == "exact":
            # ‖x − a‖² expanded; clamp the round-off below zero
            sq = (flat.square().sum(1, keepdim=True) - 2 * flat @ self.a.T + self.a.square().sum(1)).clamp(min=0)
            return torch.exp(-self.gamma * sq) @ self.b
        return np.sqrt(2.0 / self.a.shape[0]) * torch.cos(flat @ self.a.T + self.b)


class KernelSVM(nn.Module):
    """``top(features(x))`` → ``(B,)``: a fixed :class:`RBFFeatures` map and a linear layer ``top`` (weights + bias)."""

    def __init__(self, features: RBFFeatures) -> None:
        super().__init__()
        self.features = features
        self.top = nn.Linear(features.n_features, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.features(x))[:, 0]


@dataclass
class RBFSVM:
    """What :func:`fit_rbf_svm` returns: the model, the exact hinge solution on the features, and the map used."""

    model: KernelSVM
    solution: HingeSVM
    l2: float
    gamma: float
    feature_map: str

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """φ(X) ``(n, m)`` — the linear SVM's inputs (for :class:`~influencekit.models.svm.HingeSVMRetrain`)."""
        with torch.no_grad():
            return self.model.features(X)


def fit_rbf_svm(
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float = 1e-3,
    gamma: float | None = None,
    feature_map: str = "auto",
    max_exact: int = 3000,
    n_features: int = 2000,
    seed: int = 0,
) -> RBFSVM:
    """Train an RBF-kernel SVM with the true hinge on an explicit feature map of the raw inputs ``X``.

    Args:
        X: ``(n, ...)`` training inputs (flattened for the kernel); y: ``(n,)`` labels 0/1.
        l2: λ of the mean objective (1/n) Σ hinge + (λ/2)(‖w‖² + b²), the bias penalised as in
            :func:`~influencekit.models.svm.fit_hinge_svm`.
        gamma: the RBF width; ``None`` uses :func:`rbf_gamma` (1 / (d·Var X)).
        feature_map: ``"exact"``, ``"fourier"`` or ``"auto"`` (exact when n ≤ ``max_exact``).
        n_features: D of the Fourier map.
        seed: seed of the Fourier map and of the coordinate order.

    Returns:
        :class:`RBFSVM`; ``model`` takes raw inputs, so ``ik.SmoothHingeTask(result.model, temperature=0.001,
        l2=l2, params="top")`` computes its influence with the paper's smooth hinge.
    """
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor) or X.dim() < 2 or y.shape != (len(X),):
        raise InputError(
            f"`X` must be a tensor (n, ...) and `y` a tensor (n,). Got {getattr(X, 'shape', type(X))} and "
            f"{getattr(y, 'shape', type(y))}."
        )
    if feature_map not in ("auto", "exact", "fourier"):
        raise InputError(f"`feature_map` must be 'auto', 'exact' or 'fourier'. Got {feature_map!r}.")
    l2 = check_number("l2", l2, low=0.0, low_inclusive=False)
    max_exact = check_int("max_exact", max_exact, low=1)
    gamma = rbf_gamma(X) if gamma is None else check_number("gamma", gamma, low=0.0, low_inclusive=False)
    kind = ("exact" if len(X) <= max_exact else "fourier") if feature_map == "auto" else feature_map
    if kind == "exact":
        features = RBFFeatures.exact(X, gamma)
    else:
        features = RBFFeatures.fourier(
            X[0].numel(), gamma, n_features=check_int("n_features", n_features, low=1), seed=seed
        )
    model = KernelSVM(features)
    with torch.no_grad():
        Phi = features(X).numpy()
    solution = fit_hinge_svm(np.hstack([Phi, np.ones((len(Phi), 1))]), y.cpu().numpy(), l2=l2, seed=seed)
    set_linear(model.top, solution.theta)
    return RBFSVM(model, solution, l2, gamma, features.description)
