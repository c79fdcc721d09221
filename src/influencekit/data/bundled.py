"""Data sets that ship inside scikit-learn, so the demo and the core tests need no download."""

from __future__ import annotations

import numpy as np
import torch

from ..core.checks import check_int

__all__ = ["load_digits_split", "load_breast_cancer_split"]


def load_digits_split(
    n_train: int = 1200, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes), pixels scaled to [0, 1], split at random.

    Returns ``((X_train, y_train), (X_test, y_test))`` with ``X`` of shape ``(n, 64)`` in ``dtype`` and
    ``y`` long. The split is a seeded permutation: the first ``n_train`` images train, the rest test.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    n_train = check_int("n_train", n_train, low=1, high=n - 1)
    order = np.random.default_rng(seed).permutation(n)
    X = torch.as_tensor(digits.data[order] / 16.0, dtype=dtype)
    y = torch.as_tensor(digits.target[order], dtype=torch.long)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def load_breast_cancer_split(
    n_train: int = 400, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's breast cancer data (569 tumours, 30 features, labels 0 malignant / 1 benign), split at random.

    Returns ``((X_train, y_train), (X_test, y_test))``; features are standardised with the training
    split's mean and standard deviation. The split is a seeded permutation: the first ``n_train`` train.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    n = len(data.target)
    n_train = check_int("n_train", n_train, low=2, high=n - 1)
    order = np.random.default_rng(seed).permutation(n)
    X, y = data.data[order], data.target[order]
    mean, std = X[:n_train].mean(axis=0), X[:n_train].std(axis=0)
    X = (X - mean) / np.where(std > 0, std, 1.0)
    X = torch.as_tensor(X, dtype=dtype)
    y = torch.as_tensor(y, dtype=torch.long)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])
