"""The closed-form Hessian of a final Linear layer (softmax and logistic, with and without bias, example weights,
the head of a frozen network) equals the one built from HVPs to 1e-12; anything else falls back to the HVPs."""

from __future__ import annotations

import torch

import influencekit as ik
from influencekit.data import Examples
from influencekit.engine.hessian import HessianOperator
from influencekit.engine.last_layer import CLOSED_FORM, last_linear_hessian


def _both(task, data, weights=None):
    op = HessianOperator(
        task, task.params(), Examples(data), damping=0.0, batch_size=64, tangent_block=64, weights=weights
    )
    closed = last_linear_hessian(op)
    p = op.n_params
    H = torch.stack([op.matvec(e[None], damped=False)[0] for e in torch.eye(p, dtype=torch.float64)])
    return closed, 0.5 * (H + H.T)


def _data(n=150, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def test_softmax_regression_with_bias_and_l2():
    X, y = _data()
    task = ik.ClassificationTask(torch.nn.Linear(6, 3).double(), l2=1e-2)
    closed, hvp = _both(task, (X, y))
    assert closed is not None and float((closed - hvp).abs().max() / hvp.abs().max()) < 1e-12


def test_logistic_regression_without_bias_and_weighted_examples():
    X, y = _data(classes=2)
    task = ik.ClassificationTask(torch.nn.Linear(6, 1, bias=False).double(), l2=1e-3)
    w = torch.rand(150, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    closed, hvp = _both(task, (X, y), weights=w)
    assert closed is not None and float((closed - hvp).abs().max() / hvp.abs().max()) < 1e-12


def test_the_head_of_a_frozen_network():
    X, y = _data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    task = ik.ClassificationTask(net, l2=1e-2, params=["2.weight", "2.bias"])
    closed, hvp = _both(task, (X, y))
    assert closed is not None and float((closed - hvp).abs().max() / hvp.abs().max()) < 1e-12
    # the exact solver says which route built its Hessian
    inf = ik.Influence(task, (X, y), solver="exact", stationarity_tol=1e9).fit()
    report = inf.scores((X[:2], y[:2])).metadata["solve_reports"][0]
    assert report["details"]["hessian"] == CLOSED_FORM


def test_other_selections_and_losses_fall_back_to_hvps():
    X, y = _data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    whole = ik.ClassificationTask(net, l2=1e-2)  # every layer selected: the logits are not linear in θ
    assert _both(whole, (X, y))[0] is None
    first = ik.ClassificationTask(net, l2=1e-2, params=["0.weight", "0.bias"])  # a Linear that is not the last
    assert _both(first, (X, y))[0] is None
    regression = ik.RegressionTask(torch.nn.Linear(6, 1).double(), l2=1e-2)  # not cross-entropy
    assert _both(regression, (X, torch.randn(150, 1, dtype=torch.float64)))[0] is None
    inf = ik.Influence(whole, (X, y), solver="exact", damping=1.0, stationarity_tol=1e9).fit()
    assert inf.scores((X[:2], y[:2])).metadata["solve_reports"][0]["details"]["hessian"] == "HVPs with identity blocks"
