"""An exact linear SVM with the true hinge loss, as a trainer and a leave-one-out retrainer.

    min_θ  R_w(θ) = Σ wᵢ max(0, 1 − sᵢ θᵀxᵢ) / Σ wᵢ + (λ/2)‖θ‖²,   sᵢ = ±1

(the bias, if any, is a constant-1 feature and is penalised like the weights — the convention of
:class:`~influencekit.SmoothHingeTask` with ``l2=λ``). Equivalently ½‖θ‖² + Σ Cᵢ hingeᵢ with
Cᵢ = wᵢ / (λ Σ w). Solved in the dual by coordinate descent (Hsieh et al., ICML 2008) and then *polished*:
the dual solution names the points on the margin (0 < αᵢ < Cᵢ), at the bound (αᵢ = Cᵢ) and outside
(αᵢ = 0); the margin equations sᵢθᵀxᵢ = 1 are then solved exactly by least squares and the partition is
verified, which gives the optimum to round-off where coordinate descent alone converges only linearly.
The duality gap P(θ) − D(α), in units of R, says how far from optimal a solution is.

The paper's Figure 3 (Koh & Liang 2017, §4.1) trains this SVM and retrains it without each of a test
point's most influential training points; :class:`HingeSVMRetrain` is that retrainer for
:func:`~influencekit.validation.leave_one_out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int, check_number
from ..core.errors import InputError
from ..core.task import Task
from ..data.examples import DataSource
from ..engine.training import TrainReport

__all__ = ["HingeSVM", "fit_hinge_svm", "HingeSVMRetrain"]


@dataclass(frozen=True)
class HingeSVM:
    """A solved SVM: ``theta`` (d,), dual ``alpha`` (n,), duality ``gap`` and objective in units of R, epochs run."""

    theta: np.ndarray
    alpha: np.ndarray
    gap: float
    objective: float
    epochs: int
    polished: bool


def _objectives(
    X: np.ndarray, s: np.ndarray, C: np.ndarray, theta: np.ndarray, alpha: np.ndarray
) -> tuple[float, float]:
    hinge = np.maximum(0.0, 1.0 - s * (X @ theta))
    primal = 0.5 * float(theta @ theta) + float(C @ hinge)
    w = (alpha * s) @ X
    dual = float(alpha.sum()) - 0.5 * float(w @ w)
    return primal, dual


def _polish(X: np.ndarray, s: np.ndarray, C: np.ndarray, alpha: np.ndarray, tol: float) -> np.ndarray | None:
    """Solve the margin equations exactly for the partition alpha suggests; None if the partition is wrong."""
    scale = np.maximum(C, 1e-300)
    at_bound = alpha >= C - 1e-9 * scale
    free = (alpha > 1e-9 * scale) & ~at_bound
    base = (C * s * at_bound) @ X
    if free.any():
        Z = s[free, None] * X[free]  # rows sᵢxᵢ of the margin points
        # θ = base + Zᵀβ with Z θ = 1: (Z Zᵀ) β = 1 − Z base
        G = Z @ Z.T
        rhs = 1.0 - Z @ base
        beta, *_ = np.linalg.lstsq(G, rhs, rcond=None)
        if not (np.all(beta >= -tol * C[free]) and np.all(beta <= C[free] * (1 + tol))):
            return None
        new = alpha.copy()
        new[free] = np.clip(beta, 0.0, C[free])
    else:
        new = np.where(at_bound, C, 0.0)
    new[at_bound] = C[at_bound]
    new[~(free | at_bound)] = 0.0
    return new


def fit_hinge_svm(
    X: np.ndarray,
    y: np.ndarray,
    *,
    l2: float,
    weights: np.ndarray | None = None,
    alpha0: np.ndarray | None = None,
    tol: float = 1e-12,
    max_epochs: int = 2000,
    seed: int = 0,
) -> HingeSVM:
    """Solve the true-hinge linear SVM (see the module docstring) to a duality gap ≤ ``tol`` (units of R).

    Args:
        X: ``(n, d)`` features (append a column of ones for a penalised bias).
        y: ``(n,)`` labels 0/1 (or ±1).
        l2: λ > 0.
        weights: per-example weights ≥ 0 (0 removes an example); default uniform.
        alpha0: a warm start for the dual variables (clipped to the box), e.g. the full-data solution
            when retraining without one example.
        tol: the duality gap at which to stop, in units of R.
        max_epochs: coordinate-descent sweeps at most.
        seed: seed of the coordinate order.
    """
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (len(X),) or len(X) == 0:
        raise InputError(f"`X` must be (n, d) and `y` (n,) with n ≥ 1. Got X {X.shape}, y {y.shape}.")
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1} and not labels <= {-1, 1}:
        raise InputError(f"`y` must hold labels 0/1 or -1/+1. Got {sorted(labels)[:5]}.")
    s = np.where(y > 0, 1.0, -1.0)
    l2 = check_number("l2", l2, low=0.0, low_inclusive=False)
    tol = check_number("tol", tol, low=0.0, low_inclusive=False)
    max_epochs = check_int("max_epochs", max_epochs, low=1)
    w = np.ones(len(X)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(X),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InputError(f"`weights` must be finite, ≥ 0, of shape ({len(X)},), with a positive sum.")
    C = w / (l2 * w.sum())
    alpha = np.zeros(len(X)) if alpha0 is None else np.clip(np.asarray(alpha0, dtype=np.float64), 0.0, C)
    theta = (alpha * s) @ X
    q = np.einsum("ij,ij->i", X, X)
    rng = np.random.default_rng(seed)
    active = np.flatnonzero((C > 0) & (q > 0))
    unit = l2  # a gap in the ½‖θ‖² + ΣCᵢhᵢ scale times λ is a gap in units of R
    epochs, polished = 0, False
    for epochs in range(1, max_epochs + 1):
        for i in rng.permutation(active):
            g = s[i] * float(X[i] @ theta) - 1.0
            new = min(max(alpha[i] - g / q[i], 0.0), C[i])
            if new != alpha[i]:
                theta += (new - alpha[i]) * s[i] * X[i]
                alpha[i] = new
        if epochs % 5 == 0 or epochs == max_epochs:
            primal, dual = _objectives(X, s, C, theta, alpha)
            if (primal - dual) * unit <= tol:
                break
            exact = _polish(X, s, C, alpha, 1e-9)
            if exact is not None:
                theta_e = (exact * s) @ X
                p_e, d_e = _objectives(X, s, C, theta_e, exact)
                if (p_e - d_e) * unit <= tol:
                    alpha, theta, polished = exact, theta_e, True
                    break
    primal, dual = _objectives(X, s, C, theta, alpha)
    return HingeSVM(theta, alpha, max(primal - dual, 0.0) * unit, primal * unit, epochs, polished)


class HingeSVMRetrain:
    """Leave-one-out retrainer of a linear model ``nn.Linear(d, 1)`` under the true hinge (Koh & Liang, Fig. 3).

    ``leave_one_out(influence, test, retrain=HingeSVMRetrain(full_svm, l2))``: each call solves the SVM with
    the given weights, warm-started from the full-data dual solution, and writes θ into the linear layer
    (weight, then bias when the layer has one — the layout ``features @ weight.T + bias`` with a constant-1
    feature for the bias). Its :class:`~influencekit.TrainReport` carries the duality gap as ``grad_norm``
    (the hinge has no gradient at its kink) and ``converged = gap ≤ tol``.
    """

    def __init__(self, solution: HingeSVM, *, l2: float, tol: float = 1e-12, max_epochs: int = 2000) -> None:
        self.alpha0 = solution.alpha
        self.l2 = check_number("l2", l2, low=0.0, low_inclusive=False)
        self.tol = check_number("tol", tol, low=0.0, low_inclusive=False)
        self.max_epochs = check_int("max_epochs", max_epochs, low=1)

    def __call__(self, task: Task, train: DataSource, weights: torch.Tensor) -> TrainReport:
        layer = _linear_of(task.model)
        X, y = _features(train, layer)
        svm = fit_hinge_svm(
            X,
            y,
            l2=self.l2,
            weights=weights.cpu().numpy(),
            alpha0=self.alpha0,
            tol=self.tol,
            max_epochs=self.max_epochs,
        )
        set_linear(layer, svm.theta)
        return TrainReport(svm.gap, svm.objective, svm.epochs, svm.gap <= self.tol)

    def __repr__(self) -> str:
        return f"HingeSVMRetrain(l2={self.l2:g}, tol={self.tol:g}, max_epochs={self.max_epochs})"


def _linear_of(model: Any) -> torch.nn.Linear:
    if isinstance(model, torch.nn.Linear) and model.out_features == 1:
        return model
    raise InputError(f"the hinge SVM trainer needs a model that is one nn.Linear(d, 1). Got {type(model).__name__}.")


def _features(train: DataSource, layer: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    X, y = train
    X = torch.as_tensor(X).detach().cpu().to(torch.float64).numpy()
    if layer.bias is not None:
        X = np.hstack([X, np.ones((len(X), 1))])
    return X, torch.as_tensor(y).cpu().numpy()


def set_linear(layer: torch.nn.Linear, theta: np.ndarray) -> None:
    """Write θ = (weight..., bias) into ``layer`` in place."""
    d = layer.in_features
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(theta[:d], dtype=layer.weight.dtype).reshape(1, d))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(theta[d : d + 1], dtype=layer.bias.dtype))
