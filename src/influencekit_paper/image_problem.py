"""A binary image task on a frozen CNN feature extractor: the model of the paper's §5.1 and §5.2 experiments.

Koh & Liang (2017) froze Inception features under a logistic top layer (dog vs fish). Here a small tanh CNN
(:class:`SmallCNN`) is trained on the other eight digits of scikit-learn's 8×8 digits or of MNIST IDX files,
frozen, and a binary logistic top layer is trained on two digit classes (:func:`binary_image_problem`); the
attack (:mod:`influencekit_paper.attack`) and the model comparison
(:mod:`influencekit_paper.compare`) run on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influencekit.applications.attack import predict_labels
from influencekit.core.checks import check_int
from influencekit.core.errors import InputError
from influencekit.core.task import ClassificationTask
from influencekit.engine.training import fit_lbfgs

__all__ = ["SmallCNN", "AttackProblem", "binary_image_problem"]


class SmallCNN(nn.Module):
    """A small tanh CNN for ``(B, 1, side, side)`` images: ``features`` (two 3×3 convolutions with average
    pooling, then a dense layer) and ``top``, a linear layer with ``outputs`` logits. With one output (binary
    logistic regression) the model returns ``(B,)``, else ``(B, outputs)``."""

    def __init__(self, side: int, *, outputs: int = 1, channels: int = 8, features: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * (side // 4) ** 2, features),
            nn.Tanh(),
        )
        self.top = nn.Linear(features, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.top(self.features(x))
        return out.squeeze(-1) if out.shape[-1] == 1 else out


@dataclass
class AttackProblem:
    """A binary image task with a frozen CNN feature extractor and a logistic top layer trained to a minimum."""

    model: SmallCNN
    task: ClassificationTask
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[int, int]
    accuracy: float
    grad_norm: float
    description: str


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[int, int],
    train_fraction: float,
    seed: int,
    scale: float,
    max_images: int | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A seeded split into a training and a test portion; returns the other classes of the training portion
    (to pretrain the feature extractor) and the binary task's training and test sets (label 1 = classes[1])."""
    order = np.random.default_rng(seed).permutation(len(labels))[:max_images]
    side = images.shape[-1]
    X = torch.as_tensor(images[order].reshape(-1, 1, side, side) / scale, dtype=torch.float64)
    y = torch.as_tensor(labels[order].astype(np.int64))
    cut = int(round(train_fraction * len(y)))
    pair = (y == classes[0]) | (y == classes[1])
    train_part = torch.arange(len(y)) < cut
    other = train_part & ~pair
    tr, te = train_part & pair, ~train_part & pair
    return (X[other], y[other]), (X[tr], (y[tr] == classes[1]).long()), (X[te], (y[te] == classes[1]).long())


def binary_image_problem(
    *,
    mnist: str | Path | None = None,
    classes: tuple[int, int] = (3, 8),
    max_images: int | None = None,
    l2: float = 1e-3,
    epochs: int | None = None,
    seed: int = 0,
) -> AttackProblem:
    """A binary image task on a frozen CNN feature extractor, like the paper's Inception + logistic top layer.

    The images (scikit-learn's 8×8 digits by default, or MNIST IDX files in the folder ``mnist``) are split
    at random, two thirds for training. A :class:`SmallCNN` is trained with Adam to tell apart the *other*
    eight digits of the training portion — a generic feature extractor that never saw the two classes, as
    Inception was never trained on dog vs fish — then frozen; a binary logistic top layer on its features
    is trained on ``classes`` to ‖∇R‖ ≤ 1e-9 with L2 ``l2``. Float64, pixels in [0, 1]; label 1 means
    ``classes[1]``. MNIST uses the training files when the folder has them, else it splits the t10k files;
    ``max_images`` caps how many images are used (default: all digits, 6,000 MNIST images).
    """
    if len(classes) != 2:
        raise InputError(f"`classes` must name two digits, e.g. (3, 8). Got {tuple(classes)!r}.")
    a, b = (check_int("classes[0]", classes[0], low=0, high=9), check_int("classes[1]", classes[1], low=0, high=9))
    if a == b:
        raise InputError(f"`classes` must name two different digits. Got {tuple(classes)!r}.")
    if mnist is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels, scale = digits.images, digits.target, 16.0
        source = f"scikit-learn digits (8x8, 17 grey levels), {a} vs {b}"
        epochs = 20 if epochs is None else epochs
    else:
        from .data.mnist import load_mnist

        try:
            images, labels = load_mnist(mnist, "train")
            source = f"MNIST training files in {mnist}, {a} vs {b}"
        except InputError:
            images, labels = load_mnist(mnist, "test")
            source = (
                f"MNIST t10k files in {mnist} (the folder has no training images, so the t10k set is split), {a} vs {b}"
            )
        scale = 255.0
        max_images = 6000 if max_images is None else max_images
        epochs = 5 if epochs is None else epochs
    if max_images is not None:
        max_images = check_int("max_images", max_images, low=10)
    pretrain_set, train, test = _split(images, labels, (a, b), 2 / 3, seed, scale, max_images)
    torch.manual_seed(seed)
    side = train[0].shape[-1]
    extractor = SmallCNN(side, outputs=10).double()
    _pretrain(extractor, pretrain_set, epochs=check_int("epochs", epochs, low=0), seed=seed)
    model = SmallCNN(side).double()
    model.features.load_state_dict(extractor.features.state_dict())
    model.features.requires_grad_(False)
    model.eval()
    task = ClassificationTask(model, l2=l2, params="top")
    report = fit_lbfgs(task, train, tol=1e-9)
    accuracy = float((predict_labels(task, test[0]) == test[1]).double().mean())
    description = (
        f"{source}: {len(train[1])} training / {len(test[1])} test images. Feature extractor: a tanh CNN trained with "
        f"Adam for {epochs} epochs on the other 8 digits ({len(pretrain_set[1])} images), then frozen; logistic top "
        f"layer ({sum(p.numel() for p in task.params().values())} parameters, l2 = {l2:g}) trained to ||grad R|| = "
        f"{report.grad_norm:.1e}; test accuracy {accuracy:.3f}"
    )
    return AttackProblem(model, task, train, test, (a, b), accuracy, report.grad_norm, description)


def _pretrain(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *, epochs: int, seed: int) -> None:
    """Adam on the mean cross-entropy of the whole model, mini-batches of 64."""
    X, y = train
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
