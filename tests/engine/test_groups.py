"""Influence.group_influence against exact references on logistic regression (float64).

- order 1 is the sum of −I_up,loss/n over the group (docs/conventions.md);
- "newton" is (H + δI − H_U)⁻¹ g_U from the explicit closed-form Hessians, measured at θ̂ + Δ;
- order 2 is θ̂ + θ'(0) + ½θ''(0) of the removal path θ(ε) = argmin R − ε(1/n)Σ_U L, checked against central
  finite differences of θ(ε) computed by retraining at ε = ±h.
"""

import copy

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.engine.groups import parse_groups
from problems import LogisticReference, digits_logistic, relative_error, to_ours

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def logistic():
    return digits_logistic(n_train=300, l2=1e-2)


@pytest.fixture(scope="module")
def fitted(logistic):
    return ik.Influence(logistic.task, logistic.train, solver="exact").fit()


def _groups(y: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.flatnonzero(y == 3)[:20], rng.choice(len(y), 30, replace=False), np.arange(5), np.flatnonzero(y == 7)]


def test_order_1_is_the_sum_of_the_pointwise_predictions(logistic, fitted):
    test = (logistic.test[0][:15], logistic.test[1][:15])
    groups = _groups(logistic.train[1].numpy())
    result = fitted.group_influence(groups, test, order=1)
    pointwise = fitted.scores(test).predicted_loo_change()
    expected = torch.stack([pointwise[:, g].sum(1) for g in groups])
    assert result.shape == (4, 15) and result.sizes == tuple(len(g) for g in groups)
    assert torch.allclose(result.values, expected, rtol=1e-10, atol=1e-13)
    # CG solves the group side, not the test side: the same numbers to its tolerance
    cg = ik.Influence(logistic.task, logistic.train, solver="cg").fit().group_influence(groups, test)
    assert relative_error(cg.values, expected) < 1e-6


def test_newton_step_matches_the_explicit_hessians(logistic, fitted):
    ref: LogisticReference = logistic.ref
    X, y = ref.X, ref.y
    n, (C, D1) = len(y), ref.theta.shape
    test = (logistic.test[0][:10], logistic.test[1][:10])
    groups = _groups(y)
    result = fitted.group_influence(groups, test, order="newton", newton_tol=1e-12)
    assert result.metadata["newton"]["converged"] and result.metadata["newton"]["relative_residual"] < 1e-12
    H = ref.hessian()
    G = ref.grads(X, y, with_l2=True)
    for g, members in enumerate(groups):
        H_U = len(members) / n * LogisticReference(ref.theta, X[members], y[members], ref.l2).hessian()
        delta = np.linalg.solve(H - H_U, G[members].sum(0) / n)
        ours = to_ours(delta.reshape(C, D1), C, D1 - 1)
        assert relative_error(result.params_change[g].numpy(), ours) < 1e-9, g
        theta = ref.theta + delta.reshape(C, D1)
        moved = ref.test_losses(theta, test[0].numpy(), test[1].numpy()) - ref.test_losses(
            ref.theta, test[0].numpy(), test[1].numpy()
        )
        np.testing.assert_allclose(result.values[g].numpy(), moved, rtol=1e-8, atol=1e-12)


def _removal_path(logistic, members: np.ndarray, eps: float):
    """θ(ε) by retraining: weight 1 − ε on the group (same minimiser as R − ε(1/n)Σ_U L), and the test losses there."""
    task = copy.deepcopy(logistic.task)
    weights = torch.ones(len(logistic.train[1]), dtype=torch.float64)
    weights[members] = 1.0 - eps
    report = ik.fit_lbfgs(task, logistic.train, weights=weights, tol=1e-13)
    assert report.converged, report
    flat = torch.cat([p.reshape(-1) for p in task.params().values()])
    return flat, task.measurement(task.params(), (logistic.test[0][:10], logistic.test[1][:10]))


def test_order_2_is_the_second_order_expansion_of_the_removal(logistic, fitted):
    members = np.flatnonzero(logistic.train[1].numpy() == 3)[:25]
    test = (logistic.test[0][:10], logistic.test[1][:10])
    both = fitted.group_influence([members], test, order=[1, 2])
    h = 1e-2
    (tp, fp), (tm, fm) = _removal_path(logistic, members, h), _removal_path(logistic, members, -h)
    theta0 = torch.cat([p.reshape(-1) for p in logistic.task.params().values()])
    f0 = logistic.task.measurement(logistic.task.params(), test)
    first = (tp - tm) / (2 * h)  # θ'(0); error O(h²)
    second = (tp - 2 * theta0 + tm) / h**2  # θ''(0); error O(h²)
    assert relative_error(both["1"].params_change[0], first) < 1e-3
    assert relative_error(2 * (both["2"].params_change[0] - both["1"].params_change[0]), second) < 1e-3
    # the test values: order 2 − order 1 = ½ f''(0), f(ε) the test losses along the path
    f_second = (fp - 2 * f0 + fm) / h**2
    assert relative_error(2 * (both["2"].values[0] - both["1"].values[0]), f_second) < 1e-3


