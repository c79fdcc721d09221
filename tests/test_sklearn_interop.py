"""from_sklearn: exact influence of a fitted scikit-learn LogisticRegression, checked against sklearn's own
leave-one-out retraining and against a hand-built torch model of the same objective."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import influencekit as ik
from influencekit.data.bundled import load_breast_cancer_split, load_digits_split
from influencekit.sklearn_interop import from_sklearn, sklearn_labels
from influencekit.validation import pearson


def _loo_check(X, y, X_test, y_test, C, removed):
    """−I_up,loss/n against sklearn refitted without each removed point (C' = C·n/(n−1) keeps λ = 1/(C n))."""
    n = len(y)
    est = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X, y)
    inf = from_sklearn(est, X, y)
    test = (torch.as_tensor(X_test), sklearn_labels(est, y_test))
    predicted = inf.scores(test).predicted_loo_change().numpy()[:, removed]

    def test_losses(model):
        return -np.log(model.predict_proba(X_test)[np.arange(len(y_test)), np.searchsorted(model.classes_, y_test)])

    base = test_losses(est)
    actual = np.empty_like(predicted)
    for j, i in enumerate(removed):
        keep = np.arange(n) != i
        refit = LogisticRegression(C=C * n / (n - 1), tol=1e-12, max_iter=10_000).fit(X[keep], y[keep])
        actual[:, j] = test_losses(refit) - base
    return inf, predicted, actual


def test_binary_matches_sklearn_leave_one_out():
    (X, y), (X_test, y_test) = load_breast_cancer_split(seed=0)
    X, y, X_test, y_test = X.numpy(), y.numpy(), X_test.numpy()[:3], y_test.numpy()[:3]
    inf, predicted, actual = _loo_check(X, y, X_test, y_test, C=1.0, removed=list(range(0, 400, 40)))
    assert inf.grad_norm_ < 1e-8 and inf.task.l2_weights == pytest.approx(1 / 400)
    # 30 pairs; measured Pearson r = 0.9998, largest error 5.9% of the largest change (first-order prediction)
    assert pearson(predicted.ravel(), actual.ravel()) > 0.999
    assert np.abs(predicted - actual).max() < 0.1 * np.abs(actual).max()


def test_multiclass_matches_sklearn_leave_one_out():
    (X, y), (X_test, y_test) = load_digits_split(n_train=300, seed=0)
    X, y, X_test, y_test = X.numpy(), y.numpy(), X_test.numpy()[:2], y_test.numpy()[:2]
    inf, predicted, actual = _loo_check(X, y, X_test, y_test, C=0.5, removed=list(range(0, 300, 30)))
    assert inf.n_params == 64 * 10 + 9  # K - 1 free intercepts: no singular direction
    assert pearson(predicted.ravel(), actual.ravel()) > 0.995  # 20 pairs; measured 0.9985


def test_labels_and_refusals():
    X = np.random.default_rng(0).normal(size=(40, 3))
    y = np.array(["ham", "spam"] * 20)
    est = LogisticRegression().fit(X, y)
    assert sklearn_labels(est, ["spam", "ham"]).tolist() == [1, 0]
    with pytest.raises(ik.InputError, match=r"`y` must hold labels the estimator was fitted on \(\['ham', 'spam'\]\)\. Got \['eggs'\]"):
        sklearn_labels(est, ["eggs"])
    with pytest.raises(ik.UnsupportedError, match=r"solver='liblinear'"):
        from_sklearn(LogisticRegression(solver="liblinear").fit(X, y), X, y)
    with pytest.raises(ik.UnsupportedError, match=r"must use the L2 penalty"):
        from_sklearn(LogisticRegression(l1_ratio=1.0, solver="saga").fit(X, y), X, y)
    with pytest.raises(ik.InputError, match=r"not fitted"):
        from_sklearn(LogisticRegression(), X, y)
    with pytest.raises(ik.UnsupportedError, match=r"must be a fitted sklearn\.linear_model\.LogisticRegression"):
        from_sklearn(object(), X, y)
    with pytest.raises(ik.InputError, match=r"must have the 3 features"):
        from_sklearn(est, X[:, :2], y)
