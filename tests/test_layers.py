"""Layer-tap per-example gradients (influencekit.layers) against vmap(grad), and the engine's choice between them.

Tolerances: float64 throughout; the two routes differ only in summation order, so rows agree to 1e-12 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.autodiff import ParamLayout, per_example_grads
from influencekit.errors import UnsupportedError
from influencekit.layers import LayerGradients, choose_per_example


def _compare(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, params=None) -> float:
    task = ik.ClassificationTask(model, params=params)
    theta = task.params()
    layout = ParamLayout.of(theta)
    G_taps, v_taps = LayerGradients(model, layout)(task.loss, theta, (X, y))
    G_vmap, v_vmap = per_example_grads(task.loss, theta, (X, y), layout)
    assert torch.allclose(v_taps, v_vmap, rtol=1e-13, atol=1e-13)
    return float(((G_taps - G_vmap).norm(dim=1) / G_vmap.norm(dim=1)).max())


def test_mlp_with_biases_matches_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 3)).double()
    X, y = torch.randn(20, 7, dtype=torch.float64), torch.randint(0, 3, (20,))
    assert _compare(model, X, y) < 1e-12


def test_convolutions_of_every_kind_match_vmap():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),                                   # zero padding, bias
        nn.ReLU(),
        nn.Conv2d(4, 3, (2, 3), stride=2, dilation=(1, 2), bias=False),  # no bias, stride, dilation
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding="same", padding_mode="reflect"),     # string padding, reflect
        nn.Flatten(),
        nn.LazyLinear(4),
    ).double()
    X = torch.randn(9, 2, 10, 11, dtype=torch.float64)
    model(X)  # materialise the lazy layer
    y = torch.randint(0, 4, (9,))
    assert _compare(model, X, y) < 1e-12


class _Sequence(nn.Module):
    """A Linear applied at every position of a (B, T, d) input, then pooled: T > 1 positions per example."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


def test_linear_over_positions_and_a_selected_subset():
    torch.manual_seed(2)
    model = _Sequence().double()
    X, y = torch.randn(11, 6, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    assert _compare(model, X, y) < 1e-12
    assert _compare(model, X, y, params=["proj.weight", "head.bias"]) < 1e-12


class _PenalisedTask(ik.ClassificationTask):
    """A loss that uses a parameter outside its layer: layer taps cannot see the penalty."""

    def loss(self, params, batch):
        return super().loss(params, batch) + 0.3 * (params["0.weight"] ** 2).sum()


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_auto_falls_back_to_vmap_when_the_loss_uses_a_parameter_outside_its_layer():
    model = _mlp()
    task = _PenalisedTask(model)
    theta = task.params()
    layout = ParamLayout.of(theta)
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    fn, method, reason = choose_per_example("auto", model, task.loss, theta, layout, batch)
    assert method == "vmap" and "outside its layer" in reason
    G, _ = fn(task.loss, theta, batch)
    G_ref, _ = per_example_grads(task.loss, theta, batch, layout)
    assert torch.equal(G, G_ref)
    with pytest.raises(UnsupportedError, match="differ from vmap"):
        choose_per_example("layers", model, task.loss, theta, layout, batch)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.a(torch.tanh(self.a(x))))))


def test_unsupported_layers_and_shared_layers_fall_back_to_vmap():
    torch.manual_seed(4)
    model = _Shared().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    for params, match in ((["out", "norm"], "other layers"), (["a", "out"], "more than once")):
        task = ik.ClassificationTask(model, params=params)
        theta = task.params()
        layout = ParamLayout.of(theta)
        _, method, reason = choose_per_example("auto", model, task.loss, theta, layout, batch)
        assert method == "vmap" and match in reason
        with pytest.raises(UnsupportedError, match=match):
            choose_per_example("layers", model, task.loss, theta, layout, batch)


def test_engine_scores_equal_with_either_gradient_method(digits_small):
    (X, y), (Xt, yt) = digits_small.train, digits_small.test
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    results = {}
    for method in ("layers", "vmap", "auto"):
        inf = ik.Influence(ik.ClassificationTask(model, l2=1e-2), (X[:150], y[:150]), solver="exact", damping=0.5,
                           gradients=method, batch_size=64)
        with pytest.warns(ik.StationarityWarning):
            inf.fit()
        results[method] = (inf.scores((Xt[:20], yt[:20])).values, inf.self_influence())
        assert inf.gradient_methods_ == {"train": "vmap" if method == "vmap" else "layers",
                                         "test": "vmap" if method == "vmap" else "layers"}
    for method in ("layers", "auto"):
        for a, b in zip(results[method], results["vmap"]):
            assert float((a - b).norm() / b.norm()) < 1e-12


def test_gradients_option_is_checked():
    with pytest.raises(ik.InputError, match="`gradients` must be one of"):
        ik.Influence(ik.ClassificationTask(_mlp()), torch.zeros(2, 4), gradients="fast")
