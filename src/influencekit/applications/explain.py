"""Explaining predictions: the most helpful and most harmful training points for chosen test points."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.bundled import load_digits_split
from ..scoring import Influence
from ..task import ClassificationTask
from ..training import TrainReport, fit_lbfgs

__all__ = ["explain_digits", "DigitsModel", "train_digits_logistic"]


@dataclass
class DigitsModel:
    """Multiclass logistic regression trained on bundled digits, with its data and test losses."""

    model: torch.nn.Linear
    task: ClassificationTask
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_report: TrainReport
    test_losses: torch.Tensor
    accuracy: float

    def hardest(self, n: int) -> torch.Tensor:
        """Indices of the ``n`` test images with the highest loss."""
        return torch.argsort(self.test_losses, descending=True)[:n]


def train_digits_logistic(*, l2: float = 1e-3, seed: int = 0) -> DigitsModel:
    """Float64 multiclass logistic regression on scikit-learn's digits (1,200 train), trained by fit_lbfgs."""
    (X_train, y_train), (X_test, y_test) = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(X_train.shape[1], 10).double()
    task = ClassificationTask(model, l2=l2)
    report = fit_lbfgs(task, (X_train, y_train))
    with torch.no_grad():
        logits = model(X_test)
        losses = torch.nn.functional.cross_entropy(logits, y_test, reduction="none")
    accuracy = float((logits.argmax(1) == y_test).double().mean())
    return DigitsModel(model, task, (X_train, y_train), (X_test, y_test), report, losses, accuracy)


def explain_digits(
    *, n_test: int = 3, k: int = 5, solver: str = "cg", l2: float = 1e-3, seed: int = 0, progress: bool = False
) -> str:
    """Train multiclass logistic regression on bundled digits and explain its highest-loss test digits.

    Returns a printable report: for each test digit, its label and prediction, then the ``k`` most helpful
    and most harmful training images with their labels, I_up,loss and the predicted change of the test
    loss if that image were removed (−I_up,loss / n).
    """
    digits = train_digits_logistic(l2=l2, seed=seed)
    y_train = digits.train[1]
    X_test, y_test = digits.test
    model, train_report, accuracy, losses = digits.model, digits.train_report, digits.accuracy, digits.test_losses
    with torch.no_grad():
        logits = model(X_test)
    chosen = digits.hardest(n_test)
    influence = Influence(digits.task, digits.train, solver=solver, progress=progress).fit()
    ranked = influence.top_k((X_test[chosen], y_test[chosen]), k=k)
    n = len(y_train)
    lines = [
        f"multiclass logistic regression on scikit-learn digits: {n} training / {len(y_test)} test images, "
        f"l2={l2:g}, test accuracy {accuracy:.3f}, ||grad R|| = {train_report.grad_norm:.1e}",
        f"solver {solver!r}: {ranked.metadata['solve_reports'][0]['iterations']} iterations, relative residual "
        f"{ranked.metadata['solve_reports'][0]['relative_residual']:.1e}",
        "I_up,loss > 0: the training image raises this test loss (harmful); < 0: it lowers it (helpful).",
        "LOO = predicted change of the test loss if that training image were removed (-I_up,loss / n).",
    ]
    for row, t in enumerate(chosen.tolist()):
        lines.append("")
        lines.append(
            f"test image {t}: label {int(y_test[t])}, predicted {int(logits[t].argmax())}, loss {float(losses[t]):.3f}"
        )
        for title, part in (("helpful", ranked.helpful), ("harmful", ranked.harmful)):
            lines.append(f"  most {title}:")
            for i, v in zip(part.indices[row].tolist(), part.values[row].tolist()):
                lines.append(f"    train {i:5d}  label {int(y_train[i])}  I_up,loss {v:+.4f}  LOO {-v / n:+.2e}")
    return "\n".join(lines)
