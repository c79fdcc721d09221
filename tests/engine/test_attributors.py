"""TracIn, TRAK and Ensemble against references built here from explicit per-example gradients (float64)."""

import numpy as np
import pytest
import torch

import influencekit as ik
from problems import small_mlp


@pytest.fixture(scope="module")
def problem():
    """A 6-5-3 tanh MLP (53 parameters) briefly trained on 80 random points; 7 test points."""
    torch.manual_seed(1)
    X = torch.randn(87, 6, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    model = small_mlp()
    task = ik.ClassificationTask(model, l2=1e-3, measurement="margin")
    start = {k: v.clone() for k, v in task.params().items()}
    ik.fit_steps(task, (X[:80], y[:80]), steps=50, lr=0.05, optimizer="adam")
    return task, (X[:80], y[:80]), (X[80:], y[80:]), start


def per_example_gradients(task, params, X, y, fn):
    rows = []
    for i in range(len(y)):
        live = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        value = fn(live, (X[i : i + 1], y[i : i + 1])).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(live.values()))]))
    return torch.stack(rows)


def training_objective(task):
    def objective(params, batch):
        return task.loss(params, batch) + 0.5 * task.l2 * sum((p * p).sum() for p in params.values())

    return objective


def test_tracin_with_one_checkpoint_and_rate_one_is_minus_the_gradient_dot_product(problem):
    task, train, test, _ = problem
    theta = task.params()
    G = per_example_gradients(task, theta, *train, training_objective(task))
    Q = per_example_gradients(task, theta, *test, task.measurement)
    scores = ik.TracIn(task, train, checkpoints=[theta], learning_rates=1.0, batch_size=16).scores(test)
    torch.testing.assert_close(scores.values, -(Q @ G.T), rtol=1e-10, atol=1e-12)
    assert scores.n_train == 80 and scores.metadata["method"] == "tracin"


def test_tracin_sums_checkpoints_weighted_by_their_learning_rates(problem):
    task, train, test, start = problem
    end = task.params()
    both = ik.TracIn(task, train, checkpoints=[start, end], learning_rates=[0.5, 2.0]).scores(test).values
    first = ik.TracIn(task, train, checkpoints=[start], learning_rates=0.5).scores(test).values
    second = ik.TracIn(task, train, checkpoints=[end], learning_rates=2.0).scores(test).values
    torch.testing.assert_close(both, first + second, rtol=1e-12, atol=1e-14)


def test_trak_at_full_dimension_is_the_projection_free_least_squares_form(problem):
    """At dim = n_params the projection is invertible and drops out: φ_t(ΦᵀΦ)⁺Φᵀ = g_t(GᵀG)⁺Gᵀ, times 1 − p (the
    pseudo-inverse: the margins do not change when every logit moves together, so GᵀG is singular along that
    direction, where the test gradients have no component either; a ridge of 1e-10 × the mean diagonal stands in)."""
    task, train, test, _ = problem
    theta = task.params()
    G = per_example_gradients(task, theta, *train, task.measurement)
    Q = per_example_gradients(task, theta, *test, task.measurement)
    with torch.no_grad():
        p = torch.softmax(task.outputs(theta, train), dim=1).gather(1, train[1][:, None])[:, 0]
    expected = Q @ torch.linalg.pinv(G.T @ G, hermitian=True) @ G.T * (1 - p)[None, :]
    trak = ik.TRAK(task, train, checkpoints=[theta], dim=G.shape[1], damping=1e-10, batch_size=32)
    scores = trak.scores(test)
    assert float((scores.values - expected).norm() / expected.norm()) < 1e-6
    assert scores.metadata["method"] == "trak" and trak.fit_seconds_ > 0


def test_an_ensemble_of_one_equals_its_member_and_of_two_their_mean(problem):
    task, train, test, start = problem
    a = ik.TracIn(task, train, checkpoints=[task.params()])
    b = ik.TracIn(task, train, checkpoints=[start], learning_rates=3.0)
    one = ik.Ensemble([a]).scores(test)
    torch.testing.assert_close(one.values, a.scores(test).values, rtol=0, atol=0)
    two = ik.Ensemble([a, b]).scores(test)
    torch.testing.assert_close(two.values, (a.scores(test).values + b.scores(test).values) / 2, rtol=1e-12, atol=0)
    assert [m["method"] for m in two.metadata["members"]] == ["tracin", "tracin"]
    fitted = ik.Influence(task, train, solver="exact", damping=0.02, stationarity_tol=None).fit()
    torch.testing.assert_close(ik.Ensemble([fitted]).scores(test).values, fitted.scores(test).values, rtol=0, atol=0)


def test_bad_checkpoints_rates_and_members_are_refused_by_name(problem):
    task, train, _, _ = problem
    theta = task.params()
    with pytest.raises(ik.InputError, match=r"checkpoint 0 must hold the task's selected parameters"):
        ik.TracIn(task, train, checkpoints=[{"weight": theta["0.weight"]}])
    with pytest.raises(ik.InputError, match=r"checkpoint 1: parameter '0.weight' has shape \(2, 2\)"):
        ik.TracIn(task, train, checkpoints=[theta, {**theta, "0.weight": torch.zeros(2, 2)}])
    with pytest.raises(ik.InputError, match=r"one rate per checkpoint \(1\)\. Got 2"):
        ik.TracIn(task, train, checkpoints=[theta], learning_rates=[1.0, 2.0])
    with pytest.raises(ik.InputTypeError, match=r"`checkpoints` must be a non-empty list"):
        ik.TracIn(task, train, checkpoints=theta)
    with pytest.raises(ik.InputTypeError, match=r"TRAK weights each example by 1 − p"):
        ik.TRAK(ik.RegressionTask(small_mlp()), train, checkpoints=[theta])
    with pytest.raises(ik.InputTypeError, match=r"member 0 \(int\) has no scores\(test\) method"):
        ik.Ensemble([3])


def test_the_margin_measurement_is_the_correct_logit_minus_the_logsumexp_of_the_others(problem):
    task, train, _, _ = problem
    theta = task.params()
    logits = task.outputs(theta, train).detach()
    y = train[1]
    expected = np.array(
        [float(logits[i, y[i]] - torch.logsumexp(logits[i][torch.arange(3) != y[i]], 0)) for i in range(len(y))]
    )
    np.testing.assert_allclose(task.measurement(theta, train).detach().numpy(), expected, rtol=1e-12)
    assert task.describe()["measurement"] == "margin"
    with pytest.raises(ik.InputError, match=r"`measurement` must be one of 'loss', 'margin'\. Got 'accuracy'"):
        ik.ClassificationTask(small_mlp(), measurement="accuracy")
