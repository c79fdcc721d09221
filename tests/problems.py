"""Exact reference problems, computed independently of influencekit (numpy float64, closed forms).

Multiclass logistic regression with parameters Θ (C, D+1) (weights and bias in one matrix, row-major),
x̃ = [x, 1], p = softmax(Θx̃):

    ∇ℓ(z)  = (p − e_y) ⊗ x̃
    ∇²R    = (1/n) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + λ I

Influence (docs/conventions.md): I_up,loss(z, z_test) = −∇ℓ(z_test)ᵀ H⁻¹ (∇ℓ(z) + λΘ).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import influencekit as ik
from influencekit.data import load_digits_split

# the project's real data sets (../shared/data beside the repository; tests that need one skip without it)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def theta_of_linear(model: torch.nn.Linear) -> np.ndarray:
    """Θ (C, D+1) from an nn.Linear: weight columns then the bias column."""
    W = model.weight.detach().double().numpy()
    b = model.bias.detach().double().numpy()
    return np.concatenate([W, b[:, None]], axis=1)


@dataclass
class LogisticReference:
    """Closed-form influence of multiclass logistic regression at Θ."""

    theta: np.ndarray  # (C, D+1)
    X: np.ndarray  # (n, D)
    y: np.ndarray  # (n,)
    l2: float

    def _aug(self, X: np.ndarray) -> np.ndarray:
        return np.concatenate([X, np.ones((len(X), 1))], axis=1)

    def grads(self, X: np.ndarray, y: np.ndarray, *, with_l2: bool) -> np.ndarray:
        """Per-example gradients (n, C·(D+1)), Θ flattened row-major."""
        Xa = self._aug(X)
        P = softmax(Xa @ self.theta.T)
        P[np.arange(len(y)), y] -= 1.0
        G = (P[:, :, None] * Xa[:, None, :]).reshape(len(y), -1)
        return G + self.l2 * self.theta.reshape(-1) if with_l2 else G

    def mean_grad(self, weights: np.ndarray | None = None) -> np.ndarray:
        w = np.ones(len(self.y)) if weights is None else weights
        G = self.grads(self.X, self.y, with_l2=False)
        return (w[:, None] * G).sum(0) / w.sum() + self.l2 * self.theta.reshape(-1)

    def hessian(self) -> np.ndarray:
        Xa = self._aug(self.X)
        P = softmax(Xa @ self.theta.T)
        C, D1 = self.theta.shape
        H = np.zeros((C * D1, C * D1))
        for c in range(C):
            for d in range(c, C):
                a = P[:, c] * ((c == d) - P[:, d])  # (n,)
                block = (Xa * a[:, None]).T @ Xa / len(Xa)
                H[c * D1 : (c + 1) * D1, d * D1 : (d + 1) * D1] = block
                H[d * D1 : (d + 1) * D1, c * D1 : (c + 1) * D1] = block.T
        return H + self.l2 * np.eye(C * D1)

    def scores(self, X_test: np.ndarray, y_test: np.ndarray, damping: float = 0.0) -> np.ndarray:
        """I_up,loss, (n_test, n_train)."""
        H = self.hessian() + damping * np.eye(self.theta.size)
        Gt = self.grads(X_test, y_test, with_l2=False)
        Gr = self.grads(self.X, self.y, with_l2=True)
        return -Gt @ np.linalg.solve(H, Gr.T)

    def self_influence(self, damping: float = 0.0) -> np.ndarray:
        H = self.hessian() + damping * np.eye(self.theta.size)
        Gr = self.grads(self.X, self.y, with_l2=True)
        return np.einsum("ij,ji->i", Gr, np.linalg.solve(H, Gr.T))

    def params_influence(self, idx: list[int], damping: float = 0.0) -> np.ndarray:
        """−H⁻¹∇L(z) reshaped to (len(idx), C, D+1)."""
        H = self.hessian() + damping * np.eye(self.theta.size)
        Gr = self.grads(self.X[idx], self.y[idx], with_l2=True)
        return -np.linalg.solve(H, Gr.T).T.reshape(len(idx), *self.theta.shape)

    def test_losses(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        P = softmax(self._aug(X) @ theta.T)
        return -np.log(P[np.arange(len(y)), y])


def to_ours(flat_theta_like: np.ndarray, C: int, D: int) -> np.ndarray:
    """Map (…, C, D+1) arrays to influencekit's flat layout of nn.Linear: weight (C·D) then bias (C)."""
    W = flat_theta_like[..., :D].reshape(*flat_theta_like.shape[:-2], C * D)
    b = flat_theta_like[..., D]
    return np.concatenate([W, b], axis=-1)


@dataclass
class DigitsLogistic:
    """Multiclass logistic regression on scikit-learn digits, trained to ‖∇R‖ < 1e-9, with its reference."""

    model: torch.nn.Linear
    task: ik.ClassificationTask
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    ref: LogisticReference


def digits_logistic(n_train: int = 1200, l2: float = 1e-3, seed: int = 0) -> DigitsLogistic:
    (Xtr, ytr), (Xte, yte) = load_digits_split(n_train, seed=seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 10).double()
    task = ik.ClassificationTask(model, l2=l2)
    report = ik.fit_lbfgs(task, (Xtr, ytr), tol=1e-10)
    assert report.converged, report
    ref = LogisticReference(theta_of_linear(model), Xtr.numpy(), ytr.numpy(), l2)
    return DigitsLogistic(model, task, (Xtr, ytr), (Xte, yte), ref)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def relative_error(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def small_mlp(d_in: int = 6, hidden: int = 5, d_out: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)).double()


def digits_mlp(train: tuple[torch.Tensor, torch.Tensor], hidden: int = 12) -> ik.ClassificationTask:
    """A tanh MLP 64-hidden-10 (L2 1e-3) trained by L-BFGS on the digits ``train``: a non-convex model near a
    minimum."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).double()
    task = ik.ClassificationTask(net, l2=1e-3)
    ik.fit_lbfgs(task, train, max_iter=2000, tol=1e-6, warn=False)
    return task


def small_cnn_problem(n: int = 120, n_test: int = 16):
    """A convolution (36 positions) then two Linear layers (one position each), briefly trained; L2 1e-2 in the loss:
    (task, train, test)."""
    torch.manual_seed(0)
    X = torch.randn(n + n_test, 1, 6, 6, dtype=torch.float64)
    y = (X[:, 0, :3].mean((1, 2)) > 0).long() + (X[:, 0, 3:, :3].mean((1, 2)) > 0.2).long()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[:n]), y[:n]).backward()
        opt.step()
    return ik.ClassificationTask(model, l2=1e-2), (X[:n], y[:n]), (X[n:], y[n:])


def token_sequences(
    n: int, seed: int, vocab: int, *, labels: bool = True, lengths: tuple[int, int] = (4, 12)
) -> list[dict[str, torch.Tensor]]:
    """Tokenised examples of ``lengths[0]`` to ``lengths[1] - 1`` tokens (ids 1..vocab-1; 0 pads), with a 0-d label
    that is 1 when low ids outnumber high ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(*lengths, (1,), generator=g))
        ids = torch.randint(1, vocab, (T,), generator=g)
        ex = {"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long)}
        if labels:
            ex["labels"] = torch.tensor(int((ids < vocab // 2).sum() > (ids >= vocab // 2).sum()))
        out.append(ex)
    return out
