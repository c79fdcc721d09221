"""Exact influence for a fitted scikit-learn ``LogisticRegression``, ``Ridge`` or ``LinearSVC``, without a PyTorch
model.

``Ridge`` minimises ``Σ_i (y_i − wᵀx_i − b)² + α‖w‖²``: divided by n that is the mean squared error plus
(λ/2)‖w‖² with λ = 2α/n (intercept unpenalised). ``LinearSVC`` (liblinear, binary) minimises
``½‖θ‖² + C Σ_i loss(s_i θᵀx̃_i)`` with the intercept a penalised weight on a constant feature
(``intercept_scaling=1``): λ = 1/(C·n) on every parameter. Its ``loss="hinge"`` has no curvature, so
influence uses the smooth hinge at ``temperature`` t (Koh & Liang §4.1; the model is polished to the exact
hinge optimum first); ``loss="squared_hinge"`` is piecewise quadratic and used as it is.

For ``LogisticRegression``:

scikit-learn minimises ``C Σ_i ℓ(z_i) + ½‖W‖²`` with the intercept unpenalised (solvers other than
liblinear). Divided by ``C·n`` this is influencekit's mean objective (docs/conventions.md)::

    R(θ) = (1/n) Σ_i [ℓ(z_i, θ) + (λ/2)‖W‖²],   λ = 1/(C·n),   θ = (W, b)

so :func:`from_sklearn` builds the same model in float64 torch, puts the L2 term on the weights only
(inside each training example's loss, so the train-side gradient carries λW as the convention says; the
test side measures the plain loss), polishes scikit-learn's solution to ‖∇R‖ ≤ 1e-9 with Newton steps
(the minimiser is unique, so this only removes scikit-learn's optimisation error), and returns a fitted
:class:`~influencekit.Influence`.

Binary problems have one logit (labels: index 1 of ``classes_`` is the positive class). With K > 2
classes scikit-learn fits K logits; softmax does not change when the same constant is added to every
intercept, and the intercepts are not penalised, so the Hessian would be singular along that direction.
The torch model therefore keeps K − 1 free intercepts (the last class's is fixed at 0 after shifting all
of them by it), which gives the same probabilities and the same influence on every loss.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import check_number
from ..core.errors import InputError, InputTypeError, StationarityWarning, UnsupportedError
from ..core.task import ClassificationTask, Params, RegressionTask, SmoothHingeTask
from ..data.examples import Batch
from ..engine.scoring import Influence
from ..engine.training import fit_lbfgs
from ..solvers import Solver
from .svm import fit_hinge_svm, set_linear

__all__ = ["from_sklearn", "sklearn_labels"]


class _SklearnLinear(nn.Module):
    """Logits ``X Wᵀ + b`` with ``W`` (K, d) and K − 1 free intercepts (the last one fixed at 0) for K > 2."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, *, fit_intercept: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(coef, dtype=dtype).clone())
        k = coef.shape[0]
        self.free = k - 1 if k > 1 else 1
        if not fit_intercept:
            self.bias = None
        elif k > 1:
            b = np.asarray(intercept, dtype=np.float64)
            self.bias = nn.Parameter(torch.as_tensor(b[:-1] - b[-1], dtype=dtype))
        else:
            self.bias = nn.Parameter(torch.as_tensor(intercept, dtype=dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.weight.T
        if self.bias is None:
            return logits
        if self.weight.shape[0] > 1:
            zero = torch.zeros(1, dtype=self.bias.dtype, device=self.bias.device)
            return logits + torch.cat([self.bias, zero])
        return logits + self.bias


class _WeightPenalised:
    """Mixin: (λ/2)‖W‖² of ``params["weight"]`` inside each training example's loss (not on the intercept, as
    scikit-learn penalises); the test side measures the plain loss of the base task."""

    def __init__(self, model: nn.Module, *, l2_weights: float, source: str) -> None:
        super().__init__(model, l2=0.0)
        self.l2_weights = l2_weights
        self.source = source

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return super().loss(params, batch) + 0.5 * self.l2_weights * (params["weight"] ** 2).sum()

    def measurement(self, params: Params, batch: Batch) -> torch.Tensor:
        return super().loss(params, batch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "l2_weights": self.l2_weights, "source": self.source}


class _WeightPenalisedClassification(_WeightPenalised, ClassificationTask):
    """Cross-entropy / logistic loss with the weight-only L2 term."""


class _WeightPenalisedRegression(_WeightPenalised, RegressionTask):
    """Squared error with the weight-only L2 term."""


class _SquaredHingeTask(SmoothHingeTask):
    """max(0, 1 − s·f(x))², liblinear's default ``squared_hinge``: once differentiable, piecewise quadratic."""

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return torch.relu(1.0 - self.margins(params, batch)) ** 2

    def measurement(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss(params, batch)


def _fitted(estimator: Any) -> None:
    if not hasattr(estimator, "coef_"):
        raise InputError("`estimator` is not fitted: call estimator.fit(X, y) first.")


def _features(X: Any, n_features: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputTypeError(f"`dtype` must be a floating torch dtype. Got {dtype!r}.")
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X).to(dtype)
    if X.dim() != 2:
        raise InputError(f"`X` must be a 2-D array (n, d). Got shape {tuple(X.shape)}.")
    if X.shape[1] != n_features:
        raise InputError(f"`X` must have the {n_features} features the estimator was fitted on. Got {X.shape[1]}.")
    return X


def _from_ridge(estimator: Any, X: Any, y: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    _fitted(estimator)
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    if coef.shape[0] != 1:
        raise UnsupportedError(
            f"`estimator` must be a single-output Ridge. Got {coef.shape[0]} outputs; fit one Ridge per output."
        )
    if np.ndim(estimator.alpha) != 0:
        raise UnsupportedError("`estimator` must have one scalar `alpha`.")
    X = _features(X, coef.shape[1], dtype)
    target = torch.as_tensor(np.asarray(y, dtype=np.float64).reshape(-1), dtype=dtype)
    if len(target) != len(X):
        raise InputError(f"`X` and `y` must have the same number of examples. Got {len(X)} and {len(target)}.")
    alpha = check_number("estimator.alpha", float(estimator.alpha), low=0.0)
    model = nn.Linear(coef.shape[1], 1, bias=bool(estimator.fit_intercept)).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(coef, dtype=dtype))
        if model.bias is not None:
            model.bias.copy_(torch.as_tensor(np.atleast_1d(estimator.intercept_), dtype=dtype))
    task = _WeightPenalisedRegression(model, l2_weights=2.0 * alpha / len(X), source=f"sklearn Ridge(alpha={alpha:g})")
    return task, (X, target)


def _from_linear_svc(
    estimator: Any, X: Any, y: Any, dtype: torch.dtype, temperature: float, polish: bool
) -> tuple[Any, Any]:
    _fitted(estimator)
    coef = np.asarray(estimator.coef_, dtype=np.float64)
    params = estimator.get_params()
    if coef.shape[0] != 1:
        raise UnsupportedError(
            f"`estimator` must be a binary LinearSVC; it has {coef.shape[0]} one-vs-rest classifiers. Explain one of "
            "them: refit LinearSVC on a two-class version of the labels."
        )
    if params.get("penalty") != "l2":
        raise UnsupportedError(f"`estimator` must use penalty='l2'. Got {params.get('penalty')!r}.")
    if params.get("class_weight") is not None:
        raise UnsupportedError(f"`estimator` must have class_weight=None. Got {params['class_weight']!r}.")
    if params.get("fit_intercept") and float(params.get("intercept_scaling", 1.0)) != 1.0:
        raise UnsupportedError(
            f"`estimator` must have intercept_scaling=1 (the intercept is then a plainly penalised weight). Got "
            f"{params['intercept_scaling']!r}; refit with intercept_scaling=1."
        )
    X = _features(X, coef.shape[1], dtype)
    labels = sklearn_labels(estimator, y)
    if len(labels) != len(X):
        raise InputError(f"`X` and `y` must have the same number of examples. Got {len(X)} and {len(labels)}.")
    C = check_number("estimator.C", float(estimator.C), low=0.0, low_inclusive=False)
    l2 = 1.0 / (C * len(X))
    model = nn.Linear(coef.shape[1], 1, bias=bool(params.get("fit_intercept"))).to(dtype)
    theta = np.concatenate([coef[0], np.atleast_1d(estimator.intercept_)]) if model.bias is not None else coef[0]
    set_linear(model, theta)
    if params.get("loss") == "hinge":
        task = SmoothHingeTask(model, temperature=temperature, l2=l2)
    else:
        task = _SquaredHingeTask(model, temperature=0.0, l2=l2)
    if polish and params.get("loss") == "hinge":
        # liblinear stops at a loose tolerance: re-solve the same SVM exactly (the optimum is unique)
        features = X.detach().cpu().to(torch.float64).numpy()
        if model.bias is not None:
            features = np.hstack([features, np.ones((len(features), 1))])
        set_linear(model, fit_hinge_svm(features, labels.numpy(), l2=l2).theta)
    task.source = f"sklearn LinearSVC(C={C:g}, loss={params.get('loss')!r})"
    return task, (X, labels)


def _check_estimator(estimator: Any) -> bool:
    """Refuse what is not L2-penalised (or unpenalised) multinomial/binary logistic regression; True if penalised."""
    from sklearn.linear_model import LogisticRegression

    if not isinstance(estimator, LogisticRegression):
        raise UnsupportedError(
            "`estimator` must be a fitted sklearn LogisticRegression, Ridge or LinearSVC. Got "
            f"{type(estimator).__name__}."
        )
    if not hasattr(estimator, "coef_"):
        raise InputError("`estimator` is not fitted: call estimator.fit(X, y) first.")
    params = estimator.get_params()
    penalty = params.get("penalty", "l2")
    l1_ratio = params.get("l1_ratio")
    penalised = penalty == "l2" or (penalty == "deprecated" and not l1_ratio)
    if not penalised and penalty not in (None, "none"):
        raise UnsupportedError(
            f"`estimator` must use the L2 penalty (influence needs a twice-differentiable objective). Got "
            f"penalty={penalty!r}, l1_ratio={l1_ratio!r}; refit with l1_ratio=0."
        )
    if params.get("solver") == "liblinear":
        raise UnsupportedError(
            "`estimator` was fitted with solver='liblinear', which penalises the intercept and fits one-vs-rest; "
            "refit with solver='lbfgs' (or 'newton-cg'/'newton-cholesky'/'sag'/'saga')."
        )
    if params.get("class_weight") is not None:
        raise UnsupportedError(f"`estimator` must have class_weight=None. Got {params['class_weight']!r}.")
    return penalised


def sklearn_labels(estimator: Any, y: Any) -> torch.Tensor:
    """Class indices ``(n,)`` (positions in ``estimator.classes_``) of the labels ``y``, for influence data."""
    classes = np.asarray(estimator.classes_)
    y = np.asarray(y).reshape(-1)
    pos = np.searchsorted(classes, y)
    pos = np.clip(pos, 0, len(classes) - 1)
    unknown = classes[pos] != y
    if unknown.any():
        raise InputError(
            f"`y` must hold labels the estimator was fitted on ({classes.tolist()[:10]}). Got "
            f"{y[unknown][:5].tolist()}."
        )
    return torch.as_tensor(pos, dtype=torch.long)


def from_sklearn(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    solver: str | Solver = "exact",
    damping: float = 0.0,
    polish: bool = True,
    dtype: torch.dtype = torch.float64,
    temperature: float = 0.001,
    progress: bool = False,
    **influence_options: Any,
) -> Influence:
    """A fitted :class:`~influencekit.Influence` for a fitted scikit-learn ``LogisticRegression``, ``Ridge``
    or binary ``LinearSVC`` (see the module docstring for how each objective maps to influencekit's).

    Args:
        estimator: ``LogisticRegression`` fitted on ``(X, y)`` with the L2 penalty (any solver but liblinear,
            no class weights).
        X: ``(n, d)`` the training features it was fitted on (array or tensor).
        y: ``(n,)`` the training labels it was fitted on (any labels in ``estimator.classes_``).
        solver, damping, progress, influence_options: passed to :class:`~influencekit.Influence`.
        polish: retrain from scikit-learn's solution to ‖∇R‖ ≤ 1e-9 (its default ``tol`` leaves ‖∇R‖ near
            1e-5, which influence notices) — for ``LinearSVC(loss="hinge")``, re-solve the SVM exactly instead;
            the estimator itself is not changed.
        dtype: the floating dtype of the torch model and data.
        temperature: t of the smooth hinge for ``LinearSVC(loss="hinge")`` (influence only; the model is the
            exact hinge optimum). Ignored otherwise.

    Returns:
        the fitted Influence; its ``train`` is ``(X, class indices)``. Give test data as
        ``(X_test, sklearn_labels(estimator, y_test))``. The task carries ``l2_weights`` = λ = 1/(C·n).
    """
    from sklearn.linear_model import Ridge
    from sklearn.svm import LinearSVC

    if isinstance(estimator, (Ridge, LinearSVC)):
        if isinstance(estimator, Ridge):
            task, train = _from_ridge(estimator, X, y, dtype)
        else:
            temperature = check_number("temperature", temperature, low=0.0)
            task, train = _from_linear_svc(estimator, X, y, dtype, temperature, polish)
        if polish and type(task) is not SmoothHingeTask:  # the true hinge was re-solved exactly already
            fit_lbfgs(task, train, tol=1e-9)
        with warnings.catch_warnings():
            if isinstance(task, SmoothHingeTask) and not isinstance(task, _SquaredHingeTask):
                # the hinge optimum is not a stationary point of the smooth hinge: expected (Koh & Liang §4.1)
                warnings.simplefilter("ignore", StationarityWarning)
            return Influence(task, train, solver=solver, damping=damping, progress=progress, **influence_options).fit()
    penalised = _check_estimator(estimator)
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X).to(dtype)
    if X.dim() != 2:
        raise InputError(f"`X` must be a 2-D array (n, d). Got shape {tuple(X.shape)}.")
    coef = np.asarray(estimator.coef_, dtype=np.float64)
    if X.shape[1] != coef.shape[1]:
        raise InputError(f"`X` must have the {coef.shape[1]} features the estimator was fitted on. Got {X.shape[1]}.")
    labels = sklearn_labels(estimator, y)
    if len(labels) != len(X):
        raise InputError(f"`X` and `y` must have the same number of examples. Got {len(X)} and {len(labels)}.")
    C = check_number("estimator.C", float(estimator.C), low=0.0, low_inclusive=False)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputTypeError(f"`dtype` must be a floating torch dtype. Got {dtype!r}.")
    n = len(labels)
    l2 = 1.0 / (C * n) if penalised and not np.isinf(C) else 0.0
    model = _SklearnLinear(
        coef, np.asarray(estimator.intercept_), fit_intercept=bool(estimator.fit_intercept), dtype=dtype
    )
    task = _WeightPenalisedClassification(model, l2_weights=l2, source=f"sklearn LogisticRegression(C={C:g})")
    train = (X, labels)
    if polish:
        fit_lbfgs(task, train, tol=1e-9)
    return Influence(task, train, solver=solver, damping=damping, progress=progress, **influence_options).fit()
