"""fit_lbfgs reaches the stated gradient norm and the same minimiser as scikit-learn."""

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.data import load_digits_split


def test_fit_lbfgs_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    (X, y), _ = load_digits_split(400, seed=1)
    l2 = 1e-2
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    task = ik.ClassificationTask(model, l2=l2)
    report = ik.fit_lbfgs(task, (X, y), tol=1e-10)
    assert report.converged and report.grad_norm <= 1e-10
    # sklearn minimises C·Σℓ + ½‖W‖² (bias unpenalised): compare with the bias penalty removed instead
    task_nobias = ik.ClassificationTask(model, l2=0.0)
    assert task_nobias.l2 == 0.0
    clf = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000, fit_intercept=False).fit(X.numpy(), y.numpy())
    model2 = torch.nn.Linear(64, 10, bias=False).double()
    task2 = ik.ClassificationTask(model2, l2=l2)
    ik.fit_lbfgs(task2, (X, y), tol=1e-10)
    np.testing.assert_allclose(model2.weight.detach().numpy(), clf.coef_, atol=2e-5)


def test_fit_lbfgs_result_does_not_depend_on_batch_size():
    (X, y), _ = load_digits_split(300, seed=2)
    thetas = []
    for batch_size in (300, 17):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 10).double()
        ik.fit_lbfgs(ik.ClassificationTask(model, l2=1e-2), (X, y), tol=1e-10, batch_size=batch_size)
        thetas.append(torch.cat([model.weight.reshape(-1), model.bias]).detach())
    torch.testing.assert_close(thetas[0], thetas[1], rtol=0, atol=1e-9)


def test_fit_lbfgs_warns_when_it_cannot_reach_tol():
    (X, y), _ = load_digits_split(200, seed=3)
    model = torch.nn.Linear(64, 10).double()
    with pytest.warns(ik.ConvergenceWarning, match=r"L-BFGS stopped with \|\|grad R\|\| = .* raise `max_iter`"):
        report = ik.fit_lbfgs(ik.ClassificationTask(model, l2=0.0), (X, y), tol=1e-30, max_iter=5)
    assert not report.converged
