"""I_pert,loss (Influence.perturbation_influence) against finite differences and actual retraining.

I_pert,loss(z, z_test) = −∇θℓ(z_test)ᵀ H⁻¹ ∇x∇θL(z, θ̂) is the gradient of I_up,loss(z, z_test) with
respect to the training input x, θ̂ and H held fixed; retraining after x → x + δ changes the test loss by
about I_pert,loss · δ / n (Koh & Liang 2017, §2.2).
"""

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.core.autodiff import ParamLayout, mixed_vjp
from influencekit.data import Examples
from influencekit.engine.config import Chunks
from influencekit.engine.perturbation import perturbation_scores
from problems import digits_logistic, relative_error

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def logistic():
    """Multiclass logistic regression on 300 digits (its own copy: the retraining test moves θ̂ and restores it)."""
    return digits_logistic(n_train=300)


def _frozen_features(n: int = 80, seed: int = 0):
    """A tanh MLP feature extractor (random, frozen) under a trained linear top layer, float64."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        OrderedDict(
            features=torch.nn.Sequential(
                torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5), torch.nn.Tanh()
            ),
            top=torch.nn.Linear(5, 3),
        )
    ).double()
    X = torch.randn(n + 10, 6, dtype=torch.float64)
    teacher = torch.randn(6, 3, dtype=torch.float64)
    y = (X @ teacher + 0.5 * torch.randn(n + 10, 3, dtype=torch.float64)).argmax(1)
    task = ik.ClassificationTask(model, l2=1e-2, params="top")
    report = ik.fit_lbfgs(task, (X[:n], y[:n]), tol=1e-11)
    assert report.converged
    return model, task, (X[:n], y[:n]), (X[n:], y[n:])


def _finite_difference(q: np.ndarray, grad_at, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """−q·∇θL(x) differentiated in every coordinate of x by central differences: (n_test, x.size)."""
    out = np.zeros((len(q), x.size))
    for k in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.flat[k] += h
        xm.flat[k] -= h
        out[:, k] = -(q @ (grad_at(xp) - grad_at(xm))) / (2 * h)
    return out


def test_matches_finite_differences_of_up_loss_on_logistic_regression(logistic):
    # The reference is numpy's closed form (tests/problems.py), independent of the engine: the gradient
    # ∇θL(z) = (p − e_y) ⊗ [x, 1] + λΘ and the dense Hessian, differenced in each of the 64 pixels.
    inf = ik.Influence(logistic.task, logistic.train, solver="exact").fit()
    X_test, y_test = logistic.test
    test = (X_test[:3], y_test[:3])
    idx = [0, 5, 17, 42, 299]
    P = inf.perturbation_influence(test, idx)
    assert P.shape == (3, len(idx), 64) and P.dtype == torch.float64

    ref = logistic.ref
    q = np.linalg.solve(ref.hessian(), ref.grads(test[0].numpy(), test[1].numpy(), with_l2=False).T).T
    X, y = ref.X, ref.y
    for a, i in enumerate(idx):
        fd = _finite_difference(q, lambda x: ref.grads(x[None], y[i : i + 1], with_l2=True)[0], X[i].copy())
        assert relative_error(P[:, a].numpy(), fd) < 1e-4  # measured ≈ 6e-10 (central differences, h = 1e-5)


def test_matches_finite_differences_through_a_frozen_feature_extractor():
    # θ = the top layer only; the input gradient goes through the frozen tanh layers. The reference
    # Hessian and gradients come from torch.autograd on the mean objective, not from the engine.
    model, task, train, test = _frozen_features()
    inf = ik.Influence(task, train, solver="exact").fit()
    idx = [0, 3, 79]
    P = inf.perturbation_influence(test, idx)
    assert P.shape == (10, 3, 6)

    W, b = model.top.weight.detach().clone(), model.top.bias.detach().clone()
    shapes = [W.shape, b.shape]

    def loss_at(theta, x, y):
        w, c = theta[: W.numel()].reshape(shapes[0]), theta[W.numel() :]
        return torch.nn.functional.cross_entropy(model.features(x) @ w.T + c, y, reduction="none")

    theta = torch.cat([W.reshape(-1), b])
    X, y = train
    H = torch.autograd.functional.hessian(lambda t: loss_at(t, X, y).mean() + 0.5 * task.l2 * (t * t).sum(), theta)
    G_test = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda t: loss_at(t, test[0][j : j + 1], test[1][j : j + 1]).sum(), theta
            )
            for j in range(len(test[1]))
        ]
    )
    q = torch.linalg.solve(H, G_test.T).T.numpy()

    def grad_at(i):
        def g(x):
            xt = torch.as_tensor(x)[None]
            return torch.autograd.functional.jacobian(
                lambda t: loss_at(t, xt, y[i : i + 1]).sum() + 0.5 * task.l2 * (t * t).sum(), theta
            ).numpy()

        return g

    for a, i in enumerate(idx):
        fd = _finite_difference(q, grad_at(i), X[i].numpy().copy())
        assert relative_error(P[:, a].numpy(), fd) < 1e-4  # measured ≈ 1e-9


def test_mixed_vjp_equals_the_dense_jacobian():
    # fast path (one reverse-over-forward pass per batch) against the obvious slow one (the full Jacobian
    # of one example's parameter gradient with respect to its input)
    model, task, (X, y), _ = _frozen_features(n=12)
    params = task.params()
    layout = ParamLayout.of(params)
    V = torch.randn(4, layout.n, dtype=torch.float64)
    fast = mixed_vjp(task.loss, params, (X, y), layout, V)
    assert fast.shape == (4, 12, 6)
    for i in range(12):

        def grad_of_x(x):
            p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            loss = task.loss(p, (x[None], y[i : i + 1])).sum()
            return layout.flatten(dict(zip(p, torch.autograd.grad(loss, list(p.values()), create_graph=True))))

        J = torch.autograd.functional.jacobian(grad_of_x, X[i])  # (n_params, 6)
        torch.testing.assert_close(fast[:, i], V @ J, rtol=1e-10, atol=1e-12)


def test_dict_batches_and_chunking_give_the_same_answer(logistic):
    X, y = logistic.train
    test = (logistic.test[0][:4], logistic.test[1][:4])
    whole = (
        ik.Influence(logistic.task, logistic.train, solver="exact").fit().perturbation_influence(test, range(0, 300, 7))
    )
    engine = ik.Influence(logistic.task, {"x": X, "y": y}, solver="exact", batch_size=5).fit().engine
    engine = dataclasses.replace(
        engine, chunks=Chunks(grad=5, hvp=5, tangents=3, queries=2)
    )  # every loop runs several times
    chunked, _ = perturbation_scores(
        engine, Examples({"x": test[0], "y": test[1]}, name="test"), list(range(0, 300, 7))
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_retraining_after_a_perturbation_moves_the_test_loss_as_predicted(logistic, sign):
    # Perturb the 5 training digits with the largest ‖I_pert‖₁ by δ = ±0.01·sign(I_pert) (0.16 of one of the
    # 16 grey levels) and retrain from θ̂: the predicted change is Σ_i I_pert,i·δ_i / n.
    task, (X, y) = logistic.task, logistic.train
    inf = ik.Influence(task, (X, y), solver="exact").fit()
    X_test, y_test = logistic.test
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(logistic.model(X_test), y_test, reduction="none")
    t = int(losses.argmax())
    test = (X_test[t : t + 1], y_test[t : t + 1])
    P = inf.perturbation_influence(test, range(len(y)))[0]  # (300, 64)
    chosen = P.abs().sum(1).topk(5).indices
    delta = sign * 0.01 * torch.sign(P[chosen])
    predicted = float((P[chosen] * delta).sum()) / len(y)

    saved = {k: v.clone() for k, v in task.params().items()}
    try:
        X_new = X.clone()
        X_new[chosen] += delta
        assert ik.fit_lbfgs(task, (X_new, y), tol=1e-10).converged
        with torch.no_grad():
            actual = float(torch.nn.functional.cross_entropy(logistic.model(test[0]), test[1])) - float(losses[t])
    finally:
        with torch.no_grad():
            for name, p in logistic.model.named_parameters():
                p.copy_(saved[name])
    print(f"retraining: predicted {predicted:+.5f}, actual {actual:+.5f}")
    assert np.sign(actual) == sign
    # measured: predicted ±0.3174, actual +0.3152 / −0.3180 (0.7% and 0.2% apart); the gap is second order in δ
    assert abs(actual - predicted) < 0.05 * abs(predicted)


def test_integer_inputs_are_refused_with_advice():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2)).double()
    tokens = torch.randint(0, 10, (30, 3))
    labels = torch.randint(0, 2, (30,))
    inf = ik.Influence(
        ik.ClassificationTask(model, l2=0.1), (tokens, labels), solver="exact", damping=1.0, stationarity_tol=1e9
    ).fit()
    with pytest.raises(ik.UnsupportedError, match=r"needs continuous inputs.*torch.int64.*embeddings"):
        inf.perturbation_influence((tokens[:2], labels[:2]), [0, 1])


def test_bad_arguments_are_refused(logistic):
    inf = ik.Influence(logistic.task, logistic.train, solver="exact").fit()
    test = (logistic.test[0][:1], logistic.test[1][:1])
    with pytest.raises(ik.InputError, match=r"`train_idx` must hold indices in \[0, 299\]"):
        inf.perturbation_influence(test, [300])
    with pytest.raises(ik.InputError, match=r"`input` must name the input inside each batch.*Got 5 for a tuple of 2"):
        inf.perturbation_influence(test, [0], input=5)
    with pytest.raises(ik.NotFittedError):
        ik.Influence(logistic.task, logistic.train).perturbation_influence(test, [0])
