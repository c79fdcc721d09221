"""Fast paths against the obvious slow ones: vmap gradients vs a loop, HVPs vs the dense Hessian."""

import torch

import influencekit as ik
from influencekit.core.autodiff import (
    ParamLayout,
    batch_grad_sum,
    hvp_sum,
    per_example_grads,
    per_example_hvp,
    second_directional,
    third_directional_sum,
)
from influencekit.data import Examples
from influencekit.engine.hessian import HessianOperator
from problems import small_mlp


def _problem(n=25):
    torch.manual_seed(0)
    X = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    model = small_mlp()
    return model, ik.ClassificationTask(model, l2=0.1), X, y


def test_layout_round_trip():
    model, task, _, _ = _problem()
    params = task.params()
    layout = ParamLayout.of(params)
    assert layout.n == sum(p.numel() for p in model.parameters()) == 53
    flat = layout.flatten(params)
    back = layout.unflatten(flat)
    for name in params:
        torch.testing.assert_close(back[name], params[name], rtol=0, atol=0)


def test_per_example_grads_equal_a_loop():
    model, task, X, y = _problem()
    params = task.params()
    layout = ParamLayout.of(params)
    G, losses = per_example_grads(task.loss, params, (X, y), layout)
    assert G.shape == (25, 53) and not G.requires_grad
    for i in range(25):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(G[i], expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-12, atol=0)


def test_batch_grad_sum_is_the_sum_of_per_example_grads():
    _, task, X, y = _problem()
    params = task.params()
    layout = ParamLayout.of(params)
    G, _ = per_example_grads(task.loss, params, (X, y), layout)
    g, _ = batch_grad_sum(task.loss, params, (X, y), layout)
    torch.testing.assert_close(g, G.sum(0), rtol=1e-12, atol=1e-13)
    w = torch.rand(25, dtype=torch.float64)
    gw, _ = batch_grad_sum(task.loss, params, (X, y), layout, w)
    torch.testing.assert_close(gw, (w[:, None] * G).sum(0), rtol=1e-12, atol=1e-13)


def _dense_hessian(model, X, y, l2):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(v):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}
        out = torch.func.functional_call(model, params, (X,))
        return torch.nn.functional.cross_entropy(out, y) + 0.5 * l2 * (v * v).sum()

    return torch.autograd.functional.hessian(objective, theta)


def test_hvp_equals_dense_hessian_times_v():
    model, task, X, y = _problem()
    params = task.params()
    layout = ParamLayout.of(params)
    H = _dense_hessian(model, X, y, 0.0) * 25  # hvp_sum is over the sum, without L2
    V = torch.randn(7, 53, dtype=torch.float64)
    torch.testing.assert_close(hvp_sum(task.loss, params, (X, y), layout, V), V @ H, rtol=1e-10, atol=1e-11)


def test_operator_matvec_and_dense_are_chunk_independent():
    model, task, X, y = _problem()
    H = _dense_hessian(model, X, y, 0.1)
    V = torch.randn(5, 53, dtype=torch.float64)
    for batch_size, block in [(25, 64), (4, 3), (1, 1)]:
        op = HessianOperator(
            task, task.params(), Examples((X, y)), damping=0.3, batch_size=batch_size, tangent_block=block
        )
        torch.testing.assert_close(op.matvec(V), V @ H + 0.3 * V, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-11)
    idx = torch.tensor([3, 7, 7, 20])
    sub = _dense_hessian(model, X[idx], y[idx], 0.1)
    torch.testing.assert_close(op.minibatch_matvec(V, idx), V @ sub + 0.3 * V, rtol=1e-10, atol=1e-11)


def test_weighted_operator_matches_weighted_objective():
    model, task, X, y = _problem()
    w = torch.ones(25, dtype=torch.float64)
    w[4] = 0.0  # leave example 4 out
    keep = torch.arange(25) != 4
    H = _dense_hessian(model, X[keep], y[keep], 0.1)
    op = HessianOperator(task, task.params(), Examples((X, y)), damping=0.0, batch_size=6, tangent_block=8, weights=w)
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-11)


def test_per_example_hvp_equals_one_hvp_per_example():
    _, task, X, y = _problem(n=7)
    params = task.params()
    layout = ParamLayout.of(params)
    V = torch.randn(7, layout.n, dtype=torch.float64)
    ours = per_example_hvp(task.loss, params, (X, y), layout, V)
    for i in range(7):
        expected = hvp_sum(task.loss, params, (X[i : i + 1], y[i : i + 1]), layout, V[i : i + 1])[0]
        torch.testing.assert_close(ours[i], expected, rtol=1e-12, atol=1e-14)


def test_third_and_second_directional_derivatives_equal_finite_differences():
    # ∇³R[v, v] = d/dt H(θ + t v)v at 0; vᵀ∇²ℓ_i v = d²/dt² ℓ_i(θ + t v): central differences, error O(h²)
    _, task, X, y = _problem(n=9)
    params = task.params()
    layout = ParamLayout.of(params)
    V = torch.randn(3, layout.n, dtype=torch.float64)
    theta = layout.flatten(params)
    third = third_directional_sum(task.loss, params, (X, y), layout, V)
    second = second_directional(task.loss, params, (X, y), layout, V)
    h = 1e-4
    for j, v in enumerate(V):
        plus, minus = layout.unflatten(theta + h * v), layout.unflatten(theta - h * v)
        fd3 = (hvp_sum(task.loss, plus, (X, y), layout, v[None]) - hvp_sum(task.loss, minus, (X, y), layout, v[None]))[
            0
        ] / (2 * h)
        assert float((third[j] - fd3).norm() / fd3.norm()) < 1e-6
        fd2 = (task.loss(plus, (X, y)) - 2 * task.loss(params, (X, y)) + task.loss(minus, (X, y))) / h**2
        torch.testing.assert_close(second[j], fd2, rtol=1e-4, atol=1e-6)
