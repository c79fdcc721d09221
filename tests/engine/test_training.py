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
    clf = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000, fit_intercept=False).fit(
        X.numpy(), y.numpy()
    )
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


def test_newton_start_reaches_the_same_minimum_after_removing_a_whole_class():
    # a large weight change (every "3" removed) from the old minimum: Newton steps on the weighted Hessian converge
    # quadratically; the minimiser is the one L-BFGS alone finds
    (X, y), _ = load_digits_split(300, seed=0)
    X = X.double()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    task = ik.ClassificationTask(model, l2=1e-2)
    ik.fit_lbfgs(task, (X, y), tol=1e-10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    weights = (y != 3).double()
    results = {}
    for newton_start in (False, True):
        model.load_state_dict(start)
        report = ik.fit_lbfgs(task, (X, y), weights=weights, tol=1e-10, newton_start=newton_start)
        assert report.converged, report
        results[newton_start] = (report.iterations, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    (it_plain, plain), (it_newton, newton) = results[False], results[True]
    assert float((newton - plain).norm() / plain.norm()) < 1e-8
    assert it_newton <= 10 < it_plain, (it_newton, it_plain)