def test_every_way_of_naming_groups_gives_the_same_groups(logistic):
    y = logistic.train[1].numpy()
    n = len(y)
    by_label = parse_groups(y % 3, n)
    assert by_label.names == ("0", "1", "2") and sum(by_label.sizes) == n
    members = [np.flatnonzero(y % 3 == v) for v in range(3)]
    for form in (
        members,
        {"0": members[0], "1": members[1], "2": members[2]},
        by_label.mask(),
        torch.as_tensor(by_label.mask()),
        [torch.as_tensor(m) for m in members],
        [y % 3 == v for v in range(3)],
        [str(v) for v in y % 3],
    ):
        parsed = parse_groups(form, n)
        assert parsed.sizes == by_label.sizes and all(
            np.array_equal(a, b) for a, b in zip(parsed.members, by_label.members)
        )


@pytest.mark.parametrize(
    "groups, message",
    [
        ([[]], "at least one training point"),
        ([[0, 0, 1]], "must not repeat"),
        ([[0, 10_000]], r"indices in \[0, 299\]"),
        (np.zeros(5), r"one value per training point, shape \(300,\)"),
        (np.r_[np.full(299, 1.0), np.nan], "missing values"),
        ([np.arange(300)], "holds every training point"),
        (np.zeros((2, 7), dtype=bool), r"shape \(n_groups, 300\)"),
        ([], "at least one group"),
    ],
)
def test_bad_groups_are_refused_with_the_fix(fitted, logistic, groups, message):
    with pytest.raises(ik.InputError, match=message):
        fitted.group_influence(groups, logistic.test)


def test_bad_order_is_refused(fitted, logistic):
    with pytest.raises(ik.InputError, match="`order` must be one of '1', '2', 'newton'"):
        fitted.group_influence([[0, 1]], logistic.test, order=3)
    with pytest.raises(ik.InputError, match="newton_tol"):
        fitted.group_influence([[0, 1]], logistic.test, order="newton", newton_tol=0)


class _Quadratic(ik.Task):
    """ℓ_i(w) = ½ c_i w² − b_i w on one parameter: R is convex while the points outside a group may not be."""

    def loss(self, params, batch):
        c, b = batch
        w = self.forward(params)
        return 0.5 * c * w.pow(2).sum() - b * w.sum()


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self):
        return self.w


def test_newton_refuses_a_removal_that_leaves_negative_curvature():
    c = torch.tensor([3.0, 3.0, -1.0, -1.0], dtype=torch.float64)  # H = 1 > 0, without the first two: H = −1
    b = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # Σ b = 0: θ̂ = 0 is R's minimiser
    task = _Quadratic(_Scalar())
    inf = ik.Influence(task, (c, b), solver="exact").fit()
    assert inf.group_influence([[0, 1]], (c, b), order=1).values.abs().max() > 0
    with pytest.raises(ik.NumericalError, match=r"not positive definite .* Raise `damping`"):
        inf.group_influence([[0, 1]], (c, b), order="newton")


def test_ranking_orders_groups_by_their_effect_on_the_mean_test_loss(logistic, fitted):
    result = fitted.group_influence(logistic.train[1] % 4, logistic.test, order=1)
    rows = result.ranking()
    means = result.mean_change()
    assert [r["group"] for r in rows] == [result.names[i] for i in torch.argsort(-means.abs()).tolist()]
    assert all((r["effect"] == "harmful") == (r["mean_change"] < 0) for r in rows)
    assert sum(r["size"] for r in rows) == 300


def test_group_hvps_without_vmap_give_the_same_answer(logistic, fitted, monkeypatch):
    # a model vmap cannot batch over examples falls back to one summed HVP per group and chunk
    test = (logistic.test[0][:10], logistic.test[1][:10])
    groups = _groups(logistic.train[1].numpy())
    batched = fitted.group_influence(groups, test, order="newton")

    def refuse(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr("influencekit.engine.groups.per_example_hvp", refuse)
    looped = fitted.group_influence(groups, test, order="newton")
    torch.testing.assert_close(looped.values, batched.values, rtol=1e-9, atol=1e-12)
